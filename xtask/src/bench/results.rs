//! What one direct or meshed pass measured, and the per-request
//! arithmetic on it; shared by the bench and its report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{INTERFERENCE_CPUS, OHA_DEADLINE_ERROR, STEAL_CPUS};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mode {
    Direct,
    Meshed,
}

impl Mode {
    pub(super) fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Meshed => "meshed",
        }
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
    /// Per agent (node-a, node-b): user, system.
    pub(super) agents: [(f64, f64); 2],
    /// nginx and the iperf3 server.
    pub(super) servers: f64,
    /// oha or the iperf3 client (a waited-for child of this process).
    pub(super) load_generator: f64,
    /// Whole machine, all CPUs: busy (user + system + irq), and steal.
    pub(super) machine_busy: f64,
    pub(super) machine_steal: f64,
    pub(super) wall: f64,
    /// Context switches of both agents' threads.
    pub(super) agent_context_switches: u64,
    /// Threads per agent at the end of the phase.
    pub(super) agent_threads: [u64; 2],
}

impl CpuUse {
    pub(super) fn agents_total(&self) -> f64 {
        self.agents.iter().map(|(u, s)| u + s).sum()
    }

    /// Busy CPU time on the machine not charged to the agents, the servers
    /// or the load generator: other processes, and kernel work (softirq) run
    /// outside their context.
    pub(super) fn other(&self) -> f64 {
        (self.machine_busy - self.agents_total() - self.servers - self.load_generator).max(0.0)
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
            "agent_node_a_ms": { "user": self.agents[0].0, "system": self.agents[0].1 },
            "agent_node_b_ms": { "user": self.agents[1].0, "system": self.agents[1].1 },
            "agents_total_ms": self.agents_total(),
            "servers_ms": self.servers,
            "load_generator_ms": self.load_generator,
            "other_ms": self.other(),
            "machine_busy_ms": self.machine_busy,
            "machine_steal_ms": self.machine_steal,
            "wall_ms": self.wall,
            "agent_context_switches": self.agent_context_switches,
            "agent_threads": self.agent_threads,
        })
    }
}

#[derive(Clone, Copy)]
pub(super) struct CpuSnapshot {
    pub(super) agents: [(u64, u64); 2],
    pub(super) servers: u64,
    pub(super) children: u64,
    pub(super) machine: (u64, u64, u64),
    /// Per agent: (context switches, threads).
    pub(super) agent_switches: [(u64, u64); 2],
    pub(super) at: Instant,
}

#[derive(Default, Debug, Clone, Copy)]
pub(super) struct Memory {
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
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
#[derive(Debug)]
pub(super) struct HttpPhases {
    pub(super) throughput: HttpRun,
    pub(super) throughput_cpu: CpuUse,
    pub(super) latency: HttpRun,
    pub(super) latency_cpu: CpuUse,
}

impl HttpPhases {
    /// Agent CPU ms (both agents) per 1000 requests at max throughput: the
    /// design's figure.
    pub(super) fn agent_cpu_per_1000(&self) -> f64 {
        per_1000(self.throughput_cpu.agents_total(), self.throughput.ok)
    }

    /// The same at the fixed rate, where every configuration handles the
    /// same requests per second, so batching cannot hide a per-request cost.
    pub(super) fn agent_cpu_per_1000_fixed_rate(&self) -> f64 {
        per_1000(self.latency_cpu.agents_total(), self.latency.ok)
    }

    /// node-a's agent alone at max throughput: the only one that routes
    /// (node-b's relays L4), so a routing cost shows here undiluted.
    pub(super) fn client_agent_cpu_per_1000(&self) -> f64 {
        let (user, system) = self.throughput_cpu.agents[0];
        per_1000(user + system, self.throughput.ok)
    }

    fn to_json(&self) -> Value {
        json!({
            "http_max_throughput": self.throughput.to_json(),
            "http_max_throughput_cpu": self.throughput_cpu.to_json(),
            "agent_cpu_ms_per_1000_requests": self.agent_cpu_per_1000(),
            "http_fixed_rate": self.latency.to_json(),
            "http_fixed_rate_cpu": self.latency_cpu.to_json(),
            "agent_cpu_ms_per_1000_requests_fixed_rate": self.agent_cpu_per_1000_fixed_rate(),
        })
    }
}

/// The L7 phases with one size of route table.
#[derive(Debug)]
pub(super) struct L7Result {
    /// Routes in the VirtualService; requests match the last.
    pub(super) routes: usize,
    pub(super) http: HttpPhases,
    /// From writing the VirtualService until both agents served it.
    pub(super) applied_after: Duration,
    /// Agent memory after these phases.
    pub(super) memory: [Memory; 2],
}

impl L7Result {
    fn to_json(&self) -> Value {
        let mut doc = self.http.to_json();
        doc["routes"] = json!(self.routes);
        doc["config_applied_ms"] = json!(self.applied_after.as_secs_f64() * 1000.0);
        doc["agent_memory_kib"] = memory_json("l7", &self.memory);
        doc
    }
}

#[derive(Debug)]
pub(super) struct ModeResult {
    pub(super) mode: Mode,
    /// To the server pod's address: direct, or relayed as opaque TCP by
    /// both agents.
    pub(super) l4: HttpPhases,
    /// Meshed only: to the Service, through the client-side agent's L7
    /// proxy, once per route-table size (smallest first).
    pub(super) l7: Vec<L7Result>,
    pub(super) conn_rate: HttpRun,
    pub(super) conn_rate_cpu: CpuUse,
    pub(super) bulk_cpu: CpuUse,
    /// Phases during which other work used a noticeable share of the CPUs.
    pub(super) warnings: Vec<String>,
    pub(super) bulk_bits_per_second: f64,
    /// Agent memory after each phase: (phase, [node-a, node-b]).
    pub(super) memory_trace: Vec<(String, [Memory; 2])>,
    pub(super) captured: Captured,
}

impl ModeResult {
    /// Agent memory for the headline: with the smallest route table when
    /// meshed (larger tables have their own figures), else after the last
    /// phase.
    pub(super) fn memory(&self) -> [Memory; 2] {
        match self.l7.first() {
            Some(l7) => l7.memory,
            None => self
                .memory_trace
                .last()
                .map(|(_, m)| *m)
                .unwrap_or_default(),
        }
    }

    pub(super) fn l7_with(&self, routes: usize) -> Option<&L7Result> {
        self.l7.iter().find(|l| l.routes == routes)
    }

    pub(super) fn to_json(&self) -> Value {
        // The L4 phases keep the keys they had before the L7 phases existed.
        let mut doc = self.l4.to_json();
        let rest = json!({
            "http_l7": self.l7.iter().map(L7Result::to_json).collect::<Vec<_>>(),
            "connection_rate": self.conn_rate.to_json(),
            "connection_rate_cpu": self.conn_rate_cpu.to_json(),
            "bulk_tcp_bits_per_second": self.bulk_bits_per_second,
            "bulk_tcp_cpu": self.bulk_cpu.to_json(),
            "warnings": self.warnings,
            "agent_memory_kib": self
                .memory_trace
                .iter()
                .map(|(phase, m)| memory_json(phase, m))
                .collect::<Vec<_>>(),
            "connections_through_agents": {
                "outbound_node_a": self.captured.outbound_a,
                "inbound_node_b": self.captured.inbound_b,
                "failed": self.captured.failed,
            },
        });
        if let (Some(doc), Value::Object(rest)) = (doc.as_object_mut(), rest) {
            doc.extend(rest);
        }
        doc
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
