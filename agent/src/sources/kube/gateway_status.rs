//! The status of the objects nodemesh serves: Gateway API GatewayClass,
//! Gateway, HTTPRoute and GRPCRoute ([`crate::routing::gateway_api`]), and
//! Istio Gateway and VirtualService ([`crate::routing::istio_status`]), as
//! computed with each snapshot, written to their status subresource with
//! server-side apply (field manager `nodemesh`).
//!
//! Every agent computes the same status from the same objects, so each writes
//! only what differs from the status it watches: once one agent has written it,
//! the others find it there and write nothing. `lastTransitionTime` is kept while
//! a condition's status does not change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::identity::x509::rfc3339;
use crate::routing::gateway_api::{
    Condition, ObjectStatus, ParentStatus, StatusKind, CONTROLLER_NAME, GROUP,
};

use super::kinds::Kind;
use super::object::Object;

/// Field manager of the writes.
const MANAGER: &str = "nodemesh";

/// One status to write: the kind, the object's namespace and name, and the
/// apply body.
#[derive(Clone)]
pub(super) struct Apply {
    kind: &'static Kind,
    namespace: Option<String>,
    name: String,
    body: Value,
}

/// An object by (group, kind, namespace, name): both APIs have a `Gateway`.
pub(super) type Key = (&'static str, &'static str, Option<String>, String);

/// The watched objects that get a status, by [`Key`].
pub(super) type Watched = HashMap<Key, (&'static Kind, Arc<Object>)>;

/// The key of `status`'s object.
pub(super) fn key(status: &ObjectStatus) -> Key {
    let namespace = status.namespace.clone();
    (status.group, status.kind, namespace, status.name.clone())
}

/// The writes `statuses` need, given the objects as watched now.
pub(super) fn needed(statuses: &[ObjectStatus], watched: &Watched) -> Vec<Apply> {
    let now = rfc3339(SystemTime::now());
    let mut applies = Vec::new();
    for status in statuses {
        let Some((kind, object)) = watched.get(&key(status)) else {
            continue;
        };
        let current = object.body().remove("status").unwrap_or(json!({}));
        let generation = object.metadata.generation;
        let wanted = render(&status.status, &current, generation, &now);
        let differs = wanted
            .as_object()
            .into_iter()
            .flatten()
            .any(|(field, value)| current.get(field) != Some(value));
        if !differs {
            continue;
        }
        let mut metadata = Map::new();
        metadata.insert("name".into(), json!(status.name));
        if let Some(namespace) = &status.namespace {
            metadata.insert("namespace".into(), json!(namespace));
        }
        applies.push(Apply {
            kind,
            namespace: status.namespace.clone(),
            name: status.name.clone(),
            body: json!({
                "apiVersion": kind.api_version(),
                "kind": kind.kind,
                "metadata": metadata,
                "status": wanted,
            }),
        });
    }
    applies
}

/// The status fields nodemesh owns, as the Gateway API writes them.
fn render(status: &StatusKind, current: &Value, generation: Option<i64>, now: &str) -> Value {
    let conditions = |wanted: &[Condition], current: Option<&Value>| {
        let current = current.and_then(Value::as_array);
        let rendered: Vec<_> = wanted
            .iter()
            .map(|c| {
                condition(
                    c,
                    current.map(Vec::as_slice).unwrap_or_default(),
                    generation,
                    now,
                )
            })
            .collect();
        Value::Array(rendered)
    };
    match status {
        StatusKind::GatewayClass { conditions: wanted } => {
            json!({ "conditions": conditions(wanted, current.get("conditions")) })
        }
        StatusKind::Gateway {
            conditions: wanted,
            listeners,
        } => {
            let current_listeners = current.get("listeners").and_then(Value::as_array);
            let listeners: Vec<_> = listeners
                .iter()
                .map(|l| {
                    let before = current_listeners
                        .into_iter()
                        .flatten()
                        .find(|c| c.get("name") == Some(&json!(l.name)));
                    let kinds: Vec<_> = l
                        .supported_kinds
                        .iter()
                        .map(|k| json!({ "group": GROUP, "kind": k }))
                        .collect();
                    json!({
                        "name": l.name,
                        "attachedRoutes": l.attached_routes,
                        "supportedKinds": kinds,
                        "conditions": conditions(&l.conditions, before.and_then(|b| b.get("conditions"))),
                    })
                })
                .collect();
            json!({
                "conditions": conditions(wanted, current.get("conditions")),
                "listeners": listeners,
            })
        }
        StatusKind::Route { parents } => {
            let current = current.get("parents").and_then(Value::as_array);
            // Other controllers' entries are kept as they are.
            let mut rendered: Vec<Value> = current
                .into_iter()
                .flatten()
                .filter(|p| p.get("controllerName") != Some(&json!(CONTROLLER_NAME)))
                .cloned()
                .collect();
            for parent in parents {
                let parent_ref = parent_ref(parent);
                let before = current.into_iter().flatten().find(|p| {
                    p.get("controllerName") == Some(&json!(CONTROLLER_NAME))
                        && p.get("parentRef") == Some(&parent_ref)
                });
                rendered.push(json!({
                    "parentRef": parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": conditions(&parent.conditions, before.and_then(|b| b.get("conditions"))),
                }));
            }
            json!({ "parents": rendered })
        }
        StatusKind::Istio {
            conditions: wanted,
            validation_messages,
        } => {
            let messages: Vec<_> = validation_messages
                .iter()
                .map(|m| {
                    json!({
                        "type": { "code": m.code(), "name": m.name() },
                        "level": m.level(),
                        "documentationUrl": m.documentation_url(),
                    })
                })
                .collect();
            let mut rendered = json!({
                "conditions": conditions(wanted, current.get("conditions")),
                "validationMessages": messages,
            });
            if let Some(generation) = generation {
                rendered["observedGeneration"] = json!(generation);
            }
            rendered
        }
    }
}

fn parent_ref(parent: &ParentStatus) -> Value {
    let mut reference = Map::new();
    reference.insert("group".into(), json!(GROUP));
    reference.insert("kind".into(), json!("Gateway"));
    reference.insert("namespace".into(), json!(parent.namespace));
    reference.insert("name".into(), json!(parent.name));
    if let Some(section) = &parent.section_name {
        reference.insert("sectionName".into(), json!(section));
    }
    if let Some(port) = parent.port {
        reference.insert("port".into(), json!(port));
    }
    Value::Object(reference)
}

/// A condition, keeping the `lastTransitionTime` of the current one of its
/// type while its status is the same.
fn condition(wanted: &Condition, current: &[Value], generation: Option<i64>, now: &str) -> Value {
    let status = if wanted.status { "True" } else { "False" };
    let since = current
        .iter()
        .find(|c| {
            c.get("type") == Some(&json!(wanted.kind)) && c.get("status") == Some(&json!(status))
        })
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now));
    let mut rendered = json!({
        "type": wanted.kind,
        "status": status,
        "reason": wanted.reason,
        "message": wanted.message,
        "lastTransitionTime": since,
    });
    if let Some(generation) = generation {
        rendered["observedGeneration"] = json!(generation);
    }
    rendered
}

/// Writes the latest set of statuses needed, forever; a set that arrives while
/// one is written replaces it (the next snapshot computes what is still needed).
pub(super) async fn write(client: Client, mut needed: watch::Receiver<Vec<Apply>>) {
    let params = PatchParams::apply(MANAGER).force();
    while needed.changed().await.is_ok() {
        let applies = needed.borrow_and_update().clone();
        for apply in applies {
            let resource = apply.kind.api_resource();
            let api: Api<DynamicObject> = match &apply.namespace {
                Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            match api
                .patch_status(&apply.name, &params, &Patch::Apply(&apply.body))
                .await
            {
                Ok(_) => log::debug!("wrote the status of {} {}", apply.kind.kind, apply.name),
                Err(e) => log::warn!(
                    "cannot write the status of {} {}: {e} (does the agent's role allow patching \
                     {}/status?)",
                    apply.kind.kind,
                    apply.name,
                    apply.kind.plural
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let wanted = Condition {
            kind: "Accepted",
            status: true,
            reason: "Accepted",
            message: "attached".into(),
        };
        let before = [
            json!({"type": "Accepted", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}),
        ];
        let kept = condition(&wanted, &before, Some(3), "now");
        assert_eq!(kept["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(kept["observedGeneration"], 3);
        let flipped = [
            json!({"type": "Accepted", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}),
        ];
        assert_eq!(
            condition(&wanted, &flipped, None, "now")["lastTransitionTime"],
            "now"
        );
    }

    #[test]
    fn route_status_keeps_other_controllers_entries() {
        let parents = vec![ParentStatus {
            namespace: "infra".into(),
            name: "public".into(),
            section_name: None,
            port: None,
            conditions: Vec::new(),
        }];
        let theirs = json!({"parentRef": {"name": "x"}, "controllerName": "example.com/other", "conditions": []});
        let current = json!({ "parents": [theirs.clone()] });
        let rendered = render(&StatusKind::Route { parents }, &current, Some(1), "now");
        let parents = rendered["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0], theirs);
        assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[1]["parentRef"]["namespace"], "infra");
    }
}
