//! L7 traffic management on real namespaces: Istio's Bookinfo with its own
//! YAML, weighted splits counted over thousands of requests, faults,
//! retries, timeouts, outlier detection, connection-pool limits, mirroring,
//! HTTP/1.1, h2c and gRPC side by side with opaque and server-first TCP,
//! and config edits while traffic flows.
//!
//! The callers are real clients: curl (many requests per process, so the
//! counts are large) and Python's grpcio; the servers are `mesh-app`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nodemesh_testbed::config::ServicePort;
use nodemesh_testbed::mesh::{
    bookinfo_example, count_by, only, replace_object, reviews_versions, Mesh, CLIENT,
};
use nodemesh_testbed::workload_apps::{python3, wait_listening, Reply};
use serde_json::Value;

const REVIEWS: &str = "http://reviews:9080/reviews/0";
const RATINGS: &str = "http://ratings:9080/ratings/0";
const PRODUCTPAGE: &str = "http://productpage:9080/productpage";
const JASON: &[&str] = &["-H", "end-user: jason"];
/// Requests per split measurement: at 2000 a 50/50 split's standard
/// deviation is 1.1 points, so ±5 points is beyond 4 sigma.
const SPLIT_REQUESTS: usize = 2000;
const SPLIT_TOLERANCE: f64 = 5.0;

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

fn bookinfo() -> Mesh {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.bookinfo().unwrap();
    mesh.start(&[]).unwrap();
    mesh
}

fn versions(replies: &[Reply]) -> BTreeMap<String, u64> {
    count_by(replies, Reply::version)
}

#[track_caller]
fn assert_share(counts: &BTreeMap<String, u64>, key: &str, percent: f64) {
    let total: u64 = counts.values().sum();
    let got = *counts.get(key).unwrap_or(&0) as f64 * 100.0 / total as f64;
    assert!(
        (got - percent).abs() <= SPLIT_TOLERANCE,
        "{key}: {got:.1}% of {total}, expected {percent}% ± {SPLIT_TOLERANCE}: {counts:?}"
    );
}

fn count(counts: &BTreeMap<String, u64>, key: &str) -> u64 {
    counts.get(key).copied().unwrap_or(0)
}

/// Every one of `n` replies came from one of the two versions.
#[track_caller]
fn assert_only_between(counts: &BTreeMap<String, u64>, pair: [&str; 2], n: u64) {
    let between = count(counts, pair[0]) + count(counts, pair[1]);
    assert_eq!(between, n, "{counts:?}");
}

fn cli_json(mesh: &Mesh, args: &[&str]) -> Value {
    let out = mesh.agent("node-a").cli(args).unwrap();
    assert!(
        out.status.success(),
        "nodemesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn virtual_service(name: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n\
         spec:\n  hosts:\n  - {name}\n  http:\n{http}"
    )
}

#[test]
fn bookinfo_routes_everything_to_v1_then_jason_to_reviews_v2_and_edits_apply_live() {
    let mesh = bookinfo();
    let agent_pid = mesh.agent("node-a").pid();
    mesh.apply(
        "virtual-service-all-v1.yaml",
        &bookinfo_example("virtual-service-all-v1"),
    )
    .unwrap();

    let pages = mesh.get_many(CLIENT, PRODUCTPAGE, 200, &[]).unwrap();
    assert_eq!(reviews_versions(&pages), only("v1", 200));
    let page = pages[0].json().unwrap();
    assert_eq!(page["calls"][0]["body"]["name"], "details-v1", "{page:#}");

    // Istio's request-routing task: end-user jason → reviews v2, others v1.
    let all_v1 = bookinfo_example("virtual-service-all-v1");
    let with_reviews = |reviews: &str| replace_object(&all_v1, "reviews", reviews);
    mesh.apply(
        "virtual-service-all-v1.yaml",
        &with_reviews(&bookinfo_example("virtual-service-reviews-test-v2")),
    )
    .unwrap();
    let jason = mesh.get_many(CLIENT, PRODUCTPAGE, 200, JASON).unwrap();
    let others = mesh.get_many(CLIENT, PRODUCTPAGE, 200, &[]).unwrap();
    assert_eq!(reviews_versions(&jason), only("v2", 200));
    assert_eq!(reviews_versions(&others), only("v1", 200));
    // v2 calls ratings, and the header travelled with the call.
    let page = jason[0].json().unwrap();
    let ratings = &page["calls"][1]["body"]["calls"][0];
    assert_eq!(ratings["status"], 200, "{page:#}");
    assert_eq!(ratings["body"]["headers"]["end-user"], "jason", "{page:#}");

    // `explain` says the same without sending anything.
    let explained = cli_json(
        &mesh,
        &[
            "explain",
            "-o",
            "json",
            "--from",
            "default/client",
            REVIEWS,
            "-H",
            "end-user: jason",
        ],
    );
    assert_eq!(
        explained["destinations"][0]["subset"], "v2",
        "{explained:#}"
    );
    let v2_ip = mesh.topo().pod("reviews-v2").address.to_string();
    assert!(explained["destinations"][0]["endpoints"]
        .to_string()
        .contains(&v2_ip));
    let routes = cli_json(&mesh, &["routes", "-o", "json"]);
    let reviews = routes["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "default/reviews")
        .unwrap_or_else(|| panic!("{routes:#}"));
    assert_eq!(
        reviews["routes"].as_array().unwrap().len(),
        2,
        "{reviews:#}"
    );

    // A subset no DestinationRule defines is rejected by file, object and
    // field, and routing stays as it was.
    let v9 = "  - route:\n    - destination:\n        host: reviews\n        subset: v9\n";
    let error = mesh
        .reject(
            "virtual-service-all-v1.yaml",
            &with_reviews(&virtual_service("reviews", v9)),
        )
        .unwrap();
    for part in [
        "virtual-service-all-v1.yaml",
        "VirtualService default/reviews",
        "subset",
        "v9",
    ] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
    let jason = mesh.get_many(CLIENT, REVIEWS, 50, JASON).unwrap();
    assert_eq!(versions(&jason), only("v2", 50));

    // Replacing the route with v3 applies to new requests, same agent.
    mesh.apply(
        "virtual-service-all-v1.yaml",
        &with_reviews(&bookinfo_example("virtual-service-reviews-v3")),
    )
    .unwrap();
    let all = mesh.get_many(CLIENT, REVIEWS, 50, JASON).unwrap();
    assert_eq!(versions(&all), only("v3", 50));
    assert_eq!(mesh.agent("node-a").pid(), agent_pid, "the agent restarted");
}

#[test]
fn a_7s_delay_for_jason_only_and_callers_with_shorter_timeouts_time_out() {
    let mesh = bookinfo();
    mesh.apply(
        "virtual-service-reviews-test-v2.yaml",
        &bookinfo_example("virtual-service-reviews-test-v2"),
    )
    .unwrap();
    mesh.apply(
        "virtual-service-ratings-test-delay.yaml",
        &bookinfo_example("virtual-service-ratings-test-delay"),
    )
    .unwrap();

    // Others are not delayed: 20 requests within curl's 3 s limit.
    let others = mesh
        .get_many(CLIENT, RATINGS, 20, &["--max-time", "3"])
        .unwrap();
    assert_eq!(versions(&others), only("v1", 20));

    // jason waits 7 s, then gets the answer.
    let started = Instant::now();
    let delayed = mesh.get_json(CLIENT, RATINGS, JASON).unwrap();
    assert_eq!(delayed["version"], "v1");
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );

    // reviews v2 calls ratings with a 2.5 s timeout: it gets its timeout
    // error, and says so to productpage.
    let page = mesh.get_json(CLIENT, PRODUCTPAGE, JASON).unwrap();
    let reviews = &page["calls"][1]["body"];
    assert_eq!(reviews["version"], "v2", "{page:#}");
    let error = reviews["calls"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("timed out after 2500 ms"), "{page:#}");

    // A route timeout shorter than the delay: the mesh answers 504.
    let timeout_route =
        "  - match:\n    - headers:\n        end-user:\n          exact: jason\n    \
        timeout: 1s\n    route:\n    - destination:\n        host: reviews\n        subset: v2\n  \
        - route:\n    - destination:\n        host: reviews\n        subset: v1\n";
    mesh.apply(
        "virtual-service-reviews-test-v2.yaml",
        &virtual_service("reviews", timeout_route),
    )
    .unwrap();
    let reply = mesh
        .get_one(
            CLIENT,
            "http://reviews:9080/delay/3000",
            &["-H", "end-user: jason"],
        )
        .unwrap();
    assert_eq!(reply.status, 504, "{reply:?}");
    assert!(reply.body.contains("upstream request timeout"), "{reply:?}");
}

#[test]
fn weighted_splits_hold_over_thousands_of_requests_and_a_header_selects_the_canary() {
    let mesh = bookinfo();
    mesh.apply(
        "virtual-service-reviews-50-v3.yaml",
        &bookinfo_example("virtual-service-reviews-50-v3"),
    )
    .unwrap();
    let split = versions(&mesh.get_many(CLIENT, REVIEWS, SPLIT_REQUESTS, &[]).unwrap());
    assert_only_between(&split, ["v1", "v3"], SPLIT_REQUESTS as u64);
    assert_share(&split, "v1", 50.0);

    let canary = "  - match:\n    - headers:\n        qa:\n          exact: canary-test\n    \
        route:\n    - destination:\n        host: reviews\n        subset: v3\n  \
        - route:\n    - destination:\n        host: reviews\n        subset: v1\n      weight: 75\n    \
        - destination:\n        host: reviews\n        subset: v2\n      weight: 25\n";
    mesh.apply(
        "virtual-service-reviews-50-v3.yaml",
        &virtual_service("reviews", canary),
    )
    .unwrap();
    let split = versions(&mesh.get_many(CLIENT, REVIEWS, SPLIT_REQUESTS, &[]).unwrap());
    assert_only_between(&split, ["v1", "v2"], SPLIT_REQUESTS as u64);
    assert_share(&split, "v1", 75.0);
    let tested = mesh
        .get_many(CLIENT, REVIEWS, 200, &["-H", "qa: canary-test"])
        .unwrap();
    assert_eq!(versions(&tested), only("v3", 200));

    // Weights must add up to 100: rejected, and the split goes on.
    let error = mesh
        .reject(
            "virtual-service-reviews-50-v3.yaml",
            &virtual_service("reviews", &canary.replace("weight: 25", "weight: 20")),
        )
        .unwrap();
    assert!(error.contains("weight"), "{error}");
    let split = versions(&mesh.get_many(CLIENT, REVIEWS, 400, &[]).unwrap());
    assert_only_between(&split, ["v1", "v2"], 400);
}

#[test]
fn aborts_answer_503_for_a_share_of_requests_and_grpc_aborts_carry_a_grpc_status() {
    let mesh = bookinfo();
    let abort = "  - fault:\n      abort:\n        percentage:\n          value: 30\n        \
        httpStatus: 503\n    route:\n    - destination:\n        host: ratings\n        subset: v1\n";
    mesh.apply("ratings-abort.yaml", &virtual_service("ratings", abort))
        .unwrap();
    let replies = mesh.get_many(CLIENT, RATINGS, SPLIT_REQUESTS, &[]).unwrap();
    let statuses = count_by(&replies, |r| r.status.to_string());
    assert_eq!(
        count(&statuses, "200") + count(&statuses, "503"),
        SPLIT_REQUESTS as u64
    );
    assert_share(&statuses, "503", 30.0);
    let aborted = replies.iter().find(|r| r.status == 503).unwrap();
    assert_eq!(aborted.body, "fault filter abort", "{aborted:?}");

    // gRPC: aborted with UNAVAILABLE for jason; others are answered.
    let grpc_abort = "  - match:\n    - headers:\n        end-user:\n          exact: jason\n    \
        fault:\n      abort:\n        percentage:\n          value: 100\n        grpcStatus: UNAVAILABLE\n    \
        route:\n    - destination:\n        host: ratings\n  - route:\n    - destination:\n        host: ratings\n";
    mesh.apply(
        "ratings-abort.yaml",
        &virtual_service("ratings", grpc_abort),
    )
    .unwrap();
    let target = "ratings.default.svc.cluster.local:9080";
    let method = "/bookinfo.Ratings/Get";
    let jason = mesh
        .grpc_many(CLIENT, target, method, 50, &["end-user=jason"])
        .unwrap();
    assert_eq!(jason, only("UNAVAILABLE", 50));
    let others = mesh.grpc_many(CLIENT, target, method, 50, &[]).unwrap();
    assert_eq!(others, only("v1", 50));
}

/// Gateway API for the mesh: an HTTPRoute attached to the reviews
/// Service, with backends that are Services of one version each.
const REVIEWS_HTTPROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
  - matches:
    - headers:
      - name: end-user
        value: jason
    backendRefs:
    - name: reviews-v2
      port: 9080
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - name: x-routed-by
          value: httproute
    backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v3
      port: 9080
      weight: 10
"#;

#[test]
fn an_httproute_on_a_service_matches_headers_splits_by_weight_and_edits_headers() {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.bookinfo().unwrap();
    for version in ["v1", "v2", "v3"] {
        let port = ServicePort {
            name: "http",
            port: 9080,
            target_port: 9080,
        };
        let name = format!("reviews-{version}");
        mesh.service_selecting(&name, &[("app", "reviews"), ("version", version)], &[port]);
    }
    mesh.start(&[]).unwrap();
    mesh.apply("reviews-httproute.yaml", REVIEWS_HTTPROUTE)
        .unwrap();

    let jason = mesh.get_many(CLIENT, REVIEWS, 100, JASON).unwrap();
    assert_eq!(versions(&jason), only("v2", 100));
    let others = mesh.get_many(CLIENT, REVIEWS, SPLIT_REQUESTS, &[]).unwrap();
    let split = versions(&others);
    assert_only_between(&split, ["v1", "v3"], SPLIT_REQUESTS as u64);
    assert_share(&split, "v3", 10.0);
    let echoed = others[0].json().unwrap();
    assert_eq!(echoed["headers"]["x-routed-by"], "httproute", "{echoed:#}");
}

/// A mesh with Service `flaky` (endpoints as given) and the client.
fn flaky_mesh(endpoints: &[(&str, &[&str])]) -> Mesh {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    for (name, args) in endpoints {
        mesh.app("node-b", name, &[("app", "flaky")], args).unwrap();
    }
    mesh.http_service("flaky");
    mesh.start(&[]).unwrap();
    mesh
}

#[test]
fn retries_recover_failing_first_attempts_and_per_try_and_overall_timeouts_hold() {
    let mesh = flaky_mesh(&[("flaky-1", &["--fail-first", "2"])]);
    // Istio's default policy (2 retries on 503 among others) recovers a
    // request whose first two attempts fail.
    let reply = mesh.get_json(CLIENT, "http://flaky:9080/", &[]).unwrap();
    assert_eq!(reply["name"], "flaky-1");
    assert_eq!(mesh.served("flaky-1").unwrap(), 3);

    let retries = "  - retries:\n      attempts: 2\n      perTryTimeout: 300ms\n      \
        retryOn: 5xx\n    timeout: 10s\n    route:\n    - destination:\n        host: flaky\n";
    mesh.apply("flaky.yaml", &virtual_service("flaky", retries))
        .unwrap();
    // Each try of a 2 s request is cut at 300 ms and retried; after the
    // last the caller gets 504, well before the server would have answered.
    let reply = mesh
        .get_one(CLIENT, "http://flaky:9080/delay/2000", &[])
        .unwrap();
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(mesh.served("flaky-1").unwrap(), 3 + 3, "1 try + 2 retries");

    // The overall timeout bounds the request whatever the retries.
    let overall = "  - timeout: 500ms\n    route:\n    - destination:\n        host: flaky\n";
    mesh.apply("flaky.yaml", &virtual_service("flaky", overall))
        .unwrap();
    let reply = mesh
        .get_one(CLIENT, "http://flaky:9080/delay/3000", &[])
        .unwrap();
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.body, "upstream request timeout");
    assert!(reply.seconds < 2.5, "{reply:?}");
}

#[test]
fn a_failing_endpoint_is_ejected_then_returns_and_pool_limits_overflow_at_once() {
    let mesh = flaky_mesh(&[
        ("flaky-1", &[]),
        ("flaky-2", &["--fail-first", "3", "--fail-status", "500"]),
    ]);
    let policy = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  \
        name: flaky\nspec:\n  host: flaky\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n    \
        outlierDetection:\n      consecutive5xxErrors: 3\n      interval: 1s\n      baseEjectionTime: 4s\n      \
        maxEjectionPercent: 100\n";
    mesh.apply("flaky-dr.yaml", policy).unwrap();

    // Round robin: flaky-2 fails three times in a row and is ejected.
    let first = mesh.get_many(CLIENT, "http://flaky:9080/", 6, &[]).unwrap();
    let statuses = count_by(&first, |r| r.status.to_string());
    assert_eq!(
        statuses,
        BTreeMap::from([("200".into(), 3), ("500".into(), 3)])
    );
    let routes = cli_json(&mesh, &["routes", "-o", "json"]);
    let flaky_2 = mesh.topo().pod("flaky-2").address.to_string();
    assert!(
        routes["ejected"].to_string().contains(&flaky_2),
        "{routes:#}"
    );
    let during = mesh
        .get_many(CLIENT, "http://flaky:9080/", 40, &[])
        .unwrap();
    assert_eq!(
        count_by(&during, |r| r
            .json()
            .map_or("?".into(), |d| d["name"].to_string())),
        BTreeMap::from([("\"flaky-1\"".into(), 40)])
    );
    assert_eq!(mesh.served("flaky-2").unwrap(), 3);

    // After baseEjectionTime it is back (and healthy now).
    std::thread::sleep(Duration::from_secs(5));
    let after = mesh
        .get_many(CLIENT, "http://flaky:9080/", 20, &[])
        .unwrap();
    assert_eq!(
        count_by(&after, |r| r.status.to_string()).get("200"),
        Some(&20)
    );
    assert!(mesh.served("flaky-2").unwrap() > 3);

    // One connection and one pending request: of 12 parallel slow requests
    // the rest overflow into immediate 503s.
    let pool = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  \
        name: flaky\nspec:\n  host: flaky\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        \
        maxConnections: 1\n      http:\n        http1MaxPendingRequests: 1\n";
    mesh.apply("flaky-dr.yaml", pool).unwrap();
    let urls = vec!["http://flaky:9080/delay/1500"; 12];
    let mut args = vec!["-Z", "--parallel-max", "12", "--parallel-immediate"];
    for _ in &urls {
        args.extend(["-o", "/dev/null"]);
    }
    let replies =
        nodemesh_testbed::workload_apps::curl_many(mesh.topo(), CLIENT, &urls, &args).unwrap();
    let overflowed: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert!(served >= 2, "{replies:#?}");
    assert!(overflowed.len() >= 6, "{replies:#?}");
    for r in overflowed {
        assert!(r.overloaded, "{r:?}");
        assert!(r.seconds < 1.0, "queued instead of refused: {r:?}");
    }
}

#[test]
fn mirrored_requests_reach_the_shadow_and_callers_see_only_the_primary() {
    let mesh = bookinfo();
    let mirror = "  - route:\n    - destination:\n        host: reviews\n        subset: v1\n      \
        weight: 100\n    mirror:\n      host: reviews\n      subset: v3\n    mirrorPercentage:\n      value: 100.0\n";
    mesh.apply("reviews-mirror.yaml", &virtual_service("reviews", mirror))
        .unwrap();
    let replies = mesh.get_many(CLIENT, REVIEWS, 100, &[]).unwrap();
    assert_eq!(versions(&replies), only("v1", 100));
    let posts = mesh
        .get_many(CLIENT, REVIEWS, 20, &["-d", "a body the shadow gets too"])
        .unwrap();
    assert_eq!(versions(&posts), only("v1", 20));
    // Copies are sent in the background: wait for them to land.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh.served("reviews-v3").unwrap() < 120 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mesh.served("reviews-v3").unwrap(), 120);
    assert_eq!(mesh.served("reviews-v1").unwrap(), 120);
    assert_eq!(mesh.served("reviews-v2").unwrap(), 0);
}

/// A TCP server that speaks first: a banner, then it closes.
const BANNER_SERVER_PY: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    c.sendall(b"220 banner ready\r\n")
    c.close()
"#;

/// Connects, sends argv[3] if given, prints the first line it reads.
const TCP_CLIENT_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
if len(sys.argv) > 3:
    c.sendall(sys.argv[3].encode() + b"\n")
print(c.makefile().readline().strip())
"#;

/// Answers any request with `101 Switching Protocols`, then echoes bytes:
/// the shape of a WebSocket server, without the framing.
const UPGRADE_SERVER_PY: &str = r#"
import socket, sys, threading
def serve(c):
    f = c.makefile("rb")
    while f.readline() not in (b"\r\n", b""):
        pass
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
    c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Asks to upgrade, then sends a line over the upgraded connection; prints
/// the status line and what came back.
const UPGRADE_CLIENT_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
f = c.makefile("rb")
status = f.readline().decode().strip()
while f.readline() not in (b"\r\n", b""):
    pass
c.sendall(b"after the upgrade\n")
print(status + " | " + f.readline().decode().strip())
"#;

#[test]
fn http1_h2c_grpc_and_upgrades_are_routed_while_opaque_and_server_first_tcp_pass() {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.bookinfo().unwrap();
    mesh.tcp_echo("node-b", "echo", &[], 7000).unwrap();
    let banner = mesh.pod("node-b", "banner", &[("app", "banner")]).unwrap();
    let ws = mesh.pod("node-b", "ws", &[("app", "ws")]).unwrap();
    mesh.service(
        "ws",
        &[ServicePort {
            name: "http-ws",
            port: 80,
            target_port: 8080,
        }],
    );
    // A port name that declares nothing: the proxy has to detect.
    mesh.service(
        "banner",
        &[ServicePort {
            name: "banner",
            port: 2525,
            target_port: 2525,
        }],
    );
    let work = mesh.topo().work_dir().to_path_buf();
    for (file, text) in [
        ("banner_server.py", BANNER_SERVER_PY),
        ("tcp_client.py", TCP_CLIENT_PY),
        ("upgrade_server.py", UPGRADE_SERVER_PY),
        ("upgrade_client.py", UPGRADE_CLIENT_PY),
    ] {
        nodemesh_testbed::config::write_raw(&work, file, text).unwrap();
    }
    let server = work.join("banner_server.py").to_string_lossy().into_owned();
    mesh.topo_mut()
        .spawn_in(&banner.netns, &[python3(), &server, "2525"], "banner")
        .unwrap();
    wait_listening(mesh.topo(), &banner.netns, 2525).unwrap();
    let server = work
        .join("upgrade_server.py")
        .to_string_lossy()
        .into_owned();
    mesh.topo_mut()
        .spawn_in(&ws.netns, &[python3(), &server, "8080"], "ws")
        .unwrap();
    wait_listening(mesh.topo(), &ws.netns, 8080).unwrap();
    // Detection would wait 30 s for a silent client: the banner arriving
    // within the client's 5 s shows a server-first protocol is not held.
    mesh.start(&["--protocol-detection-timeout", "30s"])
        .unwrap();
    mesh.apply(
        "virtual-service-reviews-test-v2.yaml",
        &bookinfo_example("virtual-service-reviews-test-v2"),
    )
    .unwrap();

    // HTTP/1.1 and h2c (one curl per request: curl 7.88 does not reuse an
    // h2c connection across URLs).
    let h2c: &[&str] = &["--http2-prior-knowledge"];
    for (args, protocol) in [(&[][..], "HTTP/1.1"), (h2c, "HTTP/2.0")] {
        for (extra, expected) in [(JASON, "v2"), (&[][..], "v1")] {
            let args: Vec<&str> = args.iter().chain(extra).copied().collect();
            for _ in 0..5 {
                let reply = mesh.get_json(CLIENT, REVIEWS, &args).unwrap();
                assert_eq!(reply["version"], expected, "{args:?}: {reply:#}");
                assert_eq!(reply["protocol"], protocol, "{args:?}: {reply:#}");
            }
        }
    }
    // gRPC, routed on metadata like any header.
    let target = "reviews.default.svc.cluster.local:9080";
    let method = "/bookinfo.Reviews/Get";
    let jason = mesh
        .grpc_many(CLIENT, target, method, 50, &["end-user=jason"])
        .unwrap();
    assert_eq!(jason, only("v2", 50));
    let others = mesh.grpc_many(CLIENT, target, method, 50, &[]).unwrap();
    assert_eq!(others, only("v1", 50));

    // Opaque TCP and a server-first protocol through the same agents.
    let client_netns = mesh.topo().pod(CLIENT).netns.clone();
    let run = |script: &str, args: &[&str]| {
        let script = work.join(script).to_string_lossy().into_owned();
        let mut cmd = vec![python3(), script.as_str()];
        cmd.extend_from_slice(args);
        mesh.topo().run_in_ok(&client_netns, &cmd).unwrap()
    };
    let echoed = run("tcp_client.py", &["echo", "7000", "opaque bytes"]);
    assert_eq!(echoed.trim(), "opaque bytes");
    assert_eq!(
        run("tcp_client.py", &["banner", "2525"]).trim(),
        "220 banner ready"
    );
    // An HTTP Upgrade on an HTTP port: routed, then spliced.
    let upgraded = run("upgrade_client.py", &["ws", "80"]);
    assert_eq!(
        upgraded.trim(),
        "HTTP/1.1 101 Switching Protocols | after the upgrade"
    );
    let out = mesh
        .agent("node-a")
        .cli(&["connections", "-o", "json"])
        .unwrap();
    let connections: Value = serde_json::from_slice(&out.stdout).unwrap();
    let protocols = |service: &str| -> Vec<String> {
        connections
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["service"].as_str() == Some(&format!("default/{service}")))
            .map(|c| c["protocol"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    assert_eq!(protocols("echo"), ["tcp"], "{connections:#}");
    assert_eq!(protocols("banner"), ["tcp"], "{connections:#}");
    assert_eq!(protocols("ws"), ["http/1.1"], "{connections:#}");
}
