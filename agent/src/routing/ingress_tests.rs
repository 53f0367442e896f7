//! Istio Gateways through the configuration loader: Bookinfo's gateway
//! sample verbatim (Apache-2.0), `gateways:` semantics at the top and per
//! match, selectors, and what is reported instead of applied.

use crate::config::Labels;

use super::tests::{forward, host, select, table};
use super::RoutingTable;

const BOOKINFO_GATEWAY: &str =
    include_str!("../../../deploy/examples/bookinfo/bookinfo-gateway.yaml");

/// The routes a request to `port` with `host` gets at the ingress of a
/// node labelled `labels`.
fn at_gateway<'t>(
    table: &'t RoutingTable,
    labels: &Labels,
    port: u16,
    host: &str,
) -> Option<&'t super::VirtualHost> {
    let selected = table.ingress().select(labels, port, host)?;
    Some(&selected.routes?.routes)
}

#[test]
fn bookinfo_gateway_routes_productpage_on_port_80_for_any_host() {
    let table = table(&[("gw.yaml", BOOKINFO_GATEWAY)]);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    let labels = Labels::default();
    let routes = at_gateway(&table, &labels, 80, "1.2.3.4").expect("served");
    assert!(routes.origin.starts_with("VirtualService default/bookinfo"));
    assert_eq!(select(routes, "/productpage", &[]), "http[0]");
    assert_eq!(select(routes, "/admin", &[]), "none");
    let route = &routes.routes()[0];
    assert_eq!(forward(route), [("default/productpage".into(), None, 100)]);
    assert!(at_gateway(&table, &labels, 8080, "x").is_none());
    // Gateway-only: nothing for the mesh.
    assert!(table.host("default/productpage").is_none());
}

const SPLIT_SCOPES: &str = "
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public}
spec:
  selector: {ingress: public}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: [\"*.example.com\", \"./reviews.default.svc.cluster.local\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews, reviews.example.com]
  gateways: [mesh, public]
  http:
  - match:
    - headers: {qa: {exact: canary-test}}
      gateways: [public]
    route:
    - destination: {host: reviews, port: {number: 9080}}
      weight: 100
  - route:
    - destination: {host: reviews-v1}
";

#[test]
fn per_match_gateways_and_mesh_apply_as_in_istio() {
    let table = table(&[("vs.yaml", SPLIT_SCOPES)]);
    // The mesh keeps the rules that name it: the gateway-only match is gone.
    let mesh = host(&table, "default/reviews");
    assert_eq!(mesh.routes().len(), 1, "{mesh:?}");
    assert_eq!(select(mesh, "/", &[("qa", "canary-test")]), "http[1]");
    // The Gateway selects nodes labelled `ingress: public` only.
    let unlabelled = Labels::default();
    assert!(at_gateway(&table, &unlabelled, 8080, "reviews.example.com").is_none());
    let public = Labels::from_iter([("ingress", "public")]);
    let gateway = at_gateway(&table, &public, 8080, "Reviews.Example.com:8080").unwrap();
    assert_eq!(select(gateway, "/", &[("qa", "canary-test")]), "http[0]");
    assert_eq!(select(gateway, "/", &[]), "http[1]");
    // The short host, qualified, is admitted by the `./` host.
    let fqdn = "reviews.default.svc.cluster.local";
    assert!(at_gateway(&table, &public, 8080, fqdn).is_some());
    // A destination without a port gets the Service's only port.
    let v1 = &gateway.routes()[1];
    let super::RouteAction::Forward(to) = &v1.action else {
        panic!("{v1:?}")
    };
    assert_eq!(to[0].destination.port, Some(9080));
}

#[test]
fn conflicts_missing_gateways_and_tls_servers_are_warnings() {
    let second = BOOKINFO_GATEWAY
        .replace("name: bookinfo-gateway", "name: zz-gateway")
        .replace("name: bookinfo\n", "name: orphan\n")
        .replace("- bookinfo-gateway", "- nowhere");
    let https = "
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [\"*\"]
    tls: {mode: SIMPLE, credentialName: cert}
  - port: {number: 8081, name: http, protocol: HTTP}
    hosts: [\"*\"]
";
    let table = table(&[
        ("a.yaml", BOOKINFO_GATEWAY),
        ("b.yaml", &second),
        ("c.yaml", https),
    ]);
    let warnings = table.warnings.join("\n");
    for part in [
        "Gateway default/zz-gateway (",
        "b.yaml): spec.servers[0].hosts[0]: host * on port 80 is already claimed by Gateway \
         default/bookinfo-gateway",
        "VirtualService default/orphan (",
        "spec.gateways[0]: Gateway default/nowhere does not exist",
        "Gateway default/secure (",
        "spec.servers[0]: spec.servers[0].tls.credentialName: Secret cert not found (looked in \
         default, istio-system)",
    ] {
        assert!(warnings.contains(part), "{part:?} not in {warnings}");
    }
    let ports = table.ingress().ports(&Labels::default());
    assert_eq!(ports.keys().copied().collect::<Vec<_>>(), [80, 8081]);
}

const L4: &str = "
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [a.example.com, \"*.b.example.com\"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 7000, name: tcp, protocol: TCP}
    hosts: [\"*\"]
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: l4}
spec:
  hosts: [\"*\"]
  gateways: [edge, mesh]
  tls:
  - match: [{sniHosts: [a.example.com, c.example.com]}]
    route: [{destination: {host: reviews, port: {number: 9080}}}]
  - match: [{port: 443, sniHosts: [\"*.b.example.com\"]}]
    route:
    - {destination: {host: reviews, subset: v1, port: {number: 9080}}, weight: 20}
    - {destination: {host: reviews, subset: v2, port: {number: 9080}}, weight: 80}
  tcp:
  - match: [{port: 7001}]
    route: [{destination: {host: ratings}}]
  - route: [{destination: {host: ratings}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

#[test]
fn tls_and_tcp_rules_bind_to_passthrough_and_tcp_servers() {
    let table = table(&[("l4.yaml", L4)]);
    let labels = Labels::default();
    let ingress = table.ingress();
    let rule = |port, server: &str, sni| {
        let at = super::ingress::ServerRef {
            gateway: "default/edge".into(),
            server: server.into(),
        };
        let only = (port == 443).then_some(&at);
        let selected = ingress
            .select_l4(&labels, port, only, sni)
            .expect("a server");
        selected.routes.map(|r| r.field().to_owned())
    };
    let tls = "spec.servers[0]";
    assert_eq!(
        rule(443, tls, Some("a.example.com")).as_deref(),
        Some("spec.tls[0]")
    );
    assert_eq!(
        rule(443, tls, Some("X.B.example.com.")).as_deref(),
        Some("spec.tls[1]")
    );
    // Not a host of the server: left out of the rule, and reported.
    assert_eq!(rule(443, tls, Some("c.example.com")), None);
    assert_eq!(rule(443, tls, None), None);
    let warnings = table.warnings.join("\n");
    assert!(
        warnings.contains("spec.tls[0]: sniHost c.example.com is not among the hosts of Gateway"),
        "{warnings}"
    );
    // The match for another port is dropped; the catch-all rule applies.
    assert_eq!(rule(7000, "", None).as_deref(), Some("spec.tcp[1]"));
    let server = &ingress.select_l4(&labels, 7000, None, None).unwrap().server;
    let to = server.l4_routes[0].destinations();
    // A destination without a port gets the Service's only port.
    assert_eq!(to[0].destination.port, Some(9080));
    // A TLS port has no TCP server.
    assert!(ingress.select_l4(&labels, 443, None, None).is_none());
    // On the mesh they stay accepted, not enforced; no HTTP host is claimed.
    assert!(
        warnings.contains("spec.tls: accepted, not enforced on the mesh"),
        "{warnings}"
    );
    assert!(ingress.select(&labels, 80, "x").unwrap().routes.is_none());
}
