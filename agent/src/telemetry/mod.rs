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

pub mod flags;
pub mod health;
mod histogram;
pub mod http;
pub mod peer;
pub mod server;
pub mod standard;
pub mod window;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ConfigStore;

pub use flags::{Flag, ResponseFlags};
pub use health::Health;
pub use standard::{ConnectionDone, EdgeKey, Reporter, RequestDone};

/// What the proxy records into (one per agent).
pub struct Telemetry {
    standard: standard::Standard,
    window: window::Window,
}

impl Telemetry {
    pub fn new(config: Arc<ConfigStore>, trust_domain: &str) -> Telemetry {
        Telemetry {
            standard: standard::Standard::new(config, trust_domain),
            window: window::Window::new(Instant::now()),
        }
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

    pub fn record_connection(&self, done: &ConnectionDone) {
        self.standard.record_connection(done);
    }

    /// The whole exposition: Istio's metrics, then the agent's health.
    pub fn exposition(&self, health: &Health) -> String {
        let mut out = String::with_capacity(64 * 1024);
        self.standard.write(&mut out);
        health.write(&mut out);
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
