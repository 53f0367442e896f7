//! Gateway API `GatewayClass` and `Gateway` (`gateway.networking.k8s.io`):
//! their schema, read strictly, and their compilation into the same per-node
//! ingress model as Istio Gateways ([`super::ingress`]), with the HTTPRoutes
//! attached to their listeners by `parentRefs` (compiled by
//! [`super::gateway`], shared with the mesh). The status of each object, as a
//! Gateway API controller reports it, is computed here as plain data; the
//! Kubernetes source writes it to the API server.
//!
//! Every node serves every Gateway of a nodemesh GatewayClass (one whose
//! `controllerName` is [`CONTROLLER_NAME`]); Gateways of other classes are
//! left to their controllers.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::config::label_selector::{LabelSelector, LabelSelectorSpec};
use crate::config::{
    check_dns_label, check_metadata, port_number, Config, Issues, Meta, Object, Origin,
};
use crate::ingress::tls::{self, PortKind, ServerTls, ServerTlsSpec, TlsContext};

use super::compile::{check_host, HttpRouteDraft, Precedence, RouteDraft, Warnings};
use super::grpc_route::RouteKind;
use super::ingress::{host_matches, Gateway, GatewayHost, IngressHost, Server, ServerProtocol};
use super::reference_grant::{Kind as GrantKind, ReferenceGrants};
use super::{HttpRoute, RouteAction, VirtualHost};

/// The `controllerName` of the GatewayClasses nodemesh serves.
pub const CONTROLLER_NAME: &str = "nodemesh.io/gateway-controller";
/// The API group of the Gateway API kinds.
pub const GROUP: &str = "gateway.networking.k8s.io";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GatewayClassSpec {
    controller_name: String,
    #[serde(rename = "description")]
    _description: Option<IgnoredAny>,
    parameters_ref: Option<IgnoredAny>,
}

pub(crate) struct GatewayClassDraft {
    name: String,
    controller: String,
}

pub(crate) fn gateway_class(
    doc: Object<GatewayClassSpec>,
    issues: &mut Issues,
) -> GatewayClassDraft {
    check_dns_label(&doc.metadata.name, "metadata.name", issues);
    if doc.spec.parameters_ref.is_some() && doc.spec.controller_name == CONTROLLER_NAME {
        issues.add(
            "spec.parametersRef",
            "not supported: nodemesh takes no parameters",
        );
    }
    GatewayClassDraft {
        name: doc.metadata.name,
        controller: doc.spec.controller_name,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GatewaySpec {
    gateway_class_name: String,
    #[serde(default)]
    listeners: Vec<ListenerSpec>,
    addresses: Option<Vec<IgnoredAny>>,
    infrastructure: Option<IgnoredAny>,
    backend_tls: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListenerSpec {
    name: String,
    hostname: Option<String>,
    port: i64,
    protocol: String,
    tls: Option<ListenerTlsSpec>,
    allowed_routes: Option<AllowedRoutesSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListenerTlsSpec {
    mode: Option<String>,
    #[serde(default)]
    certificate_refs: Vec<ObjectRefSpec>,
    options: Option<IgnoredAny>,
    frontend_validation: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectRefSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowedRoutesSpec {
    namespaces: Option<RouteNamespacesSpec>,
    kinds: Option<Vec<RouteKindSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteNamespacesSpec {
    from: Option<String>,
    selector: Option<LabelSelectorSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteKindSpec {
    group: Option<String>,
    kind: String,
}

/// Which namespaces' routes a listener admits.
enum AllowedNamespaces {
    Same,
    All,
    /// Namespaces the selector selects.
    Selector(LabelSelector),
}

/// A Gateway checked on its own, waiting for its class, Secrets and routes.
pub(crate) struct GatewayDraft {
    meta: Meta,
    class: String,
    /// `spec.addresses` is set: the Gateway is not served (see the README).
    addresses: bool,
    listeners: Vec<ListenerDraft>,
    pub(super) warnings: Warnings,
}

struct ListenerDraft {
    field: String,
    name: String,
    port: u16,
    protocol: Option<ServerProtocol>,
    protocol_name: String,
    /// Lowercase; `None`: any.
    hostname: Option<String>,
    /// The first certificateRef's Secret: (namespace, name).
    certificate: Result<Option<(String, String)>, (&'static str, String)>,
    namespaces: AllowedNamespaces,
    /// Route kinds it admits (by name; group checked when read).
    kinds: Vec<String>,
    /// Why `allowedRoutes.kinds` admits none of those it names.
    invalid_kinds: Option<String>,
}

/// Route kinds an HTTP or HTTPS listener admits unless it narrows them.
const HTTP_KINDS: [&str; 2] = ["HTTPRoute", "GRPCRoute"];

pub(crate) fn gateway(doc: Object<GatewaySpec>, issues: &mut Issues) -> GatewayDraft {
    check_metadata(&doc.metadata, issues);
    let namespace = doc.metadata.namespace.clone();
    let spec = doc.spec;
    let mut warnings = Warnings::default();
    check_dns_label(&spec.gateway_class_name, "spec.gatewayClassName", issues);
    if spec.listeners.is_empty() {
        issues.add("spec.listeners", "at least one listener is required");
    }
    for (field, set) in [
        ("spec.infrastructure", spec.infrastructure.is_some()),
        ("spec.backendTLS", spec.backend_tls.is_some()),
    ] {
        if set {
            warnings.not_enforced(field);
        }
    }
    let mut listeners: Vec<ListenerDraft> = Vec::new();
    for (i, spec) in spec.listeners.into_iter().enumerate() {
        let at = format!("spec.listeners[{i}]");
        let Some(listener) = listener(spec, &at, &namespace, &mut warnings, issues) else {
            continue;
        };
        if listeners.iter().any(|l| l.name == listener.name) {
            issues.add(
                format!("{at}.name"),
                format!("listener name {:?} is used twice", listener.name),
            );
        }
        listeners.push(listener);
    }
    GatewayDraft {
        meta: Meta::new(&doc.metadata),
        class: spec.gateway_class_name,
        addresses: spec.addresses.is_some_and(|a| !a.is_empty()),
        listeners,
        warnings,
    }
}

fn listener(
    spec: ListenerSpec,
    at: &str,
    namespace: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Option<ListenerDraft> {
    check_dns_label(&spec.name, &format!("{at}.name"), issues);
    let port = port_number(spec.port, format!("{at}.port"), issues)?;
    let protocol = match spec.protocol.as_str() {
        "HTTP" => Some(ServerProtocol::Http),
        "HTTPS" => Some(ServerProtocol::Https),
        _ => None,
    };
    let hostname = spec.hostname.map(|h| {
        if h == "*" || h.parse::<std::net::IpAddr>().is_ok() {
            issues.add(
                format!("{at}.hostname"),
                "must be a DNS name or *.domain, not * or an IP address",
            );
        }
        check_host(&h, format!("{at}.hostname"), issues);
        h.trim_end_matches('.').to_ascii_lowercase()
    });
    let certificate = match (protocol, spec.tls) {
        (Some(ServerProtocol::Https), None) => {
            issues.add(
                format!("{at}.tls"),
                "an HTTPS listener needs tls.certificateRefs",
            );
            Ok(None)
        }
        (Some(ServerProtocol::Https), Some(tls)) => {
            certificate(tls, at, namespace, warnings, issues)
        }
        (_, Some(_)) if protocol.is_some() => {
            issues.add(
                format!("{at}.tls"),
                "an HTTP listener takes no tls (use protocol HTTPS)",
            );
            Ok(None)
        }
        _ => Ok(None),
    };
    let allowed = spec.allowed_routes.unwrap_or(AllowedRoutesSpec {
        namespaces: None,
        kinds: None,
    });
    let from = allowed.namespaces.unwrap_or(RouteNamespacesSpec {
        from: None,
        selector: None,
    });
    let field = format!("{at}.allowedRoutes.namespaces");
    let namespaces = match (from.from.as_deref().unwrap_or("Same"), from.selector) {
        ("Same", _) => AllowedNamespaces::Same,
        ("All", _) => AllowedNamespaces::All,
        ("Selector", Some(selector)) => AllowedNamespaces::Selector(LabelSelector::compile(
            selector,
            &format!("{field}.selector"),
            issues,
        )),
        ("Selector", None) => {
            issues.add(
                format!("{field}.selector"),
                "from: Selector needs a selector",
            );
            AllowedNamespaces::Same
        }
        (other, _) => {
            issues.add(
                format!("{field}.from"),
                format!("must be Same, All or Selector, not {other:?}"),
            );
            AllowedNamespaces::Same
        }
    };
    // An empty list, like none, means the protocol's default kinds.
    let (kinds, invalid_kinds) = match allowed.kinds.filter(|k| !k.is_empty()) {
        None => (HTTP_KINDS.map(str::to_owned).to_vec(), None),
        Some(list) => {
            let (known, unknown): (Vec<_>, Vec<_>) = list.into_iter().partition(|k| {
                k.group.as_deref().unwrap_or(GROUP) == GROUP
                    && HTTP_KINDS.contains(&k.kind.as_str())
            });
            let invalid = (!unknown.is_empty()).then(|| {
                let names: Vec<_> = unknown.iter().map(|k| k.kind.as_str()).collect();
                format!("route kinds {names:?} are not supported on this listener (only HTTPRoute and GRPCRoute)")
            });
            (known.into_iter().map(|k| k.kind).collect(), invalid)
        }
    };
    Some(ListenerDraft {
        field: at.to_owned(),
        name: spec.name,
        port,
        protocol,
        protocol_name: spec.protocol,
        hostname,
        certificate,
        namespaces,
        kinds,
        invalid_kinds,
    })
}

/// The Secret an HTTPS listener terminates with, (namespace, name), or why
/// it has none (reason, message), which only that listener suffers from.
fn certificate(
    tls: ListenerTlsSpec,
    at: &str,
    namespace: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Result<Option<(String, String)>, (&'static str, String)> {
    if let Some(mode) = tls.mode.as_deref().filter(|m| *m != "Terminate") {
        issues.add(
            format!("{at}.tls.mode"),
            format!("{mode:?} is not supported on an HTTPS listener: only Terminate"),
        );
    }
    for (field, set) in [
        ("options", tls.options.is_some()),
        ("frontendValidation", tls.frontend_validation.is_some()),
    ] {
        if set {
            warnings.not_enforced(format!("{at}.tls.{field}"));
        }
    }
    if tls.certificate_refs.len() > 1 {
        warnings.add(
            format!("{at}.tls.certificateRefs"),
            "only the first certificate is served",
        );
    }
    let Some(first) = tls.certificate_refs.into_iter().next() else {
        issues.add(
            format!("{at}.tls.certificateRefs"),
            "an HTTPS listener needs a certificateRef",
        );
        return Ok(None);
    };
    let field = format!("{at}.tls.certificateRefs[0]");
    let group = first.group.as_deref().unwrap_or("");
    let kind = first.kind.as_deref().unwrap_or("Secret");
    if kind != "Secret" || !matches!(group, "" | "core") {
        return Err((
            "InvalidCertificateRef",
            format!("{field}: only Secrets are supported, not {kind:?} in group {group:?}"),
        ));
    }
    // Another namespace's Secret is checked against its ReferenceGrants once all are loaded.
    let namespace = first.namespace.unwrap_or_else(|| namespace.to_owned());
    Ok(Some((namespace, first.name)))
}

/// A Gateway parent of an HTTPRoute, as written.
pub(crate) struct GatewayParent {
    /// `spec.parentRefs[i]`.
    pub field: String,
    pub namespace: String,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
}

/// Whether a parentRef of `group` and `kind` (defaults applied) names a
/// Gateway of this API.
pub(super) fn is_gateway(group: &str, kind: &str) -> bool {
    group == GROUP && kind == "Gateway"
}

/// A condition as the Gateway API writes it; the Kubernetes source adds
/// `observedGeneration` and `lastTransitionTime`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Condition {
    pub(super) fn new(
        kind: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Condition {
            kind,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The status nodemesh computes for one Gateway API (or Istio, see
/// [`super::istio_status`]) object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    /// The API group: both APIs have a `Gateway`.
    pub group: &'static str,
    /// `GatewayClass`, `Gateway`, `HTTPRoute`, `GRPCRoute` or `VirtualService`.
    pub kind: &'static str,
    /// `None` for a GatewayClass.
    pub namespace: Option<String>,
    pub name: String,
    pub status: StatusKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StatusKind {
    GatewayClass {
        conditions: Vec<Condition>,
    },
    Gateway {
        conditions: Vec<Condition>,
        listeners: Vec<ListenerStatus>,
    },
    Route {
        parents: Vec<ParentStatus>,
    },
    /// An Istio object's `conditions` and `validationMessages`.
    Istio {
        conditions: Vec<Condition>,
        validation_messages: Vec<super::istio_status::Analysis>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    pub name: String,
    pub attached_routes: u32,
    pub supported_kinds: Vec<String>,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    /// The Gateway's namespace and name.
    pub namespace: String,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u16>,
    pub conditions: Vec<Condition>,
}

/// A Gateway being compiled: the served form and what status needs.
struct Compiled {
    meta: Meta,
    gateway: Gateway,
    listeners: Vec<ListenerDraft>,
    /// Per listener: routes attached, and per domain the routes in
    /// precedence order (precedence, route rank, route, route origin).
    attached: Vec<u32>,
    routes: Vec<BTreeMap<String, Vec<Attached>>>,
    /// Per listener: the routes attached, for the rule that an HTTPRoute
    /// and a GRPCRoute do not share a hostname there.
    bound: Vec<Vec<super::grpc_route::Bound>>,
}

type Attached = (
    Precedence,
    (bool, String, String, String),
    HttpRoute,
    String,
);

/// Compiles the Gateways of nodemesh's classes and attaches the HTTPRoutes
/// naming them; returns them for the ingress table, with every object's
/// status.
pub(super) fn compile(
    classes: Vec<(Origin, GatewayClassDraft)>,
    gateways: Vec<(Origin, GatewayDraft)>,
    routes: &[(Origin, HttpRouteDraft)],
    config: &Config,
    grants: &ReferenceGrants,
    resolve: &mut dyn FnMut(&mut RouteDraft, &str, &Origin),
    warnings: &mut Vec<String>,
) -> (Vec<Gateway>, Vec<ObjectStatus>) {
    let mut statuses = Vec::new();
    for (_, class) in classes
        .iter()
        .filter(|(_, c)| c.controller == CONTROLLER_NAME)
    {
        statuses.push(ObjectStatus {
            group: GROUP,
            kind: "GatewayClass",
            namespace: None,
            name: class.name.clone(),
            status: StatusKind::GatewayClass {
                conditions: vec![Condition::new(
                    "Accepted",
                    true,
                    "Accepted",
                    "served by every nodemesh agent",
                )],
            },
        });
    }
    let ours = |class: &str| {
        classes
            .iter()
            .any(|(_, c)| c.name == class && c.controller == CONTROLLER_NAME)
    };
    let mut gateways: Vec<_> = gateways.into_iter().collect();
    gateways.sort_by(|(_, a), (_, b)| a.meta.rank().cmp(&b.meta.rank()));
    // Gateways of another controller, by `namespace/name`: routes naming
    // them are not reported on.
    let mut others = Vec::new();
    let mut compiled = Vec::new();
    for (origin, draft) in gateways {
        let key = format!("{}/{}", draft.meta.namespace, draft.meta.name);
        if !ours(&draft.class) {
            if !classes.iter().any(|(_, c)| c.name == draft.class) {
                warnings.push(format!(
                    "{origin}: spec.gatewayClassName: GatewayClass {} does not exist; nodemesh \
                     serves Gateways of classes whose controllerName is {CONTROLLER_NAME}",
                    draft.class
                ));
            }
            others.push(key);
            continue;
        }
        compiled.push(gateway_of(origin, key, draft, config, grants, warnings));
    }

    let mut routes: Vec<_> = routes
        .iter()
        .filter(|(_, r)| !r.gateway_parents.is_empty())
        .collect();
    routes.sort_by(|(_, a), (_, b)| a.meta.rank().cmp(&b.meta.rank()));
    for (origin, route) in routes {
        let namespace = &route.meta.namespace;
        // The route's rules with their backends resolved, once for all parents.
        let mut refs = Vec::new();
        let drafts: Vec<_> = route
            .routes
            .iter()
            .map(|(precedence, draft)| {
                let mut draft = RouteDraft {
                    route: draft.route.clone(),
                    destination_fields: draft.destination_fields.clone(),
                    redirect_port: None,
                    match_gateways: Vec::new(),
                };
                refs.extend(check_backends(
                    &mut draft, route.kind, namespace, config, grants, resolve, origin,
                ));
                (*precedence, draft.route)
            })
            .collect();
        let (precedences, mut rules): (Vec<_>, Vec<_>) = drafts.into_iter().unzip();
        // A backend without a port takes its Service's only one, as at Istio Gateways.
        super::ingress::default_ports(&mut rules, config, origin, warnings);
        let drafts: Vec<_> = precedences.into_iter().zip(rules).collect();
        refs.sort();
        refs.dedup();
        let resolved = match refs.first() {
            None => Condition::new(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "all references resolved",
            ),
            Some((reason, _)) => {
                let messages: Vec<_> = refs.iter().map(|(_, m)| m.as_str()).collect();
                Condition::new("ResolvedRefs", false, reason, messages.join("; "))
            }
        };
        let mut parents = Vec::new();
        for parent in &route.gateway_parents {
            let key = format!("{}/{}", parent.namespace, parent.name);
            if others.contains(&key) {
                continue;
            }
            let accepted = match compiled.iter_mut().find(|c| c.gateway.key == key) {
                None => Condition::new(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    format!("Gateway {key} does not exist"),
                ),
                Some(gateway) => attach(gateway, parent, route, origin, &drafts, config),
            };
            if !accepted.status {
                warnings.push(format!(
                    "{origin}: {}: {}; not attached there",
                    parent.field, accepted.message
                ));
            }
            parents.push(ParentStatus {
                namespace: parent.namespace.clone(),
                name: parent.name.clone(),
                section_name: parent.section_name.clone(),
                port: parent.port,
                conditions: vec![accepted, resolved.clone()],
            });
        }
        // Backends matter where the route is attached.
        if parents.iter().any(|p| p.conditions[0].status) {
            for (_, message) in &refs {
                warnings.push(format!(
                    "{origin}: {message}; requests for it get 500 at the Gateway"
                ));
            }
        }
        if !parents.is_empty() {
            statuses.push(ObjectStatus {
                group: GROUP,
                kind: route.kind.name(),
                namespace: Some(namespace.clone()),
                name: route.meta.name.clone(),
                status: StatusKind::Route { parents },
            });
        }
    }

    let mut served = Vec::new();
    for mut gateway in compiled {
        for (server, by_domain) in gateway.gateway.servers.iter_mut().zip(&mut gateway.routes) {
            for (domain, mut attached) in std::mem::take(by_domain) {
                attached.sort_by(|a, b| (a.0 .0, &a.1, a.0 .1).cmp(&(b.0 .0, &b.1, b.0 .1)));
                let mut origins: Vec<String> = Vec::new();
                for (.., origin) in &attached {
                    if !origins.contains(origin) {
                        origins.push(origin.clone());
                    }
                }
                let routes = attached.into_iter().map(|(_, _, route, _)| route).collect();
                server.routes.push(IngressHost {
                    domain,
                    routes: VirtualHost::new(origins.join(", "), routes),
                });
            }
        }
        statuses.push(gateway_status(&gateway));
        served.push(gateway.gateway);
    }
    (served, statuses)
}

fn gateway_of(
    origin: Origin,
    key: String,
    mut draft: GatewayDraft,
    config: &Config,
    grants: &ReferenceGrants,
    warnings: &mut Vec<String>,
) -> Compiled {
    for listener in &mut draft.listeners {
        permit_certificate(listener, &draft.meta.namespace, grants);
    }
    let mut servers = Vec::new();
    for listener in &draft.listeners {
        let not_served = match (&listener.protocol, &listener.certificate) {
            _ if draft.addresses => Some("spec.addresses is not supported".to_owned()),
            (None, _) => Some(format!(
                "protocol {} is not supported (only HTTP and HTTPS)",
                listener.protocol_name
            )),
            (_, Err((_, message))) => Some(message.clone()),
            _ => None,
        };
        let tls = match (&listener.certificate, &not_served) {
            (Ok(Some((namespace, secret))), None) => {
                server_tls(namespace, listener, secret, config)
            }
            _ => Ok(None),
        };
        let not_served = not_served.or_else(|| tls.as_ref().err().cloned());
        if let Some(reason) = &not_served {
            warnings.push(format!(
                "{origin}: {}: {reason}; this listener is not served (the Gateway's others are)",
                listener.field
            ));
        }
        servers.push(Server {
            field: listener.field.clone(),
            name: Some(listener.name.clone()),
            port: listener.port,
            protocol: listener.protocol.unwrap_or(ServerProtocol::Http),
            hosts: vec![GatewayHost {
                namespace: None,
                dns: listener.hostname.clone().unwrap_or_else(|| "*".to_owned()),
            }],
            not_served,
            tls: tls.ok().flatten(),
            routes: Vec::new(),
            l4_routes: Vec::new(),
        });
    }
    if draft.addresses {
        warnings.push(format!(
            "{origin}: spec.addresses: not supported (the Gateway is served on every node's own \
             addresses); the Gateway is not served"
        ));
    }
    let n = draft.listeners.len();
    Compiled {
        meta: draft.meta,
        gateway: Gateway {
            key,
            origin: origin.to_string(),
            selector: BTreeMap::new(),
            servers,
        },
        listeners: draft.listeners,
        attached: vec![0; n],
        routes: (0..n).map(|_| BTreeMap::new()).collect(),
        bound: (0..n).map(|_| Vec::new()).collect(),
    }
}

/// Refuses a listener's Secret of another namespace unless a ReferenceGrant
/// there lets this Gateway's namespace refer to it.
fn permit_certificate(listener: &mut ListenerDraft, namespace: &str, grants: &ReferenceGrants) {
    let Ok(Some((secret_namespace, secret))) = &listener.certificate else {
        return;
    };
    let (gateway, secret_kind) = (GrantKind::GATEWAY, GrantKind::SECRET);
    if !grants.permits(gateway, namespace, secret_kind, secret_namespace, secret) {
        listener.certificate = Err((
            "RefNotPermitted",
            format!(
                "{}.tls.certificateRefs[0]: Secret {secret_namespace}/{secret} is in another \
                 namespace and no ReferenceGrant there allows Gateways of namespace {namespace} \
                 to refer to it",
                listener.field
            ),
        ));
    }
}

/// An HTTPS listener's certificate, compiled as an Istio `SIMPLE` server
/// with `credentialName` would be, from the Secret's namespace only.
fn server_tls(
    namespace: &str,
    listener: &ListenerDraft,
    secret: &str,
    config: &Config,
) -> Result<Option<ServerTls>, String> {
    let ctx = TlsContext {
        namespaces: [namespace, namespace],
        secrets: config.secrets(),
    };
    let mut issues = Issues::default();
    let field = format!("{}.tls.certificateRefs[0]", listener.field);
    let spec = ServerTlsSpec::terminate(secret.to_owned());
    let compiled = tls::compile(Some(&spec), PortKind::Http, &field, &ctx, &mut issues);
    if !issues.is_empty() {
        let issues: Vec<_> = issues
            .iter()
            .map(|(_, m)| format!("{field}: {m}"))
            .collect();
        return Err(issues.join("; "));
    }
    Ok(compiled)
}

/// Resolves a rule's backends for a Gateway; those that cannot be are
/// dropped (a rule left with none answers 500, as the Gateway API asks)
/// and returned as (reason, message).
fn check_backends(
    draft: &mut RouteDraft,
    kind: RouteKind,
    namespace: &str,
    config: &Config,
    grants: &ReferenceGrants,
    resolve: &mut dyn FnMut(&mut RouteDraft, &str, &Origin),
    origin: &Origin,
) -> Vec<(&'static str, String)> {
    let mut refs = Vec::new();
    // A backend of another namespace needs a ReferenceGrant there.
    let fields = draft.destination_fields.clone();
    let route = match kind {
        RouteKind::Http => GrantKind::HTTP_ROUTE,
        RouteKind::Grpc => GrantKind::GRPC_ROUTE,
    };
    let service = GrantKind::SERVICE;
    for (destination, field) in super::compile::destinations_mut(&mut draft.route).zip(&fields) {
        let Some((name, other)) = destination.service.split_once('.') else {
            continue;
        };
        if !grants.permits(route, namespace, service, other, name) {
            refs.push((
                "RefNotPermitted",
                format!(
                    "{field}: Service {other}/{name} is in another namespace and no \
                     ReferenceGrant there allows {}s of namespace {namespace} to refer to it",
                    kind.name()
                ),
            ));
            destination.service = "".into();
        }
    }
    resolve(draft, namespace, origin);
    let fields = draft.destination_fields.clone();
    let valid = |d: &super::Destination| {
        config.service_by_key(&d.service).is_some_and(|s| {
            d.port
                .is_none_or(|p| s.port(p, crate::config::Protocol::Tcp).is_some())
        })
    };
    for (destination, field) in super::compile::destinations_mut(&mut draft.route).zip(&fields) {
        if !valid(destination) && !destination.service.is_empty() {
            let message = match (
                config.service_by_key(&destination.service),
                destination.port,
            ) {
                (Some(_), Some(port)) => format!(
                    "{field}.port: Service {} has no TCP port {port}",
                    destination.service
                ),
                _ => format!(
                    "{field}.name: Service {} does not exist",
                    destination.service
                ),
            };
            refs.push(("BackendNotFound", message));
        }
    }
    let route = &mut draft.route;
    route.mirrors = route
        .mirrors
        .iter()
        .filter(|m| valid(&m.destination))
        .cloned()
        .collect();
    if let RouteAction::Forward(backends) = &route.action {
        let kept: Vec<_> = backends
            .iter()
            .filter(|b| valid(&b.destination))
            .cloned()
            .collect();
        route.action = match kept.is_empty() {
            true => RouteAction::DirectResponse {
                status: 500,
                body: bytes::Bytes::new(),
            },
            false => RouteAction::Forward(kept.into()),
        };
    }
    refs
}

/// Attaches `route` to the listeners of `gateway` its parentRef selects and
/// admit it; the `Accepted` condition for that parent.
fn attach(
    gateway: &mut Compiled,
    parent: &GatewayParent,
    route: &HttpRouteDraft,
    origin: &Origin,
    drafts: &[(Precedence, HttpRoute)],
    config: &Config,
) -> Condition {
    let namespace = &route.meta.namespace;
    let mut reason = None;
    let mut attached = false;
    let candidates = gateway.listeners.iter().enumerate().filter(|(_, l)| {
        parent.section_name.as_ref().is_none_or(|s| *s == l.name)
            && parent.port.is_none_or(|p| p == l.port)
    });
    for (i, listener) in candidates {
        let allowed = match &listener.namespaces {
            AllowedNamespaces::Same => *namespace == gateway.meta.namespace,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(selector) => config
                .namespace(namespace)
                .is_some_and(|ns| selector.matches(&ns.labels)),
        };
        let kind = route.kind.name();
        if !allowed || !listener.kinds.iter().any(|k| k == kind) {
            reason.get_or_insert((
                "NotAllowedByListeners",
                format!(
                    "listener {} does not allow {kind}s of namespace {namespace}",
                    listener.name
                ),
            ));
            continue;
        }
        let domains = domains(listener.hostname.as_deref(), &route.hostnames);
        if domains.is_empty() {
            reason = Some((
                "NoMatchingListenerHostname",
                format!(
                    "no hostname of the route matches listener {} ({})",
                    listener.name,
                    listener.hostname.as_deref().unwrap_or("*")
                ),
            ));
            continue;
        }
        if gateway.gateway.servers[i].not_served.is_some() {
            continue;
        }
        let bound = &mut gateway.bound[i];
        if let Some(other) = super::grpc_route::conflict(bound, route.kind, &domains) {
            reason = Some((
                "NotAllowedByListeners",
                format!(
                    "listener {} already has {}, older, for the same hostname; an HTTPRoute and \
                     a GRPCRoute cannot share one",
                    listener.name, other.object
                ),
            ));
            continue;
        }
        bound.push(super::grpc_route::Bound {
            kind: route.kind,
            object: format!("{kind} {}/{}", route.meta.namespace, route.meta.name),
            domains: domains.clone(),
        });
        attached = true;
        gateway.attached[i] += 1;
        let rank = route.meta.rank();
        let rank = (
            rank.0,
            rank.1.to_owned(),
            rank.2.to_owned(),
            rank.3.to_owned(),
        );
        for domain in domains {
            let entry = gateway.routes[i].entry(domain).or_default();
            for (precedence, draft) in drafts {
                entry.push((*precedence, rank.clone(), draft.clone(), origin.to_string()));
            }
        }
    }
    match (attached, reason) {
        (true, _) => Condition::new(
            "Accepted",
            true,
            "Accepted",
            format!("attached to Gateway {}", gateway.gateway.key),
        ),
        (false, Some((reason, message))) => Condition::new("Accepted", false, reason, message),
        (false, None) => {
            let mut wanted = Vec::new();
            wanted.extend(parent.section_name.as_ref().map(|s| format!("named {s}")));
            wanted.extend(parent.port.map(|p| format!("on port {p}")));
            let message = match wanted.is_empty() {
                true => format!("Gateway {} has no listener served", gateway.gateway.key),
                false => format!(
                    "Gateway {} has no listener {}",
                    gateway.gateway.key,
                    wanted.join(" ")
                ),
            };
            Condition::new("Accepted", false, "NoMatchingParent", message)
        }
    }
}

/// The domains a route with `hostnames` gets at a listener with
/// `hostname`: the more specific of each pair that intersects.
fn domains(listener: Option<&str>, hostnames: &[String]) -> Vec<String> {
    let listener = listener.unwrap_or("*");
    if hostnames.is_empty() {
        return vec![listener.to_owned()];
    }
    let mut out = Vec::new();
    for host in hostnames {
        let domain = if host_matches(listener, host) {
            host.clone()
        } else if host_matches(host, listener) {
            listener.to_owned()
        } else {
            continue;
        };
        if !out.contains(&domain) {
            out.push(domain);
        }
    }
    out
}

fn gateway_status(compiled: &Compiled) -> ObjectStatus {
    let gateway = &compiled.gateway;
    let mut listeners = Vec::new();
    for ((listener, server), attached) in compiled
        .listeners
        .iter()
        .zip(&gateway.servers)
        .zip(&compiled.attached)
    {
        let accepted = match listener.protocol {
            Some(_) => Condition::new("Accepted", true, "Accepted", "accepted"),
            None => Condition::new(
                "Accepted",
                false,
                "UnsupportedProtocol",
                server.not_served.clone().unwrap_or_default(),
            ),
        };
        let resolved = match (
            &listener.certificate,
            &listener.invalid_kinds,
            &server.not_served,
        ) {
            (Err((reason, message)), ..) => {
                Condition::new("ResolvedRefs", false, reason, message.clone())
            }
            (_, Some(kinds), _) => {
                Condition::new("ResolvedRefs", false, "InvalidRouteKinds", kinds.clone())
            }
            (Ok(Some(_)), _, Some(message)) if listener.protocol.is_some() => Condition::new(
                "ResolvedRefs",
                false,
                "InvalidCertificateRef",
                message.clone(),
            ),
            _ => Condition::new(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "all references resolved",
            ),
        };
        let programmed = match &server.not_served {
            None => Condition::new(
                "Programmed",
                true,
                "Programmed",
                "served by every nodemesh agent",
            ),
            Some(message) => Condition::new("Programmed", false, "Invalid", message.clone()),
        };
        listeners.push(ListenerStatus {
            name: listener.name.clone(),
            attached_routes: *attached,
            supported_kinds: listener.kinds.clone(),
            conditions: vec![accepted, programmed, resolved],
        });
    }
    let served = gateway.servers.iter().any(|s| s.not_served.is_none());
    let addresses = gateway
        .servers
        .iter()
        .any(|s| s.not_served.as_deref() == Some("spec.addresses is not supported"));
    let accepted = match addresses {
        true => Condition::new(
            "Accepted",
            false,
            "UnsupportedAddress",
            "spec.addresses is not supported: the Gateway is served on every node's own addresses",
        ),
        false => Condition::new("Accepted", true, "Accepted", "accepted by nodemesh"),
    };
    let programmed = match served {
        true => Condition::new(
            "Programmed",
            true,
            "Programmed",
            "served by every nodemesh agent",
        ),
        false => Condition::new("Programmed", false, "Invalid", "no listener can be served"),
    };
    ObjectStatus {
        group: GROUP,
        kind: "Gateway",
        namespace: Some(compiled.meta.namespace.clone()),
        name: compiled.meta.name.clone(),
        status: StatusKind::Gateway {
            conditions: vec![accepted, programmed],
            listeners,
        },
    }
}
