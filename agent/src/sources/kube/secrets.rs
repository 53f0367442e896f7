//! TLS Secrets, the certificates of the ingress gateway's servers
//! (`credentialName`). Only Secrets of type `kubernetes.io/tls` are listed
//! (a field selector: the API server never sends the others to the agent),
//! and of each only the keys read are kept.

use serde_json::{Map, Value};

use crate::config::secret::{KEYS, TLS_TYPE};

use super::kinds::pick;

/// What the watch asks the API server for.
pub(super) const FIELD_SELECTOR: &str = "type=kubernetes.io/tls";

/// Everything but the type and the `tls.crt`, `tls.key` and `ca.crt` data.
pub(super) fn trim(secret: Map<String, Value>) -> Map<String, Value> {
    let data = secret.get("data").map(|d| Value::Object(pick(d, &KEYS)));
    let mut kept = Map::new();
    kept.insert("type".into(), Value::String(TLS_TYPE.into()));
    if let Some(data) = data {
        kept.insert("data".into(), data);
    }
    kept
}
