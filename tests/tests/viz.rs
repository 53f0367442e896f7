//! Seeing the mesh on the two-node Bookinfo, with real agents and real
//! traffic (successes, 500s and 404s from the application, and 500s of an
//! abort fault at the caller): `nodemesh stat` shows the exact counts and
//! success rates the test produced, `top` the busiest calls, `graph` the
//! calls as DOT and as an SVG that parses as XML; and every PromQL
//! expression of the Grafana dashboards in `deploy/grafana` returns data
//! from a real Prometheus scraping both agents.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nodemesh_testbed::mesh::{count_by, Mesh, CLIENT};
use nodemesh_testbed::prometheus::Prometheus;
use nodemesh_testbed::workload_apps::python3;
use serde_json::Value;

const PRODUCTPAGE: &str = "http://productpage:9080/productpage";
const PAGES: usize = 20;
const SERVER_ERRORS: usize = 10;
const NOT_FOUND: usize = 5;
const ABORTED: usize = 4;
const ABORT: &str =
    include_str!("../../deploy/examples/bookinfo/virtual-service-ratings-test-abort.yaml");
/// How long the agents may take to count what the client saw answered.
const COUNTED_TIMEOUT: Duration = Duration::from_secs(15);

fn bookinfo_and_echo() -> Mesh {
    let mut mesh = Mesh::new(Path::new(env!("CARGO_BIN_EXE_mesh-app"))).unwrap();
    mesh.bookinfo().unwrap();
    mesh.tcp_echo("node-b", "echo", &[("version", "v1")], 7000)
        .unwrap();
    mesh.start(&[]).unwrap();
    mesh
}

/// The client's calls: pages, 500s and 404s from details, and jason's
/// calls to ratings aborted by the fault at the client's agent.
fn traffic(mesh: &Mesh) {
    let pages = mesh.get_many(CLIENT, PRODUCTPAGE, PAGES, &[]).unwrap();
    assert!(pages.iter().all(|r| r.status == 200), "{pages:?}");
    for (code, n) in [(500, SERVER_ERRORS), (404, NOT_FOUND)] {
        let url = format!("http://details:9080/status/{code}");
        let replies = mesh.get_many(CLIENT, &url, n, &[]).unwrap();
        let statuses = count_by(&replies, |r| r.status.to_string());
        assert_eq!(statuses, [(code.to_string(), n as u64)].into());
    }
    mesh.apply("ratings-abort.yaml", ABORT).unwrap();
    let jason = ["-H", "end-user: jason"];
    let aborted = mesh
        .get_many(CLIENT, "http://ratings:9080/ratings/0", ABORTED, &jason)
        .unwrap();
    assert!(aborted.iter().all(|r| r.status == 500), "{aborted:?}");
}

/// Runs `nodemesh ARGS` against both agents; its standard output.
fn nodemesh(mesh: &Mesh, args: &[&str]) -> String {
    let mut cmd = Command::new(nodemesh_testbed::nodemesh_bin());
    cmd.args(args);
    for node in ["node-a", "node-b"] {
        cmd.arg("--socket").arg(mesh.agent(node).socket());
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nodemesh {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `nodemesh stat ARGS -o json`'s rows by name: (requests, failures,
/// success rate).
fn stat(mesh: &Mesh, args: &[&str]) -> BTreeMap<String, (u64, u64, f64)> {
    let mut all = vec!["stat", "-o", "json"];
    all.extend(args);
    let answer: Value = serde_json::from_str(&nodemesh(mesh, &all)).unwrap();
    let rows = answer["rows"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .map(|r| {
            let name = format!(
                "{}/{}",
                r["namespace"].as_str().unwrap(),
                r["name"].as_str().unwrap()
            );
            let counts = (
                r["requests"].as_u64().unwrap(),
                r["failures"].as_u64().unwrap(),
                r["success_rate"].as_f64().unwrap_or(f64::NAN),
            );
            (name, counts)
        })
        .collect()
}

/// Polls `stat ARGS` until the row `name` counts `requests`; returns all rows.
fn stat_counted(
    mesh: &Mesh,
    args: &[&str],
    name: &str,
    requests: u64,
) -> BTreeMap<String, (u64, u64, f64)> {
    let deadline = Instant::now() + COUNTED_TIMEOUT;
    loop {
        let rows = stat(mesh, args);
        let got = rows.get(name).map(|r| r.0);
        if got == Some(requests) || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn stat_top_and_graph_show_the_calls_the_test_made() {
    let mesh = bookinfo_and_echo();
    traffic(&mesh);

    // Inbound, per workload: what each destination served.
    let details_served = (PAGES + SERVER_ERRORS + NOT_FOUND) as u64;
    let rows = stat_counted(&mesh, &[], "default/details-v1", details_served);
    let details = rows["default/details-v1"];
    assert_eq!(
        (details.0, details.1),
        (details_served, SERVER_ERRORS as u64),
        "{rows:?}"
    );
    let expected_rate = 1.0 - SERVER_ERRORS as f64 / details_served as f64;
    assert!((details.2 - expected_rate).abs() < 1e-9, "{rows:?}");
    assert_eq!(
        rows["default/productpage-v1"],
        (PAGES as u64, 0, 1.0),
        "{rows:?}"
    );
    let reviews: u64 = rows
        .iter()
        .filter(|(name, _)| name.starts_with("default/reviews-"))
        .map(|(_, r)| r.0)
        .sum();
    assert_eq!(reviews, PAGES as u64, "{rows:?}");
    // Aborted calls never reached ratings from the client.
    let table = nodemesh(&mesh, &["stat", "-n", "default"]);
    let line = table
        .lines()
        .find(|l| l.contains("details-v1"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains(&format!("{:.2}%", expected_rate * 100.0)),
        "{table}"
    );
    assert!(table.starts_with("NAMESPACE"), "{table}");

    // Outbound from the client, per Service: its agent saw the aborts.
    let from_client = stat_counted(
        &mesh,
        &["service", "--from", "client"],
        "default/ratings",
        ABORTED as u64,
    );
    let expected = [
        (
            "default/details",
            (SERVER_ERRORS + NOT_FOUND, SERVER_ERRORS),
        ),
        ("default/productpage", (PAGES, 0)),
        ("default/ratings", (ABORTED, ABORTED)),
    ];
    for (name, (requests, failures)) in expected {
        let row = from_client
            .get(name)
            .unwrap_or_else(|| panic!("{name}: {from_client:?}"));
        assert_eq!(
            (row.0, row.1),
            (requests as u64, failures as u64),
            "{from_client:?}"
        );
    }
    // Who called details.
    let callers = stat(&mesh, &["--to", "details-v1"]);
    assert_eq!(
        callers["default/client"].0,
        (SERVER_ERRORS + NOT_FOUND) as u64
    );
    assert_eq!(callers["default/productpage-v1"].0, PAGES as u64);

    // The graph, as DOT: an edge per caller and callee.
    let dot = nodemesh(&mesh, &["graph", "-o", "dot"]);
    let calls = [
        ("default/client", "default/productpage-v1"),
        ("default/productpage-v1", "default/details-v1"),
        ("default/client", "default/details-v1"),
        ("default/client", "default/ratings (service)"),
    ];
    for (from, to) in calls {
        assert!(
            dot.contains(&format!("\"{from}\" -> \"{to}\" [label=")),
            "{from} -> {to}:\n{dot}"
        );
    }
    assert!(dot.starts_with("digraph mesh {"), "{dot}");

    // As SVG, written to a file: valid XML with a box per workload and an
    // arrow per call.
    let svg = mesh.topo().work_dir().join("graph.svg");
    let svg_arg = svg.to_string_lossy().into_owned();
    nodemesh(&mesh, &["graph", "-o", "svg", "--output", &svg_arg]);
    let (nodes, edges) = svg_titles(&mesh, &svg);
    for workload in [
        "client",
        "productpage-v1",
        "details-v1",
        "ratings (service)",
    ] {
        let name = format!("default/{workload}");
        assert!(nodes.contains(&name), "no node {name} in {nodes:?}");
    }
    for (from, to) in calls {
        let title = format!("{from} -> {to}");
        assert!(edges.contains(&title), "no edge {title} in {edges:?}");
    }

    // top: one frame of the busiest calls.
    let top = nodemesh(&mesh, &["top", "--once", "--window", "1m"]);
    let row = top
        .lines()
        .find(|l| l.starts_with("default/client") && l.contains("default/details-v1"))
        .unwrap_or_else(|| panic!("{top}"));
    let success = 1.0 - SERVER_ERRORS as f64 / (SERVER_ERRORS + NOT_FOUND) as f64;
    assert!(row.contains(&format!("{:.2}%", success * 100.0)), "{top}");
}

/// Parses `svg` with Python's XML parser; the titles of its node and edge
/// groups.
fn svg_titles(mesh: &Mesh, svg: &Path) -> (Vec<String>, Vec<String>) {
    const PARSE: &str = r#"
import json, sys, xml.etree.ElementTree as ET
ns = {"s": "http://www.w3.org/2000/svg"}
root = ET.parse(sys.argv[1]).getroot()
titles = lambda kind: [g.find("s:title", ns).text for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == kind]
print(json.dumps([titles("node"), titles("edge")]))
"#;
    let path = svg.to_string_lossy().into_owned();
    let netns = mesh.topo().node("node-a").netns.clone();
    let out = mesh
        .topo()
        .run_in_ok(&netns, &[python3(), "-c", PARSE, &path])
        .unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Test values of the dashboards' variables. An expression passes when it
/// returns data for one of them: HTTP panels for productpage, inbound TCP
/// ones for the echo Service, outbound TCP ones for the client.
const BINDINGS: [&[(&str, &str)]; 3] = [
    &[
        ("namespace", "default"),
        ("workload", "productpage-v1"),
        ("service", "productpage"),
        ("node", ".+"),
    ],
    &[
        ("namespace", "default"),
        ("workload", "echo"),
        ("service", "echo"),
        ("node", ".+"),
    ],
    &[
        ("namespace", "default"),
        ("workload", "client"),
        ("service", "details"),
        ("node", ".+"),
    ],
];

/// Every PromQL expression of a dashboard: panels' targets (rows'
/// nested panels too) and query variables (`label_values(m, l)` as
/// `group by (l) (m)`), with a name to report it by.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let title = dashboard["title"].as_str().unwrap_or("?").to_owned();
    let mut found = Vec::new();
    let mut panels: Vec<Value> = dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let name = format!("{title} / {}", panel["title"].as_str().unwrap_or("?"));
                found.push((name, expr.to_owned()));
            }
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(query) = var["query"]["query"].as_str().or(var["query"].as_str()) else {
            continue;
        };
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            let (metric, label) = args.rsplit_once(',').unwrap();
            let expr = format!("group by ({}) ({metric})", label.trim());
            found.push((format!("{title} / variable {}", var["name"]), expr));
        }
    }
    found
}

fn bind(expr: &str, values: &[(&str, &str)]) -> String {
    values.iter().fold(expr.to_owned(), |e, (name, value)| {
        e.replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value)
    })
}

#[test]
fn every_dashboard_expression_returns_data_from_both_agents() {
    let mut mesh = bookinfo_and_echo();
    let prometheus = Prometheus::scrape_mesh(&mut mesh).unwrap();
    traffic(&mesh);
    // TCP through both agents: the client to the echo Service.
    const TCP: &str = "import socket; s = socket.create_connection(('echo', 7000), timeout=10); \
        s.sendall(b'x' * 5000); s.shutdown(socket.SHUT_WR); \
        print(sum(iter(lambda: len(s.recv(65536)), 0)))";
    let client = mesh.topo().pod(CLIENT).netns.clone();
    let echoed = mesh
        .topo()
        .run_in_ok(&client, &[python3(), "-c", TCP])
        .unwrap();
    assert_eq!(echoed.trim(), "5000");

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let titles: Vec<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(titles, ["agent", "mesh", "service", "workload"]);
    let mut checked = 0;
    let mut empty = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let dashboard: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (name, expr) in expressions(&dashboard) {
            checked += 1;
            // Rates need two scrapes after the traffic: wait for data.
            let deadline = Instant::now() + Duration::from_secs(20);
            let has_data = loop {
                let mut any = false;
                for values in BINDINGS {
                    let promql = bind(&expr, values);
                    assert!(
                        !promql.contains('$'),
                        "{name}: unbound variable in {promql}"
                    );
                    any |= !prometheus
                        .query_series(mesh.topo(), &promql)
                        .unwrap()
                        .is_empty();
                }
                if any || Instant::now() > deadline {
                    break any;
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            if !has_data {
                empty.push(format!("{name}: {expr}"));
            }
        }
    }
    assert!(checked > 40, "only {checked} expressions found");
    assert!(empty.is_empty(), "no data for:\n{}", empty.join("\n"));
}
