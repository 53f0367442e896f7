//! `targetRef` / `targetRefs` of Istio policies (AuthorizationPolicy,
//! Telemetry): nodemesh attaches a policy to a Service's workloads, the
//! only target it has (no waypoint or gateway).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::WorkloadSelectorSpec;
use crate::config::{Issues, Origin, Service};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetRefSpec {
    #[serde(default)]
    group: String,
    kind: String,
    name: String,
    #[serde(default)]
    namespace: String,
}

/// A policy's selector labels and the names of the Services it targets,
/// checked (see [`services`]).
pub(crate) fn scope(
    selector: Option<WorkloadSelectorSpec>,
    target_ref: Option<TargetRefSpec>,
    target_refs: Vec<TargetRefSpec>,
    namespace: &str,
    issues: &mut Issues,
) -> (Option<BTreeMap<String, String>>, Vec<String>) {
    let selector = super::selector_labels(selector, issues);
    let has_selector = selector.is_some();
    let targets = services(target_ref, target_refs, has_selector, namespace, issues);
    (selector, targets)
}

/// The names of the Services a policy of `namespace` targets, checked:
/// either `targetRef` or `targetRefs`, never with a selector, Services of
/// the policy's own namespace only.
fn services(
    target_ref: Option<TargetRefSpec>,
    target_refs: Vec<TargetRefSpec>,
    has_selector: bool,
    namespace: &str,
    issues: &mut Issues,
) -> Vec<String> {
    let (refs, refs_field) = match target_ref {
        Some(one) if target_refs.is_empty() => (vec![one], "spec.targetRef"),
        Some(_) => {
            issues.add(
                "spec.targetRef",
                "set either targetRef or targetRefs, not both",
            );
            (target_refs, "spec.targetRefs")
        }
        None => (target_refs, "spec.targetRefs"),
    };
    if !refs.is_empty() && has_selector {
        issues.add(
            "spec.selector",
            "a policy has either a selector or targetRefs, not both (as in Istio)",
        );
    }
    refs.into_iter()
        .enumerate()
        .filter_map(|(i, target)| {
            let field = match refs_field {
                "spec.targetRef" => refs_field.to_owned(),
                _ => format!("{refs_field}[{i}]"),
            };
            service(target, namespace, &field, issues)
        })
        .collect()
}

fn service(
    target: TargetRefSpec,
    namespace: &str,
    field: &str,
    issues: &mut Issues,
) -> Option<String> {
    if !matches!(target.group.as_str(), "" | "core") || target.kind != "Service" {
        issues.add(
            format!("{field}.kind"),
            format!(
                "{}{} is not supported: nodemesh has no waypoint or gateway to attach to; \
                 target a Service (group \"\", kind Service) or use a selector",
                match target.group.as_str() {
                    "" => String::new(),
                    group => format!("{group}/"),
                },
                target.kind
            ),
        );
        return None;
    }
    if !target.namespace.is_empty() && target.namespace != namespace {
        issues.add(
            format!("{field}.namespace"),
            format!("must be the policy's own namespace {namespace}"),
        );
        return None;
    }
    Some(target.name)
}

/// The selectors of the Services `targets` of `namespace` names; a Service
/// that is missing or selects nothing is a warning (the policy reaches no
/// workload through it).
pub(crate) fn selectors(
    origin: &Origin,
    namespace: &str,
    targets: &[String],
    services: &[Service],
    warnings: &mut Vec<String>,
) -> Vec<crate::config::Labels> {
    let mut selectors = Vec::new();
    for target in targets {
        let service = services
            .iter()
            .find(|s| s.namespace == namespace && &s.name == target);
        match service {
            Some(s) if !s.selector.is_empty() => selectors.push(s.selector.clone()),
            Some(_) => warnings.push(format!(
                "{origin}: targetRefs Service {namespace}/{target} has no selector: \
                 the policy applies to no workload through it"
            )),
            None => warnings.push(format!(
                "{origin}: targetRefs Service {namespace}/{target} does not exist: \
                 the policy applies to no workload through it"
            )),
        }
    }
    selectors
}
