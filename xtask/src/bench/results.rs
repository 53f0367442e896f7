//! What one direct or meshed pass measured, and the per-request
//! arithmetic on it; shared by the bench and its report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{INTERFERENCE_CPUS, OHA_DEADLINE_ERROR, STEAL_CPUS};

/// What one pass of phases runs through; every round runs each available
/// mode once, in this order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mode {
    /// Namespace not labelled: the agents run but capture nothing.
    Direct,
    /// Namespace still not labelled; requests go through the HAProxy pair
    /// (see `haproxy.rs`).
    HaproxyPair,
    /// Namespace labelled: both agents proxy, the agent-to-agent hop over
    /// mutual TLS (HBONE), as by default; L4 and L7.
    MeshedMtls,
    /// Namespace labelled and a mesh-wide PeerAuthentication `DISABLE`, so
    /// automatic mTLS chooses a plaintext agent-to-agent hop; L7 only.
    MeshedPlaintext,
}

impl Mode {
    pub(super) const ALL: [Mode; 4] = [
        Mode::Direct,
        Mode::HaproxyPair,
        Mode::MeshedMtls,
        Mode::MeshedPlaintext,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::HaproxyPair => "HAProxy pair",
            Mode::MeshedMtls => "nodemesh + mTLS",
            Mode::MeshedPlaintext => "nodemesh, plaintext hop",
        }
    }

    /// The key of its results in results.json.
    pub(super) fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::HaproxyPair => "haproxy_pair",
            Mode::MeshedMtls => "meshed_mtls",
            Mode::MeshedPlaintext => "meshed_plaintext",
        }
    }

    /// Whether the bench namespace is labelled into the mesh.
    pub(super) fn enrolls(self) -> bool {
        matches!(self, Mode::MeshedMtls | Mode::MeshedPlaintext)
    }
}

/// One oha run, parsed.
#[derive(Default, Debug)]
pub(super) struct HttpRun {
    /// Responses with a 2xx status.
    pub(super) ok: u64,
    pub(super) non_2xx: u64,
    /// Failed requests (connection errors, timeouts), deadline aborts
    /// excluded.
    pub(super) errors: u64,
    pub(super) error_kinds: BTreeMap<String, u64>,
    pub(super) seconds: f64,
    /// 2xx responses per second.
    pub(super) rps: f64,
    pub(super) p50_ms: f64,
    pub(super) p90_ms: f64,
    pub(super) p99_ms: f64,
}

impl HttpRun {
    pub(super) fn from_oha(doc: &Value) -> Result<HttpRun> {
        let seconds = doc["summary"]["total"]
            .as_f64()
            .context("oha JSON has no summary.total")?;
        let mut run = HttpRun {
            seconds,
            ..HttpRun::default()
        };
        if let Some(codes) = doc["statusCodeDistribution"].as_object() {
            for (code, n) in codes {
                let n = n.as_u64().unwrap_or(0);
                if code.starts_with('2') {
                    run.ok += n;
                } else {
                    run.non_2xx += n;
                }
            }
        }
        if let Some(errors) = doc["errorDistribution"].as_object() {
            for (kind, n) in errors {
                let n = n.as_u64().unwrap_or(0);
                if kind != OHA_DEADLINE_ERROR {
                    run.errors += n;
                    run.error_kinds.insert(kind.clone(), n);
                }
            }
        }
        let pct = |p: &str| doc["latencyPercentiles"][p].as_f64().unwrap_or(f64::NAN) * 1000.0;
        run.p50_ms = pct("p50");
        run.p90_ms = pct("p90");
        run.p99_ms = pct("p99");
        run.rps = if seconds > 0.0 {
            run.ok as f64 / seconds
        } else {
            0.0
        };
        Ok(run)
    }

    pub(super) fn attempted(&self) -> u64 {
        self.ok + self.non_2xx + self.errors
    }

    pub(super) fn error_fraction(&self) -> f64 {
        match self.attempted() {
            0 => 1.0,
            n => (self.non_2xx + self.errors) as f64 / n as f64,
        }
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "ok": self.ok,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "seconds": self.seconds,
            "requests_per_second": self.rps,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
        })
    }
}

/// CPU time over one phase, in milliseconds.
#[derive(Default, Debug)]
pub(super) struct CpuUse {
    /// Per proxy of the mode measured (node-a, node-b): the agents, or the
    /// HAProxies on the HAProxy path; user, system.
    pub(super) proxies: [(f64, f64); 2],
    /// nginx and the iperf3 server.
    pub(super) servers: f64,
    /// oha or the iperf3 client (a waited-for child of this process).
    pub(super) load_generator: f64,
    /// Whole machine, all CPUs: busy (user + system + irq), and steal.
    pub(super) machine_busy: f64,
    pub(super) machine_steal: f64,
    pub(super) wall: f64,
    /// Context switches of both proxies' threads.
    pub(super) proxy_context_switches: u64,
    /// Threads per proxy at the end of the phase.
    pub(super) proxy_threads: [u64; 2],
}

impl CpuUse {
    pub(super) fn proxies_total(&self) -> f64 {
        self.proxies.iter().map(|(u, s)| u + s).sum()
    }

    /// Busy CPU time on the machine not charged to the proxies, the servers
    /// or the load generator: other processes (the idle agents on the
    /// HAProxy path), and kernel work (softirq) run outside their context.
    pub(super) fn other(&self) -> f64 {
        (self.machine_busy - self.proxies_total() - self.servers - self.load_generator).max(0.0)
    }

    /// A warning when other work took a noticeable share of the machine.
    pub(super) fn interference(&self, phase: &str) -> Option<String> {
        let cpus = if self.wall > 0.0 {
            self.other() / self.wall
        } else {
            0.0
        };
        let steal = if self.wall > 0.0 {
            self.machine_steal / self.wall
        } else {
            0.0
        };
        (cpus > INTERFERENCE_CPUS || steal > STEAL_CPUS).then(|| {
            format!(
                "{phase}: other work used {cpus:.2} CPU and steal {steal:.2} CPU: figures skewed"
            )
        })
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "proxy_node_a_ms": { "user": self.proxies[0].0, "system": self.proxies[0].1 },
            "proxy_node_b_ms": { "user": self.proxies[1].0, "system": self.proxies[1].1 },
            "proxies_total_ms": self.proxies_total(),
            "servers_ms": self.servers,
            "load_generator_ms": self.load_generator,
            "other_ms": self.other(),
            "machine_busy_ms": self.machine_busy,
            "machine_steal_ms": self.machine_steal,
            "wall_ms": self.wall,
            "proxy_context_switches": self.proxy_context_switches,
            "proxy_threads": self.proxy_threads,
        })
    }
}

#[derive(Clone, Copy)]
pub(super) struct CpuSnapshot {
    pub(super) proxies: [(u64, u64); 2],
    pub(super) servers: u64,
    pub(super) children: u64,
    pub(super) machine: (u64, u64, u64),
    /// Per proxy: (context switches, threads).
    pub(super) proxy_switches: [(u64, u64); 2],
    pub(super) at: Instant,
}

#[derive(Default, Debug, Clone, Copy)]
pub(super) struct Memory {
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
    /// The part of `rss_kib` not mapped from files (heap, stacks).
    pub(super) anon_kib: u64,
}

#[derive(Default, Debug, Clone, Copy)]
pub(super) struct Captured {
    /// New outbound connections on node-a's agent.
    pub(super) outbound_a: u64,
    /// New inbound connections on node-b's agent.
    pub(super) inbound_b: u64,
    pub(super) failed: u64,
}

/// Max throughput and latency at the fixed rate, against one URL.
#[derive(Default, Debug)]
pub(super) struct HttpPhases {
    pub(super) throughput: HttpRun,
    pub(super) throughput_cpu: CpuUse,
    pub(super) latency: HttpRun,
    pub(super) latency_cpu: CpuUse,
}

impl HttpPhases {
    /// Proxy CPU ms (both proxies) per 1000 requests at max throughput:
    /// the design's figure.
    pub(super) fn proxy_cpu_per_1000(&self) -> f64 {
        per_1000(self.throughput_cpu.proxies_total(), self.throughput.ok)
    }

    /// The same at the fixed rate, where every configuration handles the
    /// same requests per second, so batching cannot hide a per-request cost.
    pub(super) fn proxy_cpu_per_1000_fixed_rate(&self) -> f64 {
        per_1000(self.latency_cpu.proxies_total(), self.latency.ok)
    }

    /// node-a's proxy alone at max throughput: the one that routes
    /// (node-b's relays L4), so a routing cost shows here undiluted.
    pub(super) fn client_proxy_cpu_per_1000(&self) -> f64 {
        let (user, system) = self.throughput_cpu.proxies[0];
        per_1000(user + system, self.throughput.ok)
    }

    fn to_json(&self) -> Value {
        json!({
            "http_max_throughput": self.throughput.to_json(),
            "http_max_throughput_cpu": self.throughput_cpu.to_json(),
            "proxy_cpu_ms_per_1000_requests": self.proxy_cpu_per_1000(),
            "http_fixed_rate": self.latency.to_json(),
            "http_fixed_rate_cpu": self.latency_cpu.to_json(),
            "proxy_cpu_ms_per_1000_requests_fixed_rate": self.proxy_cpu_per_1000_fixed_rate(),
        })
    }
}

/// Everything measured on one path to nginx: the HTTP phases, the
/// connection rate, and the memory of the two proxies that carry it.
#[derive(Default, Debug)]
pub(super) struct PathResult {
    /// What the load spoke.
    pub(super) version: HttpVersion,
    pub(super) http: HttpPhases,
    /// A new connection per request (oha `--disable-keepalive`).
    pub(super) conn_rate: HttpRun,
    pub(super) conn_rate_cpu: CpuUse,
    /// The proxies' memory (node-a, node-b) after these phases.
    pub(super) memory: [Memory; 2],
    /// What an open connection costs each proxy, where measured.
    pub(super) held: Option<Held>,
}

/// What each proxy's anonymous memory grew by per connection held open
/// (node-a, node-b), each having carried one request (`held.rs`).
#[derive(Default, Debug, Clone, Copy)]
pub(super) struct Held {
    pub(super) connections: usize,
    pub(super) kib: [f64; 2],
}

impl PathResult {
    /// Proxy CPU ms (both) per 1000 new connections.
    pub(super) fn proxy_cpu_per_1000_connections(&self) -> f64 {
        per_1000(self.conn_rate_cpu.proxies_total(), self.conn_rate.ok)
    }

    fn to_json(&self) -> Value {
        let mut doc = self.http.to_json();
        doc["http_version"] = json!(self.version.name());
        doc["connection_rate"] = self.conn_rate.to_json();
        doc["connection_rate_cpu"] = self.conn_rate_cpu.to_json();
        doc["proxy_cpu_ms_per_1000_connections"] = json!(self.proxy_cpu_per_1000_connections());
        doc["proxy_memory_kib"] = memory_json("path", &self.memory);
        doc
    }
}

/// How oha speaks to the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum HttpVersion {
    /// HTTP/1.1, one request at a time per connection.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c, as gRPC runs inside a mesh),
    /// [`HTTP2_STREAMS`](super::HTTP2_STREAMS) streams at a time per
    /// connection.
    Http2,
}

impl HttpVersion {
    pub(super) fn name(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "HTTP/1.1",
            HttpVersion::Http2 => "HTTP/2",
        }
    }

    /// What each connection carries at a time, after the connection count
    /// in a label: nothing for HTTP/1.1.
    pub(super) fn streams_label(self) -> String {
        match self {
            HttpVersion::Http1 => String::new(),
            HttpVersion::Http2 => format!(" × {} streams", super::HTTP2_STREAMS),
        }
    }

    /// oha's arguments `args` preceded by this version's flags; with
    /// `streams`, HTTP/2's concurrent streams on each connection (none when
    /// each request opens one).
    pub(super) fn oha_args<'a>(self, streams: bool, args: &[&'a str]) -> Vec<&'a str> {
        let flags: &[&'static str] = match (self, streams) {
            (HttpVersion::Http1, _) => &[],
            (HttpVersion::Http2, true) => &["--http2", "-p", super::HTTP2_STREAMS],
            (HttpVersion::Http2, false) => &["--http2"],
        };
        flags.iter().chain(args).copied().collect()
    }
}

/// What an L7 run changes, besides the size of the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    /// The default configuration (metrics on, tracing at Istio's 1 %).
    Default,
    /// An AuthorizationPolicy of this many rules on the server; requests
    /// match the last.
    AllowList(usize),
    /// A mesh-wide `Telemetry` resource.
    Telemetry(super::telemetry::Setting),
    /// Direct mode: a client outside the mesh calls the server pod.
    FromOutside,
    /// The same client through node-a's ingress Gateway, into the mesh
    /// over mutual TLS.
    Ingress,
    /// Direct mode: HTTP/2 from the client pod to nginx's HTTP/2 port.
    Http2Direct,
    /// HTTP/2 to the Service's `http2` port, routed by node-a's agent and
    /// carried over mutual TLS, HTTP/2 on every hop.
    Http2,
}

impl Variant {
    pub(super) fn label(self) -> String {
        match self {
            Variant::Default => "default".into(),
            Variant::AllowList(rules) => format!("allow-list of {rules} rules"),
            Variant::Telemetry(setting) => setting.label().into(),
            Variant::FromOutside => "outside client, direct".into(),
            Variant::Ingress => "outside client, ingress + mTLS".into(),
            Variant::Http2Direct => "HTTP/2, direct".into(),
            Variant::Http2 => "HTTP/2, L7 + mTLS".into(),
        }
    }
}

/// The L7 phases with one size of route table.
#[derive(Debug)]
pub(super) struct L7Result {
    /// Routes in the VirtualService; requests match the last.
    pub(super) routes: usize,
    /// What else the run changes from the headline L7 run.
    pub(super) variant: Variant,
    pub(super) path: PathResult,
    /// From writing the VirtualService until both agents served it.
    pub(super) applied_after: Duration,
}

impl L7Result {
    fn to_json(&self) -> Value {
        let mut doc = self.path.to_json();
        doc["routes"] = json!(self.routes);
        doc["variant"] = json!(self.variant.label());
        if let Variant::AllowList(rules) = self.variant {
            doc["allow_rules"] = json!(rules);
        }
        doc["config_applied_ms"] = json!(self.applied_after.as_secs_f64() * 1000.0);
        doc
    }
}

/// What one iperf3 run delivered to the server.
#[derive(Debug)]
pub(super) struct Transfer {
    pub(super) bits_per_second: f64,
    pub(super) bytes: f64,
}

/// iperf3, one stream: what it delivered, and the CPU that took.
#[derive(Debug)]
pub(super) struct Bulk {
    pub(super) transfer: Transfer,
    pub(super) cpu: CpuUse,
}

impl Bulk {
    /// Both proxies' CPU per gigabyte delivered, in ms.
    pub(super) fn cpu_ms_per_gigabyte(&self) -> f64 {
        self.cpu.proxies_total() / (self.transfer.bytes / 1e9).max(f64::MIN_POSITIVE)
    }
}

#[derive(Debug)]
pub(super) struct ModeResult {
    pub(super) mode: Mode,
    /// The mode's own path: to the server pod's address (direct, or relayed
    /// as opaque TCP by both agents), or through the HAProxy pair.
    pub(super) main: PathResult,
    /// Meshed: to the Service, through the client-side agent's L7 proxy,
    /// once per route-table size (smallest first), then the other L7
    /// variants and the ingress; direct: the outside client's run.
    pub(super) l7: Vec<L7Result>,
    /// TCP modes only (not through the HAProxy pair, which speaks HTTP).
    pub(super) bulk: Option<Bulk>,
    /// Phases during which other work used a noticeable share of the CPUs.
    pub(super) warnings: Vec<String>,
    /// The proxies' memory after each phase: (phase, [node-a, node-b]).
    pub(super) memory_trace: Vec<(String, [Memory; 2])>,
    pub(super) captured: Captured,
    /// HAProxy pair only: TLS connections B accepted from A during the
    /// mode's phases; pooling keeps it far below the client connections.
    pub(super) haproxy_tls_connections: Option<u64>,
}

impl ModeResult {
    /// The L7 run with `routes` routes and the default configuration.
    pub(super) fn l7_with(&self, routes: usize) -> Option<&L7Result> {
        self.l7
            .iter()
            .find(|l| l.routes == routes && l.variant == Variant::Default)
    }

    /// The L7 run with the headline route table and `variant`.
    pub(super) fn l7_variant(&self, variant: Variant) -> Option<&L7Result> {
        self.l7.iter().find(|l| l.variant == variant)
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "path": self.main.to_json(),
            "http_l7": self.l7.iter().map(L7Result::to_json).collect::<Vec<_>>(),
            "bulk_tcp_bits_per_second": self.bulk.as_ref().map(|b| b.transfer.bits_per_second),
            "bulk_tcp_bytes": self.bulk.as_ref().map(|b| b.transfer.bytes),
            "bulk_tcp_cpu": self.bulk.as_ref().map(|b| b.cpu.to_json()),
            "warnings": self.warnings,
            "proxy_memory_kib": self
                .memory_trace
                .iter()
                .map(|(phase, m)| memory_json(phase, m))
                .collect::<Vec<_>>(),
            "haproxy_tls_connections": self.haproxy_tls_connections,
            "connections_through_agents": {
                "outbound_node_a": self.captured.outbound_a,
                "inbound_node_b": self.captured.inbound_b,
                "failed": self.captured.failed,
            },
        })
    }
}

pub(super) fn memory_json(after: &str, m: &[Memory; 2]) -> Value {
    json!({
        "after": after,
        "node_a": { "rss": m[0].rss_kib, "peak": m[0].hwm_kib },
        "node_b": { "rss": m[1].rss_kib, "peak": m[1].hwm_kib },
    })
}

pub(super) fn per_1000(ms: f64, requests: u64) -> f64 {
    if requests == 0 {
        f64::NAN
    } else {
        ms * 1000.0 / requests as f64
    }
}
