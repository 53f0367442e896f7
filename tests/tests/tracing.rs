//! Distributed tracing on the two-node Bookinfo: both agents export over
//! OTLP/HTTP to a real receiver (the official `opentelemetry-proto`
//! classes decode every body), the caller's agent a client span and the
//! destination's a server span per sampled request, one trace across
//! nodes and across the applications that pass the headers on; requests
//! never suffer from a collector that is down.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nodemesh_testbed::mesh::{bookinfo_example, count_by, replace_object, Mesh, CLIENT};
use nodemesh_testbed::otlp::{self, Receiver};
use serde_json::Value;

const PRODUCTPAGE: &str = "http://productpage:9080/productpage";
const RATINGS: &str = "http://ratings:9080/ratings/0";
const PARENT: &str = "00f067aa0ba902b7";

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

/// Bookinfo, an OTLP receiver in node-a's namespace, and both agents
/// exporting to it, sampling `percent` of requests that carry no decision.
fn traced_bookinfo(percent: &str) -> (Mesh, Receiver) {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.bookinfo().unwrap();
    let netns = mesh.topo().node("node-a").netns.clone();
    let receiver = Receiver::start(mesh.topo_mut(), &netns).unwrap();
    let endpoint = format!(
        "http://{}:{}",
        mesh.topo().node("node-a").address,
        otlp::PORT
    );
    mesh.start(&["--otlp-endpoint", &endpoint, "--trace-sampling", percent])
        .unwrap();
    (mesh, receiver)
}

fn traceparent(trace: &str, sampled: bool) -> String {
    let flags = if sampled { "01" } else { "00" };
    format!("traceparent: 00-{trace}-{PARENT}-{flags}")
}

fn of_trace<'a>(spans: &'a [Value], trace: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["trace_id"] == trace).collect()
}

fn attribute<'a>(span: &'a Value, key: &str) -> &'a str {
    span["attributes"][key].as_str().unwrap_or_default()
}

fn service(span: &Value) -> &str {
    span["resource"]["service.name"]
        .as_str()
        .unwrap_or_default()
}

/// GETs `url` from the client with curl arguments `args`, expecting a 200
/// and then `n` spans of `trace`; the reply and all spans received.
#[track_caller]
fn traced_get(
    mesh: &Mesh,
    receiver: &Receiver,
    url: &str,
    args: &[&str],
    trace: &str,
    n: usize,
) -> (nodemesh_testbed::workload_apps::Reply, Vec<Value>) {
    let reply = mesh.get_one(CLIENT, url, args).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let spans = receiver
        .wait_for(|s| of_trace(s, trace).len() >= n)
        .unwrap();
    assert_eq!(of_trace(&spans, trace).len(), n, "{spans:#?}");
    (reply, spans)
}

/// The one span of `kind` whose service is `service`.
#[track_caller]
fn one<'a>(spans: &[&'a Value], kind: &str, service_name: &str) -> &'a Value {
    let found: Vec<&Value> = spans
        .iter()
        .copied()
        .filter(|s| s["kind"] == kind && service(s) == service_name)
        .collect();
    assert_eq!(found.len(), 1, "{kind} spans of {service_name}: {spans:#?}");
    found[0]
}

/// `child`'s parent is `parent`.
#[track_caller]
fn assert_child(child: &Value, parent: &Value) {
    assert_eq!(
        child["parent_span_id"], parent["span_id"],
        "{child:#}\nis not a child of\n{parent:#}"
    );
}

#[test]
fn sampled_requests_get_client_and_server_spans_in_one_trace() {
    let (mesh, receiver) = traced_bookinfo("0");
    let node_a = mesh.topo().node("node-a").node_name.clone();
    let node_b = mesh.topo().node("node-b").node_name.clone();

    // The caller said "not sampled": no span, and with 0 % sampling a
    // request without a context gets none either; both still succeed.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let denied = mesh
        .get_one(CLIENT, RATINGS, &["-H", &traceparent(unsampled, false)])
        .unwrap();
    assert_eq!(denied.status, 200, "{denied:?}");
    let plain = mesh.get_one(CLIENT, RATINGS, &[]).unwrap();
    assert_eq!(plain.status, 200, "{plain:?}");
    // The decision made by the caller's agent reached the application,
    // with a new request id.
    let headers = &plain.json().unwrap()["headers"];
    let context = headers["traceparent"].as_str().unwrap_or_default();
    assert!(
        context.starts_with("00-") && context.ends_with("-00"),
        "{headers}"
    );
    assert_eq!(headers["x-b3-sampled"], "0", "{headers}");
    assert_eq!(headers["x-request-id"].as_str().map(str::len), Some(36));

    // Sampled by the caller: client → ratings, node-a to node-b.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let context = traceparent(trace, true);
    let headers = ["-H", &context, "-H", "x-request-id: req-1"];
    let (reply, spans) = traced_get(&mesh, &receiver, RATINGS, &headers, trace, 2);
    let spans = of_trace(&spans, trace);
    let client = one(&spans, "client", "client.default");
    let server = one(&spans, "server", "ratings.default");
    assert_eq!(client["parent_span_id"], PARENT, "{client:#}");
    assert_child(server, client);
    assert_eq!(attribute(client, "node_id"), node_a);
    assert_eq!(attribute(server, "node_id"), node_b);
    for span in [client, server] {
        assert_eq!(span["name"], "ratings.default.svc.cluster.local:9080/*");
        assert_eq!(span["scope"], "nodemesh");
        assert_eq!(attribute(span, "http.status_code"), "200");
        assert_eq!(attribute(span, "http.method"), "GET");
        assert_eq!(attribute(span, "guid:x-request-id"), "req-1");
        assert_eq!(attribute(span, "component"), "proxy");
        assert_eq!(attribute(span, "response_flags"), "-");
        assert!(span["end"].as_u64() >= span["start"].as_u64(), "{span:#}");
    }
    assert_eq!(
        attribute(client, "upstream_cluster"),
        "outbound|9080||ratings.default.svc.cluster.local"
    );
    assert_eq!(attribute(server, "upstream_cluster"), "inbound|9080||");
    assert_eq!(attribute(server, "istio.canonical_service"), "ratings");
    assert_eq!(
        attribute(client, "peer.address"),
        mesh.topo().pod(CLIENT).address.to_string()
    );
    // The application got the server span's context, W3C and B3.
    let headers = &reply.json().unwrap()["headers"];
    let server_id = server["span_id"].as_str().unwrap();
    assert_eq!(headers["traceparent"], format!("00-{trace}-{server_id}-01"));
    assert_eq!(headers["x-b3-traceid"], trace);
    assert_eq!(headers["x-b3-spanid"], server_id);
    assert_eq!(headers["x-b3-parentspanid"], client["span_id"]);
    assert_eq!(headers["x-request-id"], "req-1");

    // Bookinfo, jason routed to reviews v2 on node-b: the applications
    // pass the context on, so every hop joins the trace (B3 this time).
    let routed = replace_object(
        &bookinfo_example("virtual-service-all-v1"),
        "reviews",
        &bookinfo_example("virtual-service-reviews-test-v2"),
    );
    mesh.apply("virtual-service-all-v1.yaml", &routed).unwrap();
    let page_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let b3 = format!("b3: {page_trace}-{PARENT}-1");
    let headers = ["-H", &b3, "-H", "end-user: jason"];
    let (_, all) = traced_get(&mesh, &receiver, PRODUCTPAGE, &headers, page_trace, 8);
    let spans = of_trace(&all, page_trace);
    let to_productpage = one(&spans, "client", "client.default");
    let productpage = one(&spans, "server", "productpage.default");
    let by_productpage: Vec<&Value> = spans
        .iter()
        .copied()
        .filter(|s| s["kind"] == "client" && service(s) == "productpage.default")
        .collect();
    let details = one(&spans, "server", "details.default");
    let reviews = one(&spans, "server", "reviews.default");
    let to_ratings = one(&spans, "client", "reviews.default");
    let ratings = one(&spans, "server", "ratings.default");
    assert_eq!(to_productpage["parent_span_id"], PARENT);
    assert_child(productpage, to_productpage);
    assert_eq!(by_productpage.len(), 2, "{spans:#?}");
    for call in &by_productpage {
        assert_child(call, productpage);
    }
    let parent_of = |server: &Value| {
        by_productpage
            .iter()
            .find(|c| c["span_id"] == server["parent_span_id"])
            .map(|c| c["name"].clone())
    };
    assert_eq!(
        parent_of(details),
        Some("details.default.svc.cluster.local:9080/*".into())
    );
    assert_eq!(
        parent_of(reviews),
        Some("reviews.default.svc.cluster.local:9080/*".into())
    );
    assert_eq!(attribute(reviews, "istio.canonical_revision"), "v2");
    assert_eq!(attribute(reviews, "node_id"), node_b);
    assert_child(to_ratings, reviews);
    assert_child(ratings, to_ratings);

    // Nothing was duplicated, and the unsampled requests left no span
    // (they were served before the spans above were exported).
    let all = receiver.spans().unwrap();
    assert_eq!(of_trace(&all, trace).len(), 2);
    assert!(of_trace(&all, unsampled).is_empty(), "{all:#?}");
    let ids = count(&all, "span_id");
    assert!(ids.values().all(|&n| n == 1), "{ids:?}");
    assert_eq!(all.len(), 10, "{all:#?}");

    // Istio's Telemetry resource sets the percentage (the agents' flag
    // says 0): a mesh-wide 100 % traces a request that carries no
    // decision; removed, the flag applies again.
    mesh.apply(
        "telemetry.yaml",
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: mesh-default\n  \
         namespace: istio-system\nspec:\n  tracing:\n  - randomSamplingPercentage: 100\n",
    )
    .unwrap();
    // The agents resolve a new config's Telemetry just after loading it.
    let context = context_until(&mesh, "-01");
    assert!(
        context.ends_with("-01"),
        "sampled by the Telemetry: {context}"
    );
    let trace = context.split('-').nth(1).unwrap_or_default().to_owned();
    let spans = receiver
        .wait_for(|s| of_trace(s, &trace).len() == 2)
        .unwrap();
    assert_eq!(of_trace(&spans, &trace).len(), 2, "{spans:#?}");
    mesh.delete("telemetry.yaml").unwrap();
    let context = context_until(&mesh, "-00");
    assert!(context.ends_with("-00"), "the flag's 0 % again: {context}");
}

/// The `traceparent` ratings gets from the client's plain requests, once
/// it ends with `flags` (or after a few seconds of requests).
fn context_until(mesh: &Mesh, flags: &str) -> String {
    let mut context = String::new();
    for _ in 0..30 {
        let answer = mesh.get_one(CLIENT, RATINGS, &[]).unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        context = answer.json().unwrap()["headers"]["traceparent"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if context.ends_with(flags) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    context
}

/// Spans by the value of `field`.
fn count(spans: &[Value], field: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for span in spans {
        let key = span[field].as_str().unwrap_or_default().to_owned();
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// The `nodemesh_trace_*` series of `node`'s agent once `done` holds of
/// them (or after [`otlp::WAIT_TIMEOUT`], for the test to assert on).
fn trace_counters(
    mesh: &Mesh,
    node: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let url = format!("http://{}:15020/metrics", mesh.topo().node(node).address);
    let netns = mesh.topo().node("node-a").netns.clone();
    let deadline = Instant::now() + otlp::WAIT_TIMEOUT;
    loop {
        let text = mesh
            .topo()
            .run_in_ok(&netns, &["curl", "-sS", "--max-time", "5", &url])
            .unwrap();
        let counters: BTreeMap<String, f64> = text
            .lines()
            .filter(|l| l.starts_with("nodemesh_trace_"))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(series, n)| (series.to_owned(), n.parse().unwrap()))
            .collect();
        if done(&counters) || Instant::now() > deadline {
            return counters;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn requests_succeed_while_the_collector_is_down_and_lost_spans_are_counted() {
    let (mut mesh, receiver) = traced_bookinfo("100");
    let exported = "nodemesh_trace_spans_exported_total";
    let failed = r#"nodemesh_trace_spans_dropped_total{reason="export_failed"}"#;

    let replies = mesh.get_many(CLIENT, RATINGS, 10, &[]).unwrap();
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    // 100 %: every request has its client and its server span.
    let spans = receiver.wait_for(|s| s.len() >= 20).unwrap();
    assert_eq!(spans.len(), 20);
    let kinds = count(&spans, "kind");
    assert_eq!(kinds, [("client".into(), 10), ("server".into(), 10)].into());
    for node in ["node-a", "node-b"] {
        let counters = trace_counters(&mesh, node, |c| c.get(exported) == Some(&10.0));
        assert_eq!(counters.get(exported), Some(&10.0), "{node}: {counters:?}");
        assert_eq!(counters.get(failed), Some(&0.0), "{node}: {counters:?}");
    }

    // Down: connections to the collector are refused.
    receiver.stop(mesh.topo_mut()).unwrap();
    let errors = "nodemesh_trace_export_errors_total";
    let before = all_pages_succeed_and_exports_fail(&mesh, &BTreeMap::new());
    for counters in before.values() {
        assert!(counters[failed] > 0.0, "{counters:?}");
    }

    // Slow: the collector's port accepts connections and never answers.
    let netns = mesh.topo().node("node-a").netns.clone();
    let script = format!(
        "import socket, time\ns = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {}))\ns.listen(4096)\ntime.sleep(3600)\n",
        otlp::PORT
    );
    let python = nodemesh_testbed::workload_apps::python3();
    mesh.topo_mut()
        .spawn_in(&netns, &[python, "-c", &script], "otlp-blackhole")
        .unwrap();
    nodemesh_testbed::workload_apps::wait_listening(mesh.topo(), &netns, otlp::PORT).unwrap();
    let after = all_pages_succeed_and_exports_fail(&mesh, &before);
    for (node, counters) in &after {
        assert!(
            counters[errors] > before[node][errors],
            "{node}: {counters:?}"
        );
    }
}

/// Sends 50 productpage requests, which must all succeed; then waits until
/// both agents count more failed exports than in `before` (per node), and
/// returns their counters.
#[track_caller]
fn all_pages_succeed_and_exports_fail(
    mesh: &Mesh,
    before: &BTreeMap<String, BTreeMap<String, f64>>,
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let replies = mesh.get_many(CLIENT, PRODUCTPAGE, 50, &[]).unwrap();
    let statuses = count_by(&replies, |r| r.status.to_string());
    assert_eq!(statuses, [("200".to_owned(), 50)].into(), "{replies:?}");
    // Both agents have spans to export: productpage's calls cross to
    // node-b for reviews v2 and v3.
    let errors = "nodemesh_trace_export_errors_total";
    ["node-a", "node-b"]
        .into_iter()
        .map(|node| {
            let was = before
                .get(node)
                .and_then(|c| c.get(errors))
                .copied()
                .unwrap_or(0.0);
            let counters = trace_counters(mesh, node, |c| c.get(errors) > Some(&was));
            assert!(counters[errors] > was, "{node}: {counters:?}");
            (node.to_owned(), counters)
        })
        .collect()
}
