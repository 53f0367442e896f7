//! Measuring one HTTP request: the request body's bytes as it is read, and
//! the response's bytes, gRPC status and end, recorded once when the
//! response ends (or the caller goes away).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Response};
use http_body::{Frame, SizeHint};

use super::access_log::{Head, HttpLine};
use super::flags::{Flag, ResponseFlags};
use super::policy::{AccessLog, Side};
use super::standard::{EdgeKey, RequestDone};
use super::Telemetry;

/// gRPC's status header (in a response's headers or trailers).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The name of the route that took a request, set on its response by the
/// L7 path when the request is logged.
#[derive(Debug, Clone)]
pub struct RouteName(pub Box<str>);

/// A request from its start until its response ends.
pub struct Measured {
    telemetry: Arc<Telemetry>,
    started: Instant,
    grpc: bool,
    request_bytes: Arc<AtomicU64>,
    /// Istio's metrics are recorded (a Telemetry may turn them off).
    metrics: bool,
    /// The request's head, when its workload logs it.
    log: Option<(Arc<AccessLog>, Head)>,
}

/// A request's line, waiting for its response to end.
struct Pending {
    log: Arc<AccessLog>,
    line: HttpLine,
}

impl Measured {
    /// Starts measuring a request (`head`: its head, `side`: how its
    /// workload observes it); its body's bytes are counted from now on.
    pub fn start<B: http_body::Body>(
        telemetry: &Arc<Telemetry>,
        side: &Side,
        grpc: bool,
        head: &Parts,
        body: B,
    ) -> (Measured, Watched<B, Counter>) {
        let request_bytes = Arc::new(AtomicU64::new(0));
        let counted = Watched {
            inner: body,
            watch: Counter(request_bytes.clone()),
        };
        let measured = Measured {
            telemetry: telemetry.clone(),
            started: Instant::now(),
            grpc,
            request_bytes,
            metrics: side.metrics,
            log: side
                .access_log
                .as_ref()
                .map(|log| (log.clone(), Head::capture(head))),
        };
        (measured, counted)
    }

    /// Whether the request is logged (so the L7 path names its route).
    pub fn logged(&self) -> bool {
        self.log.is_some()
    }

    /// Hands the response on; the request is recorded against `edge` when
    /// its body ends (`upstream`: the endpoint that answered, if any).
    pub fn finish<B: http_body::Body>(
        mut self,
        edge: EdgeKey,
        upstream: Option<SocketAddr>,
        response: Response<B>,
    ) -> Response<Watched<B, Recorder>> {
        let flags = response
            .extensions()
            .get::<ResponseFlags>()
            .copied()
            .unwrap_or_default();
        let grpc_status = grpc_status(response.headers());
        let done = RequestDone {
            edge,
            grpc: self.grpc,
            code: response.status().as_u16(),
            grpc_status,
            flags,
            duration: Default::default(),
            request_bytes: 0,
            response_bytes: 0,
        };
        let log = self.log.take().map(|(log, head)| {
            let line = HttpLine {
                head,
                done,
                upstream,
                upstream_service_time: upstream.map(|_| self.started.elapsed()),
                route: response
                    .extensions()
                    .get::<RouteName>()
                    .map(|r| r.0.clone()),
            };
            Box::new(Pending { log, line })
        });
        response.map(|inner| Watched {
            inner,
            watch: Recorder {
                done,
                measured: Some(self),
                log,
            },
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// What a [`Watched`] body tells as its frames pass.
pub trait Watch {
    fn frame(&mut self, frame: &Frame<Bytes>);
    /// The body ended (`failed`: with an error), or was dropped before
    /// (`ended` false: the reader went away).
    fn end(&mut self, failed: bool, ended: bool);
}

/// A body passed on unchanged (size hint and end included, which retries
/// and mirrors rely on), its frames shown to a [`Watch`].
pub struct Watched<B: http_body::Body, W: Watch> {
    inner: B,
    watch: W,
}

impl<B: http_body::Body, W: Watch> Watched<B, W> {
    pub fn new(inner: B, watch: W) -> Watched<B, W> {
        Watched { inner, watch }
    }
}

impl<B, W> http_body::Body for Watched<B, W>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    W: Watch + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.watch.frame(frame);
                if this.inner.is_end_stream() {
                    this.watch.end(false, true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.watch.end(true, true),
            Poll::Ready(None) => this.watch.end(false, true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: http_body::Body, W: Watch> Drop for Watched<B, W> {
    fn drop(&mut self) {
        let ended = self.inner.is_end_stream();
        self.watch.end(false, ended);
    }
}

/// Counts a request body's data bytes.
pub struct Counter(Arc<AtomicU64>);

impl Watch for Counter {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }

    fn end(&mut self, _: bool, _: bool) {}
}

/// Records a request once its response body ends.
pub struct Recorder {
    done: RequestDone,
    measured: Option<Measured>,
    log: Option<Box<Pending>>,
}

impl Watch for Recorder {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.done.response_bytes += data.len() as u64;
        } else if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
            self.done.grpc_status = Some(status);
        }
    }

    fn end(&mut self, failed: bool, ended: bool) {
        let Some(measured) = self.measured.take() else {
            return;
        };
        if failed {
            self.done.flags = self.done.flags.with(Flag::UpstreamConnectionTermination);
        } else if !ended {
            self.done.flags = self.done.flags.with(Flag::DownstreamConnectionTermination);
        }
        self.done.duration = measured.started.elapsed();
        self.done.request_bytes = measured.request_bytes.load(Ordering::Relaxed);
        if measured.metrics {
            measured.telemetry.record_request(&self.done);
        }
        if let Some(pending) = self.log.take() {
            let Pending { log, mut line } = *pending;
            line.done = self.done;
            measured.telemetry.access_log.http(&log, line);
        }
    }
}
