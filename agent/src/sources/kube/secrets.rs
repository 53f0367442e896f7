//! TLS Secrets, the certificates of the ingress gateway's servers
//! (`credentialName`). Only Secrets of type `kubernetes.io/tls` are listed
//! (a field selector: the API server never sends the others to the agent),
//! and of each only the keys read are kept.

use kube::api::DynamicObject;
use serde_json::Value;

use crate::config::secret::{KEYS, TLS_TYPE};

use super::kinds::{pick, strip_metadata, Context, Kind};

/// What the watch asks the API server for.
pub(super) const FIELD_SELECTOR: &str = "type=kubernetes.io/tls";

/// Everything but the type and the `tls.crt`, `tls.key` and `ca.crt` data.
pub(super) fn strip(secret: &mut DynamicObject) {
    strip_metadata(secret);
    let data = secret
        .data
        .get("data")
        .map(|d| Value::Object(pick(d, &KEYS)));
    let mut kept = serde_json::Map::new();
    kept.insert("type".into(), Value::String(TLS_TYPE.into()));
    if let Some(data) = data {
        kept.insert("data".into(), data);
    }
    secret.data = Value::Object(kept);
}

/// The Secret as a document of the loader.
pub(super) fn document(kind: &Kind, secret: &DynamicObject, _: &Context) -> Option<Value> {
    let mut doc = kind.header(secret);
    if let Value::Object(kept) = &secret.data {
        doc.extend(kept.clone());
    }
    Some(Value::Object(doc))
}
