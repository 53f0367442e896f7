//! Gateway ports this node's agent cannot bind (another process listens on
//! the node's address), reported by that agent only: a Warning Event on each
//! Gateway (Istio or Gateway API) with a server on the port, and on a
//! Gateway API listener the conditions the spec gives for it: `Accepted:
//! False` with reason `PortUnavailable`, and `Programmed: False` with reason
//! `Pending` (the agent binds it as soon as the port is free); on an Istio
//! Gateway `Programmed: False` with reason `PortUnavailable` and Istio's
//! message IST0104 GatewayPortNotOnWorkload.
//!
//! Every agent writes the same Gateway status, so one node's failure must not
//! be undone by the others: the conditions' message names the node (`node N:
//! …`), and an agent keeps another node's conditions as they are while that
//! Node exists. The node that wrote them clears them once it serves the port.
//! A second node failing on the same port meanwhile reports with Events only,
//! and writes its conditions once the first node's are cleared.

use serde_json::Value;

use crate::config::Config;
use crate::ingress::PortFailures;
use crate::routing::gateway_api::{Condition, ObjectStatus, StatusKind};
use crate::routing::ingress::Server;
use crate::routing::istio_status::Analysis;

use super::gateway_status::{key, Watched};

const UNAVAILABLE: &str = "PortUnavailable";

/// The routing warning (one Event each) for every server this node serves
/// on a port it cannot bind.
pub(super) fn warnings(config: &Config, node: &str, failures: &PortFailures) -> Vec<String> {
    let mut warnings = Vec::new();
    if failures.is_empty() {
        return warnings;
    }
    let no_labels = Default::default();
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

/// `statuses` with what is on a port this node cannot bind marked as such
/// (a Gateway API listener, an Istio Gateway's `Programmed`), and what
/// another node marked (see the module's doc) kept.
pub(super) fn with_ports(
    statuses: &[ObjectStatus],
    config: &Config,
    node: &str,
    failures: &PortFailures,
    watched: &Watched,
) -> Vec<ObjectStatus> {
    let mut statuses = statuses.to_vec();
    for status in statuses.iter_mut().filter(|s| s.kind == "Gateway") {
        let current = watched
            .get(&key(status))
            .and_then(|(_, o)| o.body().remove("status"))
            .unwrap_or_default();
        let gateway = format!(
            "{}/{}",
            status.namespace.as_deref().unwrap_or_default(),
            status.name
        );
        let servers = |pick: &dyn Fn(&Server) -> bool| served_ports(config, node, &gateway, pick);
        match &mut status.status {
            StatusKind::Gateway { listeners, .. } => {
                for listener in listeners {
                    let name = Some(listener.name.as_str());
                    let ports = servers(&|s| {
                        s.field.starts_with("spec.listeners[") && s.name.as_deref() == name
                    });
                    let written = current["listeners"].as_array().and_then(|all| {
                        let mine = all.iter().find(|l| l["name"] == listener.name)?;
                        unavailable(&mine["conditions"], "Accepted")
                    });
                    let own = own_report(node, &ports, failures);
                    if let Some(message) = report(own, written, config, node) {
                        mark(&mut listener.conditions, LISTENER_MARKS, &message);
                    }
                }
            }
            StatusKind::Istio {
                conditions,
                validation_messages,
            } => {
                let ports = servers(&|s| s.field.starts_with("spec.servers["));
                let written = unavailable(&current["conditions"], "Programmed");
                let own = own_report(node, &ports, failures);
                if let Some(message) = report(own, written, config, node) {
                    mark(conditions, ISTIO_MARKS, &message);
                    validation_messages.push(Analysis::GatewayPortNotOnWorkload);
                    validation_messages.sort();
                    validation_messages.dedup();
                }
            }
            _ => {}
        }
    }
    statuses
}

/// The ports of the servers `pick` selects of Gateway `gateway` (either API:
/// `pick` tells them apart), if `node` serves them.
fn served_ports(
    config: &Config,
    node: &str,
    gateway: &str,
    pick: &dyn Fn(&Server) -> bool,
) -> Vec<u16> {
    let no_labels = Default::default();
    let labels = config.node(node).map_or(&no_labels, |n| &n.labels);
    let served = config.routing().ingress().served_by(labels);
    let servers = served.filter(|g| g.key == gateway).flat_map(|g| &g.servers);
    servers
        .filter(|s| s.not_served.is_none() && pick(s))
        .map(|s| s.port)
        .collect()
}

/// This node's report on `ports`: the first it cannot bind.
fn own_report(node: &str, ports: &[u16], failures: &PortFailures) -> Option<String> {
    let mut failed = ports.iter().filter_map(|p| Some((*p, failures.get(p)?)));
    failed
        .next()
        .map(|(port, error)| message(node, port, error))
}

/// This node's own report, else the one another node wrote while that
/// Node exists.
fn report(
    own: Option<String>,
    written: Option<String>,
    config: &Config,
    node: &str,
) -> Option<String> {
    own.or_else(|| {
        let written = written?;
        let (other, _) = written.strip_prefix("node ")?.split_once(':')?;
        (other != node && config.node(other).is_some()).then_some(written)
    })
}

/// The message of the `PortUnavailable` condition of type `kind` in the
/// watched `conditions`, if any.
fn unavailable(conditions: &Value, kind: &str) -> Option<String> {
    let conditions = conditions.as_array()?;
    let condition = conditions.iter().find(|c| c["type"] == kind)?;
    if condition["reason"] != UNAVAILABLE || condition["status"] != "False" {
        return None;
    }
    condition["message"].as_str().map(str::to_owned)
}

/// A Gateway API listener's conditions on a port not served, as its spec
/// gives them: (type, reason).
const LISTENER_MARKS: &[(&str, &str)] = &[("Accepted", UNAVAILABLE), ("Programmed", "Pending")];

/// An Istio Gateway's: it stays `Accepted` (the config is), not `Programmed`.
const ISTIO_MARKS: &[(&str, &str)] = &[("Programmed", UNAVAILABLE)];

/// Sets the conditions `marks` names to False with their reason.
fn mark(conditions: &mut [Condition], marks: &[(&str, &'static str)], message: &str) {
    for condition in conditions {
        let Some((_, reason)) = marks.iter().find(|(kind, _)| *kind == condition.kind) else {
            continue;
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
            "apiVersion: networking.istio.io/v1\nkind: Gateway\n\
             metadata: {name: public, namespace: infra}\n\
             spec:\n  servers: [{port: {number: 82, name: http, protocol: HTTP}, hosts: ['*']}]\n"
                .to_owned(),
        ];
        let files: Vec<_> = docs
            .into_iter()
            .enumerate()
            .map(|(i, d)| (PathBuf::from(format!("{i}.yaml")), d))
            .collect();
        Config::load_documents(&files, &LoadOptions::default()).unwrap()
    }

    /// The Gateway API Gateway as watched, with `status`.
    fn watched(status: Value) -> Watched {
        watched_of(crate::routing::gateway_api::GROUP, status)
    }

    /// The Gateway of API `group` as watched, with `status`.
    fn watched_of(group: &str, status: Value) -> Watched {
        let kind = WATCHED
            .iter()
            .find(|k| k.kind == "Gateway" && k.group == group)
            .unwrap();
        let metadata = ObjectMeta {
            name: Some("public".into()),
            namespace: Some("infra".into()),
            ..Default::default()
        };
        let body = json!({ "status": status });
        let object = Object::new(metadata, body.as_object().unwrap().clone());
        let key = (kind.group, "Gateway", Some("infra".into()), "public".into());
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

    /// The Istio Gateway's conditions and codes.
    fn istio(statuses: &[ObjectStatus]) -> (Vec<(&'static str, bool, &'static str)>, Vec<&str>) {
        let gateway = statuses.iter().find(|s| s.kind == "Gateway").unwrap();
        crate::routing::istio_status::summary(gateway)
    }

    #[test]
    fn an_istio_gateway_on_a_port_taken_on_one_node_is_not_programmed_there() {
        use crate::routing::istio_status::GROUP;
        let config = config();
        let statuses = config.routing().istio_status();
        let failures = PortFailures::from([(82, "cannot listen on 10.0.0.1:82: in use".into())]);
        let marked = with_ports(
            statuses,
            &config,
            "a",
            &failures,
            &watched_of(GROUP, json!({})),
        );
        let unavailable = (
            vec![
                ("Accepted", true, "Accepted"),
                ("Programmed", false, "PortUnavailable"),
            ],
            vec!["IST0104"],
        );
        assert_eq!(istio(&marked), unavailable);
        // The Gateway API Gateway of the same name is not on that port.
        let api = with_ports(
            config.routing().gateway_api_status(),
            &config,
            "a",
            &failures,
            &watched(json!({})),
        );
        assert_eq!(listeners(&api)[0], ("web".into(), "Accepted", "Programmed"));

        // As node a wrote it: node b keeps it, node a clears it once bound.
        let written = json!({"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted"},
            {"type": "Programmed", "status": "False", "reason": "PortUnavailable",
             "message": "node a: port 82 is not served: in use"},
        ]});
        let none = PortFailures::new();
        let kept = with_ports(
            statuses,
            &config,
            "b",
            &none,
            &watched_of(GROUP, written.clone()),
        );
        assert_eq!(istio(&kept), unavailable);
        let cleared = with_ports(statuses, &config, "a", &none, &watched_of(GROUP, written));
        assert_eq!(
            istio(&cleared),
            (
                vec![
                    ("Accepted", true, "Accepted"),
                    ("Programmed", true, "Programmed")
                ],
                vec![]
            )
        );
    }
}
