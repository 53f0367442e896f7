//! Each worker thread's own map from a finished request to the series it is
//! counted in, so that recording a request in the common case (a call like
//! one this thread recorded before, under the same config snapshot) takes
//! no lock shared by the proxy's threads: a map lookup of this thread's and
//! a few atomic adds. A miss resolves through [`Standard`]'s one map, as
//! every call did before.
//!
//! Entries are valid for one config snapshot of one [`Standard`]: the
//! labels a call resolves to follow the configuration (the snapshot is
//! compared by address; the `Weak` keeps the address from being reused).
//!
//! [`Standard`]: super::standard::Standard

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::flags::ResponseFlags;
use super::standard::{EdgeKey, RequestSeries};
use crate::config::Config;

/// Entries kept per thread before the cache starts over (a few per edge
/// and response code a thread serves).
const MAX_CACHED: usize = 1024;

/// Everything that names a request's series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct CallKey {
    pub edge: EdgeKey,
    pub grpc: bool,
    pub code: u16,
    pub grpc_status: Option<u16>,
    pub flags: ResponseFlags,
}

/// The series a call is counted in; `overflowed`: it is the reporter's
/// overflow series because the bound on series was reached (each such
/// call is counted as overflowed).
pub(super) struct Resolved {
    pub series: Arc<RequestSeries>,
    pub overflowed: bool,
}

struct Cache {
    /// The [`Standard`](super::standard::Standard) the entries belong to.
    owner: u64,
    snapshot: Weak<Config>,
    entries: HashMap<CallKey, Resolved>,
}

impl Cache {
    fn new() -> Cache {
        Cache {
            owner: 0,
            snapshot: Weak::new(),
            entries: HashMap::new(),
        }
    }

    /// The entry of `key`, resolved when this thread has none valid.
    fn entry(
        &mut self,
        owner: u64,
        config: &Arc<Config>,
        key: CallKey,
        resolve: impl FnOnce() -> Resolved,
    ) -> &Resolved {
        let same = self.owner == owner && std::ptr::eq(self.snapshot.as_ptr(), Arc::as_ptr(config));
        if !same || self.entries.len() >= MAX_CACHED {
            self.owner = owner;
            self.snapshot = Arc::downgrade(config);
            self.entries.clear();
        }
        self.entries.entry(key).or_insert_with(resolve)
    }
}

thread_local! {
    static REQUESTS: RefCell<Cache> = RefCell::new(Cache::new());
}

/// Calls `count` with the series of the call `key` of the [`Standard`]
/// numbered `owner`, as resolved by `resolve` against `config` when this
/// thread has not resolved it yet.
///
/// [`Standard`]: super::standard::Standard
pub(super) fn with_request_series(
    owner: u64,
    config: &Arc<Config>,
    key: CallKey,
    resolve: impl FnOnce() -> Resolved,
    count: impl FnOnce(&Resolved),
) {
    let mut pending = Some((resolve, count));
    // `resolve` takes `Standard`'s own lock, never this cache, so the
    // cache is never borrowed twice.
    let _ = REQUESTS.try_with(|cache| {
        if let Some((resolve, count)) = pending.take() {
            count(cache.borrow_mut().entry(owner, config, key, resolve));
        }
    });
    if let Some((resolve, count)) = pending {
        // The thread is exiting and its cache is gone: resolve directly.
        count(&resolve());
    }
}
