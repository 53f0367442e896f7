//! Gateway API `HTTPRoute` attached to Services (the GAMMA mesh pattern):
//! its schema, read strictly, and its translation into the routing model.
//! Every rule is split into one route per match so that matches can be
//! ordered by Gateway API precedence across rules and routes.

use std::cmp::Reverse;

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::config::{check_dns_label, check_metadata, port_number, Issues, Meta, Object};

use super::compile::{
    check_host, count, duration, full_match_regex, header_name, header_value, path_rank, percent,
    HttpRouteDraft, ParentRef, Precedence, RouteDraft, Warnings,
};
use super::gateway_api;
use super::grpc_route::RouteKind;
use super::{
    Destination, HeaderEdits, HeaderOps, HttpRoute, Mirror, PathRewrite, Redirect, RequestMatch,
    RetryPolicy, Rewrite, RouteAction, StringMatch, WeightedDestination,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct HttpRouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRefSpec>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ParentRefSpec {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    section_name: Option<String>,
    port: Option<i64>,
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
    timeouts: Option<TimeoutsSpec>,
    retry: Option<RetrySpec>,
    session_persistence: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MatchSpec {
    path: Option<PathMatchSpec>,
    #[serde(default)]
    headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    query_params: Vec<ValueMatchSpec>,
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathMatchSpec {
    #[serde(rename = "type")]
    kind: Option<PathMatchType>,
    value: Option<String>,
}

#[derive(Deserialize)]
enum PathMatchType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ValueMatchSpec {
    #[serde(rename = "type")]
    kind: Option<ValueMatchType>,
    name: String,
    value: String,
}

#[derive(Deserialize)]
pub(super) enum ValueMatchType {
    Exact,
    RegularExpression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FilterSpec {
    #[serde(rename = "type")]
    pub(super) kind: FilterType,
    request_header_modifier: Option<HeaderModifierSpec>,
    response_header_modifier: Option<HeaderModifierSpec>,
    request_mirror: Option<MirrorSpec>,
    request_redirect: Option<RedirectSpec>,
    url_rewrite: Option<UrlRewriteSpec>,
    extension_ref: Option<IgnoredAny>,
    cors: Option<IgnoredAny>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
pub(super) enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestMirror,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    ExtensionRef,
    #[serde(rename = "CORS")]
    Cors,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderModifierSpec {
    #[serde(default)]
    set: Vec<HeaderSpec>,
    #[serde(default)]
    add: Vec<HeaderSpec>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorSpec {
    backend_ref: BackendObjectRef,
    percent: Option<i64>,
    fraction: Option<FractionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FractionSpec {
    numerator: i64,
    denominator: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendObjectRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectSpec {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
    port: Option<i64>,
    status_code: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathModifierSpec {
    #[serde(rename = "type")]
    kind: PathModifierType,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlRewriteSpec {
    hostname: Option<String>,
    path: Option<PathModifierSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackendRefSpec {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
    #[serde(default)]
    filters: Vec<FilterSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TimeoutsSpec {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetrySpec {
    attempts: Option<i64>,
    #[serde(default)]
    codes: Vec<i64>,
    backoff: Option<String>,
}

pub(crate) fn http_route(doc: Object<HttpRouteSpec>, issues: &mut Issues) -> HttpRouteDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    let parts = (spec.parent_refs, spec.hostnames, spec.rules);
    route_draft(
        Meta::new(&doc.metadata),
        RouteKind::Http,
        parts,
        rule,
        issues,
    )
}

/// Compiles one rule (its index, the route's namespace) into a route per
/// match.
pub(super) type RuleFn<R> =
    fn(R, usize, &str, &mut Warnings, &mut Issues) -> Vec<(Precedence, RouteDraft)>;

/// An HTTPRoute or a GRPCRoute from its `parentRefs`, `hostnames` and
/// rules.
pub(super) fn route_draft<R>(
    meta: Meta,
    kind: RouteKind,
    (parent_refs, hostnames, rules): (Vec<ParentRefSpec>, Vec<String>, Vec<R>),
    rule: RuleFn<R>,
    issues: &mut Issues,
) -> HttpRouteDraft {
    let namespace = meta.namespace.clone();
    let mut warnings = Warnings::default();
    let attachment = attachment(parent_refs, &hostnames, &namespace, &mut warnings, issues);
    let mut routes = Vec::new();
    for (i, r) in rules.into_iter().enumerate() {
        routes.extend(rule(r, i, &namespace, &mut warnings, issues));
    }
    HttpRouteDraft {
        meta,
        kind,
        parents: attachment.parents,
        gateway_parents: attachment.gateway_parents,
        hostnames: attachment.hostnames,
        routes,
        warnings,
    }
}

/// Where a route attaches: its `parentRefs` and `hostnames`, checked.
struct Attachment {
    parents: Vec<ParentRef>,
    gateway_parents: Vec<gateway_api::GatewayParent>,
    hostnames: Vec<String>,
}

/// Reads `parentRefs` (Services and Gateways) and `hostnames`.
fn attachment(
    parent_refs: Vec<ParentRefSpec>,
    hostnames: &[String],
    namespace: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Attachment {
    if parent_refs.is_empty() {
        warnings.add("spec.parentRefs", "no parent: the route applies to nothing");
    }
    let mut parents = Vec::new();
    let mut gateway_parents = Vec::new();
    for (i, p) in parent_refs.into_iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        let group = p.group.as_deref().unwrap_or(gateway_api::GROUP);
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        let parent_namespace = p.namespace.as_deref().unwrap_or(namespace);
        if gateway_api::is_gateway(group, kind) {
            check_dns_label(&p.name, &format!("{field}.name"), issues);
            gateway_parents.push(gateway_api::GatewayParent {
                namespace: parent_namespace.to_owned(),
                name: p.name,
                section_name: p.section_name,
                port: p
                    .port
                    .and_then(|n| port_number(n, format!("{field}.port"), issues)),
                field,
            });
            continue;
        }
        if kind != "Service" || !matches!(group, "" | "core") {
            warnings.add(
                &field,
                format!(
                    "parent {kind} {} is neither a Service nor a Gateway; this parent is ignored",
                    p.name
                ),
            );
            continue;
        }
        check_dns_label(&p.name, &format!("{field}.name"), issues);
        parents.push(ParentRef {
            host: format!("{}.{parent_namespace}", p.name),
            port: p
                .port
                .and_then(|n| port_number(n, format!("{field}.port"), issues)),
            section_name: p.section_name,
            field,
        });
    }
    for (i, host) in hostnames.iter().enumerate() {
        check_host(host, format!("spec.hostnames[{i}]"), issues);
    }
    if !parents.is_empty() && !hostnames.is_empty() {
        warnings.add(
            "spec.hostnames",
            "ignored for Service parents: a route attached to a Service applies to all its \
             traffic",
        );
    }
    Attachment {
        parents,
        gateway_parents,
        hostnames: hostnames
            .iter()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .collect(),
    }
}

/// What a rule's filters configure.
#[derive(Default)]
pub(super) struct Filters {
    pub(super) headers: HeaderOps,
    redirect: Option<Redirect>,
    rewrite: Option<Rewrite>,
    pub(super) mirrors: Vec<Mirror>,
    pub(super) mirror_fields: Vec<String>,
    /// Where a ReplacePrefixMatch was used: it needs a PathPrefix match.
    replace_prefix: Option<String>,
}

/// A rule's `filters`; a type `refused` names (with why) is reported on
/// its field and skipped.
pub(super) fn rule_filters(
    specs: Vec<FilterSpec>,
    at: &str,
    namespace: &str,
    refused: fn(FilterType) -> Option<&'static str>,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Filters {
    let mut filters = Filters::default();
    let mut seen = Vec::new();
    for (k, f) in specs.into_iter().enumerate() {
        let field = format!("{at}.filters[{k}]");
        if let Some(why) = refused(f.kind) {
            issues.add(format!("{field}.type"), why);
            continue;
        }
        if !matches!(f.kind, FilterType::RequestMirror) && seen.contains(&f.kind) {
            issues.add(&field, "this filter type may be used only once per rule");
        }
        seen.push(f.kind);
        filter(f, &field, namespace, &mut filters, warnings, issues);
    }
    filters
}

fn rule(
    r: RuleSpec,
    i: usize,
    namespace: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Vec<(Precedence, RouteDraft)> {
    let at = format!("spec.rules[{i}]");
    let mut filters = rule_filters(r.filters, &at, namespace, |_| None, warnings, issues);
    if filters.redirect.is_some() && filters.rewrite.is_some() {
        issues.add(
            format!("{at}.filters"),
            "RequestRedirect and URLRewrite cannot be used together",
        );
    }
    if filters.redirect.is_some() && !r.backend_refs.is_empty() {
        issues.add(
            format!("{at}.backendRefs"),
            "must be empty when a RequestRedirect filter is set",
        );
    }

    let (backends, mut destination_fields) =
        backend_refs(r.backend_refs, &at, namespace, warnings, issues);
    destination_fields.append(&mut filters.mirror_fields);

    let action = match filters.redirect.take() {
        Some(redirect) => RouteAction::Redirect(Box::new(redirect)),
        None => forward(backends, &at, issues),
    };

    let (timeout, retries) = timeouts_and_retry(r.timeouts, r.retry, &at, warnings, issues);
    if r.session_persistence.is_some() {
        warnings.not_enforced(format!("{at}.sessionPersistence"));
    }
    let route = HttpRoute {
        name: r.name.unwrap_or_else(|| format!("rules[{i}]")).into(),
        matches: Box::default(),
        action,
        timeout,
        retries: retries.map(Box::new),
        fault: None,
        mirrors: filters.mirrors.into(),
        headers: filters.headers.boxed(),
        rewrite: filters.rewrite.map(Box::new),
    };

    // Absent matches mean one PathPrefix "/" match.
    let matches = r.matches.filter(|m| !m.is_empty()).unwrap_or_else(|| {
        vec![MatchSpec {
            path: None,
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }]
    });
    let mut out = Vec::new();
    for (j, m) in matches.into_iter().enumerate() {
        let field = format!("{at}.matches[{j}]");
        let Some(m) = request_match(m, &field, issues) else {
            continue;
        };
        if let Some(replace) = &filters.replace_prefix {
            if !matches!(m.uri, Some(StringMatch::PathPrefix(_))) {
                issues.add(
                    replace,
                    format!("ReplacePrefixMatch needs a PathPrefix match, {field} is not one"),
                );
            }
        }
        let (kind, length) = path_rank(m.uri.as_ref());
        let precedence = (
            (
                kind,
                length,
                m.method.is_none(),
                Reverse(m.headers.len()),
                Reverse(m.query_params.len()),
            ),
            (i, j),
        );
        let route = HttpRoute {
            matches: Box::new([m]),
            ..route.clone()
        };
        out.push((
            precedence,
            RouteDraft {
                route,
                destination_fields: destination_fields.clone(),
                redirect_port: None,
                match_gateways: Vec::new(),
            },
        ));
    }
    out
}

/// A rule's `backendRefs` with their own filters, and each one's field.
pub(super) fn backend_refs(
    refs: Vec<BackendRefSpec>,
    at: &str,
    namespace: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> (Vec<WeightedDestination>, Vec<String>) {
    let mut destination_fields = Vec::new();
    let mut backends = Vec::new();
    for (k, b) in refs.into_iter().enumerate() {
        let field = format!("{at}.backendRefs[{k}]");
        let weight = match b.weight {
            None => 1,
            Some(w @ 0..=1_000_000) => w as u32,
            Some(_) => {
                issues.add(format!("{field}.weight"), "must be between 0 and 1000000");
                1
            }
        };
        let object = BackendObjectRef {
            group: b.group,
            kind: b.kind,
            name: b.name,
            namespace: b.namespace,
            port: b.port,
        };
        let destination = backend(object, &field, namespace, issues);
        destination_fields.push(field.clone());
        let mut backend_filters = Filters::default();
        for (f, spec) in b.filters.into_iter().enumerate() {
            let field = format!("{field}.filters[{f}]");
            if !matches!(
                spec.kind,
                FilterType::RequestHeaderModifier | FilterType::ResponseHeaderModifier
            ) {
                issues.add(
                    format!("{field}.type"),
                    "only RequestHeaderModifier and ResponseHeaderModifier are supported on a \
                     backendRef",
                );
                continue;
            }
            filter(
                spec,
                &field,
                namespace,
                &mut backend_filters,
                warnings,
                issues,
            );
        }
        backends.push(WeightedDestination {
            destination,
            weight,
            headers: backend_filters.headers.boxed(),
        });
    }
    (backends, destination_fields)
}

/// Where a rule without a redirect sends requests.
pub(super) fn forward(
    backends: Vec<WeightedDestination>,
    at: &str,
    issues: &mut Issues,
) -> RouteAction {
    // The Gateway API answers 500 for a rule with nowhere to send requests.
    if backends.is_empty() {
        return RouteAction::DirectResponse {
            status: 500,
            body: Bytes::new(),
        };
    }
    if backends.iter().all(|b| b.weight == 0) {
        issues.add(
            format!("{at}.backendRefs"),
            "every weight is 0, so every request would fail with 500; remove the rule or give a \
             backend a weight",
        );
    }
    RouteAction::Forward(backends.into())
}

fn request_match(m: MatchSpec, at: &str, issues: &mut Issues) -> Option<RequestMatch> {
    let path = m.path.unwrap_or(PathMatchSpec {
        kind: None,
        value: None,
    });
    let value = path.value.unwrap_or_else(|| "/".to_owned());
    let field = format!("{at}.path.value");
    let uri = match path.kind.unwrap_or(PathMatchType::PathPrefix) {
        PathMatchType::RegularExpression => {
            full_match_regex(&value, field, issues).map(StringMatch::Regex)
        }
        _ if !value.starts_with('/') => {
            issues.add(field, "must start with /");
            None
        }
        PathMatchType::Exact => Some(StringMatch::Exact(value.into())),
        PathMatchType::PathPrefix => Some(StringMatch::PathPrefix(value.into())),
    };
    let headers = header_matches(m.headers, at, issues);
    let mut query_params: Vec<(String, StringMatch)> = Vec::new();
    for (k, q) in m.query_params.into_iter().enumerate() {
        let field = format!("{at}.queryParams[{k}]");
        if q.name.is_empty() {
            issues.add(format!("{field}.name"), "must not be empty");
        }
        if query_params.iter().any(|(n, _)| *n == q.name) {
            continue;
        }
        query_params.extend(value_match(q.kind, q.value, &field, issues).map(|v| (q.name, v)));
    }
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    if let Some(method) = &m.method {
        if !METHODS.contains(&method.as_str()) {
            issues.add(format!("{at}.method"), format!("unknown method {method:?}"));
        }
    }
    Some(RequestMatch {
        uri: Some(uri?),
        method: m.method.map(|m| StringMatch::Exact(m.into())),
        headers,
        query_params: query_params
            .into_iter()
            .map(|(n, m)| (n.into(), m))
            .collect(),
        ..RequestMatch::default()
    })
}

/// A match's `headers`, shared by HTTPRoute and GRPCRoute.
pub(super) fn header_matches(
    specs: Vec<ValueMatchSpec>,
    at: &str,
    issues: &mut Issues,
) -> Box<[(Box<str>, StringMatch)]> {
    let mut headers: Vec<(String, StringMatch)> = Vec::new();
    for (k, h) in specs.into_iter().enumerate() {
        let field = format!("{at}.headers[{k}]");
        let Some(name) = header_name(&h.name, format!("{field}.name"), issues) else {
            continue;
        };
        // The Gateway API ignores later matches of the same header.
        if headers.iter().any(|(n, _)| *n == name) {
            continue;
        }
        headers.extend(value_match(h.kind, h.value, &field, issues).map(|v| (name, v)));
    }
    headers.into_iter().map(|(n, m)| (n.into(), m)).collect()
}

fn value_match(
    kind: Option<ValueMatchType>,
    value: String,
    at: &str,
    issues: &mut Issues,
) -> Option<StringMatch> {
    match kind.unwrap_or(ValueMatchType::Exact) {
        ValueMatchType::Exact => Some(StringMatch::Exact(value.into())),
        ValueMatchType::RegularExpression => {
            full_match_regex(&value, format!("{at}.value"), issues).map(StringMatch::Regex)
        }
    }
}

fn filter(
    f: FilterSpec,
    at: &str,
    namespace: &str,
    out: &mut Filters,
    warnings: &mut Warnings,
    issues: &mut Issues,
) {
    let set = [
        (
            f.request_header_modifier.is_some(),
            FilterType::RequestHeaderModifier,
        ),
        (
            f.response_header_modifier.is_some(),
            FilterType::ResponseHeaderModifier,
        ),
        (f.request_mirror.is_some(), FilterType::RequestMirror),
        (f.request_redirect.is_some(), FilterType::RequestRedirect),
        (f.url_rewrite.is_some(), FilterType::UrlRewrite),
        (f.extension_ref.is_some(), FilterType::ExtensionRef),
        (f.cors.is_some(), FilterType::Cors),
    ];
    if set
        .iter()
        .any(|&(present, kind)| present != (kind == f.kind))
    {
        issues.add(at, "exactly the field named by type must be set");
        return;
    }
    match f.kind {
        FilterType::RequestHeaderModifier => {
            let spec = f.request_header_modifier.expect("checked above");
            out.headers.request =
                header_edits(spec, &format!("{at}.requestHeaderModifier"), issues);
        }
        FilterType::ResponseHeaderModifier => {
            let spec = f.response_header_modifier.expect("checked above");
            out.headers.response =
                header_edits(spec, &format!("{at}.responseHeaderModifier"), issues);
        }
        FilterType::RequestMirror => {
            let spec = f.request_mirror.expect("checked above");
            let at = format!("{at}.requestMirror");
            let percentage = match (spec.percent, spec.fraction) {
                (Some(_), Some(_)) => {
                    issues.add(&at, "only one of percent and fraction may be set");
                    100.0
                }
                (Some(p), None) => percent(p as f64, format!("{at}.percent"), issues),
                (None, Some(fraction)) => {
                    let denominator = fraction.denominator.unwrap_or(100);
                    if denominator <= 0 || !(0..=denominator).contains(&fraction.numerator) {
                        issues.add(
                            format!("{at}.fraction"),
                            "numerator must be between 0 and a positive denominator",
                        );
                        100.0
                    } else {
                        fraction.numerator as f64 * 100.0 / denominator as f64
                    }
                }
                (None, None) => 100.0,
            };
            let field = format!("{at}.backendRef");
            out.mirrors.push(Mirror {
                destination: backend(spec.backend_ref, &field, namespace, issues),
                percentage,
            });
            out.mirror_fields.push(field);
        }
        FilterType::RequestRedirect => {
            let spec = f.request_redirect.expect("checked above");
            let at = format!("{at}.requestRedirect");
            if let Some(scheme) = spec
                .scheme
                .as_deref()
                .filter(|s| !matches!(*s, "http" | "https"))
            {
                issues.add(
                    format!("{at}.scheme"),
                    format!("must be http or https, not {scheme:?}"),
                );
            }
            let status = match spec.status_code {
                None => 302,
                Some(code @ (301 | 302 | 303 | 307 | 308)) => code as u16,
                Some(_) => {
                    issues.add(
                        format!("{at}.statusCode"),
                        "must be one of 301, 302, 303, 307 and 308",
                    );
                    302
                }
            };
            out.redirect = Some(Redirect {
                scheme: spec.scheme,
                authority: spec.hostname,
                port: spec
                    .port
                    .and_then(|p| port_number(p, format!("{at}.port"), issues)),
                path: spec
                    .path
                    .and_then(|p| path_modifier(p, &format!("{at}.path"), out, issues)),
                status,
            });
        }
        FilterType::UrlRewrite => {
            let spec = f.url_rewrite.expect("checked above");
            let at = format!("{at}.urlRewrite");
            out.rewrite = Some(Rewrite {
                path: spec
                    .path
                    .and_then(|p| path_modifier(p, &format!("{at}.path"), out, issues)),
                authority: spec.hostname,
            });
        }
        FilterType::ExtensionRef => {
            issues.add(
                format!("{at}.type"),
                "ExtensionRef filters are not supported",
            );
        }
        FilterType::Cors => warnings.not_enforced(format!("{at}.cors")),
    }
}

fn path_modifier(
    p: PathModifierSpec,
    at: &str,
    out: &mut Filters,
    issues: &mut Issues,
) -> Option<PathRewrite> {
    match (p.kind, p.replace_full_path, p.replace_prefix_match) {
        (PathModifierType::ReplaceFullPath, Some(path), None) => Some(PathRewrite::Full(path)),
        (PathModifierType::ReplacePrefixMatch, None, Some(prefix)) => {
            out.replace_prefix = Some(format!("{at}.replacePrefixMatch"));
            Some(PathRewrite::MatchedPrefix(prefix))
        }
        _ => {
            issues.add(at, "exactly the field named by type must be set");
            None
        }
    }
}

fn header_edits(h: HeaderModifierSpec, at: &str, issues: &mut Issues) -> HeaderEdits {
    let pairs = |headers: Vec<HeaderSpec>, op: &str, issues: &mut Issues| {
        let mut out: Vec<(Box<str>, Box<str>)> = Vec::new();
        for (k, h) in headers.into_iter().enumerate() {
            let field = format!("{at}.{op}[{k}]");
            let name = header_name(&h.name, format!("{field}.name"), issues);
            if let (Some(name), true) = (
                name,
                header_value(&h.value, format!("{field}.value"), issues),
            ) {
                out.push((name.into(), h.value.into()));
            }
        }
        out.into()
    };
    let set = pairs(h.set, "set", issues);
    let add = pairs(h.add, "add", issues);
    let remove = h.remove.iter().enumerate();
    let remove = remove
        .filter_map(|(k, name)| header_name(name, format!("{at}.remove[{k}]"), issues))
        .map(Into::into)
        .collect();
    HeaderEdits { set, add, remove }
}

/// A Service reference; its host is resolved once Services are known.
fn backend(b: BackendObjectRef, at: &str, namespace: &str, issues: &mut Issues) -> Destination {
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if kind != "Service" || !matches!(group, "" | "core") {
        issues.add(
            format!("{at}.kind"),
            format!("unsupported backend kind {kind:?} in group {group:?}: only Services are"),
        );
    }
    check_dns_label(&b.name, &format!("{at}.name"), issues);
    let namespace = b.namespace.as_deref().unwrap_or(namespace);
    Destination {
        service: format!("{}.{namespace}", b.name).into(),
        subset: None,
        port: b
            .port
            .and_then(|p| port_number(p, format!("{at}.port"), issues)),
    }
}

fn timeouts_and_retry(
    timeouts: Option<TimeoutsSpec>,
    retry: Option<RetrySpec>,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> (Option<std::time::Duration>, Option<RetryPolicy>) {
    let (mut request, mut backend_request) = (None, None);
    if let Some(t) = timeouts {
        // "0s" disables the timeout.
        request = t
            .request
            .and_then(|d| duration(&d, format!("{at}.timeouts.request"), issues))
            .filter(|d| !d.is_zero());
        backend_request = t
            .backend_request
            .and_then(|d| duration(&d, format!("{at}.timeouts.backendRequest"), issues))
            .filter(|d| !d.is_zero());
        if let (Some(request), Some(backend)) = (request, backend_request) {
            if backend > request {
                issues.add(
                    format!("{at}.timeouts.backendRequest"),
                    "must not be longer than timeouts.request",
                );
            }
        }
    }
    let default = RetryPolicy::istio_default();
    let retries = match retry {
        None => backend_request.map(|t| RetryPolicy {
            per_try_timeout: Some(t),
            ..default
        }),
        Some(r) => {
            let at = format!("{at}.retry");
            let mut retry_on = default.retry_on;
            if !r.codes.is_empty() {
                retry_on.retriable_status_codes.clear();
            }
            for (k, code) in r.codes.into_iter().enumerate() {
                match u16::try_from(code).ok().filter(|c| (400..=599).contains(c)) {
                    Some(code) => retry_on.retriable_status_codes.push(code),
                    None => issues.add(format!("{at}.codes[{k}]"), "must be between 400 and 599"),
                }
            }
            if let Some(backoff) = r.backoff {
                duration(&backoff, format!("{at}.backoff"), issues);
                warnings.not_enforced(format!("{at}.backoff"));
            }
            Some(RetryPolicy {
                attempts: r
                    .attempts
                    .and_then(|a| count(a, format!("{at}.attempts"), issues))
                    .unwrap_or(default.attempts),
                per_try_timeout: backend_request,
                retry_on,
            })
        }
    };
    (request, retries)
}
