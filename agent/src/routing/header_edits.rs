//! Header edits a route asks for (`headers.request/response` in Istio,
//! `RequestHeaderModifier`/`ResponseHeaderModifier` in the Gateway API).
//!
//! Names and values are parsed once when the configuration is loaded, so a
//! bad one is a load error naming its field, and a request only clones
//! reference-counted bytes instead of parsing (and allocating) them again.

use http::{HeaderName, HeaderValue};
use serde::{Serialize, Serializer};

/// Lowercase names; values as written.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderEdits {
    #[serde(serialize_with = "pairs")]
    pub set: Box<[(HeaderName, HeaderValue)]>,
    #[serde(serialize_with = "pairs")]
    pub add: Box<[(HeaderName, HeaderValue)]>,
    #[serde(serialize_with = "names")]
    pub remove: Box<[HeaderName]>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// `[name, value]` pairs, as `nodemesh routes` has always printed them.
fn pairs<S: Serializer>(pairs: &[(HeaderName, HeaderValue)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        pairs
            .iter()
            .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes()))),
    )
}

fn names<S: Serializer>(names: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().map(HeaderName::as_str))
}
