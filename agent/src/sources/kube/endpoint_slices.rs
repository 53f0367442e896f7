//! EndpointSlices, watched cluster-wide: which pods serve each Service, as the cluster's
//! endpoint controller decided (see `config::endpoint_slice`). Of each endpoint only the
//! fields read are kept, so that 50 000 endpoints cost the agent little.

use kube::api::DynamicObject;
use serde_json::{json, Value};

use super::kinds::{pick, strip_metadata, Context, Kind};

pub(super) const GROUP: &str = "discovery.k8s.io";

/// Everything but the address type, the ports and the ready endpoints' addresses, node
/// and zone (an endpoint not ready serves no request: it is dropped with its
/// conditions).
pub(super) fn strip(slice: &mut DynamicObject) {
    strip_metadata(slice);
    let endpoints = slice
        .data
        .get("endpoints")
        .and_then(Value::as_array)
        .map(|endpoints| {
            let ready = endpoints
                .iter()
                .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)));
            let kept = ready.map(|e| Value::Object(pick(e, &["addresses", "nodeName", "zone"])));
            Value::Array(kept.collect())
        });
    let ports = slice.data.get("ports").cloned();
    let address_type = slice.data.get("addressType").cloned();
    slice.data = json!({ "addressType": address_type, "endpoints": endpoints, "ports": ports });
}

/// The slice as an `EndpointSlice` document of the loader.
pub(super) fn document(kind: &Kind, slice: &DynamicObject, _: &Context) -> Option<Value> {
    let mut doc = kind.header(slice);
    for field in ["addressType", "endpoints", "ports"] {
        if let Some(value) = slice.data.get(field).filter(|v| !v.is_null()) {
            doc.insert(field.into(), value.clone());
        }
    }
    Some(Value::Object(doc))
}
