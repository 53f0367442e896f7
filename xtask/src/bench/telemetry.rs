//! The telemetry phases: the headline L7 + mTLS run again under a
//! mesh-wide Istio `Telemetry` resource, so that the difference is what a
//! telemetry setting costs each request (issue target: metrics on cost at
//! most 10 % more agent CPU than metrics off) or tracing every request
//! rather than Istio's default 1 %.

use anyhow::{bail, Context, Result};
use nodemesh_testbed::{Agent, Topology};

/// The config file the `Telemetry` resource is written to.
pub(super) const FILE: &str = "telemetry.yaml";

/// The root namespace the agents are started with (Istio's default).
const ROOT_NAMESPACE: &str = "istio-system";

/// A mesh-wide telemetry setting measured against the default (Istio's
/// metrics on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Setting {
    /// Every Istio metric disabled (`overrides: [{match: {metric:
    /// ALL_METRICS}, disabled: true}]`).
    MetricsOff,
    /// Every request traced (`randomSamplingPercentage: 100`), the spans
    /// exported to the bench's OTLP receiver (1 % by default).
    TraceAll,
}

impl Setting {
    pub(super) fn label(self) -> &'static str {
        match self {
            Setting::MetricsOff => "metrics off",
            Setting::TraceAll => "tracing at 100 %",
        }
    }

    /// The `Telemetry` resource of this setting.
    pub(super) fn yaml(self) -> String {
        let spec = match self {
            Setting::MetricsOff => {
                "  metrics:\n  - overrides:\n    - match: {metric: ALL_METRICS}\n      disabled: true\n"
            }
            Setting::TraceAll => "  tracing:\n  - randomSamplingPercentage: 100\n",
        };
        format!(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: mesh-default\n  \
             namespace: {ROOT_NAMESPACE}\nspec:\n{spec}"
        )
    }

    /// Whether the agents apply the setting, given what the bench observed
    /// (requests in `istio_requests_total`, or spans received) before and
    /// after [`CHECK_REQUESTS`] requests made under it.
    pub(super) fn applied(self, before: u64, after: u64) -> bool {
        match self {
            Setting::MetricsOff => after == before,
            // A client and a server span per request.
            Setting::TraceAll => after >= before + 2 * CHECK_REQUESTS,
        }
    }

    /// [`Setting::applied`], as an error that says what was observed.
    pub(super) fn check(self, before: u64, after: u64) -> Result<()> {
        if self.applied(before, after) {
            return Ok(());
        }
        match self {
            Setting::MetricsOff => bail!(
                "with Istio's metrics disabled by a Telemetry resource, the agents still \
                 counted requests ({before} before {CHECK_REQUESTS} requests, {after} after)"
            ),
            Setting::TraceAll => bail!(
                "with every request traced by a Telemetry resource, the OTLP receiver got \
                 {} spans for {CHECK_REQUESTS} requests (want 2 each)",
                after - before
            ),
        }
    }
}

/// Settings measured, in order.
pub(super) const SETTINGS: [Setting; 2] = [Setting::MetricsOff, Setting::TraceAll];

/// Requests made to check that a setting applies.
pub(super) const CHECK_REQUESTS: u64 = 5;

/// How long spans get to reach the receiver (the agents export every second).
pub(super) const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `agent`'s `/metrics`, fetched from node-a's network namespace.
fn scrape(topo: &Topology, agent: &Agent) -> Result<String> {
    let from = topo.node("node-a").netns.clone();
    let url = format!("http://{}:15020/metrics", topo.node(agent.node()).address);
    topo.run_in_ok(&from, &["curl", "-sS", "--max-time", "5", &url])
        .with_context(|| format!("scraping {url}"))
}

/// Requests the agents counted in `istio_requests_total` (both reporters).
pub(super) fn requests_reported(topo: &Topology, agents: &[Agent]) -> Result<u64> {
    let mut total = 0.0;
    for agent in agents {
        total += scrape(topo, agent)?
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total as u64)
}

/// Each agent's span counters (`nodemesh_trace_*`: exported, dropped and
/// why, failed exports), to say where the spans of a failed check went.
pub(super) fn trace_counters(topo: &Topology, agents: &[Agent]) -> String {
    let per_agent = agents.iter().map(|agent| {
        let counters = match scrape(topo, agent) {
            Ok(exposition) => exposition
                .lines()
                .filter(|l| l.starts_with("nodemesh_trace_"))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("{e:#}"),
        };
        format!("{}: {counters}", agent.node())
    });
    per_agent.collect::<Vec<_>>().join("; ")
}
