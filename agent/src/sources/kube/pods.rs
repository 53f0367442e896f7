//! Pods as the mesh's workloads: address, labels, service account and node, and for
//! the pods of this node the network namespace the agent enrolls.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kube::api::DynamicObject;
use serde_json::{json, Value};

use super::kinds::{pick, strip_metadata, Context, Kind};
use super::netns;

/// Network namespaces of this node's pods, by pod UID.
pub(super) type LocalNetns = HashMap<String, PathBuf>;

/// Stands for the network namespace of a pod on another node (never opened).
const ON_OTHER_NODE: &str = "/run/nodemesh/netns-of-pod-on-another-node";
/// Stands for the network namespace of a local pod not found yet; enrolling it fails
/// with this path named, and it is looked for again until it is found.
const NOT_FOUND: &str = "/run/nodemesh/netns-not-found-for-pod";

/// A pod the agent may enroll or route to.
pub(super) struct PodFacts<'a> {
    pub uid: &'a str,
    pub node: &'a str,
    pub addresses: Vec<IpAddr>,
}

/// Everything but the few fields read.
pub(super) fn strip(pod: &mut DynamicObject) {
    strip_metadata(pod);
    let spec = pod.data.get("spec").map(|s| {
        let kept = ["nodeName", "serviceAccountName", "hostNetwork"];
        Value::Object(pick(s, &kept))
    });
    let status = pod.data.get("status").map(|s| {
        let kept = ["podIP", "podIPs", "phase"];
        Value::Object(pick(s, &kept))
    });
    pod.data = json!({ "spec": spec, "status": status });
}

/// The pod's facts, if it is a workload of the mesh: scheduled, given an address, not on
/// the host network (those share the node's own namespace and are never enrolled), not
/// finished and not being deleted.
pub(super) fn facts(pod: &DynamicObject) -> Option<PodFacts<'_>> {
    let spec = pod.data.get("spec")?;
    let status = pod.data.get("status")?;
    let host_network = spec.get("hostNetwork").and_then(Value::as_bool) == Some(true);
    let phase = status.get("phase").and_then(Value::as_str);
    if host_network
        || matches!(phase, Some("Succeeded" | "Failed"))
        || pod.metadata.deletion_timestamp.is_some()
    {
        return None;
    }
    let mut addresses: Vec<IpAddr> = status
        .get("podIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("ip")?.as_str()?.parse().ok())
        .collect();
    let primary = status.get("podIP").and_then(Value::as_str);
    if let Some(ip) = primary.and_then(|ip| ip.parse().ok()) {
        if !addresses.contains(&ip) {
            addresses.insert(0, ip);
        }
    }
    if addresses.is_empty() {
        return None;
    }
    Some(PodFacts {
        uid: pod.metadata.uid.as_deref()?,
        node: spec.get("nodeName")?.as_str()?,
        addresses,
    })
}

/// The pod as a `Workload` document of the YAML loader.
pub(super) fn workload(kind: &Kind, pod: &DynamicObject, ctx: &Context) -> Option<Value> {
    let facts = facts(pod)?;
    let netns = if ctx.node == Some(facts.node) {
        match ctx.netns.get(facts.uid) {
            Some(path) => path.clone(),
            None => Path::new(NOT_FOUND).join(facts.uid),
        }
    } else {
        PathBuf::from(ON_OTHER_NODE)
    };
    let service_account = pod
        .data
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let mut doc = kind.header(pod);
    doc.insert("apiVersion".into(), json!("nodemesh.io/v1alpha1"));
    doc.insert("kind".into(), json!("Workload"));
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

/// Finds the network namespaces of this node's `pods`; see [`netns::discover`].
pub(super) fn local_netns<'a>(
    pods: impl Iterator<Item = &'a DynamicObject>,
    node: &str,
) -> LocalNetns {
    let local: Vec<(String, Vec<IpAddr>)> = pods
        .filter_map(facts)
        .filter(|f| f.node == node)
        .map(|f| (f.uid.to_owned(), f.addresses))
        .collect();
    netns::discover(&local)
}

/// Whether the pod's network namespace was looked for and not found.
pub(super) fn is_missing(netns: &Path) -> bool {
    netns.starts_with(NOT_FOUND)
}
