//! The ingress: Istio Gateways compiled with the VirtualServices bound to
//! them (`gateways:`), as pure data. Which node serves which Gateway, which
//! server a request arriving on a port takes by its host, and which routes
//! then apply are decided here; `ingress/` in the agent serves them.
//!
//! Selector mapping: every agent is an ingress gateway. A Gateway is served
//! by the agents whose Node carries every label of its `selector`, where
//! every Node counts as labelled `istio: ingressgateway` (Istio's usual
//! selector, so its samples run on every node); an empty selector selects
//! every node.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::config::{Config, Issues, Meta, Origin};
use crate::ingress::tls::{self, PortKind, ServerTls, TlsContext};

use super::compile::{Scope, VirtualServiceDraft};
use super::ingress_l4::{self, L4Route};
use super::istio_gateway::{GatewayDraft, ServerDraft};
use super::istio_status::{Analysis, Finding, IstioObject};
use super::VirtualHost;

/// The label every node counts as carrying.
pub const IMPLICIT_NODE_LABEL: (&str, &str) = ("istio", "ingressgateway");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServerProtocol {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
    #[serde(rename = "HTTP2")]
    Http2,
    #[serde(rename = "GRPC")]
    Grpc,
    #[serde(rename = "TLS")]
    Tls,
    #[serde(rename = "TCP")]
    Tcp,
}

impl ServerProtocol {
    /// As Istio reads it, ignoring case.
    pub fn parse(name: &str) -> Option<ServerProtocol> {
        Some(match name.to_ascii_uppercase().as_str() {
            "HTTP" => ServerProtocol::Http,
            "HTTPS" => ServerProtocol::Https,
            "HTTP2" => ServerProtocol::Http2,
            "GRPC" => ServerProtocol::Grpc,
            "TLS" => ServerProtocol::Tls,
            "TCP" => ServerProtocol::Tcp,
            _ => return None,
        })
    }

    /// Served as HTTP requests (after TLS for HTTPS), else relayed as bytes.
    pub fn is_http(self) -> bool {
        !matches!(self, ServerProtocol::Tls | ServerProtocol::Tcp)
    }

    /// Needs a TLS step before serving.
    pub fn needs_tls(self) -> bool {
        matches!(self, ServerProtocol::Https | ServerProtocol::Tls)
    }
}

impl std::fmt::Display for ServerProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerProtocol::Http => "HTTP",
            ServerProtocol::Https => "HTTPS",
            ServerProtocol::Http2 => "HTTP2",
            ServerProtocol::Grpc => "GRPC",
            ServerProtocol::Tls => "TLS",
            ServerProtocol::Tcp => "TCP",
        })
    }
}

/// One `[namespace/]dnsName` of a server's `hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayHost {
    /// VirtualServices of this namespace only; `None`: of any.
    pub namespace: Option<String>,
    /// Lowercase, without trailing dot: a name, `*.domain` or `*`.
    pub dns: String,
}

impl GatewayHost {
    /// The domain a VirtualService host gets at this server: the more
    /// specific of the two when one includes the other.
    fn admits(&self, namespace: &str, vs_host: &str) -> Option<String> {
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return None;
        }
        if host_matches(&self.dns, vs_host) {
            Some(vs_host.to_owned())
        } else if host_matches(vs_host, &self.dns) {
            Some(self.dns.clone())
        } else {
            None
        }
    }
}

impl std::fmt::Display for GatewayHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.dns),
            None => f.write_str(&self.dns),
        }
    }
}

/// Whether `pattern` (`*`, `*.domain` or a name) covers `host` (which may
/// be a pattern itself: `*.a.com` covers `*.b.a.com`).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => false,
    }
}

/// `Host: Shop.Example.com:8080.` → `shop.example.com`.
pub fn request_host(authority: &str) -> String {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Every Gateway of the config, oldest first, with what is bound to it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngressTable {
    /// Istio's, then the Gateway API's (see [`super::gateway_api`]).
    pub(super) gateways: Vec<Gateway>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    /// `namespace/name`.
    pub key: String,
    /// `Gateway namespace/name (file)`.
    pub origin: String,
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
}

impl Gateway {
    /// Whether an agent whose Node carries `labels` serves it.
    pub fn selects(&self, labels: &crate::config::Labels) -> bool {
        self.selector.iter().all(|(k, v)| {
            labels.get(k) == Some(v) || (k.as_str(), v.as_str()) == IMPLICIT_NODE_LABEL
        })
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    /// `spec.servers[i]`.
    pub field: String,
    pub name: Option<String>,
    pub port: u16,
    pub protocol: ServerProtocol,
    /// Hosts another Gateway claimed first on the same port are left out.
    pub hosts: Vec<GatewayHost>,
    /// Why the server is not served; `None`: served.
    pub not_served: Option<String>,
    /// `None` without `tls` settings.
    #[serde(skip)]
    pub tls: Option<ServerTls>,
    /// Routes by domain, in binding order (HTTP servers).
    pub routes: Vec<IngressHost>,
    /// `tls:` or `tcp:` rules in binding order (TLS and TCP servers).
    pub l4_routes: Vec<L4Route>,
}

impl Server {
    /// Whether its TLS step terminates TLS (SIMPLE, MUTUAL...).
    pub fn terminates_tls(&self) -> bool {
        let tls = self.tls.as_ref().and_then(|t| t.mode.as_ref());
        matches!(tls, Some(tls::TlsMode::Terminate(_)))
    }

    pub fn admits_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| host_matches(&h.dns, host))
    }

    /// The routes for `host`: an exact domain first, then the longest
    /// wildcard, then `*` (Envoy's virtual host order).
    pub fn routes_for(&self, host: &str) -> Option<&IngressHost> {
        self.routes
            .iter()
            .filter(|r| host_matches(&r.domain, host))
            .max_by_key(|r| match r.domain.as_str() {
                d if d == host => usize::MAX,
                "*" => 0,
                d => d.len(),
            })
    }
}

/// A VirtualService's routes at one server, for one domain.
#[derive(Debug, Clone, Serialize)]
pub struct IngressHost {
    pub domain: String,
    pub routes: VirtualHost,
}

/// One server of one Gateway, as a TLS handshake chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRef {
    /// `namespace/name`.
    pub gateway: String,
    /// `spec.servers[i]`.
    pub server: String,
}

/// What a request (or, with `R` an [`L4Route`], a relayed connection)
/// arriving at the ingress gets.
pub struct Selected<'a, R = IngressHost> {
    pub gateway: &'a Gateway,
    pub server: &'a Server,
    /// `None`: nothing there routes it (404, or the connection is closed).
    pub routes: Option<&'a R>,
}

impl IngressTable {
    /// The Gateways an agent whose Node carries `labels` serves.
    pub fn served_by<'a>(
        &'a self,
        labels: &'a crate::config::Labels,
    ) -> impl Iterator<Item = &'a Gateway> + 'a {
        self.gateways.iter().filter(|g| g.selects(labels))
    }

    /// The served servers on `port` of an agent whose Node carries
    /// `labels`, in the order requests pick them.
    pub fn servers_on<'a>(
        &'a self,
        labels: &'a crate::config::Labels,
        port: u16,
    ) -> impl Iterator<Item = (&'a Gateway, &'a Server)> + 'a {
        self.served_by(labels).flat_map(move |gateway| {
            let on_port = gateway.servers.iter();
            on_port
                .filter(move |s| s.port == port && s.not_served.is_none())
                .map(move |s| (gateway, s))
        })
    }

    /// The ports such an agent listens on, and whether each serves HTTP.
    pub fn ports(&self, labels: &crate::config::Labels) -> BTreeMap<u16, ServerProtocol> {
        let mut ports = BTreeMap::new();
        for gateway in self.served_by(labels) {
            for server in gateway.servers.iter().filter(|s| s.not_served.is_none()) {
                ports.entry(server.port).or_insert(server.protocol);
            }
        }
        ports
    }

    /// The server and routes for a request to `port` with `authority`.
    pub fn select(
        &self,
        labels: &crate::config::Labels,
        port: u16,
        authority: &str,
    ) -> Option<Selected<'_>> {
        self.select_at(labels, port, None, authority)
    }

    /// [`Self::select`] among the hosts of server `only` when a TLS
    /// handshake chose it, as Envoy's filter chain for that server holds its
    /// routes only: a client cannot reach a MUTUAL server's routes with the
    /// SNI of a SIMPLE one.
    pub fn select_at(
        &self,
        labels: &crate::config::Labels,
        port: u16,
        only: Option<&ServerRef>,
        authority: &str,
    ) -> Option<Selected<'_>> {
        let host = request_host(authority);
        let mut served = self.gateways.iter().filter(|g| g.selects(labels));
        served.find_map(|gateway| {
            let server = gateway.servers.iter().find(|s| {
                s.port == port
                    && s.not_served.is_none()
                    && s.admits_host(&host)
                    && only.is_none_or(|o| o.gateway == gateway.key && o.server == s.field)
            })?;
            Some(Selected {
                gateway,
                server,
                routes: server.routes_for(&host),
            })
        })
    }
}

/// What binding found wrong in Istio objects: as routing warnings, and as
/// findings for their status.
pub(super) struct Reports<'w> {
    pub warnings: &'w mut Vec<String>,
    pub findings: Vec<Finding>,
}

impl Reports<'_> {
    fn add(
        &mut self,
        origin: &Origin,
        object: IstioObject,
        field: String,
        analysis: Analysis,
        message: String,
    ) {
        self.warnings.push(format!("{origin}: {field}: {message}"));
        self.findings.push(Finding {
            object,
            field,
            analysis,
            message,
        });
    }
}

/// An Istio object of `kind` by its metadata.
pub(super) fn istio_object(kind: &'static str, meta: &Meta) -> IstioObject {
    (kind, meta.namespace.clone(), meta.name.clone())
}

fn object(meta: &Meta) -> IstioObject {
    istio_object("Gateway", meta)
}

/// Compiles the Gateways and binds the VirtualServices naming them.
pub(super) fn bind(
    mut drafts: Vec<(Origin, GatewayDraft)>,
    services: &[(Origin, VirtualServiceDraft)],
    config: &Config,
    reports: &mut Reports<'_>,
) -> IngressTable {
    drafts.sort_by(|(_, a), (_, b)| a.meta.rank().cmp(&b.meta.rank()));
    // (port, host) → the Gateway that claimed it first.
    let mut claimed = HashMap::<(u16, String), String>::new();
    let mut gateways = Vec::new();
    for (origin, draft) in drafts {
        let key = draft.key();
        let mut servers = Vec::new();
        for server in draft.servers {
            let tls = server_tls(&draft.meta.namespace, &server, config);
            let mut hosts = Vec::new();
            for (j, host) in server.hosts.into_iter().enumerate() {
                let owner = claimed
                    .entry((server.port, host.dns.clone()))
                    .or_insert_with(|| key.clone());
                if *owner == key {
                    hosts.push(host);
                } else {
                    let message = format!(
                        "host {} on port {} is already claimed by Gateway {owner}, which is \
                         older and serves it; not served by this one",
                        host.dns, server.port
                    );
                    let field = format!("{}.hosts[{j}]", server.field);
                    let analysis = Analysis::ConflictingGateways;
                    reports.add(&origin, object(&draft.meta), field, analysis, message);
                }
            }
            let not_served = tls.as_ref().err().cloned();
            if let Some(reason) = &not_served {
                let analysis = if reason.contains(".credentialName: ") {
                    Analysis::InvalidGatewayCredential
                } else {
                    Analysis::SchemaValidationError
                };
                let message = format!(
                    "{reason}; this server is not served (the Gateway's other servers are)"
                );
                let field = server.field.clone();
                reports.add(&origin, object(&draft.meta), field, analysis, message);
            }
            servers.push(Server {
                field: server.field,
                name: server.name,
                port: server.port,
                protocol: server.protocol,
                hosts,
                not_served,
                tls: tls.ok().flatten(),
                routes: Vec::new(),
                l4_routes: Vec::new(),
            });
        }
        gateways.push(Gateway {
            key,
            origin: origin.to_string(),
            selector: draft.selector,
            servers,
        });
    }
    let mut services: Vec<_> = services.iter().collect();
    services.sort_by(|(_, a), (_, b)| a.meta.rank().cmp(&b.meta.rank()));
    for (origin, vs) in services {
        report_missing(origin, vs, &gateways, reports);
        let warnings = &mut *reports.warnings;
        for gateway in &mut gateways {
            let scope = Scope::Gateway(&gateway.key);
            if !vs.applies(scope) {
                continue;
            }
            let mut routes = vs.routes_at(scope);
            default_ports(&mut routes, config, origin, warnings);
            for server in &mut gateway.servers {
                if server.protocol.is_http() {
                    // A VirtualService of tls or tcp rules only claims no
                    // HTTP host.
                    if vs.routes.is_empty() && !vs.l4.is_empty() {
                        continue;
                    }
                    bind_hosts(origin, vs, &routes, server, &gateway.key, config, warnings);
                } else if admits_any(server, vs, config) {
                    let before = server.l4_routes.len();
                    ingress_l4::bind(origin, vs, &gateway.key, server, warnings);
                    let added = server.l4_routes[before..].iter_mut().map(|r| &mut r.route);
                    for route in added {
                        default_ports(std::slice::from_mut(route), config, origin, warnings);
                    }
                }
            }
        }
    }
    IngressTable { gateways }
}

/// Whether one of `vs`'s hosts is among `server`'s (Istio binds a
/// VirtualService to a server only then).
fn admits_any(server: &Server, vs: &VirtualServiceDraft, config: &Config) -> bool {
    vs.hosts.iter().any(|host| {
        let host = qualified(host, &vs.meta.namespace, config.cluster_domain());
        let mut hosts = server.hosts.iter();
        hosts.any(|g| g.admits(&vs.meta.namespace, &host).is_some())
    })
}

fn bind_hosts(
    origin: &Origin,
    vs: &VirtualServiceDraft,
    routes: &[super::HttpRoute],
    server: &mut Server,
    gateway: &str,
    config: &Config,
    warnings: &mut Vec<String>,
) {
    for (h, host) in vs.hosts.iter().enumerate() {
        let host = qualified(host, &vs.meta.namespace, config.cluster_domain());
        let domains: Vec<String> = server
            .hosts
            .iter()
            .filter_map(|g| g.admits(&vs.meta.namespace, &host))
            .collect();
        for domain in domains {
            if let Some(taken) = server.routes.iter().find(|r| r.domain == domain) {
                warnings.push(format!(
                    "{origin}: spec.hosts[{h}]: {domain} at Gateway {gateway} port {} is already \
                     bound by {}, which is older and wins",
                    server.port, taken.routes.origin
                ));
                continue;
            }
            server.routes.push(IngressHost {
                domain,
                routes: VirtualHost::new(origin.to_string(), routes.to_vec()),
            });
        }
    }
}

/// A destination without a port at a Gateway goes to the Service's only
/// port, as in Istio (a workload's request keeps the port it dialled).
pub(super) fn default_ports(
    routes: &mut [super::HttpRoute],
    config: &Config,
    origin: &Origin,
    warnings: &mut Vec<String>,
) {
    for route in routes {
        let name = route.name.clone();
        for destination in super::compile::destinations_mut(route) {
            if destination.port.is_some() {
                continue;
            }
            let Some(service) = config.service_by_key(&destination.service) else {
                continue;
            };
            let tcp: Vec<_> = service
                .ports
                .iter()
                .filter(|p| p.protocol == crate::config::Protocol::Tcp)
                .collect();
            match tcp.as_slice() {
                [only] => destination.port = Some(only.port),
                _ => warnings.push(format!(
                    "{origin}: route {name}: Service {} has {} ports; at a Gateway a \
                     destination needs port.number (requests to it get 503)",
                    destination.service,
                    tcp.len()
                )),
            }
        }
    }
}

/// A server's `tls`, compiled against the Secrets, or why it cannot be
/// served (the server only: the rest of the Gateway is).
fn server_tls(
    namespace: &str,
    server: &ServerDraft,
    config: &Config,
) -> Result<Option<ServerTls>, String> {
    let kind = match server.protocol {
        ServerProtocol::Https => PortKind::Http,
        ServerProtocol::Http2 | ServerProtocol::Grpc if server.tls.is_some() => PortKind::Http,
        ServerProtocol::Http | ServerProtocol::Http2 | ServerProtocol::Grpc => PortKind::Plain,
        ServerProtocol::Tls => PortKind::Tls,
        ServerProtocol::Tcp => PortKind::Tcp,
    };
    let ctx = TlsContext {
        namespaces: [namespace, config.root_namespace()],
        secrets: config.secrets(),
    };
    let mut issues = Issues::default();
    let field = format!("{}.tls", server.field);
    let compiled = tls::compile(server.tls.as_ref(), kind, &field, &ctx, &mut issues);
    if !issues.is_empty() {
        let issues: Vec<_> = issues.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        return Err(issues.join("; "));
    }
    Ok(compiled.filter(|t| t.https_redirect || t.mode.is_some()))
}

/// Short VirtualService hosts name Services of its namespace, as in Istio.
fn qualified(host: &str, namespace: &str, cluster_domain: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.contains('.') || host == "*" {
        host
    } else {
        format!("{host}.{namespace}.svc.{cluster_domain}")
    }
}

/// Gateways named by a VirtualService that do not exist: reported, and the
/// rest of the object applies where it can.
fn report_missing(
    origin: &Origin,
    vs: &VirtualServiceDraft,
    gateways: &[Gateway],
    reports: &mut Reports<'_>,
) {
    let top = vs
        .gateways
        .iter()
        .enumerate()
        .map(|(i, name)| (format!("spec.gateways[{i}]"), name));
    let per_match = vs.routes.iter().enumerate().flat_map(|(r, draft)| {
        draft
            .match_gateways
            .iter()
            .enumerate()
            .flat_map(move |(m, list)| {
                list.iter().enumerate().map(move |(k, name)| {
                    (format!("spec.http[{r}].match[{m}].gateways[{k}]"), name)
                })
            })
    });
    let l4 = ingress_l4::named_gateways(vs);
    for (field, name) in top.chain(per_match).chain(l4) {
        if name == "mesh" {
            continue;
        }
        let key = super::compile::gateway_key(name, &vs.meta.namespace);
        if !gateways.iter().any(|g| g.key == key) {
            let message = format!(
                "Gateway {key} does not exist; nothing is routed there by this VirtualService"
            );
            let object = istio_object("VirtualService", &vs.meta);
            let analysis = Analysis::ReferencedResourceNotFound;
            reports.add(origin, object, field, analysis, message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_longer_names_only() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.example.com", "shop.example.com"));
        assert!(host_matches("*.example.com", "*.shop.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("shop.example.com", "*.example.com"));
    }

    #[test]
    fn request_hosts_lose_port_case_and_dot() {
        assert_eq!(request_host("Shop.Example.com:8080"), "shop.example.com");
        assert_eq!(request_host("shop.example.com."), "shop.example.com");
        assert_eq!(request_host("[::1]:80"), "::1");
    }

    #[test]
    fn a_server_host_narrows_a_wildcard_virtual_service() {
        let any = GatewayHost {
            namespace: None,
            dns: "bookinfo.com".into(),
        };
        assert_eq!(any.admits("default", "*").as_deref(), Some("bookinfo.com"));
        let own = GatewayHost {
            namespace: Some("shop".into()),
            dns: "*".into(),
        };
        assert_eq!(own.admits("default", "x.com"), None);
        assert_eq!(own.admits("shop", "x.com").as_deref(), Some("x.com"));
    }
}
