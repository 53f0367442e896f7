//! Security policy as pure data: Istio `PeerAuthentication` and
//! `AuthorizationPolicy` (security.istio.io), compiled at load time into
//! decisions that the data path and `nodemesh explain` both ask through
//! the same functions, so that what is explained is what is enforced.

pub mod authorization;
mod peer_authentication;
pub(crate) mod target;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{check_labels, Issues};

pub use authorization::Authorizations;
pub(crate) use peer_authentication::{peer_authentication, PeerAuthenticationDraft};
pub use peer_authentication::{MtlsDecision, MtlsMode, PeerAuthentications};

/// Istio's `WorkloadSelector`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct WorkloadSelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

/// A policy's `selector.matchLabels`, checked; `None` without a selector or
/// with one without labels (Istio reads both as namespace-wide).
pub(crate) fn selector_labels(
    selector: Option<WorkloadSelectorSpec>,
    issues: &mut Issues,
) -> Option<BTreeMap<String, String>> {
    let labels = selector
        .map(|s| s.match_labels)
        .filter(|labels| !labels.is_empty())?;
    check_labels(&labels, "spec.selector.matchLabels", issues);
    Some(labels)
}
