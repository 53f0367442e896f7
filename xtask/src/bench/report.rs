//! The comparison tables (every path against the same direct run; nodemesh
//! against the HAProxy pair; the largest route table against the
//! smallest), their rendering and their JSON.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::procfs::num_cpus;
use super::{
    per_1000, Bulk, CpuUse, HttpRun, HttpVersion, L7Result, Memory, Mode, ModeResult, PathResult,
    Variant, CONNECTIONS, FIXED_RATE, TARGET_BULK_PERCENT, TARGET_CPU_MS_PER_1000,
    TARGET_CPU_MS_PER_1000_FIXED_RATE, TARGET_P50_DELTA_MS, TARGET_RPS_PERCENT, TARGET_RSS_MB,
};

/// A table of figures: a metric column, one column per compared figure,
/// and a target column when any row has a target.
pub(super) struct Table {
    titles: Vec<String>,
    rows: Vec<Row>,
}

pub(super) struct Row {
    /// The metric, then one cell per column.
    cells: Vec<String>,
    /// (target text, met)
    target: Option<(String, bool)>,
    key: String,
    values: Value,
}

impl Table {
    pub(super) fn to_json(&self) -> Value {
        self.rows
            .iter()
            .map(|r| {
                json!({
                    "metric": r.key,
                    "values": r.values,
                    "target": r.target.as_ref().map(|(t, _)| t.clone()),
                    "target_met": r.target.as_ref().map(|(_, met)| *met),
                })
            })
            .collect()
    }

    /// The metric left-aligned, the figures right-aligned, the target last.
    pub(super) fn render(&self) -> String {
        let columns = self.titles.len();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.cells.get(i))
                    .chain([&self.titles[i]])
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String], target: &str| {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let fill = " ".repeat(widths[i].saturating_sub(cell.chars().count()));
                if i == 0 {
                    text += &format!("{cell}{fill}");
                } else {
                    text += &format!("  {fill}{cell}");
                }
            }
            format!("{}\n", format!("{text}  {target}").trim_end())
        };
        let has_target = self.rows.iter().any(|r| r.target.is_some());
        let mut out = line(&self.titles, if has_target { "target" } else { "" });
        for r in &self.rows {
            let target = match &r.target {
                Some((t, met)) => format!("{t} {}", check(*met)),
                None => String::new(),
            };
            out += &line(&r.cells, &target);
        }
        out
    }
}

pub(super) fn check(met: bool) -> &'static str {
    if met {
        "✓"
    } else {
        "✗"
    }
}

pub(super) fn percent(value: f64, of: f64) -> f64 {
    if of > 0.0 {
        value / of * 100.0
    } else {
        f64::NAN
    }
}

/// The median of `values` (NaN when there are none).
pub(super) fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One way the client's requests reach nginx: a column of the comparison.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Path {
    Direct,
    /// Through two HAProxies with mutual TLS between them.
    Haproxy,
    /// To the pod's address: both agents relay opaque TCP, over mutual TLS
    /// (HBONE) between them.
    L4Mtls,
    /// To the Service: routed by the client-side agent's L7 proxy, with the
    /// smallest route table, over mutual TLS between the agents.
    L7Mtls,
    /// L7 with a plaintext hop between the agents (mesh-wide
    /// PeerAuthentication `DISABLE`): the path before mutual TLS.
    L7Plaintext,
}

impl Path {
    const ALL: [Path; 5] = [
        Path::Direct,
        Path::Haproxy,
        Path::L4Mtls,
        Path::L7Mtls,
        Path::L7Plaintext,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Haproxy => "HAProxy pair",
            Path::L4Mtls => "L4 + mTLS",
            Path::L7Mtls => "L7 + mTLS",
            Path::L7Plaintext => "L7 plaintext hop",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Haproxy => "haproxy_pair",
            Path::L4Mtls => "l4_mtls",
            Path::L7Mtls => "l7_mtls",
            Path::L7Plaintext => "l7_plaintext",
        }
    }

    fn mode(self) -> Mode {
        match self {
            Path::Direct => Mode::Direct,
            Path::Haproxy => Mode::HaproxyPair,
            Path::L4Mtls | Path::L7Mtls => Mode::MeshedMtls,
            Path::L7Plaintext => Mode::MeshedPlaintext,
        }
    }

    fn is_nodemesh(self) -> bool {
        self.mode().enrolls()
    }

    /// Its figures in one round's result of its mode.
    fn of(self, r: &ModeResult) -> Option<&PathResult> {
        if r.mode != self.mode() {
            return None;
        }
        match self {
            // The plaintext mode's main phases are already L7.
            Path::Direct | Path::Haproxy | Path::L4Mtls | Path::L7Plaintext => Some(&r.main),
            Path::L7Mtls => r.l7.first().map(|l| &l.path),
        }
    }

    /// Its rounds, in order.
    fn rounds(self, results: &[ModeResult]) -> Vec<&PathResult> {
        results.iter().filter_map(|r| self.of(r)).collect()
    }
}

/// Memory per open connection, per proxy, where measured (medians).
fn held_row(results: &[ModeResult], paths: &[Path]) -> Row {
    let mut cells = vec!["memory per open connection, node-a / node-b".to_string()];
    let mut values = Map::new();
    for &path in paths {
        let held: Vec<_> = path.rounds(results).iter().filter_map(|p| p.held).collect();
        if held.is_empty() {
            cells.push("-".into());
            continue;
        }
        let [a, b] = [0, 1].map(|i| median(held.iter().map(|h| h.kib[i])));
        cells.push(format!("{a:.1} / {b:.1} KiB"));
        values.insert(
            path.key().into(),
            json!({ "node_a_kib": a, "node_b_kib": b, "connections": held[0].connections }),
        );
    }
    Row {
        cells,
        target: None,
        key: "proxy_kib_per_open_connection".into(),
        values: Value::Object(values),
    }
}

/// The median over the rounds of `f` on `path` (NaN if not measured).
fn figure(results: &[ModeResult], path: Path, f: impl Fn(&PathResult) -> f64) -> f64 {
    median(path.rounds(results).into_iter().map(f))
}

/// The proxies' memory on `path` in the first round: an agent's RSS does
/// not shrink once the 10 000-route table is replaced, so later rounds
/// start with it.
fn memory(results: &[ModeResult], path: Path) -> Option<[Memory; 2]> {
    path.rounds(results).first().map(|p| p.memory)
}

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Both proxies' RSS, MB.
fn rss_sum(m: &[Memory; 2]) -> f64 {
    mb(m[0].rss_kib + m[1].rss_kib)
}

/// How a figure compares with the same figure of a reference path.
#[derive(Clone, Copy)]
enum Relation {
    /// As a percentage of the reference.
    Percent,
    /// As a difference, in the figure's unit.
    Delta,
}

impl Relation {
    fn apply(self, value: f64, reference: f64) -> f64 {
        match self {
            Relation::Percent => percent(value, reference),
            Relation::Delta => value - reference,
        }
    }

    fn show(self, v: f64, decimals: usize, unit: &str) -> String {
        match self {
            Relation::Percent => format!("{v:.1} %"),
            Relation::Delta => format!("{v:+.decimals$} {unit}"),
        }
    }

    fn key(self) -> &'static str {
        match self {
            Relation::Percent => "percent",
            Relation::Delta => "delta",
        }
    }
}

/// A metric for the comparison tables.
struct Metric {
    label: String,
    key: &'static str,
    get: Box<dyn Fn(&PathResult) -> f64>,
    decimals: usize,
    unit: &'static str,
    /// How it compares with direct; `None` where direct has no such figure
    /// (its idle agents' CPU).
    to_direct: Option<Relation>,
    /// How nodemesh compares with the HAProxy pair.
    to_haproxy: Relation,
    /// The design's target for the judged path.
    target: Option<Target>,
}

/// A design target.
#[derive(Clone, Copy)]
enum Target {
    /// At least this percentage of direct.
    PercentOfDirect(f64),
    /// At most this much above direct, ms.
    DeltaMs(f64),
    /// At most this figure, ms.
    Ms(f64),
}

impl Target {
    /// (text, met) for a figure and its relation to direct.
    fn judge(self, value: f64, to_direct: f64) -> (String, bool) {
        match self {
            Target::PercentOfDirect(t) => (format!("≥ {t:.0} %"), to_direct >= t),
            Target::DeltaMs(t) => (format!("≤ +{t:.2} ms"), to_direct <= t),
            Target::Ms(t) => (format!("≤ {t:.0} ms"), value <= t),
        }
    }
}

fn metrics() -> Vec<Metric> {
    let latency = |label: &str, key: &'static str, get: fn(&HttpRun) -> f64, target: bool| Metric {
        label: format!("{label} @{FIXED_RATE} req/s"),
        key,
        get: Box::new(move |p: &PathResult| get(&p.http.latency)),
        decimals: 3,
        unit: "ms",
        to_direct: Some(Relation::Delta),
        to_haproxy: Relation::Delta,
        target: target.then_some(Target::DeltaMs(TARGET_P50_DELTA_MS)),
    };
    let cpu = |label: String, key: &'static str, get: fn(&PathResult) -> f64, target| Metric {
        label,
        key,
        get: Box::new(get),
        decimals: 1,
        unit: "ms",
        to_direct: None,
        to_haproxy: Relation::Percent,
        target,
    };
    vec![
        Metric {
            label: format!("HTTP/1.1 req/s, {CONNECTIONS} conns"),
            key: "http_rps",
            get: Box::new(|p| p.http.throughput.rps),
            decimals: 0,
            unit: "",
            to_direct: Some(Relation::Percent),
            to_haproxy: Relation::Percent,
            target: Some(Target::PercentOfDirect(TARGET_RPS_PERCENT)),
        },
        latency("p50", "p50_ms", |r| r.p50_ms, true),
        latency("p90", "p90_ms", |r| r.p90_ms, false),
        latency("p99", "p99_ms", |r| r.p99_ms, false),
        Metric {
            label: format!("achieved rate, target {FIXED_RATE}"),
            key: "fixed_rate_achieved",
            get: Box::new(|p| p.http.latency.rps),
            decimals: 0,
            unit: "",
            to_direct: Some(Relation::Percent),
            to_haproxy: Relation::Percent,
            target: None,
        },
        Metric {
            label: format!("new connections/s, {CONNECTIONS} conc."),
            key: "connections_per_second",
            get: Box::new(|p| p.conn_rate.rps),
            decimals: 0,
            unit: "",
            to_direct: Some(Relation::Percent),
            to_haproxy: Relation::Percent,
            target: None,
        },
        cpu(
            "proxy CPU per 1000 req, both (max)".into(),
            "proxy_cpu_ms_per_1000_requests",
            |p| p.http.proxy_cpu_per_1000(),
            Some(Target::Ms(TARGET_CPU_MS_PER_1000)),
        ),
        cpu(
            format!("proxy CPU per 1000 req, both (@{FIXED_RATE})"),
            "proxy_cpu_ms_per_1000_requests_fixed_rate",
            |p| p.http.proxy_cpu_per_1000_fixed_rate(),
            Some(Target::Ms(TARGET_CPU_MS_PER_1000_FIXED_RATE)),
        ),
        cpu(
            "proxy CPU per 1000 new conns, both".into(),
            "proxy_cpu_ms_per_1000_connections",
            PathResult::proxy_cpu_per_1000_connections,
            None,
        ),
    ]
}

/// The tables printed after a run.
pub(super) struct Comparison {
    /// Every path measured against the direct run.
    pub(super) main: Table,
    /// nodemesh's paths against the HAProxy pair.
    pub(super) versus_haproxy: Table,
    /// The path the design's targets are judged on: L7 + mTLS.
    pub(super) judged: Path,
}

pub(super) fn comparison(results: &[ModeResult]) -> Comparison {
    let paths: Vec<Path> = Path::ALL
        .into_iter()
        .filter(|p| !p.rounds(results).is_empty())
        .collect();
    let judged = Path::L7Mtls;
    let mut main = Table {
        titles: ["metric".to_string()]
            .into_iter()
            .chain(paths.iter().map(|p| p.label().to_string()))
            .collect(),
        rows: Vec::new(),
    };
    let nodemesh: Vec<Path> = paths.iter().copied().filter(|p| p.is_nodemesh()).collect();
    let mut versus = Table {
        titles: ["nodemesh / HAProxy pair".to_string()]
            .into_iter()
            .chain(nodemesh.iter().map(|p| p.label().to_string()))
            .collect(),
        rows: Vec::new(),
    };
    let show = |v: f64, m: &Metric| {
        if m.unit.is_empty() {
            format!("{v:.d$}", d = m.decimals)
        } else {
            format!("{v:.d$} {}", m.unit, d = m.decimals)
        }
    };

    for m in metrics() {
        let direct = figure(results, Path::Direct, &m.get);
        let haproxy = figure(results, Path::Haproxy, &m.get);
        let mut cells = vec![m.label.clone()];
        let mut values = Map::new();
        let mut target = None;
        for &path in &paths {
            let v = figure(results, path, &m.get);
            let (cell, value) = match (path, m.to_direct) {
                (Path::Direct, None) => ("-".to_string(), json!({ "value": v })),
                (Path::Direct, Some(_)) => (show(v, &m), json!({ "value": v })),
                (_, None) => (show(v, &m), json!({ "value": v })),
                (_, Some(rel)) => {
                    let r = rel.apply(v, direct);
                    (
                        format!("{} ({})", show(v, &m), rel.show(r, m.decimals, m.unit)),
                        json!({ "value": v, rel.key(): r }),
                    )
                }
            };
            if path == judged {
                let relative = m.to_direct.map_or(f64::NAN, |rel| rel.apply(v, direct));
                target = m.target.map(|t| t.judge(v, relative));
            }
            cells.push(cell);
            values.insert(path.key().into(), value);
        }
        main.rows.push(Row {
            cells,
            target,
            key: m.key.into(),
            values: Value::Object(values),
        });

        let mut cells = vec![m.label.clone()];
        let mut values = Map::new();
        for &path in &nodemesh {
            let r = m.to_haproxy.apply(figure(results, path, &m.get), haproxy);
            cells.push(m.to_haproxy.show(r, m.decimals, m.unit));
            values.insert(path.key().into(), json!({ m.to_haproxy.key(): r }));
        }
        let ahead = (m.key == "http_rps").then(|| {
            let r = percent(figure(results, judged, &m.get), haproxy);
            (format!("{} > 100 %", judged.label()), r > 100.0)
        });
        versus.rows.push(Row {
            cells,
            target: ahead,
            key: m.key.into(),
            values: Value::Object(values),
        });
    }

    let (bulk_main, bulk_versus) = bulk_rows(results, &paths, &nodemesh);
    main.rows.extend(bulk_main);
    versus.rows.extend(bulk_versus);

    // CPU per proxy at max: where the summed figure goes.
    let mut cells = vec!["  per proxy, node-a / node-b (max)".to_string()];
    let mut values = Map::new();
    for &path in &paths {
        let per_node = |node: usize| {
            figure(results, path, |p| {
                let (user, system) = p.http.throughput_cpu.proxies[node];
                per_1000(user + system, p.http.throughput.ok)
            })
        };
        let (a, b) = (per_node(0), per_node(1));
        if path == Path::Direct {
            cells.push("-".into());
            continue;
        }
        cells.push(format!("{a:.1} / {b:.1} ms"));
        values.insert(path.key().into(), json!({ "node_a": a, "node_b": b }));
    }
    let at = main
        .rows
        .iter()
        .position(|r| r.key == "proxy_cpu_ms_per_1000_requests")
        .map_or(main.rows.len(), |i| i + 1);
    main.rows.insert(
        at,
        Row {
            cells,
            target: None,
            key: "proxy_cpu_ms_per_1000_requests_per_proxy".into(),
            values: Value::Object(values),
        },
    );

    // Memory: per proxy, and both summed against the HAProxy pair.
    let mut cells = vec!["RSS per proxy, node-a / node-b".to_string()];
    let mut values = Map::new();
    let mut target = None;
    for &path in &paths {
        let Some([a, b]) = memory(results, path).filter(|_| path != Path::Direct) else {
            cells.push("-".into());
            continue;
        };
        cells.push(format!(
            "{:.1} / {:.1} MB (anon {:.1} / {:.1})",
            mb(a.rss_kib),
            mb(b.rss_kib),
            mb(a.anon_kib),
            mb(b.anon_kib)
        ));
        values.insert(
            path.key().into(),
            json!({
                "node_a": { "rss": mb(a.rss_kib), "peak": mb(a.hwm_kib), "anon": mb(a.anon_kib) },
                "node_b": { "rss": mb(b.rss_kib), "peak": mb(b.hwm_kib), "anon": mb(b.anon_kib) },
            }),
        );
        if path == judged {
            let worst = mb(a.rss_kib.max(b.rss_kib));
            target = Some((format!("≤ {TARGET_RSS_MB:.0} MB"), worst <= TARGET_RSS_MB));
        }
    }
    main.rows.push(Row {
        cells,
        target,
        key: "proxy_rss_mb".into(),
        values: Value::Object(values),
    });
    main.rows.push(held_row(results, &paths));
    let haproxy_rss = memory(results, Path::Haproxy).map_or(f64::NAN, |m| rss_sum(&m));
    let mut cells = vec!["RSS, both proxies".to_string()];
    let mut values = Map::new();
    for &path in &nodemesh {
        let pct = percent(
            memory(results, path).map_or(f64::NAN, |m| rss_sum(&m)),
            haproxy_rss,
        );
        cells.push(format!("{pct:.1} %"));
        values.insert(path.key().into(), json!({ "percent": pct }));
    }
    versus.rows.push(Row {
        cells,
        target: None,
        key: "proxy_rss_mb".into(),
        values: Value::Object(values),
    });

    Comparison {
        main,
        versus_haproxy: versus,
        judged,
    }
}

/// A bulk TCP figure: its label, its JSON key and how to read it.
type BulkFigure = (&'static str, &'static str, fn(&Bulk) -> f64);

/// Bulk TCP rows, for the main table and against the HAProxy pair. Only
/// the TCP paths carry it (the pair's in `mode tcp`): one iperf3 stream.
fn bulk_rows(results: &[ModeResult], paths: &[Path], nodemesh: &[Path]) -> (Vec<Row>, Vec<Row>) {
    let bulk = |path: Path, get: fn(&Bulk) -> f64| {
        median(
            results
                .iter()
                .filter(|r| r.mode == path.mode())
                .filter_map(|r| r.bulk.as_ref().map(get)),
        )
    };
    let relayed = |path: Path| matches!(path, Path::Haproxy | Path::L4Mtls);
    let [rate, cpu]: [BulkFigure; 2] = [
        ("bulk TCP, iperf3", "bulk_bits_per_second", |b| {
            b.transfer.bits_per_second
        }),
        (
            "proxy CPU per GB, both (bulk)",
            "proxy_cpu_ms_per_gigabyte",
            Bulk::cpu_ms_per_gigabyte,
        ),
    ];
    let row = |(label, key, _): BulkFigure| Row {
        cells: vec![label.to_string()],
        target: None,
        key: key.into(),
        values: Value::Object(Map::new()),
    };

    let direct = bulk(Path::Direct, rate.2);
    let (mut rate_row, mut cpu_row) = (row(rate), row(cpu));
    for &path in paths {
        let (v, ms) = (bulk(path, rate.2), bulk(path, cpu.2));
        let pct = percent(v, direct);
        if path == Path::Direct {
            rate_row.cells.push(format!("{:.2} Gbit/s", v / 1e9));
            rate_row.values[path.key()] = json!({ "value": v });
            cpu_row.cells.push("-".into());
        } else if relayed(path) {
            rate_row
                .cells
                .push(format!("{:.2} Gbit/s ({pct:.1} %)", v / 1e9));
            rate_row.values[path.key()] = json!({ "value": v, "percent": pct });
            cpu_row.cells.push(format!("{ms:.0} ms"));
            cpu_row.values[path.key()] = json!({ "value": ms });
        } else {
            rate_row.cells.push("-".into());
            cpu_row.cells.push("-".into());
        }
        // The design's bulk target is for the L4 relay.
        if path == Path::L4Mtls {
            rate_row.target = Some((
                format!("L4 ≥ {TARGET_BULK_PERCENT:.0} %"),
                pct >= TARGET_BULK_PERCENT,
            ));
        }
    }

    let versus = [rate, cpu].map(|figure| {
        let haproxy = bulk(Path::Haproxy, figure.2);
        let mut versus = row(figure);
        for &path in nodemesh {
            if relayed(path) {
                let r = percent(bulk(path, figure.2), haproxy);
                versus.cells.push(format!("{r:.1} %"));
                versus.values[path.key()] = json!({ "percent": r });
            } else {
                versus.cells.push("-".into());
            }
        }
        versus
    });
    (vec![rate_row, cpu_row], versus.into())
}

/// Two L7 runs side by side, the results `pick` finds for column 0 and 1
/// (titled `titles`), and what the second costs over the first: a larger
/// table (routes, allow-list rules, whose requests match the last entry,
/// so each request goes past every entry before it unless it is indexed),
/// a telemetry setting, or the ingress against the outside client's
/// direct run.
pub(super) fn l7_table(
    results: &[ModeResult],
    titles: [String; 2],
    pick: &dyn Fn(&ModeResult, usize) -> Option<&L7Result>,
) -> Table {
    let pair = |f: &dyn Fn(&L7Result) -> f64| {
        let at = |column: usize| median(results.iter().filter_map(|r| pick(r, column)).map(f));
        (at(0), at(1))
    };
    // Memory from the first round alone, as in `comparison`.
    let rss = |node: usize| {
        let first = |column: usize| {
            results
                .iter()
                .find_map(|r| pick(r, column))
                .map_or(f64::NAN, |l| mb(l.path.memory[node].rss_kib))
        };
        (first(0), first(1))
    };
    let latency = |get: fn(&HttpRun) -> f64| pair(&|l| get(&l.path.http.latency));
    let path = |get: fn(&PathResult) -> f64| pair(&|l| get(&l.path));
    let row = |metric: String, key: &str, (s, l): (f64, f64), left, right, change| Row {
        cells: vec![metric, left, right, change],
        target: None,
        key: key.to_string(),
        values: json!({ "columns": titles, "values": [s, l], "difference": l - s }),
    };

    let version = results
        .iter()
        .find_map(|r| pick(r, 0))
        .map_or(HttpVersion::Http1, |l| l.path.version);
    let streams = version.streams_label();
    let mut rows = Vec::new();
    for (metric, key, (s, l)) in [
        (
            format!("{} req/s, {CONNECTIONS} conns{streams}", version.name()),
            "http_rps",
            path(|p| p.http.throughput.rps),
        ),
        (
            format!("new connections/s, {CONNECTIONS} conc."),
            "connections_per_second",
            path(|p| p.conn_rate.rps),
        ),
    ] {
        rows.push(row(
            metric,
            key,
            (s, l),
            format!("{s:.0}"),
            format!("{l:.0}"),
            format!("{:+.1} %", percent(l, s) - 100.0),
        ));
    }
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
            path(|p| p.http.proxy_cpu_per_1000()),
            1,
            "ms",
            "µs/req",
        ),
        (
            "  node-a only, the routing agent (max)".into(),
            "client_agent_cpu_ms_per_1000_requests",
            path(|p| p.http.client_proxy_cpu_per_1000()),
            1,
            "ms",
            "µs/req",
        ),
        (
            format!("agent CPU per 1000 req, both (@{FIXED_RATE})"),
            "agent_cpu_ms_per_1000_requests_fixed_rate",
            path(|p| p.http.proxy_cpu_per_1000_fixed_rate()),
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
            "config served after write".into(),
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
    Table {
        titles: vec![
            "metric".into(),
            titles[0].clone(),
            titles[1].clone(),
            "difference".into(),
        ],
        rows,
    }
}

/// Where the CPU went in every phase with many requests, and how the
/// proxies' memory evolved.
pub(super) fn cpu_breakdown(results: &[ModeResult]) -> String {
    let cpus = num_cpus() as f64;
    let mut out = String::from(
        "\nCPU ms per 1000 requests (max throughput) or per 1000 connections (connection rate):\n",
    );
    let several = results.iter().filter(|r| r.mode == Mode::Direct).count() > 1;
    let mut round = 0;
    for r in results {
        if r.mode == Mode::Direct {
            round += 1;
        }
        let label = if several {
            format!("round {round} {}", r.mode.name())
        } else {
            r.mode.name().to_string()
        };
        let prefix = match r.mode {
            Mode::Direct | Mode::HaproxyPair => "",
            Mode::MeshedMtls => "L4 ",
            Mode::MeshedPlaintext => "L7 ",
        };
        let mut phases: Vec<(String, &CpuUse, u64)> = vec![
            (
                format!("{prefix}throughput"),
                &r.main.http.throughput_cpu,
                r.main.http.throughput.ok,
            ),
            (
                format!("{prefix}conn rate"),
                &r.main.conn_rate_cpu,
                r.main.conn_rate.ok,
            ),
        ];
        for l7 in &r.l7 {
            let run = match l7.variant {
                Variant::Default => format!("L7 {} routes", l7.routes),
                variant => variant.label(),
            };
            phases.push((
                format!("{run} throughput"),
                &l7.path.http.throughput_cpu,
                l7.path.http.throughput.ok,
            ));
            phases.push((
                format!("{run} conn rate"),
                &l7.path.conn_rate_cpu,
                l7.path.conn_rate.ok,
            ));
        }
        let w = phases.iter().map(|(p, _, _)| p.len()).max().unwrap_or(0);
        for (phase, cpu, n) in phases {
            let p = |ms: f64| per_1000(ms, n);
            let _ = write!(
                out,
                "  {label} {phase:<w$}: oha {:.1}, nginx {:.1}",
                p(cpu.load_generator),
                p(cpu.servers),
            );
            if r.mode != Mode::Direct {
                let _ = write!(
                    out,
                    ", proxies {:.1} (user {:.1} + sys {:.1}; {:.2} context switches per \
                     request; {} + {} threads)",
                    p(cpu.proxies_total()),
                    p(cpu.proxies[0].0 + cpu.proxies[1].0),
                    p(cpu.proxies[0].1 + cpu.proxies[1].1),
                    cpu.proxy_context_switches as f64 / n.max(1) as f64,
                    cpu.proxy_threads[0],
                    cpu.proxy_threads[1],
                );
            } else {
                let _ = write!(out, ", idle agents {:.1}", p(cpu.proxies_total()));
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
    out.push_str("\nProxy memory after each phase, RSS (peak) MB, node-a / node-b");
    out.push_str(if several { " (last round):\n" } else { ":\n" });
    let last_round = results
        .iter()
        .rposition(|r| r.mode == Mode::Direct)
        .unwrap_or(0);
    for r in &results[last_round..] {
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
        let who = match r.mode {
            Mode::Direct => "idle agents",
            Mode::HaproxyPair => "HAProxies",
            Mode::MeshedMtls | Mode::MeshedPlaintext => "agents",
        };
        let _ = writeln!(out, "  {} ({who}): {}", r.mode.name(), line.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{Captured, L7Result, Variant, ROUTE_COUNTS};
    use super::*;
    use std::time::Duration;

    /// A path that served `rps` req/s at max with `proxy_ms` of proxy CPU
    /// over one second, and `conns` new connections per second.
    fn path(rps: f64, proxy_ms: f64, conns: f64, rss_kib: u64) -> PathResult {
        let mut p = PathResult::default();
        p.http.throughput.rps = rps;
        p.http.throughput.ok = rps as u64;
        p.http.throughput_cpu.proxies = [(proxy_ms / 2.0, 0.0), (0.0, proxy_ms / 2.0)];
        p.conn_rate.rps = conns;
        p.memory = [Memory {
            rss_kib,
            hwm_kib: rss_kib,
            anon_kib: rss_kib,
        }; 2];
        p
    }

    fn result(mode: Mode, main: PathResult, l7: Option<PathResult>) -> ModeResult {
        ModeResult {
            mode,
            main,
            l7: l7
                .into_iter()
                .map(|path| L7Result {
                    routes: ROUTE_COUNTS[0],
                    variant: Variant::Default,
                    path,
                    applied_after: Duration::ZERO,
                })
                .collect(),
            bulk: None,
            warnings: Vec::new(),
            memory_trace: Vec::new(),
            captured: Captured::default(),
            haproxy_tls_connections: None,
        }
    }

    /// Figures are computed in floating point.
    fn close(value: &Value, want: f64) {
        let v = value.as_f64().unwrap_or(f64::NAN);
        assert!((v - want).abs() < 1e-9, "{v} != {want}");
    }

    fn row<'a>(table: &'a Table, key: &str) -> &'a Value {
        &table.rows.iter().find(|r| r.key == key).unwrap().values
    }

    #[test]
    fn every_path_is_a_ratio_of_direct_and_nodemesh_of_the_haproxy_pair() {
        let results = [
            result(Mode::Direct, path(10_000.0, 0.0, 4000.0, 0), None),
            result(
                Mode::HaproxyPair,
                path(4000.0, 120.0, 3000.0, 20 * 1024),
                None,
            ),
            result(
                Mode::MeshedMtls,
                path(6000.0, 240.0, 2000.0, 10 * 1024),
                Some(path(5000.0, 90.0, 3600.0, 11 * 1024)),
            ),
            // Its main phases are the L7 ones.
            result(
                Mode::MeshedPlaintext,
                path(5500.0, 80.0, 3700.0, 11 * 1024),
                None,
            ),
        ];
        let c = comparison(&results);
        assert_eq!(c.judged, Path::L7Mtls);
        assert_eq!(
            c.main.titles,
            [
                "metric",
                "direct",
                "HAProxy pair",
                "L4 + mTLS",
                "L7 + mTLS",
                "L7 plaintext hop"
            ],
        );
        let rps = row(&c.main, "http_rps");
        close(&rps["haproxy_pair"]["percent"], 40.0);
        close(&rps["l4_mtls"]["percent"], 60.0);
        close(&rps["l7_mtls"]["percent"], 50.0);
        close(&rps["l7_plaintext"]["percent"], 55.0);
        close(
            &row(&c.main, "connections_per_second")["l7_mtls"]["percent"],
            90.0,
        );
        // 90 ms over 5000 requests, 120 over 4000.
        let cpu = row(&c.main, "proxy_cpu_ms_per_1000_requests");
        close(&cpu["l7_mtls"]["value"], 18.0);
        close(&cpu["haproxy_pair"]["value"], 30.0);
        // Split evenly between the two proxies by `path`.
        let per_proxy = row(&c.main, "proxy_cpu_ms_per_1000_requests_per_proxy");
        close(&per_proxy["l7_mtls"]["node_a"], 9.0);
        close(&per_proxy["l7_mtls"]["node_b"], 9.0);

        assert_eq!(
            c.versus_haproxy.titles,
            [
                "nodemesh / HAProxy pair",
                "L4 + mTLS",
                "L7 + mTLS",
                "L7 plaintext hop"
            ]
        );
        close(
            &row(&c.versus_haproxy, "http_rps")["l7_mtls"]["percent"],
            125.0,
        );
        close(
            &row(&c.versus_haproxy, "proxy_cpu_ms_per_1000_requests")["l7_mtls"]["percent"],
            60.0,
        );
        close(
            &row(&c.versus_haproxy, "proxy_rss_mb")["l7_mtls"]["percent"],
            55.0,
        );

        let targets: Vec<(&str, bool)> = c
            .main
            .rows
            .iter()
            .filter_map(|r| Some((r.key.as_str(), r.target.as_ref()?.1)))
            .collect();
        assert!(targets.contains(&("http_rps", true)), "{targets:?}");
        assert!(
            targets.contains(&("proxy_cpu_ms_per_1000_requests", true)),
            "{targets:?}"
        );
        assert!(targets.contains(&("proxy_rss_mb", true)), "{targets:?}");
        let ahead = c.versus_haproxy.rows[0].target.as_ref().unwrap();
        assert_eq!(ahead, &("L7 + mTLS > 100 %".to_string(), true));
    }

    #[test]
    fn medians_and_rendering() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median([]).is_nan());
        let table = Table {
            titles: vec!["metric".into(), "a".into()],
            rows: vec![Row {
                cells: vec!["req/s".into(), "12345".into()],
                target: Some(("≥ 1".into(), true)),
                key: "k".into(),
                values: Value::Null,
            }],
        };
        assert_eq!(
            table.render(),
            "metric      a  target\nreq/s   12345  ≥ 1 ✓\n"
        );
    }
}
