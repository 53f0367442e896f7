//! How the agent gives memory back. Its heap holds two kinds of things that
//! come and go: a tenant's burst (thousands of streams or connections), and
//! the config snapshots of a cluster's tables (a rebuild holds the old and the
//! new one at once, and the objects they were built from stay between them).
//! glibc's malloc left both in sub-page holes between live blocks that even
//! `malloc_trim` cannot hand back: at 2 000 Services an agent whose tables had
//! shrunk to the Services alone kept 54 MB where a fresh one needed 28 MB.
//! jemalloc keeps blocks of one size together and returns every page that
//! empties: 37 MB there, and a burst's memory within seconds.
//! The 54 MB were glibc already tuned (two arenas, a fixed mmap threshold,
//! `malloc_trim` every 5 s; 46 MB in another run). Measured too: jemalloc's
//! defaults (63 MB: four arenas per core, pages kept for ten seconds),
//! mimalloc v2 and v3 (23 MB more at start, never came down).

/// jemalloc's options (`malloc_conf`): two arenas serve the agent's few
/// threads without contention that shows in the bench (its default of four
/// per core keeps that many sets of partly used pages); pages a burst freed
/// are returned after a second by a background thread, rather than kept for
/// ten seconds or until the next allocation in that arena. Operators can
/// override them with the `_RJEM_MALLOC_CONF` environment variable.
pub const JEMALLOC_OPTIONS: &[u8] =
    b"narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0,background_thread:true\0";
