//! Access logs on the two-node mesh: off by default; an Istio `Telemetry`
//! applied at runtime turns them on for a namespace (the caller's agent
//! logs outbound, the destination's inbound) and removing it turns them
//! off, while traffic keeps flowing; secrets sent by the caller never reach
//! a line; a TCP connection gets one line per agent.

use std::path::Path;

use serde_json::Value;

use nodemesh_testbed::mesh::{Mesh, CLIENT};
use nodemesh_testbed::workload_apps::python3;

const RATINGS: &str = "http://ratings:9080/ratings/0";
/// A query string carrying a secret: the path is logged without it.
const QUERY: &str = "?access_token=secret-query";
/// What the caller sends that must never be logged.
const SECRETS: &[&str] = &["secret-xyz", "secret-cookie", "secret-query"];
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
/// Requests per attempt to see a Telemetry change take effect.
const ATTEMPTS: usize = 20;

/// Both providers for the namespace `default`: text and JSON lines.
const NAMESPACE_LOGS: &str = "\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: logs, namespace: default}
spec:
  accessLogging:
  - providers: [{name: envoy}, {name: envoy-json}]
";

/// The echo server's own agent keeps logging its inbound connections (JSON
/// only): the marker that shows when a removed policy no longer logs.
const ECHO_LOGS: &str = "\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: echo, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  accessLogging:
  - match: {mode: SERVER}
    providers: [{name: envoy-json}]
";

/// One connection to `host:port`: sends `data`, half-closes, reads the echo.
const TCP_ONCE_PY: &str = "import socket,sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(sys.argv[3].encode()); s.shutdown(socket.SHUT_WR)
print(len(s.makefile('rb').read()))";

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

/// `ratings-v1` and a TCP echo on node-b, called from the client on node-a.
fn mesh() -> Mesh {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.app(
        "node-b",
        "ratings-v1",
        &[("app", "ratings"), ("version", "v1")],
        &[],
    )
    .unwrap();
    mesh.http_service("ratings");
    mesh.tcp_echo("node-b", "echo", &[("version", "v1")], 7000)
        .unwrap();
    mesh.start(&[]).unwrap();
    mesh
}

/// The JSON access-log lines of an agent's log.
fn json_lines(mesh: &Mesh, node: &str) -> Vec<Value> {
    mesh.agent(node)
        .log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("response_code").is_some())
        .collect()
}

/// One GET of ratings with secrets in headers and query, tagged `id`;
/// asserts it succeeds.
fn get(mesh: &Mesh, id: &str) {
    let url = format!("{RATINGS}{QUERY}");
    let reply = mesh
        .get_one(
            CLIENT,
            &url,
            &[
                "-H",
                "Authorization: Bearer secret-xyz",
                "-H",
                "Cookie: session=secret-cookie",
                "-H",
                &format!("x-request-id: {id}"),
                "-H",
                &format!("traceparent: 00-{TRACE_ID}-00f067aa0ba902b7-01"),
            ],
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
}

/// One TCP connection from the client to the echo Service, sending `data`.
fn tcp(mesh: &Mesh, data: &str) {
    let netns = mesh.topo().pod(CLIENT).netns.clone();
    let echoed = mesh
        .topo()
        .run_in_ok(
            &netns,
            &[python3(), "-c", TCP_ONCE_PY, "echo", "7000", data],
        )
        .unwrap();
    assert_eq!(echoed.trim(), data.len().to_string());
}

fn with_id<'a>(lines: &'a [Value], id: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["request_id"] == id).collect()
}

/// Requests `prefix-N` until one is logged by both agents (a Telemetry
/// applies from the next config each agent resolves); the id logged.
fn until_logged(mesh: &Mesh, prefix: &str) -> String {
    for n in 0..ATTEMPTS {
        let id = format!("{prefix}-{n}");
        get(mesh, &id);
        let logged = |node| !with_id(&json_lines(mesh, node), &id).is_empty();
        // The writer flushes once its queue is empty: wait for both lines.
        for _ in 0..50 {
            if logged("node-a") && logged("node-b") {
                return id;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    panic!("no request of {prefix} was logged by both agents");
}

#[test]
fn telemetry_turns_access_logs_on_and_off_without_secrets() {
    let mesh = mesh();
    // Off by default: no line for a request or a connection.
    get(&mesh, "before");
    tcp(&mesh, "before");
    for node in ["node-a", "node-b"] {
        assert_eq!(json_lines(&mesh, node), Vec::<Value>::new(), "{node}");
        let log = mesh.agent(node).log();
        assert!(!log.contains("\"GET /ratings/0"), "{node}: {log}");
    }

    mesh.apply("telemetry-echo.yaml", ECHO_LOGS).unwrap();
    mesh.apply("telemetry-logs.yaml", NAMESPACE_LOGS).unwrap();
    let id = until_logged(&mesh, "on");
    let (outbound, inbound) = (json_lines(&mesh, "node-a"), json_lines(&mesh, "node-b"));
    let outbound = with_id(&outbound, &id)[0].clone();
    let inbound = with_id(&inbound, &id)[0].clone();
    for (line, reporter) in [(&outbound, "source"), (&inbound, "destination")] {
        assert_eq!(line["reporter"], reporter, "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], "/ratings/0", "{line}");
        assert_eq!(line["response_code"], 200, "{line}");
        assert_eq!(line["response_flags"], "-", "{line}");
        assert_eq!(line["trace_id"], TRACE_ID, "{line}");
        assert_eq!(line["source_workload"], "client", "{line}");
        assert_eq!(line["destination_workload"], "ratings-v1", "{line}");
        assert!(
            line["upstream_host"]
                .as_str()
                .is_some_and(|h| h.ends_with(":9080")),
            "{line}"
        );
        assert!(line["bytes_sent"].as_u64() > Some(0), "{line}");
    }
    assert_eq!(outbound["authority"], "ratings:9080", "{outbound}");
    assert_eq!(
        outbound["destination_service"], "ratings.default.svc.cluster.local",
        "{outbound}"
    );
    // The destination authenticated the caller over mutual TLS.
    assert_eq!(
        inbound["source_principal"], "spiffe://cluster.local/ns/default/sa/client",
        "{inbound}"
    );
    // The text format too, as Envoy writes it (between agents, the
    // request may travel as HTTP/2).
    for (node, protocol) in [("node-a", "HTTP/1.1\""), ("node-b", "HTTP/")] {
        let log = mesh.agent(node).log();
        let line = log.lines().find(|l| l.starts_with('[') && l.contains(&id));
        let line = line.unwrap_or_else(|| panic!("{node}: no text line for {id}:\n{log}"));
        let request = format!("] \"GET /ratings/0 {protocol}");
        assert!(
            line.contains(&request) && line.contains(" 200 - "),
            "{line}"
        );
    }

    // A TCP connection: one line from each agent.
    tcp(&mesh, "hello-tcp");
    let tcp_lines = |node| {
        json_lines(&mesh, node)
            .into_iter()
            .filter(|l| l["destination_workload"] == "echo" && l["bytes_received"] == 9)
            .collect::<Vec<_>>()
    };
    for (node, reporter) in [("node-a", "source"), ("node-b", "destination")] {
        let mut lines = tcp_lines(node);
        for _ in 0..50 {
            if !lines.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            lines = tcp_lines(node);
        }
        let line = lines
            .first()
            .unwrap_or_else(|| panic!("{node}: no TCP line"));
        assert_eq!(line["reporter"], reporter, "{line}");
        assert_eq!(line["response_code"], 0, "{line}");
        assert_eq!(line["method"], Value::Null, "{line}");
        assert_eq!(line["bytes_sent"], 9, "{line}");
        assert_eq!(line["source_workload"], "client", "{line}");
    }

    // Removed: requests flow on, unlogged. The echo's own Telemetry still
    // logs its inbound connection, after any line of the request before it.
    mesh.delete("telemetry-logs.yaml").unwrap();
    let mut stopped = None;
    for n in 0..ATTEMPTS {
        let id = format!("off-{n}");
        get(&mesh, &id);
        // A size of its own: the marker's line is told by its bytes.
        let marker = "m".repeat(100 + n);
        tcp(&mesh, &marker);
        let size = marker.len() as u64;
        let mut inbound = json_lines(&mesh, "node-b");
        for _ in 0..50 {
            if inbound
                .iter()
                .any(|l| l["bytes_received"] == size && l["destination_workload"] == "echo")
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            inbound = json_lines(&mesh, "node-b");
        }
        if with_id(&inbound, &id).is_empty() {
            stopped = Some(id);
            break;
        }
    }
    let stopped = stopped.expect("requests are still logged after the Telemetry was removed");
    assert!(with_id(&json_lines(&mesh, "node-a"), &stopped).is_empty());

    for node in ["node-a", "node-b"] {
        let log = mesh.agent(node).log();
        for secret in SECRETS {
            assert!(!log.contains(secret), "{node} logged {secret}:\n{log}");
        }
    }
}
