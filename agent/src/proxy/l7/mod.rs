//! The L7 path: HTTP/1.1 and HTTP/2 (h2c, gRPC) connections a workload opens
//! to a Service are terminated here, and every request is routed on its own
//! by the Service's VirtualService, HTTPRoute and DestinationRule.
//!
//! - `forward`: route execution (faults, weighted destinations, retries,
//!   timeouts, mirrors).
//! - `edit`: header edits, rewrites, redirects.
//! - `balance`: endpoint choice and outlier detection.
//! - `limits`: `connectionPool` circuit breakers.
//! - `upstream`: connections to endpoints, pooled per workload.
//! - `body`: replayable request bodies and local replies.
//! - `inbound`: HTTP at the destination, with the caller's identity in
//!   `X-Forwarded-Client-Cert`.
//! - `trace`: the client and server spans of sampled requests.
//! - `gateway`: requests from outside the mesh arriving at the ingress.

mod balance;
mod body;
mod edit;
mod forward;
mod gateway;
pub mod inbound;
pub mod inspect;
mod inspect_gateway;
mod limits;
mod path;
mod trace;
mod tunnel;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

pub use balance::Clusters;
pub use body::Body;
pub(super) use forward::{pick_weighted, resolve};
pub use inspect::ExplainRequest;
use limits::InFlightRequest;
pub use limits::{InFlight, WorkloadLimits};
pub use tunnel::HandBack;
pub use upstream::Pool;

use super::idle::{Activity, Tracked};
use super::{Pod, Proxy};
use crate::lifecycle::drain::{until_drained, IDLE_GRACE};
use crate::routing::ingress::ServerRef;
use crate::routing::RequestInfo;
use crate::telemetry::flags::mark;
use crate::telemetry::http::{Measured, RouteName};
use crate::telemetry::{EdgeKey, Flag, Mode, Reporter};
use body::BoxError;

/// Per-stream and per-connection flow-control windows offered to HTTP/2
/// clients: what a client may send ahead of the proxy forwarding it, so the
/// most a stalled stream or connection can make the proxy buffer.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Response bytes queued per HTTP/2 stream beyond the client's window.
const H2_SEND_BUFFER: usize = 64 * 1024;
/// Largest HTTP/1 read buffer, so the largest request head (Envoy's default
/// limit is 60 KiB of headers).
const H1_READ_BUFFER: usize = 64 * 1024;

/// How the proxy bounds the HTTP connections tenants open to it.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// From the start of a connection, or the end of the previous request,
    /// until a request's head is complete (slowloris, idle keep-alive).
    pub header_read_timeout: Duration,
    /// Nothing moving on a connection in either direction this long.
    pub idle_timeout: Duration,
    /// Streams one HTTP/2 connection may have open.
    pub max_concurrent_streams: u32,
    /// Requests one workload may have in flight over all its connections.
    pub max_requests_per_workload: u32,
}

/// How a downstream connection entered the proxy: the only difference is
/// how its requests pick their routes.
#[derive(Clone)]
pub enum Entry {
    /// A workload dialled the Service at `service_addr`.
    Workload,
    /// A client outside the mesh reached the ingress at `service_addr` (the
    /// node's address and a Gateway port) from `client`; over TLS, the
    /// server its handshake chose, whose routes alone apply.
    Gateway {
        client: SocketAddr,
        tls: Option<GatewayTls>,
    },
}

/// The TLS step of a connection at the ingress.
#[derive(Clone)]
pub struct GatewayTls {
    /// The server its handshake chose, whose routes alone apply.
    pub server: Arc<ServerRef>,
    /// The `X-Forwarded-Client-Cert` element for the client's certificate,
    /// if it presented one.
    pub client_cert: Option<HeaderValue>,
}

/// One downstream connection: who opened it and which Service it dialled.
struct Downstream {
    proxy: Arc<Proxy>,
    /// The calling workload, or the ingress's own identity.
    pod: Arc<Pod>,
    /// The Service address the workload connected to.
    service_addr: SocketAddr,
    entry: Entry,
    http2: bool,
    /// Bytes moving on the connection, and on the tunnel it may become.
    activity: Activity,
    /// Where a tunnel between two sockets goes once the protocol switched
    /// (to be relayed, and carried at a hand-over, by the connection's
    /// task); taken by the tunnel.
    upgraded: std::sync::Mutex<Option<HandBack>>,
}

/// Serves HTTP on a connection whose protocol detection said `http2` or not;
/// a tunnel it becomes between two sockets goes to `upgraded`.
pub async fn serve<S>(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    stream: S,
    (service_addr, entry): (SocketAddr, Entry),
    http2: bool,
    upgraded: Option<HandBack>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = TokioIo::new(Tracked::new(stream, activity.clone()));
    let downstream = Arc::new(Downstream {
        proxy,
        pod,
        service_addr,
        entry,
        http2,
        activity: activity.clone(),
        upgraded: std::sync::Mutex::new(upgraded),
    });
    let settings = downstream.proxy.settings.http;
    let served_here = downstream.clone();
    let drain = downstream.proxy.drain.watch();
    let draining = downstream.proxy.drain.draining();
    // HTTP/2 only: an HTTP/1 connection idle between requests is closed
    // by the header-read timeout first.
    let open = http2.then(InFlight::default);
    let requests = open.clone();
    let service = service_fn(move |request| {
        let (downstream, draining) = (downstream.clone(), draining.clone());
        let entered = requests.as_ref().map(InFlight::enter);
        // Boxed: hyper spawns every HTTP/2 request's future as a task, and
        // tokio moves a future by value several times on its way into one;
        // a request's routing state is kilobytes, a box is a pointer.
        Box::pin(async move {
            let mut response = downstream.handle(request).await;
            if !http2 {
                draining.close_after(&mut response);
            }
            Ok::<_, Infallible>(open_until_answered(response, entered))
        })
    });
    let serving = async {
        if http2 {
            let conn = http2_server(&settings).serve_connection(io, service);
            until_drained(conn, drain, Duration::ZERO, |c| c.graceful_shutdown()).await
        } else {
            let conn = http1_server(&settings)
                .serve_connection(io, service)
                .with_upgrades();
            until_drained(conn, drain, IDLE_GRACE, |c| c.graceful_shutdown()).await
        }
    };
    let served = activity.unless_idle(settings.idle_timeout, serving).await;
    // Not upgraded: nothing comes back (tasks may hold the connection's
    // state a little longer).
    drop(lock(&served_here.upgraded).take());
    let Some(served) = served else {
        return idle_close(open.as_ref(), &settings);
    };
    served.or_else(|e| closed_by(e, &activity, &settings))
}

/// A response that keeps its request counted in its connection's `open`
/// requests until its body ends or is dropped.
fn open_until_answered(
    response: Response<Body>,
    entered: Option<InFlightRequest>,
) -> Response<Body> {
    match entered {
        Some(entered) => response.map(|b| body::Guarded::wrap(b, entered, drop)),
        None => response,
    }
}

/// How a connection closed by the idle timeout is recorded, given the
/// requests `open` on it if they are counted: an HTTP/2 connection with
/// no request open lost nothing (clients keep them idle
/// for long, gRPC's especially) and is closed cleanly; anything else (a
/// stalled stream or upload, an HTTP/1 request or tunnel) failed.
fn idle_close(open: Option<&InFlight>, settings: &HttpSettings) -> Result<(), String> {
    match open {
        Some(open) if open.count() == 0 => Ok(()),
        _ => Err(format!("idle for {:?}", settings.idle_timeout)),
    }
}

/// How a connection hyper ended with `e` is recorded. A keep-alive
/// connection left idle past the header-read timeout ends with hyper's
/// timeout error but lost nothing: it is closed cleanly, as a server
/// closes its idle keep-alive connections. A request head cut off by the
/// timeout (a slowloris) is a failure. (A connection silent from its start
/// never gets here: it is refused before, as `no request within`.)
fn closed_by(e: hyper::Error, activity: &Activity, settings: &HttpSettings) -> Result<(), String> {
    if e.is_timeout() && activity.quiet_for(settings.header_read_timeout) {
        Ok(())
    } else {
        Err(e.to_string())
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The HTTP/2 server every downstream connection gets.
fn http2_server(settings: &HttpSettings) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER);
    builder
}

/// The HTTP/1 server every downstream connection gets (public for the
/// fuzz target of the head parser).
pub fn http1_server(settings: &HttpSettings) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(H1_READ_BUFFER);
    builder
}

pub(super) fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Methods are upper-case tokens (RFC 9110's and every registered one).
fn is_canonical_method(method: &http::Method) -> bool {
    method
        .as_str()
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

/// The request's authority: `:authority` in HTTP/2, `Host` in HTTP/1.1.
fn authority<B>(request: &Request<B>) -> String {
    request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

impl Downstream {
    /// Serves one request, measured for Istio's metrics and access logs
    /// (reporter `source`) until its response ends.
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let grpc = is_grpc(&request);
        let (mut parts, incoming) = request.into_parts();
        let telemetry = &self.proxy.telemetry;
        let side = telemetry.side(&self.pod.key, Mode::Client);
        let span = trace::client(&self.proxy, &self.pod, &side, self.service_addr, &mut parts);
        let (measured, counted) = Measured::start(telemetry, &side, grpc, &parts, incoming);
        let request = Request::from_parts(parts, counted.map_err(BoxError::from).boxed_unsync());
        let mut upstream = None;
        let answered = self.admit(request, grpc, measured.logged(), &mut upstream);
        let response = trace::answer(span, answered.await);
        let service = self.service_addr;
        let edge = EdgeKey {
            reporter: Reporter::Source,
            source: Some(self.pod.address_for(service.ip())),
            destination: upstream.unwrap_or(service),
            service: Some(service),
            mutual_tls: false,
        };
        measured
            .finish(edge, upstream, response)
            .map(BodyExt::boxed_unsync)
    }

    /// `named`: the response gets the name of the route taken; `upstream`:
    /// set to the endpoint that answered (a return value would have to pass
    /// every local reply on the way).
    async fn admit(
        &self,
        request: Request<Body>,
        grpc: bool,
        named: bool,
        upstream: &mut Option<SocketAddr>,
    ) -> Response<Body> {
        if !is_canonical_method(request.method()) {
            // `get` is a different method from `GET` to a policy, but some
            // servers treat them alike: refuse it rather than let it past
            // method-based rules (Envoy's parser refuses it too).
            return body::local_reply(StatusCode::BAD_REQUEST, "invalid method", grpc);
        }
        let max = self.proxy.settings.http.max_requests_per_workload;
        let Some(admitted) = self.pod.in_flight.try_enter(max) else {
            let mut reply = body::overloaded(grpc);
            if self.http2 {
                // Headers only, so the stream ends at once even when the
                // client's window is zero: a refused stream holds nothing.
                *reply.body_mut() = body::empty();
            }
            return reply;
        };
        self.route(request, grpc, named, upstream)
            .await
            .map(|b| body::Guarded::wrap(b, admitted, drop))
    }

    async fn route(
        &self,
        mut request: Request<Body>,
        grpc: bool,
        named: bool,
        upstream: &mut Option<SocketAddr>,
    ) -> Response<Body> {
        let config = self.proxy.config.current();
        if let Entry::Gateway { client, tls } = &self.entry {
            gateway::forwarded(request.headers_mut(), *client, tls.is_some());
            // Envoy's SANITIZE_SET: what the client sent never passes.
            let client_cert = tls.as_ref().and_then(|t| t.client_cert.as_ref());
            inbound::set_client_cert(request.headers_mut(), client_cert);
        }
        let authority = authority(&request);
        let source = match self.entry {
            Entry::Workload => config.workload_by_key(&self.pod.key),
            Entry::Gateway { .. } => None,
        };
        let no_labels = Default::default();
        let info = RequestInfo {
            method: request.method().as_str(),
            path: request.uri().path(),
            query: request.uri().query(),
            scheme: match &self.entry {
                Entry::Gateway { tls: Some(_), .. } => "https",
                _ => "http",
            },
            authority: &authority,
            headers: request.headers(),
            port: self.service_addr.port(),
            source_namespace: source.map_or("", |w| w.namespace.as_str()),
            source_labels: source.map_or(&no_labels, |w| &w.labels),
        };
        let chosen = match &self.entry {
            Entry::Workload => self.service_route(&config, &info),
            Entry::Gateway { tls, .. } => {
                let server = tls.as_ref().map(|t| &*t.server);
                gateway::route(&config, &self.proxy.node, &info, server)
            }
        };
        let (service_key, selected) = match chosen {
            Ok(chosen) => chosen,
            Err(NoRoute {
                redirect: Some(location),
                ..
            }) => return gateway::redirect(&location),
            Err(reason) => {
                let status = match reason.gone {
                    true => StatusCode::SERVICE_UNAVAILABLE,
                    false => StatusCode::NOT_FOUND,
                };
                let reply = body::local_reply(status, &reason.message, grpc);
                return mark(reply, Flag::NoRouteFound);
            }
        };
        let route_name = selected
            .filter(|_| named)
            .map(|(route, _)| RouteName(route.name.clone()));
        let plan = forward::Plan {
            config: &config,
            service_key: &service_key,
            route: selected.map(|(route, _)| route),
            matched: selected.and_then(|(route, i)| i.map(|i| &route.matches[i])),
            authority,
            grpc,
            source_ip: match self.entry {
                Entry::Workload => source.and_then(|w| w.addresses.first().copied()),
                Entry::Gateway { client, .. } => Some(client.ip()),
            },
        };
        let mut response = forward::run(self, plan, request, upstream).await;
        if let Some(name) = route_name {
            response.extensions_mut().insert(name);
        }
        response
    }
}

/// Why a request has no route: it is answered 404, or 503 when the Service
/// it was sent to is `gone`.
pub(super) struct NoRoute {
    gone: bool,
    message: String,
    /// Answer 301 to this URL instead (a Gateway server's `httpsRedirect`).
    redirect: Option<String>,
}

impl NoRoute {
    fn not_found(message: String) -> NoRoute {
        NoRoute {
            gone: false,
            message,
            redirect: None,
        }
    }
}

/// The Service a request is for (`namespace/name`), and the route it takes
/// (`None`: no object routes the Service) with its matching block.
type Chosen<'c> = (
    String,
    Option<(&'c crate::routing::HttpRoute, Option<usize>)>,
);

impl Downstream {
    /// The route of the Service the workload dialled.
    fn service_route<'c>(
        &self,
        config: &'c crate::config::Config,
        info: &RequestInfo<'_>,
    ) -> Result<Chosen<'c>, NoRoute> {
        let Some(service) = config.service_by_cluster_ip(self.service_addr.ip()) else {
            return Err(NoRoute {
                gone: true,
                message: "the Service this connection was opened to no longer exists".into(),
                redirect: None,
            });
        };
        let service_key = service.key();
        let selected = match config.routing().host(&service_key) {
            None => None,
            Some(host) => match host.select(info) {
                Some(found) => Some(found),
                None => {
                    let message = format!("no route of {} matches this request", host.origin);
                    return Err(NoRoute::not_found(message));
                }
            },
        };
        Ok((service_key, selected))
    }
}
