//! An object of a watched kind as the agent keeps it between snapshots: its trimmed
//! metadata, and the rest of what it reads (each kind's `trim`) as compact JSON text.
//!
//! A parsed JSON tree (`serde_json::Value`, as `DynamicObject` keeps) costs several times
//! its text: a map and a string allocation per field. The text is parsed again only
//! while a snapshot is built, and that tree is dropped once the object is loaded.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DynamicResourceScope;
use kube::discovery::ApiResource;
use kube::Resource;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Clone, Debug, Deserialize)]
#[serde(from = "Wire")]
pub(super) struct Object {
    pub metadata: ObjectMeta,
    /// The object's fields but `apiVersion`, `kind` and `metadata`, as a JSON object.
    body: Box<str>,
}

/// An object as the watch stream sends it.
#[derive(Deserialize)]
struct Wire {
    metadata: ObjectMeta,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

impl From<Wire> for Object {
    fn from(wire: Wire) -> Object {
        let mut rest = wire.rest;
        rest.remove("apiVersion");
        rest.remove("kind");
        Object::new(wire.metadata, rest)
    }
}

impl Object {
    pub fn new(metadata: ObjectMeta, body: Map<String, Value>) -> Object {
        Object {
            metadata,
            body: Value::Object(body).to_string().into_boxed_str(),
        }
    }

    /// The fields kept, parsed again (a tree for the duration of one snapshot).
    pub fn body(&self) -> Map<String, Value> {
        match serde_json::from_str(&self.body) {
            Ok(Value::Object(body)) => body,
            // Written by `new` from a map: always an object.
            _ => Map::new(),
        }
    }

    /// Keeps of the body only what `trim` leaves.
    pub fn trim(&mut self, trim: fn(Map<String, Value>) -> Map<String, Value>) {
        let body = trim(self.body());
        *self = Object::new(std::mem::take(&mut self.metadata), body);
    }
}

impl Resource for Object {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
