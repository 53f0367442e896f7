//! The telemetry phases: the headline L7 + mTLS run again under a
//! mesh-wide Istio `Telemetry` resource, so that the difference is what a
//! telemetry setting costs each request (issue target: metrics on cost at
//! most 10 % more agent CPU than metrics off).

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
}

impl Setting {
    pub(super) fn label(self) -> &'static str {
        match self {
            Setting::MetricsOff => "metrics off",
        }
    }

    /// The `Telemetry` resource of this setting.
    pub(super) fn yaml(self) -> String {
        let spec = match self {
            Setting::MetricsOff => {
                "  metrics:\n  - overrides:\n    - match: {metric: ALL_METRICS}\n      disabled: true\n"
            }
        };
        format!(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: mesh-default\n  \
             namespace: {ROOT_NAMESPACE}\nspec:\n{spec}"
        )
    }

    /// Checks that `agents` apply the setting, given the number of
    /// requests they reported before and after a request made under it.
    pub(super) fn check(self, agents: &[Agent], before: u64, after: u64) -> Result<()> {
        match self {
            Setting::MetricsOff if after != before => bail!(
                "with Istio's metrics disabled by a Telemetry resource, the agents ({}) still \
                 counted requests ({before} before a request, {after} after)",
                agents
                    .iter()
                    .map(Agent::node)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Setting::MetricsOff => Ok(()),
        }
    }
}

/// Settings measured, in order.
pub(super) const SETTINGS: [Setting; 1] = [Setting::MetricsOff];

/// Requests the agents counted in `istio_requests_total` (both reporters),
/// from their `/metrics`, fetched from node-a's network namespace.
pub(super) fn requests_reported(topo: &Topology, agents: &[Agent]) -> Result<u64> {
    let from = topo.node("node-a").netns.clone();
    let mut total = 0.0;
    for agent in agents {
        let url = format!("http://{}:15020/metrics", topo.node(agent.node()).address);
        let exposition = topo
            .run_in_ok(&from, &["curl", "-sS", "--max-time", "5", &url])
            .with_context(|| format!("scraping {url}"))?;
        total += exposition
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total as u64)
}
