//! What the bench reads from /proc: CPU ticks, context switches, memory.

use anyhow::{Context, Result};
use nodemesh_testbed::agent::status_kb;

pub(super) fn clock_ticks_per_second() -> u64 {
    crate::output_ok(std::process::Command::new("getconf").arg("CLK_TCK"))
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

pub(super) fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------- /proc

/// `(utime, stime)` in clock ticks of a process (all its threads).
pub(super) fn proc_cpu_ticks(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let fields = stat_fields(&stat);
    // Fields after the command: state is field 3, utime 14, stime 15.
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {n} of /proc/{pid}/stat: {stat:?}"))
    };
    Ok((field(14)?, field(15)?))
}

/// The fields of a /proc stat line after `(comm)`.
pub(super) fn stat_fields(stat: &str) -> Vec<&str> {
    match stat.rfind(')') {
        Some(i) => stat[i + 1..].split_whitespace().collect(),
        None => Vec::new(),
    }
}

/// CPU ticks of this process's waited-for children (cutime + cstime): oha
/// and iperf3 run as such children, one at a time.
pub(super) fn children_cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .map(|s| {
            let f = stat_fields(&s);
            // cutime is field 16, cstime 17.
            [16, 17]
                .iter()
                .filter_map(|n| f.get(n - 3)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Machine-wide CPU ticks from /proc/stat: (busy, steal, total).
pub(super) fn machine_ticks() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest
    // time is already included in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let steal = v.get(7).copied().unwrap_or(0);
    (total - idle - steal, steal, total)
}

/// Voluntary plus involuntary context switches of all threads of a process,
/// and its number of threads.
pub(super) fn proc_context_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut switches = 0;
    let mut threads = 0;
    for task in tasks.filter_map(|t| t.ok()) {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        threads += 1;
        switches += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    (switches, threads)
}

/// (VmRSS, VmHWM, RssAnon) of a process in KiB. RssAnon leaves out the pages of the
/// binary and libraries mapped from the page cache, shared by every process using them.
pub(super) fn proc_memory_kib(pid: u32) -> Result<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let get = |field: &str| -> Result<u64> {
        status_kb(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    Ok((get("VmRSS")?, get("VmHWM")?, get("RssAnon")?))
}

// ---------------------------------------------------------------- results
