//! What the Istio and Gateway API translations share: value parsing
//! (durations, regexes, header names, labels) and the cross-object step that
//! binds routes to Services, checks references and settles conflicts.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::{Config, ConfigError, Issues, Meta, Origin, Protocol, Service};

use super::{
    Destination, DestinationPolicy, HttpRoute, RouteAction, RoutingTable, Subset, VirtualHost,
};

/// Routing objects checked one by one, waiting for the Services to be known.
#[derive(Default)]
pub(crate) struct Drafts {
    pub virtual_services: Vec<(Origin, VirtualServiceDraft)>,
    pub destination_rules: Vec<(Origin, DestinationRuleDraft)>,
    pub http_routes: Vec<(Origin, HttpRouteDraft)>,
    pub gateways: Vec<(Origin, super::istio_gateway::GatewayDraft)>,
    pub gateway_classes: Vec<(Origin, super::gateway_api::GatewayClassDraft)>,
    pub api_gateways: Vec<(Origin, super::gateway_api::GatewayDraft)>,
    pub reference_grants: Vec<super::reference_grant::ReferenceGrantDraft>,
}

pub(crate) struct VirtualServiceDraft {
    pub(super) meta: Meta,
    /// `spec.hosts` as written.
    pub(super) hosts: Vec<String>,
    /// `spec.gateways` as written: empty means the mesh only.
    pub(super) gateways: Vec<String>,
    pub(super) routes: Vec<RouteDraft>,
    /// `spec.tls` then `spec.tcp`: served at Gateways only.
    pub(super) l4: Vec<super::ingress_l4::L4RouteDraft>,
    pub(super) warnings: Warnings,
}

pub(crate) struct DestinationRuleDraft {
    pub(super) meta: Meta,
    pub(super) host: String,
    /// `origin` is filled in once bound.
    pub(super) policy: DestinationPolicy,
    pub(super) warnings: Warnings,
}

pub(crate) struct HttpRouteDraft {
    pub(super) meta: Meta,
    /// An HTTPRoute, or a GRPCRoute compiled into the same model.
    pub(super) kind: super::grpc_route::RouteKind,
    pub(super) parents: Vec<ParentRef>,
    /// Gateway API Gateways it attaches to (see [`super::gateway_api`]).
    pub(super) gateway_parents: Vec<super::gateway_api::GatewayParent>,
    /// `spec.hostnames`, lowercase: read at Gateways only.
    pub(super) hostnames: Vec<String>,
    /// One route per rule and match, so that matches of all rules (and of
    /// all routes attached to a Service) can be ordered by precedence.
    pub(super) routes: Vec<(Precedence, RouteDraft)>,
    pub(super) warnings: Warnings,
}

/// A Service parent of an HTTPRoute (GAMMA).
pub(super) struct ParentRef {
    pub field: String,
    /// `name.namespace`.
    pub host: String,
    pub port: Option<u16>,
    pub section_name: Option<String>,
}

/// Gateway API match precedence, most specific first: path kind (Exact,
/// PathPrefix, RegularExpression), prefix length, method, header count,
/// query parameter count; then rule and match index. Route age and name
/// come from [`Meta`].
pub(super) type Precedence = (
    (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>),
    (usize, usize),
);

/// A compiled route whose destinations still name hosts as written.
pub(super) struct RouteDraft {
    pub route: HttpRoute,
    /// Path of each destination's field, in [`destinations_mut`] order.
    pub destination_fields: Vec<String>,
    /// A redirect port without a new authority: it must be a port of the
    /// Service the route is bound to.
    pub redirect_port: Option<(String, u16)>,
    /// Istio's per-match `gateways`, parallel to `route.matches` (empty:
    /// the VirtualService's own list applies); none for HTTPRoutes.
    pub match_gateways: Vec<Vec<String>>,
}

/// Where a VirtualService's rules apply: the mesh, or one Gateway.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope<'a> {
    Mesh,
    /// `namespace/name`.
    Gateway(&'a str),
}

impl VirtualServiceDraft {
    /// Whether `name` (as a VirtualService writes it: `mesh`, `name` or
    /// `namespace/name`) designates `scope`.
    fn names(&self, name: &str, scope: Scope<'_>) -> bool {
        match scope {
            Scope::Mesh => name == "mesh",
            Scope::Gateway(key) => name != "mesh" && gateway_key(name, &self.meta.namespace) == key,
        }
    }

    pub(super) fn listed(&self, list: &[String], scope: Scope<'_>) -> bool {
        if list.is_empty() {
            // No list: the object's, and no list there either: the mesh.
            return match self.gateways.is_empty() {
                true => scope == Scope::Mesh,
                false => self.listed(&self.gateways, scope),
            };
        }
        list.iter().any(|name| self.names(name, scope))
    }

    /// Whether any rule of the object applies at `scope`.
    pub(super) fn applies(&self, scope: Scope<'_>) -> bool {
        self.listed(&[], scope)
            || self
                .routes
                .iter()
                .flat_map(|r| &r.match_gateways)
                .chain(self.l4.iter().flat_map(|r| &r.match_gateways))
                .any(|list| !list.is_empty() && self.listed(list, scope))
    }

    /// Its routes as they apply at `scope`: match blocks for other places
    /// dropped, and routes left without any dropped (Istio's semantics of
    /// `gateways` at the top and in each match).
    pub(super) fn routes_at(&self, scope: Scope<'_>) -> Vec<HttpRoute> {
        let mut out = Vec::new();
        for draft in &self.routes {
            let route = &draft.route;
            if route.matches.is_empty() {
                if self.listed(&[], scope) {
                    out.push(route.clone());
                }
                continue;
            }
            let kept: Vec<_> = route
                .matches
                .iter()
                .zip(&draft.match_gateways)
                .filter(|(_, list)| self.listed(list, scope))
                .map(|(m, _)| m.clone())
                .collect();
            if kept.is_empty() {
                continue;
            }
            let mut route = route.clone();
            route.matches = kept.into();
            out.push(route);
        }
        out
    }
}

/// `namespace/name` of the Gateway a VirtualService in `namespace` names.
pub(super) fn gateway_key(name: &str, namespace: &str) -> String {
    match name.split_once('/') {
        Some(_) => name.to_owned(),
        None => format!("{namespace}/{name}"),
    }
}

/// Forwarding destinations, then mirrors.
pub(super) fn destinations_mut(route: &mut HttpRoute) -> impl Iterator<Item = &mut Destination> {
    let forward = match &mut route.action {
        RouteAction::Forward(destinations) => &mut destinations[..],
        _ => &mut [],
    };
    forward
        .iter_mut()
        .map(|w| &mut w.destination)
        .chain(route.mirrors.iter_mut().map(|m| &mut m.destination))
}

/// Settings that are valid but that nodemesh does not act on, and other
/// things worth telling: (field, message).
#[derive(Default)]
pub(super) struct Warnings(pub Vec<(String, String)>);

impl Warnings {
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push((field.into(), message.into()));
    }

    pub fn not_enforced(&mut self, field: impl Into<String>) {
        self.add(field, "accepted, not enforced");
    }
}

/// One copy of each Service and subset name that destinations share.
#[derive(Default)]
struct Names(HashSet<Arc<str>>);

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.0.insert(shared.clone());
        shared
    }
}

/// Field names of a destination, which differ between the APIs.
struct DestinationFields {
    host: &'static str,
    port: &'static str,
}

const ISTIO_FIELDS: DestinationFields = DestinationFields {
    host: "host",
    port: "port.number",
};
const GATEWAY_FIELDS: DestinationFields = DestinationFields {
    host: "name",
    port: "port",
};

/// Binds every draft to the Services it routes, reporting broken references
/// in `errors` and resolved conflicts as warnings.
pub(crate) fn compile(
    config: &Config,
    drafts: Drafts,
    errors: &mut Vec<ConfigError>,
) -> RoutingTable {
    let mut warnings = Vec::new();
    let objects = (drafts
        .virtual_services
        .iter()
        .map(|(o, d)| (o, &d.warnings)))
    .chain(
        drafts
            .destination_rules
            .iter()
            .map(|(o, d)| (o, &d.warnings)),
    )
    .chain(drafts.http_routes.iter().map(|(o, d)| (o, &d.warnings)))
    .chain(drafts.gateways.iter().map(|(o, d)| (o, &d.warnings)))
    .chain(drafts.api_gateways.iter().map(|(o, d)| (o, &d.warnings)));
    for (origin, object_warnings) in objects {
        for (field, message) in &object_warnings.0 {
            warnings.push(format!("{origin}: {field}: {message}"));
        }
    }
    let policies = bind_destination_rules(config, &drafts.destination_rules, &mut warnings);
    let mut names = Names::default();
    let mut services = drafts.virtual_services;
    let gateway_keys: Vec<String> = drafts.gateways.iter().map(|(_, g)| g.key()).collect();
    for (origin, vs) in &mut services {
        let at_gateway = gateway_keys.iter().any(|g| vs.applies(Scope::Gateway(g)));
        if !at_gateway && !vs.applies(Scope::Mesh) {
            continue;
        }
        let namespace = vs.meta.namespace.clone();
        // tls and tcp rules are served at Gateways only.
        let l4 = vs.l4.iter_mut().filter(|_| at_gateway);
        let l4 = l4.map(|r| &mut r.route);
        for route in vs.routes.iter_mut().chain(l4) {
            resolve_destinations(
                config,
                route,
                &namespace,
                &policies,
                (&ISTIO_FIELDS, &mut names),
                origin,
                errors,
            );
        }
    }
    let gateways = drafts.gateways.iter().map(|(_, g)| ("Gateway", &g.meta));
    let virtual_services = services.iter().map(|(_, vs)| ("VirtualService", &vs.meta));
    let istio_objects: Vec<_> = gateways
        .chain(virtual_services)
        .map(|(kind, meta)| super::ingress::istio_object(kind, meta))
        .collect();
    let mut reports = super::ingress::Reports {
        warnings: &mut warnings,
        findings: Vec::new(),
    };
    let mut ingress = super::ingress::bind(drafts.gateways, &services, config, &mut reports);
    let istio = super::istio_status::statuses(&istio_objects, &reports.findings);
    // Unresolved backends are reported in the routes' status, not as errors.
    let mut resolve = |draft: &mut RouteDraft, namespace: &str, origin: &Origin| {
        let fields = (&GATEWAY_FIELDS, &mut names);
        resolve_destinations(
            config,
            draft,
            namespace,
            &policies,
            fields,
            origin,
            &mut Vec::new(),
        );
    };
    let (api_gateways, gateway_api) = super::gateway_api::compile(
        drafts.gateway_classes,
        drafts.api_gateways,
        &drafts.http_routes,
        config,
        &super::reference_grant::ReferenceGrants::new(drafts.reference_grants),
        &mut resolve,
        &mut warnings,
    );
    ingress.gateways.extend(api_gateways);
    let mut hosts = bind_virtual_services(config, &services, errors, &mut warnings);
    bind_http_routes(
        config,
        drafts.http_routes,
        &policies,
        &mut names,
        &mut hosts,
        errors,
        &mut warnings,
    );
    let mut table = RoutingTable::new(
        hosts.into_iter().collect(),
        policies.into_iter().collect(),
        warnings,
    );
    table.ingress = ingress;
    table.gateway_api = gateway_api;
    table.istio = istio;
    table
}

/// The Services an Istio host names: `(wildcard, services)`. Short names are
/// relative to the object's namespace.
fn services_for_host<'c>(
    config: &'c Config,
    host: &str,
    namespace: &str,
) -> (bool, Vec<&'c Service>) {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let suffix = match host.as_str() {
        "*" => Some(String::new()),
        _ => host.strip_prefix('*').map(str::to_owned),
    };
    let Some(suffix) = suffix else {
        return (
            false,
            config
                .resolve_service_name(&host, namespace)
                .into_iter()
                .collect(),
        );
    };
    let domain = config.cluster_domain();
    let services = config
        .services()
        .iter()
        .filter(|s| format!("{}.{}.svc.{domain}", s.name, s.namespace).ends_with(&suffix));
    (true, services.collect())
}

/// `name.namespace`, as destinations are written and errors name them.
fn short_name(service: &Service) -> String {
    format!("{}.{}", service.name, service.namespace)
}

fn bind_destination_rules(
    config: &Config,
    rules: &[(Origin, DestinationRuleDraft)],
    warnings: &mut Vec<String>,
) -> BTreeMap<String, DestinationPolicy> {
    // Service → (specificity, rule): an exact host beats any wildcard, and a
    // longer wildcard a shorter one.
    let mut candidates = BTreeMap::<String, Vec<(usize, usize)>>::new();
    for (i, (origin, rule)) in rules.iter().enumerate() {
        let (wildcard, services) = services_for_host(config, &rule.host, &rule.meta.namespace);
        if services.is_empty() {
            warnings.push(format!(
                "{origin}: spec.host: {:?} matches no Service; the rule applies to nothing",
                rule.host
            ));
        }
        let specificity = if wildcard {
            rule.host.len()
        } else {
            usize::MAX
        };
        for service in services {
            candidates
                .entry(service.key())
                .or_default()
                .push((specificity, i));
        }
    }
    let mut policies = BTreeMap::new();
    for (service, mut candidates) in candidates {
        let best = candidates.iter().map(|c| c.0).max();
        candidates.retain(|c| Some(c.0) == best);
        candidates.sort_by(|a, b| rules[a.1].1.meta.rank().cmp(&rules[b.1].1.meta.rank()));
        let (winner_origin, winner) = &rules[candidates[0].1];
        let mut policy = winner.policy.clone();
        policy.origin = winner_origin.to_string();
        for subset in &mut policy.subsets {
            subset.origin.clone_from(&policy.origin);
        }
        for &(_, other) in &candidates[1..] {
            let (origin, other) = &rules[other];
            let (mut merged, mut ignored) = (Vec::new(), Vec::new());
            for subset in &other.policy.subsets {
                if policy.subset(&subset.name).is_some() {
                    ignored.push(subset.name.as_str());
                } else {
                    merged.push(subset.name.as_str());
                    policy.subsets.push(Subset {
                        origin: origin.to_string(),
                        ..subset.clone()
                    });
                }
            }
            let mut message = format!(
                "Service {service}: {origin} also applies; {winner_origin} is older and wins, \
                 subsets [{}] are merged from the other",
                merged.join(", ")
            );
            if !ignored.is_empty() {
                message += &format!(
                    ", subsets [{}] are already defined and ignored",
                    ignored.join(", ")
                );
            }
            warnings.push(message);
        }
        policies.insert(service, policy);
    }
    policies
}

/// Resolves the destinations of `draft` to Services, checking subsets and
/// ports.
fn resolve_destinations(
    config: &Config,
    draft: &mut RouteDraft,
    namespace: &str,
    policies: &BTreeMap<String, DestinationPolicy>,
    (fields_named, names): (&DestinationFields, &mut Names),
    origin: &Origin,
    errors: &mut Vec<ConfigError>,
) {
    let fields = &draft.destination_fields;
    for (destination, field) in destinations_mut(&mut draft.route).zip(fields) {
        let Some(service) = config.resolve_service_name(&destination.service, namespace) else {
            let message = format!("{:?} is not a Service", destination.service);
            errors.push(origin.error(Some(format!("{field}.{}", fields_named.host)), message));
            continue;
        };
        let key = service.key();
        if let Some(subset) = &destination.subset {
            if policies.get(&key).and_then(|p| p.subset(subset)).is_none() {
                let message = format!(
                    "subset {subset} is not defined by any DestinationRule for {}",
                    short_name(service)
                );
                errors.push(origin.error(Some(format!("{field}.subset")), message));
            }
        }
        if let Some(port) = destination.port {
            if service.port(port, Protocol::Tcp).is_none() {
                let message = format!("{port} is not a TCP port of Service {key}");
                errors.push(origin.error(Some(format!("{field}.{}", fields_named.port)), message));
            }
        }
        destination.service = names.get(&key);
        if let Some(subset) = &mut destination.subset {
            *subset = names.get(subset);
        }
    }
}

/// Binds the VirtualServices that apply to the mesh to the Services their
/// hosts name (their destinations already resolved).
fn bind_virtual_services(
    config: &Config,
    services: &[(Origin, VirtualServiceDraft)],
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, VirtualHost> {
    // Service → (wildcard, virtual service).
    let mut candidates = BTreeMap::<String, Vec<(bool, usize)>>::new();
    for (i, (origin, vs)) in services.iter().enumerate() {
        if !vs.applies(Scope::Mesh) {
            continue;
        }
        for (h, host) in vs.hosts.iter().enumerate() {
            let (wildcard, bound) = services_for_host(config, host, &vs.meta.namespace);
            if bound.is_empty() {
                let message = format!(
                    "{origin}: spec.hosts[{h}]: {host:?} matches no Service; nothing is routed by it"
                );
                warnings.push(message);
            }
            for service in bound {
                if !wildcard {
                    check_redirect_ports(service, &vs.routes, origin, errors);
                }
                let entry = candidates.entry(service.key()).or_default();
                match entry.iter_mut().find(|(_, j)| *j == i) {
                    Some(existing) => existing.0 &= wildcard,
                    None => entry.push((wildcard, i)),
                }
            }
        }
    }
    let mut hosts = BTreeMap::new();
    for (service, mut candidates) in candidates {
        candidates.sort_by(|a, b| {
            let rank = |(wildcard, i): (bool, usize)| (wildcard, services[i].1.meta.rank());
            rank(*a).cmp(&rank(*b))
        });
        let (wildcard, winner) = candidates[0];
        let winner_origin = &services[winner].0;
        // A wildcard losing to an exact host is the intended way to override it.
        for &(_, other) in candidates[1..].iter().filter(|(w, _)| *w == wildcard) {
            warnings.push(format!(
                "Service {service}: {} also binds it and is ignored for it; {winner_origin} is older \
                 and wins (Istio applies one VirtualService per host)",
                services[other].0
            ));
        }
        let routes = services[winner].1.routes_at(Scope::Mesh);
        let host = VirtualHost::new(winner_origin.to_string(), routes);
        hosts.insert(service, host);
    }
    hosts
}

fn check_redirect_ports(
    service: &Service,
    routes: &[RouteDraft],
    origin: &Origin,
    errors: &mut Vec<ConfigError>,
) {
    for (field, port) in routes.iter().filter_map(|r| r.redirect_port.as_ref()) {
        if service.port(*port, Protocol::Tcp).is_none() {
            let message = format!("{port} is not a TCP port of Service {}", service.key());
            errors.push(origin.error(Some(field.clone()), message));
        }
    }
}

fn bind_http_routes(
    config: &Config,
    mut routes: Vec<(Origin, HttpRouteDraft)>,
    policies: &BTreeMap<String, DestinationPolicy>,
    names: &mut Names,
    hosts: &mut BTreeMap<String, VirtualHost>,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) {
    // Service → (route, the ports it is attached to; `None`: all).
    let mut attached = BTreeMap::<String, Vec<(usize, Option<BTreeSet<u16>>)>>::new();
    for (i, (origin, route)) in routes.iter_mut().enumerate() {
        // Routes for Gateways only may name anything; they are not applied.
        let drafts = if route.parents.is_empty() {
            &mut [][..]
        } else {
            &mut route.routes[..]
        };
        for (_, draft) in drafts {
            let namespace = &route.meta.namespace;
            resolve_destinations(
                config,
                draft,
                namespace,
                policies,
                (&GATEWAY_FIELDS, names),
                origin,
                errors,
            );
        }
        let mut ports_by_service = BTreeMap::<String, Option<BTreeSet<u16>>>::new();
        for parent in &route.parents {
            let Some(service) = config.resolve_service_name(&parent.host, "") else {
                warnings.push(format!(
                    "{origin}: {}: parent Service {} does not exist; the route is not attached to it",
                    parent.field, parent.host
                ));
                continue;
            };
            let port = match (parent.port, &parent.section_name) {
                (Some(port), _) if service.port(port, Protocol::Tcp).is_none() => {
                    let message = format!("{port} is not a TCP port of Service {}", service.key());
                    errors.push(origin.error(Some(format!("{}.port", parent.field)), message));
                    continue;
                }
                (Some(port), _) => Some(port),
                (None, Some(section)) => {
                    let named = service.ports.iter().find(|p| {
                        p.protocol == Protocol::Tcp && p.name.as_deref() == Some(section.as_str())
                    });
                    let Some(named) = named else {
                        let message =
                            format!("Service {} has no port named {section:?}", service.key());
                        errors.push(
                            origin.error(Some(format!("{}.sectionName", parent.field)), message),
                        );
                        continue;
                    };
                    Some(named.port)
                }
                (None, None) => None,
            };
            let ports = ports_by_service
                .entry(service.key())
                .or_insert_with(|| Some(BTreeSet::new()));
            match (ports.as_mut(), port) {
                (Some(ports), Some(port)) => {
                    ports.insert(port);
                }
                (_, None) => *ports = None,
                (None, Some(_)) => {}
            }
        }
        for (service, ports) in ports_by_service {
            attached.entry(service).or_default().push((i, ports));
        }
    }

    for (service, attached) in attached {
        let attached =
            super::grpc_route::one_kind_per_service(&service, attached, &routes, warnings);
        if let Some(host) = hosts.get(&service) {
            for (i, _) in attached {
                warnings.push(format!(
                    "Service {service}: {} is ignored for it; {} routes it and a VirtualService \
                     wins over an HTTPRoute",
                    routes[i].0, host.origin
                ));
            }
            continue;
        }
        let mut ordered: Vec<_> = attached
            .iter()
            .flat_map(|(i, ports)| {
                let route = &routes[*i].1;
                route
                    .routes
                    .iter()
                    .map(move |(precedence, draft)| (precedence, &route.meta, draft, ports))
            })
            .collect();
        ordered.sort_by(|(a, a_meta, ..), (b, b_meta, ..)| {
            (a.0, a_meta.rank(), a.1).cmp(&(b.0, b_meta.rank(), b.1))
        });
        let routes_for_service = ordered.into_iter().map(|(_, _, draft, ports)| {
            let mut route = draft.route.clone();
            if let Some(ports) = ports {
                route.matches = route
                    .matches
                    .iter()
                    .flat_map(|m| {
                        ports.iter().map(|&port| super::RequestMatch {
                            port: Some(port),
                            ..m.clone()
                        })
                    })
                    .collect();
            }
            route
        });
        let origins: Vec<_> = attached
            .iter()
            .map(|(i, _)| routes[*i].0.to_string())
            .collect();
        let host = VirtualHost::new(origins.join(", "), routes_for_service.collect());
        hosts.insert(service, host);
    }
}

/// Go's duration syntax (`7s`, `0.5s`, `500ms`, `1m30s`), which both Istio
/// and the Gateway API use.
pub(super) fn duration(
    text: &str,
    field: impl Into<String>,
    issues: &mut Issues,
) -> Option<Duration> {
    let parsed = parse_duration(text);
    if parsed.is_none() {
        issues.add(
            field,
            format!(
                "invalid duration {text:?}: expected a number with a unit (h, m, s, ms, us, ns), \
                 e.g. \"7s\", \"0.5s\", \"500ms\" or \"1m30s\""
            ),
        );
    }
    parsed
}

fn parse_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return None;
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        // Digits beyond nanosecond precision of the largest unit do not matter.
        let fraction = &fraction[..fraction.len().min(13)];
        let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
        let fraction: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().ok()?
        };
        nanos = nanos.checked_add(
            whole
                .checked_mul(unit)?
                .checked_add(fraction * unit / scale)?,
        )?;
        rest = tail;
    }
    Some(Duration::from_nanos(u64::try_from(nanos).ok()?))
}

/// Compiles `source` to match whole values only, as Envoy's RE2 matchers do.
pub(super) fn full_match_regex(
    source: &str,
    field: String,
    issues: &mut Issues,
) -> Option<Arc<regex::Regex>> {
    regex(&format!("^(?:{source})$"), field, issues)
}

thread_local! {
    /// Regexes compiled by this thread's loads and still held by a table,
    /// by source. A compiled regex costs kilobytes, and then a cache per
    /// thread that runs it: routes written with the same pattern (often
    /// thousands in a generated config) share one, across reloads too.
    static COMPILED: RefCell<HashMap<Box<str>, Weak<regex::Regex>>> = RefCell::default();
}

/// Compiles `source` as written, with a size limit: configuration must not
/// be able to make the proxy build huge automata.
pub(super) fn regex(source: &str, field: String, issues: &mut Issues) -> Option<Arc<regex::Regex>> {
    COMPILED.with_borrow_mut(|compiled| {
        if let Some(shared) = compiled.get(source).and_then(Weak::upgrade) {
            return Some(shared);
        }
        let built = regex::RegexBuilder::new(source)
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build();
        let built = Arc::new(
            built
                .map_err(|e| issues.add(field, format!("invalid regex: {e}")))
                .ok()?,
        );
        // Forget the regexes no table holds any more once they could be
        // half of the entries, so that the map stays proportional to what
        // is in use.
        if compiled.len() >= 64 && compiled.len().is_power_of_two() {
            compiled.retain(|_, regex| regex.strong_count() > 0);
        }
        compiled.insert(source.into(), Arc::downgrade(&built));
        Some(built)
    })
}

/// Lowercased; `None` (and an issue) unless a valid HTTP header name.
pub(super) fn header_name(name: &str, field: String, issues: &mut Issues) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    match http::HeaderName::from_bytes(lower.as_bytes()) {
        Ok(_) => Some(lower),
        Err(_) => {
            issues.add(field, format!("invalid header name {name:?}"));
            None
        }
    }
}

pub(super) fn header_value(value: &str, field: String, issues: &mut Issues) -> bool {
    let valid = http::HeaderValue::from_str(value).is_ok();
    if !valid {
        issues.add(field, format!("invalid header value {value:?}"));
    }
    valid
}

/// A count that Istio and the Gateway API declare as a signed 32-bit integer.
pub(super) fn count(n: i64, field: String, issues: &mut Issues) -> Option<u32> {
    let count = u32::try_from(n).ok().filter(|&n| i32::try_from(n).is_ok());
    if count.is_none() {
        issues.add(field, "must be between 0 and 2147483647");
    }
    count
}

/// A percentage, 0 to 100.
pub(super) fn percent(value: f64, field: String, issues: &mut Issues) -> f64 {
    if !(0.0..=100.0).contains(&value) {
        issues.add(field, "must be between 0 and 100");
    }
    value
}

/// An Istio host: a DNS name, `*`, or `*.` followed by a DNS name.
pub(super) fn check_host(host: &str, field: String, issues: &mut Issues) {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid = host == "*"
        || (!name.is_empty()
            && name.len() <= 253
            && name.trim_end_matches('.').split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if !valid {
        issues.add(
            field,
            format!("invalid host {host:?}: expected a DNS name, * or *.domain"),
        );
    }
}

/// Group ranks for [`Precedence`]: Exact before PathPrefix before regex.
pub(super) fn path_rank(m: Option<&super::StringMatch>) -> (u8, Reverse<usize>) {
    match m {
        Some(super::StringMatch::Exact(_)) => (0, Reverse(0)),
        Some(super::StringMatch::PathPrefix(p) | super::StringMatch::Prefix(p)) => {
            (1, Reverse(p.len()))
        }
        _ => (2, Reverse(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("7s"), Duration::from_secs(7));
        assert_eq!(ok("0.5s"), Duration::from_millis(500));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("10us"), Duration::from_micros(10));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok(".25s"), Duration::from_millis(250));
        for bad in [
            "",
            "7",
            "7 s",
            "-1s",
            "1d",
            "s",
            "1.2.3s",
            ".s",
            "1s2",
            "99999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
