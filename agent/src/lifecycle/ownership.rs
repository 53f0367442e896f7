//! One owner per node, decided by the kernel: an exclusive `flock` on the
//! node's pin directory (`<bpffs>/nodemesh/<node>`). The kernel drops it when
//! its holder exits or crashes, so a standby (or the next agent) takes over
//! without anyone cleaning up; the admin socket's path plays no part.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::ebpf;

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
}

/// Who owns a node's data path, as `nodemesh status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub version: String,
    /// When it became the owner (by the lock or by a hand-over).
    pub since_unix_ms: u64,
}

impl Owner {
    /// This process, owner from now on.
    pub fn this_process() -> Owner {
        Owner {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            since_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// The held lock: while it lives, this process may change the node's maps,
/// links, pins and enrollment, and no other agent may.
#[derive(Debug)]
pub struct NodeLock {
    lock: Flock<OwnedFd>,
    pin_dir: PathBuf,
}

impl NodeLock {
    /// Takes the node's lock if nobody holds it; `Ok(None)` when another
    /// agent does. Creates (and mounts) what the lock lives on.
    pub fn try_acquire(bpffs: &Path, node: &str) -> Result<Option<NodeLock>, OwnershipError> {
        let pin_dir = ebpf::pin_dir(bpffs, node);
        let dir = open_pin_dir(bpffs, &pin_dir)?;
        match Flock::lock(OwnedFd::from(dir), FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(NodeLock { lock, pin_dir })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(OwnershipError::Io {
                what: format!("locking {}", pin_dir.display()),
                source: e.into(),
            }),
        }
    }

    /// The lock handed over by the previous owner: the same open file (the
    /// kernel's lock is on it), so ownership never lapses in between.
    pub fn adopt(handed: OwnedFd, pin_dir: PathBuf) -> Result<NodeLock, OwnershipError> {
        // Locking an open file that already holds the lock only confirms it;
        // it fails if what was handed is not that file.
        match Flock::lock(handed, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(NodeLock { lock, pin_dir }),
            Err((_, e)) => Err(OwnershipError::Io {
                what: format!("the lock handed over on {}", pin_dir.display()),
                source: e.into(),
            }),
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The locked file, to hand over to the next owner.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }

    /// Gives the lock away after a hand-over: the next owner holds the same
    /// open file, so this process must never unlock it (unlocking would
    /// release it for both); its descriptor closes when this process exits.
    pub fn give_away(self) {
        std::mem::forget(self.lock);
    }
}

/// Fails, saying who runs the node, if an agent owns it: what must not be
/// removed from under a running agent (`nodemesh uninstall`).
pub fn ensure_unowned(bpffs: &Path, node: &str) -> Result<(), OwnershipError> {
    let pin_dir = ebpf::pin_dir(bpffs, node);
    let Ok(dir) = File::open(&pin_dir) else {
        return Ok(());
    };
    match Flock::lock(dir, FlockArg::LockSharedNonblock) {
        Ok(_) => Ok(()),
        Err((_, e)) => Err(OwnershipError::Io {
            what: format!(
                "an agent owns node {node} ({} is locked); stop it first",
                pin_dir.display()
            ),
            source: e.into(),
        }),
    }
}

fn open_pin_dir(bpffs: &Path, pin_dir: &Path) -> Result<File, OwnershipError> {
    ebpf::ensure_bpffs(bpffs)?;
    let io = |what: &str| {
        let what = format!("{what} {}", pin_dir.display());
        move |source| OwnershipError::Io { what, source }
    };
    std::fs::create_dir_all(pin_dir).map_err(io("creating"))?;
    File::open(pin_dir).map_err(io("opening"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bpffs-like directory on tmpfs: flock works on any directory.
    fn pin_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nodemesh-lock-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn lock(dir: &Path) -> Option<Flock<File>> {
        Flock::lock(File::open(dir).unwrap(), FlockArg::LockExclusiveNonblock).ok()
    }

    #[test]
    fn a_handed_lock_stays_held_after_the_giver_lets_go() {
        let dir = pin_dir();
        let first = lock(&dir).expect("free");
        assert!(lock(&dir).is_none(), "a second holder");
        let handed = first.as_fd().try_clone_to_owned().unwrap();
        let adopted = NodeLock::adopt(handed, dir.clone()).unwrap();
        std::mem::forget(first);
        assert!(lock(&dir).is_none(), "released by the hand-over");
        drop(adopted);
        assert!(lock(&dir).is_some(), "not released by the new owner");
        std::fs::remove_dir(&dir).unwrap();
    }
}
