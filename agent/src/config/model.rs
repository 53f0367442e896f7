//! Serde mirror of the accepted documents. The loader strips `apiVersion` and `kind` (it
//! dispatches on them) before deserializing into these; semantic checks happen afterwards.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::Protocol;

/// Default namespace and service account.
pub const DEFAULT: &str = "default";

fn default_name() -> String {
    DEFAULT.to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceDoc {
    pub metadata: Metadata,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Object<S> {
    pub metadata: Metadata,
    pub spec: S,
    /// Written by controllers (exported manifests carry it); never read.
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
}

/// Strict like everything else, since a typo such as `namepsace` would silently move an
/// object, but accepts the rest of Kubernetes' ObjectMeta so exported manifests load as is.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_name")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(rename = "annotations")]
    _annotations: Option<BTreeMap<String, String>>,
    #[serde(rename = "generateName")]
    _generate_name: Option<IgnoredAny>,
    #[serde(rename = "selfLink")]
    _self_link: Option<IgnoredAny>,
    #[serde(rename = "uid")]
    _uid: Option<IgnoredAny>,
    #[serde(rename = "resourceVersion")]
    _resource_version: Option<IgnoredAny>,
    #[serde(rename = "generation")]
    _generation: Option<IgnoredAny>,
    /// RFC 3339; orders conflicting routing objects (the oldest wins, as in Istio).
    pub creation_timestamp: Option<String>,
    #[serde(rename = "deletionTimestamp")]
    _deletion_timestamp: Option<IgnoredAny>,
    #[serde(rename = "deletionGracePeriodSeconds")]
    _deletion_grace_period_seconds: Option<IgnoredAny>,
    #[serde(rename = "ownerReferences")]
    _owner_references: Option<IgnoredAny>,
    #[serde(rename = "finalizers")]
    _finalizers: Option<IgnoredAny>,
    #[serde(rename = "managedFields")]
    _managed_fields: Option<IgnoredAny>,
}

/// core/v1 Node: only its name and addresses are read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDoc {
    pub metadata: Metadata,
    #[serde(rename = "spec")]
    _spec: Option<IgnoredAny>,
    pub status: NodeStatus,
}

#[derive(Deserialize)]
pub struct NodeStatus {
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
}

#[derive(Deserialize)]
pub struct NodeAddress {
    pub r#type: String,
    pub address: String,
}

/// What conflicts between objects of one kind are settled by: the oldest wins, as in Istio.
pub struct Meta {
    pub namespace: String,
    pub name: String,
    pub created: Option<String>,
}

impl Meta {
    pub fn new(metadata: &Metadata) -> Meta {
        Meta {
            namespace: metadata.namespace.clone(),
            name: metadata.name.clone(),
            created: metadata.creation_timestamp.clone(),
        }
    }

    /// Oldest first (RFC 3339 UTC strings sort by time), objects without a
    /// timestamp last, then by namespace/name.
    pub fn rank(&self) -> (bool, &str, &str, &str) {
        let created = self.created.as_deref();
        (
            created.is_none(),
            created.unwrap_or(""),
            &self.namespace,
            &self.name,
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    #[serde(default = "default_name")]
    pub service_account: String,
    pub netns: PathBuf,
    pub addresses: Vec<IpAddr>,
    pub node: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub r#type: Option<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// An address, `None` (headless), or absent/empty (allocate one).
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
}

/// Port numbers are wide so that out-of-range values get a range error, not a type error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    pub name: Option<String>,
    pub port: i64,
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

/// Kubernetes' IntOrString.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(i64),
    Name(String),
}
