//! Telemetry on the two-node Bookinfo: a real Prometheus (Debian's) scrapes
//! both agents' `/metrics`, and PromQL gets the counts the test produced,
//! from the caller's agent (`reporter="source"`) and the destination's
//! (`reporter="destination"`), with Istio's names and labels; `promtool`
//! checks the exposition.

use std::path::Path;

use nodemesh_testbed::config::ServicePort;
use nodemesh_testbed::mesh::{bookinfo_example, count_by, replace_object, Mesh, CLIENT};
use nodemesh_testbed::prometheus::Prometheus;
use nodemesh_testbed::workload_apps::python3;

const PRODUCTPAGE: &str = "http://productpage:9080/productpage";
const RATINGS: &str = "http://ratings:9080/ratings/0";
const JASON: &[&str] = &["-H", "end-user: jason"];
/// Bytes sent on each TCP connection to the echo server.
const TCP_SIZES: [usize; 3] = [1_000, 20_000, 300_000];

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

/// Sends each size's bytes on a connection of its own to `host:port`,
/// half-closes, reads the echo to its end; prints the bytes echoed.
const TCP_CLIENT_PY: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
total = 0
for size in map(int, sys.argv[3:]):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"x" * size)
    s.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    s.close()
    assert got == size, (got, size)
    total += got
print(total)
"#;

/// Opens one connection, checks that it is echoed and holds it open until
/// stopped.
const TCP_HOLD_PY: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"x")
assert s.recv(1) == b"x"
time.sleep(600)
"#;

/// Connects to `host:port`, sends a byte, and prints how the connection
/// ended: `closed` (reset or closed without a byte back) or `answered`.
const TCP_PROBE_PY: &str = r#"
import socket, sys
try:
    # The agent may reset the connection before connect() has even
    # returned here: that is the same outcome, the caller sees it closed.
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.sendall(b"x")
    print("answered" if s.recv(1) else "closed")
except ConnectionResetError:
    print("closed")
"#;

/// Bookinfo plus a TCP echo Service, a TCP Service without endpoints, both
/// agents, and Prometheus in node-a's namespace scraping them.
fn mesh_with_prometheus() -> (Mesh, Prometheus) {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.bookinfo().unwrap();
    mesh.tcp_echo("node-b", "echo", &[("version", "v1")], 7000)
        .unwrap();
    mesh.service(
        "vacant",
        &[ServicePort {
            name: "tcp-vacant",
            port: 7100,
            target_port: 7100,
        }],
    );
    mesh.start(&[]).unwrap();
    let prometheus = Prometheus::scrape_mesh(&mut mesh).unwrap();
    (mesh, prometheus)
}

/// Asserts that `promql` reaches `expected`; on failure, shows every
/// series of the metric it queries.
#[track_caller]
fn assert_query(mesh: &Mesh, prometheus: &Prometheus, promql: &str, expected: f64) {
    let got = prometheus.wait_for(mesh.topo(), promql, expected).unwrap();
    if got != Some(expected) {
        let start = promql
            .find("istio_")
            .or(promql.find("nodemesh_"))
            .unwrap_or(0);
        let metric: String = promql[start..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let series = prometheus.query_series(mesh.topo(), &metric).unwrap();
        panic!("{promql}: {got:?}, expected {expected}; series of {metric}: {series:#?}");
    }
}

#[test]
fn prometheus_counts_routed_requests_faults_and_tcp_bytes_from_both_agents() {
    let (mut mesh, prometheus) = mesh_with_prometheus();
    let q = |promql: &str, expected: f64| assert_query(&mesh, &prometheus, promql, expected);

    // Istio's request-routing task: jason's requests go to reviews v2.
    let all_v1 = bookinfo_example("virtual-service-all-v1");
    let routed = replace_object(
        &all_v1,
        "reviews",
        &bookinfo_example("virtual-service-reviews-test-v2"),
    );
    mesh.apply("virtual-service-all-v1.yaml", &routed).unwrap();
    let pages = mesh.get_many(CLIENT, PRODUCTPAGE, 100, JASON).unwrap();
    let statuses = count_by(&pages, |r| r.status.to_string());
    assert_eq!(statuses, [("200".to_owned(), 100)].into(), "{pages:?}");

    // The issue's example, as the destination's agent reports it.
    q(
        r#"sum(istio_requests_total{reporter="destination",destination_version="v2"})"#,
        100.0,
    );
    // The caller's agent reports the same calls, with Istio's labels.
    q(
        r#"sum(istio_requests_total{reporter="source",source_workload="productpage-v1",
            source_app="productpage",source_version="v1",destination_workload="reviews-v2",
            destination_service="reviews.default.svc.cluster.local",destination_service_name="reviews",
            destination_canonical_service="reviews",destination_canonical_revision="v2",
            request_protocol="http",response_code="200",response_flags="-",
            connection_security_policy="unknown"})"#,
        100.0,
    );
    // The destination authenticated the caller over mutual TLS (node-a to
    // node-b) and knows its principal.
    q(
        r#"sum(istio_requests_total{reporter="destination",source_workload="productpage-v1",
            source_principal="spiffe://cluster.local/ns/default/sa/default",
            destination_workload="reviews-v2",destination_workload_namespace="default",
            destination_service_name="reviews",connection_security_policy="mutual_tls"})"#,
        100.0,
    );
    // reviews v2 called ratings on its own node for each page.
    q(
        r#"sum(istio_requests_total{reporter="destination",source_workload="reviews-v2",
            destination_workload="ratings-v1",connection_security_policy="mutual_tls"})"#,
        100.0,
    );
    // Histograms: one observation per request, in Istio's buckets.
    q(
        r#"sum(istio_request_duration_milliseconds_count{reporter="destination",destination_version="v2"})"#,
        100.0,
    );
    q(
        r#"sum(istio_request_duration_milliseconds_bucket{reporter="destination",destination_version="v2",le="+Inf"})"#,
        100.0,
    );
    q(
        r#"count(istio_response_bytes_sum{reporter="source",destination_workload="reviews-v2"} > 0)"#,
        1.0,
    );

    // Istio's abort fault: jason's calls to ratings get a 500 from the
    // caller's agent, flagged FI, and never reach the destination.
    let abort = bookinfo_example("virtual-service-ratings-test-abort");
    let aborting = replace_object(&routed, "ratings", &abort);
    mesh.apply("virtual-service-all-v1.yaml", &aborting)
        .unwrap();
    let aborted = mesh.get_many(CLIENT, RATINGS, 20, JASON).unwrap();
    assert!(aborted.iter().all(|r| r.status == 500), "{aborted:?}");
    q(
        r#"sum(istio_requests_total{reporter="source",source_workload="client",
            destination_service_name="ratings",response_code="500",response_flags="FI"})"#,
        20.0,
    );
    let reached = prometheus
        .query(
            mesh.topo(),
            r#"sum(istio_requests_total{reporter="destination",source_workload="client",destination_service_name="ratings"})"#,
        )
        .unwrap();
    assert_eq!(reached, None, "aborted requests reached a destination");

    // TCP: byte counters equal what was sent and echoed, on both sides.
    let work = mesh.topo().work_dir().to_path_buf();
    nodemesh_testbed::config::write_raw(&work, "tcp_client.py", TCP_CLIENT_PY).unwrap();
    let script = work.join("tcp_client.py").to_string_lossy().into_owned();
    let sizes: Vec<String> = TCP_SIZES.iter().map(usize::to_string).collect();
    let mut cmd = vec![python3(), script.as_str(), "echo", "7000"];
    cmd.extend(sizes.iter().map(String::as_str));
    let client_netns = mesh.topo().pod(CLIENT).netns.clone();
    let echoed = mesh.topo().run_in_ok(&client_netns, &cmd).unwrap();
    let total: usize = TCP_SIZES.iter().sum();
    assert_eq!(echoed.trim(), total.to_string());
    for reporter in ["source", "destination"] {
        let edge = format!(
            r#"reporter="{reporter}",source_workload="client",destination_workload="echo",destination_service_name="echo",request_protocol="tcp""#
        );
        for metric in [
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
        ] {
            q(&format!("sum({metric}{{{edge}}})"), total as f64);
        }
        for metric in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            q(&format!("sum({metric}{{{edge}}})"), TCP_SIZES.len() as f64);
        }
    }
    q(
        r#"sum(istio_tcp_connections_closed_total{reporter="destination",destination_workload="echo",connection_security_policy="mutual_tls"})"#,
        TCP_SIZES.len() as f64,
    );

    // A connection to a Service without endpoints is closed by the caller's
    // agent and counted with Envoy's flag for it, `UH`.
    nodemesh_testbed::config::write_raw(&work, "tcp_probe.py", TCP_PROBE_PY).unwrap();
    let probe = work.join("tcp_probe.py").to_string_lossy().into_owned();
    let ended = mesh
        .topo()
        .run_in_ok(&client_netns, &[python3(), &probe, "vacant", "7100"])
        .unwrap();
    assert_eq!(ended.trim(), "closed");
    q(
        r#"sum(istio_tcp_connections_closed_total{reporter="source",source_workload="client",destination_service_name="vacant",response_flags="UH"})"#,
        1.0,
    );

    // The agents' own health.
    q(r#"sum(nodemesh_workloads_enrolled)"#, 8.0);
    // Certificates held: default/default on both nodes, and the client's.
    q(
        r#"count(nodemesh_certificate_expiry_timestamp_seconds > time())"#,
        3.0,
    );

    // A connection that stays open counts as opened on both sides before
    // it closes, as in Istio, its bytes as they move, and as closed once
    // it does.
    nodemesh_testbed::config::write_raw(&work, "tcp_hold.py", TCP_HOLD_PY).unwrap();
    let hold = work.join("tcp_hold.py").to_string_lossy().into_owned();
    let holder = mesh
        .topo_mut()
        .spawn_in(
            &client_netns,
            &[python3(), &hold, "echo", "7000"],
            "tcp-hold",
        )
        .unwrap();
    let sized = TCP_SIZES.len() as f64;
    let count = |mesh: &Mesh, metric: &str, expected: f64| {
        let promql = format!(
            r#"sum({metric}{{source_workload="client",destination_workload="echo",request_protocol="tcp"}})"#
        );
        // Two reporters.
        assert_query(mesh, &prometheus, &promql, 2.0 * expected);
    };
    count(&mesh, "istio_tcp_connections_opened_total", sized + 1.0);
    count(&mesh, "istio_tcp_connections_closed_total", sized);
    for metric in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        count(&mesh, metric, total as f64 + 1.0);
    }
    mesh.topo_mut().stop_process(holder).unwrap();
    count(&mesh, "istio_tcp_connections_closed_total", sized + 1.0);
    count(&mesh, "istio_tcp_connections_opened_total", sized + 1.0);

    // Connections are spread over the caller's agent's two worker threads
    // (the least busy one takes the next), and each is counted on its
    // worker for as long as it lives.
    let node_a = format!(r#"instance="{}:15020""#, mesh.topo().node("node-a").address);
    let serving = format!("sum(nodemesh_proxy_worker_connections{{{node_a}}})");
    let before = prometheus.query(mesh.topo(), &serving).unwrap().unwrap();
    let holders: Vec<_> = (0..6)
        .map(|i| {
            let name = format!("tcp-hold-{i}");
            let argv = [python3(), &hold, "echo", "7000"];
            mesh.topo_mut()
                .spawn_in(&client_netns, &argv, &name)
                .unwrap()
        })
        .collect();
    count(&mesh, "istio_tcp_connections_opened_total", sized + 7.0);
    assert_query(
        &mesh,
        &prometheus,
        &format!("count(nodemesh_proxy_worker_connections{{{node_a}}} >= 3)"),
        2.0,
    );
    for holder in holders {
        mesh.topo_mut().stop_process(holder).unwrap();
    }
    count(&mesh, "istio_tcp_connections_closed_total", sized + 7.0);
    assert_query(&mesh, &prometheus, &serving, before);
}

#[test]
fn the_exposition_passes_promtool_with_istio_names() {
    let (mesh, _prometheus) = mesh_with_prometheus();
    // Some traffic, so that every Istio family has series.
    mesh.get_many(CLIENT, PRODUCTPAGE, 5, &[]).unwrap();
    let netns = mesh.topo().node("node-a").netns.clone();
    for node in ["node-a", "node-b"] {
        let url = format!("http://{}:15020/metrics", mesh.topo().node(node).address);
        let exposition = mesh
            .topo()
            .run_in_ok(&netns, &["curl", "-sS", "--max-time", "5", &url])
            .unwrap();
        assert!(
            exposition.contains("# TYPE istio_requests_total counter"),
            "{exposition}"
        );
        if node == "node-a" {
            // The client found productpage through the mesh DNS.
            let answered = exposition
                .lines()
                .find_map(|l| l.strip_prefix("nodemesh_dns_queries_total{outcome=\"answered\"} "))
                .and_then(|n| n.parse::<u64>().ok());
            assert!(answered.is_some_and(|n| n > 0), "{exposition}");
        }
        let file = mesh.topo().work_dir().join(format!("metrics-{node}.txt"));
        std::fs::write(&file, &exposition).unwrap();
        let check = format!("promtool check metrics < {}", file.display());
        let out = mesh.topo().run_in(&netns, &["sh", "-c", &check]).unwrap();
        let report = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        // promtool's only complaint is the unit Istio's names carry
        // (`_milliseconds`, not `_seconds`); the format itself parses.
        let problems: Vec<&str> = report
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !l.contains(r#"use base unit "seconds" instead of "milliseconds""#))
            .collect();
        assert!(problems.is_empty(), "{node}: {report}\n{exposition}");
    }
}
