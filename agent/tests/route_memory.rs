//! What a compiled route costs in memory: heap bytes held by a loaded
//! configuration per route of a VirtualService, counted by the allocator of
//! `counting`. The bound is 1 KB per route (it was about 11 KB); the
//! figures are printed, run with `--nocapture`. Everything runs in one test
//! (the counter counts the test's own thread).

mod counting;

use std::fmt::Write as _;
use std::path::PathBuf;

use counting::live_bytes;
use nodemesh::config::{Config, LoadOptions};

/// The bound on a compiled route.
const ROUTE_BUDGET: isize = 1024;
/// Routes of the large table: the bench's 10 000-route mode.
const ROUTES: usize = 10_000;

const SERVICES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-canary, namespace: shop}
spec: {selector: {app: web, track: canary}, ports: [{name: http, port: 9080}]}
";

/// A VirtualService for `web` of `routes` routes, route `i` written by `route(i)`.
fn virtual_service(routes: usize, route: fn(usize) -> String) -> String {
    let mut out = String::from(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: \
         {name: web, namespace: shop}\nspec:\n  hosts: [web]\n  http:\n",
    );
    for i in 0..routes {
        let _ = writeln!(out, "{}", route(i));
    }
    out
}

/// A route as the bench writes them: one exact path, to one Service.
fn exact_path_route(i: usize) -> String {
    format!("  - match: [{{uri: {{exact: /r{i}}}}}]\n    route: [{{destination: {{host: web}}}}]")
}

/// A route as real ones look: a prefix, a header regex that many routes
/// share, a weighted split, a timeout, retries and a header edit.
fn rich_route(i: usize) -> String {
    format!(
        "  - name: route-{i}\n    match: [{{uri: {{prefix: /api/v{i}/}}, \
         headers: {{x-user: {{regex: \"user-[0-9]+\"}}}}}}]\n    \
         route: [{{destination: {{host: web}}, weight: 90}}, \
         {{destination: {{host: web-canary}}, weight: 10}}]\n    \
         timeout: 5s\n    retries: {{attempts: 3, retryOn: 5xx}}\n    \
         headers: {{request: {{set: {{x-route: r{i}}}}}}}"
    )
}

/// Live heap bytes of a loaded configuration holding `routes`: the loaded
/// `Config`, and the routing table alone (a clone of it).
fn held_by(routes: &str) -> (isize, isize) {
    let files = [
        (PathBuf::from("services.yaml"), SERVICES.to_owned()),
        (PathBuf::from("routes.yaml"), routes.to_owned()),
    ];
    let before = live_bytes();
    let config = Config::load_documents(&files, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("the routes do not load: {e}"));
    let config_bytes = live_bytes() - before;
    let before = live_bytes();
    let table = config.routing().clone();
    let table_bytes = live_bytes() - before;
    drop(table);
    drop(config);
    (config_bytes, table_bytes)
}

/// Bytes per route between a table of one route and one of [`ROUTES`].
fn per_route(kind: &str, route: fn(usize) -> String) -> isize {
    let (small_config, small_table) = held_by(&virtual_service(1, route));
    let (large_config, large_table) = held_by(&virtual_service(ROUTES, route));
    let added = ROUTES as isize - 1;
    let config = (large_config - small_config) / added;
    let table = (large_table - small_table) / added;
    eprintln!(
        "{kind}: {config} bytes per route held by the loaded config, {table} by its routing \
         table ({ROUTES} routes: {} KB)",
        large_config / 1024
    );
    config
}

#[test]
fn a_compiled_route_costs_at_most_a_kilobyte() {
    let exact = per_route("exact path routes", exact_path_route);
    let rich = per_route(
        "routes with prefix, shared header regex, split, retries, header edit",
        rich_route,
    );
    assert!(
        exact <= ROUTE_BUDGET && rich <= ROUTE_BUDGET,
        "a compiled route costs {exact} bytes (exact path) and {rich} bytes (rich); \
         the budget is {ROUTE_BUDGET}"
    );
}
