//! Pods as the mesh's workloads: address, labels, service account and node, and for
//! the pods of this node the network namespace the agent enrolls.
//!
//! An agent watches its node's pods (field selector `spec.nodeName`) apart from the other
//! nodes' pods: only its own are enrolled and looked for by UID. The others are needed
//! with address, node, labels and service account, not as metadata only: the agent of a
//! destination accepts a caller's stream only from a workload of the certificate's
//! identity at the source address on the node the stream comes from (`proxy::inbound`),
//! and labels pick subsets. Both are kept as [`PodSummary`]s of those few fields.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ObjectReference;
use serde_json::{json, Map, Value};

use super::kinds::metadata;
use super::netns;
use super::pod_summary::PodSummary;

/// Network namespaces of this node's pods, by pod UID.
pub(super) type LocalNetns = HashMap<String, PathBuf>;

/// What a pod's document is built from, besides the pod.
pub(super) struct Context<'a> {
    /// This node, when the source serves an agent (the CA serves none).
    pub node: Option<&'a str>,
    pub netns: &'a LocalNetns,
}

/// Stands for the network namespace of a pod on another node (never opened).
const ON_OTHER_NODE: &str = "/run/nodemesh/netns-of-pod-on-another-node";
/// Stands for the network namespace of a local pod not found yet; enrolling it fails
/// with this path named, and it is looked for again until it is found.
const NOT_FOUND: &str = "/run/nodemesh/netns-not-found-for-pod";

/// A pod the agent may enroll or route to.
pub(super) struct PodFacts<'a> {
    pub uid: Option<&'a str>,
    pub node: &'a str,
    pub addresses: Vec<IpAddr>,
}

/// The pod's facts, if it is a workload of the mesh: scheduled, given an address, not on
/// the host network (those share the node's own namespace and are never enrolled), not
/// finished and not being deleted.
pub(super) fn facts(pod: &PodSummary) -> Option<PodFacts<'_>> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    let phase = status.phase.as_deref();
    if spec.host_network == Some(true)
        || matches!(phase, Some("Succeeded" | "Failed"))
        || pod.metadata.deletion_timestamp.is_some()
    {
        return None;
    }
    let mut addresses: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|entry| entry.ip.as_deref()?.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) {
        if !addresses.contains(&ip) {
            addresses.insert(0, ip);
        }
    }
    if addresses.is_empty() {
        return None;
    }
    Some(PodFacts {
        uid: pod.metadata.uid.as_deref(),
        node: spec.node_name.as_deref()?,
        addresses,
    })
}

/// The pod as a `Workload` document of the YAML loader.
pub(super) fn workload(pod: &PodSummary, ctx: &Context) -> Option<Value> {
    let facts = facts(pod)?;
    let netns = match facts.uid.filter(|_| ctx.node == Some(facts.node)) {
        Some(uid) => match ctx.netns.get(uid) {
            Some(path) => path.clone(),
            None => Path::new(NOT_FOUND).join(uid),
        },
        None => PathBuf::from(ON_OTHER_NODE),
    };
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.as_deref())
        .unwrap_or("default");
    let mut doc = Map::new();
    doc.insert("apiVersion".into(), json!("nodemesh.io/v1alpha1"));
    doc.insert("kind".into(), json!("Workload"));
    let mut meta = metadata(&pod.metadata);
    if !pod.labels.is_empty() {
        meta["labels"] = json!(pod.labels);
    }
    doc.insert("metadata".into(), meta);
    doc.insert(
        "spec".into(),
        json!({
            "serviceAccount": service_account,
            "netns": netns,
            "addresses": facts.addresses,
            "node": facts.node,
        }),
    );
    Some(Value::Object(doc))
}

/// The pod's API path, which names it in errors.
pub(super) fn path(pod: &PodSummary) -> PathBuf {
    let meta = &pod.metadata;
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    let name = meta.name.as_deref().unwrap_or_default();
    PathBuf::from(format!("/api/v1/namespaces/{namespace}/pods/{name}"))
}

/// The pod, for an Event about it.
pub(super) fn reference(pod: &PodSummary) -> ObjectReference {
    let meta = &pod.metadata;
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// Finds the network namespaces of this node's `pods`; see [`netns::discover`].
pub(super) fn local_netns<'a>(
    pods: impl Iterator<Item = &'a PodSummary>,
    node: &str,
) -> LocalNetns {
    let local: Vec<(String, Vec<IpAddr>)> = pods
        .filter_map(facts)
        .filter(|f| f.node == node)
        .filter_map(|f| Some((f.uid?.to_owned(), f.addresses)))
        .collect();
    netns::discover(&local)
}

/// Whether the pod's network namespace was looked for and not found.
pub(super) fn is_missing(netns: &Path) -> bool {
    netns.starts_with(NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::super::pod_summary::{strip_local, strip_remote};
    use super::*;

    /// A Pod as the API server sends it, in part.
    fn pod(host_network: bool, phase: &str) -> PodSummary {
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "uid-1", "resourceVersion": "7",
                "generateName": "web-", "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web", "uid": "rs"}],
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            },
            "spec": {
                "nodeName": "node-a", "serviceAccountName": "web", "hostNetwork": host_network,
                "containers": [{"name": "app", "image": "web", "ports": [{"containerPort": 80}]}],
                "volumes": [{"name": "token", "projected": {"sources": []}}],
            },
            "status": {
                "phase": phase, "podIP": "10.1.0.5",
                "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn a_pod_is_kept_as_the_fields_read_and_becomes_a_workload() {
        let mut local = pod(false, "Running");
        strip_local(&mut local);
        let meta = &local.metadata;
        assert!(meta.managed_fields.is_none() && meta.annotations.is_none());
        assert!(meta.owner_references.is_none() && meta.generate_name.is_none());
        let netns = LocalNetns::from([("uid-1".into(), PathBuf::from("/proc/42/ns/net"))]);
        let on_node_a = Context {
            node: Some("node-a"),
            netns: &netns,
        };
        let doc = workload(&local, &on_node_a).unwrap();
        assert_eq!(doc["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(
            doc["spec"],
            json!({"serviceAccount": "web", "netns": "/proc/42/ns/net",
                   "addresses": ["10.1.0.5", "fd00::5"], "node": "node-a"})
        );
        assert_eq!(
            path(&local),
            Path::new("/api/v1/namespaces/shop/pods/web-1")
        );

        // On another node's agent: no UID, a stand-in network namespace.
        let mut remote = pod(false, "Running");
        strip_remote(&mut remote);
        assert!(remote.metadata.uid.is_none());
        let on_node_b = Context {
            node: Some("node-b"),
            netns: &LocalNetns::new(),
        };
        let doc = workload(&remote, &on_node_b).unwrap();
        assert_eq!(doc["spec"]["netns"], ON_OTHER_NODE);
        assert_eq!(doc["spec"]["serviceAccount"], "web");
        assert_eq!(doc["metadata"]["labels"], json!({"app": "web"}));

        for not_a_workload in [pod(true, "Running"), pod(false, "Succeeded")] {
            assert!(workload(&not_a_workload, &on_node_a).is_none());
        }
    }
}
