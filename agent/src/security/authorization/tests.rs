//! AuthorizationPolicy loaded through the configuration loader and judged.
//!
//! Policies are Istio's own examples (the AuthorizationPolicy reference
//! and the authorization tasks on istio.io, Apache-2.0), unchanged apart
//! from the namespaces they are applied to.

use std::net::SocketAddr;
use std::path::PathBuf;

use http::HeaderMap;

use super::{Attributes, HttpRequest, HttpView, Verdict};
use crate::config::{Config, ConfigErrors, LoadOptions};

/// `httpbin` and `db` in `foo` (with Service `httpbin`), `sleep` in
/// `default`, `gate` in the root namespace.
const WORKLOADS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {netns: /run/netns/httpbin, addresses: [10.0.0.1], node: n1, serviceAccount: httpbin}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: db, namespace: foo, labels: {app: db}}
spec: {netns: /run/netns/db, addresses: [10.0.0.2], node: n2, serviceAccount: db}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {netns: /run/netns/sleep, addresses: [10.0.0.3], node: n2, serviceAccount: sleep}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: gate, namespace: istio-system, labels: {app: httpbin}}
spec: {netns: /run/netns/gate, addresses: [10.0.0.4], node: n2}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 80}]}
";

fn load_files(files: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let mut all = vec![(PathBuf::from("workloads.yaml"), WORKLOADS.to_owned())];
    all.extend(files.iter().map(|(n, t)| (PathBuf::from(n), t.to_string())));
    Config::load_documents(&all, &LoadOptions::default())
}

fn load(policies: &str) -> Config {
    load_files(&[("policies.yaml", policies)]).unwrap_or_else(|e| panic!("{e}"))
}

fn rejected(policies: &str) -> String {
    match load_files(&[("policies.yaml", policies)]) {
        Ok(_) => panic!("loaded:\n{policies}"),
        Err(e) => e.to_string(),
    }
}

/// A call to `workload` on `port`: from `from` (`ns/sa`, or none for
/// plaintext) with `request` (`METHOD /path`, or none for TCP).
struct Call<'a> {
    from: Option<&'a str>,
    source_ip: &'a str,
    port: u16,
    request: Option<(&'a str, &'a str)>,
    headers: HeaderMap,
}

fn call<'a>(from: Option<&'a str>, request: Option<(&'a str, &'a str)>) -> Call<'a> {
    Call {
        from,
        source_ip: "10.0.0.3",
        port: 80,
        request,
        headers: HeaderMap::new(),
    }
}

fn judge(config: &Config, workload: &str, c: &Call<'_>) -> super::Decision {
    let workload = config.workload_by_key(workload).unwrap();
    let principal = c.from.map(|f| {
        let (ns, sa) = f.split_once('/').unwrap();
        format!("cluster.local/ns/{ns}/sa/{sa}")
    });
    let http = match c.request {
        Some((method, path)) => HttpView::Request(HttpRequest {
            method,
            path,
            host: "httpbin.foo:8000",
            headers: &c.headers,
        }),
        None => HttpView::Tcp,
    };
    let a = Attributes {
        principal: principal.as_deref(),
        namespace: c.from.map(|f| f.split_once('/').unwrap().0),
        source_ip: c.source_ip.parse().unwrap(),
        destination: SocketAddr::new(workload.addresses[0], c.port),
        sni: None,
        http,
    };
    config.authorizations().check(workload, &a)
}

fn allowed(config: &Config, workload: &str, c: &Call<'_>) -> bool {
    judge(config, workload, c).allowed
}

const SLEEP: Option<&str> = Some("default/sleep");
const GET: Option<(&str, &str)> = Some(("GET", "/headers"));

#[test]
fn without_policies_everything_is_allowed() {
    let config = load("");
    let decision = judge(&config, "foo/httpbin", &call(None, GET));
    assert!(decision.allowed);
    assert_eq!(decision.verdict, Verdict::NoPolicy);
}

/// istio.io, "allow-nothing" and "deny-all".
#[test]
fn allow_nothing_and_deny_all_deny_everything() {
    let allow_nothing = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: foo
spec: {}
";
    let config = load(allow_nothing);
    for c in [call(SLEEP, GET), call(None, None), call(SLEEP, None)] {
        let decision = judge(&config, "foo/httpbin", &c);
        assert!(!decision.allowed);
        assert_eq!(
            decision.to_string(),
            "denied: no rule of ALLOW policy foo/allow-nothing matches"
        );
    }
    assert!(
        allowed(&config, "default/sleep", &call(None, GET)),
        "other namespaces"
    );

    let deny_all = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: foo
spec:
  action: DENY
  rules:
  - {}
";
    let config = load(deny_all);
    let decision = judge(&config, "foo/db", &call(SLEEP, None));
    assert_eq!(
        decision.to_string(),
        "denied by DENY policy foo/deny-all, rule 0"
    );
}

/// istio.io, "allow-all" (an empty rule matches everything).
#[test]
fn an_empty_rule_allows_everything() {
    let config = load(
        "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: foo
spec:
  action: ALLOW
  rules:
  - {}
",
    );
    for c in [call(SLEEP, GET), call(None, None)] {
        let decision = judge(&config, "foo/httpbin", &c);
        assert_eq!(
            decision.to_string(),
            "allowed by ALLOW policy foo/allow-all, rule 0"
        );
    }
}

/// The reference's first example: `principals` or `namespaces`, GET only.
const ALLOW_READ: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-read
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/sleep\"]
    - source:
        namespaces: [\"test\"]
    to:
    - operation:
        methods: [\"GET\", \"HEAD\"]
        paths: [\"/headers\", \"/status/*\", \"*.json\"]
";

#[test]
fn allow_list_by_principal_namespace_method_and_path() {
    let config = load(ALLOW_READ);
    let httpbin = "foo/httpbin";
    assert!(allowed(&config, httpbin, &call(SLEEP, GET)));
    assert!(allowed(
        &config,
        httpbin,
        &call(Some("test/any"), Some(("HEAD", "/status/200")))
    ));
    assert!(allowed(
        &config,
        httpbin,
        &call(SLEEP, Some(("GET", "/a/b.json")))
    ));
    assert!(!allowed(
        &config,
        httpbin,
        &call(SLEEP, Some(("POST", "/headers")))
    ));
    assert!(!allowed(
        &config,
        httpbin,
        &call(SLEEP, Some(("GET", "/ip")))
    ));
    assert!(!allowed(&config, httpbin, &call(Some("other/sleep"), GET)));
    assert!(
        !allowed(&config, httpbin, &call(None, GET)),
        "plaintext has no principal"
    );
    // The policy selects only httpbin.
    assert!(allowed(&config, "foo/db", &call(None, None)));
}

#[test]
fn tcp_connections_never_match_allow_rules_with_http_fields() {
    let config = load(ALLOW_READ);
    let decision = judge(&config, "foo/httpbin", &call(SLEEP, None));
    assert!(!decision.allowed, "{decision}");
    // Before the protocol is known, it may still be allowed.
    let workload = config.workload_by_key("foo/httpbin").unwrap();
    let principal = "cluster.local/ns/default/sa/sleep";
    let mut a = Attributes {
        principal: Some(principal),
        namespace: Some("default"),
        source_ip: "10.0.0.3".parse().unwrap(),
        destination: "10.0.0.1:80".parse().unwrap(),
        sni: None,
        http: HttpView::Unknown,
    };
    assert!(config.authorizations().check(workload, &a).allowed);
    assert!(config.authorizations().needs_http(workload));
    // ...but not from a caller no rule names.
    a.principal = Some("cluster.local/ns/other/sa/x");
    a.namespace = Some("other");
    assert!(!config.authorizations().check(workload, &a).allowed);
}

#[test]
fn deny_rules_ignore_http_fields_on_tcp_and_beat_allow() {
    let config = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: foo}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [foo]}}]
    to: [{operation: {methods: [POST]}}]
",
    );
    let httpbin = "foo/httpbin";
    let decision = judge(&config, httpbin, &call(SLEEP, Some(("POST", "/post"))));
    assert_eq!(
        decision.to_string(),
        "denied by DENY policy foo/deny-post, rule 0"
    );
    assert!(allowed(&config, httpbin, &call(SLEEP, GET)));
    // TCP: `methods` is ignored, so every connection from outside foo is denied.
    assert!(!allowed(&config, httpbin, &call(SLEEP, None)));
    assert!(allowed(&config, httpbin, &call(Some("foo/db"), None)));
    // Plaintext callers are in no namespace, so not in foo either.
    assert!(!allowed(&config, httpbin, &call(None, Some(("POST", "/")))));
}

#[test]
fn audit_decides_nothing() {
    let config = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: foo}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: [\"/*\"]}}]}]
",
    );
    let decision = judge(&config, "foo/httpbin", &call(SLEEP, GET));
    assert!(decision.allowed);
    assert_eq!(
        decision.to_string(),
        "allowed: no ALLOW or DENY AuthorizationPolicy applies (audited by foo/audit-all, rule 0)"
    );
}

#[test]
fn root_namespace_policies_apply_everywhere_targets_and_selectors_narrow() {
    let config = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plaintext, namespace: istio-system}
spec:
  action: DENY
  selector: {matchLabels: {app: httpbin}}
  rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-service, namespace: foo}
spec:
  targetRefs:
  - {kind: Service, group: \"\", name: httpbin}
  action: DENY
  rules: [{to: [{operation: {ports: [\"81\"]}}]}]
",
    );
    let decision = judge(&config, "foo/httpbin", &call(None, GET));
    assert_eq!(
        decision.to_string(),
        "denied by DENY policy istio-system/deny-plaintext, rule 0"
    );
    assert!(!allowed(&config, "istio-system/gate", &call(None, GET)));
    assert!(allowed(&config, "foo/db", &call(None, GET)), "not selected");
    let mut other_port = call(SLEEP, GET);
    other_port.port = 81;
    let decision = judge(&config, "foo/httpbin", &other_port);
    assert_eq!(
        decision.to_string(),
        "denied by DENY policy foo/by-service, rule 0"
    );
    assert!(
        allowed(&config, "foo/db", &other_port),
        "not behind the Service"
    );
}

#[test]
fn conditions_ip_blocks_headers_and_hosts() {
    let config = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: conditions, namespace: foo}
spec:
  rules:
  - from: [{source: {ipBlocks: [\"10.0.0.0/24\"], notIpBlocks: [\"10.0.0.9\"]}}]
    to: [{operation: {hosts: [\"HTTPBIN.foo\", \"*.example.com\"], notPorts: [\"8080\"]}}]
    when:
    - {key: \"request.headers[version]\", values: [\"v1\", \"v2*\"]}
    - {key: source.principal, notValues: [\"cluster.local/ns/default/sa/evil\"]}
    - {key: destination.port, values: [\"80\"]}
",
    );
    let mut c = call(SLEEP, GET);
    assert!(!allowed(&config, "foo/httpbin", &c), "no version header");
    c.headers.insert("version", "v2-beta".parse().unwrap());
    assert!(allowed(&config, "foo/httpbin", &c));
    c.source_ip = "10.0.0.9";
    assert!(!allowed(&config, "foo/httpbin", &c));
    c.source_ip = "10.0.1.3";
    assert!(!allowed(&config, "foo/httpbin", &c));
    c.source_ip = "10.0.0.3";
    c.from = Some("default/evil");
    assert!(!allowed(&config, "foo/httpbin", &c));
}

#[test]
fn a_thousand_principals_are_looked_up_not_scanned() {
    let mut rules = String::new();
    for i in 0..1000 {
        rules.push_str(&format!(
            "  - from: [{{source: {{principals: [\"cluster.local/ns/t/sa/caller-{i}\"]}}}}]\n"
        ));
    }
    rules.push_str("  - from: [{source: {namespaces: [\"default\"]}}]\n    to: [{operation: {methods: [\"GET\"]}}]\n");
    let config = load(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: many, namespace: foo}}\nspec:\n  rules:\n{rules}"
    ));
    let workload = config.workload_by_key("foo/httpbin").unwrap();
    let policy = config.authorizations().applicable(workload).next().unwrap();
    assert_eq!(policy.by_principal.len(), 1000);
    assert_eq!(&*policy.scanned, &[1000]);
    let decision = judge(&config, "foo/httpbin", &call(Some("t/caller-777"), None));
    assert_eq!(
        decision.to_string(),
        "allowed by ALLOW policy foo/many, rule 777"
    );
    let decision = judge(&config, "foo/httpbin", &call(SLEEP, GET));
    assert_eq!(
        decision.to_string(),
        "allowed by ALLOW policy foo/many, rule 1000"
    );
    assert!(!allowed(
        &config,
        "foo/httpbin",
        &call(Some("t/caller-1000"), None)
    ));
}

#[test]
fn bad_policies_are_rejected_naming_the_field() {
    let policy = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: bad, namespace: foo}}\nspec:\n{spec}"
        )
    };
    let cases = [
        (
            "  action: CUSTOM\n  provider: {name: ext}\n",
            "spec.action",
            "CUSTOM",
        ),
        (
            "  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n",
            "spec.rules[0].from[0].source.requestPrincipals",
            "JWT",
        ),
        (
            "  rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]\n",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "prefix length",
        ),
        (
            "  rules: [{from: [{source: {ipBlocks: [\"ten\"]}}]}]\n",
            "ipBlocks[0]",
            "not an IP address",
        ),
        (
            "  rules: [{from: [{source: {principals: [\"spiffe://cluster.local/ns/a/sa/b\"]}}]}]\n",
            "principals[0]",
            "without spiffe://",
        ),
        (
            "  rules: [{from: [{source: {principals: [\"cluster.local/*/sa/b\"]}}]}]\n",
            "principals[0]",
            "prefix or as a suffix",
        ),
        (
            "  rules: [{when: [{key: source.ip, values: []}]}]\n",
            "spec.rules[0].when[0].values",
            "at least one value",
        ),
        (
            "  rules: [{when: [{key: \"request.auth.claims[iss]\", values: [a]}]}]\n",
            "spec.rules[0].when[0].key",
            "JWT",
        ),
        (
            "  rules: [{when: [{key: source.user, values: [a]}]}]\n",
            "spec.rules[0].when[0].key",
            "not supported",
        ),
        (
            "  rules: [{to: [{operation: {ports: [\"http\"]}}]}]\n",
            "ports[0]",
            "not a port number",
        ),
        (
            "  rules: [{to: [{operation: {methods: [GET], verbs: [GET]}}]}]\n",
            "verbs",
            "unknown field",
        ),
        (
            "  rules: [{to: [{operation: {}}]}]\n",
            "spec.rules[0].to[0].operation",
            "at least one field",
        ),
        (
            "  rules: [{to: [{operation: {paths: [\"/{*}/x\"]}}]}]\n",
            "paths[0]",
            "templates",
        ),
        (
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
            "spec.targetRefs[0].kind",
            "not supported",
        ),
        ("  action: MAYBE\n", "spec.action", "unknown variant"),
    ];
    for (spec, field, message) in cases {
        let error = rejected(&policy(spec));
        assert!(
            error.contains("AuthorizationPolicy foo/bad")
                && error.contains(field)
                && error.contains(message),
            "{spec}: {error}"
        );
    }
}

#[test]
fn the_server_name_is_judged_once_known() {
    let config = load(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-sni, namespace: foo}
spec:
  rules:
  - when: [{key: connection.sni, values: [\"*.foo.svc\"]}]
",
    );
    let workload = config.workload_by_key("foo/db").unwrap();
    assert!(config.authorizations().needs_sni(workload));
    let mut a = Attributes {
        principal: None,
        namespace: None,
        source_ip: "10.0.0.3".parse().unwrap(),
        destination: "10.0.0.2:5432".parse().unwrap(),
        sni: None,
        http: HttpView::Unknown,
    };
    assert!(
        config.authorizations().check(workload, &a).allowed,
        "not known yet"
    );
    a.http = HttpView::Tcp;
    assert!(
        !config.authorizations().check(workload, &a).allowed,
        "no TLS"
    );
    a.sni = Some("db.foo.svc");
    assert!(config.authorizations().check(workload, &a).allowed);
    a.sni = Some("db.bar.svc");
    assert!(!config.authorizations().check(workload, &a).allowed);
}
