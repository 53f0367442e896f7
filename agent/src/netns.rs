//! Network namespaces of workloads.
//!
//! Like ztunnel's in-pod mode, the agent opens its sockets *inside* each
//! workload's network namespace (enter on the current thread, create the
//! socket, leave): the socket keeps that namespace for its whole life, so one
//! process serves every workload without touching the node's routing.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// An open handle on a network namespace; it stays valid even if the path is
/// unmounted.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    cookie: u64,
}

impl NetNs {
    pub fn open(path: &Path) -> io::Result<NetNs> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut ns = NetNs { file, cookie: 0 };
        ns.cookie = ns.enter(|| {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            netns_cookie(&probe)
        })?;
        Ok(ns)
    }

    /// The kernel's id for this namespace (what `bpf_get_netns_cookie` returns).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` with the current thread inside this namespace. `f` must be
    /// short and must not yield to other tasks (it only creates sockets).
    pub fn enter<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        HOME.with(|home| {
            let home = home
                .as_ref()
                .map_err(|e| io::Error::new(e.kind(), format!("own network namespace: {e}")))?;
            setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let result = f();
            // Failing to return would leave a runtime thread in a workload's
            // namespace: nothing sane can continue after that.
            if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
                panic!("cannot return to the agent's network namespace: {e}");
            }
            result
        })
    }
}

thread_local! {
    /// The agent's own namespace, opened once per thread (on first use, when
    /// the thread is at home: `enter` always returns).
    static HOME: io::Result<File> = File::open("/proc/thread-self/ns/net");
}

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the socket's namespace.
fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a valid u64 and `len` its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}
