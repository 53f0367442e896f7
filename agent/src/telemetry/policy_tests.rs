//! Telemetry loaded through the configuration loader: scoping, precedence
//! and the errors of what nodemesh cannot apply.

use std::path::PathBuf;

use super::policy::{Format, Mode, Resolved};
use crate::config::{Config, ConfigErrors, LoadOptions};

/// `reviews` and `ratings` in `default` (a Service `ratings` selects the
/// latter), `gate` in the root namespace.
const WORKLOADS: &str = "
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: reviews, namespace: default, labels: {app: reviews}}
spec: {netns: /run/netns/reviews, addresses: [10.0.0.1], node: n1}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: ratings, namespace: default, labels: {app: ratings}}
spec: {netns: /run/netns/ratings, addresses: [10.0.0.2], node: n1}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: other, namespace: shop, labels: {app: ratings}}
spec: {netns: /run/netns/other, addresses: [10.0.0.3], node: n1}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {selector: {app: ratings}, ports: [{port: 9080}]}
";

fn telemetry(namespace: &str, name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\n  creationTimestamp: \"{created}\"\nspec:\n{spec}"
    )
}

fn load(files: &[&str]) -> Result<Config, ConfigErrors> {
    let mut all = vec![(PathBuf::from("workloads.yaml"), WORKLOADS.to_owned())];
    for (i, text) in files.iter().enumerate() {
        all.push((PathBuf::from(format!("t{i}.yaml")), text.to_string()));
    }
    Config::load_documents(&all, &LoadOptions::default())
}

fn resolved(config: &Config, workload: &str, default: Option<Format>) -> Resolved {
    let w = config.workload_by_key(workload).unwrap();
    config.telemetries().for_workload(w, default)
}

/// The formats logged on `mode`, and the filter's verdict on a 200 and a 500.
fn logs(r: &Resolved, mode: Mode) -> Option<(Vec<Format>, bool, bool)> {
    let log = r.side(mode).access_log.as_ref()?;
    let passes = |code| log.filter.as_ref().is_none_or(|f| f.matches(code));
    Some((log.formats.to_vec(), passes(200), passes(500)))
}

#[test]
fn nothing_is_logged_without_a_telemetry_or_the_flag() {
    let config = load(&[]).unwrap();
    let r = resolved(&config, "default/reviews", None);
    assert_eq!(logs(&r, Mode::Client), None);
    assert_eq!(logs(&r, Mode::Server), None);
    assert!(r.client.metrics && r.client.span_reporting);
    assert_eq!(r.client.sampling_percent, None);
    // The flag turns logs on mesh-wide.
    let r = resolved(&config, "default/reviews", Some(Format::Json));
    assert_eq!(
        logs(&r, Mode::Server),
        Some((vec![Format::Json], true, true))
    );
}

#[test]
fn workload_overrides_namespace_overrides_mesh() {
    let mesh = telemetry(
        "istio-system",
        "mesh-default",
        "2024-01-01T00:00:00Z",
        "  accessLogging: [{providers: [{name: envoy}]}]\n  \
         tracing: [{randomSamplingPercentage: 5.0}]\n",
    );
    let namespace = telemetry(
        "default",
        "namespace",
        "2024-01-01T00:00:00Z",
        "  accessLogging:\n  - providers: [{name: envoy-json}]\n    \
         filter: {expression: \"response.code >= 400\"}\n",
    );
    let workload = telemetry(
        "default",
        "reviews",
        "2024-01-01T00:00:00Z",
        "  selector: {matchLabels: {app: reviews}}\n  accessLogging: [{disabled: true}]\n  \
         tracing: [{randomSamplingPercentage: 50, disableSpanReporting: true}]\n  \
         metrics: [{overrides: [{disabled: true, match: {mode: SERVER}}]}]\n",
    );
    let config = load(&[&mesh, &namespace, &workload]).unwrap();
    // reviews: its own policy disables logs; tracing from it; metrics
    // only off on the server side.
    let reviews = resolved(&config, "default/reviews", None);
    assert_eq!(logs(&reviews, Mode::Client), None);
    assert_eq!(reviews.client.sampling_percent, Some(50.0));
    assert!(!reviews.client.span_reporting);
    assert!(reviews.client.metrics && !reviews.server.metrics);
    // ratings: the namespace's JSON with its filter; the mesh's sampling.
    let ratings = resolved(&config, "default/ratings", None);
    assert_eq!(
        logs(&ratings, Mode::Client),
        Some((vec![Format::Json], false, true))
    );
    assert_eq!(ratings.server.sampling_percent, Some(5.0));
    // shop has only the mesh-wide policy.
    let other = resolved(&config, "shop/other", None);
    assert_eq!(
        logs(&other, Mode::Server),
        Some((vec![Format::Text], true, true))
    );
}

#[test]
fn modes_target_refs_and_the_oldest_policy() {
    let client_only = telemetry(
        "default",
        "ratings-client",
        "2024-01-01T00:00:00Z",
        "  targetRefs: [{kind: Service, name: ratings}]\n  \
         accessLogging: [{match: {mode: CLIENT}, providers: [{name: envoy}]}]\n",
    );
    let newer = telemetry(
        "default",
        "ratings-all",
        "2025-01-01T00:00:00Z",
        "  selector: {matchLabels: {app: ratings}}\n  accessLogging: [{}]\n",
    );
    let config = load(&[&newer, &client_only]).unwrap();
    let ratings = resolved(&config, "default/ratings", None);
    assert_eq!(
        logs(&ratings, Mode::Client),
        Some((vec![Format::Text], true, true))
    );
    assert_eq!(logs(&ratings, Mode::Server), None);
    // The Service is in `default`: `shop/other`, with the same labels, is
    // not selected.
    assert_eq!(
        logs(&resolved(&config, "shop/other", None), Mode::Client),
        None
    );
    // Two namespace-wide policies: the older one applies, with a warning.
    let first = telemetry(
        "default",
        "a",
        "2024-01-01T00:00:00Z",
        "  accessLogging: [{}]\n",
    );
    let second = telemetry(
        "default",
        "b",
        "2025-01-01T00:00:00Z",
        "  accessLogging: [{disabled: true}]\n",
    );
    let config = load(&[&second, &first]).unwrap();
    assert!(logs(&resolved(&config, "default/reviews", None), Mode::Server).is_some());
    let warnings = &config.telemetries().warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Telemetry default/b") && w.contains("is older")),
        "{warnings:?}"
    );
}

#[test]
fn errors_name_the_file_object_and_field() {
    let cases = [
        (
            "  accessLogging: [{providers: [{name: stackdriver}]}]\n",
            "spec.accessLogging[0].providers[0].name",
            "unknown access-log provider \"stackdriver\"",
        ),
        (
            "  accessLogging: [{filter: {expression: \"request.headers['x'] == 'a'\"}}]\n",
            "spec.accessLogging[0].filter.expression",
            "response.code >= 400",
        ),
        (
            "  tracing: [{customTags: {a: {literal: {value: b}}}}]\n",
            "spec.tracing[0].customTags",
            "not supported",
        ),
        (
            "  tracing: [{randomSamplingPercentage: 150}]\n",
            "spec.tracing[0].randomSamplingPercentage",
            "between 0 and 100",
        ),
        (
            "  metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]}]\n",
            "spec.metrics[0].overrides[0].match",
            "only ALL_METRICS",
        ),
        (
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
            "spec.targetRefs[0].kind",
            "not supported",
        ),
        (
            "  accessLoging: []\n",
            "spec",
            "unknown field `accessLoging`",
        ),
    ];
    for (spec, field, message) in cases {
        let bad = telemetry("default", "bad", "2024-01-01T00:00:00Z", spec);
        let errors = load(&[&bad]).unwrap_err().to_string();
        assert!(
            errors.contains("t0.yaml: Telemetry default/bad: "),
            "{errors}"
        );
        assert!(errors.contains(field), "{spec}: {errors}");
        assert!(errors.contains(message), "{spec}: {errors}");
    }
}
