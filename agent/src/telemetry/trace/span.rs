//! One span: started when a sampled request enters the proxy, ended (and
//! queued for export) when its response's body ends, with the attributes
//! Envoy and Istio put on their spans so existing trace views read alike.

use std::net::IpAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Response;
use http_body::Frame;

use super::context::{Outgoing, SpanId, TraceId, REQUEST_ID};
use super::exporter::Queue;
use crate::telemetry::flags::{Flag, ResponseFlags};
use crate::telemetry::http::{Watch, Watched};
use crate::telemetry::peer::Peer;

/// OTLP's span kinds the proxy makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The destination's agent, receiving the call.
    Server,
    /// The caller's agent, making the call.
    Client,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// A finished span, as exported.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The request's `tracestate`, passed on as it came.
    pub trace_state: Option<String>,
    pub name: String,
    pub kind: Kind,
    /// The resource's `service.name`.
    pub service: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<(&'static str, Value)>,
    pub error: bool,
}

/// What the L7 path tells about a sampled request, asked only once the
/// request is sampled.
pub struct Describe {
    pub kind: Kind,
    /// Istio's labels of the workload this agent serves the request for:
    /// the caller (client span) or the destination (server span).
    pub served: Option<Peer>,
    /// Envoy's operation name, `<host>:<port>/*`.
    pub name: String,
    /// The downstream peer's address.
    pub peer: IpAddr,
    /// Envoy's cluster name: `outbound|<port>||<service host>` or
    /// `inbound|<port>||`.
    pub upstream_cluster: String,
}

/// Facts of the agent every span carries.
pub(super) struct Origin<'a> {
    pub node: &'a str,
    pub mesh_id: &'a str,
}

/// A span in progress.
pub struct ActiveSpan {
    span: Span,
    started: Instant,
    queue: Queue,
}

impl ActiveSpan {
    pub(super) fn start(
        origin: Origin<'_>,
        ctx: &Outgoing,
        trace_state: Option<String>,
        parts: &http::request::Parts,
        describe: Describe,
        queue: Queue,
    ) -> ActiveSpan {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| header(http::header::HOST.as_str()));
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let protocol = match parts.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let text = |s: &str| Value::Str(s.to_owned());
        let mut attributes = vec![
            ("node_id", text(origin.node)),
            ("guid:x-request-id", Value::Str(header(REQUEST_ID.as_str()))),
            ("http.url", Value::Str(format!("http://{authority}{path}"))),
            ("http.method", text(parts.method.as_str())),
            ("http.protocol", text(protocol)),
            ("user_agent", Value::Str(header("user-agent"))),
            ("peer.address", Value::Str(describe.peer.to_string())),
            ("downstream_cluster", text("-")),
            ("component", text("proxy")),
            ("upstream_cluster.name", text(&describe.upstream_cluster)),
            ("upstream_cluster", Value::Str(describe.upstream_cluster)),
            ("istio.mesh_id", text(origin.mesh_id)),
        ];
        let service = match &describe.served {
            Some(peer) => {
                attributes.extend([
                    ("istio.canonical_service", text(&peer.canonical_service)),
                    ("istio.canonical_revision", text(&peer.canonical_revision)),
                    ("istio.namespace", text(&peer.namespace)),
                ]);
                // Istio's default tracing service name: APP_LABEL_AND_NAMESPACE.
                format!("{}.{}", peer.canonical_service, peer.namespace)
            }
            None => crate::telemetry::peer::UNKNOWN.to_owned(),
        };
        ActiveSpan {
            span: Span {
                trace_id: ctx.trace_id,
                span_id: ctx.span_id,
                parent_span_id: ctx.parent_span_id,
                trace_state,
                name: describe.name,
                kind: describe.kind,
                service,
                start_unix_nano: unix_nanos(),
                end_unix_nano: 0,
                attributes,
                error: false,
            },
            started: Instant::now(),
            queue,
        }
    }

    /// Takes the response's status and flags; the span ends with its body.
    pub fn answer<B: http_body::Body>(self, response: Response<B>) -> Response<Watched<B, Ending>> {
        let status = response.status().as_u16();
        let flags = response
            .extensions()
            .get::<ResponseFlags>()
            .copied()
            .unwrap_or_default();
        response.map(|body| {
            Watched::new(
                body,
                Ending {
                    span: Some(self),
                    status,
                    flags,
                    response_bytes: 0,
                },
            )
        })
    }
}

/// Ends a span when the response body it watches ends.
pub struct Ending {
    span: Option<ActiveSpan>,
    status: u16,
    flags: ResponseFlags,
    response_bytes: u64,
}

impl Watch for Ending {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.response_bytes += data.len() as u64;
        }
    }

    fn end(&mut self, failed: bool, ended: bool) {
        let Some(active) = self.span.take() else {
            return;
        };
        let mut flags = self.flags;
        if failed {
            flags = flags.with(Flag::UpstreamConnectionTermination);
        } else if !ended {
            flags = flags.with(Flag::DownstreamConnectionTermination);
        }
        let ActiveSpan {
            mut span,
            started,
            queue,
        } = active;
        span.end_unix_nano = span.start_unix_nano + started.elapsed().as_nanos() as u64;
        span.error = self.status >= 500 || failed;
        span.attributes.extend([
            ("http.status_code", Value::Str(self.status.to_string())),
            ("response_flags", Value::Str(flags.render())),
            ("response_size", Value::Int(self.response_bytes as i64)),
        ]);
        if span.error {
            span.attributes.push(("error", Value::Str("true".into())));
        }
        queue.offer(span);
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
