//! L7 routing: Istio `VirtualService` / `DestinationRule` and Gateway API
//! `HTTPRoute`, compiled at load time into one immutable [`RoutingTable`].
//!
//! The table is indexed by Service (`namespace/name`), so a request costs one
//! hash lookup plus the ordered match of that Service's own routes, however
//! many routes the mesh holds. Everything here is plain data: the proxy
//! executes it, `nodemesh routes` and `explain` print it.

mod compile;
mod gateway;
pub mod gateway_api;
#[cfg(test)]
mod gateway_api_tests;
mod grpc_route;
#[cfg(test)]
mod grpc_route_tests;
mod index;
pub mod ingress;
pub mod ingress_l4;
#[cfg(test)]
mod ingress_tests;
mod istio;
mod istio_gateway;
pub mod istio_status;
pub mod locality;
mod matching;
mod reference_grant;
#[cfg(test)]
mod reference_grant_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

pub(crate) use compile::{compile, Drafts};
pub(crate) use gateway::http_route;
pub(crate) use gateway_api::{gateway as api_gateway, gateway_class};
pub(crate) use grpc_route::grpc_route;
use index::PathIndex;
pub(crate) use istio::{destination_rule, virtual_service};
pub(crate) use istio_gateway::istio_gateway;
pub use matching::RequestInfo;
pub(crate) use reference_grant::reference_grant;

/// Routes and traffic policies of every Service that has any.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoutingTable {
    /// Service key → the routes that apply to requests for it.
    hosts: HashMap<String, VirtualHost>,
    /// Service key → its DestinationRule, resolved.
    policies: HashMap<String, DestinationPolicy>,
    /// Conflicts resolved and settings accepted but not enforced; reported by
    /// `nodemesh status` and `nodemesh routes`.
    pub warnings: Vec<String>,
    /// Istio Gateways and the VirtualServices bound to them, then Gateway
    /// API Gateways and the HTTPRoutes attached to them.
    ingress: ingress::IngressTable,
    /// The status of the Gateway API objects nodemesh controls.
    gateway_api: Vec<gateway_api::ObjectStatus>,
    /// The status of the Istio Gateways and VirtualServices.
    istio: Vec<gateway_api::ObjectStatus>,
}

impl RoutingTable {
    pub fn new(
        hosts: HashMap<String, VirtualHost>,
        policies: HashMap<String, DestinationPolicy>,
        warnings: Vec<String>,
    ) -> RoutingTable {
        RoutingTable {
            hosts,
            policies,
            warnings,
            ingress: ingress::IngressTable::default(),
            gateway_api: Vec::new(),
            istio: Vec::new(),
        }
    }

    /// What Kubernetes mode writes to the status of Gateway API objects.
    pub fn gateway_api_status(&self) -> &[gateway_api::ObjectStatus] {
        &self.gateway_api
    }

    /// What Kubernetes mode writes to the status of Istio Gateways and
    /// VirtualServices (see [`istio_status`]).
    pub fn istio_status(&self) -> &[gateway_api::ObjectStatus] {
        &self.istio
    }

    /// Gateways, their servers and the routes bound to them.
    pub fn ingress(&self) -> &ingress::IngressTable {
        &self.ingress
    }

    /// The routes bound to a Service, if any object routes it.
    pub fn host(&self, service: &str) -> Option<&VirtualHost> {
        self.hosts.get(service)
    }

    /// The DestinationRule of a Service, if it has one.
    pub fn policy(&self, service: &str) -> Option<&DestinationPolicy> {
        self.policies.get(service)
    }

    /// How the proxy speaks to the endpoints of `service` on `port` (a
    /// Service port), narrowed to `subset` when a route picked one: the L4
    /// path asks without a subset, the L7 path after picking one.
    pub fn upstream_tls(
        &self,
        service: &str,
        subset: Option<&str>,
        port: u16,
    ) -> UpstreamTlsDecision<'_> {
        self.policy(service)
            .and_then(|rule| rule.upstream_tls(subset, port))
            .unwrap_or_default()
    }

    pub fn route_count(&self) -> usize {
        self.hosts.values().map(|h| h.routes.len()).sum()
    }
}

/// The routes of one Service, in the order they are tried.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualHost {
    /// `VirtualService ns/name` or `HTTPRoute ns/name`, and its file.
    pub origin: String,
    routes: Box<[HttpRoute]>,
    #[serde(skip)]
    index: Option<PathIndex>,
}

impl VirtualHost {
    pub fn new(origin: String, routes: Vec<HttpRoute>) -> VirtualHost {
        let index = PathIndex::build(&routes);
        VirtualHost {
            origin,
            routes: routes.into_boxed_slice(),
            index,
        }
    }

    /// The routes, in the order they are tried.
    pub fn routes(&self) -> &[HttpRoute] {
        &self.routes
    }

    /// The first route with a matching match block (or no match blocks), and
    /// the index of the block that matched. Istio answers 404 when none does.
    pub fn select(&self, request: &RequestInfo<'_>) -> Option<(&HttpRoute, Option<usize>)> {
        let try_route = |route: &'_ HttpRoute| {
            if route.matches.is_empty() {
                return Some(None);
            }
            let block = route.matches.iter().position(|m| m.matches(request))?;
            Some(Some(block))
        };
        match &self.index {
            None => self
                .routes
                .iter()
                .find_map(|route| try_route(route).map(|block| (route, block))),
            Some(index) => index.candidates(request.path).into_iter().find_map(|i| {
                let route = &self.routes[i as usize];
                try_route(route).map(|block| (route, block))
            }),
        }
    }
}

/// One compiled route. A mesh may hold tens of thousands, so it is kept
/// small (under 150 bytes in place): sequences are boxed slices without
/// spare capacity, and the parts most routes leave unset are boxed, costing
/// a pointer when absent (see `agent/tests/route_memory.rs`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// The route's own name, or `http[i]` / `rules[i]`.
    pub name: Box<str>,
    /// Alternatives (OR); within one, every condition must hold (AND).
    pub matches: Box<[RequestMatch]>,
    pub action: RouteAction,
    /// Whole-request deadline, retries included. `None`: no deadline.
    #[serde(with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// `None`: Istio's default policy ([`RetryPolicy::istio_default`]).
    pub retries: Option<Box<RetryPolicy>>,
    pub fault: Option<Box<Fault>>,
    pub mirrors: Box<[Mirror]>,
    /// `None`: no header edits.
    pub headers: Option<Box<HeaderOps>>,
    pub rewrite: Option<Box<Rewrite>>,
}

impl HttpRoute {
    /// A route that only forwards (a VirtualService `tls:` or `tcp:` rule).
    pub fn forward(name: String, destinations: Vec<WeightedDestination>) -> HttpRoute {
        HttpRoute {
            name: name.into(),
            matches: Box::new([]),
            action: RouteAction::Forward(destinations.into()),
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Box::new([]),
            headers: None,
            rewrite: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteAction {
    /// Weighted destinations; weights are relative (Istio's sum to 100).
    Forward(Box<[WeightedDestination]>),
    Redirect(Box<Redirect>),
    DirectResponse {
        status: u16,
        #[serde(serialize_with = "lossy_bytes")]
        body: Bytes,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedDestination {
    pub destination: Destination,
    pub weight: u32,
    /// Header edits applied only when this destination is picked; `None`:
    /// none.
    pub headers: Option<Box<HeaderOps>>,
}

/// A Service (resolved to `namespace/name`), optionally narrowed to a subset
/// and a port. The names are shared by every route of a table that names
/// the same Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub service: Arc<str>,
    pub subset: Option<Arc<str>>,
    /// `None`: the port the client connected to.
    pub port: Option<u16>,
}

/// Conditions on one request; all present ones must hold.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    pub name: Option<Box<str>>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Lowercase header name → condition.
    pub headers: Box<[(Box<str>, StringMatch)]>,
    /// Lowercase header names whose condition must *not* hold.
    pub without_headers: Box<[(Box<str>, StringMatch)]>,
    pub query_params: Box<[(Box<str>, StringMatch)]>,
    pub port: Option<u16>,
    /// Labels the calling workload must carry.
    pub source_labels: Box<[(Box<str>, Box<str>)]>,
    pub source_namespace: Option<Box<str>>,
    /// Istio's `ignoreUriCase`: the uri condition ignores ASCII case.
    pub ignore_uri_case: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    /// Gateway API `PathPrefix`: whole path segments only (`/a` matches
    /// `/a` and `/a/b`, not `/ab`).
    PathPrefix(Box<str>),
    /// Anchored: must match the whole value, as in Envoy (RE2 syntax).
    /// Shared by every match of a table with the same pattern.
    Regex(#[serde(serialize_with = "regex_source")] Arc<regex::Regex>),
    /// The header or parameter is present, whatever its value.
    Present,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's `attempts`); 0 disables retries.
    pub attempts: u32,
    #[serde(with = "opt_duration")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

impl RetryPolicy {
    /// What Istio configures when a route sets no `retries`.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                unavailable: true,
                cancelled: true,
                retriable_status_codes: vec![503],
                ..RetryOn::default()
            },
        }
    }
}

/// Envoy's `x-envoy-retry-on` / `x-envoy-retry-grpc-on` conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryOn {
    /// Any 5xx, or no response at all (reset, connect failure, timeout).
    pub server_error: bool,
    /// 502, 503, 504, or a connect failure.
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// Statuses retried as listed (Istio also accepts bare codes in `retryOn`).
    pub retriable_status_codes: Vec<u16>,
    // gRPC statuses, read from `grpc-status`.
    pub cancelled: bool,
    pub deadline_exceeded: bool,
    pub internal: bool,
    pub resource_exhausted: bool,
    pub unavailable: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(with = "duration")]
    pub fixed_delay: Duration,
    /// 0–100; Istio applies the fault to every request when unset.
    pub percentage: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub status: AbortStatus,
    pub percentage: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code (`UNAVAILABLE` → 14), sent as a trailers-only reply.
    Grpc(u32),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    pub destination: Destination,
    /// 0–100 (Istio's default when unset: 100).
    pub percentage: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOps {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }

    /// As routes hold them: `None` when there is nothing to edit.
    pub fn boxed(self) -> Option<Box<HeaderOps>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

/// Lowercase names; values as written.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderEdits {
    pub set: Box<[(Box<str>, Box<str>)]>,
    pub add: Box<[(Box<str>, Box<str>)]>,
    pub remove: Box<[Box<str>]>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathRewrite {
    /// Istio `rewrite.uri` / Gateway `ReplacePrefixMatch`: replaces the prefix
    /// that matched, or the whole path when the match was not a prefix.
    MatchedPrefix(String),
    /// Gateway `ReplaceFullPath`.
    Full(String),
    /// Istio `uriRegexRewrite`: every match of the regex is replaced
    /// (`\1`-style groups are accepted).
    Regex {
        #[serde(serialize_with = "regex_source")]
        pattern: Arc<regex::Regex>,
        rewrite: String,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    pub scheme: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    /// 301 unless set.
    pub status: u16,
}

/// One Service's DestinationRule, resolved per subset and port.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicy {
    pub origin: String,
    pub policy: TrafficPolicy,
    /// Overrides per Service port (`portLevelSettings`).
    pub ports: Vec<(u16, TrafficPolicy)>,
    pub subsets: Vec<Subset>,
}

impl DestinationPolicy {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for `port` of `subset`, each field group (tls,
    /// loadBalancer, connectionPool, outlierDetection) taken whole from the
    /// most specific level that sets it (see [`Self::levels`]).
    pub fn effective(&self, subset: Option<&str>, port: u16) -> TrafficPolicy {
        self.levels(subset, port)
            .into_iter()
            .flatten()
            .fold(TrafficPolicy::default(), |base, (policy, _)| {
                policy.clone().over(base)
            })
    }

    /// The `tls` setting for `port` of `subset`, from the most specific
    /// level that sets one, and the DestinationRule it comes from; `None`
    /// when no level sets one.
    pub fn upstream_tls(&self, subset: Option<&str>, port: u16) -> Option<UpstreamTlsDecision<'_>> {
        let levels = self.levels(subset, port);
        levels
            .into_iter()
            .rev()
            .flatten()
            .find_map(|(policy, rule)| {
                Some(UpstreamTlsDecision {
                    tls: policy.tls?,
                    rule: Some(rule),
                })
            })
    }

    /// The levels of settings that apply to `port` of `subset`, least
    /// specific first: the rule's, its `portLevelSettings` for the port, the
    /// subset's, the subset's for the port; each with the DestinationRule it
    /// comes from (a subset may be merged from another rule).
    fn levels<'a>(
        &'a self,
        subset: Option<&str>,
        port: u16,
    ) -> [Option<(&'a TrafficPolicy, &'a str)>; 4] {
        let for_port = |ports: &'a [(u16, TrafficPolicy)]| {
            ports.iter().find(|(n, _)| *n == port).map(|(_, p)| p)
        };
        let subset = subset.and_then(|s| self.subset(s));
        let rule = self.origin.as_str();
        [
            Some((&self.policy, rule)),
            for_port(&self.ports).map(|p| (p, rule)),
            subset.map(|s| (&s.policy, s.origin.as_str())),
            subset.and_then(|s| Some((for_port(&s.ports)?, s.origin.as_str()))),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// The DestinationRule that defines it, and its file.
    #[serde(skip)]
    pub origin: String,
    pub name: String,
    /// Endpoints of the Service carrying all of these labels.
    pub labels: crate::config::Labels,
    pub policy: TrafficPolicy,
    pub ports: Vec<(u16, TrafficPolicy)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// `None`: not set at this level ([`UpstreamTls::Auto`] when no level
    /// sets it).
    pub tls: Option<UpstreamTls>,
    /// `None`: the default, peak-EWMA with two random choices.
    pub load_balancer: Option<LoadBalancer>,
    /// `loadBalancer.localityLbSetting`; `None`: Istio's default (failover
    /// by locality when `outlierDetection` is set).
    pub locality: Option<locality::LocalityLb>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

impl TrafficPolicy {
    /// This policy's field groups where set, `base`'s elsewhere.
    fn over(self, base: TrafficPolicy) -> TrafficPolicy {
        // `loadBalancer` is one group: its algorithm and locality setting
        // come from the same level.
        let (load_balancer, locality) = if self.load_balancer.is_some() || self.locality.is_some() {
            (self.load_balancer, self.locality)
        } else {
            (base.load_balancer, base.locality)
        };
        TrafficPolicy {
            tls: self.tls.or(base.tls),
            load_balancer,
            locality,
            connection_pool: self.connection_pool.or(base.connection_pool),
            outlier_detection: self.outlier_detection.or(base.outlier_detection),
        }
    }
}

/// How the proxy speaks to a destination's endpoints: DestinationRule
/// `trafficPolicy.tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum UpstreamTls {
    /// No DestinationRule sets it: Istio's automatic mTLS, mutual TLS to
    /// endpoints in the mesh unless their PeerAuthentication mode is
    /// DISABLE, plaintext to endpoints outside the mesh.
    #[default]
    Auto,
    /// `ISTIO_MUTUAL`: mutual TLS with the workload's mesh identity, always.
    #[serde(rename = "ISTIO_MUTUAL")]
    IstioMutual,
    /// `DISABLE`: plaintext.
    #[serde(rename = "DISABLE")]
    Disable,
}

impl std::fmt::Display for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamTls::Auto => "auto",
            UpstreamTls::IstioMutual => "ISTIO_MUTUAL",
            UpstreamTls::Disable => "DISABLE",
        })
    }
}

/// The upstream TLS of one destination, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamTlsDecision<'a> {
    pub tls: UpstreamTls,
    /// `DestinationRule namespace/name (file)` that set it; `None`: no rule
    /// does.
    pub rule: Option<&'a str>,
}

impl std::fmt::Display for UpstreamTlsDecision<'_> {
    /// `ISTIO_MUTUAL (DestinationRule shop/web (dr.yaml))`, `auto (no DestinationRule sets tls)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rule {
            Some(rule) => write!(f, "{} ({rule})", self.tls),
            None => write!(f, "{} (no DestinationRule sets tls)", self.tls),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    RoundRobin,
    /// Fewest requests in flight of two random endpoints.
    LeastRequest,
    Random,
    ConsistentHash(HashKey),
}

/// What a consistent hash is computed from; requests without it are spread
/// at random.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    Header(String),
    Cookie(String),
    QueryParameter(String),
    SourceIp,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Connections to all endpoints of the destination, per calling workload.
    pub max_connections: Option<u32>,
    #[serde(with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// HTTP/1.1 requests that may wait for a connection; beyond it, 503 at once.
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight to the destination; beyond it, 503 at once.
    pub http2_max_requests: Option<u32>,
    /// A connection is closed after this many requests (0/None: unlimited).
    pub max_requests_per_connection: Option<u32>,
    #[serde(with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// Retries in flight to the destination.
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 0 disables. Istio's default: 5.
    pub consecutive_5xx_errors: u32,
    /// 502, 503, 504 and connect failures; 0 disables.
    pub consecutive_gateway_errors: u32,
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Ejected for this times the number of ejections so far.
    #[serde(with = "duration")]
    pub base_ejection_time: Duration,
    /// Istio's default: 10; at least one endpoint may always be ejected.
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

fn regex_source<S: serde::Serializer>(re: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
    // Stored anchored as `^(?:…)$`; show what the user wrote.
    let source = re.as_str();
    let source = source
        .strip_prefix("^(?:")
        .and_then(|r| r.strip_suffix(")$"))
        .unwrap_or(source);
    s.serialize_str(source)
}

fn lossy_bytes<S: serde::Serializer>(body: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(body))
}

/// Durations print as Istio writes them (`1.5s`).
pub mod duration {
    use std::time::Duration;

    pub fn format(d: Duration) -> String {
        format!("{}s", d.as_secs_f64())
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }
}

mod opt_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

impl std::fmt::Display for StringMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StringMatch::Exact(s) => write!(f, "={s}"),
            StringMatch::Prefix(s) => write!(f, " prefix {s}"),
            StringMatch::PathPrefix(s) => write!(f, " path-prefix {s}"),
            StringMatch::Regex(re) => {
                let source = re.as_str();
                let source = source
                    .strip_prefix("^(?:")
                    .and_then(|r| r.strip_suffix(")$"))
                    .unwrap_or(source);
                write!(f, " ~ /{source}/")
            }
            StringMatch::Present => f.write_str(" present"),
        }
    }
}

impl std::fmt::Display for RequestMatch {
    /// One line, e.g. `uri prefix /reviews, header end-user=jason`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let fields = [
            ("uri", &self.uri),
            ("scheme", &self.scheme),
            ("method", &self.method),
            ("authority", &self.authority),
        ];
        for (name, m) in fields {
            if let Some(m) = m {
                parts.push(format!("{name}{m}"));
            }
        }
        parts.extend(self.headers.iter().map(|(h, m)| format!("header {h}{m}")));
        parts.extend(
            self.without_headers
                .iter()
                .map(|(h, m)| format!("without header {h}{m}")),
        );
        parts.extend(
            self.query_params
                .iter()
                .map(|(q, m)| format!("query {q}{m}")),
        );
        if let Some(port) = self.port {
            parts.push(format!("port {port}"));
        }
        parts.extend(
            self.source_labels
                .iter()
                .map(|(k, v)| format!("source label {k}={v}")),
        );
        if let Some(ns) = &self.source_namespace {
            parts.push(format!("source namespace {ns}"));
        }
        if parts.is_empty() {
            parts.push("any request".into());
        }
        f.write_str(&parts.join(", "))
    }
}

impl std::fmt::Display for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.attempts == 0 {
            return f.write_str("no retries");
        }
        let on = &self.retry_on;
        let flags = [
            (on.server_error, "5xx"),
            (on.gateway_error, "gateway-error"),
            (on.reset, "reset"),
            (on.connect_failure, "connect-failure"),
            (on.retriable_4xx, "retriable-4xx"),
            (on.refused_stream, "refused-stream"),
            (on.cancelled, "cancelled"),
            (on.deadline_exceeded, "deadline-exceeded"),
            (on.internal, "internal"),
            (on.resource_exhausted, "resource-exhausted"),
            (on.unavailable, "unavailable"),
        ];
        let mut conditions: Vec<String> = flags
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| (*name).to_owned())
            .collect();
        conditions.extend(on.retriable_status_codes.iter().map(u16::to_string));
        write!(f, "{} retries on {}", self.attempts, conditions.join(","))?;
        if let Some(t) = self.per_try_timeout {
            write!(f, ", {} per try", duration::format(t))?;
        }
        Ok(())
    }
}
