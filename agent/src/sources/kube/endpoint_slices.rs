//! EndpointSlices, watched cluster-wide: which pods serve each Service, as the cluster's
//! endpoint controller decided (see `config::endpoint_slice`). Of each endpoint only the
//! fields read are kept, so that 50 000 endpoints cost the agent little.

use serde_json::{Map, Value};

use super::kinds::pick;

pub(super) const GROUP: &str = "discovery.k8s.io";

/// Everything but the address type, the ports and the ready endpoints' addresses, node
/// and zone (an endpoint not ready serves no request: it is dropped with its
/// conditions).
pub(super) fn trim(mut slice: Map<String, Value>) -> Map<String, Value> {
    let endpoints = slice
        .get("endpoints")
        .and_then(Value::as_array)
        .map(|endpoints| {
            let ready = endpoints
                .iter()
                .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)));
            let kept = ready.map(|e| Value::Object(pick(e, &["addresses", "nodeName", "zone"])));
            Value::Array(kept.collect())
        });
    let mut kept = Map::new();
    for (field, value) in [
        ("addressType", slice.remove("addressType")),
        ("endpoints", endpoints),
        ("ports", slice.remove("ports")),
    ] {
        if let Some(value) = value.filter(|v| !v.is_null()) {
            kept.insert(field.into(), value);
        }
    }
    kept
}
