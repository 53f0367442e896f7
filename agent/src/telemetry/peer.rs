//! Istio's labels of one side of a call: which workload, its app and
//! version, its canonical service and revision, its principal.
//!
//! A "workload" is what Istio means, the Deployment-level name shared by
//! all its pods, so that series do not multiply with pods. Workload objects
//! are pods; the name is derived as:
//! 1. the label `service.istio.io/workload-name` when set;
//! 2. a Deployment's pod (`<deployment>-<pod-template-hash>-<suffix>`, with
//!    the label `pod-template-hash`): `<deployment>`, as Istio derives it
//!    from the pod's ReplicaSet;
//! 3. otherwise the Workload's own name.

use std::fmt::Write as _;

use crate::config::Workload;

pub const UNKNOWN: &str = "unknown";

/// Overrides the derived workload name.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// The labels Istio reports for one side of a call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl Peer {
    pub fn unknown() -> Peer {
        Peer {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
        }
    }

    /// `principal`: the SPIFFE id, when the reporter knows it.
    pub fn of(w: &Workload, principal: Option<String>) -> Peer {
        let label = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| w.labels.get(n))
                .map(str::to_owned)
        };
        let workload = workload_name(w).to_owned();
        Peer {
            app: label(&["app"]).unwrap_or_else(|| UNKNOWN.into()),
            version: label(&["version"]).unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| workload.clone()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            principal: principal.unwrap_or_else(|| UNKNOWN.into()),
            namespace: w.namespace.clone(),
            workload,
        }
    }

    /// The ingress gateway as a caller (Istio's is `istio-ingressgateway`),
    /// in `namespace` (the root namespace).
    pub fn ingress(namespace: &str, principal: Option<String>) -> Peer {
        let name = crate::identity::INGRESS_SERVICE_ACCOUNT;
        Peer {
            workload: name.into(),
            namespace: namespace.into(),
            principal: principal.unwrap_or_else(|| UNKNOWN.into()),
            app: name.into(),
            version: UNKNOWN.into(),
            canonical_service: name.into(),
            canonical_revision: "latest".into(),
        }
    }

    /// Appends `<side>_workload="…",…` (`side`: `source` or `destination`).
    pub fn render(&self, side: &str, out: &mut String) {
        let labels = [
            ("workload", &self.workload),
            ("workload_namespace", &self.namespace),
            ("principal", &self.principal),
            ("app", &self.app),
            ("version", &self.version),
            ("canonical_service", &self.canonical_service),
            ("canonical_revision", &self.canonical_revision),
        ];
        for (name, value) in labels {
            label(out, &format!("{side}_{name}"), value);
        }
        label(out, &format!("{side}_cluster"), "Kubernetes");
    }
}

/// The Deployment-level name of a workload (see the module documentation).
pub fn workload_name(w: &Workload) -> &str {
    if let Some(name) = w.labels.get(WORKLOAD_NAME_LABEL) {
        return name;
    }
    if let Some(hash) = w.labels.get("pod-template-hash") {
        let replica_set = w.name.rsplit_once('-').map(|(rs, _)| rs);
        if let Some(deployment) = replica_set.and_then(|rs| rs.strip_suffix(hash)) {
            if let Some(deployment) = deployment.strip_suffix('-').filter(|d| !d.is_empty()) {
                return deployment;
            }
        }
    }
    &w.name
}

/// Appends `name="value",` with the value escaped as the text format wants.
pub fn label(out: &mut String, name: &str, value: &str) {
    if !out.is_empty() {
        out.push(',');
    }
    let _ = write!(out, "{name}=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            labels: labels.iter().copied().collect(),
            service_account: "default".into(),
            netns: "/x".into(),
            addresses: vec![],
            node: "n".into(),
        }
    }

    #[test]
    fn deployment_pods_share_the_deployment_name() {
        let pod = workload(
            "reviews-v2-5b64f47978-x7k2p",
            &[("pod-template-hash", "5b64f47978")],
        );
        assert_eq!(workload_name(&pod), "reviews-v2");
        assert_eq!(workload_name(&workload("reviews-v2", &[])), "reviews-v2");
        let named = workload("a-1", &[(WORKLOAD_NAME_LABEL, "a")]);
        assert_eq!(workload_name(&named), "a");
        // A hash that is not in the name leaves the name alone.
        let odd = workload("db-0", &[("pod-template-hash", "abc")]);
        assert_eq!(workload_name(&odd), "db-0");
    }

    #[test]
    fn canonical_labels_follow_istio() {
        let peer = Peer::of(
            &workload("reviews-v2", &[("app", "reviews"), ("version", "v2")]),
            None,
        );
        assert_eq!(peer.canonical_service, "reviews");
        assert_eq!(peer.canonical_revision, "v2");
        assert_eq!(peer.principal, UNKNOWN);
        let bare = Peer::of(&workload("job", &[]), None);
        assert_eq!(
            (
                bare.canonical_service.as_str(),
                bare.canonical_revision.as_str()
            ),
            ("job", "latest")
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        label(&mut out, "a", "x\"y\\z\n");
        label(&mut out, "b", "c");
        assert_eq!(out, "a=\"x\\\"y\\\\z\\n\",b=\"c\"");
    }
}
