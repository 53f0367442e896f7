//! The VirtualService of the L7 phases, and the checks that the requests
//! measured really took its last route.
//!
//! Istio's routes are tried in order and the first match wins, so the
//! worst case for a route table of N entries is a request that only the
//! last one matches: every earlier `uri` is compared and rejected first.
//! Measuring that case with 10 and with 10 000 routes bounds what the size
//! of a table costs each request. A bench that got 404s (no route matched)
//! would measure the proxy's local reply instead of a forwarded request,
//! hence [`check_response`] and [`check_table`].

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use nodemesh_testbed::{Agent, Topology};
use serde_json::Value;

use super::probe::Probe;

/// The path of every bench request (nginx answers any path alike).
pub(super) const PATH: &str = "/bench";

/// Set on responses by the last route only, to the size of its table: a
/// response carrying it was routed by that route of that table.
pub(super) const ROUTE_HEADER: &str = "x-bench-routes";

/// A VirtualService for `service` whose `routes` routes all forward to it;
/// a request for [`PATH`] matches only the last.
pub(super) fn virtual_service(namespace: &str, service: &str, routes: usize) -> String {
    let mut out = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  \
         name: {service}\n  namespace: {namespace}\nspec:\n  hosts: [{service}]\n  http:\n"
    );
    // Flow style keeps 10 000 routes near 700 KB of YAML.
    let forward = format!("    route: [{{destination: {{host: {service}}}}}]\n");
    for i in 0..routes.saturating_sub(1) {
        let _ = writeln!(out, "  - match: [{{uri: {{exact: /r{i}}}}}]");
        out.push_str(&forward);
    }
    let _ = writeln!(
        out,
        "  - name: last\n    match: [{{uri: {{exact: {PATH}}}}}]\n    \
         headers: {{response: {{set: {{{ROUTE_HEADER}: \"{routes}\"}}}}}}"
    );
    out.push_str(&forward);
    out
}

/// One request from `netns` to `url`: it must succeed with nginx's body
/// and carry the last route's header for a table of `routes`.
pub(super) fn check_response(
    topo: &Topology,
    netns: &str,
    url: &str,
    routes: usize,
    body_size: usize,
) -> Result<()> {
    check_last_route(&Probe::get(topo, netns, url)?, url, routes, body_size)
}

/// What [`check_response`] checks, on a request already made.
pub(super) fn check_last_route(
    probe: &Probe,
    url: &str,
    routes: usize,
    body_size: usize,
) -> Result<()> {
    let want = format!("200 {body_size}");
    if probe.summary != want || probe.header(ROUTE_HEADER) != Some(routes.to_string()) {
        bail!(
            "{url} did not take the last of {routes} routes (want status and body size \
             {want:?} and `{ROUTE_HEADER}: {routes}`); got {:?}, headers:\n{}",
            probe.summary,
            probe.headers
        );
    }
    Ok(())
}

/// `nodemesh routes` on `agent` lists `routes` routes for `service`
/// (`namespace/name`), on a port it routes as HTTP. Returns the size of
/// the listing.
pub(super) fn check_table(agent: &Agent, service: &str, routes: usize) -> Result<usize> {
    let out = agent.cli(&["routes", "-o", "json"])?;
    if !out.status.success() {
        bail!(
            "`nodemesh routes -o json` on {} failed ({}): {}",
            agent.node(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let doc: Value = serde_json::from_slice(&out.stdout)
        .context("`nodemesh routes -o json` printed invalid JSON")?;
    let entry = doc["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == service))
        .with_context(|| format!("`nodemesh routes` does not list {service}"))?;
    let listed = entry["routes"].as_array().map_or(0, Vec::len);
    let http = entry["ports"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["protocol"] == "http"));
    if listed != routes || !http {
        bail!(
            "`nodemesh routes` on {} lists {listed} routes for {service} (want {routes}) \
             and its ports as {} (want one routed as http)",
            agent.node(),
            entry["ports"]
        );
    }
    Ok(out.stdout.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_route_matches_the_bench_path() {
        let vs = virtual_service("bench", "server", 3);
        let matches: Vec<&str> = vs.lines().filter(|l| l.contains("match:")).collect();
        assert_eq!(
            matches,
            [
                "  - match: [{uri: {exact: /r0}}]",
                "  - match: [{uri: {exact: /r1}}]",
                "    match: [{uri: {exact: /bench}}]",
            ]
        );
        assert_eq!(
            vs.matches("route: [{destination: {host: server}}]").count(),
            3
        );
        assert!(vs.contains("{x-bench-routes: \"3\"}"));
        assert_eq!(
            virtual_service("bench", "server", 1)
                .matches("match:")
                .count(),
            1
        );
    }
}
