//! HTTP at the destination: every request on a delivered connection is
//! judged by AuthorizationPolicy (a denied one gets Envoy's `403 RBAC:
//! access denied`, or gRPC `PERMISSION_DENIED`, and never reaches the
//! application), and gets `X-Forwarded-Client-Cert` set from the
//! authenticated caller, in Envoy's format (`By=<workload>;URI=<caller>`),
//! any copy the caller sent removed, so an application can trust the header
//! (plaintext callers reach it with none). The ingress alone keeps what it
//! set for an outside client's certificate, this element appended. One connection to the
//! application per inbound connection: it carries the caller's address, so
//! it is never shared.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::body::{self, Body, BoxError};
use super::{closed_by, http1_server, http2_server, idle_close, is_grpc, lock, path, trace};
use super::{open_until_answered, InFlight};
use crate::identity::{self, SpiffeId};
use crate::lifecycle::drain::{until_drained, IDLE_GRACE};
use crate::proxy::authorize;
use crate::proxy::idle::{Activity, Tracked};
use crate::proxy::inbound::{Caller, Io};
use crate::proxy::peer::{Charged, Prefixed};
use crate::proxy::{Pod, Proxy};
use crate::security::authorization::{HttpRequest, HttpView};
use crate::telemetry::flags::{mark, Flag};
use crate::telemetry::http::Measured;
use crate::telemetry::trace::ActiveSpan;
use crate::telemetry::{EdgeKey, Mode, Reporter};
use crate::transport::Tunnel;

pub const XFCC: &str = "x-forwarded-client-cert";

/// How a connection's requests get the header.
enum ClientCert {
    /// Whatever the caller sent is replaced by this (`None`: removed), so
    /// no tenant can forge it.
    Replace(Option<HeaderValue>),
    /// The ingress's identity: the elements it set for the outside client's
    /// certificate stay, this one is appended (Envoy's `APPEND_FORWARD`, as
    /// an Istio sidecar behind an Istio gateway).
    Append(HeaderValue),
}

/// The header for calls from `caller` to `pod`, when the caller has an
/// identity; made once per connection, as both ends are the connection's.
fn client_cert(pod: &Pod, caller: Option<&SpiffeId>, ingress: &SpiffeId) -> ClientCert {
    let own = caller
        .and_then(|peer| HeaderValue::try_from(format!("By={};URI={peer}", pod.identity)).ok());
    match own {
        Some(own) if caller == Some(ingress) => ClientCert::Append(own),
        own => ClientCert::Replace(own),
    }
}

/// Removes the header a caller may have sent, and sets `value`, if any.
pub(super) fn set_client_cert(headers: &mut http::HeaderMap, value: Option<&HeaderValue>) {
    headers.remove(XFCC);
    if let Some(value) = value {
        headers.insert(XFCC, value.clone());
    }
}

impl ClientCert {
    fn apply(&self, headers: &mut http::HeaderMap) {
        let own = match self {
            ClientCert::Replace(value) => return set_client_cert(headers, value.as_ref()),
            ClientCert::Append(own) => own,
        };
        let mut joined = Vec::new();
        for before in headers.get_all(XFCC) {
            joined.extend_from_slice(before.as_bytes());
            joined.push(b',');
        }
        joined.extend_from_slice(own.as_bytes());
        let value = HeaderValue::from_bytes(&joined).unwrap_or_else(|_| own.clone());
        headers.insert(XFCC, value);
    }
}

/// Envoy's answer to a request that AuthorizationPolicy denies, word for
/// word, so that runbooks still match.
const ACCESS_DENIED: &str = "RBAC: access denied";

fn access_denied(grpc: bool) -> Response<Body> {
    if grpc {
        return body::grpc_reply(7, ACCESS_DENIED);
    }
    let mut response = Response::new(body::full(ACCESS_DENIED));
    *response.status_mut() = StatusCode::FORBIDDEN;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

/// Normalizes the path the application will get, sets XFCC, and judges the
/// request: the denial to answer with when it may not pass.
fn admit_request(
    proxy: &Proxy,
    pod: &Pod,
    caller: &Caller,
    client_cert: &ClientCert,
    app: SocketAddr,
    request: &mut Request<Body>,
) -> Result<(), Box<Response<Body>>> {
    if let Some(normalized) =
        path::normalize(request.uri().path_and_query().map_or("/", |p| p.as_str()))
    {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = normalized.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    client_cert.apply(request.headers_mut());
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(http::header::HOST)?.to_str().ok())
        .unwrap_or_default();
    let view = HttpView::Request(HttpRequest {
        method: request.method().as_str(),
        path: request.uri().path(),
        host,
        headers: request.headers(),
    });
    let cfg = proxy.config.current();
    let attributes = caller.attributes(app, view);
    let what = || format!("{} {}", request.method(), request.uri().path());
    match authorize::judge(&cfg, pod, &proxy.denials, &attributes, what).allowed {
        true => Ok(()),
        false => Err(Box::new(access_denied(is_grpc(request)))),
    }
}

/// Serves an HTTP connection that no request may pass (the caller matches
/// no rule whatever it asks): each request gets the denial, and HTTP/1.1
/// connections close after it, so a retry is judged anew.
pub async fn refuse<S: Io>(proxy: &Proxy, pod: &Pod, client: S, caller: &Caller, http2: bool) {
    let settings = proxy.settings.http;
    let service = service_fn(|request: Request<Incoming>| {
        let mut response = access_denied(is_grpc(&request));
        if !http2 {
            let close = HeaderValue::from_static("close");
            response
                .headers_mut()
                .insert(http::header::CONNECTION, close);
        }
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let io = TokioIo::new(client);
    let served = tokio::time::timeout(settings.idle_timeout, async {
        if http2 {
            http2_server(&settings).serve_connection(io, service).await
        } else {
            http1_server(&settings).serve_connection(io, service).await
        }
    });
    if let Ok(Err(e)) = served.await {
        log::debug!(
            "{}: refused HTTP connection from {}: {e}",
            pod.key,
            caller.address
        );
    }
}

/// The HTTP version a connection speaks.
pub enum Version {
    Http2,
    /// HTTP/1.1; once upgraded, a connection on a resumable HBONE stream
    /// goes to the hand-back, if set (anything else is spliced here).
    Http1(Option<Upgrades>),
}

/// An HTTP/1.1 connection upgraded on a resumable HBONE stream, once both
/// sides switched: the stream (what hyper read from it past the request
/// back in front), the application's delivery, and what hyper read from
/// the application past its answer (not passed on yet).
pub struct Switched {
    pub stream: Prefixed<Tunnel>,
    pub app: Charged,
    pub app_head: Bytes,
}

/// Where an upgraded connection on a resumable stream goes once switched.
pub type Upgrades = oneshot::Sender<Switched>;

/// Serves the HTTP connection `client` until it ends, forwarding each
/// request that may pass to the application `app` over `server`; each
/// request is measured for Istio's metrics (reporter `destination`).
pub async fn serve<S: Io>(
    proxy: &Proxy,
    pod: &Pod,
    client: S,
    caller: &Caller,
    app: SocketAddr,
    version: Version,
    server: Charged,
) -> Result<(), String> {
    let (http2, upgrades) = match version {
        Version::Http2 => (true, None),
        Version::Http1(upgrades) => (false, upgrades),
    };
    let settings = proxy.settings.http;
    // Counted on HTTP/2 only, as on the outbound side.
    let open = http2.then(InFlight::default);
    let activity = Activity::new();
    let io = TokioIo::new(Tracked::new(client, activity.clone()));
    let server = TokioIo::new(Tracked::new(server, activity.clone()));
    let ingress = identity::ingress_id(&proxy.config.current(), proxy.identities.trust_domain());
    let client_cert = client_cert(pod, caller.identity.as_ref(), &ingress);
    let stamp = move |request: Request<Incoming>| {
        let grpc = is_grpc(&request);
        let (mut parts, incoming) = request.into_parts();
        // Per request: an inbound connection may be pooled by the caller's
        // agent and outlive a Telemetry change.
        let side = proxy.telemetry.side(&pod.key, Mode::Server);
        let span = trace::server(proxy, pod, &side, caller.address, app, &mut parts);
        let (measured, counted) = Measured::start(&proxy.telemetry, &side, grpc, &parts, incoming);
        let mut request =
            Request::from_parts(parts, counted.map_err(BoxError::from).boxed_unsync());
        let cert = &client_cert;
        let admitted = admit_request(proxy, pod, caller, cert, app, &mut request).map(|()| request);
        (Answer { measured, span }, admitted)
    };
    let edge = EdgeKey {
        reporter: Reporter::Destination,
        source: Some(caller.address),
        destination: app,
        service: None,
        mutual_tls: caller.identity.is_some(),
    };
    let answer = move |pending: Answer, (response, upstream): Answered| {
        let response = trace::answer(pending.span, response);
        pending
            .measured
            .finish(edge, upstream, response)
            .map(BodyExt::boxed_unsync)
    };
    let serving = async {
        if http2 {
            let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(server)
                .await
                .map_err(|e| format!("HTTP/2 to the application: {e}"))?;
            tokio::spawn(connection);
            let requests = open.clone();
            let service = service_fn(move |request| {
                let mut send = send.clone();
                let entered = requests.as_ref().map(InFlight::enter);
                let (pending, request) = stamp(request);
                async move {
                    let response = match request {
                        Ok(request) => reply(send.send_request(request).await, app),
                        Err(denied) => (*denied, None),
                    };
                    let response = answer(pending, response);
                    Ok::<_, Infallible>(open_until_answered(response, entered))
                }
            });
            let conn = http2_server(&settings).serve_connection(io, service);
            let served = until_drained(conn, proxy.drain.watch(), Duration::ZERO, |c| {
                c.graceful_shutdown()
            });
            Ok(served.await)
        } else {
            let (send, connection) = hyper::client::conn::http1::handshake(server)
                .await
                .map_err(|e| format!("HTTP/1.1 to the application: {e}"))?;
            tokio::spawn(connection.with_upgrades());
            // HTTP/1.1 serves one request at a time: the lock is never
            // contended, it only lends the sender to the request's future.
            let send = Arc::new(tokio::sync::Mutex::new(send));
            let (activity, idle) = (activity.clone(), settings.idle_timeout);
            let draining = proxy.drain.draining();
            let upgrades = Arc::new(std::sync::Mutex::new(upgrades));
            let service = service_fn(move |mut request: Request<Incoming>| {
                let (send, activity) = (send.clone(), activity.clone());
                let (draining, upgrades) = (draining.clone(), upgrades.clone());
                let client_side = hyper::upgrade::on(&mut request);
                let (pending, request) = stamp(request);
                async move {
                    let request = match request {
                        Ok(request) => request,
                        Err(denied) => return Ok(answer(pending, (*denied, None))),
                    };
                    let mut response = send.lock().await.send_request(request).await;
                    if let Ok(response) = &mut response {
                        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                            let app_side = hyper::upgrade::on(response);
                            let upgrades = lock(&upgrades).take();
                            let spliced = Spliced { activity, idle };
                            tokio::spawn(switch(client_side, app_side, upgrades, spliced));
                        }
                    }
                    let mut response = answer(pending, reply(response, app));
                    draining.close_after(&mut response);
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = http1_server(&settings)
                .serve_connection(io, service)
                .with_upgrades();
            let served = until_drained(conn, proxy.drain.watch(), IDLE_GRACE, |c| {
                c.graceful_shutdown()
            });
            Ok(served.await)
        }
    };
    match activity.unless_idle(settings.idle_timeout, serving).await {
        Some(Ok(served)) => served.or_else(|e| closed_by(e, &activity, &settings)),
        Some(Err(handshake)) => Err(handshake),
        None => idle_close(open.as_ref(), &settings),
    }
}

/// What a request's answer must end: its measure, and its span if sampled.
struct Answer {
    measured: Measured,
    span: Option<ActiveSpan>,
}

/// Once both sides have switched protocols (WebSocket...): a connection on
/// a resumable stream goes to `upgrades` if set, to be relayed as any
/// opaque stream from another node; anything else is spliced here.
async fn switch(
    client: hyper::upgrade::OnUpgrade,
    app: hyper::upgrade::OnUpgrade,
    upgrades: Option<Upgrades>,
    spliced: Spliced,
) {
    let (Ok(client), Ok(app)) = tokio::join!(client, app) else {
        return;
    };
    let (app, app_head) = match app.downcast::<TokioIo<Tracked<Charged>>>() {
        Ok(app) => (app.io.into_inner().into_inner(), app.read_buf),
        Err(app) => return spliced.run(TokioIo::new(client), TokioIo::new(app)).await,
    };
    let stream = match client.downcast::<TokioIo<Tracked<Prefixed<Tunnel>>>>() {
        Ok(client) => {
            let mut stream = client.io.into_inner().into_inner();
            stream.unread(&client.read_buf);
            stream
        }
        Err(client) => {
            let app = Prefixed::with_head(BytesMut::from(app_head), app);
            return spliced.run(TokioIo::new(client), app).await;
        }
    };
    let switched = Switched {
        stream,
        app,
        app_head,
    };
    let switched = match upgrades {
        Some(upgrades) => match upgrades.send(switched) {
            Ok(()) => return,
            Err(switched) => switched,
        },
        None => switched,
    };
    let app = Prefixed::with_head(BytesMut::from(switched.app_head), switched.app);
    spliced.run(switched.stream, app).await
}

/// How a connection that switched protocols is spliced here: bytes pass
/// through, under the connection's idle timeout.
struct Spliced {
    activity: Activity,
    idle: Duration,
}

impl Spliced {
    async fn run<C, A>(self, mut client: C, app: A)
    where
        C: AsyncRead + AsyncWrite + Unpin,
        A: AsyncRead + AsyncWrite + Unpin,
    {
        let mut app = Tracked::new(app, self.activity.clone());
        let spliced = tokio::io::copy_bidirectional(&mut client, &mut app);
        self.activity.unless_idle(self.idle, spliced).await;
    }
}

/// A response, and the endpoint that gave it (none for the proxy's own).
type Answered = (Response<Body>, Option<SocketAddr>);

/// The application's answer (from `app`), or a 502.
fn reply(response: hyper::Result<Response<Incoming>>, app: SocketAddr) -> Answered {
    match response {
        Ok(response) => (response.map(body::incoming), Some(app)),
        Err(e) => {
            let message = format!("application connection: {e}");
            let reply = body::local_reply(StatusCode::BAD_GATEWAY, &message, false);
            (mark(reply, Flag::UpstreamConnectionTermination), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_ingress_keeps_the_elements_it_set() {
        let forged = HeaderValue::from_static("Hash=abc;URI=spiffe://td/ns/x/sa/admin");
        let own = HeaderValue::from_static("By=spiffe://td/ns/a/sa/app;URI=spiffe://td/ns/b/sa/c");
        let mut headers = http::HeaderMap::new();
        headers.insert(XFCC, forged.clone());
        ClientCert::Replace(Some(own.clone())).apply(&mut headers);
        assert_eq!(headers[XFCC], own);
        ClientCert::Replace(None).apply(&mut headers);
        assert!(!headers.contains_key(XFCC));

        headers.insert(XFCC, forged.clone());
        ClientCert::Append(own.clone()).apply(&mut headers);
        let both = format!("{},{}", forged.to_str().unwrap(), own.to_str().unwrap());
        assert_eq!(headers[XFCC], both.as_str());
        // Nothing set by the ingress (no client certificate): its own only.
        headers.remove(XFCC);
        ClientCert::Append(own.clone()).apply(&mut headers);
        assert_eq!(headers[XFCC], own);
    }
}
