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
//!
//! It also unmaps the code that only its control plane runs, once each burst
//! of control work is over ([`release_after_each_burst`]).

use std::time::Duration;

use tokio::sync::watch;

/// jemalloc's options (`malloc_conf`): two arenas serve the agent's few
/// threads without contention that shows in the bench (its default of four
/// per core keeps that many sets of partly used pages); pages a burst freed
/// are returned after a second by a background thread, rather than kept for
/// ten seconds or until the next allocation in that arena. Operators can
/// override them with the `_RJEM_MALLOC_CONF` environment variable.
pub const JEMALLOC_OPTIONS: &[u8] =
    b"narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0,background_thread:true\0";

/// How long the control plane must stay quiet after a burst (a configuration
/// change, a certificate issued) before its code is unmapped again. Changes
/// come in bursts (a rollout, every identity of a node at start); unmapping
/// in the middle of one only maps the same pages back, which costs little:
/// a minor fault per 16 pages the data path runs again.
pub const SETTLED_AFTER: Duration = Duration::from_secs(2);

/// What [`release_code_pages`] unmapped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub mappings: usize,
    pub bytes: u64,
}

/// Unmaps the agent's resident pages of code and read-only data (its own
/// binary's and the C libraries'), so that only those it runs from now on
/// come back. Starting touches code that never runs again (loading the eBPF
/// programs and parsing the kernel's BTF, the command line, the first
/// configuration), and so does every later burst of control work (parsing
/// YAML, building tables, making a key and a CSR, checking a certificate):
/// see [`release_after_each_burst`]. Such pages are clean copies of the
/// files in the page cache, so dropping them loses nothing: the next access
/// maps the same bytes back (a minor fault), and the ones no longer mapped
/// become the first the kernel reclaims when the node needs memory. What comes back
/// depends on the layout: the kernel maps the 16 pages around each fault, so
/// a data path spread over the binary maps most of it again (2.5 MB less
/// under load in a plain build), one laid out together by a profile-guided
/// build (`cargo xtask build --pgo`) far less.
///
/// Only private mappings without write permission and without a single
/// anonymous page are touched: relocated data (RELRO) and pages a debugger
/// or a uprobe patched are copies that exist nowhere else.
pub fn release_code_pages() -> std::io::Result<Released> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let exe = std::fs::read_link("/proc/self/exe")?;
    let mut released = Released::default();
    for mapping in parse_smaps(&smaps) {
        if !mapping.is_clean_code_or_rodata_of(&exe) {
            continue;
        }
        let length = mapping.end - mapping.start;
        // SAFETY: the range is one whole private, read-only mapping of a
        // file that holds no anonymous page (checked just above, and
        // nothing in the agent writes to or remaps it): discarding its page
        // table entries drops nothing but those entries, and every later
        // access maps the file's same bytes again.
        let result = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                length as libc::size_t,
                libc::MADV_DONTNEED,
            )
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released.mappings += 1;
        released.bytes += mapping.rss_kib * 1024;
    }
    Ok(released)
}

/// Calls `release` once each burst of control work has settled: starting
/// (from the call on), then every change on one of `changes`
/// (configuration generations, certificates issued, admin queries
/// answered), each followed by
/// `settled_after` ([`SETTLED_AFTER`]) without another. Ends when a sender
/// is gone (they live as long as the agent).
pub async fn release_after_each_burst(
    mut changes: Vec<watch::Receiver<u64>>,
    settled_after: Duration,
    mut release: impl FnMut(),
) {
    loop {
        while let Ok(true) = tokio::time::timeout(settled_after, next_change(&mut changes)).await {}
        release();
        if !next_change(&mut changes).await {
            return;
        }
    }
}

/// [`release_code_pages`], logged: the data path's pages come back at their
/// next use, the control plane's stay out until its next burst.
pub fn release_code_pages_logged() {
    match release_code_pages() {
        Ok(released) => log::debug!(
            "control work settled: unmapped {} KiB of code in {} mappings",
            released.bytes / 1024,
            released.mappings
        ),
        Err(e) => log::warn!("could not unmap code no longer in use: {e}"),
    }
}

/// Resolves at the next change on any of `changes` (at least one): `false`
/// once one of their senders is gone.
async fn next_change(changes: &mut [watch::Receiver<u64>]) -> bool {
    let changed = changes.iter_mut().map(|c| Box::pin(c.changed()));
    let (result, ..) = futures_util::future::select_all(changed).await;
    result.is_ok()
}

/// One mapping of `/proc/self/smaps`, the fields that decide whether its
/// pages can be dropped.
#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kib: u64,
    anonymous_kib: u64,
}

impl Mapping<'_> {
    fn is_clean_code_or_rodata_of(&self, exe: &std::path::Path) -> bool {
        let file = self.path == exe.as_os_str() || is_shared_library(self.path);
        file && self.perms.ends_with('p')
            && !self.perms.contains('w')
            && self.anonymous_kib == 0
            && self.rss_kib > 0
    }
}

/// `libc.so.6`, `ld-linux-x86-64.so.2`: the files the dynamic loader maps.
fn is_shared_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    path.starts_with('/')
        && (name.starts_with("lib") || name.starts_with("ld-"))
        && (name.ends_with(".so") || name.contains(".so."))
}

/// The mappings of an smaps text, with the fields read from each.
fn parse_smaps(smaps: &str) -> Vec<Mapping<'_>> {
    let mut mappings = Vec::new();
    let mut current: Option<Mapping<'_>> = None;
    for line in smaps.lines() {
        if let Some(next) = header(line) {
            mappings.extend(current.replace(next));
        } else if let (Some(mapping), Some((key, value))) = (current.as_mut(), field(line)) {
            match key {
                "Rss" => mapping.rss_kib = value,
                "Anonymous" => mapping.anonymous_kib = value,
                _ => {}
            }
        }
    }
    mappings.extend(current);
    mappings
}

/// `Key:   123 kB`
fn field(line: &str) -> Option<(&str, u64)> {
    let (key, rest) = line.split_once(':')?;
    let value = rest.trim().strip_suffix(" kB")?.trim().parse().ok()?;
    Some((key, value))
}

/// `start-end perms offset dev inode [path]`
fn header(line: &str) -> Option<Mapping<'_>> {
    let mut parts = line.splitn(6, ' ');
    let (start, end) = parts.next()?.split_once('-')?;
    let perms = parts.next()?;
    let path = parts.nth(3).unwrap_or("").trim_start();
    Some(Mapping {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        perms,
        path,
        rss_kib: 0,
        anonymous_kib: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c1000000 r-xp 00400000 08:01 1234                       /usr/bin/nodemesh
Size:              16384 kB
Rss:               12400 kB
Anonymous:             0 kB
THPeligible:    0
VmFlags: rd ex mr mw me dw
55d0c1000000-55d0c1100000 r--p 01400000 08:01 1234                       /usr/bin/nodemesh
Rss:                 900 kB
Anonymous:           560 kB
VmFlags: rd mr mw me dw ac
55d0c1100000-55d0c1200000 rw-p 01500000 08:01 1234                       /usr/bin/nodemesh
Rss:                  40 kB
Anonymous:            40 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Rss:                 800 kB
Anonymous:           800 kB
7f0000200000-7f0000300000 r-xp 00028000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1200 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00000000 08:01 77                         /etc/ld.so.cache
Rss:                  20 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_binary_and_libraries_are_released() {
        let mappings = parse_smaps(SMAPS);
        assert_eq!(mappings.len(), 7);
        assert_eq!(
            mappings[0],
            Mapping {
                start: 0x55d0c0000000,
                end: 0x55d0c1000000,
                perms: "r-xp",
                path: "/usr/bin/nodemesh",
                rss_kib: 12400,
                anonymous_kib: 0,
            }
        );
        let exe = std::path::Path::new("/usr/bin/nodemesh");
        let released: Vec<_> = mappings
            .iter()
            .filter(|m| m.is_clean_code_or_rodata_of(exe))
            .map(|m| m.path)
            .collect();
        // Not the relocated read-only data, the writable data, the heap, a
        // cache that is not a library, nor the vDSO.
        assert_eq!(
            released,
            ["/usr/bin/nodemesh", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
        );
    }

    /// The executable's code mappings: (start, end, resident KiB).
    fn code_mappings() -> Vec<(usize, usize, u64)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        parse_smaps(&smaps)
            .iter()
            .filter(|m| m.path == exe.as_os_str() && m.perms == "r-xp")
            .map(|m| (m.start, m.end, m.rss_kib))
            .collect()
    }

    fn resident_code_kib() -> u64 {
        code_mappings().iter().map(|m| m.2).sum()
    }

    /// Held by the tests here that run code while another measures what is
    /// mapped: a fault maps a whole page-cache folio of the test binary (up
    /// to 2 MB of a file a linker has just written).
    static MAPPING_CODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn code_is_released_once_per_burst_once_it_has_settled() {
        let _alone = MAPPING_CODE.lock().await;
        const SETTLED: Duration = Duration::from_millis(500);
        let (config, config_changes) = watch::channel(0);
        let (issued, issuances) = watch::channel(0);
        let releases = Arc::new(AtomicUsize::new(0));
        let released = releases.clone();
        let releaser = tokio::spawn(release_after_each_burst(
            vec![config_changes, issuances],
            SETTLED,
            move || {
                released.fetch_add(1, Ordering::SeqCst);
            },
        ));
        tokio::time::sleep(SETTLED * 2).await;
        assert_eq!(releases.load(Ordering::SeqCst), 1, "starting is a burst");
        // A burst: changes on either source, closer together than SETTLED.
        for n in 1..=10 {
            if n % 2 == 0 {
                config.send_replace(n);
            } else {
                issued.send_replace(n);
            }
            tokio::time::sleep(SETTLED / 20).await;
        }
        assert_eq!(
            releases.load(Ordering::SeqCst),
            1,
            "released within a burst"
        );
        tokio::time::sleep(SETTLED * 2).await;
        assert_eq!(releases.load(Ordering::SeqCst), 2, "one release per burst");
        issued.send_replace(11);
        tokio::time::sleep(SETTLED * 2).await;
        assert_eq!(
            releases.load(Ordering::SeqCst),
            3,
            "the next burst's release"
        );
        drop(config);
        releaser.await.unwrap();
    }

    #[test]
    fn a_process_keeps_running_from_the_pages_it_maps_back() {
        let _alone = MAPPING_CODE.blocking_lock();
        // All of it mapped first, so that what is mapped again while
        // measuring (a folio per fault) stays well below it.
        for (start, end, _) in code_mappings() {
            for page in (start..end).step_by(4096) {
                // SAFETY: a readable mapping of the executable, listed by
                // the kernel just above and never unmapped by the process.
                unsafe { std::ptr::read_volatile(page as *const u8) };
            }
        }
        let before = resident_code_kib();
        let released = release_code_pages().unwrap();
        assert!(released.mappings > 0 && released.bytes > 0, "{released:?}");
        let after = resident_code_kib();
        assert!(
            after < before / 2,
            "{before} kB of code resident, then {after} kB"
        );
        // Code that was dropped (measuring `after` ran some) runs again.
        assert_eq!(parse_smaps(SMAPS).len(), 7);
    }
}
