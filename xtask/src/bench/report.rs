//! The comparison tables (meshed against direct; the largest route table
//! against the smallest), their rendering and their JSON.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::procfs::num_cpus;
use super::{
    per_1000, HttpPhases, HttpRun, L7Result, Mode, ModeResult, CONNECTIONS, FIXED_RATE,
    ROUTE_COUNTS, TARGET_BULK_PERCENT, TARGET_CPU_MS_PER_1000, TARGET_P50_DELTA_MS,
    TARGET_RPS_PERCENT, TARGET_RSS_MB,
};

pub(super) struct Row {
    metric: String,
    /// The two figures compared: direct and meshed, or the smaller and the
    /// larger route table.
    left: String,
    right: String,
    change: String,
    /// (target text, met)
    target: Option<(String, bool)>,
    key: String,
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
    key: String,
    (d, m): (f64, f64),
    show: fn(f64) -> String,
    target: Option<f64>,
) -> Row {
    let pct = percent(m, d);
    Row {
        metric,
        left: show(d),
        right: show(m),
        change: format!("{pct:.1} %"),
        target: target.map(|t| (format!("≥ {t:.0} %"), pct >= t)),
        key,
        values: json!({ "direct": d, "meshed": m, "percent": pct }),
    }
}

/// How meshed HTTP requests reach nginx. The design's targets are for L7,
/// so only L7 rows carry them.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// To the pod's address: both agents relay opaque TCP.
    L4,
    /// To the Service: routed by the client-side agent's L7 proxy, with the
    /// smallest route table.
    L7,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::L4 => "L4",
            Path::L7 => "L7, VirtualService",
        }
    }

    fn key(self, key: &str) -> String {
        match self {
            Path::L4 => key.to_string(),
            Path::L7 => format!("{key}_l7"),
        }
    }

    /// Direct runs have one path, the baseline of both.
    fn phases(self, r: &ModeResult) -> Option<&HttpPhases> {
        match (self, r.mode) {
            (Path::L4, _) | (_, Mode::Direct) => Some(&r.l4),
            (Path::L7, Mode::Meshed) => r.l7.first().map(|l| &l.http),
        }
    }
}

/// The comparison, from the medians over the rounds of each mode.
pub(super) fn table(direct: &[ModeResult], meshed: &[ModeResult]) -> Vec<Row> {
    let mut rows = Vec::new();
    let paths = [Path::L4, Path::L7];
    let both = |f: &dyn Fn(&ModeResult) -> f64| (median(direct, f), median(meshed, f));
    let http = |path: Path, f: fn(&HttpPhases) -> f64| {
        both(&|r: &ModeResult| path.phases(r).map_or(f64::NAN, f))
    };

    for path in paths {
        rows.push(ratio_row(
            format!("HTTP/1.1 req/s, {CONNECTIONS} conns ({})", path.label()),
            path.key("http_rps"),
            http(path, |h| h.throughput.rps),
            |v| format!("{v:.0}"),
            (path == Path::L7).then_some(TARGET_RPS_PERCENT),
        ));
    }

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
        for path in paths {
            let (d, m) =
                both(&|r: &ModeResult| path.phases(r).map_or(f64::NAN, |h| get(&h.latency)));
            let delta = m - d;
            rows.push(Row {
                metric: format!("{label} @{FIXED_RATE} req/s ({})", path.label()),
                left: format!("{d:.3} ms"),
                right: format!("{m:.3} ms"),
                change: format!("{delta:+.3} ms"),
                target: target
                    .filter(|_| path == Path::L7)
                    .map(|t| (format!("≤ +{t:.2} ms"), delta <= t)),
                key: path.key(key),
                values: json!({ "direct": d, "meshed": m, "delta": delta }),
            });
        }
    }

    for path in paths {
        let (d, m) = http(path, |h| h.latency.rps);
        rows.push(Row {
            metric: format!("achieved rate, target {FIXED_RATE} ({})", path.label()),
            left: format!("{d:.0}"),
            right: format!("{m:.0}"),
            change: format!("{:.1} %", percent(m, d)),
            target: None,
            key: path.key("fixed_rate_achieved"),
            values: json!({ "direct": d, "meshed": m }),
        });
    }

    rows.push(ratio_row(
        format!("new connections/s, {CONNECTIONS} conc. (L4)"),
        "connections_per_second".into(),
        both(&|r: &ModeResult| r.conn_rate.rps),
        |v| format!("{v:.0}"),
        None,
    ));

    rows.push(ratio_row(
        "bulk TCP, iperf3 (L4)".into(),
        "bulk_bits_per_second".into(),
        both(&|r: &ModeResult| r.bulk_bits_per_second),
        |v| format!("{:.2} Gbit/s", v / 1e9),
        Some(TARGET_BULK_PERCENT),
    ));

    for path in paths {
        let (cpu_direct, cpu) = http(path, HttpPhases::agent_cpu_per_1000);
        rows.push(Row {
            metric: format!("agent CPU per 1000 req, both ({})", path.label()),
            left: "-".into(),
            right: format!("{cpu:.1} ms"),
            change: String::new(),
            target: (path == Path::L7).then(|| {
                (
                    format!("≤ {TARGET_CPU_MS_PER_1000:.0} ms"),
                    cpu <= TARGET_CPU_MS_PER_1000,
                )
            }),
            key: path.key("agent_cpu_ms_per_1000_requests"),
            values: json!({ "direct": cpu_direct, "meshed": cpu }),
        });
    }

    let cpu_conn = median(meshed, |r| {
        per_1000(r.conn_rate_cpu.agents_total(), r.conn_rate.ok)
    });
    rows.push(Row {
        metric: "agent CPU per 1000 new conns (L4)".into(),
        left: "-".into(),
        right: format!("{cpu_conn:.1} ms"),
        change: String::new(),
        target: None,
        key: "agent_cpu_ms_per_1000_connections".into(),
        values: json!({ "meshed": cpu_conn }),
    });

    // After the L7 phases with the smallest route table, in the first round:
    // an agent's RSS does not shrink once a larger table is replaced, so
    // later rounds start with it.
    let [a, b] = meshed.first().map(ModeResult::memory).unwrap_or_default();
    let worst = mb(a.rss_kib.max(b.rss_kib));
    rows.push(Row {
        metric: format!("agent RSS node-a / node-b ({} routes)", ROUTE_COUNTS[0]),
        left: "-".into(),
        right: format!("{:.1} / {:.1} MB", mb(a.rss_kib), mb(b.rss_kib)),
        change: format!("peak {:.1} / {:.1}", mb(a.hwm_kib), mb(b.hwm_kib)),
        target: Some((format!("≤ {TARGET_RSS_MB:.0} MB"), worst <= TARGET_RSS_MB)),
        key: "agent_rss_mb".into(),
        values: json!({
            "node_a": { "rss": mb(a.rss_kib), "peak": mb(a.hwm_kib) },
            "node_b": { "rss": mb(b.rss_kib), "peak": mb(b.hwm_kib) },
        }),
    });
    rows
}

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// What the size of the route table costs, meshed L7 with the smallest and
/// the largest table: requests match the last route, so the larger table
/// makes each request compare against every route before it.
pub(super) fn route_table(meshed: &[ModeResult]) -> Vec<Row> {
    let (small, large) = (ROUTE_COUNTS[0], ROUTE_COUNTS[ROUTE_COUNTS.len() - 1]);
    let pair_in = |rounds: &[ModeResult], f: &dyn Fn(&L7Result) -> f64| {
        let at = |n: usize| median(rounds, |r| r.l7_with(n).map_or(f64::NAN, f));
        (at(small), at(large))
    };
    let pair = |f: &dyn Fn(&L7Result) -> f64| pair_in(meshed, f);
    // Memory from the first round alone, as in `table`.
    let first = &meshed[..meshed.len().min(1)];
    let rss = |node: usize| pair_in(first, &|l| mb(l.memory[node].rss_kib));
    let latency = |get: fn(&HttpRun) -> f64| pair(&|l| get(&l.http.latency));
    let cpu = |get: fn(&HttpPhases) -> f64| pair(&|l| get(&l.http));
    let row = |metric: String, key: &str, (s, l): (f64, f64), left, right, change| Row {
        metric,
        left,
        right,
        change,
        target: None,
        key: key.to_string(),
        values: json!({ "routes": [small, large], "values": [s, l], "difference": l - s }),
    };

    let rps = pair(&|l| l.http.throughput.rps);
    let mut rows = vec![row(
        format!("HTTP/1.1 req/s, {CONNECTIONS} conns"),
        "http_rps",
        rps,
        format!("{:.0}", rps.0),
        format!("{:.0}", rps.1),
        format!("{:+.1} %", percent(rps.1, rps.0) - 100.0),
    )];
    // (metric, key, figures, decimals, unit, unit of the difference). CPU ms
    // per 1000 requests is µs per request: its difference is what each
    // request pays for the larger table.
    let figures = [
        (
            format!("p50 @{FIXED_RATE} req/s"),
            "p50_ms",
            latency(|r| r.p50_ms),
            3,
            "ms",
            "ms",
        ),
        (
            format!("p90 @{FIXED_RATE} req/s"),
            "p90_ms",
            latency(|r| r.p90_ms),
            3,
            "ms",
            "ms",
        ),
        (
            format!("p99 @{FIXED_RATE} req/s"),
            "p99_ms",
            latency(|r| r.p99_ms),
            3,
            "ms",
            "ms",
        ),
        (
            "agent CPU per 1000 req, both (max)".into(),
            "agent_cpu_ms_per_1000_requests",
            cpu(HttpPhases::agent_cpu_per_1000),
            1,
            "ms",
            "µs/req",
        ),
        (
            "  node-a only, the routing agent (max)".into(),
            "client_agent_cpu_ms_per_1000_requests",
            cpu(HttpPhases::client_agent_cpu_per_1000),
            1,
            "ms",
            "µs/req",
        ),
        (
            format!("agent CPU per 1000 req, both (@{FIXED_RATE})"),
            "agent_cpu_ms_per_1000_requests_fixed_rate",
            cpu(HttpPhases::agent_cpu_per_1000_fixed_rate),
            1,
            "ms",
            "µs/req",
        ),
        (
            "agent RSS node-a".into(),
            "client_agent_rss_mb",
            rss(0),
            1,
            "MB",
            "MB",
        ),
        (
            "agent RSS node-b (relays only)".into(),
            "server_agent_rss_mb",
            rss(1),
            1,
            "MB",
            "MB",
        ),
        (
            "route table served after write".into(),
            "config_applied_ms",
            pair(&|l| l.applied_after.as_secs_f64() * 1000.0),
            0,
            "ms",
            "ms",
        ),
    ];
    for (metric, key, (s, l), d, unit, per) in figures {
        rows.push(row(
            metric,
            key,
            (s, l),
            format!("{s:.d$} {unit}"),
            format!("{l:.d$} {unit}"),
            format!("{:+.d$} {per}", l - s),
        ));
    }
    rows
}

/// `titles`: of the metric, the two figures and their change; the target
/// column is always last.
pub(super) fn render(rows: &[Row], titles: [&str; 4]) -> String {
    let width = |f: &dyn Fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .chain([title.chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths = [
        width(&|r| &r.metric, titles[0]),
        width(&|r| &r.left, titles[1]),
        width(&|r| &r.right, titles[2]),
        width(&|r| &r.change, titles[3]),
    ];
    let line = |cells: [&str; 4], target: &str| {
        let fill = |i: usize| " ".repeat(widths[i].saturating_sub(cells[i].chars().count()));
        let text = format!(
            "{}{}  {}{}  {}{}  {}{}  {target}",
            cells[0],
            fill(0),
            fill(1),
            cells[1],
            fill(2),
            cells[2],
            fill(3),
            cells[3]
        );
        format!("{}\n", text.trim_end())
    };
    let mut out = line(
        titles,
        if rows.iter().any(|r| r.target.is_some()) {
            "target"
        } else {
            ""
        },
    );
    for r in rows {
        let target = match &r.target {
            Some((t, met)) => format!("{t} {}", check(*met)),
            None => String::new(),
        };
        out += &line([&r.metric, &r.left, &r.right, &r.change], &target);
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
        let l4 = if r.mode == Mode::Meshed { "L4 " } else { "" };
        let mut phases = vec![(
            format!("{l4}throughput"),
            &r.l4.throughput_cpu,
            r.l4.throughput.ok,
        )];
        for l7 in &r.l7 {
            phases.push((
                format!("L7 {} routes throughput", l7.routes),
                &l7.http.throughput_cpu,
                l7.http.throughput.ok,
            ));
        }
        phases.push((format!("{l4}conn rate"), &r.conn_rate_cpu, r.conn_rate.ok));
        let w = phases.iter().map(|(p, _, _)| p.len()).max().unwrap_or(0);
        for (phase, cpu, n) in phases {
            let p = |ms: f64| per_1000(ms, n);
            let _ = write!(
                out,
                "  {label} {phase:<w$}: oha {:.1}, nginx {:.1}, agents {:.1}",
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
