//! Bodies the L7 proxy passes around: a boxed body type for both directions,
//! a request body that can be replayed for retries, and canned replies.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use crate::telemetry::flags::{mark, Flag};
use crate::telemetry::http::GRPC_STATUS;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Request bodies up to this size are kept so that a retry can send them again.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `data`, then `trailers` if any (gRPC carries its status in trailers).
pub fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    let frames = [Some(Frame::data(data)), trailers.map(Frame::trailers)];
    Frames(frames.into_iter().flatten().collect()).boxed_unsync()
}

/// A body of frames known in advance.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

pub fn incoming(body: Incoming) -> Body {
    body.map_err(BoxError::from).boxed_unsync()
}

/// A reply made by the proxy itself. gRPC callers get a trailers-only gRPC
/// reply, which their libraries turn into a status instead of a protocol
/// error.
pub fn local_reply(status: StatusCode, message: &str, grpc: bool) -> Response<Body> {
    if grpc {
        return grpc_reply(grpc_status_for(status), message);
    }
    let mut response = Response::new(full(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

/// Envoy's answer when a circuit breaker or a tenant limit is full: an
/// immediate 503 marked `x-envoy-overloaded`, never a queue.
pub fn overloaded(grpc: bool) -> Response<Body> {
    let mut reply = mark(
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            grpc,
        ),
        Flag::UpstreamOverflow,
    );
    reply
        .headers_mut()
        .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    reply
}

/// A trailers-only gRPC reply with `code`.
pub fn grpc_reply(code: u32, message: &str) -> Response<Body> {
    let mut response = Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        headers.insert("grpc-message", v);
    }
    response
}

/// The gRPC status for an HTTP status the proxy answers with (gRPC's
/// HTTP-to-status mapping, except that a timeout is DEADLINE_EXCEEDED).
fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        504 => 4,
        429 | 502 | 503 => 14,
        _ => 2,
    }
}

/// A request body shared by the attempts of one request. Frames are
/// recorded as the first attempt streams them, up to [`REPLAY_LIMIT`]; a
/// later attempt replays the recording and then continues from the source.
#[derive(Clone)]
pub struct Replay(Arc<Mutex<Recording>>);

struct Recording {
    source: Option<Body>,
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    /// Recording stopped: the body was too big to replay from the start.
    overflowed: bool,
    /// The source ended; the recording is the whole body.
    complete: bool,
    /// The source failed (the client reset or half-closed mid-body, or sent
    /// a malformed chunk): the body will never be whole, so no attempt may
    /// end it as if it were, and none may be retried or mirrored.
    failed: bool,
}

impl Replay {
    pub fn new(source: Body) -> Replay {
        let complete = source.is_end_stream();
        Replay(Arc::new(Mutex::new(Recording {
            source: Some(source),
            frames: Vec::new(),
            trailers: None,
            size: 0,
            overflowed: false,
            complete,
            failed: false,
        })))
    }

    /// A body for the next attempt, or `None` if an earlier attempt already
    /// consumed more than could be recorded.
    pub fn attempt(&self) -> Option<Body> {
        let r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if r.overflowed || r.failed {
            return None;
        }
        let buffered: VecDeque<Bytes> = r.frames.iter().cloned().collect();
        Some(
            ReplayAttempt {
                shared: self.clone(),
                buffered,
                trailers_sent: false,
            }
            .boxed_unsync(),
        )
    }

    /// The client's body failed before its end (see [`Recording::failed`]).
    pub fn failed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).failed
    }

    /// The whole body if it is known in full (ended within the limit), for
    /// mirrors; waits for nothing.
    pub fn complete_copy(&self) -> Option<(Bytes, Option<HeaderMap>)> {
        let r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (r.complete && !r.overflowed).then(|| (r.frames.concat().into(), r.trailers.clone()))
    }

    /// Reads the whole body into the recording when it fits and has a known
    /// length (a typical request), so mirrors can get a copy before the
    /// primary attempt starts.
    pub async fn prefetch_if_small(&self) {
        let known = {
            let r = self.0.lock().unwrap_or_else(|e| e.into_inner());
            r.source
                .as_ref()
                .and_then(|s| s.size_hint().exact())
                .is_some_and(|n| n as usize <= REPLAY_LIMIT)
        };
        if !known {
            return;
        }
        let Some(mut body) = self.attempt() else {
            return;
        };
        while let Some(Ok(_)) = body.frame().await {}
    }
}

struct ReplayAttempt {
    shared: Replay,
    buffered: VecDeque<Bytes>,
    trailers_sent: bool,
}

impl http_body::Body for ReplayAttempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.buffered.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let shared = self.shared.clone();
        let mut r = shared.0.lock().unwrap_or_else(|e| e.into_inner());
        if r.complete {
            if self.trailers_sent {
                return Poll::Ready(None);
            }
            self.trailers_sent = true;
            return Poll::Ready(r.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        if r.failed {
            return Poll::Ready(Some(Err("the request body was cut short".into())));
        }
        let Some(source) = r.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                r.complete = true;
                r.source = None;
                self.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // Never `None` after this: an upstream that saw the end of
                // the body would take the part it got for the whole.
                r.failed = true;
                r.source = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !r.overflowed {
                            r.size += data.len();
                            if r.size > REPLAY_LIMIT {
                                r.overflowed = true;
                                r.frames.clear();
                            } else {
                                r.frames.push(data.clone());
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            r.trailers = Some(t.clone());
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if !self.buffered.is_empty() {
            return false;
        }
        let r = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        (r.complete && (self.trailers_sent || r.trailers.is_none()))
            || r.source.as_ref().is_some_and(|s| s.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let r = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        if r.complete {
            return SizeHint::with_exact(self.buffered.iter().map(|b| b.len() as u64).sum());
        }
        match r.source.as_ref().map(|s| s.size_hint()) {
            // Nothing consumed yet: the source's own hint is exact for us.
            Some(hint) if r.size == 0 => hint,
            _ => SizeHint::default(),
        }
    }
}

/// A body that runs `on_end` once it has been read to its end, and drops the
/// guard otherwise (used to return a pooled connection only when it is
/// clean, and to hold request limits until the response is done).
pub struct Guarded<G: Send + 'static> {
    inner: Body,
    guard: Option<G>,
    on_end: fn(G),
}

impl<G: Send + 'static> Guarded<G> {
    pub fn wrap(inner: Body, guard: G, on_end: fn(G)) -> Body {
        let mut guarded = Guarded {
            inner,
            guard: Some(guard),
            on_end,
        };
        if guarded.inner.is_end_stream() {
            guarded.finish();
        }
        guarded.boxed_unsync()
    }

    fn finish(&mut self) {
        if let Some(guard) = self.guard.take() {
            (self.on_end)(guard);
        }
    }
}

impl<G: Send + 'static> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            Poll::Ready(Some(Err(_))) => self.guard = None,
            _ => {}
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

impl<G: Send + 'static> Unpin for Guarded<G> {}
