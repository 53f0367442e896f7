//! Per-request event counts of each agent during a `--focus` phase, from
//! `perf stat` attached to its pid: syscalls, context switches, allocations
//! and instructions (when the machine exposes hardware counters). Unlike CPU
//! time, these barely move with other work on a shared machine, so an A/B of
//! two builds can be judged by them when wall-clock figures swing.
//!
//! Allocations, with `--allocations`, are counted with uprobes on jemalloc's
//! entry points in each agent binary (the agent's allocator), defined for the
//! run and removed after it, plus glibc's `malloc` (the C code's allocations,
//! and those of builds from before jemalloc) when an operator has defined
//! that probe. A uprobe traps into the kernel on every call: measured, the
//! agents' CPU per request went from 67 to over 600 µs on node-a, so the
//! run's times say nothing then and only its counts are worth reading.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// The events every run counts; one the kernel or machine lacks reads as absent.
const EVENTS: [&str; 4] = [
    "task-clock",
    "context-switches",
    "raw_syscalls:sys_enter",
    "instructions",
];

/// glibc's malloc uprobe, counted when an operator defined it.
const LIBC_MALLOC: &str = "probe_libc:malloc";
const LIBC_MALLOC_HINT: &str =
    "perf probe -x /lib/x86_64-linux-gnu/libc.so.6 malloc   # adds probe_libc:malloc";

/// The uprobe group of the probes the bench defines itself.
const PROBE_GROUP: &str = "nodemesh_bench";

/// jemalloc's allocating entry points, as the agent's prefixed build names them.
const JEMALLOC_ENTRIES: [&str; 2] = ["_rjem_malloc", "_rjem_mallocx"];

/// One agent's counts over a phase; `None`: not countable here.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counts {
    pub task_clock_ms: Option<f64>,
    pub context_switches: Option<f64>,
    pub syscalls: Option<f64>,
    pub mallocs: Option<f64>,
    pub instructions: Option<f64>,
}

impl Counts {
    /// Each count divided by `requests`.
    pub fn per(&self, requests: u64) -> Counts {
        let n = requests.max(1) as f64;
        let div = |v: Option<f64>| v.map(|v| v / n);
        Counts {
            task_clock_ms: div(self.task_clock_ms),
            context_switches: div(self.context_switches),
            syscalls: div(self.syscalls),
            mallocs: div(self.mallocs),
            instructions: div(self.instructions),
        }
    }

    /// `syscalls 4.12, cs 0.71, mallocs 42.6, instructions -`, per request.
    pub fn describe(&self) -> String {
        let f = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
        };
        format!(
            "syscalls {}, cs {}, mallocs {}, instructions {}, CPU {} µs",
            f(self.syscalls, 2),
            f(self.context_switches, 2),
            f(self.mallocs, 1),
            f(self.instructions, 0),
            f(self.task_clock_ms.map(|ms| ms * 1000.0), 1),
        )
    }
}

/// `perf stat` running on both agents.
pub(super) struct Counting {
    runs: Vec<(Child, PathBuf)>,
}

/// The allocation events counted, defined for one bench run: removed on drop.
pub(super) struct Probes {
    events: Vec<String>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        remove_probes();
    }
}

fn remove_probes() {
    let _ = Command::new("perf")
        .args(["probe", "-q", "-d", &format!("{PROBE_GROUP}:*")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The per-request counters, with the allocation probes for the agent
/// `builds` when `allocations` is asked for; `None` without `perf`.
pub(super) fn probes(builds: &[PathBuf], allocations: bool) -> Option<Probes> {
    let Ok(listed) = Command::new("perf").args(["probe", "-l"]).output() else {
        println!("bench: perf not found: no per-request counters (cargo xtask setup installs it)");
        return None;
    };
    // Left by an interrupted run, perhaps at offsets of an older binary.
    remove_probes();
    let mut events = Vec::new();
    if !allocations {
        return Some(Probes { events });
    }
    println!(
        "bench: counting allocations with uprobes: every allocation traps, so times are skewed"
    );
    if String::from_utf8_lossy(&listed.stdout).contains(LIBC_MALLOC) {
        events.push(LIBC_MALLOC.to_string());
    }
    for (b, build) in builds.iter().enumerate() {
        for (e, entry) in JEMALLOC_ENTRIES.iter().enumerate() {
            let event = format!("{PROBE_GROUP}:alloc{b}_{e}");
            let defined = Command::new("perf")
                .args(["probe", "-q", "-x"])
                .arg(build)
                .args(["-a", &format!("{event}={entry}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if defined.is_ok_and(|s| s.success()) {
                events.push(event);
            }
        }
    }
    if !events.iter().any(|e| e.starts_with(PROBE_GROUP)) {
        println!(
            "bench: no allocation probe could be defined on the agent builds (no jemalloc \
             symbols in them, or no uprobe support); only glibc's malloc probe counts, once \
             defined:\n  {LIBC_MALLOC_HINT}"
        );
    }
    Some(Probes { events })
}

/// Starts counting `pids` (one `perf stat` each), writing into `dir`.
pub(super) fn start(pids: &[u32], probes: &Probes, dir: &Path, phase: &str) -> Result<Counting> {
    let events: Vec<&str> = EVENTS
        .into_iter()
        .chain(probes.events.iter().map(String::as_str))
        .collect();
    let events = events.join(",");
    let mut runs = Vec::new();
    for pid in pids {
        let out = dir.join(format!("perf-stat-{phase}-{pid}.csv"));
        let child = Command::new("perf")
            .args(["stat", "-x,", "-e", &events, "-p", &pid.to_string(), "-o"])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf stat")?;
        runs.push((child, out));
    }
    Ok(Counting { runs })
}

impl Counting {
    /// Stops every `perf stat` (SIGINT, so it writes its totals) and reads
    /// the counts, in the order of the pids given to [`start`].
    pub fn stop(self) -> Result<Vec<Counts>> {
        let mut all = Vec::new();
        for (mut child, out) in self.runs {
            let status = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .context("signalling perf stat")?;
            anyhow::ensure!(status.success(), "could not stop perf stat {}", child.id());
            child.wait().context("waiting for perf stat")?;
            let text = std::fs::read_to_string(&out)
                .with_context(|| format!("reading {}", out.display()))?;
            all.push(parse(&text));
        }
        Ok(all)
    }
}

/// `perf stat -x,` lines: `value,unit,event,...`; `<not counted>` and
/// `<not supported>` values are absent; allocation events add up.
fn parse(text: &str) -> Counts {
    let mut counts = Counts::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(value), Some(event)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let value = value.parse::<f64>().ok();
        if *event == LIBC_MALLOC || event.starts_with(PROBE_GROUP) {
            if let Some(value) = value {
                *counts.mallocs.get_or_insert(0.0) += value;
            }
            continue;
        }
        let slot = match *event {
            "task-clock" => &mut counts.task_clock_ms,
            "context-switches" => &mut counts.context_switches,
            "raw_syscalls:sys_enter" => &mut counts.syscalls,
            e if e.starts_with("instructions") => &mut counts.instructions,
            _ => continue,
        };
        *slot = value;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_perf_stat_csv_and_skips_unsupported_events() {
        let text = "# started on Wed Dec  2 16:30:00 2026\n\n\
                    1234.5,msec,task-clock,1234500000,100.00,0.617,CPUs utilized\n\
                    1400,,context-switches,1234500000,100.00,1.134,K/sec\n\
                    8200,,raw_syscalls:sys_enter,1234500000,100.00,,\n\
                    <not supported>,,instructions,0,100.00,,\n";
        let c = parse(text).per(2000);
        assert_eq!(c.task_clock_ms, Some(1234.5 / 2000.0));
        assert_eq!(c.context_switches, Some(0.7));
        assert_eq!(c.syscalls, Some(4.1));
        assert_eq!(c.mallocs, None);
        assert_eq!(c.instructions, None);
    }

    #[test]
    fn adds_up_the_allocation_probes() {
        let text = "300,,probe_libc:malloc,1,100.00,,\n\
                    6000,,nodemesh_bench:alloc0_0,1,100.00,,\n\
                    100,,nodemesh_bench:alloc0_1,1,100.00,,\n\
                    <not counted>,,nodemesh_bench:alloc1_0,0,100.00,,\n";
        assert_eq!(parse(text).per(100).mallocs, Some(64.0));
    }
}
