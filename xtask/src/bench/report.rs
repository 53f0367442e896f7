//! The comparison table, its rendering and its JSON.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::procfs::num_cpus;
use super::{
    per_1000, HttpRun, Mode, ModeResult, CONNECTIONS, FIXED_RATE, TARGET_BULK_PERCENT,
    TARGET_CPU_MS_PER_1000, TARGET_P50_DELTA_MS, TARGET_RPS_PERCENT, TARGET_RSS_MB,
};

pub(super) struct Row {
    metric: String,
    direct: String,
    meshed: String,
    ratio: String,
    /// (target text, met)
    target: Option<(String, bool)>,
    key: &'static str,
    values: Value,
}

impl Row {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "metric": self.key,
            "values": self.values,
            "target": self.target.as_ref().map(|(t, _)| t.clone()),
            "target_met": self.target.as_ref().map(|(_, met)| *met),
        })
    }
}

pub(super) fn check(met: bool) -> &'static str {
    if met {
        "✓"
    } else {
        "✗"
    }
}

pub(super) fn percent(meshed: f64, direct: f64) -> f64 {
    if direct > 0.0 {
        meshed / direct * 100.0
    } else {
        f64::NAN
    }
}

/// The median of `f` over the rounds.
pub(super) fn median(rounds: &[ModeResult], f: impl Fn(&ModeResult) -> f64) -> f64 {
    let mut v: Vec<f64> = rounds.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A figure compared as meshed over direct, with an optional "at least
/// this percentage of direct" target.
fn ratio_row(
    metric: String,
    key: &'static str,
    (d, m): (f64, f64),
    show: fn(f64) -> String,
    target: Option<f64>,
) -> Row {
    let pct = percent(m, d);
    Row {
        metric,
        direct: show(d),
        meshed: show(m),
        ratio: format!("{pct:.1} %"),
        target: target.map(|t| (format!("≥ {t:.0} %"), pct >= t)),
        key,
        values: json!({ "direct": d, "meshed": m, "percent": pct }),
    }
}

/// The comparison, from the medians over the rounds of each mode.
pub(super) fn table(direct: &[ModeResult], meshed: &[ModeResult]) -> Vec<Row> {
    let mut rows = Vec::new();

    let both = |f: fn(&ModeResult) -> f64| (median(direct, f), median(meshed, f));
    rows.push(ratio_row(
        format!("HTTP/1.1 req/s ({CONNECTIONS} conns)"),
        "http_rps",
        both(|r| r.throughput.rps),
        |v| format!("{v:.0}"),
        Some(TARGET_RPS_PERCENT),
    ));

    for (label, key, get, target) in [
        (
            "p50",
            "p50_ms",
            (|r: &HttpRun| r.p50_ms) as fn(&HttpRun) -> f64,
            Some(TARGET_P50_DELTA_MS),
        ),
        ("p90", "p90_ms", |r: &HttpRun| r.p90_ms, None),
        ("p99", "p99_ms", |r: &HttpRun| r.p99_ms, None),
    ] {
        let (d, m) = (
            median(direct, |r| get(&r.latency)),
            median(meshed, |r| get(&r.latency)),
        );
        let delta = m - d;
        rows.push(Row {
            metric: format!("{label} @{FIXED_RATE} req/s"),
            direct: format!("{d:.3} ms"),
            meshed: format!("{m:.3} ms"),
            ratio: format!("{delta:+.3} ms"),
            target: target.map(|t| (format!("≤ +{t:.2} ms"), delta <= t)),
            key,
            values: json!({ "direct": d, "meshed": m, "delta": delta }),
        });
    }

    let (d, m) = both(|r| r.latency.rps);
    rows.push(Row {
        metric: format!("achieved rate (target {FIXED_RATE})"),
        direct: format!("{d:.0}"),
        meshed: format!("{m:.0}"),
        ratio: format!("{:.1} %", percent(m, d)),
        target: None,
        key: "fixed_rate_achieved",
        values: json!({ "direct": d, "meshed": m }),
    });

    rows.push(ratio_row(
        format!("new connections/s ({CONNECTIONS} conc.)"),
        "connections_per_second",
        both(|r| r.conn_rate.rps),
        |v| format!("{v:.0}"),
        None,
    ));

    rows.push(ratio_row(
        "bulk TCP (iperf3)".into(),
        "bulk_bits_per_second",
        both(|r| r.bulk_bits_per_second),
        |v| format!("{:.2} Gbit/s", v / 1e9),
        Some(TARGET_BULK_PERCENT),
    ));

    let (cpu_direct, cpu) = both(ModeResult::agent_cpu_per_1000);
    rows.push(Row {
        metric: "agent CPU per 1000 req (both)".into(),
        direct: "-".into(),
        meshed: format!("{cpu:.1} ms"),
        ratio: String::new(),
        target: Some((
            format!("≤ {TARGET_CPU_MS_PER_1000:.0} ms"),
            cpu <= TARGET_CPU_MS_PER_1000,
        )),
        key: "agent_cpu_ms_per_1000_requests",
        values: json!({ "direct": cpu_direct, "meshed": cpu }),
    });

    let cpu_conn = median(meshed, |r| {
        per_1000(r.conn_rate_cpu.agents_total(), r.conn_rate.ok)
    });
    rows.push(Row {
        metric: "agent CPU per 1000 new conns".into(),
        direct: "-".into(),
        meshed: format!("{cpu_conn:.1} ms"),
        ratio: String::new(),
        target: None,
        key: "agent_cpu_ms_per_1000_connections",
        values: json!({ "meshed": cpu_conn }),
    });

    let mb = |kib: u64| kib as f64 / 1024.0;
    // After the last meshed run.
    let [a, b] = meshed.last().map(ModeResult::memory).unwrap_or_default();
    let worst = mb(a.rss_kib.max(b.rss_kib));
    rows.push(Row {
        metric: "agent RSS node-a / node-b".into(),
        direct: "-".into(),
        meshed: format!("{:.1} / {:.1} MB", mb(a.rss_kib), mb(b.rss_kib)),
        ratio: format!("peak {:.1} / {:.1}", mb(a.hwm_kib), mb(b.hwm_kib)),
        target: Some((format!("≤ {TARGET_RSS_MB:.0} MB"), worst <= TARGET_RSS_MB)),
        key: "agent_rss_mb",
        values: json!({
            "node_a": { "rss": mb(a.rss_kib), "peak": mb(a.hwm_kib) },
            "node_b": { "rss": mb(b.rss_kib), "peak": mb(b.hwm_kib) },
        }),
    });
    rows
}

pub(super) fn render(rows: &[Row]) -> String {
    let width = |f: &dyn Fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let w0 = width(&|r| &r.metric, "metric");
    let w1 = width(&|r| &r.direct, "direct");
    let w2 = width(&|r| &r.meshed, "meshed");
    let w3 = width(&|r| &r.ratio, "ratio");
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let lpad =
        |s: &str, w: usize| format!("{}{s}", " ".repeat(w.saturating_sub(s.chars().count())));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {}  {}  {}  target",
        pad("metric", w0),
        lpad("direct", w1),
        lpad("meshed", w2),
        lpad("ratio", w3)
    );
    for r in rows {
        let target = match &r.target {
            Some((t, met)) => format!("{t} {}", check(*met)),
            None => String::new(),
        };
        let line = format!(
            "{}  {}  {}  {}  {target}",
            pad(&r.metric, w0),
            lpad(&r.direct, w1),
            lpad(&r.meshed, w2),
            lpad(&r.ratio, w3)
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// Where the CPU went in the max-throughput and connection-rate phases, and
/// how the agents' memory evolved.
pub(super) fn cpu_breakdown(direct: &[ModeResult], meshed: &[ModeResult]) -> String {
    let cpus = num_cpus() as f64;
    let mut out = String::from(
        "\nCPU ms per 1000 requests (max throughput) or per 1000 connections (connection rate):\n",
    );
    let several = direct.len() > 1;
    let rounds = direct.iter().zip(meshed).enumerate();
    for (r, round) in rounds.flat_map(|(i, (d, m))| [(d, i + 1), (m, i + 1)]) {
        let label = if several {
            format!("round {round} {}", r.mode.name())
        } else {
            r.mode.name().to_string()
        };
        for (phase, cpu, n) in [
            ("throughput", &r.throughput_cpu, r.throughput.ok),
            ("conn rate ", &r.conn_rate_cpu, r.conn_rate.ok),
        ] {
            let p = |ms: f64| per_1000(ms, n);
            let _ = write!(
                out,
                "  {label} {phase}: oha {:.1}, nginx {:.1}, agents {:.1}",
                p(cpu.load_generator),
                p(cpu.servers),
                p(cpu.agents_total()),
            );
            if r.mode == Mode::Meshed {
                let _ = write!(
                    out,
                    " (user {:.1} + sys {:.1}; {:.2} context switches per request; {} + {} threads)",
                    p(cpu.agents[0].0 + cpu.agents[1].0),
                    p(cpu.agents[0].1 + cpu.agents[1].1),
                    cpu.agent_context_switches as f64 / n.max(1) as f64,
                    cpu.agent_threads[0],
                    cpu.agent_threads[1],
                );
            }
            let _ = writeln!(
                out,
                ", not attributed {:.1}; machine busy {:.0} % of {cpus} CPUs, steal {:.1} %",
                p(cpu.other()),
                cpu.machine_busy / (cpu.wall * cpus) * 100.0,
                cpu.machine_steal / (cpu.wall * cpus) * 100.0,
            );
        }
    }
    let mb = |kib: u64| kib as f64 / 1024.0;
    out.push_str("\nAgent memory after each phase, RSS (peak) MB, node-a / node-b");
    out.push_str(if several { " (last round):\n" } else { ":\n" });
    for r in direct.last().into_iter().chain(meshed.last()) {
        let line: Vec<String> = r
            .memory_trace
            .iter()
            .map(|(phase, [a, b])| {
                format!(
                    "{phase} {:.1} ({:.1}) / {:.1} ({:.1})",
                    mb(a.rss_kib),
                    mb(a.hwm_kib),
                    mb(b.rss_kib),
                    mb(b.hwm_kib)
                )
            })
            .collect();
        let _ = writeln!(out, "  {}: {}", r.mode.name(), line.join("; "));
    }
    out
}
