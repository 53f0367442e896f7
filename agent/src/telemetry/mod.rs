//! Telemetry: Istio's standard metrics reported by the proxy, and the
//! agent's own health, on a Prometheus endpoint.
//!
//! - `standard`: Istio's request and TCP metrics, bounded in cardinality.
//! - `peer`: Istio's labels of one side of a call (what "workload" means).
//! - `flags`: Envoy's response flags.
//! - `http`: measuring one request through to its response's end.
//! - `histogram`: lock-free fixed-bucket histograms.
//! - `health`: `nodemesh_*` metrics.
//! - `server`: `GET /metrics`.
//! - `window`: the last minute's totals, for `nodemesh stat`/`top`/`graph`.
//! - `trace`: distributed tracing (W3C and B3 propagation, OTLP export).
//! - `policy`: Istio's `Telemetry` resource, resolved per workload.
//! - `filter`: access-log filter expressions.
//! - `access_log`: access-log lines and their writer.

pub mod access_log;
pub mod filter;
pub mod flags;
pub mod health;
mod histogram;
pub mod http;
pub mod peer;
pub mod policy;
#[cfg(test)]
mod policy_tests;
mod series_cache;
pub mod server;
pub mod standard;
pub mod trace;
pub mod window;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::config::{Config, ConfigStore};

pub use flags::{Flag, ResponseFlags};
pub use health::Health;
pub use policy::{Format, Mode, Resolved, Side};
pub use standard::{ConnectionDone, EdgeKey, LiveBytes, Reporter, RequestDone};

/// What the proxy records into (one per agent).
pub struct Telemetry {
    standard: standard::Standard,
    window: window::Window,
    /// Spans of sampled requests; `None` without `--otlp-endpoint`.
    pub tracer: Option<trace::Tracer>,
    /// `--access-log`: the format logged mesh-wide unless a Telemetry says
    /// otherwise.
    default_log: Option<Format>,
    /// The Telemetry resolved for this node's workloads (see [`Telemetry::refresh`]).
    local: ArcSwap<Local>,
    pub access_log: access_log::AccessLogger,
}

/// The Telemetry of this node's workloads, resolved for one config.
struct Local {
    /// Some workload has something else than the defaults: otherwise the
    /// request path takes [`Side::unset`] without a lookup.
    configured: bool,
    /// By `namespace/name`.
    by_workload: HashMap<String, Resolved>,
    /// For a workload enrolled before the config that names it is resolved.
    mesh: Resolved,
    /// The config resolved (compared by address; the `Weak` keeps the
    /// address from being reused).
    config: Weak<Config>,
}

impl Telemetry {
    pub fn new(
        config: Arc<ConfigStore>,
        trust_domain: &str,
        tracer: Option<trace::Tracer>,
        default_log: Option<Format>,
    ) -> Telemetry {
        let local = Local {
            configured: default_log.is_some(),
            by_workload: HashMap::new(),
            mesh: policy::Telemetries::default().mesh_wide(default_log),
            config: Weak::new(),
        };
        Telemetry {
            standard: standard::Standard::new(config.clone(), trust_domain),
            default_log,
            local: ArcSwap::from_pointee(local),
            access_log: access_log::AccessLogger::new(config, trust_domain),
            window: window::Window::new(Instant::now()),
            tracer,
        }
    }

    /// Resolves the Telemetry of `node`'s workloads against `cfg`; called
    /// for every new config, so that requests never resolve it.
    pub fn refresh(&self, cfg: &Arc<Config>, node: &str) {
        if std::ptr::eq(self.local.load().config.as_ptr(), Arc::as_ptr(cfg)) {
            return;
        }
        let policies = cfg.telemetries();
        let by_workload: HashMap<_, _> = cfg
            .workloads()
            .iter()
            .filter(|w| w.node == node)
            .map(|w| (w.key(), policies.for_workload(w, self.default_log)))
            .collect();
        let mesh = policies.mesh_wide(self.default_log);
        let unset = Resolved {
            client: Side::unset(),
            server: Side::unset(),
        };
        let configured = mesh != unset || by_workload.values().any(|r| *r != unset);
        self.local.store(Arc::new(Local {
            configured,
            by_workload,
            mesh,
            config: Arc::downgrade(cfg),
        }));
    }

    /// How the calls of the local workload `workload` (`namespace/name`)
    /// on side `mode` are observed.
    pub fn side(&self, workload: &str, mode: Mode) -> Side {
        let local = self.local.load();
        if !local.configured {
            return Side::unset();
        }
        local
            .by_workload
            .get(workload)
            .unwrap_or(&local.mesh)
            .side(mode)
            .clone()
    }

    /// Snapshots the totals every [`window::INTERVAL`], until aborted.
    pub async fn keep_window(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(window::INTERVAL);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            self.window.record(Instant::now(), self.standard.totals());
        }
    }

    /// Each edge's counts over the last `window`.
    pub fn stats(&self, window: Duration) -> Result<window::Stats, window::WindowError> {
        let live = self.standard.totals();
        self.window.stats(&live, window, Instant::now())
    }

    pub fn record_request(&self, done: &RequestDone) {
        self.standard.record_request(done);
    }

    /// The live counters of a TCP relay of `workload` (the local side), if
    /// its metrics are on; counts it opened when `open`.
    pub fn record_connection_live(
        &self,
        workload: Option<&str>,
        edge: &EdgeKey,
        open: bool,
    ) -> Option<LiveBytes> {
        let metrics = self.side_of(workload, edge.reporter).metrics;
        metrics.then(|| self.standard.record_connection_live(edge, open))
    }

    /// The settings of the local side of a TCP relay (unset when the
    /// workload is unknown).
    fn side_of(&self, workload: Option<&str>, reporter: Reporter) -> Side {
        let mode = match reporter {
            Reporter::Source => Mode::Client,
            Reporter::Destination => Mode::Server,
        };
        workload.map_or_else(Side::unset, |w| self.side(w, mode))
    }

    /// Records a connection that `workload` (the local side: the caller for
    /// outbound, the destination for inbound) relayed as TCP.
    pub fn record_connection(
        &self,
        workload: Option<&str>,
        done: &ConnectionDone,
        start: SystemTime,
        duration: Duration,
    ) {
        let side = self.side_of(workload, done.edge.reporter);
        if side.metrics {
            self.standard.record_connection(done);
        }
        if let Some(log) = &side.access_log {
            let line = access_log::TcpLine {
                start,
                duration,
                done: *done,
            };
            self.access_log.tcp(log, line);
        }
    }

    /// The whole exposition: Istio's metrics, then the agent's health.
    pub fn exposition(&self, health: &Health) -> String {
        let mut out = String::with_capacity(64 * 1024);
        self.standard.write(&mut out);
        health.write(&mut out);
        if let Some(tracer) = &self.tracer {
            tracer.write_metrics(&mut out);
        }
        standard::header(
            &mut out,
            "nodemesh_telemetry_overflow_total",
            "counter",
            "Calls counted under `unknown` labels because a label-set or series bound was reached.",
        );
        let _ = writeln!(
            out,
            "nodemesh_telemetry_overflow_total {}",
            self.standard.overflowed()
        );
        for (name, help, value) in [
            (
                "nodemesh_access_log_lines_total",
                "Access-log lines written to stdout.",
                self.access_log.written(),
            ),
            (
                "nodemesh_access_log_dropped_total",
                "Access-log lines dropped because the writer's queue was full.",
                self.access_log.dropped(),
            ),
        ] {
            standard::header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        let (edges, requests, connections) = self.standard.sizes();
        standard::header(
            &mut out,
            "nodemesh_telemetry_series",
            "gauge",
            "Label sets and series the Istio metrics hold.",
        );
        for (kind, n) in [
            ("label_sets", edges),
            ("http", requests),
            ("tcp", connections),
        ] {
            let _ = writeln!(out, "nodemesh_telemetry_series{{kind=\"{kind}\"}} {n}");
        }
        out
    }
}
