//! The AuthorizationPolicy of the authorization phases: an allow-list on
//! the server of N rules, one caller each, of which the bench's client
//! matches the last, as a platform team's list of permitted callers grows.
//! With 10 and with 1 000 rules, the difference is what the size of an
//! allow-list costs each request (design: nothing measurable).

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use nodemesh_testbed::Agent;
use serde_json::Value;

use super::routes::PATH;

/// Rules in the allow-lists measured.
pub(super) const ALLOW_LISTS: [usize; 2] = [10, 1000];

/// The config file the allow-list is written to.
pub(super) const FILE: &str = "allow-list.yaml";

/// An ALLOW policy on `app: <server>` whose last of `rules` rules lets the
/// client (service account `default`) GET [`PATH`].
pub(super) fn allow_list(namespace: &str, server: &str, rules: usize) -> String {
    let mut out = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: allow-list\n  namespace: {namespace}\nspec:\n  selector:\n    matchLabels:\n      \
         app: {server}\n  action: ALLOW\n  rules:\n"
    );
    let to = format!("    to: [{{operation: {{methods: [GET], paths: [\"{PATH}\"]}}}}]\n");
    for i in 0..rules {
        let account = match i + 1 == rules {
            true => "default".to_owned(),
            false => format!("caller-{i}"),
        };
        let _ = writeln!(
            out,
            "  - from: [{{source: {{principals: [\"cluster.local/ns/{namespace}/sa/{account}\"]}}}}]"
        );
        out.push_str(&to);
    }
    out
}

/// `nodemesh policies` on `agent` shows the allow-list of `rules` rules on
/// `workload` (`namespace/name`).
pub(super) fn check_policies(agent: &Agent, workload: &str, rules: usize) -> Result<()> {
    let out = agent.cli(&["policies", "--workload", workload, "-o", "json"])?;
    let answer: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`nodemesh policies` on {}", agent.node()))?;
    let listed = answer["workloads"][0]["policies"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    if listed != rules {
        bail!(
            "`nodemesh policies` on {} lists {listed} rules for {workload}, not {rules}: {answer:#}",
            agent.node()
        );
    }
    Ok(())
}
