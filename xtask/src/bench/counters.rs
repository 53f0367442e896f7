//! Per-request event counts of each agent during a `--focus` phase, from
//! `perf stat` attached to its pid: syscalls, context switches, mallocs
//! (when the `probe_libc:malloc` uprobe exists) and instructions (when the
//! machine exposes hardware counters). Unlike CPU time, these barely move
//! with other work on a shared machine, so an A/B of two builds can be
//! judged by them when wall-clock figures swing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// The events asked for; one the kernel or machine lacks reads as absent.
const EVENTS: [&str; 5] = [
    "task-clock",
    "context-switches",
    "raw_syscalls:sys_enter",
    "probe_libc:malloc",
    "instructions",
];

/// The malloc uprobe `perf stat` counts, when an operator defined it.
const MALLOC_PROBE_HINT: &str =
    "perf probe -x /lib/x86_64-linux-gnu/libc.so.6 malloc   # adds probe_libc:malloc";

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

/// Whether counting is possible at all (perf installed), with a hint when
/// mallocs will not be counted.
pub(super) fn available() -> bool {
    let Ok(out) = Command::new("perf").args(["probe", "-l"]).output() else {
        println!("bench: perf not found: no per-request counters (cargo xtask setup installs it)");
        return false;
    };
    if !String::from_utf8_lossy(&out.stdout).contains("probe_libc:malloc") {
        println!("bench: no malloc uprobe, mallocs are not counted; to count them:\n  {MALLOC_PROBE_HINT}");
    }
    true
}

/// Starts counting `pids` (one `perf stat` each), writing into `dir`.
pub(super) fn start(pids: &[u32], dir: &Path, phase: &str) -> Result<Counting> {
    let events = EVENTS.join(",");
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
/// `<not supported>` values are absent.
fn parse(text: &str) -> Counts {
    let mut counts = Counts::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(value), Some(event)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let value = value.parse::<f64>().ok();
        let slot = match *event {
            "task-clock" => &mut counts.task_clock_ms,
            "context-switches" => &mut counts.context_switches,
            "raw_syscalls:sys_enter" => &mut counts.syscalls,
            "probe_libc:malloc" => &mut counts.mallocs,
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
}
