//! GRPCRoute through the configuration loader: method and header matches
//! in the GRPCRoute precedence order, on a Service (mesh) and at a Gateway
//! listener, the rule that HTTPRoutes and GRPCRoutes are not merged, and
//! validation naming the field.

use crate::config::Labels;

use super::gateway_api::StatusKind;
use super::gateway_api_tests::{conditions_of, status, GATEWAY};
use super::tests::{assert_error, forward, host, select, table};

/// Rules written in an order their precedence reorders: service
/// characters first, then method characters, then header matches.
const MESH: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews}
spec:
  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]
  rules:
  - name: by-header
    matches: [{headers: [{name: end-user, value: jason}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - name: list-anywhere
    matches: [{method: {type: RegularExpression, method: \"List.*\"}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - name: service
    matches: [{method: {service: bookinfo.Reviews}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - name: get
    matches: [{method: {service: bookinfo.Reviews, method: Get}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: grpc}]}
    backendRefs: [{name: reviews-v2, port: 9080, weight: 3}, {name: reviews-v1, port: 9080}]
  - name: rest
    backendRefs: [{name: reviews-v1, port: 9080}]
";

#[test]
fn methods_and_headers_route_on_a_service_in_grpcroute_precedence() {
    let table = table(&[("grpc.yaml", MESH)]);
    assert_eq!(table.warnings, Vec::<String>::new());
    let reviews = host(&table, "default/reviews");
    assert!(
        reviews.origin.starts_with("GRPCRoute default/reviews ("),
        "{}",
        reviews.origin
    );
    let jason = [("end-user", "jason")];
    for (path, headers, expected) in [
        ("/bookinfo.Reviews/Get", &jason[..], "get"),
        ("/bookinfo.Reviews/Get", &[][..], "get"),
        ("/bookinfo.Reviews/Put", &jason[..], "service"),
        ("/bookinfo.Reviews/ListAll", &[][..], "service"),
        ("/other.Catalog/ListAll", &jason[..], "list-anywhere"),
        ("/other.Catalog/Put", &jason[..], "by-header"),
        ("/other.Catalog/Put", &[][..], "rest"),
        // A service name is matched whole, not as a prefix.
        ("/bookinfo.ReviewsV2/Get", &[][..], "rest"),
    ] {
        assert_eq!(
            select(reviews, path, headers),
            expected,
            "{path} {headers:?}"
        );
    }
    let get = reviews.routes().iter().find(|r| &*r.name == "get").unwrap();
    assert_eq!(
        forward(get),
        [
            ("default/reviews-v2".into(), None, 3),
            ("default/reviews-v1".into(), None, 1)
        ]
    );
    assert_eq!(&*get.headers.as_ref().unwrap().request.set[0].0, "x-route");
}

const AT_GATEWAY: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop}
spec:
  parentRefs: [{name: public, namespace: infra, sectionName: web}]
  hostnames: [shop.example.com]
  rules: [{backendRefs: [{name: productpage, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: GRPCRoute
metadata: {name: grpc}
spec:
  parentRefs: [{name: public, namespace: infra, sectionName: web}]
  hostnames: [grpc.example.com]
  rules:
  - matches: [{method: {service: bookinfo.Reviews}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - backendRefs: [{name: reviews-v1, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: thief}
spec:
  parentRefs: [{name: public, namespace: infra, sectionName: web}]
  hostnames: [\"*.example.com\"]
  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]
";

#[test]
fn at_a_gateway_grpcroutes_attach_but_never_share_a_hostname_with_an_httproute() {
    let infra = "apiVersion: v1\nkind: Namespace\nmetadata: {name: infra}\n";
    let table = table(&[
        ("ns.yaml", infra),
        ("gw.yaml", GATEWAY),
        ("routes.yaml", AT_GATEWAY),
    ]);
    let labels = Labels::default();
    let selected = table
        .ingress()
        .select(&labels, 80, "grpc.example.com")
        .expect("served");
    let routes = &selected.routes.expect("routes bound").routes;
    assert!(
        routes.origin.starts_with("GRPCRoute default/grpc ("),
        "{}",
        routes.origin
    );
    assert_eq!(select(routes, "/bookinfo.Reviews/Get", &[]), "rules[0]");
    assert_eq!(
        select(routes, "/grpc.health.v1.Health/Check", &[]),
        "rules[1]"
    );
    let accepted = |name| conditions_of(&table, "GRPCRoute", name)[0].1[0];
    assert_eq!(accepted("grpc"), ("Accepted", true, "Accepted"));
    // `thief` intersects the older HTTPRoute's shop.example.com: refused
    // there (all of it, as the spec asks), and the HTTPRoute keeps its host.
    assert_eq!(
        accepted("thief"),
        ("Accepted", false, "NotAllowedByListeners")
    );
    let warnings = table.warnings.join("\n");
    assert!(
        warnings.contains("GRPCRoute default/thief (")
            && warnings.contains("listener web already has HTTPRoute default/shop, older"),
        "{warnings}"
    );
    let shop = table
        .ingress()
        .select(&labels, 80, "shop.example.com")
        .unwrap();
    assert!(shop
        .routes
        .unwrap()
        .routes
        .origin
        .starts_with("HTTPRoute default/shop ("));
    let StatusKind::Gateway { listeners, .. } = &status(&table, "Gateway", "public").status else {
        panic!("not a Gateway status");
    };
    assert_eq!(listeners[0].supported_kinds, ["HTTPRoute", "GRPCRoute"]);
    assert_eq!(listeners[0].attached_routes, 2);
}

#[test]
fn on_one_service_port_the_older_kind_wins() {
    let routes = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-http}
spec:
  parentRefs: [{group: \"\", kind: Service, name: ratings}]
  rules: [{backendRefs: [{name: ratings, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: b-grpc}
spec:
  parentRefs:
  - {group: \"\", kind: Service, name: ratings, port: 9080}
  - {group: \"\", kind: Service, name: details, port: 9080}
  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]
";
    let table = table(&[("routes.yaml", routes)]);
    assert!(host(&table, "default/ratings")
        .origin
        .starts_with("HTTPRoute default/a-http ("));
    assert!(host(&table, "default/details")
        .origin
        .starts_with("GRPCRoute default/b-grpc ("));
    let warnings = table.warnings.join("\n");
    assert!(
        warnings.contains("Service default/ratings: GRPCRoute default/b-grpc (")
            && warnings.contains("an HTTPRoute and a GRPCRoute are not merged on one port"),
        "{warnings}"
    );
}

#[test]
fn invalid_grpcroutes_are_refused_with_the_field_named() {
    let route = |rule: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews}}]\n  rules:\n  - {rule}\n"
        )
    };
    for (rule, parts) in [
        (
            "filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]",
            &[
                "spec.rules[0].filters[0].type",
                "not supported on a GRPCRoute",
            ][..],
        ),
        (
            "matches: [{method: {type: Exact}}]",
            &[
                "spec.rules[0].matches[0].method",
                "one or both of service and method",
            ],
        ),
        (
            "matches: [{method: {service: bad-name}}]",
            &[
                "spec.rules[0].matches[0].method.service",
                "not a service name",
            ],
        ),
        (
            "matches: [{method: {type: RegularExpression, method: \"(\"}}]",
            &["spec.rules[0].matches[0].method.method"],
        ),
        (
            "matches: [{headers: [{name: \"bad header\", value: x}]}]",
            &["spec.rules[0].matches[0].headers[0].name"],
        ),
        ("timeouts: {request: 1s}", &["spec.rules[0]", "timeouts"]),
    ] {
        let mut parts = parts.to_vec();
        parts.extend(["g.yaml", "GRPCRoute default/g"]);
        assert_error(&[("g.yaml", &route(rule))], &parts);
    }
    // Accepted but not enforced: reported, not refused.
    let table = table(&[(
        "g.yaml",
        &route("sessionPersistence: {sessionName: s}\n    backendRefs: [{name: reviews-v1, port: 9080}]"),
    )]);
    assert!(
        table
            .warnings
            .iter()
            .any(|w| w.contains("spec.rules[0].sessionPersistence: accepted, not enforced")),
        "{:?}",
        table.warnings
    );
}
