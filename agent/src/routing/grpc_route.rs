//! Gateway API `GRPCRoute` (`gateway.networking.k8s.io/v1`, `v1alpha2`):
//! its schema, read strictly, compiled into the HTTPRoute model. A gRPC
//! call is an HTTP/2 POST to `/<service>/<method>`, so a method match is a
//! path match and everything after that (attachment to Gateways and
//! Services, hostnames, backends, filters, status) is HTTPRoute's.
//!
//! The Gateway API forbids merging the two kinds: on one listener, an
//! HTTPRoute and a GRPCRoute whose hostnames intersect are not both
//! accepted, the older (then the first by namespace/name) wins
//! ([`conflict`]); on a Service, the same holds for routes of the two kinds
//! on the same port ([`one_kind_per_service`]).

use std::cmp::Reverse;
use std::collections::BTreeSet;

use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::config::{check_metadata, Issues, Meta, Object, Origin};

use super::compile::{full_match_regex, HttpRouteDraft, Precedence, RouteDraft, Warnings};
use super::gateway::{
    backend_refs, forward, header_matches, route_draft, rule_filters, BackendRefSpec, FilterSpec,
    FilterType, ParentRefSpec, ValueMatchSpec,
};
use super::ingress::host_matches;
use super::{HttpRoute, RequestMatch, StringMatch};

/// The two route kinds compiled into [`HttpRouteDraft`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GrpcRouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRefSpec>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleSpec {
    name: Option<String>,
    matches: Option<Vec<MatchSpec>>,
    #[serde(default)]
    filters: Vec<FilterSpec>,
    #[serde(default)]
    backend_refs: Vec<BackendRefSpec>,
    session_persistence: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchSpec {
    method: Option<MethodMatchSpec>,
    #[serde(default)]
    headers: Vec<ValueMatchSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodMatchSpec {
    #[serde(rename = "type")]
    kind: Option<MethodMatchType>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
enum MethodMatchType {
    Exact,
    RegularExpression,
}

pub(crate) fn grpc_route(doc: Object<GrpcRouteSpec>, issues: &mut Issues) -> HttpRouteDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    let parts = (spec.parent_refs, spec.hostnames, spec.rules);
    route_draft(
        Meta::new(&doc.metadata),
        RouteKind::Grpc,
        parts,
        rule,
        issues,
    )
}

/// The filters the GRPCRoute spec defines (others are HTTPRoute's).
fn refused(kind: FilterType) -> Option<&'static str> {
    match kind {
        FilterType::RequestHeaderModifier
        | FilterType::ResponseHeaderModifier
        | FilterType::RequestMirror => None,
        _ => Some(
            "not supported on a GRPCRoute: only RequestHeaderModifier, ResponseHeaderModifier \
             and RequestMirror",
        ),
    }
}

fn rule(
    r: RuleSpec,
    i: usize,
    namespace: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Vec<(Precedence, RouteDraft)> {
    let at = format!("spec.rules[{i}]");
    let mut filters = rule_filters(r.filters, &at, namespace, refused, warnings, issues);
    let (backends, mut destination_fields) =
        backend_refs(r.backend_refs, &at, namespace, warnings, issues);
    destination_fields.append(&mut filters.mirror_fields);
    if r.session_persistence.is_some() {
        warnings.not_enforced(format!("{at}.sessionPersistence"));
    }
    let route = HttpRoute {
        name: r.name.unwrap_or_else(|| format!("rules[{i}]")).into(),
        matches: Box::default(),
        action: forward(backends, &at, issues),
        timeout: None,
        retries: None,
        fault: None,
        mirrors: filters.mirrors.into(),
        headers: filters.headers.boxed(),
        rewrite: None,
    };
    // Absent matches match every call.
    let matches = r.matches.filter(|m| !m.is_empty()).unwrap_or_else(|| {
        vec![MatchSpec {
            method: None,
            headers: Vec::new(),
        }]
    });
    let mut out = Vec::new();
    for (j, m) in matches.into_iter().enumerate() {
        let field = format!("{at}.matches[{j}]");
        let Some((m, service, method)) = request_match(m, &field, issues) else {
            continue;
        };
        out.push((
            precedence(service, method, m.headers.len(), (i, j)),
            RouteDraft {
                route: HttpRoute {
                    matches: Box::new([m]),
                    ..route.clone()
                },
                destination_fields: destination_fields.clone(),
                redirect_port: None,
                match_gateways: Vec::new(),
            },
        ));
    }
    out
}

/// GRPCRoute precedence in HTTPRoute's [`Precedence`] slots: the most
/// characters of service, then of method, then the most header matches
/// (the hostname is settled before, by the per-domain tables). The two
/// kinds never share a table, so their orders never meet.
fn precedence(service: usize, method: usize, headers: usize, at: (usize, usize)) -> Precedence {
    (
        (
            0,
            Reverse(service),
            false,
            Reverse(method),
            Reverse(headers),
        ),
        at,
    )
}

/// The match, and the characters of its service and method (for
/// precedence).
fn request_match(
    m: MatchSpec,
    at: &str,
    issues: &mut Issues,
) -> Option<(RequestMatch, usize, usize)> {
    let (uri, service, method) = match m.method {
        None => (StringMatch::PathPrefix("/".into()), 0, 0),
        Some(spec) => method_match(spec, &format!("{at}.method"), issues)?,
    };
    let headers = header_matches(m.headers, at, issues);
    let request = RequestMatch {
        uri: Some(uri),
        headers,
        ..RequestMatch::default()
    };
    Some((request, service, method))
}

/// `/<service>/<method>` as a path match.
fn method_match(
    spec: MethodMatchSpec,
    at: &str,
    issues: &mut Issues,
) -> Option<(StringMatch, usize, usize)> {
    let service = spec.service.filter(|s| !s.is_empty());
    let method = spec.method.filter(|m| !m.is_empty());
    let lengths = (
        service.as_deref().map_or(0, str::len),
        method.as_deref().map_or(0, str::len),
    );
    let uri = match spec.kind.unwrap_or(MethodMatchType::Exact) {
        MethodMatchType::Exact => {
            if service.is_none() && method.is_none() {
                issues.add(at, "one or both of service and method must be set");
                return None;
            }
            let mut valid = true;
            if let Some(s) = &service {
                valid &= name(s, true, &format!("{at}.service"), issues);
            }
            if let Some(m) = &method {
                valid &= name(m, false, &format!("{at}.method"), issues);
            }
            if !valid {
                return None;
            }
            match (service, method) {
                (Some(s), Some(m)) => StringMatch::Exact(format!("/{s}/{m}").into()),
                (Some(s), None) => StringMatch::PathPrefix(format!("/{s}").into()),
                (None, m) => {
                    let m = regex::escape(m.as_deref().unwrap_or_default());
                    StringMatch::Regex(full_match_regex(&format!("/[^/]+/{m}"), at.into(), issues)?)
                }
            }
        }
        MethodMatchType::RegularExpression => {
            // Each part on its own first, so an error names its field.
            let part = |value: &Option<String>, field: &str, issues: &mut Issues| match value {
                None => Some("[^/]+".to_owned()),
                Some(v) => {
                    full_match_regex(v, format!("{at}.{field}"), issues).map(|_| format!("(?:{v})"))
                }
            };
            let s = part(&service, "service", issues);
            let m = part(&method, "method", issues);
            let source = format!("/{}/{}", s?, m?);
            StringMatch::Regex(full_match_regex(&source, at.into(), issues)?)
        }
    };
    Some((uri, lengths.0, lengths.1))
}

/// The Gateway API's syntax of an exact service (`pkg.Service`, dotted
/// identifiers) or method (one identifier) name.
fn name(value: &str, dotted: bool, field: &str, issues: &mut Issues) -> bool {
    let identifier = |part: &str| {
        part.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let valid = match dotted {
        true => value
            .strip_prefix('.')
            .unwrap_or(value)
            .split('.')
            .all(identifier),
        false => identifier(value),
    };
    if !valid {
        let what = match dotted {
            true => "a service name (dotted identifiers, e.g. helloworld.Greeter)",
            false => "a method name (an identifier, e.g. SayHello)",
        };
        issues.add(field, format!("{value:?} is not {what}"));
    }
    valid
}

/// A route attached to one listener of a Gateway: its kind, object and
/// domains there.
pub(super) struct Bound {
    pub kind: RouteKind,
    pub object: String,
    pub domains: Vec<String>,
}

/// The route of the other kind already on the listener (routes are
/// attached oldest first) whose domains intersect `domains`, if any: then
/// the route is not accepted there.
pub(super) fn conflict<'a>(
    bound: &'a [Bound],
    kind: RouteKind,
    domains: &[String],
) -> Option<&'a Bound> {
    bound.iter().find(|b| {
        b.kind != kind
            && b.domains.iter().any(|d| {
                domains
                    .iter()
                    .any(|o| host_matches(d, o) || host_matches(o, d))
            })
    })
}

/// The routes attached to `service` (index in `routes`, ports; `None`:
/// all) without those that a route of the other kind, older, already takes
/// on a shared port; each dropped one is reported.
pub(super) fn one_kind_per_service(
    service: &str,
    attached: Vec<(usize, Option<BTreeSet<u16>>)>,
    routes: &[(Origin, HttpRouteDraft)],
    warnings: &mut Vec<String>,
) -> Vec<(usize, Option<BTreeSet<u16>>)> {
    let mut by_age: Vec<_> = attached.iter().collect();
    by_age.sort_by(|(a, _), (b, _)| routes[*a].1.meta.rank().cmp(&routes[*b].1.meta.rank()));
    let overlap = |a: &Option<BTreeSet<u16>>, b: &Option<BTreeSet<u16>>| match (a, b) {
        (Some(a), Some(b)) => !a.is_disjoint(b),
        _ => true,
    };
    let mut kept: Vec<&(usize, Option<BTreeSet<u16>>)> = Vec::new();
    let mut dropped = Vec::new();
    for entry in by_age {
        let (i, ports) = entry;
        let older = kept
            .iter()
            .find(|(k, other)| routes[*k].1.kind != routes[*i].1.kind && overlap(ports, other));
        match older {
            Some((k, _)) => {
                warnings.push(format!(
                    "Service {service}: {} is ignored for it; {} is older, and an HTTPRoute and \
                     a GRPCRoute are not merged on one port",
                    routes[*i].0, routes[*k].0
                ));
                dropped.push(*i);
            }
            None => kept.push(entry),
        }
    }
    attached
        .into_iter()
        .filter(|(i, _)| !dropped.contains(i))
        .collect()
}
