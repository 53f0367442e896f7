//! The agent's open-file limit (`RLIMIT_NOFILE`): every proxied connection
//! costs descriptors, and the default soft limit of 1024 is far too low for
//! a proxy shared by every tenant of a node.

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
use serde::Serialize;

/// Where the kernel caps `RLIMIT_NOFILE` when the hard limit is unlimited.
const NR_OPEN: &str = "/proc/sys/fs/nr_open";

/// The limit the agent runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Nofile {
    /// The soft limit before the agent raised it.
    pub was: u64,
    /// The limit in force: what an `open`, `socket` or `accept` hits.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit to the hard limit (to the kernel's `nr_open` when
/// the hard limit is unlimited) and returns the limit in force.
pub fn raise_to_hard() -> io::Result<Nofile> {
    let (was, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = if hard == RLIM_INFINITY {
        std::fs::read_to_string(NR_OPEN)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    if target > was {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(Nofile { was, soft, hard })
}

/// Descriptors the process holds right now.
pub fn open_count() -> io::Result<usize> {
    // The directory's own descriptor is counted too: one too many is safe.
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}
