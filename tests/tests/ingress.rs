//! The agent as the mesh's ingress gateway: Istio Gateways served on the
//! nodes' own addresses, reached by curl from a host outside the mesh (on
//! the inter-node fabric, like a load balancer or a user would), with the
//! VirtualServices bound to them routing into the mesh over mutual TLS as
//! the ingress's own identity.

use std::path::Path;
use std::time::{Duration, Instant};

use nodemesh_testbed::mesh::{bookinfo_example, count_by, only, reviews_versions, Mesh};
use nodemesh_testbed::topology::run_checked;
use nodemesh_testbed::workload_apps::{curl_many_in, python3, Reply};
use serde_json::Value;

/// The outside client's address on the fabric: `10.0.0.210` (the CA is .200, the API forwarder .201).
const OUTSIDE_INDEX: u8 = 210;

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

/// A mesh, its agents started, and a host outside it; returns the host's
/// netns.
fn with_outside(mut mesh: Mesh) -> (Mesh, String) {
    mesh.start(&[]).unwrap();
    let outside = mesh.topo_mut().add_host("outside", OUTSIDE_INDEX).unwrap();
    (mesh, outside)
}

/// `http://<node's address><path>`.
fn at(mesh: &Mesh, node: &str, path: &str) -> String {
    format!("http://{}{path}", mesh.topo().node(node).address)
}

fn get(mesh: &Mesh, outside: &str, url: &str, n: usize, args: &[&str]) -> Vec<Reply> {
    let urls = vec![url; n];
    curl_many_in(mesh.topo(), outside, &urls, args).unwrap()
}

/// Waits (15 s at most) until `node` reports Gateway `gateway`'s server
/// in a state for which `done` holds (listeners follow a config change
/// once the agent reconciles).
fn wait_state(
    mesh: &Mesh,
    node: &str,
    gateway: &str,
    done: impl Fn(Option<&str>) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let gateways = cli_json(mesh, node, &["gateways", "-o", "json"]);
        let state = gateways["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["gateway"] == gateway)
            .and_then(|s| s["state"].as_str())
            .map(str::to_owned);
        if done(state.as_deref()) {
            return state.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "{node}: {gateways:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_listening(mesh: &Mesh, gateway: &str) {
    for node in ["node-a", "node-b"] {
        wait_state(mesh, node, gateway, |s| s == Some("listening"));
    }
}

/// Waits until `url` is refused from `outside` (the port closed).
fn wait_refused(mesh: &Mesh, outside: &str, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(mesh, outside, url, 1, &[])[0].status != 0 {
        assert!(Instant::now() < deadline, "{url} still answers");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (15 s at most) until node-a's routing warnings contain every
/// part (a generation counted by `apply` may still be the previous file's).
fn wait_warning(mesh: &Mesh, parts: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = mesh.agent("node-a").status_json().unwrap();
        let warnings = status["config"]["routing_warnings"].to_string();
        if parts.iter().all(|part| warnings.contains(part)) {
            return;
        }
        assert!(Instant::now() < deadline, "{parts:?} not all in {warnings}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli_json(mesh: &Mesh, node: &str, args: &[&str]) -> Value {
    let out = mesh.agent(node).cli(args).unwrap();
    assert!(
        out.status.success(),
        "nodemesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bookinfo_gateway_serves_productpage_on_port_80_and_routing_samples_apply() {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.bookinfo().unwrap();
    let (mesh, outside) = with_outside(mesh);
    // Nothing listens on port 80 before a Gateway asks for it.
    let before = get(
        &mesh,
        &outside,
        &at(&mesh, "node-a", "/productpage"),
        1,
        &[],
    );
    assert_eq!(before[0].status, 0, "{before:?}");

    mesh.apply(
        "bookinfo-gateway.yaml",
        &bookinfo_example("bookinfo-gateway"),
    )
    .unwrap();
    wait_listening(&mesh, "default/bookinfo-gateway");
    // Every node serves it (`istio: ingressgateway` selects every agent);
    // productpage runs on node-a, so node-b's ingress crosses nodes.
    for node in ["node-a", "node-b"] {
        let pages = get(&mesh, &outside, &at(&mesh, node, "/productpage"), 20, &[]);
        for page in &pages {
            assert_eq!(page.status, 200, "{node}: {page:?}");
            let doc = page.json().unwrap();
            assert_eq!(doc["name"], "productpage-v1", "{doc:#}");
            // The application sees the outside client as Istio's gateway
            // reports it.
            assert_eq!(doc["headers"]["x-forwarded-for"], "10.0.0.210", "{doc:#}");
            assert_eq!(doc["headers"]["x-forwarded-proto"], "http", "{doc:#}");
            assert_eq!(
                doc["headers"]["x-request-id"].as_str().map(str::len),
                Some(36),
                "{doc:#}"
            );
        }
    }
    // Paths the VirtualService does not match are not found.
    let other = get(&mesh, &outside, &at(&mesh, "node-a", "/admin"), 1, &[]);
    assert_eq!(other[0].status, 404, "{other:?}");

    // `nodemesh gateways` says what the node serves.
    let gateways = cli_json(&mesh, "node-a", &["gateways", "-o", "json"]);
    let server = &gateways["servers"][0];
    assert_eq!(
        server["gateway"], "default/bookinfo-gateway",
        "{gateways:#}"
    );
    assert_eq!(server["port"], 80, "{gateways:#}");
    assert_eq!(server["state"], "listening", "{gateways:#}");
    assert_eq!(
        server["routes"][0]["virtualService"]
            .as_str()
            .unwrap()
            .split(' ')
            .take(2)
            .collect::<Vec<_>>(),
        ["VirtualService", "default/bookinfo"],
        "{gateways:#}"
    );
    assert_eq!(
        gateways["identity"],
        "spiffe://cluster.local/ns/istio-system/sa/nodemesh-ingress"
    );

    // Bookinfo's routing samples apply to traffic from the ingress.
    mesh.apply_all_v1_with_reviews("virtual-service-reviews-test-v2")
        .unwrap();
    let url = at(&mesh, "node-b", "/productpage");
    let jason = get(&mesh, &outside, &url, 50, &["-H", "end-user: jason"]);
    let others = get(&mesh, &outside, &url, 50, &[]);
    assert_eq!(reviews_versions(&jason), only("v2", 50));
    assert_eq!(reviews_versions(&others), only("v1", 50));
    mesh.apply_all_v1_with_reviews("virtual-service-reviews-v3")
        .unwrap();
    let pages = get(&mesh, &outside, &url, 50, &[]);
    assert_eq!(reviews_versions(&pages), only("v3", 50));

    // Removing the Gateway closes the port.
    mesh.delete("bookinfo-gateway.yaml").unwrap();
    wait_refused(&mesh, &outside, &at(&mesh, "node-a", "/productpage"));
}

const WEB_GATEWAY: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: website-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: HTTP
    hosts:
    - web.example.com
";

const WEB_CANARY: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
spec:
  host: web
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
spec:
  hosts:
  - web.example.com
  gateways:
  - website-gateway
  http:
  - match:
    - headers:
        qa:
          exact: canary-test
    route:
    - destination:
        host: web
        subset: v2
  - route:
    - destination:
        host: web
        subset: v1
";

const STRICT: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
";

/// Four `web` v1 pods (two per node) and one v2, behind Service `web`.
fn web_mesh() -> (Mesh, String) {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    for (node, name) in [
        ("node-a", "web-v1-a"),
        ("node-a", "web-v1-b"),
        ("node-b", "web-v1-c"),
        ("node-b", "web-v1-d"),
    ] {
        let labels = [("app", "web"), ("version", "v1")];
        mesh.app(node, name, &labels, &[]).unwrap();
    }
    let labels = [("app", "web"), ("version", "v2")];
    mesh.app("node-b", "web-v2", &labels, &[]).unwrap();
    mesh.http_service("web");
    with_outside(mesh)
}

#[test]
fn a_canary_at_a_gateway_and_strict_mtls_behind_it() {
    let (mesh, outside) = web_mesh();
    mesh.apply("gateway.yaml", WEB_GATEWAY).unwrap();
    mesh.apply("canary.yaml", WEB_CANARY).unwrap();
    wait_listening(&mesh, "default/website-gateway");
    let host = ["-H", "Host: web.example.com"];
    let canary = ["-H", "Host: web.example.com", "-H", "qa: canary-test"];
    let url = at(&mesh, "node-a", "/");

    let default = get(&mesh, &outside, &url, 200, &host);
    let by_pod = count_by(&default, |r| match r.json() {
        Some(doc) => doc["name"].as_str().unwrap_or("?").to_owned(),
        None => format!("status {}", r.status),
    });
    assert_eq!(by_pod.values().sum::<u64>(), 200, "{by_pod:?}");
    for pod in ["web-v1-a", "web-v1-b", "web-v1-c", "web-v1-d"] {
        assert!(by_pod.get(pod).is_some_and(|&n| n > 0), "{pod}: {by_pod:?}");
    }
    let versions = count_by(&get(&mesh, &outside, &url, 50, &canary), Reply::version);
    assert_eq!(versions, only("v2", 50));
    // The destination reports the ingress as the caller, over mutual TLS.
    let metrics = format!(
        "http://{}:15020/metrics",
        mesh.topo().node("node-b").address
    );
    let metrics = get(&mesh, &outside, &metrics, 1, &[]).remove(0).body;
    let from_ingress = metrics.lines().find(|l| {
        l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("source_workload=\"nodemesh-ingress\"")
            && l.contains(
                "source_principal=\"spiffe://cluster.local/ns/istio-system/sa/nodemesh-ingress\"",
            )
            && l.contains("destination_workload=\"web-v2\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")
    });
    assert!(from_ingress.is_some(), "{metrics}");
    // A host the Gateway does not serve.
    let other = get(&mesh, &outside, &url, 1, &["-H", "Host: other.example.com"]);
    assert_eq!(other[0].status, 404, "{other:?}");
    explain_agrees_with_the_canary(&mesh);

    // STRICT in the application's namespace: the ingress's calls are
    // mutual TLS (its own identity), a direct plaintext call is refused.
    let web = mesh.topo().pod("web-v1-a").address;
    run_checked(&[
        "ip",
        "-n",
        &outside,
        "route",
        "add",
        "10.1.0.0/16",
        "via",
        "10.0.0.1",
    ])
    .unwrap();
    let direct = format!("http://{web}:9080/");
    assert_eq!(get(&mesh, &outside, &direct, 1, &[])[0].status, 200);
    mesh.apply("strict.yaml", STRICT).unwrap();
    let refused = get(&mesh, &outside, &direct, 1, &[]);
    assert_eq!(refused[0].status, 0, "{refused:?}");
    for node in ["node-a", "node-b"] {
        let replies = get(&mesh, &outside, &at(&mesh, node, "/"), 40, &canary);
        assert_eq!(count_by(&replies, Reply::version), only("v2", 40), "{node}");
        let replies = get(&mesh, &outside, &at(&mesh, node, "/"), 40, &host);
        assert_eq!(count_by(&replies, Reply::version), only("v1", 40), "{node}");
    }
    let strict = explain_gateway(&mesh, "80", "http://web.example.com/", &[]);
    assert_eq!(
        strict["destinations"][0]["mtls"][0],
        "STRICT (PeerAuthentication default/default) at default/web-v1-a, default/web-v1-b, \
         default/web-v1-c, default/web-v1-d",
        "{strict:#}"
    );
}

/// `nodemesh explain --gateway PORT URL -H ... -o json` on node-a.
fn explain_gateway(mesh: &Mesh, port: &str, url: &str, headers: &[&str]) -> Value {
    let mut args = vec!["explain", "--gateway", port, url, "-o", "json"];
    for header in headers {
        args.extend(["-H", header]);
    }
    cli_json(mesh, "node-a", &args)
}

/// What the canary's requests got, `explain --gateway` says, from the
/// same routing: the Gateway server, the rule and why, the endpoints, and
/// the identity the ingress calls them as.
fn explain_agrees_with_the_canary(mesh: &Mesh) {
    let address = mesh.topo().node("node-a").address;
    let at_address = format!("{address}:80");
    let url = "http://web.example.com/";
    let canary = explain_gateway(mesh, &at_address, url, &["qa: canary-test"]);
    assert_eq!(canary["gateway"], "default/website-gateway", "{canary:#}");
    assert_eq!(canary["server"], "spec.servers[0]");
    assert_eq!(canary["protocol"], "HTTP");
    assert_eq!(canary["matchedBy"], "header qa=canary-test");
    assert_eq!(
        canary["identity"],
        "spiffe://cluster.local/ns/istio-system/sa/nodemesh-ingress"
    );
    let v2 = &canary["destinations"][0];
    assert_eq!(v2["subset"], "v2", "{canary:#}");
    let endpoints = v2["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "{canary:#}");
    assert!(endpoints[0]
        .as_str()
        .unwrap()
        .starts_with("default/web-v2 "));

    let others = explain_gateway(mesh, "80", url, &[]);
    assert_eq!(others["matchedBy"], "any request", "{others:#}");
    assert_eq!(others["destinations"][0]["subset"], "v1");
    let endpoints = others["destinations"][0]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 4, "the four v1 pods: {others:#}");

    let port = explain_gateway(mesh, "81", url, &[]);
    assert_eq!(
        port["summary"],
        "no Gateway server of this node is on port 81: the connection is refused (ports \
         served: 80)"
    );
    let host = explain_gateway(mesh, "80", "http://other.example.com/", &[]);
    assert_eq!(
        host["summary"],
        "the ingress answers 404: no Gateway server on port 80 admits host \"other.example.com\""
    );
    // For people: one line per fact.
    let table = mesh
        .agent("node-a")
        .cli(&["explain", "--gateway", "80", url])
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    for line in [
        "gateway    default/website-gateway",
        "identity   spiffe://cluster.local/ns/istio-system/sa/nodemesh-ingress",
        "→ default/web subset v1 (100%)",
    ] {
        assert!(table.contains(line), "{line:?} in {table}");
    }
}

#[test]
fn bad_gateway_input_is_reported_by_file_object_and_field_and_the_rest_keeps_routing() {
    let (mesh, outside) = web_mesh();
    mesh.apply("gateway.yaml", WEB_GATEWAY).unwrap();
    mesh.apply("canary.yaml", WEB_CANARY).unwrap();
    wait_listening(&mesh, "default/website-gateway");
    let host = ["-H", "Host: web.example.com"];
    let url = at(&mesh, "node-a", "/");

    // A port taken on node-a's host: reported there, node-b serves it,
    // and port 80 keeps routing on both.
    let node_a = mesh.topo().node("node-a").clone();
    let mut mesh = mesh;
    let taken = format!("{}", node_a.address);
    mesh.topo_mut()
        .spawn_in(
            &node_a.netns,
            &[python3(), "-m", "http.server", "8081", "--bind", &taken],
            "port-taker",
        )
        .unwrap();
    nodemesh_testbed::workload_apps::wait_listening(mesh.topo(), &node_a.netns, 8081).unwrap();
    let second_port = WEB_GATEWAY
        .replace("website-gateway", "second-gateway")
        .replace("number: 80", "number: 8081");
    mesh.apply("second.yaml", &second_port).unwrap();
    let second = "default/second-gateway";
    let on_a = wait_state(&mesh, "node-a", second, |s| {
        s.is_some_and(|s| s.starts_with("not served"))
    });
    assert!(
        on_a.contains("cannot listen on 10.0.0.1:8081") && on_a.contains("in use"),
        "{on_a}"
    );
    wait_state(&mesh, "node-b", second, |s| s == Some("listening"));
    assert_eq!(
        get(&mesh, &outside, &url, 10, &host)
            .iter()
            .filter(|r| r.status == 200)
            .count(),
        10
    );

    // A host already claimed on the same port by another Gateway (the
    // older wins; without timestamps, the first by namespace/name).
    let claim = WEB_GATEWAY.replace("website-gateway", "website-thief");
    mesh.apply("thief.yaml", &claim).unwrap();
    wait_warning(
        &mesh,
        &[
            "Gateway default/website-thief (",
            "thief.yaml",
            "spec.servers[0].hosts[0]",
            "already claimed by Gateway default/website-gateway",
        ],
    );

    // A VirtualService bound to a Gateway that does not exist.
    let orphan = WEB_CANARY
        .split("---\n")
        .nth(1)
        .unwrap()
        .replace("name: web\n", "name: orphan\n")
        .replace("- website-gateway", "- no-such-gateway");
    mesh.apply("orphan.yaml", &orphan).unwrap();
    wait_warning(
        &mesh,
        &[
            "VirtualService default/orphan (",
            "orphan.yaml",
            "spec.gateways[0]: Gateway default/no-such-gateway does not exist",
        ],
    );
    // The rest keeps routing.
    let replies = get(&mesh, &outside, &url, 20, &host);
    assert_eq!(count_by(&replies, Reply::version), only("v1", 20));

    // A Gateway with a field nodemesh does not support is rejected whole,
    // by file, object and field; the running config stays.
    let bind = WEB_GATEWAY
        .replace("website-gateway", "bound-gateway")
        .replace("    hosts:\n", "    bind: 10.0.0.1\n    hosts:\n");
    let error = mesh.reject("bound.yaml", &bind).unwrap();
    for part in [
        "bound.yaml",
        "Gateway default/bound-gateway",
        "spec.servers[0].bind",
    ] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
    let replies = get(&mesh, &outside, &url, 20, &host);
    assert_eq!(count_by(&replies, Reply::version), only("v1", 20));
}

/// Gateway API: a nodemesh GatewayClass, a Gateway with an HTTP listener for
/// `*.example.com` on port 80, a route for `web.example.com` sending
/// `/tagged` with a header the application echoes, and a route
/// whose hostname the listener does not admit.
const WEB_GATEWAY_API: &str = concat!(
    include_str!("../../deploy/kubernetes/05-gatewayclass.yaml"),
    "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public}
spec:
  gatewayClassName: nodemesh
  listeners:
  - {name: web, port: 80, protocol: HTTP, hostname: \"*.example.com\"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: public, sectionName: web}]
  hostnames: [web.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /tagged}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: gateway-api}]}
    backendRefs: [{name: web, port: 9080}]
  - backendRefs: [{name: web, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: elsewhere}
spec:
  parentRefs: [{name: public}]
  hostnames: [shop.other.org]
  rules: [{backendRefs: [{name: web, port: 9080}]}]
",
);

#[test]
fn the_same_through_a_gateway_api_gateway_and_http_route() {
    let (mesh, outside) = web_mesh();
    mesh.apply("gateway-api.yaml", WEB_GATEWAY_API).unwrap();
    wait_listening(&mesh, "default/public");
    // Every node serves it, into the mesh over mutual TLS.
    for node in ["node-a", "node-b"] {
        let url = at(&mesh, node, "/tagged");
        let replies = get(&mesh, &outside, &url, 10, &["-H", "Host: web.example.com"]);
        for reply in &replies {
            assert_eq!(reply.status, 200, "{node}: {reply:?}");
            let doc = reply.json().unwrap();
            assert!(
                doc["name"].as_str().unwrap_or_default().starts_with("web-"),
                "{doc:#}"
            );
            assert_eq!(doc["headers"]["x-route"], "gateway-api", "{doc:#}");
            assert_eq!(doc["headers"]["x-forwarded-for"], "10.0.0.210", "{doc:#}");
        }
    }
    let plain = get(
        &mesh,
        &outside,
        &at(&mesh, "node-a", "/"),
        1,
        &["-H", "Host: web.example.com"],
    );
    assert_eq!(plain[0].status, 200, "{plain:?}");
    assert!(plain[0].json().unwrap()["headers"]["x-route"].is_null());

    // The listener does not admit the other route's hostname: not attached,
    // reported, and its host is not found.
    wait_warning(
        &mesh,
        &[
            "HTTPRoute default/elsewhere (",
            "gateway-api.yaml",
            "spec.parentRefs[0]: no hostname of the route matches listener web",
        ],
    );
    let other = get(
        &mesh,
        &outside,
        &at(&mesh, "node-a", "/"),
        1,
        &["-H", "Host: shop.other.org"],
    );
    assert_eq!(other[0].status, 404, "{other:?}");
    let gateways = cli_json(&mesh, "node-a", &["gateways", "-o", "json"]);
    let server = gateways["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["gateway"] == "default/public")
        .unwrap();
    assert_eq!(
        server["hosts"],
        serde_json::json!(["*.example.com"]),
        "{server:#}"
    );
    assert!(
        server["routes"]
            .to_string()
            .contains("HTTPRoute default/web ("),
        "{server:#}"
    );
}

/// A Gateway on port 8080 admitting the routes of namespaces whose `team`
/// is `shop` or `web` and that are not `internal`; a route from each of
/// namespaces `shop` (selected) and `partners` (not), both sending to `web`
/// in `default`, which a ReferenceGrant there allows.
const SELECTED_NAMESPACES: &str = concat!(
    include_str!("../../deploy/kubernetes/05-gatewayclass.yaml"),
    "---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: partners, labels: {team: shop, internal: \"yes\"}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: selected}
spec:
  gatewayClassName: nodemesh
  listeners:
  - name: teams
    port: 8080
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Selector
        selector:
          matchExpressions:
          - {key: team, operator: In, values: [shop, web]}
          - {key: internal, operator: DoesNotExist}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: team-routes}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: partners}
  to: [{group: \"\", kind: Service, name: web}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: shop}
spec:
  parentRefs: [{name: selected, namespace: default}]
  hostnames: [shop.example.com]
  rules: [{backendRefs: [{name: web, namespace: default, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: partner, namespace: partners}
spec:
  parentRefs: [{name: selected, namespace: default}]
  hostnames: [partner.example.com]
  rules: [{backendRefs: [{name: web, namespace: default, port: 9080}]}]
",
);

#[test]
fn a_listener_admits_the_routes_of_namespaces_its_selector_expressions_select() {
    let (mesh, outside) = web_mesh();
    mesh.apply("selected.yaml", SELECTED_NAMESPACES).unwrap();
    wait_listening(&mesh, "default/selected");
    wait_warning(
        &mesh,
        &[
            "HTTPRoute partners/partner (",
            "listener teams does not allow HTTPRoutes of namespace partners",
        ],
    );
    let url = format!("http://{}:8080/", mesh.topo().node("node-a").address);
    let shop = get(&mesh, &outside, &url, 5, &["-H", "Host: shop.example.com"]);
    for reply in &shop {
        assert_eq!(reply.status, 200, "{reply:?}");
        let doc = reply.json().unwrap();
        assert!(
            doc["name"].as_str().unwrap_or_default().starts_with("web-"),
            "{doc:#}"
        );
    }
    let partner = get(
        &mesh,
        &outside,
        &url,
        1,
        &["-H", "Host: partner.example.com"],
    );
    assert_eq!(partner[0].status, 404, "{partner:?}");
}

/// Gateway API `GRPCRoute` at the nodemesh Gateway of
/// [`WEB_GATEWAY_API`]: one method to v2, calls carrying `qa:
/// canary-test` to v2, the rest to v1 (per-version Services, as the
/// Gateway API has no subsets).
const WEB_GRPC_ROUTE: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc}
spec:
  parentRefs: [{name: public, sectionName: web}]
  hostnames: [grpc.example.com]
  rules:
  - matches: [{method: {service: shop.Catalog, method: Get}}]
    backendRefs: [{name: web-v2, port: 9080}]
  - matches: [{headers: [{name: qa, value: canary-test}]}]
    backendRefs: [{name: web-v2, port: 9080}]
  - backendRefs: [{name: web-v1, port: 9080}]
";

#[test]
fn grpc_routes_split_calls_by_method_and_header_at_a_gateway_and_on_the_mesh() {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    for (node, version) in [("node-a", "v1"), ("node-b", "v2")] {
        let labels = [("app", "web"), ("version", version)];
        mesh.app(node, &format!("web-{version}"), &labels, &[])
            .unwrap();
        let port = nodemesh_testbed::config::ServicePort {
            name: "grpc",
            port: 9080,
            target_port: 9080,
        };
        mesh.service_selecting(&format!("web-{version}"), &labels, &[port]);
    }
    mesh.http_service("web");
    let (mesh, outside) = with_outside(mesh);
    mesh.apply("gateway-api.yaml", WEB_GATEWAY_API).unwrap();
    mesh.apply("grpc.yaml", WEB_GRPC_ROUTE).unwrap();
    wait_listening(&mesh, "default/public");

    // From the outside host, through either node's Gateway, into the mesh.
    let authority = "--authority=grpc.example.com";
    let calls = |node: &str, method: &str, extra: &[&str]| {
        let target = format!("{}:80", mesh.topo().node(node).address);
        let metadata: Vec<&str> = [authority].iter().chain(extra).copied().collect();
        mesh.grpc_many_in(&outside, &target, method, 20, &metadata)
            .unwrap()
    };
    for node in ["node-a", "node-b"] {
        assert_eq!(calls(node, "/shop.Catalog/Get", &[]), only("v2", 20));
        assert_eq!(calls(node, "/shop.Catalog/List", &[]), only("v1", 20));
        let canary = calls(node, "/shop.Catalog/List", &["qa=canary-test"]);
        assert_eq!(canary, only("v2", 20));
    }
    let gateways = cli_json(&mesh, "node-a", &["gateways", "-o", "json"]);
    assert!(
        gateways.to_string().contains("GRPCRoute default/grpc ("),
        "{gateways:#}"
    );

    // An HTTPRoute for the same hostname on the listener: the GRPCRoute is
    // older (without timestamps: first by namespace/name), so the HTTPRoute
    // is not attached, and gRPC keeps its routes.
    let http = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                metadata: {name: z-http}\nspec:\n  parentRefs: [{name: public}]\n  \
                hostnames: [grpc.example.com]\n  rules: [{backendRefs: [{name: web, port: 9080}]}]\n";
    mesh.apply("http.yaml", http).unwrap();
    wait_warning(
        &mesh,
        &[
            "HTTPRoute default/z-http (",
            "listener web already has GRPCRoute default/grpc, older",
        ],
    );
    assert_eq!(calls("node-a", "/shop.Catalog/Get", &[]), only("v2", 20));

    // An invalid GRPCRoute is refused by file, object and field; the
    // running routes stay.
    let bad = WEB_GRPC_ROUTE.replace("name: grpc}", "name: bad}").replace(
        "  - backendRefs: [{name: web-v1",
        "  - filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n    backendRefs: [{name: web-v1",
    );
    let error = mesh.reject("bad.yaml", &bad).unwrap();
    for part in [
        "bad.yaml",
        "GRPCRoute default/bad",
        "spec.rules[2].filters[0].type",
    ] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
    assert_eq!(calls("node-b", "/shop.Catalog/Get", &[]), only("v2", 20));
    mesh.delete("bad.yaml").unwrap();

    // On the mesh: the same rules with Service `web` as the parent.
    let on_mesh = WEB_GRPC_ROUTE
        .replace("name: grpc}", "name: web-grpc}")
        .replace(
            "[{name: public, sectionName: web}]",
            "[{group: \"\", kind: Service, name: web, port: 9080}]",
        )
        .replace("  hostnames: [grpc.example.com]\n", "");
    mesh.apply("grpc-mesh.yaml", &on_mesh).unwrap();
    let target = "web.default.svc.cluster.local:9080";
    assert_eq!(
        mesh.grpc_many("client", target, "/shop.Catalog/Get", 20, &[])
            .unwrap(),
        only("v2", 20)
    );
    let list = mesh.grpc_many("client", target, "/shop.Catalog/List", 20, &[]);
    assert_eq!(list.unwrap(), only("v1", 20));
    let canary = ["qa=canary-test"];
    let list = mesh.grpc_many("client", target, "/shop.Catalog/List", 20, &canary);
    assert_eq!(list.unwrap(), only("v2", 20));
    let routes = cli_json(&mesh, "node-a", &["routes", "-o", "json"]);
    assert!(
        routes.to_string().contains("GRPCRoute default/web-grpc ("),
        "{routes:#}"
    );
}
