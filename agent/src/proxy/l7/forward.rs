//! Executing one route for one request: faults, the weighted destination,
//! mirrors, then attempts under the retry policy, the per-try timeout and
//! the route's overall timeout.

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};

use super::balance::{ClusterKey, HashInput, Observation, Pick};
use super::body::{self, Body, Guarded, Replay};
use super::limits::{Admitted, Overflow};
use super::upstream::{Dial, UpstreamError, DEFAULT_IDLE_TIMEOUT};
use super::{edit, tunnel, Downstream};
use crate::config::{Config, Protocol};
use crate::routing::locality::{self, Groups};
use crate::routing::{
    AbortStatus, Destination, HttpRoute, RequestMatch, RetryOn, RetryPolicy, RouteAction,
    TrafficPolicy, WeightedDestination,
};
use crate::telemetry::flags::{mark, Flag};
use crate::telemetry::http::GRPC_STATUS;

/// Envoy's retry back-off: exponential from 25 ms, capped at ten times that,
/// with full jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// The retry policy of routes that set none, and of routes that inject
/// faults; built once, not for every request.
static ISTIO_RETRIES: LazyLock<RetryPolicy> = LazyLock::new(RetryPolicy::istio_default);
static NO_RETRIES: LazyLock<RetryPolicy> = LazyLock::new(|| RetryPolicy {
    attempts: 0,
    ..RetryPolicy::istio_default()
});

/// Hop-by-hop headers: they describe one connection and are not forwarded.
/// (`Host` is set again from the authority.) Parsed names: a `&str` would
/// be parsed again at every removal. A response keeps `upgrade` (the last),
/// which a 101 needs.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What the request matched, against one config snapshot.
pub struct Plan<'a> {
    pub config: &'a Config,
    pub service_key: &'a str,
    /// `None`: no VirtualService or HTTPRoute binds the Service; it is served
    /// by its own endpoints with Istio's default retry policy.
    pub route: Option<&'a HttpRoute>,
    pub matched: Option<&'a RequestMatch>,
    pub authority: String,
    pub grpc: bool,
    pub source_ip: Option<IpAddr>,
}

/// A destination resolved against the snapshot.
pub struct Target {
    pub key: ClusterKey,
    pub endpoints: Vec<SocketAddr>,
    pub policy: TrafficPolicy,
}

pub fn resolve(config: &Config, dest: &Destination, port: u16, ipv4: bool) -> Option<Target> {
    let service = config.service_by_key(&dest.service)?;
    let port = dest.port.unwrap_or(port);
    let target_port = service.port(port, Protocol::Tcp)?.target_port;
    let rule = config.routing().policy(&dest.service);
    let labels = match &dest.subset {
        Some(subset) => Some(&rule?.subset(subset)?.labels),
        None => None,
    };
    let endpoints = config
        .endpoints(service)
        .filter(|w| labels.is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        .filter_map(|w| {
            let ip = w.addresses.iter().find(|ip| ip.is_ipv4() == ipv4);
            ip.or(w.addresses.first())
                .map(|&ip| SocketAddr::new(ip, target_port))
        })
        .collect();
    Some(Target {
        key: ClusterKey {
            service: dest.service.clone(),
            subset: dest.subset.clone(),
            port,
        },
        endpoints,
        policy: rule
            .map(|r| r.effective(dest.subset.as_deref(), port))
            .unwrap_or_default(),
    })
}

/// One of `destinations`, each with the chance of its weight.
pub fn pick_weighted(destinations: &[WeightedDestination]) -> Option<&WeightedDestination> {
    let total: u32 = destinations.iter().map(|d| d.weight).sum();
    let mut roll = fastrand::u32(..total.max(1));
    destinations
        .iter()
        .find(|d| {
            let found = roll < d.weight;
            roll = roll.saturating_sub(d.weight);
            found
        })
        .or(destinations.first())
}

/// True for `percentage` percent of calls.
fn hit(percentage: f64) -> bool {
    fastrand::f64() * 100.0 < percentage
}

/// `upstream`: set to the endpoint that answered, if one did.
pub async fn run(
    down: &Downstream,
    plan: Plan<'_>,
    request: Request<Body>,
    upstream: &mut Option<SocketAddr>,
) -> Response<Body> {
    let fault = plan.route.and_then(|r| r.fault.as_ref());
    let delay = fault
        .and_then(|f| f.delay.as_ref())
        .filter(|d| hit(d.percentage));
    if let Some(delay) = delay {
        tokio::time::sleep(delay.fixed_delay).await;
    }
    let abort = fault
        .and_then(|f| f.abort.as_ref())
        .filter(|a| hit(a.percentage));
    let response = match abort {
        Some(abort) => {
            let reply = match abort.status {
                AbortStatus::Http(code) => body::local_reply(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "fault filter abort",
                    false,
                ),
                AbortStatus::Grpc(code) => body::grpc_reply(code, "fault filter abort"),
            };
            mark(reply, Flag::FaultInjected)
        }
        None => forward(down, plan, request, upstream).await,
    };
    match delay {
        Some(_) => mark(response, Flag::DelayInjected),
        None => response,
    }
}

/// The request after faults: to its destination, under the route's policy.
async fn forward(
    down: &Downstream,
    plan: Plan<'_>,
    request: Request<Body>,
    upstream: &mut Option<SocketAddr>,
) -> Response<Body> {
    let route = plan.route;
    // The client's own bytes (hyper parses them into shared buffers): every
    // attempt's URI refers to them instead of copying them.
    let path_and_query = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let own;
    let (destination, destination_headers) = match route.map(|r| &r.action) {
        None => {
            own = Destination {
                service: plan.service_key.into(),
                subset: None,
                port: None,
            };
            (&own, None)
        }
        Some(RouteAction::Redirect(redirect)) => {
            return edit::redirect(
                redirect,
                &plan.authority,
                path_and_query.as_str(),
                plan.matched,
            )
        }
        Some(RouteAction::DirectResponse { status, body }) => {
            let mut reply = Response::new(body::full(body.clone()));
            *reply.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            return reply;
        }
        Some(RouteAction::Forward(destinations)) => match pick_weighted(destinations) {
            Some(d) => (&d.destination, d.headers.as_deref()),
            None => {
                return body::local_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "route has no destination",
                    plan.grpc,
                )
            }
        },
    };
    let port = down.service_addr.port();
    let ipv4 = down.service_addr.is_ipv4();
    let Some(target) = resolve(plan.config, destination, port, ipv4) else {
        return no_healthy_upstream(plan.grpc);
    };
    if tunnel::is_upgrade(&request) {
        // Boxed: an upgrade's state would otherwise enlarge every request's.
        return Box::pin(tunnel::run(down, &target, request)).await;
    }

    let (parts, incoming) = request.into_parts();
    let mut head = Head {
        method: parts.method,
        path_and_query,
        authority: plan.authority,
        host: None,
        headers: parts.headers,
        http2: down.http2,
    };
    let client_host = head.headers.remove(header::HOST);
    for name in &HOP_BY_HOP {
        head.headers.remove(name);
    }
    let edits = [
        route.and_then(|r| r.headers.as_deref()),
        destination_headers,
    ];
    for ops in edits.iter().flatten() {
        edit::apply(&mut head.headers, &ops.request);
    }
    if let Some(rewrite) = route.and_then(|r| r.rewrite.as_ref()) {
        if let Some(path) = &rewrite.path {
            let rewritten = edit::rewrite_path(path, head.path_and_query.as_str(), plan.matched);
            head.path_and_query = PathAndQuery::from_maybe_shared(Bytes::from(rewritten))
                .unwrap_or_else(|_| PathAndQuery::from_static("/"));
        }
        if let Some(authority) = &rewrite.authority {
            head.authority = authority.clone();
        }
    }
    head.set_host(client_host);
    let replay = Replay::new(incoming);

    if let Some(route) = route.filter(|r| !r.mirrors.is_empty()) {
        replay.prefetch_if_small().await;
        for mirror in route.mirrors.iter().filter(|m| hit(m.percentage)) {
            let (Some((bytes, trailers)), Some(target)) = (
                replay.complete_copy(),
                resolve(plan.config, &mirror.destination, port, ipv4),
            ) else {
                continue;
            };
            let mut copy = head.clone();
            copy.authority = shadow(&copy.authority);
            copy.set_host(None);
            let request = copy.request(body::with_trailers(bytes, trailers));
            tokio::spawn(send_mirror(
                down.attempts(plan.config, target),
                request,
                plan.source_ip,
            ));
        }
    }

    // Istio turns timeouts and retries off on routes that inject faults.
    let (timeout, retries) = match route {
        Some(r) if r.fault.is_some() => (None, &*NO_RETRIES),
        Some(r) => (r.timeout, r.retries.as_deref().unwrap_or(&ISTIO_RETRIES)),
        None => (None, &*ISTIO_RETRIES),
    };
    let attempts = down.attempts(plan.config, target);
    let hash = HashInput {
        headers: &head.headers,
        query: head.path_and_query.query(),
        source_ip: plan.source_ip,
    };
    let tries = attempts.run(&head, &replay, retries, &hash, plan.grpc, upstream);
    let mut response = match timeout {
        Some(limit) => tokio::time::timeout(limit, tries)
            .await
            .unwrap_or_else(|_| {
                let reply = body::local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    plan.grpc,
                );
                mark(reply, Flag::UpstreamRequestTimeout)
            }),
        None => tries.await,
    };
    for name in &HOP_BY_HOP[..4] {
        response.headers_mut().remove(name);
    }
    for ops in edits.iter().flatten() {
        edit::apply(response.headers_mut(), &ops.response);
    }
    response
}

/// `reviews:9080` → `reviews-shadow:9080`, as Envoy marks mirrored requests.
fn shadow(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

async fn send_mirror(attempts: Attempts, request: Request<Body>, source_ip: Option<IpAddr>) {
    let headers = HeaderMap::new();
    let hash = HashInput {
        headers: &headers,
        query: None,
        source_ip,
    };
    let Some(pick) = attempts.pick(&[], &hash) else {
        return;
    };
    let dial = attempts.dial(pick.addr);
    // A mirror's answer teaches the balancer nothing: its latency is unused.
    let mut opening = Duration::ZERO;
    let pool = &attempts.pod.pool;
    if let Ok(response) = pool
        .send(&attempts.proxy, &attempts.pod, dial, request, &mut opening)
        .await
    {
        use http_body_util::BodyExt;
        // Read to the end so the connection goes back to the pool.
        let _ = response.into_body().collect().await;
    }
}

/// The upstream request, built again for every attempt.
#[derive(Clone)]
pub struct Head {
    method: Method,
    path_and_query: PathAndQuery,
    authority: String,
    /// HTTP/1 only: the `Host` of every attempt.
    host: Option<HeaderValue>,
    headers: HeaderMap,
    http2: bool,
}

impl Head {
    /// For HTTP/1, the `Host` naming the authority: the client's `host`
    /// when it does (shared, so attempts do not copy it), else a new one.
    fn set_host(&mut self, host: Option<HeaderValue>) {
        if self.http2 {
            return;
        }
        self.host = match host {
            Some(host) if host.as_bytes() == self.authority.as_bytes() => Some(host),
            _ => HeaderValue::from_str(&self.authority).ok(),
        };
    }

    fn request(&self, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.headers_mut() = self.headers.clone();
        if self.http2 {
            *request.version_mut() = Version::HTTP_2;
            // `Uri::try_from(String)` takes the string's buffer: no second copy.
            let uri = format!("http://{}{}", self.authority, self.path_and_query);
            *request.uri_mut() = http::Uri::try_from(uri).unwrap_or_default();
        } else {
            if let Some(host) = &self.host {
                request.headers_mut().insert(header::HOST, host.clone());
            }
            *request.uri_mut() = http::Uri::from(self.path_and_query.clone());
        }
        request
    }
}

/// Everything attempts to one destination need, owned so mirrors can run
/// in their own task.
pub struct Attempts {
    proxy: std::sync::Arc<crate::proxy::Proxy>,
    pod: std::sync::Arc<crate::proxy::Pod>,
    cluster: std::sync::Arc<super::balance::Cluster>,
    target: Target,
    /// The endpoints by locality, when locality load balancing applies.
    groups: Option<std::sync::Arc<Groups>>,
    connect_timeout: Duration,
}

impl Downstream {
    fn attempts(&self, config: &Config, target: Target) -> Attempts {
        let pool = target.policy.connection_pool.clone().unwrap_or_default();
        let cluster = self.proxy.clusters.get(&target.key);
        let ipv4 = self.service_addr.is_ipv4();
        let groups = cluster.groups(config.generation(), ipv4, || {
            locality::of_endpoints(config, &self.proxy.node, &target.policy, &target.endpoints)
        });
        Attempts {
            proxy: self.proxy.clone(),
            pod: self.pod.clone(),
            cluster,
            groups,
            connect_timeout: pool
                .connect_timeout
                .unwrap_or(self.proxy.settings.connect_timeout),
            target,
        }
    }
}

impl Attempts {
    fn pick(&self, tried: &[SocketAddr], hash: &HashInput<'_>) -> Option<Pick> {
        self.cluster.pick_grouped(
            self.groups.as_deref(),
            &self.target.endpoints,
            tried,
            self.target.policy.load_balancer.as_ref(),
            hash,
        )
    }

    fn dial(&self, addr: SocketAddr) -> Dial {
        let pool = self.target.policy.connection_pool.as_ref();
        Dial {
            addr,
            tls: self.target.policy.tls.unwrap_or_default(),
            http2: false,
            connect_timeout: self.connect_timeout,
            idle_timeout: pool
                .and_then(|p| p.idle_timeout)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT),
            max_requests_per_connection: pool
                .and_then(|p| p.max_requests_per_connection)
                .unwrap_or(0),
        }
    }

    /// Tries the request until an answer that the policy does not retry,
    /// or until the attempts (or a replayable body) run out.
    async fn run(
        &self,
        head: &Head,
        replay: &Replay,
        policy: &RetryPolicy,
        hash: &HashInput<'_>,
        grpc: bool,
        upstream: &mut Option<SocketAddr>,
    ) -> Response<Body> {
        let default_pool = Default::default();
        let pool_settings = self
            .target
            .policy
            .connection_pool
            .as_ref()
            .unwrap_or(&default_pool);
        let limits = self.pod.limits.get(&self.target.key, pool_settings);
        let outlier = self.target.policy.outlier_detection.as_ref();
        let mut tried = Vec::new();
        let mut last = None;
        let mut attempt = 0;
        let mut stale_retried = false;
        while attempt <= policy.attempts {
            if attempt > 0 {
                let cap = (BACKOFF_BASE * 2u32.pow(attempt.min(4) - 1)).min(BACKOFF_BASE * 10);
                tokio::time::sleep(cap.mul_f64(fastrand::f64())).await;
            }
            let Some(body) = replay.attempt() else {
                if replay.failed() {
                    return incomplete_body(grpc);
                }
                break;
            };
            let Some(mut pick) = self.pick(&tried, hash) else {
                break;
            };
            let admitted = match limits.admit(!head.http2).await {
                Ok(admitted) => admitted,
                Err(Overflow) => return body::overloaded(grpc),
            };
            let mut dial = self.dial(pick.addr);
            dial.http2 = head.http2;
            let mut opening = Duration::ZERO;
            let sent = self.pod.pool.send(
                &self.proxy,
                &self.pod,
                dial,
                head.request(body),
                &mut opening,
            );
            let result = match policy.per_try_timeout {
                Some(limit) => tokio::time::timeout(limit, sent).await.ok(),
                None => Some(sent.await),
            };
            pick.set_aside(opening);
            if let Some(Err(UpstreamError::Stale(_))) = &result {
                // The endpoint closed an idle connection under us: try again
                // on a fresh one, without counting it against the endpoint.
                if !stale_retried {
                    stale_retried = true;
                    continue;
                }
            }
            if let Some(Err(UpstreamError::NoDescriptor(_))) = &result {
                // The caller is at its descriptor share: shed the request,
                // and do not let a tenant at its limit get endpoints ejected
                // for every other caller.
                return body::overloaded(grpc);
            }
            if replay.failed() {
                // The client's fault, not the endpoint's: no retry, and
                // nothing for outlier detection to learn.
                return incomplete_body(grpc);
            }
            let outcome = Outcome::of(result, &policy.retry_on, grpc);
            self.cluster.observe(
                &pick,
                outcome.observation,
                outlier,
                self.target.endpoints.len(),
            );
            let last_try = attempt == policy.attempts;
            match outcome.response {
                Ok(response) if !outcome.retriable || last_try => {
                    *upstream = Some(pick.addr);
                    return response.map(|b| Guarded::wrap(b, (admitted, pick), release));
                }
                Err(mut reply) if !outcome.retriable || last_try => {
                    *upstream = Some(pick.addr);
                    if outcome.retriable && attempt > 0 {
                        reply = mark(reply, Flag::UpstreamRetryLimitExceeded);
                    }
                    return reply;
                }
                Ok(response) => last = Some(response),
                Err(reply) => last = Some(reply),
            }
            tried.push(pick.addr);
            attempt += 1;
        }
        last.unwrap_or_else(|| no_healthy_upstream(grpc))
    }
}

fn no_healthy_upstream(grpc: bool) -> Response<Body> {
    let reply = body::local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", grpc);
    mark(reply, Flag::NoHealthyUpstream)
}

fn release(_: (Admitted, Pick)) {}

/// The client's request body failed before its end: a malformed chunk gets
/// this answer; a client that reset never sees it.
fn incomplete_body(grpc: bool) -> Response<Body> {
    body::local_reply(
        StatusCode::BAD_REQUEST,
        "the request body was malformed or cut short",
        grpc,
    )
}

/// One attempt, classified.
struct Outcome {
    observation: Observation,
    retriable: bool,
    /// The endpoint's answer, or the proxy's reply when there was none.
    response: Result<Response<Body>, Response<Body>>,
}

impl Outcome {
    /// `result` is `None` when the per-try timeout fired.
    fn of(
        result: Option<Result<Response<Body>, UpstreamError>>,
        on: &RetryOn,
        grpc: bool,
    ) -> Outcome {
        let failed = |retriable: bool, status: StatusCode, reason: &str, flag| Outcome {
            observation: Observation::Failure,
            retriable,
            response: Err(mark(body::local_reply(status, reason, grpc), flag)),
        };
        match result {
            None => failed(
                on.server_error || on.gateway_error || on.reset,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout",
                Flag::UpstreamRequestTimeout,
            ),
            Some(Err(UpstreamError::Connect(_) | UpstreamError::NoDescriptor(_))) => failed(
                on.connect_failure || on.server_error || on.gateway_error,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                Flag::UpstreamConnectionFailure,
            ),
            Some(Err(UpstreamError::Reset(_) | UpstreamError::Stale(_))) => failed(
                on.reset || on.server_error || on.refused_stream,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                Flag::UpstreamConnectionTermination,
            ),
            Some(Ok(response)) => {
                let status = response.status().as_u16();
                let grpc_status = response
                    .headers()
                    .get(GRPC_STATUS)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u32>().ok());
                Outcome {
                    observation: Observation::Status(status),
                    retriable: retries_status(on, status)
                        || grpc_status.is_some_and(|code| retries_grpc(on, code)),
                    response: Ok(response),
                }
            }
        }
    }
}

fn retries_status(on: &RetryOn, status: u16) -> bool {
    (on.server_error && status >= 500)
        || (on.gateway_error && matches!(status, 502..=504))
        || (on.retriable_4xx && status == 409)
        || on.retriable_status_codes.contains(&status)
}

fn retries_grpc(on: &RetryOn, code: u32) -> bool {
    match code {
        1 => on.cancelled,
        4 => on.deadline_exceeded,
        8 => on.resource_exhausted,
        13 => on.internal,
        14 => on.unavailable,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host_keeps_the_port() {
        assert_eq!(shadow("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow("reviews"), "reviews-shadow");
    }

    #[test]
    fn attempts_keep_the_client_host_and_target_and_a_new_authority_gets_its_own_host() {
        let mut head = Head {
            method: Method::GET,
            path_and_query: PathAndQuery::from_static("/reviews/1?x=2"),
            authority: "reviews:9080".into(),
            host: None,
            headers: HeaderMap::new(),
            http2: false,
        };
        head.set_host(Some(HeaderValue::from_static("reviews:9080")));
        for _ in 0..2 {
            let request = head.request(body::empty());
            assert_eq!(request.uri(), "/reviews/1?x=2");
            assert_eq!(request.headers()[header::HOST], "reviews:9080");
        }
        // A rewritten authority (or a mirror's) is not the client's Host.
        head.authority = shadow(&head.authority);
        head.set_host(Some(HeaderValue::from_static("reviews:9080")));
        assert_eq!(
            head.request(body::empty()).headers()[header::HOST],
            "reviews-shadow:9080"
        );
        head.http2 = true;
        head.host = None;
        head.set_host(None);
        let request = head.request(body::empty());
        assert_eq!(request.uri(), "http://reviews-shadow:9080/reviews/1?x=2");
        assert!(!request.headers().contains_key(header::HOST));
    }

    #[test]
    fn istio_default_retries_503_and_connect_failures_only() {
        let on = RetryPolicy::istio_default().retry_on;
        assert!(retries_status(&on, 503));
        assert!(!retries_status(&on, 500));
        assert!(retries_grpc(&on, 14));
        assert!(!retries_grpc(&on, 13));
    }
}
