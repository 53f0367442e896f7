//! EndpointSlices, watched cluster-wide: which pods serve each Service, as the cluster's
//! endpoint controller decided (see `config::endpoint_slice`). Of each endpoint only the
//! fields read are kept, so that 50 000 endpoints cost the agent little.

use kube::api::DynamicObject;
use serde_json::{json, Value};

use super::kinds::{pick, strip_metadata, Context, Kind};

pub(super) const GROUP: &str = "discovery.k8s.io";

/// Everything but the address type, the ports and the endpoints' addresses, ready
/// condition, node and zone.
pub(super) fn strip(slice: &mut DynamicObject) {
    strip_metadata(slice);
    let endpoints = slice
        .data
        .get("endpoints")
        .and_then(Value::as_array)
        .map(|endpoints| {
            let kept = endpoints.iter().map(|e| {
                let mut endpoint = pick(e, &["addresses", "nodeName", "zone"]);
                if let Some(ready) = e.pointer("/conditions/ready") {
                    endpoint.insert("conditions".into(), json!({ "ready": ready }));
                }
                Value::Object(endpoint)
            });
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
