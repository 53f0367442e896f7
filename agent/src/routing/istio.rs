//! Istio `networking.istio.io` VirtualService and DestinationRule: their
//! schema, read strictly so that typos are errors, and its translation into
//! the routing model. Valid settings nodemesh does not act on are parsed all
//! the same and reported as warnings.

use std::collections::{BTreeMap, HashSet};

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;

use crate::config::{
    check_dns_label, check_labels, check_metadata, port_number, Issues, Meta, Object,
};

use super::compile::{
    check_host, count, duration, full_match_regex, header_name, header_value, percent, regex,
    DestinationRuleDraft, RouteDraft, VirtualServiceDraft, Warnings,
};
use super::ingress_l4::L4RouteSpec;
use super::locality::{locality_lb, LocalityLb};
use super::{
    AbortStatus, ConnectionPool, Destination, DestinationPolicy, Fault, FaultAbort, FaultDelay,
    HashKey, HeaderEdits, HeaderOps, HttpRoute, LoadBalancer, Mirror, OutlierDetection,
    PathRewrite, Redirect, RequestMatch, RetryOn, RetryPolicy, Rewrite, RouteAction, StringMatch,
    Subset, TrafficPolicy, UpstreamTls, WeightedDestination,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct VirtualServiceSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRouteSpec>,
    #[serde(default)]
    tls: Vec<L4RouteSpec>,
    #[serde(default)]
    tcp: Vec<L4RouteSpec>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRouteSpec {
    name: Option<String>,
    #[serde(rename = "match", default)]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    route: Vec<RouteDestinationSpec>,
    redirect: Option<RedirectSpec>,
    direct_response: Option<DirectResponseSpec>,
    delegate: Option<DelegateSpec>,
    rewrite: Option<RewriteSpec>,
    timeout: Option<String>,
    retries: Option<RetriesSpec>,
    fault: Option<FaultSpec>,
    mirror: Option<DestinationSpec>,
    #[serde(default)]
    mirrors: Vec<MirrorSpec>,
    mirror_percentage: Option<PercentSpec>,
    /// Deprecated integer form of `mirrorPercentage`.
    mirror_percent: Option<i64>,
    cors_policy: Option<CorsPolicySpec>,
    headers: Option<HeadersSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MatchSpec {
    name: Option<String>,
    uri: Option<StringMatchSpec>,
    scheme: Option<StringMatchSpec>,
    method: Option<StringMatchSpec>,
    authority: Option<StringMatchSpec>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatchSpec>,
    port: Option<i64>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    ignore_uri_case: bool,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatchSpec>,
    source_namespace: Option<String>,
    stat_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchSpec {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteDestinationSpec {
    destination: DestinationSpec,
    weight: Option<i64>,
    headers: Option<HeadersSpec>,
}

impl RouteDestinationSpec {
    /// A destination without header edits (`tls:` and `tcp:` rules).
    pub(super) fn plain(destination: DestinationSpec, weight: Option<i64>) -> Self {
        RouteDestinationSpec {
            destination,
            weight,
            headers: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DestinationSpec {
    host: String,
    subset: Option<String>,
    port: Option<PortSelector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSelector {
    number: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadersSpec {
    request: Option<HeaderOperationsSpec>,
    response: Option<HeaderOperationsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOperationsSpec {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedirectSpec {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<i64>,
    derive_port: Option<DerivePort>,
    scheme: Option<String>,
    redirect_code: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum DerivePort {
    FromProtocolDefault,
    FromRequestPort,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectResponseSpec {
    status: i64,
    body: Option<BodySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodySpec {
    string: Option<String>,
    /// Base64.
    bytes: Option<String>,
}

/// Parsed so that typos are caught; delegation is not enforced.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelegateSpec {
    #[serde(rename = "name")]
    _name: String,
    #[serde(rename = "namespace")]
    _namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RewriteSpec {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Option<RegexRewriteSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegexRewriteSpec {
    #[serde(rename = "match")]
    pattern: String,
    rewrite: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetriesSpec {
    attempts: Option<i64>,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
    retry_remote_localities: Option<bool>,
    retry_ignore_previous_hosts: Option<bool>,
    backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    delay: Option<DelaySpec>,
    abort: Option<AbortSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DelaySpec {
    fixed_delay: Option<String>,
    exponential_delay: Option<String>,
    percentage: Option<PercentSpec>,
    /// Deprecated integer form of `percentage`.
    percent: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AbortSpec {
    http_status: Option<i64>,
    grpc_status: Option<GrpcStatus>,
    http2_error: Option<String>,
    percentage: Option<PercentSpec>,
    percent: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum GrpcStatus {
    Code(i64),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PercentSpec {
    value: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorSpec {
    destination: DestinationSpec,
    percentage: Option<PercentSpec>,
}

/// Parsed so that typos are caught; CORS is not enforced.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CorsPolicySpec {
    #[serde(rename = "allowOrigins")]
    _allow_origins: Option<Vec<StringMatchSpec>>,
    #[serde(rename = "allowOrigin")]
    _allow_origin: Option<Vec<String>>,
    #[serde(rename = "allowMethods")]
    _allow_methods: Option<Vec<String>>,
    #[serde(rename = "allowHeaders")]
    _allow_headers: Option<Vec<String>>,
    #[serde(rename = "exposeHeaders")]
    _expose_headers: Option<Vec<String>>,
    #[serde(rename = "maxAge")]
    _max_age: Option<String>,
    #[serde(rename = "allowCredentials")]
    _allow_credentials: Option<bool>,
    #[serde(rename = "unmatchedPreflights")]
    _unmatched_preflights: Option<String>,
}

/// Parsed so that typos are caught; TLS and TCP routes are not enforced.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct DestinationRuleSpec {
    host: String,
    traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    subsets: Vec<SubsetSpec>,
    #[serde(default)]
    export_to: Vec<String>,
    workload_selector: Option<WorkloadSelectorSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadSelectorSpec {
    #[serde(rename = "matchLabels")]
    _match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrafficPolicySpec {
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierDetectionSpec>,
    tls: Option<ClientTlsSpec>,
    #[serde(default)]
    port_level_settings: Vec<PortTrafficPolicySpec>,
    tunnel: Option<TunnelSpec>,
    proxy_protocol: Option<ProxyProtocolSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortTrafficPolicySpec {
    port: Option<PortSelector>,
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierDetectionSpec>,
    tls: Option<ClientTlsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoadBalancerSpec {
    simple: Option<SimpleLb>,
    consistent_hash: Option<ConsistentHashSpec>,
    locality_lb_setting: Option<super::locality::LocalityLbSpec>,
    warmup_duration_secs: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum SimpleLb {
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConsistentHashSpec {
    http_header_name: Option<String>,
    http_cookie: Option<HttpCookieSpec>,
    use_source_ip: Option<bool>,
    http_query_parameter_name: Option<String>,
    ring_hash: Option<RingHashSpec>,
    maglev: Option<MaglevSpec>,
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpCookieSpec {
    name: String,
    path: Option<String>,
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RingHashSpec {
    #[serde(rename = "minimumRingSize")]
    _minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaglevSpec {
    #[serde(rename = "tableSize")]
    _table_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionPoolSpec {
    tcp: Option<TcpSettingsSpec>,
    http: Option<HttpSettingsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TcpSettingsSpec {
    max_connections: Option<i64>,
    connect_timeout: Option<String>,
    tcp_keepalive: Option<TcpKeepaliveSpec>,
    max_connection_duration: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpKeepaliveSpec {
    #[serde(rename = "probes")]
    _probes: Option<u32>,
    #[serde(rename = "time")]
    _time: Option<String>,
    #[serde(rename = "interval")]
    _interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpSettingsSpec {
    http1_max_pending_requests: Option<i64>,
    http2_max_requests: Option<i64>,
    max_requests_per_connection: Option<i64>,
    max_retries: Option<i64>,
    idle_timeout: Option<String>,
    h2_upgrade_policy: Option<H2UpgradePolicy>,
    use_client_protocol: Option<bool>,
    max_concurrent_streams: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierDetectionSpec {
    /// Deprecated: gateway errors (502, 503, 504) only.
    consecutive_errors: Option<i64>,
    consecutive_5xx_errors: Option<i64>,
    consecutive_gateway_errors: Option<i64>,
    consecutive_local_origin_failures: Option<i64>,
    split_external_local_origin_errors: Option<bool>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<i64>,
    min_health_percent: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientTlsSpec {
    mode: Option<TlsMode>,
    client_certificate: Option<String>,
    private_key: Option<String>,
    ca_certificates: Option<String>,
    credential_name: Option<String>,
    subject_alt_names: Option<Vec<String>>,
    sni: Option<String>,
    insecure_skip_verify: Option<bool>,
    ca_crl: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelSpec {
    #[serde(rename = "protocol")]
    _protocol: Option<String>,
    #[serde(rename = "targetHost")]
    _target_host: String,
    #[serde(rename = "targetPort")]
    _target_port: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyProtocolSpec {
    #[serde(rename = "version")]
    _version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubsetSpec {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    traffic_policy: Option<TrafficPolicySpec>,
}

pub(crate) fn virtual_service(
    doc: Object<VirtualServiceSpec>,
    issues: &mut Issues,
) -> VirtualServiceDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    let mut warnings = Warnings::default();
    if spec.hosts.is_empty() {
        issues.add("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        check_host(host, format!("spec.hosts[{i}]"), issues);
    }
    let mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    let l4 = super::ingress_l4::drafts(spec.tls, spec.tcp, mesh, &mut warnings, issues);
    export_to(&spec.export_to, &mut warnings);
    let routes = spec.http.into_iter().enumerate();
    let routes = routes
        .filter_map(|(i, route)| http_route(route, i, &mut warnings, issues))
        .collect();
    for (i, gateway) in spec.gateways.iter().enumerate() {
        check_gateway_name(gateway, &format!("spec.gateways[{i}]"), issues);
    }
    VirtualServiceDraft {
        meta: Meta::new(&doc.metadata),
        hosts: spec.hosts,
        gateways: spec.gateways,
        routes,
        l4,
        warnings,
    }
}

/// `mesh`, `name` (a Gateway of the VirtualService's namespace) or
/// `namespace/name`.
fn check_gateway_name(name: &str, field: &str, issues: &mut Issues) {
    if name == "mesh" {
        return;
    }
    let (namespace, gateway) = name.split_once('/').unwrap_or(("", name));
    if !namespace.is_empty() {
        check_dns_label(namespace, field, issues);
    }
    check_dns_label(gateway, field, issues);
}

/// Visibility is not enforced: every object applies to every namespace.
fn export_to(export_to: &[String], warnings: &mut Warnings) {
    if export_to.iter().any(|e| e != "*") {
        warnings.not_enforced("spec.exportTo");
    }
}

/// `None` when the route is invalid (or delegates).
fn http_route(
    spec: HttpRouteSpec,
    i: usize,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Option<RouteDraft> {
    let at = format!("spec.http[{i}]");
    let mut matches = Vec::new();
    let mut match_gateways = Vec::new();
    for (j, m) in spec.matches.into_iter().enumerate() {
        let field = format!("{at}.match[{j}]");
        for (k, gateway) in m.gateways.iter().enumerate() {
            check_gateway_name(gateway, &format!("{field}.gateways[{k}]"), issues);
        }
        match_gateways.push(m.gateways.clone());
        matches.push(request_match(m, &field, warnings, issues));
    }

    let actions = [
        !spec.route.is_empty(),
        spec.redirect.is_some(),
        spec.direct_response.is_some(),
        spec.delegate.is_some(),
    ];
    if actions.iter().filter(|&&set| set).count() > 1 {
        issues.add(
            &at,
            "only one of route, redirect, directResponse and delegate may be set",
        );
    }
    let mut destination_fields = Vec::new();
    let mut redirect_port = None;
    let action = if !spec.route.is_empty() {
        RouteAction::Forward(weighted(spec.route, &at, &mut destination_fields, issues).into())
    } else if let Some(spec) = spec.redirect {
        let (action, port) = redirect(spec, &format!("{at}.redirect"), warnings, issues);
        redirect_port = port;
        RouteAction::Redirect(Box::new(action))
    } else if let Some(spec) = spec.direct_response {
        direct_response(spec, &format!("{at}.directResponse"), issues)
    } else if spec.delegate.is_some() {
        warnings.add(
            format!("{at}.delegate"),
            "accepted, not enforced: the route is skipped",
        );
        return None;
    } else {
        issues.add(
            &at,
            "one of route, redirect, directResponse or delegate is required",
        );
        return None;
    };

    let mut mirrors = Vec::new();
    if spec.mirror.is_some() && !spec.mirrors.is_empty() {
        issues.add(&at, "only one of mirror and mirrors may be set");
    }
    if let Some(mirror) = spec.mirror {
        let field = format!("{at}.mirror");
        let destination = destination(mirror, &field, &mut destination_fields, issues);
        let percentage = match (spec.mirror_percentage, spec.mirror_percent) {
            (Some(p), _) => percent(p.value, format!("{at}.mirrorPercentage.value"), issues),
            (None, Some(p)) => percent(p as f64, format!("{at}.mirrorPercent"), issues),
            (None, None) => 100.0,
        };
        mirrors.push(Mirror {
            destination,
            percentage,
        });
    }
    for (k, mirror) in spec.mirrors.into_iter().enumerate() {
        let field = format!("{at}.mirrors[{k}]");
        let destination = destination(
            mirror.destination,
            &format!("{field}.destination"),
            &mut destination_fields,
            issues,
        );
        let percentage = mirror.percentage.map_or(100.0, |p| {
            percent(p.value, format!("{field}.percentage.value"), issues)
        });
        mirrors.push(Mirror {
            destination,
            percentage,
        });
    }

    if spec.cors_policy.is_some() {
        warnings.not_enforced(format!("{at}.corsPolicy"));
    }
    let timeout = spec
        .timeout
        .and_then(|t| duration(&t, format!("{at}.timeout"), issues))
        .filter(|t| !t.is_zero());
    let route = HttpRoute {
        name: spec.name.unwrap_or_else(|| format!("http[{i}]")).into(),
        matches: matches.into(),
        action,
        timeout,
        retries: spec
            .retries
            .map(|r| Box::new(retries(r, &format!("{at}.retries"), warnings, issues))),
        fault: spec
            .fault
            .and_then(|f| fault(f, &format!("{at}.fault"), warnings, issues))
            .map(Box::new),
        mirrors: mirrors.into(),
        headers: spec
            .headers
            .and_then(|h| header_ops(h, &format!("{at}.headers"), issues).boxed()),
        rewrite: spec
            .rewrite
            .map(|r| Box::new(rewrite(r, &format!("{at}.rewrite"), issues))),
    };
    Some(RouteDraft {
        route,
        destination_fields,
        redirect_port,
        match_gateways,
    })
}

fn request_match(
    m: MatchSpec,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> RequestMatch {
    let string = |s: Option<StringMatchSpec>, field: &str, issues: &mut Issues| {
        s.and_then(|s| string_match(s, &format!("{at}.{field}"), issues))
    };
    // An empty uri match matches every path, as in Envoy.
    let uri = string(m.uri, "uri", issues).filter(|u| !matches!(u, StringMatch::Present));
    let scheme = string(m.scheme, "scheme", issues);
    let method = string(m.method, "method", issues);
    let authority = string(m.authority, "authority", issues);
    let headers = header_matches(m.headers, &format!("{at}.headers"), issues);
    let without_headers =
        header_matches(m.without_headers, &format!("{at}.withoutHeaders"), issues);
    let mut query_params = Vec::new();
    for (name, s) in m.query_params {
        let field = format!("{at}.queryParams.{name}");
        if name.is_empty() {
            issues.add(&field, "query parameter name must not be empty");
        }
        if let Some(s) = string_match(s, &field, issues) {
            query_params.push((name, s));
        }
    }
    let port = m
        .port
        .and_then(|p| port_number(p, format!("{at}.port"), issues));
    check_labels(&m.source_labels, &format!("{at}.sourceLabels"), issues);
    if m.stat_prefix.is_some() {
        warnings.not_enforced(format!("{at}.statPrefix"));
    }
    RequestMatch {
        name: m.name.map(Into::into),
        uri,
        scheme,
        method,
        authority,
        headers,
        without_headers,
        query_params: query_params
            .into_iter()
            .map(|(n, m)| (n.into(), m))
            .collect(),
        port,
        source_labels: m
            .source_labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
        source_namespace: m.source_namespace.map(Into::into),
        ignore_uri_case: m.ignore_uri_case,
    }
}

fn header_matches(
    headers: BTreeMap<String, StringMatchSpec>,
    at: &str,
    issues: &mut Issues,
) -> Box<[(Box<str>, StringMatch)]> {
    let mut out = Vec::new();
    for (name, s) in headers {
        let field = format!("{at}.{name}");
        let name = header_name(&name, field.clone(), issues);
        if let (Some(name), Some(s)) = (name, string_match(s, &field, issues)) {
            out.push((name.into(), s));
        }
    }
    out.into()
}

/// `{}` is [`StringMatch::Present`]; otherwise exactly one of exact, prefix
/// and regex.
fn string_match(s: StringMatchSpec, at: &str, issues: &mut Issues) -> Option<StringMatch> {
    match (s.exact, s.prefix, s.regex) {
        (None, None, None) => Some(StringMatch::Present),
        (Some(exact), None, None) => Some(StringMatch::Exact(exact.into())),
        (None, Some(prefix), None) => Some(StringMatch::Prefix(prefix.into())),
        (None, None, Some(regex)) => {
            full_match_regex(&regex, format!("{at}.regex"), issues).map(StringMatch::Regex)
        }
        _ => {
            issues.add(at, "only one of exact, prefix and regex may be set");
            None
        }
    }
}

pub(super) fn weighted(
    route: Vec<RouteDestinationSpec>,
    at: &str,
    fields: &mut Vec<String>,
    issues: &mut Issues,
) -> Vec<WeightedDestination> {
    let single = route.len() == 1;
    let mut sum = 0;
    let mut out = Vec::with_capacity(route.len());
    for (k, r) in route.into_iter().enumerate() {
        let field = format!("{at}.route[{k}]");
        let weight = match r.weight {
            Some(w) if !(0..=100).contains(&w) => {
                issues.add(format!("{field}.weight"), "must be between 0 and 100");
                0
            }
            Some(w) => w,
            None => 0,
        };
        sum += weight;
        out.push(WeightedDestination {
            destination: destination(
                r.destination,
                &format!("{field}.destination"),
                fields,
                issues,
            ),
            // A single destination takes all traffic, whatever its weight.
            weight: if single { 100 } else { weight as u32 },
            headers: r
                .headers
                .and_then(|h| header_ops(h, &format!("{field}.headers"), issues).boxed()),
        });
    }
    if !single && sum != 100 {
        issues.add(
            format!("{at}.route"),
            format!("weights must add up to 100, they add up to {sum}"),
        );
    }
    out
}

/// The host is resolved once Services are known; `fields` records where it
/// was written.
fn destination(
    d: DestinationSpec,
    at: &str,
    fields: &mut Vec<String>,
    issues: &mut Issues,
) -> Destination {
    if d.host.is_empty() {
        issues.add(format!("{at}.host"), "must not be empty");
    } else if d.host.contains('*') {
        issues.add(
            format!("{at}.host"),
            "a destination host cannot be a wildcard",
        );
    }
    if d.subset.as_deref() == Some("") {
        issues.add(format!("{at}.subset"), "must not be empty");
    }
    let port = d
        .port
        .and_then(|p| port_number(p.number, format!("{at}.port.number"), issues));
    fields.push(at.to_owned());
    Destination {
        service: d.host.into(),
        subset: d.subset.map(Into::into),
        port,
    }
}

fn header_ops(h: HeadersSpec, at: &str, issues: &mut Issues) -> HeaderOps {
    HeaderOps {
        request: h
            .request
            .map(|e| header_edits(e, &format!("{at}.request"), issues))
            .unwrap_or_default(),
        response: h
            .response
            .map(|e| header_edits(e, &format!("{at}.response"), issues))
            .unwrap_or_default(),
    }
}

fn header_edits(e: HeaderOperationsSpec, at: &str, issues: &mut Issues) -> HeaderEdits {
    let pairs = |map: BTreeMap<String, String>, op: &str, issues: &mut Issues| {
        let mut out: Vec<(Box<str>, Box<str>)> = Vec::new();
        for (name, value) in map {
            let field = format!("{at}.{op}.{name}");
            let name = header_name(&name, field.clone(), issues);
            if let (Some(name), true) = (name, header_value(&value, field, issues)) {
                out.push((name.into(), value.into()));
            }
        }
        out.into()
    };
    let set = pairs(e.set, "set", issues);
    let add = pairs(e.add, "add", issues);
    let remove = e.remove.iter().enumerate();
    let remove = remove
        .filter_map(|(k, name)| header_name(name, format!("{at}.remove[{k}]"), issues))
        .map(Into::into)
        .collect();
    HeaderEdits { set, add, remove }
}

/// Also returns the port to check against the bound Service.
fn redirect(
    r: RedirectSpec,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> (Redirect, Option<(String, u16)>) {
    let status = match r.redirect_code {
        None => 301,
        Some(code @ (301 | 302 | 303 | 307 | 308)) => code as u16,
        Some(_) => {
            issues.add(
                format!("{at}.redirectCode"),
                "must be one of 301, 302, 303, 307 and 308",
            );
            301
        }
    };
    let port = r
        .port
        .and_then(|p| port_number(p, format!("{at}.port"), issues));
    if let Some(derive) = r.derive_port {
        if port.is_some() {
            issues.add(at, "only one of port and derivePort may be set");
        }
        if matches!(derive, DerivePort::FromProtocolDefault) {
            warnings.not_enforced(format!("{at}.derivePort"));
        }
    }
    if r.scheme.as_deref() == Some("") {
        issues.add(format!("{at}.scheme"), "must not be empty");
    }
    let check_port = port
        .filter(|_| r.authority.is_none())
        .map(|p| (format!("{at}.port"), p));
    let redirect = Redirect {
        scheme: r.scheme,
        authority: r.authority,
        port,
        path: r.uri.map(PathRewrite::Full),
        status,
    };
    (redirect, check_port)
}

fn direct_response(d: DirectResponseSpec, at: &str, issues: &mut Issues) -> RouteAction {
    let status = u16::try_from(d.status)
        .ok()
        .filter(|s| (200..=599).contains(s));
    if status.is_none() {
        issues.add(format!("{at}.status"), "must be between 200 and 599");
    }
    let body = match d.body {
        None => Bytes::new(),
        Some(BodySpec {
            string: Some(s),
            bytes: None,
        }) => Bytes::from(s),
        Some(BodySpec {
            string: None,
            bytes: Some(b),
        }) => match base64::engine::general_purpose::STANDARD.decode(b.trim()) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                issues.add(format!("{at}.body.bytes"), format!("invalid base64: {e}"));
                Bytes::new()
            }
        },
        Some(_) => {
            issues.add(
                format!("{at}.body"),
                "exactly one of string and bytes is required",
            );
            Bytes::new()
        }
    };
    RouteAction::DirectResponse {
        status: status.unwrap_or(500),
        body,
    }
}

fn rewrite(r: RewriteSpec, at: &str, issues: &mut Issues) -> Rewrite {
    if r.uri.is_some() && r.uri_regex_rewrite.is_some() {
        issues.add(at, "only one of uri and uriRegexRewrite may be set");
    }
    let regex_rewrite = r.uri_regex_rewrite.and_then(|re| {
        // Not anchored: every match in the path is replaced, as in Envoy.
        let pattern = regex(&re.pattern, format!("{at}.uriRegexRewrite.match"), issues)?;
        Some(PathRewrite::Regex {
            pattern,
            rewrite: re.rewrite,
        })
    });
    Rewrite {
        path: r.uri.map(PathRewrite::MatchedPrefix).or(regex_rewrite),
        authority: r.authority,
    }
}

fn retries(r: RetriesSpec, at: &str, warnings: &mut Warnings, issues: &mut Issues) -> RetryPolicy {
    // As Istio: no attempts disables retries; no retryOn keeps its default conditions.
    let attempts = r
        .attempts
        .and_then(|a| count(a, format!("{at}.attempts"), issues))
        .unwrap_or(0);
    let per_try_timeout = r
        .per_try_timeout
        .and_then(|t| duration(&t, format!("{at}.perTryTimeout"), issues));
    let retry_on = match r.retry_on {
        Some(conditions) => retry_on(&conditions, &format!("{at}.retryOn"), issues),
        None => RetryPolicy::istio_default().retry_on,
    };
    if r.retry_remote_localities == Some(true) {
        warnings.not_enforced(format!("{at}.retryRemoteLocalities"));
    }
    if r.retry_ignore_previous_hosts == Some(false) {
        warnings.not_enforced(format!("{at}.retryIgnorePreviousHosts"));
    }
    if let Some(backoff) = r.backoff {
        duration(&backoff, format!("{at}.backoff"), issues);
        warnings.not_enforced(format!("{at}.backoff"));
    }
    RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
    }
}

/// Envoy's comma-separated conditions; bare status codes are retried as listed.
fn retry_on(conditions: &str, at: &str, issues: &mut Issues) -> RetryOn {
    let mut on = RetryOn::default();
    for token in conditions
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let flag = match token {
            "5xx" => &mut on.server_error,
            "gateway-error" => &mut on.gateway_error,
            "reset" => &mut on.reset,
            "connect-failure" => &mut on.connect_failure,
            "retriable-4xx" => &mut on.retriable_4xx,
            "refused-stream" => &mut on.refused_stream,
            "cancelled" => &mut on.cancelled,
            "deadline-exceeded" => &mut on.deadline_exceeded,
            "internal" => &mut on.internal,
            "resource-exhausted" => &mut on.resource_exhausted,
            "unavailable" => &mut on.unavailable,
            // Lists the codes given alongside.
            "retriable-status-codes" => continue,
            _ => {
                match token
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                {
                    Some(code) if !on.retriable_status_codes.contains(&code) => {
                        on.retriable_status_codes.push(code)
                    }
                    Some(_) => {}
                    None => issues.add(
                        at,
                        format!(
                            "unknown retry condition {token:?} (expected 5xx, gateway-error, \
                             reset, connect-failure, retriable-4xx, refused-stream, \
                             retriable-status-codes, cancelled, deadline-exceeded, internal, \
                             resource-exhausted, unavailable or a status code)"
                        ),
                    ),
                }
                continue;
            }
        };
        *flag = true;
    }
    on
}

fn fault(f: FaultSpec, at: &str, warnings: &mut Warnings, issues: &mut Issues) -> Option<Fault> {
    if f.delay.is_none() && f.abort.is_none() {
        issues.add(at, "delay or abort is required");
        return None;
    }
    let delay = f.delay.and_then(|d| {
        let at = format!("{at}.delay");
        let percentage = fault_percentage(d.percentage, d.percent, &at, issues);
        match (d.fixed_delay, d.exponential_delay) {
            (Some(_), Some(_)) => {
                issues.add(
                    &at,
                    "only one of fixedDelay and exponentialDelay may be set",
                );
                None
            }
            (Some(fixed), None) => {
                let fixed_delay = duration(&fixed, format!("{at}.fixedDelay"), issues)?;
                Some(FaultDelay {
                    fixed_delay,
                    percentage,
                })
            }
            (None, Some(exponential)) => {
                duration(&exponential, format!("{at}.exponentialDelay"), issues);
                warnings.not_enforced(format!("{at}.exponentialDelay"));
                None
            }
            (None, None) => {
                issues.add(&at, "fixedDelay is required");
                None
            }
        }
    });
    let abort = f.abort.and_then(|a| {
        let at = format!("{at}.abort");
        let percentage = fault_percentage(a.percentage, a.percent, &at, issues);
        let status = match (a.http_status, a.grpc_status, a.http2_error) {
            (Some(status), None, None) => match u16::try_from(status) {
                Ok(status @ 200..=599) => AbortStatus::Http(status),
                _ => {
                    issues.add(format!("{at}.httpStatus"), "must be between 200 and 599");
                    return None;
                }
            },
            (None, Some(status), None) => {
                AbortStatus::Grpc(grpc_code(status, &format!("{at}.grpcStatus"), issues)?)
            }
            (None, None, Some(_)) => {
                warnings.not_enforced(format!("{at}.http2Error"));
                return None;
            }
            _ => {
                issues.add(
                    &at,
                    "exactly one of httpStatus, grpcStatus and http2Error is required",
                );
                return None;
            }
        };
        Some(FaultAbort { status, percentage })
    });
    Some(Fault { delay, abort })
}

/// Every request when neither form is set.
fn fault_percentage(
    percentage: Option<PercentSpec>,
    legacy: Option<i64>,
    at: &str,
    issues: &mut Issues,
) -> f64 {
    match (percentage, legacy) {
        (Some(p), _) => percent(p.value, format!("{at}.percentage.value"), issues),
        (None, Some(p)) => percent(p as f64, format!("{at}.percent"), issues),
        (None, None) => 100.0,
    }
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn grpc_code(status: GrpcStatus, at: &str, issues: &mut Issues) -> Option<u32> {
    let code = match &status {
        GrpcStatus::Code(n) => u32::try_from(*n).ok().filter(|&n| n < 17),
        GrpcStatus::Name(name) => (GRPC_CODES.iter().position(|c| c == name))
            .map(|i| i as u32)
            .or_else(|| name.parse().ok().filter(|&n: &u32| n < 17)),
    };
    if code.is_none() {
        issues.add(
            at,
            "must be a gRPC status name (e.g. UNAVAILABLE) or code (0 to 16)",
        );
    }
    code
}

pub(crate) fn destination_rule(
    doc: Object<DestinationRuleSpec>,
    issues: &mut Issues,
) -> DestinationRuleDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    let mut warnings = Warnings::default();
    check_host(&spec.host, "spec.host".into(), issues);
    let (policy, ports) = spec
        .traffic_policy
        .map(|p| traffic_policy(p, "spec.trafficPolicy", &mut warnings, issues))
        .unwrap_or_default();
    let mut names = HashSet::new();
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.into_iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        check_dns_label(&s.name, &format!("{at}.name"), issues);
        if !names.insert(s.name.clone()) {
            issues.add(format!("{at}.name"), format!("duplicate subset {}", s.name));
        }
        check_labels(&s.labels, &format!("{at}.labels"), issues);
        let (policy, ports) = s
            .traffic_policy
            .map(|p| traffic_policy(p, &format!("{at}.trafficPolicy"), &mut warnings, issues))
            .unwrap_or_default();
        subsets.push(Subset {
            origin: String::new(),
            name: s.name,
            labels: s.labels.into(),
            policy,
            ports,
        });
    }
    export_to(&spec.export_to, &mut warnings);
    if spec.workload_selector.is_some() {
        warnings.not_enforced("spec.workloadSelector");
    }
    DestinationRuleDraft {
        meta: Meta::new(&doc.metadata),
        host: spec.host,
        policy: DestinationPolicy {
            origin: String::new(),
            policy,
            ports,
            subsets,
        },
        warnings,
    }
}

type PortPolicies = Vec<(u16, TrafficPolicy)>;

fn traffic_policy(
    p: TrafficPolicySpec,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> (TrafficPolicy, PortPolicies) {
    let policy = policy_groups(
        p.load_balancer,
        p.connection_pool,
        p.outlier_detection,
        p.tls,
        at,
        warnings,
        issues,
    );
    if p.tunnel.is_some() {
        warnings.not_enforced(format!("{at}.tunnel"));
    }
    if p.proxy_protocol.is_some() {
        warnings.not_enforced(format!("{at}.proxyProtocol"));
    }
    let mut ports: PortPolicies = Vec::new();
    for (i, s) in p.port_level_settings.into_iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        let port = match s.port {
            Some(p) => port_number(p.number, format!("{at}.port.number"), issues),
            None => {
                issues.add(format!("{at}.port"), "is required");
                None
            }
        };
        let policy = policy_groups(
            s.load_balancer,
            s.connection_pool,
            s.outlier_detection,
            s.tls,
            &at,
            warnings,
            issues,
        );
        if let Some(port) = port {
            if ports.iter().any(|(p, _)| *p == port) {
                issues.add(
                    format!("{at}.port.number"),
                    format!("duplicate port {port}"),
                );
            }
            ports.push((port, policy));
        }
    }
    (policy, ports)
}

fn policy_groups(
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier: Option<OutlierDetectionSpec>,
    tls: Option<ClientTlsSpec>,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> TrafficPolicy {
    let (load_balancer, locality) = load_balancer.map_or((None, None), |lb| {
        self::load_balancer(lb, &format!("{at}.loadBalancer"), warnings, issues)
    });
    TrafficPolicy {
        tls: tls.map(|tls| client_tls(tls, &format!("{at}.tls"), warnings)),
        load_balancer,
        locality,
        connection_pool: connection_pool
            .map(|cp| self::connection_pool(cp, &format!("{at}.connectionPool"), warnings, issues)),
        outlier_detection: outlier
            .map(|od| outlier_detection(od, &format!("{at}.outlierDetection"), warnings, issues)),
    }
}

/// `ISTIO_MUTUAL` and `DISABLE` are enforced; TLS origination with the
/// user's own certificates (`SIMPLE`, `MUTUAL`) is not supported, and the
/// mesh's automatic mTLS applies instead.
fn client_tls(tls: ClientTlsSpec, at: &str, warnings: &mut Warnings) -> UpstreamTls {
    let upstream = match tls.mode {
        Some(TlsMode::IstioMutual) => UpstreamTls::IstioMutual,
        Some(TlsMode::Disable) => UpstreamTls::Disable,
        None => {
            warnings.add(
                format!("{at}.mode"),
                "not set: DISABLE (Istio's default), the destination is reached in plaintext",
            );
            UpstreamTls::Disable
        }
        Some(mode @ (TlsMode::Simple | TlsMode::Mutual)) => {
            let mode = match mode {
                TlsMode::Simple => "SIMPLE",
                _ => "MUTUAL",
            };
            warnings.add(
                format!("{at}.mode"),
                format!(
                    "{mode} is not supported (nodemesh does not originate TLS with your own \
                     certificates); automatic mTLS applies instead"
                ),
            );
            return UpstreamTls::Auto;
        }
    };
    let unused = [
        (tls.client_certificate.is_some(), "clientCertificate"),
        (tls.private_key.is_some(), "privateKey"),
        (tls.ca_certificates.is_some(), "caCertificates"),
        (tls.credential_name.is_some(), "credentialName"),
        (tls.subject_alt_names.is_some(), "subjectAltNames"),
        (tls.sni.is_some(), "sni"),
        (tls.insecure_skip_verify.is_some(), "insecureSkipVerify"),
        (tls.ca_crl.is_some(), "caCrl"),
    ];
    for (_, field) in unused.into_iter().filter(|(set, _)| *set) {
        warnings.not_enforced(format!("{at}.{field}"));
    }
    upstream
}

/// The algorithm (`None`: the default) and the locality setting.
fn load_balancer(
    lb: LoadBalancerSpec,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> (Option<LoadBalancer>, Option<LocalityLb>) {
    let locality = lb
        .locality_lb_setting
        .map(|l| locality_lb(l, &format!("{at}.localityLbSetting"), issues));
    (
        algorithm(
            lb.simple,
            lb.consistent_hash,
            lb.warmup_duration_secs,
            at,
            warnings,
            issues,
        ),
        locality,
    )
}

fn algorithm(
    simple: Option<SimpleLb>,
    consistent_hash: Option<ConsistentHashSpec>,
    warmup_duration_secs: Option<String>,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Option<LoadBalancer> {
    if let Some(warmup) = warmup_duration_secs {
        duration(&warmup, format!("{at}.warmupDurationSecs"), issues);
        warnings.not_enforced(format!("{at}.warmupDurationSecs"));
    }
    match (simple, consistent_hash) {
        (Some(_), Some(_)) => {
            issues.add(at, "only one of simple and consistentHash may be set");
            None
        }
        (Some(simple), None) => match simple {
            SimpleLb::Unspecified => None,
            SimpleLb::RoundRobin => Some(LoadBalancer::RoundRobin),
            SimpleLb::LeastRequest | SimpleLb::LeastConn => Some(LoadBalancer::LeastRequest),
            SimpleLb::Random => Some(LoadBalancer::Random),
            SimpleLb::Passthrough => {
                warnings.add(
                    format!("{at}.simple"),
                    "PASSTHROUGH accepted, not enforced: the default balancer is used",
                );
                None
            }
        },
        (None, Some(hash)) => {
            self::consistent_hash(hash, &format!("{at}.consistentHash"), warnings, issues)
        }
        (None, None) => None,
    }
}

fn consistent_hash(
    h: ConsistentHashSpec,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Option<LoadBalancer> {
    for (set, field) in [
        (h.ring_hash.is_some(), "ringHash"),
        (h.maglev.is_some(), "maglev"),
        (h.minimum_ring_size.is_some(), "minimumRingSize"),
    ] {
        if set {
            warnings.not_enforced(format!("{at}.{field}"));
        }
    }
    let mut keys = Vec::new();
    if let Some(name) = h.http_header_name {
        keys.extend(
            header_name(&name, format!("{at}.httpHeaderName"), issues).map(HashKey::Header),
        );
    }
    if let Some(cookie) = h.http_cookie {
        let field = format!("{at}.httpCookie");
        if cookie.name.is_empty() {
            issues.add(format!("{field}.name"), "must not be empty");
        }
        if cookie.path.is_some() {
            warnings.not_enforced(format!("{field}.path"));
        }
        if let Some(ttl) = cookie.ttl {
            duration(&ttl, format!("{field}.ttl"), issues);
            warnings.not_enforced(format!("{field}.ttl"));
        }
        keys.push(HashKey::Cookie(cookie.name));
    }
    if h.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(name) = h.http_query_parameter_name {
        keys.push(HashKey::QueryParameter(name));
    }
    if keys.len() != 1 {
        issues.add(
            at,
            "exactly one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName \
             is required",
        );
    }
    keys.pop().map(LoadBalancer::ConsistentHash)
}

fn connection_pool(
    cp: ConnectionPoolSpec,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    let mut tcp_idle = None;
    if let Some(tcp) = cp.tcp {
        let at = format!("{at}.tcp");
        out.max_connections = tcp
            .max_connections
            .and_then(|n| count(n, format!("{at}.maxConnections"), issues));
        out.connect_timeout = tcp
            .connect_timeout
            .and_then(|t| duration(&t, format!("{at}.connectTimeout"), issues));
        if tcp.tcp_keepalive.is_some() {
            warnings.not_enforced(format!("{at}.tcpKeepalive"));
        }
        if let Some(d) = tcp.max_connection_duration {
            duration(&d, format!("{at}.maxConnectionDuration"), issues);
            warnings.not_enforced(format!("{at}.maxConnectionDuration"));
        }
        tcp_idle = tcp
            .idle_timeout
            .and_then(|t| duration(&t, format!("{at}.idleTimeout"), issues));
    }
    let mut http_idle = None;
    if let Some(http) = cp.http {
        let at = format!("{at}.http");
        let number = |n: Option<i64>, field: &str, issues: &mut Issues| {
            n.and_then(|n| count(n, format!("{at}.{field}"), issues))
        };
        out.http1_max_pending_requests = number(
            http.http1_max_pending_requests,
            "http1MaxPendingRequests",
            issues,
        );
        out.http2_max_requests = number(http.http2_max_requests, "http2MaxRequests", issues);
        out.max_requests_per_connection = number(
            http.max_requests_per_connection,
            "maxRequestsPerConnection",
            issues,
        );
        out.max_retries = number(http.max_retries, "maxRetries", issues);
        number(http.max_concurrent_streams, "maxConcurrentStreams", issues);
        http_idle = http
            .idle_timeout
            .and_then(|t| duration(&t, format!("{at}.idleTimeout"), issues));
        for (set, field) in [
            (http.h2_upgrade_policy.is_some(), "h2UpgradePolicy"),
            (http.use_client_protocol.is_some(), "useClientProtocol"),
            (
                http.max_concurrent_streams.is_some(),
                "maxConcurrentStreams",
            ),
        ] {
            if set {
                warnings.not_enforced(format!("{at}.{field}"));
            }
        }
    }
    out.idle_timeout = http_idle.or(tcp_idle);
    out
}

fn outlier_detection(
    o: OutlierDetectionSpec,
    at: &str,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> OutlierDetection {
    let mut out = OutlierDetection::default();
    let number = |n: Option<i64>, field: &str, issues: &mut Issues| {
        n.and_then(|n| count(n, format!("{at}.{field}"), issues))
    };
    let legacy = number(o.consecutive_errors, "consecutiveErrors", issues);
    let server = number(o.consecutive_5xx_errors, "consecutive5xxErrors", issues);
    let gateway = number(
        o.consecutive_gateway_errors,
        "consecutiveGatewayErrors",
        issues,
    );
    number(
        o.consecutive_local_origin_failures,
        "consecutiveLocalOriginFailures",
        issues,
    );
    // As Istio translates the deprecated field: gateway errors only.
    if let Some(legacy) = legacy {
        out.consecutive_gateway_errors = legacy;
        out.consecutive_5xx_errors = 0;
    }
    out.consecutive_5xx_errors = server.unwrap_or(out.consecutive_5xx_errors);
    out.consecutive_gateway_errors = gateway.unwrap_or(out.consecutive_gateway_errors);
    if let Some(interval) = o.interval {
        out.interval = duration(&interval, format!("{at}.interval"), issues).unwrap_or_default();
    }
    if let Some(base) = o.base_ejection_time {
        out.base_ejection_time =
            duration(&base, format!("{at}.baseEjectionTime"), issues).unwrap_or_default();
    }
    let percentage = |n: Option<i64>, field: &str, default: u32, issues: &mut Issues| {
        n.map_or(default, |n| {
            percent(n as f64, format!("{at}.{field}"), issues);
            n.clamp(0, 100) as u32
        })
    };
    out.max_ejection_percent = percentage(
        o.max_ejection_percent,
        "maxEjectionPercent",
        out.max_ejection_percent,
        issues,
    );
    out.min_health_percent = percentage(
        o.min_health_percent,
        "minHealthPercent",
        out.min_health_percent,
        issues,
    );
    if o.split_external_local_origin_errors.is_some() {
        warnings.not_enforced(format!("{at}.splitExternalLocalOriginErrors"));
    }
    if o.consecutive_local_origin_failures.is_some() {
        warnings.not_enforced(format!("{at}.consecutiveLocalOriginFailures"));
    }
    out
}
