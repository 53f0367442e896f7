//! A Pod as the agent keeps it: the few fields it reads, parsed straight from the API
//! server's JSON. The rest of each Pod (containers, volumes, conditions...) is skipped
//! while parsing and never stored, so that the tens of thousands of pods of a large
//! cluster cost the agent only what it needs (see `pods`).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use serde::Deserialize;

use super::kinds::strip_meta;
use crate::config::Labels;

#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct PodSummary {
    /// Without its labels, which are kept apart ([`PodSummary::labels`]).
    pub metadata: ObjectMeta,
    /// The metadata's labels, moved here when stripped: a map of them costs a
    /// few times as much, for each of a cluster's pods.
    #[serde(skip)]
    pub labels: Labels,
    pub spec: Option<Spec>,
    pub status: Option<Status>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Spec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Status {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct PodIp {
    pub ip: Option<String>,
}

impl Resource for PodSummary {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A pod of this node: its UID finds its network namespace.
pub(super) fn strip_local(pod: &mut PodSummary) {
    strip_meta(&mut pod.metadata);
    pod.labels = pod
        .metadata
        .labels
        .take()
        .map(Labels::from)
        .unwrap_or_default();
}

/// A pod of another node: neither its UID nor its resource version is read.
pub(super) fn strip_remote(pod: &mut PodSummary) {
    strip_local(pod);
    pod.metadata.uid = None;
    pod.metadata.resource_version = None;
}
