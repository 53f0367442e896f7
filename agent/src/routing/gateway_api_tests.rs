//! Gateway API Gateways through the configuration loader: HTTPRoutes
//! attached by `parentRefs` where the listeners allow them, and the status
//! conditions computed for each object.

use crate::config::Labels;

use super::gateway_api::{Condition, ObjectStatus, StatusKind};
use super::tests::{forward, select, table};
use super::{RouteAction, RoutingTable};

/// A nodemesh class, a Gateway in `infra` with an HTTP listener for
/// `*.example.com` admitting routes of every namespace, one only for
/// `infra`'s own on port 8080, and an HTTPS one whose Secret is missing.
pub(super) const GATEWAY: &str = concat!(
    include_str!("../../../deploy/kubernetes/05-gatewayclass.yaml"),
    "---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: other}
spec: {controllerName: example.com/other}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: infra}
spec:
  gatewayClassName: nodemesh
  listeners:
  - name: web
    port: 80
    protocol: HTTP
    hostname: \"*.example.com\"
    allowedRoutes: {namespaces: {from: All}}
  - name: own
    port: 8080
    protocol: HTTP
  - name: secure
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: missing-cert}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: infra}
spec:
  gatewayClassName: other
  listeners: [{name: web, port: 81, protocol: HTTP}]
",
);

const ROUTES: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs:
  - {name: public, namespace: infra}
  - {group: \"\", kind: Service, name: reviews, port: 9080}
  hostnames: [reviews.example.com]
  rules:
  - matches: [{headers: [{name: qa, value: canary-test}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs: [{name: reviews-v1, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: elsewhere}
spec:
  parentRefs:
  - {name: public, namespace: infra, sectionName: own}
  - {name: public, namespace: infra, sectionName: web}
  - {name: absent, namespace: infra}
  - {name: theirs, namespace: infra}
  hostnames: [shop.other.org]
  rules:
  - backendRefs: [{name: productpage, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken}
spec:
  parentRefs: [{name: public, namespace: infra, sectionName: web}]
  hostnames: [broken.example.com]
  rules:
  - backendRefs: [{name: no-such-service, port: 80}]
";

fn loaded() -> RoutingTable {
    let infra = "apiVersion: v1\nkind: Namespace\nmetadata: {name: infra}\n";
    table(&[
        ("ns.yaml", infra),
        ("gw.yaml", GATEWAY),
        ("routes.yaml", ROUTES),
    ])
}

pub(super) fn status<'t>(table: &'t RoutingTable, kind: &str, name: &str) -> &'t ObjectStatus {
    let mut found = table.gateway_api_status().iter();
    found
        .find(|s| s.kind == kind && s.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no status of {kind} {name}: {:#?}",
                table.gateway_api_status()
            )
        })
}

/// `(type, status, reason)` of a condition.
pub(super) type Short = (&'static str, bool, &'static str);

/// The conditions of each parent of a route.
fn route_conditions(table: &RoutingTable, name: &str) -> Vec<(String, Vec<Short>)> {
    conditions_of(table, "HTTPRoute", name)
}

/// The conditions of each parent of a route of `kind`.
pub(super) fn conditions_of(
    table: &RoutingTable,
    kind: &str,
    name: &str,
) -> Vec<(String, Vec<Short>)> {
    let StatusKind::Route { parents } = &status(table, kind, name).status else {
        panic!("not a route status");
    };
    parents
        .iter()
        .map(|p| {
            let parent = format!(
                "{}/{}:{}",
                p.namespace,
                p.name,
                p.section_name.as_deref().unwrap_or("")
            );
            (parent, p.conditions.iter().map(short).collect())
        })
        .collect()
}

pub(super) fn short(c: &Condition) -> Short {
    (c.kind, c.status, c.reason)
}

#[test]
fn an_attached_route_serves_its_hostname_at_the_listener_and_the_mesh() {
    let table = loaded();
    let labels = Labels::default();
    let selected = table
        .ingress()
        .select(&labels, 80, "Reviews.Example.com")
        .expect("served");
    assert_eq!(selected.gateway.key, "infra/public");
    let routes = &selected.routes.expect("routes bound").routes;
    assert!(
        routes.origin.starts_with("HTTPRoute default/reviews"),
        "{}",
        routes.origin
    );
    assert_eq!(select(routes, "/", &[("qa", "canary-test")]), "rules[0]");
    assert_eq!(
        forward(&routes.routes()[1]),
        [("default/reviews-v1".into(), None, 1)]
    );
    // Another host of the listener's domain has no route (404).
    let other = table
        .ingress()
        .select(&labels, 80, "x.example.com")
        .expect("listener admits it");
    assert!(other.routes.is_none());
    // The Service parent applies too, with the same rules.
    let mesh = super::tests::host(&table, "default/reviews");
    assert_eq!(select(mesh, "/", &[("qa", "canary-test")]), "rules[0]");
    assert_eq!(
        route_conditions(&table, "reviews"),
        [(
            "infra/public:".into(),
            vec![
                ("Accepted", true, "Accepted"),
                ("ResolvedRefs", true, "ResolvedRefs")
            ]
        )]
    );
}

#[test]
fn listeners_refuse_routes_they_do_not_allow_and_say_why() {
    let table = loaded();
    assert_eq!(
        route_conditions(&table, "elsewhere"),
        [
            (
                "infra/public:own".into(),
                vec![
                    ("Accepted", false, "NotAllowedByListeners"),
                    ("ResolvedRefs", true, "ResolvedRefs")
                ]
            ),
            (
                "infra/public:web".into(),
                vec![
                    ("Accepted", false, "NoMatchingListenerHostname"),
                    ("ResolvedRefs", true, "ResolvedRefs")
                ]
            ),
            (
                "infra/absent:".into(),
                vec![
                    ("Accepted", false, "NoMatchingParent"),
                    ("ResolvedRefs", true, "ResolvedRefs")
                ]
            ),
        ],
        "a Gateway of another class is not reported on"
    );
    let labels = Labels::default();
    let own = table
        .ingress()
        .select(&labels, 8080, "shop.other.org")
        .expect("listener with any host");
    assert!(own.routes.is_none(), "not attached from another namespace");
    let warnings = table.warnings.join("\n");
    assert!(
        warnings.contains(
            "spec.parentRefs[0]: listener own does not allow HTTPRoutes of namespace default"
        ),
        "{warnings}"
    );
    // Gateways of other classes are left to their controllers.
    assert!(table.ingress().select(&labels, 81, "x").is_none());
}

#[test]
fn a_missing_backend_answers_500_and_is_reported_without_failing_the_load() {
    let table = loaded();
    assert_eq!(
        route_conditions(&table, "broken"),
        [(
            "infra/public:web".into(),
            vec![
                ("Accepted", true, "Accepted"),
                ("ResolvedRefs", false, "BackendNotFound")
            ]
        )]
    );
    let labels = Labels::default();
    let selected = table
        .ingress()
        .select(&labels, 80, "broken.example.com")
        .unwrap();
    let route = &selected.routes.unwrap().routes.routes()[0];
    assert!(
        matches!(
            route.action,
            RouteAction::DirectResponse { status: 500, .. }
        ),
        "{route:?}"
    );
}

#[test]
fn gateway_status_counts_routes_and_reports_listeners_it_cannot_serve() {
    let table = loaded();
    let StatusKind::Gateway {
        conditions,
        listeners,
    } = &status(&table, "Gateway", "public").status
    else {
        panic!("not a Gateway status");
    };
    let conditions: Vec<_> = conditions.iter().map(short).collect();
    assert_eq!(
        conditions,
        [
            ("Accepted", true, "Accepted"),
            ("Programmed", true, "Programmed")
        ]
    );
    let listeners: Vec<_> = listeners
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.attached_routes,
                l.conditions.iter().map(short).collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(
        listeners,
        [
            (
                "web",
                2,
                vec![
                    ("Accepted", true, "Accepted"),
                    ("Programmed", true, "Programmed"),
                    ("ResolvedRefs", true, "ResolvedRefs")
                ]
            ),
            (
                "own",
                0,
                vec![
                    ("Accepted", true, "Accepted"),
                    ("Programmed", true, "Programmed"),
                    ("ResolvedRefs", true, "ResolvedRefs")
                ]
            ),
            (
                "secure",
                0,
                vec![
                    ("Accepted", true, "Accepted"),
                    ("Programmed", false, "Invalid"),
                    ("ResolvedRefs", false, "InvalidCertificateRef")
                ]
            ),
        ]
    );
    let StatusKind::GatewayClass { conditions } =
        &status(&table, "GatewayClass", "nodemesh").status
    else {
        panic!("not a class status");
    };
    assert_eq!(
        conditions.iter().map(short).collect::<Vec<_>>(),
        [("Accepted", true, "Accepted")]
    );
    assert!(table
        .gateway_api_status()
        .iter()
        .all(|s| s.name != "other" && s.name != "theirs"));
}

#[test]
fn addresses_and_unsupported_protocols_are_refused_per_gateway_and_listener() {
    let gateway = concat!(
        include_str!("../../../deploy/kubernetes/05-gatewayclass.yaml"),
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: fixed}
spec:
  gatewayClassName: nodemesh
  addresses: [{value: 192.0.2.1}]
  listeners: [{name: web, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: tcp}
spec:
  gatewayClassName: nodemesh
  listeners: [{name: raw, port: 9000, protocol: TCP}, {name: web, port: 8000, protocol: HTTP}]
",
    );
    let table = table(&[("gw.yaml", gateway)]);
    let labels = Labels::default();
    assert!(table.ingress().select(&labels, 80, "x").is_none());
    assert!(table.ingress().select(&labels, 9000, "x").is_none());
    assert!(table.ingress().select(&labels, 8000, "x").is_some());
    let StatusKind::Gateway { conditions, .. } = &status(&table, "Gateway", "fixed").status else {
        panic!();
    };
    assert_eq!(
        short(&conditions[0]),
        ("Accepted", false, "UnsupportedAddress")
    );
    let StatusKind::Gateway { listeners, .. } = &status(&table, "Gateway", "tcp").status else {
        panic!();
    };
    assert_eq!(
        short(&listeners[0].conditions[0]),
        ("Accepted", false, "UnsupportedProtocol")
    );
}
