//! Giving memory back after a burst. glibc's malloc keeps what a tenant's
//! burst freed (thousands of streams or connections) in its per-thread
//! arenas, so the agent's RSS stayed at its peak for good; `malloc_trim`
//! returns every free page of every arena to the system. Measured against
//! mimalloc (v2 and v3), which started 23 MB higher on this workload and did
//! not come back down either.

use std::time::Duration;

/// Heap arenas of glibc's malloc. By default a thread that finds the arenas
/// busy gets one of its own, up to eight per core: tokio's workers, its
/// blocking threads and the config loader each end up with one, each
/// keeping its own free memory and partly used pages that the others cannot
/// use and `malloc_trim` cannot hand back. Two serve the agent's few
/// threads without contention that shows in the bench.
pub const ARENAS: libc::c_int = 2;

/// Blocks at least this large get pages of their own (`mmap`), returned to
/// the system as soon as they are freed. glibc's default is the same size,
/// but it raises it to up to 32 MB each time such a block is freed, after
/// which the big tables of a config load (and the JSON of `nodemesh routes`)
/// are carved from the arenas and may stay there; setting it keeps it fixed.
pub const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Sets glibc's malloc up for a long-running agent ([`ARENAS`],
/// [`MMAP_THRESHOLD`]); call before any thread starts.
pub fn tune_allocator() {
    for (parameter, name, value) in [
        (libc::M_ARENA_MAX, "M_ARENA_MAX", ARENAS),
        (libc::M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD", MMAP_THRESHOLD),
    ] {
        // SAFETY: `mallopt` only sets a tuning parameter of glibc's malloc
        // and takes no pointers; it is called before other threads exist.
        if unsafe { libc::mallopt(parameter, value) } != 1 {
            log::warn!("cannot set malloc's {name} to {value}; the agent may hold more memory");
        }
    }
}

/// How often free memory is handed back: often enough that a burst's memory
/// is back within seconds, rare enough to cost nothing measurable (a trim of
/// a small heap takes well under a millisecond).
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Hands free heap pages back to the system every [`TRIM_EVERY`], off the
/// proxy's worker threads.
pub async fn return_freed_memory() {
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

/// Hands free heap pages back to the system now (the config loader calls it after each
/// load, whose parse trees can be hundreds of MB).
pub fn trim() {
    // SAFETY: `malloc_trim` only walks and trims glibc's own arenas, under
    // their locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
