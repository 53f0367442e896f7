//! Gateway ports this node's agent cannot bind (another process listens on
//! the node's address), reported by that agent only: a Warning Event on each
//! Gateway (Istio or Gateway API) with a server on the port, and on a
//! Gateway API listener the conditions the spec gives for it: `Accepted:
//! False` with reason `PortUnavailable`, and `Programmed: False` with reason
//! `Pending` (the agent binds it as soon as the port is free).
//!
//! Every agent writes the same Gateway status, so one node's failure must not
//! be undone by the others: the conditions' message names the node (`node N:
//! …`), and an agent keeps another node's conditions as they are while that
//! Node exists. The node that wrote them clears them once it serves the port.
//! A second node failing on the same port meanwhile reports with Events only,
//! and writes its conditions once the first node's are cleared.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::Config;
use crate::ingress::PortFailures;
use crate::routing::gateway_api::{Condition, ObjectStatus, StatusKind};

use super::gateway_status::Watched;

const UNAVAILABLE: &str = "PortUnavailable";

/// The routing warning (one Event each) for every server this node serves
/// on a port it cannot bind.
pub(super) fn warnings(config: &Config, node: &str, failures: &PortFailures) -> Vec<String> {
    let mut warnings = Vec::new();
    if failures.is_empty() {
        return warnings;
    }
    let no_labels = BTreeMap::new();
    let labels = config.node(node).map_or(&no_labels, |n| &n.labels);
    for gateway in config.routing().ingress().served_by(labels) {
        for server in gateway.servers.iter().filter(|s| s.not_served.is_none()) {
            if let Some(error) = failures.get(&server.port) {
                warnings.push(format!(
                    "{}: {}: {}",
                    gateway.origin,
                    server.field,
                    message(node, server.port, error)
                ));
            }
        }
    }
    warnings
}

fn message(node: &str, port: u16, error: &str) -> String {
    format!("node {node}: port {port} is not served: {error}")
}

/// `statuses` with the listeners on a port this node cannot bind marked as
/// such, and those another node marked (see the module's doc) kept.
pub(super) fn with_ports(
    statuses: &[ObjectStatus],
    config: &Config,
    node: &str,
    failures: &PortFailures,
    watched: &Watched,
) -> Vec<ObjectStatus> {
    let mut statuses = statuses.to_vec();
    for status in &mut statuses {
        let StatusKind::Gateway { listeners, .. } = &mut status.status else {
            continue;
        };
        let key = ("Gateway", status.namespace.clone(), status.name.clone());
        let current = watched
            .get(&key)
            .and_then(|(_, o)| o.body().remove("status"))
            .unwrap_or_default();
        let gateway = format!(
            "{}/{}",
            status.namespace.as_deref().unwrap_or_default(),
            status.name
        );
        for listener in listeners {
            let port = port_of(config, node, &gateway, &listener.name);
            let own = port.and_then(|p| Some(message(node, p, failures.get(&p)?)));
            let reported = own.or_else(|| {
                let message = reported_elsewhere(&current, &listener.name)?;
                let (other, _) = message.strip_prefix("node ")?.split_once(':')?;
                (other != node && config.node(other).is_some()).then_some(message)
            });
            if let Some(message) = reported {
                mark(&mut listener.conditions, &message);
            }
        }
    }
    statuses
}

/// The port of listener `name` of Gateway API Gateway `gateway`, if
/// `node` serves it.
fn port_of(config: &Config, node: &str, gateway: &str, name: &str) -> Option<u16> {
    let no_labels = BTreeMap::new();
    let labels = config.node(node).map_or(&no_labels, |n| &n.labels);
    let mut served = config.routing().ingress().served_by(labels);
    let gateway = served.find(|g| g.key == gateway)?;
    let server = gateway
        .servers
        .iter()
        .find(|s| s.field.starts_with("spec.listeners[") && s.name.as_deref() == Some(name))?;
    server.not_served.is_none().then_some(server.port)
}

/// The message of listener `name`'s `PortUnavailable` condition in the
/// watched status, if any.
fn reported_elsewhere(status: &Value, name: &str) -> Option<String> {
    let listeners = status.get("listeners")?.as_array()?;
    let listener = listeners.iter().find(|l| l["name"] == name)?;
    let conditions = listener.get("conditions")?.as_array()?;
    let accepted = conditions.iter().find(|c| c["type"] == "Accepted")?;
    if accepted["reason"] != UNAVAILABLE || accepted["status"] != "False" {
        return None;
    }
    accepted["message"].as_str().map(str::to_owned)
}

fn mark(conditions: &mut [Condition], message: &str) {
    for condition in conditions {
        let reason = match condition.kind {
            "Accepted" => UNAVAILABLE,
            "Programmed" => "Pending",
            _ => continue,
        };
        condition.status = false;
        condition.reason = reason;
        condition.message = message.to_owned();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    use super::*;
    use crate::config::LoadOptions;
    use crate::sources::kube::kinds::WATCHED;
    use crate::sources::kube::object::Object;

    /// Nodes a and b, a Gateway API Gateway with listeners on 80 and 81.
    fn config() -> Config {
        let docs = [
            include_str!("../../../../deploy/kubernetes/05-gatewayclass.yaml").to_owned(),
            "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n\
             status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}\n"
                .to_owned(),
            "apiVersion: v1\nkind: Node\nmetadata: {name: b}\n\
             status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}\n"
                .to_owned(),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {name: public, namespace: infra}\n\
             spec:\n  gatewayClassName: nodemesh\n  listeners:\n\
             \x20 - {name: web, port: 80, protocol: HTTP}\n\
             \x20 - {name: alt, port: 81, protocol: HTTP}\n"
                .to_owned(),
        ];
        let files: Vec<_> = docs
            .into_iter()
            .enumerate()
            .map(|(i, d)| (PathBuf::from(format!("{i}.yaml")), d))
            .collect();
        Config::load_documents(&files, &LoadOptions::default()).unwrap()
    }

    /// The Gateway as watched, with `status`.
    fn watched(status: Value) -> Watched {
        let kind = WATCHED
            .iter()
            .find(|k| k.kind == "Gateway" && k.group == crate::routing::gateway_api::GROUP)
            .unwrap();
        let metadata = ObjectMeta {
            name: Some("public".into()),
            namespace: Some("infra".into()),
            ..Default::default()
        };
        let body = json!({ "status": status });
        let object = Object::new(metadata, body.as_object().unwrap().clone());
        let key = ("Gateway", Some("infra".into()), "public".into());
        Watched::from([(key, (kind, Arc::new(object)))])
    }

    /// `(listener, Accepted reason, Programmed reason)`.
    fn listeners(statuses: &[ObjectStatus]) -> Vec<(String, &'static str, &'static str)> {
        let gateway = statuses.iter().find(|s| s.kind == "Gateway").unwrap();
        let StatusKind::Gateway { listeners, .. } = &gateway.status else {
            panic!("not a Gateway");
        };
        let reason = |l: &crate::routing::gateway_api::ListenerStatus, kind: &str| {
            let c = l.conditions.iter().find(|c| c.kind == kind).unwrap();
            c.reason
        };
        listeners
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    reason(l, "Accepted"),
                    reason(l, "Programmed"),
                )
            })
            .collect()
    }

    #[test]
    fn only_the_failing_node_marks_its_listener_and_others_keep_its_report() {
        let config = config();
        let statuses = config.routing().gateway_api_status();
        let failures = PortFailures::from([(80, "cannot listen on 10.0.0.1:80: in use".into())]);
        let marked = with_ports(statuses, &config, "a", &failures, &watched(json!({})));
        assert_eq!(
            listeners(&marked),
            [
                ("web".into(), "PortUnavailable", "Pending"),
                ("alt".into(), "Accepted", "Programmed")
            ]
        );
        let warnings = warnings(&config, "a", &failures);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("spec.listeners[0]: node a: port 80 is not served: cannot listen"),
            "{warnings:?}"
        );

        // As node a wrote it: node b, binding fine, keeps it.
        let written = json!({"listeners": [{"name": "web", "conditions": [
            {"type": "Accepted", "status": "False", "reason": "PortUnavailable",
             "message": "node a: port 80 is not served: in use"},
        ]}]});
        let none = PortFailures::new();
        let kept = with_ports(statuses, &config, "b", &none, &watched(written.clone()));
        assert_eq!(
            listeners(&kept)[0],
            ("web".into(), "PortUnavailable", "Pending")
        );
        // Node a, once it binds, clears it.
        let cleared = with_ports(statuses, &config, "a", &none, &watched(written.clone()));
        assert_eq!(
            listeners(&cleared)[0],
            ("web".into(), "Accepted", "Programmed")
        );
        // A report of a node that no longer exists is cleared by any node.
        let gone = written.to_string().replace("node a:", "node c:");
        let gone = serde_json::from_str(&gone).unwrap();
        let cleared = with_ports(statuses, &config, "b", &none, &watched(gone));
        assert_eq!(
            listeners(&cleared)[0],
            ("web".into(), "Accepted", "Programmed")
        );
    }
}
