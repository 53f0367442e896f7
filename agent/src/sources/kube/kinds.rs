//! The kinds the agent watches, what of each object is kept, and how it becomes a
//! document of the YAML loader (so that both sources are validated by the same per-kind
//! code).
//!
//! Adding a kind is one line in [`WATCHED`] (plus its support in the YAML loader).

use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::discovery::ApiResource;
use serde_json::{json, Map, Value};

use super::endpoint_slices;
use super::object::Object;
use super::secrets;

/// What is kept of an object's fields besides its metadata.
pub(super) type Trim = fn(Map<String, Value>) -> Map<String, Value>;

/// One watched kind.
pub(super) struct Kind {
    pub kind: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Only the objects matching it are listed and watched.
    pub label_selector: Option<&'static str>,
    /// Only the objects matching it are listed and watched.
    pub field_selector: Option<&'static str>,
    /// Read by agents only, not by the CA (which then needs no RBAC for it).
    pub agents_only: bool,
    /// Drops the fields the agent never reads before the object is stored, so that a
    /// large cluster costs the agent only what it needs; what is left, with the header,
    /// is the object's document for the loader.
    pub trim: Trim,
}

pub(super) const ISTIO_NETWORKING: &str = crate::routing::istio_status::GROUP;
const ISTIO_SECURITY: &str = "security.istio.io";
const ISTIO_TELEMETRY: &str = "telemetry.istio.io";
pub(super) const GATEWAY_API: &str = crate::routing::gateway_api::GROUP;

/// Every kind the agent watches, cluster-wide, as [`Object`]s. Pods, by far the most
/// numerous, are watched apart as typed summaries (see `pods`).
pub(super) const WATCHED: &[Kind] = &[
    Kind::core("Namespace", "namespaces", false, nothing).selecting(super::MESH_LABEL_SELECTOR),
    Kind::core("Node", "nodes", false, node),
    Kind::core("Service", "services", true, service),
    Kind::core(
        "EndpointSlice",
        "endpointslices",
        true,
        endpoint_slices::trim,
    )
    .in_group(endpoint_slices::GROUP),
    // Their status is kept as well (see `gateway_status`).
    Kind::spec(ISTIO_NETWORKING, "v1", "VirtualService", "virtualservices")
        .keeping(spec_and_status),
    Kind::spec(ISTIO_NETWORKING, "v1", "Gateway", "gateways").keeping(spec_and_status),
    Kind::spec(
        ISTIO_NETWORKING,
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    Kind::spec(
        ISTIO_SECURITY,
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    Kind::spec(
        ISTIO_SECURITY,
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    Kind::spec(ISTIO_TELEMETRY, "v1", "Telemetry", "telemetries"),
    // Their status is kept: agents write it only when it differs (see `gateway_status`).
    Kind::spec(GATEWAY_API, "v1", "HTTPRoute", "httproutes").keeping(spec_and_status),
    Kind::spec(GATEWAY_API, "v1", "GRPCRoute", "grpcroutes").keeping(spec_and_status),
    // Read by the CA too: a node serving a Gateway gets the ingress's identity.
    Kind::spec(GATEWAY_API, "v1", "Gateway", "gateways").keeping(spec_and_status),
    Kind::spec(GATEWAY_API, "v1", "GatewayClass", "gatewayclasses")
        .cluster_scoped()
        .keeping(spec_and_status),
    Kind::spec(GATEWAY_API, "v1beta1", "ReferenceGrant", "referencegrants").for_agents_only(),
    Kind::core("Secret", "secrets", true, secrets::trim)
        .with_fields(secrets::FIELD_SELECTOR)
        .for_agents_only(),
];

impl Kind {
    const fn core(kind: &'static str, plural: &'static str, namespaced: bool, trim: Trim) -> Kind {
        Kind {
            kind,
            group: "",
            version: "v1",
            plural,
            namespaced,
            label_selector: None,
            field_selector: None,
            agents_only: false,
            trim,
        }
    }

    /// A namespaced kind of which the agent reads `spec`.
    const fn spec(
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        plural: &'static str,
    ) -> Kind {
        Kind {
            kind,
            group,
            version,
            plural,
            namespaced: true,
            label_selector: None,
            field_selector: None,
            agents_only: false,
            trim: spec,
        }
    }

    const fn selecting(self, label_selector: &'static str) -> Kind {
        Kind {
            label_selector: Some(label_selector),
            ..self
        }
    }

    const fn with_fields(self, field_selector: &'static str) -> Kind {
        Kind {
            field_selector: Some(field_selector),
            ..self
        }
    }

    const fn for_agents_only(self) -> Kind {
        Kind {
            agents_only: true,
            ..self
        }
    }

    const fn in_group(self, group: &'static str) -> Kind {
        Kind { group, ..self }
    }

    pub fn api_version(&self) -> String {
        match self.group {
            "" => self.version.to_owned(),
            group => format!("{group}/{}", self.version),
        }
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version: self.api_version(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }

    /// The object's API path, which names it in errors (in place of a file).
    pub fn path(&self, object: &Object) -> PathBuf {
        let meta = &object.metadata;
        let root = match self.group {
            "" => "/api".to_owned(),
            group => format!("/apis/{group}"),
        };
        let name = meta.name.as_deref().unwrap_or_default();
        PathBuf::from(match (&meta.namespace, self.namespaced) {
            (Some(ns), true) => format!(
                "{root}/{}/namespaces/{ns}/{}/{name}",
                self.version, self.plural
            ),
            _ => format!("{root}/{}/{}/{name}", self.version, self.plural),
        })
    }

    const fn cluster_scoped(self) -> Kind {
        Kind {
            namespaced: false,
            ..self
        }
    }

    const fn keeping(self, trim: Trim) -> Kind {
        Kind { trim, ..self }
    }

    /// Drops what is never read before `object` is stored.
    pub fn strip(&self, object: &mut Object) {
        strip_meta(&mut object.metadata);
        object.trim(self.trim);
    }

    /// The object as a document of the loader: `apiVersion`, `kind`, the metadata the
    /// loader reads and the fields kept. Built for one snapshot and dropped after.
    pub fn document(&self, object: &Object) -> Value {
        let mut doc = object.body();
        if self.group == GATEWAY_API {
            // Kept for `gateway_status` only.
            doc.remove("status");
        }
        doc.insert("apiVersion".into(), json!(self.api_version()));
        doc.insert("kind".into(), json!(self.kind));
        doc.insert("metadata".into(), metadata(&object.metadata));
        Value::Object(doc)
    }
}

/// The metadata the loader reads: name, namespace, labels and creation time.
pub(super) fn metadata(meta: &ObjectMeta) -> Value {
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(meta.name));
    if let Some(namespace) = &meta.namespace {
        metadata.insert("namespace".into(), json!(namespace));
    }
    if let Some(labels) = &meta.labels {
        metadata.insert("labels".into(), json!(labels));
    }
    if let Some(created) = &meta.creation_timestamp {
        metadata.insert("creationTimestamp".into(), json!(created));
    }
    Value::Object(metadata)
}

/// Managed fields and annotations (`kubectl apply` keeps a whole copy of the object in
/// one) are never read, nor are owners, finalizers and name prefixes.
pub(super) fn strip_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
}

/// Of a namespace only its metadata is read.
fn nothing(_: Map<String, Value>) -> Map<String, Value> {
    Map::new()
}

fn node(mut object: Map<String, Value>) -> Map<String, Value> {
    let addresses = object
        .get_mut("status")
        .and_then(|status| status.get_mut("addresses"))
        .map(Value::take);
    let mut kept = Map::new();
    kept.insert(
        "status".into(),
        json!({ "addresses": addresses.unwrap_or(json!([])) }),
    );
    kept
}

/// The fields of a Service the loader reads; the API server adds more (`clusterIPs`,
/// `ipFamilies`, `sessionAffinity`...) that the strict schema of the YAML mode refuses.
fn service(object: Map<String, Value>) -> Map<String, Value> {
    let spec = object.get("spec").cloned().unwrap_or(json!({}));
    let mut kept = pick(&spec, &["type", "selector", "clusterIP"]);
    if let Some(Value::Array(ports)) = spec.get("ports") {
        let fields = ["name", "port", "targetPort", "protocol", "appProtocol"];
        let ports = ports.iter().map(|p| Value::Object(pick(p, &fields)));
        kept.insert("ports".into(), Value::Array(ports.collect()));
    }
    let mut object = Map::new();
    object.insert("spec".into(), Value::Object(kept));
    object
}

/// A kind of which the agent reads `spec`.
fn spec(mut object: Map<String, Value>) -> Map<String, Value> {
    let spec = object.remove("spec").unwrap_or(json!({}));
    let mut kept = Map::new();
    kept.insert("spec".into(), spec);
    kept
}

fn spec_and_status(mut object: Map<String, Value>) -> Map<String, Value> {
    let status = object.remove("status");
    let mut kept = spec(object);
    if let Some(status) = status {
        kept.insert("status".into(), status);
    }
    kept
}

/// The given fields of `value`, where present.
pub(super) fn pick(value: &Value, fields: &[&str]) -> Map<String, Value> {
    fields
        .iter()
        .filter_map(|&f| Some((f.to_owned(), value.get(f)?.clone())))
        .collect()
}
