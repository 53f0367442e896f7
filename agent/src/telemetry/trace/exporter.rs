//! Export over OTLP/HTTP (`POST /v1/traces`, protobuf): spans wait in a
//! fixed-capacity queue and leave in batches (every second, or at
//! [`MAX_BATCH`]) from one task of their own. A request never waits for
//! export: a full queue drops the span and counts it, a collector that is
//! slow or down costs the batches it fails (counted, logged at most once a
//! minute), never a request.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use super::otlp;
use super::span::Span;
use crate::telemetry::standard::header as metric_header;

/// Spans held waiting for export, at most (a few hundred bytes each).
pub const QUEUE_CAPACITY: usize = 2048;
/// Spans sent in one request, at most.
pub const MAX_BATCH: usize = 512;
/// How long a span waits for others to share its request.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// One export, connection included, gives up after this long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Export failures are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The OTLP/HTTP path of traces, appended to an endpoint without a path.
const TRACES_PATH: &str = "/v1/traces";

/// Where spans go: `http://host:port`, `/v1/traces` appended unless the
/// URL has a path of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
    /// `host[:port]`, for the `Host` header.
    authority: String,
    path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("`{0}` is not a URL like http://collector:4318")]
    Invalid(String),
    #[error("`{0}`: only http:// is supported (OTLP/HTTP without TLS); use a collector on the node or in the cluster to forward over TLS")]
    Scheme(String),
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        let uri: Uri = s.parse().map_err(|_| EndpointError::Invalid(s.into()))?;
        if uri.scheme_str() != Some("http") {
            return Err(EndpointError::Scheme(s.into()));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| EndpointError::Invalid(s.into()))?;
        let path = match uri.path() {
            "" | "/" => TRACES_PATH.to_owned(),
            path => path.to_owned(),
        };
        Ok(Endpoint {
            host: authority.host().trim_matches(['[', ']']).to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            path,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// Why one export failed.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("resolving {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the collector answered {0}")]
    Status(StatusCode),
    #[error("no answer in {EXPORT_TIMEOUT:?}")]
    Timeout,
}

#[derive(Default)]
struct Stats {
    exported: AtomicU64,
    dropped_full: AtomicU64,
    dropped_failed: AtomicU64,
    failed_exports: AtomicU64,
}

/// Where finished spans are offered; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    sender: mpsc::Sender<Span>,
    stats: Arc<Stats>,
}

impl Queue {
    /// Starts the export task (on the current runtime) for `endpoint`.
    pub fn start(endpoint: Endpoint) -> Queue {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let stats = Arc::new(Stats::default());
        tokio::spawn(export(receiver, endpoint, stats.clone()));
        Queue { sender, stats }
    }

    /// Queues `span`, or drops it when the queue is full: never waits.
    pub fn offer(&self, span: Span) {
        if self.sender.try_send(span).is_err() {
            self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `nodemesh_trace_*` in Prometheus' text format.
    pub fn write_metrics(&self, out: &mut String) {
        let stats = &self.stats;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        metric_header(
            out,
            "nodemesh_trace_spans_exported_total",
            "counter",
            "Spans the OTLP collector accepted.",
        );
        let _ = writeln!(
            out,
            "nodemesh_trace_spans_exported_total {}",
            load(&stats.exported)
        );
        metric_header(
            out,
            "nodemesh_trace_spans_dropped_total",
            "counter",
            "Spans lost: the export queue was full, or their export failed.",
        );
        for (reason, n) in [
            ("queue_full", &stats.dropped_full),
            ("export_failed", &stats.dropped_failed),
        ] {
            let _ = writeln!(
                out,
                "nodemesh_trace_spans_dropped_total{{reason=\"{reason}\"}} {}",
                load(n)
            );
        }
        metric_header(
            out,
            "nodemesh_trace_export_errors_total",
            "counter",
            "Exports to the OTLP collector that failed.",
        );
        let _ = writeln!(
            out,
            "nodemesh_trace_export_errors_total {}",
            load(&stats.failed_exports)
        );
    }
}

/// The export task: batches until every sender is gone.
async fn export(mut receiver: mpsc::Receiver<Span>, endpoint: Endpoint, stats: Arc<Stats>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut logged: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        if receiver.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            match tokio::time::timeout_at(deadline, receiver.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let body = otlp::export_request(&batch);
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, post(&endpoint, body))
            .await
            .unwrap_or(Err(ExportError::Timeout));
        let n = batch.len() as u64;
        match sent {
            Ok(()) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                stats.dropped_failed.fetch_add(n, Ordering::Relaxed);
                stats.failed_exports.fetch_add(1, Ordering::Relaxed);
                if logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                    log::warn!(
                        "exporting {n} span(s) to {endpoint}: {e} ({unlogged} failure(s) since \
                         the last message; nodemesh_trace_spans_dropped_total counts the spans)"
                    );
                    logged = Some(Instant::now());
                    unlogged = 0;
                } else {
                    unlogged += 1;
                }
            }
        }
        batch.clear();
    }
}

/// One `POST` on a connection of its own (at most one a second).
async fn post(endpoint: &Endpoint, body: Vec<u8>) -> Result<(), ExportError> {
    let target = (endpoint.host.as_str(), endpoint.port);
    let addr = tokio::net::lookup_host(target)
        .await
        .map_err(|e| ExportError::Resolve(endpoint.authority.clone(), e))?
        .next()
        .ok_or_else(|| ExportError::NoAddress(endpoint.authority.clone()))?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| ExportError::Connect(addr, e))?;
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::post(endpoint.path.as_str())
        .header(header::HOST, endpoint.authority.as_str())
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .expect("a path and valid header values");
    let response = send.send_request(request).await?;
    let status = response.status();
    // The answer (an ExportTraceServiceResponse) is read to its end and
    // dropped: partial success is not acted on.
    response.into_body().collect().await?;
    if !status.is_success() {
        return Err(ExportError::Status(status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_traces_path() {
        let base: Endpoint = "http://collector:4318".parse().unwrap();
        assert_eq!(base.to_string(), "http://collector:4318/v1/traces");
        assert_eq!((base.host.as_str(), base.port), ("collector", 4318));
        let own: Endpoint = "http://[::1]:9/otlp/traces".parse().unwrap();
        assert_eq!(
            (own.host.as_str(), own.path.as_str()),
            ("::1", "/otlp/traces")
        );
        assert!(matches!(
            "https://c:4318".parse::<Endpoint>(),
            Err(EndpointError::Scheme(_))
        ));
        assert!("collector:4318".parse::<Endpoint>().is_err());
    }
}
