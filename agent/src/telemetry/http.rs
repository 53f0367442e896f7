//! Measuring one HTTP request: the request body's bytes as it is read, and
//! the response's bytes, gRPC status and end, recorded once when the
//! response ends (or the caller goes away).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use super::flags::{Flag, ResponseFlags};
use super::standard::{EdgeKey, RequestDone};
use super::Telemetry;

/// The endpoint that answered a request, set by the L7 path on the
/// response so the caller's side knows the destination workload.
#[derive(Debug, Clone, Copy)]
pub struct Upstream(pub std::net::SocketAddr);

/// A request from its start until its response ends.
pub struct Measured {
    telemetry: Arc<Telemetry>,
    started: Instant,
    grpc: bool,
    request_bytes: Arc<AtomicU64>,
}

impl Measured {
    /// Starts measuring a request; its body's bytes are counted from now on.
    pub fn start<B>(
        telemetry: &Arc<Telemetry>,
        grpc: bool,
        body: B,
    ) -> (
        Measured,
        impl http_body::Body<Data = Bytes, Error = B::Error> + Unpin,
    )
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        let request_bytes = Arc::new(AtomicU64::new(0));
        let bytes = request_bytes.clone();
        let counted = body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        });
        let measured = Measured {
            telemetry: telemetry.clone(),
            started: Instant::now(),
            grpc,
            request_bytes,
        };
        (measured, counted)
    }

    /// Hands the response on; the request is recorded against `edge` when
    /// its body ends.
    pub fn finish<B: http_body::Body>(
        self,
        edge: EdgeKey,
        response: Response<B>,
    ) -> Response<Metered<B>> {
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
        response.map(|inner| Metered {
            inner,
            done,
            measured: Some(self),
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A response body that records its request when it ends.
pub struct Metered<B: http_body::Body> {
    inner: B,
    done: RequestDone,
    measured: Option<Measured>,
}

impl<B: http_body::Body> Metered<B> {
    fn record(&mut self) {
        if let Some(measured) = self.measured.take() {
            self.done.duration = measured.started.elapsed();
            self.done.request_bytes = measured.request_bytes.load(Ordering::Relaxed);
            measured.telemetry.record_request(&self.done);
        }
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.done.response_bytes += data.len() as u64;
                } else if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                    self.done.grpc_status = Some(status);
                }
                if self.inner.is_end_stream() {
                    self.record();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.done.flags = self.done.flags.with(Flag::UpstreamConnectionTermination);
                self.record();
            }
            Poll::Ready(None) => self.record(),
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

impl<B: http_body::Body> Drop for Metered<B> {
    fn drop(&mut self) {
        if self.measured.is_some() && !self.inner.is_end_stream() {
            // Dropped before its end: the caller went away.
            self.done.flags = self.done.flags.with(Flag::DownstreamConnectionTermination);
        }
        self.record();
    }
}
