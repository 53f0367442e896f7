//! Istio `networking.istio.io` Gateway: its schema, read strictly, and its
//! checks. What the servers bind is decided in [`super::ingress`].

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{
    check_dns_label, check_labels, check_metadata, port_number, Issues, Meta, Object,
};

use crate::ingress::tls::ServerTlsSpec;

use super::compile::{check_host, Warnings};
use super::ingress::{GatewayHost, ServerProtocol};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GatewaySpec {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    servers: Vec<ServerSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServerSpec {
    port: PortSpec,
    bind: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    /// Compiled once Secrets are known (see [`super::ingress`]).
    tls: Option<ServerTlsSpec>,
    default_endpoint: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortSpec {
    number: i64,
    protocol: String,
    name: Option<String>,
    target_port: Option<i64>,
}

/// A Gateway checked on its own, waiting for the VirtualServices bound to it.
pub(crate) struct GatewayDraft {
    pub(super) meta: Meta,
    pub(super) selector: BTreeMap<String, String>,
    pub(super) servers: Vec<ServerDraft>,
    pub(super) warnings: Warnings,
}

impl GatewayDraft {
    /// `namespace/name`, as VirtualServices name it.
    pub(super) fn key(&self) -> String {
        format!("{}/{}", self.meta.namespace, self.meta.name)
    }
}

pub(super) struct ServerDraft {
    /// `spec.servers[i]`.
    pub field: String,
    pub name: Option<String>,
    pub port: u16,
    pub protocol: ServerProtocol,
    pub hosts: Vec<GatewayHost>,
    pub tls: Option<ServerTlsSpec>,
}

pub(crate) fn istio_gateway(doc: Object<GatewaySpec>, issues: &mut Issues) -> GatewayDraft {
    check_metadata(&doc.metadata, issues);
    let namespace = doc.metadata.namespace.clone();
    let spec = doc.spec;
    let mut warnings = Warnings::default();
    check_labels(&spec.selector, "spec.selector", issues);
    if spec.servers.is_empty() {
        issues.add("spec.servers", "at least one server is required");
    }
    let mut servers: Vec<ServerDraft> = Vec::new();
    for (i, server) in spec.servers.into_iter().enumerate() {
        let at = format!("spec.servers[{i}]");
        let Some(server) = self::server(server, &at, &namespace, &mut warnings, issues) else {
            continue;
        };
        let clash = servers
            .iter()
            .find(|s| s.port == server.port && s.protocol.is_http() != server.protocol.is_http());
        if let Some(other) = clash {
            issues.add(
                format!("{at}.port.protocol"),
                format!(
                    "port {} is already {} in {}: one port serves one kind of protocol",
                    server.port, other.protocol, other.field
                ),
            );
        }
        servers.push(server);
    }
    GatewayDraft {
        meta: Meta::new(&doc.metadata),
        selector: spec.selector,
        servers,
        warnings,
    }
}

fn server(
    spec: ServerSpec,
    at: &str,
    namespace: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Option<ServerDraft> {
    let port = port_number(spec.port.number, format!("{at}.port.number"), issues);
    let protocol = ServerProtocol::parse(&spec.port.protocol);
    if protocol.is_none() {
        issues.add(
            format!("{at}.port.protocol"),
            format!(
                "protocol {:?} is not supported (expected HTTP, HTTPS, HTTP2, GRPC, TLS or TCP)",
                spec.port.protocol
            ),
        );
    }
    if let Some(name) = &spec.port.name {
        check_dns_label(name, &format!("{at}.port.name"), issues);
    }
    if spec.port.target_port.is_some() {
        warnings.add(
            format!("{at}.port.targetPort"),
            "accepted, not enforced: the agent listens on port.number",
        );
    }
    if spec.bind.is_some() {
        issues.add(
            format!("{at}.bind"),
            "not supported: the agent listens on its node's addresses",
        );
    }
    if spec.default_endpoint.is_some() {
        issues.add(
            format!("{at}.defaultEndpoint"),
            "not supported (Istio uses it for sidecars only)",
        );
    }
    if spec.hosts.is_empty() {
        issues.add(format!("{at}.hosts"), "at least one host is required");
    }
    let mut hosts = Vec::new();
    for (j, host) in spec.hosts.iter().enumerate() {
        let field = format!("{at}.hosts[{j}]");
        hosts.extend(gateway_host(host, namespace, &field, issues));
    }
    Some(ServerDraft {
        field: at.to_owned(),
        name: spec.name,
        port: port?,
        protocol: protocol?,
        hosts,
        tls: spec.tls,
    })
}

/// `[namespace/]dnsName`: `*/` or no prefix admits VirtualServices of any
/// namespace, `./` those of the Gateway's own.
fn gateway_host(
    host: &str,
    gateway_namespace: &str,
    field: &str,
    issues: &mut Issues,
) -> Option<GatewayHost> {
    let (namespace, dns) = match host.split_once('/') {
        None | Some(("*", _)) => (None, host.rsplit('/').next().unwrap_or(host)),
        Some((".", dns)) => (Some(gateway_namespace.to_owned()), dns),
        Some((namespace, dns)) => {
            check_dns_label(namespace, field, issues);
            (Some(namespace.to_owned()), dns)
        }
    };
    let before = issues.len();
    check_host(dns, field.to_owned(), issues);
    (issues.len() == before).then(|| GatewayHost {
        namespace,
        dns: dns.trim_end_matches('.').to_ascii_lowercase(),
    })
}
