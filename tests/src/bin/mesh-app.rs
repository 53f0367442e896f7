//! `mesh-app`: the application the L7 tests and the demo run in their pods.
//! One process answers HTTP/1.1, HTTP/2 with prior knowledge (h2c) and gRPC
//! on one port and, like Bookinfo's services, calls other services while
//! propagating the caller's `end-user`, `x-request-id` and trace context
//! headers (W3C and B3, as Bookinfo's services do), so a route on `end-user`
//! applies at every hop and a trace continues through the application.
//!
//! ```text
//! mesh-app --port 9080 --name reviews-v2 --version v2
//!          [--call http://ratings:9080/ratings]... [--call-timeout-ms 10000]
//!          [--fail-first N] [--fail-status 503]
//! ```
//!
//! Every answer is one line of JSON: `name`, `version`, `client` (the peer
//! address the server sees), `protocol`,
//! `method`, `path`, `headers` (lower-cased) and `calls` (per `--call` URL:
//! `url` and `status` and `body`, or `error`). Besides:
//! * `/status/<code>` answers with that status, `/delay/<ms>` waits first;
//! * `/_stats` answers `{"requests": N}`, the requests served before it
//!   (how a test sees what reached a shadow);
//! * the first `--fail-first` requests answer `--fail-status` at once: an
//!   endpoint that fails and then recovers;
//! * a gRPC call (`content-type: application/grpc`) gets one message whose
//!   payload is that JSON and `grpc-status: 0` (`14`, UNAVAILABLE, while
//!   failing) in the trailers.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

/// Headers Bookinfo's services propagate to the services they call.
const PROPAGATED: &[&str] = &[
    "end-user",
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
];
const H2_PREFACE_START: &[u8] = b"PRI ";

struct App {
    name: String,
    version: String,
    calls: Vec<Uri>,
    call_timeout: Duration,
    failures_left: AtomicU64,
    fail_status: StatusCode,
    served: AtomicU64,
}

fn parse_args() -> Result<(u16, App)> {
    let mut port = 9080;
    let mut app = App {
        name: "mesh-app".into(),
        version: "v1".into(),
        calls: Vec::new(),
        call_timeout: Duration::from_secs(10),
        failures_left: AtomicU64::new(0),
        fail_status: StatusCode::SERVICE_UNAVAILABLE,
        served: AtomicU64::new(0),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => port = value.parse().context("--port")?,
            "--name" => app.name = value,
            "--version" => app.version = value,
            "--call" => app.calls.push(value.parse().context("--call")?),
            "--call-timeout-ms" => {
                app.call_timeout =
                    Duration::from_millis(value.parse().context("--call-timeout-ms")?)
            }
            "--fail-first" => {
                app.failures_left = AtomicU64::new(value.parse().context("--fail-first")?)
            }
            "--fail-status" => {
                app.fail_status = StatusCode::from_u16(value.parse().context("--fail-status")?)?
            }
            _ => bail!("unknown flag {flag} (see the doc comment of tests/src/bin/mesh-app.rs)"),
        }
    }
    Ok((port, app))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let (port, app) = parse_args()?;
    let app = Arc::new(app);
    let listener = TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding port {port}"))?;
    println!(
        "mesh-app {} {} listening on port {port}",
        app.name, app.version
    );
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(serve(stream, peer, app.clone()));
    }
}

/// Serves one connection as h2c if it opens with the HTTP/2 preface, else
/// as HTTP/1.1.
async fn serve(stream: TcpStream, peer: SocketAddr, app: Arc<App>) {
    let mut start = [0u8; 4];
    loop {
        match stream.peek(&mut start).await {
            Ok(0) | Err(_) => return,
            Ok(n) if n >= start.len() => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req, peer).await) }
    });
    let io = TokioIo::new(stream);
    let _ = if start == H2_PREFACE_START {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await
    };
}

impl App {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Frames> {
        let path = req.uri().path().to_owned();
        if path == "/_stats" {
            let served = self.served.load(Ordering::Relaxed);
            return json_response(StatusCode::OK, &json!({ "requests": served }));
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let failing = self
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();

        let mut status = if failing {
            self.fail_status
        } else {
            StatusCode::OK
        };
        let mut segments = path.trim_matches('/').split('/');
        if let (Some(kind), Some(Ok(n))) = (segments.next(), segments.next().map(str::parse::<u64>))
        {
            match kind {
                "status" if !failing => {
                    status = StatusCode::from_u16(n as u16).unwrap_or(StatusCode::BAD_REQUEST)
                }
                "delay" => tokio::time::sleep(Duration::from_millis(n)).await,
                _ => {}
            }
        }

        let propagated: Vec<(&'static str, HeaderValue)> = PROPAGATED
            .iter()
            .filter_map(|name| req.headers().get(*name).map(|v| (*name, v.clone())))
            .collect();
        let mut calls = Vec::new();
        if !failing {
            for uri in &self.calls {
                calls.push(self.call(uri, &propagated).await);
            }
        }
        let doc = json!({
            "name": self.name,
            "version": self.version,
            "client": peer.ip().to_string(),
            "protocol": format!("{:?}", req.version()),
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
            "headers": header_map(req.headers()),
            "calls": calls,
        });
        // Read the request body to its end, as a real server does.
        let _ = req.into_body().collect().await;
        if grpc {
            grpc_response(&doc, if failing { 14 } else { 0 })
        } else {
            json_response(status, &doc)
        }
    }

    /// GETs `uri` over HTTP/1.1 with the propagated headers; the answer or
    /// what went wrong, as JSON.
    async fn call(&self, uri: &Uri, propagated: &[(&'static str, HeaderValue)]) -> Value {
        let result = tokio::time::timeout(self.call_timeout, get(uri, propagated)).await;
        match result {
            Ok(Ok((status, body))) => {
                let body = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
                json!({ "url": uri.to_string(), "status": status, "body": body })
            }
            Ok(Err(e)) => json!({ "url": uri.to_string(), "error": format!("{e:#}") }),
            Err(_) => json!({
                "url": uri.to_string(),
                "error": format!("timed out after {} ms", self.call_timeout.as_millis()),
            }),
        }
    }
}

async fn get(uri: &Uri, propagated: &[(&'static str, HeaderValue)]) -> Result<(u16, Bytes)> {
    let authority = uri.authority().context("the URL has no host")?;
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())?;
    for (name, value) in propagated {
        request.headers_mut().insert(*name, value.clone());
    }
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        out.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value)
            })
            .or_insert_with(|| value.into_owned());
    }
    out
}

fn json_response(status: StatusCode, doc: &Value) -> Response<Frames> {
    let mut body = doc.to_string();
    body.push('\n');
    let mut response = Response::new(Frames::data(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// One length-prefixed gRPC message carrying `doc`, then the status.
fn grpc_response(doc: &Value, grpc_status: u8) -> Response<Frames> {
    let payload = doc.to_string();
    let mut message = BytesMut::with_capacity(5 + payload.len());
    message.put_u8(0);
    message.put_u32(payload.len() as u32);
    message.put_slice(payload.as_bytes());
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
    let frames = if grpc_status == 0 {
        vec![Frame::data(message.freeze()), Frame::trailers(trailers)]
    } else {
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("failing on purpose"),
        );
        vec![Frame::trailers(trailers)]
    };
    let mut response = Response::new(Frames(frames.into()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A response body of data and trailer frames known up front (gRPC needs
/// trailers, which the ready-made bodies do not carry).
struct Frames(VecDeque<Frame<Bytes>>);

impl Frames {
    fn data(bytes: Bytes) -> Frames {
        Frames(VecDeque::from([Frame::data(bytes)]))
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.0.iter().all(Frame::is_data) {
            true => {
                let len = self
                    .0
                    .iter()
                    .filter_map(Frame::data_ref)
                    .map(Bytes::len)
                    .sum::<usize>();
                http_body::SizeHint::with_exact(len as u64)
            }
            false => http_body::SizeHint::default(),
        }
    }
}
