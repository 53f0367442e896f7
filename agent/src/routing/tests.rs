//! Loading routing objects through the configuration loader: upstream
//! examples verbatim, errors, and conflicts between objects.
//!
//! The Istio and Gateway API examples are copied unchanged from Istio's
//! `samples/bookinfo/networking`, istio.io tasks and the Gateway API
//! documentation (all Apache-2.0), so that what users already have keeps
//! loading.

use std::time::Duration;

use http::HeaderMap;

use super::*;
use crate::config::test_support::TestDir;
use crate::config::{Config, ConfigErrors, Labels, LoadOptions};

/// Bookinfo and httpbin, in `default` like the samples.
const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: productpage}
spec: {selector: {app: productpage}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}, {name: admin, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: details}
spec: {selector: {app: details}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1}
spec: {selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2}
spec: {selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, labels: {app: httpbin}}
spec:
  ports:
  - name: http
    port: 8000
    targetPort: 80
  selector:
    app: httpbin
";

// samples/bookinfo/networking/destination-rule-all.yaml
const DESTINATION_RULE_ALL: &str =
    include_str!("../../../deploy/examples/bookinfo/destination-rule-all.yaml");

// samples/bookinfo/networking/destination-rule-all-mtls.yaml
const DESTINATION_RULE_ALL_MTLS: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: productpage\nspec:\n  host: productpage\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\nspec:\n  host: reviews\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n  - name: v2\n    labels:\n      version: v2\n  - name: v3\n    labels:\n      version: v3\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: ratings\nspec:\n  host: ratings\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n  - name: v2\n    labels:\n      version: v2\n  - name: v2-mysql\n    labels:\n      version: v2-mysql\n  - name: v2-mysql-vm\n    labels:\n      version: v2-mysql-vm\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: details\nspec:\n  host: details\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n  - name: v2\n    labels:\n      version: v2\n---\n";

// samples/bookinfo/networking/virtual-service-all-v1.yaml
const VIRTUAL_SERVICE_ALL_V1: &str =
    include_str!("../../../deploy/examples/bookinfo/virtual-service-all-v1.yaml");

// samples/bookinfo/networking/virtual-service-reviews-test-v2.yaml
const REVIEWS_TEST_V2: &str =
    include_str!("../../../deploy/examples/bookinfo/virtual-service-reviews-test-v2.yaml");

// samples/bookinfo/networking/virtual-service-ratings-test-delay.yaml
const RATINGS_TEST_DELAY: &str =
    include_str!("../../../deploy/examples/bookinfo/virtual-service-ratings-test-delay.yaml");

// samples/bookinfo/networking/virtual-service-ratings-test-abort.yaml
const RATINGS_TEST_ABORT: &str =
    include_str!("../../../deploy/examples/bookinfo/virtual-service-ratings-test-abort.yaml");

// samples/bookinfo/networking/virtual-service-reviews-50-v3.yaml
const REVIEWS_50_V3: &str =
    include_str!("../../../deploy/examples/bookinfo/virtual-service-reviews-50-v3.yaml");

// samples/bookinfo/networking/virtual-service-reviews-v3.yaml
const REVIEWS_V3: &str =
    include_str!("../../../deploy/examples/bookinfo/virtual-service-reviews-v3.yaml");

// istio.io tasks/traffic-management/request-timeouts
const REVIEWS_TIMEOUT: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts:\n  - reviews\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v2\n    timeout: 0.5s\n";

// istio.io tasks/traffic-management/mirroring (with the legacy integer percentage)
const HTTPBIN_MIRROR: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n    - httpbin\n  http:\n  - route:\n    - destination:\n        host: httpbin\n        subset: v1\n      weight: 100\n    mirror:\n      host: httpbin\n      subset: v2\n    mirrorPercent: 100\n";

// istio.io tasks/traffic-management/mirroring
const HTTPBIN_SUBSETS: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata:\n  name: httpbin\nspec:\n  host: httpbin\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n  - name: v2\n    labels:\n      version: v2\n";

// istio.io tasks/traffic-management/circuit-breaking (older revision, with
// the deprecated consecutiveErrors)
const CIRCUIT_BREAKER: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata:\n  name: httpbin\nspec:\n  host: httpbin\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: 1\n      http:\n        http1MaxPendingRequests: 1\n        maxRequestsPerConnection: 1\n    outlierDetection:\n      consecutiveErrors: 1\n      interval: 1s\n      baseEjectionTime: 3m\n      maxEjectionPercent: 100\n";

// Istio's integration test "fault abort gRPC", its template filled in.
const GRPC_ABORT: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: default\nspec:\n  hosts:\n  - ratings\n  http:\n  - route:\n    - destination:\n        host: ratings\n    fault:\n      abort:\n        percentage:\n          value: 100\n        grpcStatus: \"UNAVAILABLE\"";

// istio.io: Gateway API for the mesh, traffic shifting.
const HTTPROUTE_SPLIT: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: reviews\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n    port: 9080\n  rules:\n  - backendRefs:\n    - name: reviews-v1\n      port: 9080\n      weight: 90\n    - name: reviews-v2\n      port: 9080\n      weight: 10\n";

// istio.io: Gateway API for the mesh, request routing.
const HTTPROUTE_JASON: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: reviews\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n    port: 9080\n  rules:\n  - matches:\n    - headers:\n      - name: end-user\n        value: jason\n    backendRefs:\n    - name: reviews-v2\n      port: 9080\n  - backendRefs:\n    - name: reviews-v1\n      port: 9080\n";

// Gateway API examples/standard/http-filter.yaml (attached to a Gateway).
const HTTP_FILTER: &str = "#$ Used in:\n#$ - site-src/api-types/httproute.md\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: http-filter-1\nspec:\n  hostnames:\n    - my.filter.com\n  rules:\n    - filters:\n        - type: RequestHeaderModifier\n          requestHeaderModifier:\n            add:\n              - name: my-header\n                value: foo\n      backendRefs:\n        - name: my-filter-svc1\n          weight: 1\n          port: 80\n";

// Gateway API examples/standard/http-route-timeouts/timeout-example.yaml
const TIMEOUT_EXAMPLE: &str = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata:\n  name: timeout-example\nspec:\n  parentRefs:\n  - name: example-gateway\n  hostnames:\n  - \"timeout.example.com\"\n  rules:\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /timeout\n    backendRefs:\n    - name: timeout-svc\n      port: 8080\n    timeouts:\n      request: 10s\n      backendRequest: 2s";

pub(super) fn load(files: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let dir = TestDir::new();
    dir.write("services.yaml", SERVICES);
    for (name, contents) in files {
        dir.write(name, contents);
    }
    Config::load_dir(dir.path(), &LoadOptions::default())
}

#[track_caller]
pub(super) fn table(files: &[(&str, &str)]) -> RoutingTable {
    match load(files) {
        Ok(config) => config.routing().clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Asserts one error, containing every part.
#[track_caller]
pub(super) fn assert_error(files: &[(&str, &str)], parts: &[&str]) {
    let errors = load(files).expect_err("load should fail").0;
    let errors: Vec<_> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    for part in parts {
        assert!(errors[0].contains(part), "{:?} lacks {part:?}", errors[0]);
    }
}

pub(super) fn forward(route: &HttpRoute) -> Vec<(String, Option<&str>, u32)> {
    let RouteAction::Forward(destinations) = &route.action else {
        panic!("{:?} does not forward", route.action)
    };
    destinations
        .iter()
        .map(|d| {
            (
                d.destination.service.to_string(),
                d.destination.subset.as_deref(),
                d.weight,
            )
        })
        .collect()
}

/// Header edits as `(name, value)` pairs of `&str`.
fn pairs(edits: &[(Box<str>, Box<str>)]) -> Vec<(&str, &str)> {
    edits.iter().map(|(n, v)| (&**n, &**v)).collect()
}

fn header_names(names: &[Box<str>]) -> Vec<&str> {
    names.iter().map(|n| &**n).collect()
}

pub(super) fn host<'t>(table: &'t RoutingTable, service: &str) -> &'t VirtualHost {
    table
        .host(service)
        .unwrap_or_else(|| panic!("no routes for {service}"))
}

/// The route a GET of `path` with `headers` selects.
pub(super) fn select<'h>(
    host: &'h VirtualHost,
    path: &str,
    headers: &[(&'static str, &str)],
) -> &'h str {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, value.parse().unwrap());
    }
    let labels = Labels::default();
    let request = RequestInfo {
        method: "GET",
        path,
        query: None,
        scheme: "http",
        authority: "reviews:9080",
        headers: &map,
        port: 9080,
        source_namespace: "default",
        source_labels: &labels,
    };
    host.select(&request)
        .map_or("none", |(route, _)| &route.name)
}

#[test]
fn loads_bookinfo_all_v1() {
    let table = table(&[
        ("destination-rule-all.yaml", DESTINATION_RULE_ALL),
        ("virtual-service-all-v1.yaml", VIRTUAL_SERVICE_ALL_V1),
    ]);
    assert_eq!(table.warnings, Vec::<String>::new());
    assert_eq!(table.route_count(), 4);
    for service in ["productpage", "reviews", "ratings", "details"] {
        let key = format!("default/{service}");
        let host = host(&table, &key);
        assert!(host
            .origin
            .starts_with(&format!("VirtualService default/{service} (")));
        assert!(host.origin.ends_with("virtual-service-all-v1.yaml)"));
        assert_eq!(&*host.routes[0].name, "http[0]");
        assert!(host.routes[0].matches.is_empty());
        assert_eq!(forward(&host.routes[0]), [(key.clone(), Some("v1"), 100)]);
        assert!(
            host.routes[0].retries.is_none(),
            "Istio's default retries apply"
        );
        let policy = table.policy(&key).unwrap();
        assert!(policy
            .origin
            .starts_with(&format!("DestinationRule default/{service} (")));
        assert_eq!(
            policy.subset("v1").unwrap().labels.get("version"),
            Some("v1")
        );
        assert_eq!(policy.policy, TrafficPolicy::default());
    }
    let ratings = table.policy("default/ratings").unwrap();
    let names: Vec<_> = ratings.subsets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2", "v2-mysql", "v2-mysql-vm"]);
}

#[test]
fn istio_mutual_tls_is_enforced_without_warnings() {
    let table = table(&[
        ("destination-rule-all-mtls.yaml", DESTINATION_RULE_ALL_MTLS),
        ("virtual-service-all-v1.yaml", VIRTUAL_SERVICE_ALL_V1),
    ]);
    assert_eq!(table.warnings, Vec::<String>::new());
    for service in ["productpage", "reviews", "ratings", "details"] {
        let key = format!("default/{service}");
        for subset in [None, Some("v1")] {
            let decision = table.upstream_tls(&key, subset, 9080);
            assert_eq!(decision.tls, UpstreamTls::IstioMutual, "{key} {subset:?}");
            let rule = decision.rule.unwrap();
            assert!(
                rule.starts_with(&format!("DestinationRule default/{service} (")),
                "{rule}"
            );
            assert!(rule.ends_with("destination-rule-all-mtls.yaml)"), "{rule}");
        }
    }
}

#[test]
fn destination_rule_tls_at_top_subset_and_port_level() {
    let dr = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 9090}
      tls: {mode: DISABLE}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      tls: {mode: DISABLE}
      portLevelSettings:
      - port: {number: 9080}
        tls: {mode: ISTIO_MUTUAL}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
";
    let table = table(&[("dr.yaml", dr)]);
    assert_eq!(table.warnings, Vec::<String>::new());
    let tls = |subset, port| table.upstream_tls("default/reviews", subset, port).tls;
    use UpstreamTls::{Disable, IstioMutual};
    assert_eq!(tls(None, 9080), IstioMutual, "top level");
    assert_eq!(tls(None, 9090), Disable, "top-level port setting");
    assert_eq!(tls(Some("v1"), 9090), Disable, "v1 sets nothing");
    assert_eq!(tls(Some("v2"), 9090), Disable, "subset level");
    assert_eq!(
        tls(Some("v2"), 9080),
        IstioMutual,
        "the subset's port setting beats the subset's own"
    );
    assert_eq!(
        tls(Some("v3"), 9080),
        IstioMutual,
        "a subset that sets other groups only keeps the rule's tls"
    );
    assert_eq!(tls(Some("missing"), 9090), Disable);
    let policy = table.policy("default/reviews").unwrap();
    for (subset, port) in [(None, 9080), (Some("v2"), 9080), (Some("v2"), 9090)] {
        assert_eq!(
            policy.effective(subset, port).tls,
            Some(tls(subset, port)),
            "effective() and upstream_tls() walk the same levels"
        );
    }
    let decision = table.upstream_tls("default/reviews", Some("v2"), 9080);
    let shown = decision.to_string();
    assert!(
        shown.starts_with("ISTIO_MUTUAL (DestinationRule default/reviews (")
            && shown.ends_with("dr.yaml))"),
        "{shown}"
    );

    let auto = table.upstream_tls("default/ratings", None, 9080);
    assert_eq!(auto, UpstreamTlsDecision::default());
    assert_eq!(auto.to_string(), "auto (no DestinationRule sets tls)");
}

#[test]
fn a_merged_subset_names_the_rule_it_comes_from() {
    let rule = |name: &str, created: &str, subset: &str, mode: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {name}, creationTimestamp: {created}}}\n\
             spec: {{host: reviews, trafficPolicy: {{tls: {{mode: {mode}}}}}, \
             subsets: [{{name: {subset}, labels: {{version: {subset}}}, \
             trafficPolicy: {{tls: {{mode: {mode}}}}}}}]}}\n"
        )
    };
    let rules = rule("old", "2024-01-01T00:00:00Z", "v1", "ISTIO_MUTUAL")
        + &rule("new", "2024-06-01T00:00:00Z", "v2", "DISABLE");
    let table = table(&[("dr.yaml", &rules)]);
    let v2 = table.upstream_tls("default/reviews", Some("v2"), 9080);
    assert_eq!(v2.tls, UpstreamTls::Disable);
    assert!(v2
        .rule
        .unwrap()
        .starts_with("DestinationRule default/new ("));
    let top = table.upstream_tls("default/reviews", None, 9080);
    assert_eq!(top.tls, UpstreamTls::IstioMutual);
    assert!(top
        .rule
        .unwrap()
        .starts_with("DestinationRule default/old ("));
}

#[test]
fn tls_origination_and_a_missing_mode_are_warned_about() {
    let dr = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    tls: {mode: SIMPLE, sni: reviews.example.com}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      tls: {mode: MUTUAL, clientCertificate: /etc/certs/cert.pem, privateKey: /etc/certs/key.pem}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      tls: {sni: reviews}
";
    let table = table(&[("dr.yaml", dr)]);
    let tls = |subset| table.upstream_tls("default/reviews", subset, 9080).tls;
    assert_eq!(tls(None), UpstreamTls::Auto);
    assert_eq!(tls(Some("v1")), UpstreamTls::Auto);
    assert_eq!(
        tls(Some("v2")),
        UpstreamTls::Disable,
        "Istio's default mode"
    );
    let warnings: Vec<_> = table
        .warnings
        .iter()
        .map(|w| w.split_once("dr.yaml): ").unwrap().1)
        .collect();
    assert_eq!(
        warnings,
        [
            "spec.trafficPolicy.tls.mode: SIMPLE is not supported (nodemesh does not originate \
             TLS with your own certificates); automatic mTLS applies instead",
            "spec.subsets[0].trafficPolicy.tls.mode: MUTUAL is not supported (nodemesh does not \
             originate TLS with your own certificates); automatic mTLS applies instead",
            "spec.subsets[1].trafficPolicy.tls.mode: not set: DISABLE (Istio's default), the \
             destination is reached in plaintext",
            "spec.subsets[1].trafficPolicy.tls.sni: accepted, not enforced",
        ]
    );
}

#[test]
fn routes_jason_to_reviews_v2() {
    let table = table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("virtual-service-reviews-test-v2.yaml", REVIEWS_TEST_V2),
    ]);
    let reviews = host(&table, "default/reviews");
    assert_eq!(reviews.routes.len(), 2);
    let m = &reviews.routes[0].matches[0];
    assert!(
        matches!(&m.headers[..], [(name, StringMatch::Exact(v))] if &**name == "end-user" && &**v == "jason")
    );
    assert_eq!(
        forward(&reviews.routes[0]),
        [("default/reviews".to_owned(), Some("v2"), 100)]
    );
    assert_eq!(
        forward(&reviews.routes[1]),
        [("default/reviews".to_owned(), Some("v1"), 100)]
    );
    assert_eq!(
        select(reviews, "/reviews/0", &[("end-user", "jason")]),
        "http[0]"
    );
    assert_eq!(
        select(reviews, "/reviews/0", &[("end-user", "mike")]),
        "http[1]"
    );
    assert_eq!(select(reviews, "/reviews/0", &[]), "http[1]");
}

#[test]
fn injects_bookinfo_faults() {
    let table1 = table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("delay.yaml", RATINGS_TEST_DELAY),
    ]);
    let delay = host(&table1, "default/ratings").routes[0]
        .fault
        .as_ref()
        .unwrap();
    let delay = delay.delay.as_ref().unwrap();
    assert_eq!(delay.fixed_delay, Duration::from_secs(7));
    assert_eq!(delay.percentage, 100.0);

    let table2 = table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("abort.yaml", RATINGS_TEST_ABORT),
    ]);
    let ratings = host(&table2, "default/ratings");
    let abort = ratings.routes[0]
        .fault
        .as_ref()
        .unwrap()
        .abort
        .as_ref()
        .unwrap();
    assert!(matches!(abort.status, AbortStatus::Http(500)));
    assert_eq!(abort.percentage, 100.0);
    assert!(ratings.routes[1].fault.is_none());

    let table3 = table(&[("grpc.yaml", GRPC_ABORT)]);
    let abort = host(&table3, "default/ratings").routes[0]
        .fault
        .as_ref()
        .unwrap();
    let abort = abort.abort.as_ref().unwrap();
    assert!(matches!(abort.status, AbortStatus::Grpc(14)));
    assert_eq!(abort.percentage, 100.0);
}

#[test]
fn shifts_reviews_traffic() {
    let table1 = table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("vs.yaml", REVIEWS_50_V3),
    ]);
    let expected = [
        ("default/reviews".to_owned(), Some("v1"), 50),
        ("default/reviews".to_owned(), Some("v3"), 50),
    ];
    assert_eq!(
        forward(&host(&table1, "default/reviews").routes[0]),
        expected
    );
    let table2 = table(&[("dr.yaml", DESTINATION_RULE_ALL), ("vs.yaml", REVIEWS_V3)]);
    let expected = [("default/reviews".to_owned(), Some("v3"), 100)];
    assert_eq!(
        forward(&host(&table2, "default/reviews").routes[0]),
        expected
    );
}

#[test]
fn canary_by_header_with_retries_and_timeout() {
    let canary = "
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
  - name: canary
    match:
    - headers:
        qa:
          exact: canary-test
    route:
    - destination: {host: reviews, subset: v2}
  - name: stable
    route:
    - destination: {host: reviews.default.svc.cluster.local, subset: v1, port: {number: 9080}}
    timeout: 10s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream,503
";
    let table = table(&[("dr.yaml", DESTINATION_RULE_ALL), ("canary.yaml", canary)]);
    let reviews = host(&table, "default/reviews");
    assert_eq!(select(reviews, "/", &[("qa", "canary-test")]), "canary");
    assert_eq!(select(reviews, "/", &[("qa", "other")]), "stable");
    let stable = &reviews.routes[1];
    let RouteAction::Forward(destinations) = &stable.action else {
        unreachable!()
    };
    assert_eq!(destinations[0].destination.port, Some(9080));
    assert_eq!(stable.timeout, Some(Duration::from_secs(10)));
    let retries = stable.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(2)));
    let expected = RetryOn {
        gateway_error: true,
        connect_failure: true,
        refused_stream: true,
        retriable_status_codes: vec![503],
        ..RetryOn::default()
    };
    assert_eq!(retries.retry_on, expected);

    let table = table_with_timeout();
    let route = &host(&table, "default/reviews").routes[0];
    assert_eq!(route.timeout, Some(Duration::from_millis(500)));
}

fn table_with_timeout() -> RoutingTable {
    table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("timeout.yaml", REVIEWS_TIMEOUT),
    ])
}

#[test]
fn mirrors_httpbin_and_breaks_its_circuit() {
    let table1 = table(&[("dr.yaml", HTTPBIN_SUBSETS), ("vs.yaml", HTTPBIN_MIRROR)]);
    let route = &host(&table1, "default/httpbin").routes[0];
    assert_eq!(route.mirrors.len(), 1);
    let mirror = &route.mirrors[0];
    assert_eq!(&*mirror.destination.service, "default/httpbin");
    assert_eq!(mirror.destination.subset.as_deref(), Some("v2"));
    assert_eq!(mirror.percentage, 100.0);

    let current =
        HTTPBIN_MIRROR.replace("mirrorPercent: 100", "mirrorPercentage:\n      value: 25.5");
    let table2 = table(&[("dr.yaml", HTTPBIN_SUBSETS), ("vs.yaml", &current)]);
    assert_eq!(
        host(&table2, "default/httpbin").routes[0].mirrors[0].percentage,
        25.5
    );

    let table3 = table(&[("cb.yaml", CIRCUIT_BREAKER)]);
    let policy = &table3.policy("default/httpbin").unwrap().policy;
    let pool = policy.connection_pool.as_ref().unwrap();
    assert_eq!(pool.max_connections, Some(1));
    assert_eq!(pool.http1_max_pending_requests, Some(1));
    assert_eq!(pool.max_requests_per_connection, Some(1));
    assert_eq!(pool.http2_max_requests, None);
    let outlier = policy.outlier_detection.as_ref().unwrap();
    let expected = OutlierDetection {
        // The deprecated consecutiveErrors counts gateway errors only.
        consecutive_5xx_errors: 0,
        consecutive_gateway_errors: 1,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(180),
        max_ejection_percent: 100,
        min_health_percent: 0,
    };
    assert_eq!(*outlier, expected);

    let current = CIRCUIT_BREAKER.replace("consecutiveErrors", "consecutive5xxErrors");
    let table4 = table(&[("cb.yaml", &current)]);
    let outlier = table4
        .policy("default/httpbin")
        .unwrap()
        .policy
        .outlier_detection
        .clone();
    let outlier = outlier.unwrap();
    assert_eq!(
        (
            outlier.consecutive_5xx_errors,
            outlier.consecutive_gateway_errors
        ),
        (1, 0)
    );
}

#[test]
fn traffic_policy_levels_and_balancers() {
    let dr = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, creationTimestamp: 2024-05-01T10:00:00Z}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_CONN}
    connectionPool:
      tcp: {connectTimeout: 30ms, idleTimeout: 1h, tcpKeepalive: {time: 7200s, interval: 75s}}
      http: {idleTimeout: 90s, h2UpgradePolicy: UPGRADE}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer:
        consistentHash: {httpHeaderName: X-User}
  subsets:
  - name: v1
    labels: {version: v1, app.kubernetes.io/part-of: bookinfo}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie: {name: user, ttl: 0s}
      outlierDetection: {maxEjectionPercent: 50}
";
    let table = table(&[("dr.yaml", dr)]);
    let policy = table.policy("default/reviews").unwrap();
    assert_eq!(
        policy.policy.load_balancer,
        Some(LoadBalancer::LeastRequest)
    );
    let pool = policy.policy.connection_pool.as_ref().unwrap();
    assert_eq!(pool.connect_timeout, Some(Duration::from_millis(30)));
    assert_eq!(
        pool.idle_timeout,
        Some(Duration::from_secs(90)),
        "http wins over tcp"
    );
    let header = Some(LoadBalancer::ConsistentHash(HashKey::Header(
        "x-user".into(),
    )));
    assert_eq!(policy.effective(None, 9090).load_balancer, header);
    assert_eq!(
        policy.effective(None, 9080).load_balancer,
        Some(LoadBalancer::LeastRequest)
    );
    let v1 = policy.effective(Some("v1"), 9090);
    let cookie = Some(LoadBalancer::ConsistentHash(HashKey::Cookie("user".into())));
    assert_eq!(v1.load_balancer, cookie);
    assert_eq!(v1.outlier_detection.unwrap().max_ejection_percent, 50);
    let fields: Vec<_> = table
        .warnings
        .iter()
        .map(|w| w.rsplit_once(": ").unwrap().0)
        .collect();
    let fields: Vec<_> = fields
        .iter()
        .map(|f| f.rsplit_once(": ").unwrap().1)
        .collect();
    assert_eq!(
        fields,
        [
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
            "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
            "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
        ]
    );
}

#[test]
fn gateway_api_routes_attach_to_services() {
    let table1 = table(&[("split.yaml", HTTPROUTE_SPLIT)]);
    let reviews = host(&table1, "default/reviews");
    assert!(reviews.origin.starts_with("HTTPRoute default/reviews ("));
    let expected = [
        ("default/reviews-v1".to_owned(), None, 90),
        ("default/reviews-v2".to_owned(), None, 10),
    ];
    assert_eq!(forward(&reviews.routes[0]), expected);
    // Attached to port 9080 only, matching every path.
    let m = &reviews.routes[0].matches[0];
    assert_eq!(m.port, Some(9080));
    assert!(matches!(&m.uri, Some(StringMatch::PathPrefix(p)) if &**p == "/"));
    assert!(reviews.routes[0].retries.is_none());

    let table2 = table(&[("jason.yaml", HTTPROUTE_JASON)]);
    let reviews = host(&table2, "default/reviews");
    assert_eq!(
        select(reviews, "/reviews/1", &[("end-user", "jason")]),
        "rules[0]"
    );
    assert_eq!(select(reviews, "/reviews/1", &[]), "rules[1]");
    let expected = [("default/reviews-v1".to_owned(), None, 1)];
    assert_eq!(forward(&reviews.routes[1]), expected);

    // Attached to Gateways only: valid, and nothing for the mesh (the
    // Gateway does not exist; its missing backend is not reported then).
    let table3 = table(&[("f.yaml", HTTP_FILTER), ("t.yaml", TIMEOUT_EXAMPLE)]);
    assert_eq!(table3.route_count(), 0);
    assert_eq!(table3.warnings.len(), 2, "{:#?}", table3.warnings);
    assert!(table3.warnings[0].contains("spec.parentRefs: no parent"));
    assert!(table3.warnings[1]
        .contains("spec.parentRefs[0]: Gateway default/example-gateway does not exist"));
}

#[test]
fn gateway_api_filters_timeouts_and_retries() {
    let route = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
  - matches: [{path: {type: Exact, value: /v1}, method: POST}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: reviews.internal, path: {type: ReplaceFullPath, replaceFullPath: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Version, value: v2}]
        remove: [X-Debug]
    - type: RequestMirror
      requestMirror:
        backendRef: {name: reviews-v2, port: 9080}
        fraction: {numerator: 1, denominator: 4}
    backendRefs:
    - name: reviews-v1
      port: 9080
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier: {add: [{name: x-backend, value: v1}]}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 4, codes: [502, 503]}
  - matches: [{path: {type: RegularExpression, value: '/v[0-9]+'}}]
status:
  parents: []
";
    let table = table(&[("r.yaml", route)]);
    let reviews = host(&table, "default/reviews");
    let names: Vec<_> = reviews.routes.iter().map(|r| &*r.name).collect();
    assert_eq!(
        names,
        ["rules[1]", "rules[0]", "rules[2]"],
        "Exact, PathPrefix, regex"
    );
    let (rewritten, redirected, regex) =
        (&reviews.routes[0], &reviews.routes[1], &reviews.routes[2]);
    assert_eq!(
        rewritten.matches[0].port,
        Some(9080),
        "sectionName is the port's name"
    );
    let RouteAction::Redirect(redirect) = &redirected.action else {
        unreachable!()
    };
    assert_eq!(
        (redirect.scheme.as_deref(), redirect.status),
        (Some("https"), 302)
    );
    assert!(matches!(&redirect.path, Some(PathRewrite::MatchedPrefix(p)) if p == "/new"));
    let rewrite = rewritten.rewrite.as_ref().unwrap();
    assert_eq!(rewrite.authority.as_deref(), Some("reviews.internal"));
    assert!(matches!(&rewrite.path, Some(PathRewrite::Full(p)) if p == "/v2"));
    assert_eq!(
        pairs(&rewritten.headers.as_ref().unwrap().request.set),
        [("x-version", "v2")]
    );
    assert_eq!(
        header_names(&rewritten.headers.as_ref().unwrap().request.remove),
        ["x-debug"]
    );
    assert_eq!(
        &*rewritten.mirrors[0].destination.service,
        "default/reviews-v2"
    );
    assert_eq!(rewritten.mirrors[0].percentage, 25.0);
    let RouteAction::Forward(backends) = &rewritten.action else {
        unreachable!()
    };
    assert_eq!(
        pairs(&backends[0].headers.as_ref().unwrap().response.add),
        [("x-backend", "v1")]
    );
    assert_eq!(rewritten.timeout, Some(Duration::from_secs(10)));
    let retries = rewritten.retries.as_ref().unwrap();
    assert_eq!(
        (retries.attempts, retries.per_try_timeout),
        (4, Some(Duration::from_secs(2)))
    );
    assert_eq!(retries.retry_on.retriable_status_codes, [502, 503]);
    assert!(matches!(
        regex.action,
        RouteAction::DirectResponse { status: 500, .. }
    ));
}

#[test]
fn reports_file_object_and_field() {
    let vs = |http: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
        )
    };
    let cases = [
        (
            vs("  - route: [{destination: {host: reviews}, wieght: 1}]\n"),
            "vs.yaml: VirtualService default/reviews: spec.http[0].route[0].wieght: unknown field `wieght`",
        ),
        (
            vs("  - match: [{uri: {regex: '/a(b'}}]\n    route: [{destination: {host: reviews}}]\n"),
            "vs.yaml: VirtualService default/reviews: spec.http[0].match[0].uri.regex: invalid regex: ",
        ),
        (
            vs("  - route: [{destination: {host: reviews, subset: v4}}]\n"),
            "vs.yaml: VirtualService default/reviews: spec.http[0].route[0].destination.subset: \
             subset v4 is not defined by any DestinationRule for reviews.default",
        ),
        (
            vs("  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 60}\n    - {destination: {host: reviews, subset: v2}, weight: 30}\n"),
            "vs.yaml: VirtualService default/reviews: spec.http[0].route: weights must add up to 100, they add up to 90",
        ),
        (
            vs("  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 50}\n    - destination: {host: reviews, subset: v2}\n"),
            "spec.http[0].route: weights must add up to 100, they add up to 50",
        ),
        (
            vs("  - route: [{destination: {host: reviews}}]\n    timeout: 7 seconds\n"),
            "vs.yaml: VirtualService default/reviews: spec.http[0].timeout: invalid duration \"7 seconds\"",
        ),
        (
            vs("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 2, retryOn: '5xx,bogus'}\n"),
            "vs.yaml: VirtualService default/reviews: spec.http[0].retries.retryOn: unknown retry condition \"bogus\"",
        ),
        (
            vs("  - route: [{destination: {host: reviewz}}]\n"),
            "VirtualService default/reviews: spec.http[0].route[0].destination.host: \"reviewz\" is not a Service",
        ),
        (
            vs("  - route: [{destination: {host: reviews, port: {number: 8080}}}]\n"),
            "spec.http[0].route[0].destination.port.number: 8080 is not a TCP port of Service default/reviews",
        ),
        (
            vs("  - match: [{headers: {'bad header': {exact: x}}}]\n    route: [{destination: {host: reviews}}]\n"),
            "spec.http[0].match[0].headers.bad header: invalid header name \"bad header\"",
        ),
        (
            vs("  - route: [{destination: {host: reviews}}]\n    fault: {abort: {grpcStatus: NOPE}}\n"),
            "spec.http[0].fault.abort.grpcStatus: must be a gRPC status name",
        ),
        (
            vs("  - redirect: {uri: /x, port: 81}\n"),
            "spec.http[0].redirect.port: 81 is not a TCP port of Service default/reviews",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dup}\n\
             spec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v1}]\n"
                .to_owned(),
            "vs.yaml: DestinationRule default/dup: spec.subsets[1].name: duplicate subset v1",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: od}\n\
             spec:\n  host: reviews\n  trafficPolicy: {outlierDetection: {baseEjectionTime: 30}}\n"
                .to_owned(),
            "DestinationRule default/od: spec.trafficPolicy.outlierDetection.baseEjectionTime: invalid type: integer",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
             spec:\n  parentRefs: [{kind: Service, group: '', name: reviews}]\n  rules:\n  \
             - backendRefs: [{name: reviews-v1, weight: 0}, {name: reviews-v2, weight: 0}]\n"
                .to_owned(),
            "vs.yaml: HTTPRoute default/r: spec.rules[0].backendRefs: every weight is 0",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
             spec:\n  parentRefs: [{kind: Service, group: '', name: reviews}]\n  rules:\n  \
             - backendRefs: [{name: reviews-v9, port: 9080}]\n"
                .to_owned(),
            "vs.yaml: HTTPRoute default/r: spec.rules[0].backendRefs[0].name: \"reviews-v9.default\" is not a Service",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
             spec:\n  rules:\n  - timeouts: {request: 1 minute}\n"
                .to_owned(),
            "vs.yaml: HTTPRoute default/r: spec.rules[0].timeouts.request: invalid duration",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
             spec:\n  rules:\n  - filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}]\n"
                .to_owned(),
            "spec.rules[0].filters[0].type: ExtensionRef filters are not supported",
        ),
    ];
    for (doc, expected) in cases {
        assert_error(
            &[("dr.yaml", DESTINATION_RULE_ALL), ("vs.yaml", &doc)],
            &[expected],
        );
    }
}

fn virtual_service(name: &str, created: &str, host: &str, subset: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: {name}, creationTimestamp: '{created}'}}\n\
         spec: {{hosts: ['{host}'], http: [{{route: [{{destination: {{host: reviews, subset: {subset}}}}}]}}]}}\n"
    )
}

#[test]
fn the_oldest_virtual_service_wins() {
    let newer = virtual_service("a-newer", "2024-02-01T00:00:00Z", "reviews", "v2");
    let older = virtual_service("b-older", "2024-01-01T00:00:00Z", "reviews", "v1");
    let table = table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("vs.yaml", &(newer + &older)),
    ]);
    let reviews = host(&table, "default/reviews");
    assert!(reviews
        .origin
        .starts_with("VirtualService default/b-older ("));
    assert_eq!(forward(&reviews.routes[0])[0].1, Some("v1"));
    assert_eq!(table.warnings.len(), 1, "{:#?}", table.warnings);
    let warning = &table.warnings[0];
    assert!(
        warning.starts_with("Service default/reviews: VirtualService default/a-newer ("),
        "{warning}"
    );
    assert!(
        warning.contains("VirtualService default/b-older ("),
        "{warning}"
    );

    // An exact host wins over a wildcard, whatever their age, without a warning.
    let wildcard = virtual_service(
        "all",
        "2020-01-01T00:00:00Z",
        "*.default.svc.cluster.local",
        "v3",
    );
    let exact = virtual_service("exact", "2024-01-01T00:00:00Z", "reviews.default", "v1");
    let both = self::table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("vs.yaml", &(wildcard + &exact)),
    ]);
    assert!(host(&both, "default/reviews")
        .origin
        .starts_with("VirtualService default/exact ("));
    assert!(host(&both, "default/ratings")
        .origin
        .starts_with("VirtualService default/all ("));
    assert_eq!(both.route_count(), 7, "the wildcard binds every Service");
    assert_eq!(both.warnings, Vec::<String>::new());
}

#[test]
fn gateway_only_and_unbound_virtual_services() {
    let gateway_only = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo}
spec:
  hosts: ['*']
  gateways: [bookinfo-gateway]
  http:
  - match: [{uri: {exact: /productpage}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: external}
spec:
  hosts: [api.example.com]
  http:
  - match: [{gateways: [edge]}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
";
    let table = table(&[("vs.yaml", gateway_only)]);
    assert_eq!(table.route_count(), 0);
    let warned = |text: &str| table.warnings.iter().filter(|w| w.contains(text)).count();
    assert_eq!(table.warnings.len(), 3, "{:#?}", table.warnings);
    assert_eq!(
        warned("spec.hosts[0]: \"api.example.com\" matches no Service"),
        1
    );
    // Neither Gateway is in the config.
    assert_eq!(
        warned("spec.gateways[0]: Gateway default/bookinfo-gateway does not exist"),
        1
    );
    assert_eq!(
        warned("spec.http[0].match[0].gateways[0]: Gateway default/edge does not exist"),
        1
    );
}

#[test]
fn destination_rules_merge_subsets() {
    let dr = |name: &str, created: &str, subsets: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {name}, creationTimestamp: '{created}'}}\n\
             spec: {{host: reviews, trafficPolicy: {{loadBalancer: {{simple: RANDOM}}}}, subsets: {subsets}}}\n"
        )
    };
    let older = dr(
        "old",
        "2023-01-01T00:00:00Z",
        "[{name: v1, labels: {version: v1}}]",
    );
    let newer = dr(
        "new",
        "2024-01-01T00:00:00Z",
        "[{name: v1, labels: {version: one}}, {name: v2, labels: {version: v2}}]",
    );
    let table = table(&[("dr.yaml", &(newer + &older))]);
    let policy = table.policy("default/reviews").unwrap();
    assert!(policy.origin.starts_with("DestinationRule default/old ("));
    assert_eq!(
        policy.subset("v1").unwrap().labels.get("version"),
        Some("v1")
    );
    assert_eq!(
        policy.subset("v2").unwrap().labels.get("version"),
        Some("v2")
    );
    assert_eq!(table.warnings.len(), 1);
    let warning = &table.warnings[0];
    assert!(
        warning.contains("DestinationRule default/new ("),
        "{warning}"
    );
    assert!(warning.contains("subsets [v2] are merged"), "{warning}");
    assert!(
        warning.contains("subsets [v1] are already defined and ignored"),
        "{warning}"
    );
}

#[test]
fn virtual_service_wins_over_http_route() {
    let table = table(&[
        ("dr.yaml", DESTINATION_RULE_ALL),
        ("route.yaml", HTTPROUTE_JASON),
        ("vs.yaml", REVIEWS_V3),
    ]);
    let reviews = host(&table, "default/reviews");
    assert!(reviews
        .origin
        .starts_with("VirtualService default/reviews ("));
    assert_eq!(table.warnings.len(), 1);
    assert!(
        table.warnings[0].contains("HTTPRoute default/reviews ("),
        "{}",
        table.warnings[0]
    );
    assert!(table.warnings[0].contains("a VirtualService wins over an HTTPRoute"));
}

#[test]
fn http_routes_for_one_service_merge_by_precedence() {
    let route = |name: &str, created: &str, matches: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: {name}, creationTimestamp: '{created}'}}\n\
             spec:\n  parentRefs: [{{group: '', kind: Service, name: reviews}}]\n  rules:\n  \
             - name: {name}\n    matches: {matches}\n    backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
        )
    };
    let docs = [
        route("catch-all", "2020-01-01T00:00:00Z", "[{path: {value: /}}]"),
        route("api", "2024-01-01T00:00:00Z", "[{path: {value: /api}}]"),
        route(
            "api-get",
            "2024-01-01T00:00:00Z",
            "[{path: {value: /api}, method: GET}]",
        ),
        route(
            "api-header",
            "2024-01-01T00:00:00Z",
            "[{path: {value: /api}, method: GET, headers: [{name: x, value: y}]}]",
        ),
        route("api-old", "2023-01-01T00:00:00Z", "[{path: {value: /api}}]"),
        route(
            "exact",
            "2024-06-01T00:00:00Z",
            "[{path: {type: Exact, value: /api/v1}}]",
        ),
        route(
            "regex",
            "2019-01-01T00:00:00Z",
            "[{path: {type: RegularExpression, value: /api/.*}}]",
        ),
    ]
    .concat();
    let table = table(&[("routes.yaml", &docs)]);
    let reviews = host(&table, "default/reviews");
    let names: Vec<_> = reviews.routes.iter().map(|r| &*r.name).collect();
    assert_eq!(
        names,
        [
            "exact",
            "api-header",
            "api-get",
            "api-old",
            "api",
            "catch-all",
            "regex"
        ]
    );
    assert_eq!(reviews.origin.matches("HTTPRoute default/").count(), 7);
    assert_eq!(table.warnings, Vec::<String>::new());
    assert_eq!(select(reviews, "/api/v1", &[]), "exact");
    assert_eq!(select(reviews, "/apiary", &[]), "catch-all");
}

#[test]
fn istio_actions_matches_and_header_edits() {
    let vs = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  exportTo: ['*']
  http:
  - name: gone
    match:
    - uri: {prefix: /old}
      withoutHeaders: {x-keep: {}}
      queryParams: {debug: {exact: 'yes'}}
      sourceLabels: {app: productpage}
      port: 9080
    redirect: {uri: /new, authority: reviews.example}
  - name: teapot
    match: [{uri: {exact: /tea}, method: {exact: BREW}}]
    directResponse: {status: 418, body: {bytes: SSdtIGEgdGVhcG90}}
  - name: rewritten
    match: [{uri: {regex: '/v[0-9]+/.*'}, ignoreUriCase: true}]
    rewrite: {uriRegexRewrite: {match: '^/v([0-9]+)/', rewrite: '/api/\\1/'}, authority: reviews-v2}
    headers:
      request: {set: {X-Version: v2}, add: {X-Trace: 'on'}, remove: [Cookie]}
      response: {remove: [server]}
    route: [{destination: {host: reviews, subset: v2}, headers: {response: {set: {x-subset: v2}}}}]
    corsPolicy: {allowOrigins: [{exact: 'https://example.com'}], maxAge: 24h}
";
    let table = table(&[("dr.yaml", DESTINATION_RULE_ALL), ("vs.yaml", vs)]);
    let routes = &host(&table, "default/reviews").routes;
    let m = &routes[0].matches[0];
    assert!(matches!(&m.without_headers[..], [(n, StringMatch::Present)] if &**n == "x-keep"));
    assert!(
        matches!(&m.query_params[..], [(n, StringMatch::Exact(v))] if &**n == "debug" && &**v == "yes")
    );
    assert_eq!(
        (m.port, &m.source_labels[..]),
        (Some(9080), &[("app".into(), "productpage".into())][..])
    );
    let RouteAction::Redirect(redirect) = &routes[0].action else {
        unreachable!()
    };
    assert_eq!(
        (redirect.status, redirect.authority.as_deref()),
        (301, Some("reviews.example"))
    );
    assert!(matches!(&redirect.path, Some(PathRewrite::Full(p)) if p == "/new"));
    let RouteAction::DirectResponse { status, body } = &routes[1].action else {
        unreachable!()
    };
    assert_eq!((*status, &body[..]), (418, &b"I'm a teapot"[..]));
    let rewritten = &routes[2];
    assert!(rewritten.matches[0].ignore_uri_case);
    let Some(Rewrite {
        path: Some(PathRewrite::Regex { pattern, rewrite }),
        authority,
    }) = rewritten.rewrite.as_deref()
    else {
        panic!("{:?}", rewritten.rewrite)
    };
    assert_eq!(
        (pattern.as_str(), rewrite.as_str()),
        ("^/v([0-9]+)/", "/api/\\1/")
    );
    assert_eq!(authority.as_deref(), Some("reviews-v2"));
    let request = &rewritten.headers.as_ref().unwrap().request;
    assert_eq!(pairs(&request.set), [("x-version", "v2")]);
    assert_eq!(pairs(&request.add), [("x-trace", "on")]);
    assert_eq!(header_names(&request.remove), ["cookie"]);
    let RouteAction::Forward(destinations) = &rewritten.action else {
        unreachable!()
    };
    assert_eq!(
        pairs(&destinations[0].headers.as_ref().unwrap().response.set),
        [("x-subset", "v2")]
    );
    assert_eq!(table.warnings.len(), 1, "{:#?}", table.warnings);
    assert!(table.warnings[0].ends_with("spec.http[2].corsPolicy: accepted, not enforced"));
    // Anchored: the whole path must match.
    assert_eq!(
        select(host(&table, "default/reviews"), "/v1/x", &[]),
        "rewritten"
    );
    assert_eq!(
        select(host(&table, "default/reviews"), "/x/v1/x", &[]),
        "none"
    );
}
