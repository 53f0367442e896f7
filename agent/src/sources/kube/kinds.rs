//! The kinds the agent watches, and how each API object becomes a document of the
//! YAML loader (so that both sources are validated by the same per-kind code).
//!
//! Adding a kind is one line in [`WATCHED`] (plus its support in the YAML loader).

use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use kube::discovery::ApiResource;
use serde_json::{json, Map, Value};

use super::endpoint_slices;
use super::pods::LocalNetns;
use super::secrets;

/// What an object's document is built from, besides the object.
pub(super) struct Context<'a> {
    /// This node, when the source serves an agent (the CA serves none).
    pub node: Option<&'a str>,
    pub netns: &'a LocalNetns,
}

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
    /// Drops what the agent never reads before the object is stored, so that a large
    /// cluster costs the agent only what it needs.
    pub strip: fn(&mut DynamicObject),
    /// The object as a document of the YAML loader, `None` when it is not config (a pod
    /// without an address yet, or on the host network).
    pub document: fn(&Kind, &DynamicObject, &Context) -> Option<Value>,
}

const ISTIO_NETWORKING: &str = "networking.istio.io";
const ISTIO_SECURITY: &str = "security.istio.io";
const ISTIO_TELEMETRY: &str = "telemetry.istio.io";
pub(super) const GATEWAY_API: &str = crate::routing::gateway_api::GROUP;

/// Every kind the agent watches, cluster-wide, as untyped objects. Pods, by far the
/// most numerous, are watched apart as typed summaries (see `pods`).
pub(super) const WATCHED: &[Kind] = &[
    Kind::core("Namespace", "namespaces", false, namespace).selecting(super::MESH_LABEL_SELECTOR),
    Kind::core("Node", "nodes", false, node),
    Kind::core("Service", "services", true, service),
    Kind::core(
        "EndpointSlice",
        "endpointslices",
        true,
        endpoint_slices::document,
    )
    .in_group(endpoint_slices::GROUP)
    .stripping(endpoint_slices::strip),
    Kind::spec(ISTIO_NETWORKING, "v1", "VirtualService", "virtualservices"),
    Kind::spec(ISTIO_NETWORKING, "v1", "Gateway", "gateways"),
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
    Kind::spec(GATEWAY_API, "v1", "HTTPRoute", "httproutes").stripping(strip_metadata),
    Kind::spec(GATEWAY_API, "v1", "Gateway", "gateways")
        .stripping(strip_metadata)
        .for_agents_only(),
    Kind::spec(GATEWAY_API, "v1", "GatewayClass", "gatewayclasses")
        .cluster_scoped()
        .stripping(strip_metadata)
        .for_agents_only(),
    Kind::core("Secret", "secrets", true, secrets::document)
        .stripping(secrets::strip)
        .with_fields(secrets::FIELD_SELECTOR)
        .for_agents_only(),
];

impl Kind {
    const fn core(
        kind: &'static str,
        plural: &'static str,
        namespaced: bool,
        document: fn(&Kind, &DynamicObject, &Context) -> Option<Value>,
    ) -> Kind {
        Kind {
            kind,
            group: "",
            version: "v1",
            plural,
            namespaced,
            label_selector: None,
            field_selector: None,
            agents_only: false,
            strip: strip_metadata,
            document,
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
            strip: strip_status,
            document: spec_document,
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

    const fn cluster_scoped(self) -> Kind {
        Kind {
            namespaced: false,
            ..self
        }
    }

    const fn in_group(self, group: &'static str) -> Kind {
        Kind { group, ..self }
    }

    const fn stripping(self, strip: fn(&mut DynamicObject)) -> Kind {
        Kind { strip, ..self }
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
    pub fn path(&self, object: &DynamicObject) -> PathBuf {
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

    /// `apiVersion`, `kind` and the metadata the loader reads.
    pub fn header(&self, object: &DynamicObject) -> Map<String, Value> {
        let mut header = Map::new();
        header.insert("apiVersion".into(), json!(self.api_version()));
        header.insert("kind".into(), json!(self.kind));
        header.insert("metadata".into(), metadata(&object.metadata));
        header
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
pub(super) fn strip_metadata(object: &mut DynamicObject) {
    strip_meta(&mut object.metadata);
}

/// [`strip_metadata`] of any object's metadata.
pub(super) fn strip_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
}

fn strip_status(object: &mut DynamicObject) {
    strip_metadata(object);
    if let Value::Object(data) = &mut object.data {
        data.remove("status");
    }
}

fn namespace(kind: &Kind, object: &DynamicObject, _: &Context) -> Option<Value> {
    Some(Value::Object(kind.header(object)))
}

fn node(kind: &Kind, object: &DynamicObject, _: &Context) -> Option<Value> {
    let mut doc = kind.header(object);
    let addresses = object.data.pointer("/status/addresses").cloned();
    doc.insert(
        "status".into(),
        json!({ "addresses": addresses.unwrap_or(json!([])) }),
    );
    Some(Value::Object(doc))
}

/// The fields of a Service the loader reads; the API server adds more (`clusterIPs`,
/// `ipFamilies`, `sessionAffinity`...) that the strict schema of the YAML mode refuses.
fn service(kind: &Kind, object: &DynamicObject, _: &Context) -> Option<Value> {
    let mut doc = kind.header(object);
    let spec = object.data.get("spec").cloned().unwrap_or(json!({}));
    let mut kept = pick(&spec, &["type", "selector", "clusterIP"]);
    if let Some(Value::Array(ports)) = spec.get("ports") {
        let fields = ["name", "port", "targetPort", "protocol", "appProtocol"];
        let ports = ports.iter().map(|p| Value::Object(pick(p, &fields)));
        kept.insert("ports".into(), Value::Array(ports.collect()));
    }
    doc.insert("spec".into(), Value::Object(kept));
    Some(Value::Object(doc))
}

fn spec_document(kind: &Kind, object: &DynamicObject, _: &Context) -> Option<Value> {
    let mut doc = kind.header(object);
    doc.insert(
        "spec".into(),
        object.data.get("spec").cloned().unwrap_or(json!({})),
    );
    Some(Value::Object(doc))
}

/// The given fields of `value`, where present.
pub(super) fn pick(value: &Value, fields: &[&str]) -> Map<String, Value> {
    fields
        .iter()
        .filter_map(|&f| Some((f.to_owned(), value.get(f)?.clone())))
        .collect()
}
