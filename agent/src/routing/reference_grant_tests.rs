//! ReferenceGrants through the configuration loader: a Gateway's Secret and
//! an HTTPRoute's backend in another namespace are used only with a grant
//! in that namespace naming the referrer and the target.

use crate::config::Labels;

use super::gateway_api::StatusKind;
use super::gateway_api_tests::{short, status, Short};
use super::tests::{forward, table};
use super::{RouteAction, RoutingTable};

/// A Gateway in `infra` whose HTTPS listener takes its Secret from `certs`,
/// and an HTTPRoute in `apps` sending to `reviews` in `default`.
fn gateway_and_route() -> String {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()]).unwrap();
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "shop-cert", "namespace": "certs"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.pem(), "tls.key": signing_key.serialize_pem()},
    });
    format!(
        "{}---
{secret}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: public, namespace: infra}}
spec:
  gatewayClassName: nodemesh
  listeners:
  - name: secure
    port: 443
    protocol: HTTPS
    hostname: shop.example.com
    tls: {{certificateRefs: [{{kind: Secret, name: shop-cert, namespace: certs}}]}}
    allowedRoutes: {{namespaces: {{from: All}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: apps}}
spec:
  parentRefs: [{{name: public, namespace: infra}}]
  rules:
  - backendRefs: [{{name: reviews, namespace: default, port: 9080}}]
",
        include_str!("../../../deploy/kubernetes/05-gatewayclass.yaml")
    )
}

/// A grant in `namespace` from `from_kind` of `from_namespace` to `to`.
fn grant(namespace: &str, from_kind: &str, from_namespace: &str, to: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: allow, namespace: {namespace}}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_namespace}}}]
  to: [{to}]
"
    )
}

fn loaded(grants: &[String]) -> RoutingTable {
    let objects = gateway_and_route();
    let mut files = vec![("gw.yaml", objects.as_str())];
    let names = ["g0.yaml", "g1.yaml", "g2.yaml"];
    files.extend(names.iter().zip(grants).map(|(n, g)| (*n, g.as_str())));
    table(&files)
}

fn listener(table: &RoutingTable) -> Vec<Short> {
    let StatusKind::Gateway { listeners, .. } = &status(table, "Gateway", "public").status else {
        panic!("not a Gateway status");
    };
    listeners[0].conditions.iter().map(short).collect()
}

fn route(table: &RoutingTable) -> Vec<Short> {
    route_of_kind(table, "HTTPRoute")
}

fn route_of_kind(table: &RoutingTable, kind: &str) -> Vec<Short> {
    let StatusKind::Route { parents } = &status(table, kind, "shop").status else {
        panic!("not a route status");
    };
    parents[0].conditions.iter().map(short).collect()
}

/// What the route does at the listener: its backends, or the status it answers.
/// (Service, subset, weight) of each backend, as [`forward`] lists them.
type Backends<'t> = Vec<(String, Option<&'t str>, u32)>;

fn served(table: &RoutingTable) -> Result<Backends<'_>, u16> {
    let labels = Labels::default();
    let selected = table
        .ingress()
        .select(&labels, 443, "shop.example.com")
        .ok_or(0u16)?;
    let route = &selected.routes.ok_or(404u16)?.routes.routes()[0];
    match &route.action {
        RouteAction::DirectResponse { status, .. } => Err(*status),
        _ => Ok(forward(route)),
    }
}

#[test]
fn without_a_grant_cross_namespace_refs_are_refused_by_field() {
    let table = loaded(&[]);
    assert_eq!(
        listener(&table),
        [
            ("Accepted", true, "Accepted"),
            ("Programmed", false, "Invalid"),
            ("ResolvedRefs", false, "RefNotPermitted")
        ]
    );
    assert!(table
        .ingress()
        .select(&Labels::default(), 443, "shop.example.com")
        .is_none());
    let warnings = table.warnings.join("\n");
    assert!(
        warnings.contains(
            "spec.listeners[0].tls.certificateRefs[0]: Secret certs/shop-cert is in another \
             namespace and no ReferenceGrant there allows Gateways of namespace infra"
        ),
        "{warnings}"
    );
}

#[test]
fn grants_in_the_targets_namespaces_let_the_gateway_serve_the_route() {
    let table = loaded(&[
        grant("certs", "Gateway", "infra", "{group: \"\", kind: Secret}"),
        grant(
            "default",
            "HTTPRoute",
            "apps",
            "{group: \"\", kind: Service, name: reviews}",
        ),
    ]);
    assert_eq!(
        listener(&table),
        [
            ("Accepted", true, "Accepted"),
            ("Programmed", true, "Programmed"),
            ("ResolvedRefs", true, "ResolvedRefs")
        ]
    );
    assert_eq!(
        route(&table),
        [
            ("Accepted", true, "Accepted"),
            ("ResolvedRefs", true, "ResolvedRefs")
        ]
    );
    assert_eq!(
        served(&table),
        Ok(vec![("default/reviews".to_owned(), None, 1)])
    );
}

#[test]
fn a_grant_must_name_the_referrer_and_the_target() {
    // Only the certificate is granted: the backend stays refused (500).
    let certificate = grant(
        "certs",
        "Gateway",
        "infra",
        "{group: \"\", kind: Secret, name: shop-cert}",
    );
    let wrong = [
        // A grant in the referrer's namespace, not the target's.
        grant("apps", "HTTPRoute", "apps", "{group: \"\", kind: Service}"),
        // Another Service by name.
        grant(
            "default",
            "HTTPRoute",
            "apps",
            "{group: \"\", kind: Service, name: ratings}",
        ),
    ];
    let table = loaded(&[certificate.clone(), wrong[0].clone(), wrong[1].clone()]);
    assert_eq!(
        route(&table),
        [
            ("Accepted", true, "Accepted"),
            ("ResolvedRefs", false, "RefNotPermitted")
        ]
    );
    assert_eq!(served(&table), Err(500));
    // From another namespace, or for another Secret: the listener is not served.
    for other in [
        grant("certs", "Gateway", "apps", "{group: \"\", kind: Secret}"),
        grant(
            "certs",
            "Gateway",
            "infra",
            "{group: \"\", kind: Secret, name: other}",
        ),
        grant("certs", "HTTPRoute", "infra", "{group: \"\", kind: Secret}"),
    ] {
        let table = loaded(&[other]);
        assert_eq!(
            listener(&table)[2],
            ("ResolvedRefs", false, "RefNotPermitted")
        );
    }
}

#[test]
fn a_grant_without_from_or_to_is_refused() {
    let grant = "apiVersion: gateway.networking.k8s.io/v1alpha2
kind: ReferenceGrant
metadata: {name: empty, namespace: certs}
spec: {from: [], to: [{group: \"\", kind: Secret}]}
";
    let errors = super::tests::load(&[("g.yaml", grant)])
        .expect_err("refused")
        .0;
    let errors: Vec<_> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("ReferenceGrant certs/empty") && errors[0].contains("spec.from"),
        "{errors:?}"
    );
}

#[test]
fn a_grpcroute_backend_needs_a_grant_for_grpcroutes() {
    let objects = gateway_and_route().replace(
        "kind: HTTPRoute\nmetadata: {name: shop",
        "kind: GRPCRoute\nmetadata: {name: shop",
    );
    let certificate = grant("certs", "Gateway", "infra", "{group: \"\", kind: Secret}");
    let service = "{group: \"\", kind: Service, name: reviews}";
    let with = |from_kind: &str| {
        let backend = grant("default", from_kind, "apps", service);
        let files = [
            ("gw.yaml", objects.as_str()),
            ("g0.yaml", certificate.as_str()),
            ("g1.yaml", backend.as_str()),
        ];
        table(&files)
    };
    // A grant for HTTPRoutes does not cover a GRPCRoute.
    let table = with("HTTPRoute");
    let refs = route_of_kind(&table, "GRPCRoute")[1];
    assert_eq!(refs, ("ResolvedRefs", false, "RefNotPermitted"));
    assert_eq!(served(&table), Err(500));
    let table = with("GRPCRoute");
    let refs = route_of_kind(&table, "GRPCRoute")[1];
    assert_eq!(refs, ("ResolvedRefs", true, "ResolvedRefs"));
    assert_eq!(
        served(&table),
        Ok(vec![("default/reviews".to_owned(), None, 1)])
    );
}
