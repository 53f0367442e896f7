//! Seeing the mesh from the CLI: `nodemesh stat`, `top` and `graph`, from
//! the agents' windowed per-edge counts (`telemetry::window`), asked over
//! their admin sockets. Several agents (all of this host's by default) are
//! merged: each call is counted once per reporter, so views pick one.
//!
//! - `quantile`: Prometheus' `histogram_quantile`.
//! - `stat`: success rate, rate and latency per workload or Service.
//! - `graph`: who calls whom, as a table or Graphviz DOT; `svg`: drawn.
//! - `top`: the busiest edges, refreshed.

pub mod graph;
pub mod quantile;
pub mod stat;
pub mod svg;
pub mod top;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::admin::{self, AdminError, Query};
use crate::telemetry::window::EdgeStats;

/// One edge's counts over a window, as an agent answers them.
#[derive(Debug, Clone, Deserialize)]
pub struct Edge {
    #[serde(flatten)]
    pub stats: EdgeStats,
    /// Seconds the window of the agent that answered covered.
    #[serde(default)]
    pub seconds: f64,
}

impl std::ops::Deref for Edge {
    type Target = EdgeStats;

    fn deref(&self) -> &EdgeStats {
        &self.stats
    }
}

impl Edge {
    pub fn by_source(&self) -> bool {
        self.reporter == "source"
    }
}

/// What several agents answered.
pub struct Edges {
    pub edges: Vec<Edge>,
    /// Upper bounds of the finite duration buckets, in milliseconds.
    pub bounds: Vec<f64>,
    /// The longest window the agents covered.
    pub seconds: f64,
}

#[derive(Deserialize)]
struct Answer {
    window_seconds: f64,
    duration_ms_bounds: Vec<f64>,
    edges: Vec<Edge>,
}

#[derive(Debug, thiserror::Error)]
pub enum VizError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("the agent behind {socket} answered: {error}")]
    Agent { socket: PathBuf, error: String },
    #[error("no nodemesh agent is running here: no socket in {dir}. Point at one with --socket")]
    NoAgent { dir: &'static str },
}

/// The sockets to ask: those given, the nodes' named, or all of this host's.
pub fn sockets(sockets: Vec<PathBuf>, nodes: &[String]) -> Result<Vec<PathBuf>, VizError> {
    let mut all = sockets;
    for node in nodes {
        all.push(admin::locate(None, Some(node))?);
    }
    if all.is_empty() {
        all = admin::sockets_here();
    }
    if all.is_empty() {
        return Err(VizError::NoAgent {
            dir: admin::SOCKET_DIR,
        });
    }
    Ok(all)
}

/// Asks every agent for its edges over the last `window`.
pub fn fetch(sockets: &[PathBuf], window: Duration) -> Result<Edges, VizError> {
    let mut all = Edges {
        edges: Vec::new(),
        bounds: Vec::new(),
        seconds: 0.0,
    };
    for socket in sockets {
        let answer = admin::query(socket, Query::Stats(window.as_secs()))?;
        if let Some(error) = answer.get("error") {
            return Err(VizError::Agent {
                socket: socket.clone(),
                error: crate::cli::text(error),
            });
        }
        let answer: Answer = serde_json::from_value(answer)
            .map_err(|e| AdminError::Protocol(format!("stats: {e}")))?;
        all.seconds = all.seconds.max(answer.window_seconds);
        all.bounds = answer.duration_ms_bounds;
        all.edges.extend(answer.edges.into_iter().map(|mut e| {
            e.seconds = answer.window_seconds;
            e
        }));
    }
    Ok(all)
}

/// Counts summed over edges, and what `stat`, `top` and `graph` show.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub requests: u64,
    /// Requests answered 5xx (Istio's dashboards' failures).
    pub failures: u64,
    pub rps: f64,
    pub buckets: Vec<u64>,
    pub tcp_connections: u64,
}

/// [`Summary`] as `-o json` prints it.
#[derive(Debug, Serialize)]
pub struct Figures {
    pub requests: u64,
    pub failures: u64,
    pub success_rate: Option<f64>,
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub tcp_connections: u64,
}

impl Summary {
    pub fn add(&mut self, edge: &Edge) {
        let t = &edge.totals;
        self.requests += t.requests;
        self.failures += t.classes[5];
        if edge.seconds > 0.0 {
            self.rps += t.requests as f64 / edge.seconds;
        }
        if self.buckets.len() < t.duration_ms.len() {
            self.buckets.resize(t.duration_ms.len(), 0);
        }
        for (sum, n) in self.buckets.iter_mut().zip(&t.duration_ms) {
            *sum += n;
        }
        self.tcp_connections += t.tcp_opened.max(t.tcp_closed);
    }

    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| 1.0 - self.failures as f64 / self.requests as f64)
    }

    pub fn quantile(&self, q: f64, bounds: &[f64]) -> Option<f64> {
        quantile::histogram_quantile(q, bounds, &self.buckets)
    }

    pub fn figures(&self, bounds: &[f64]) -> Figures {
        Figures {
            requests: self.requests,
            failures: self.failures,
            success_rate: self.success_rate(),
            rps: self.rps,
            p50_ms: self.quantile(0.5, bounds),
            p95_ms: self.quantile(0.95, bounds),
            p99_ms: self.quantile(0.99, bounds),
            tcp_connections: self.tcp_connections,
        }
    }
}

/// Headers of [`Figures::cells`].
pub const FIGURE_HEADERS: [&str; 7] = [
    "SUCCESS",
    "RPS",
    "LATENCY_P50",
    "LATENCY_P95",
    "LATENCY_P99",
    "TCP_CONN",
    "REQUESTS",
];

impl Figures {
    /// The table cells under [`FIGURE_HEADERS`].
    pub fn cells(&self) -> Vec<String> {
        vec![
            percent(self.success_rate),
            rate(self.rps),
            millis(self.p50_ms),
            millis(self.p95_ms),
            millis(self.p99_ms),
            self.tcp_connections.to_string(),
            self.requests.to_string(),
        ]
    }
}

/// `95.00%`, or `-` without requests.
pub fn percent(rate: Option<f64>) -> String {
    rate.map_or("-".into(), |r| format!("{:.2}%", r * 100.0))
}

/// `12ms`, `0.7ms`, or `-`.
pub fn millis(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.0}ms"),
    }
}

pub fn rate(rps: f64) -> String {
    format!("{rps:.1}rps")
}

/// `namespace/name`, or `unknown`.
pub fn qualified(namespace: &str, name: &str) -> String {
    if name.is_empty() || name == "unknown" {
        "unknown".into()
    } else {
        format!("{namespace}/{name}")
    }
}
