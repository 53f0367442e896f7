//! Distributed tracing, as Istio's proxies do it: the caller's agent makes
//! a client span and the destination's agent a server span for each
//! sampled request, one trace across both and across the applications that
//! pass the headers on (Bookinfo-style), exported over OTLP/HTTP.
//!
//! - `context`: W3C Trace Context and B3 headers, `x-request-id`.
//! - `sampler`: the caller's decision, else a percentage.
//! - `span`: a span from request to the end of its response.
//! - `otlp`: the protobuf body of an export.
//! - `exporter`: the bounded queue and the export task.
//!
//! A request that is not sampled costs the header parse only, plus, when
//! the decision is made here (none came with the request), the headers
//! that carry it on, so that no later hop samples part of the trace.

pub mod context;
pub mod exporter;
mod otlp;
pub mod sampler;
pub mod span;

use context::{Incoming, Outgoing};
pub use exporter::Endpoint;
use exporter::Queue;
use sampler::Sampler;
pub use span::{ActiveSpan, Describe, Kind};

/// `--otlp-endpoint` and `--trace-sampling`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoint: Endpoint,
    /// Percent of requests sampled when neither the caller nor the
    /// workload's own setting decides.
    pub sampling_percent: f64,
}

/// What the L7 path traces with (one per agent, when tracing is on).
pub struct Tracer {
    sampler: Sampler,
    queue: Queue,
    node: String,
    /// Istio's mesh id: the trust domain.
    mesh_id: String,
}

impl Tracer {
    /// Starts the export task: call within the agent's runtime.
    pub fn start(settings: Settings, node: &str, trust_domain: &str) -> Tracer {
        log::info!(
            "tracing: spans to {} over OTLP/HTTP, {} % of requests sampled unless the caller decided",
            settings.endpoint,
            settings.sampling_percent
        );
        Tracer {
            sampler: Sampler::new(settings.sampling_percent),
            queue: Queue::start(settings.endpoint),
            node: node.to_owned(),
            mesh_id: trust_domain.to_owned(),
        }
    }

    /// Continues the request's trace, or starts one, before the proxy
    /// passes the request on: the context the next hop gets is written
    /// into `parts`' headers, and a span is returned when the request is
    /// sampled (`describe` is only called then, with the request as it
    /// leaves). `workload_percent`: the
    /// sampling percentage resolved for the workload served, if it has one.
    pub fn enter(
        &self,
        parts: &mut http::request::Parts,
        workload_percent: Option<f64>,
        describe: impl FnOnce(&http::request::Parts) -> Describe,
    ) -> Option<ActiveSpan> {
        let headers = &mut parts.headers;
        let incoming: Incoming = context::extract(headers);
        let mut values = context::Values::default();
        context::ensure_request_id(headers, &mut values);
        let sampled = self.sampler.sample(incoming.sampled, workload_percent);
        if !sampled {
            // A decision that came with the request passes on untouched;
            // one made here is written, so no later hop samples a part.
            if incoming.sampled.is_none() || incoming.parent.is_none() {
                context::inject(
                    headers,
                    &Outgoing {
                        trace_id: incoming
                            .parent
                            .map_or_else(context::new_trace_id, |p| p.trace_id),
                        span_id: incoming
                            .parent
                            .map_or_else(context::new_span_id, |p| p.span_id),
                        parent_span_id: None,
                        sampled: false,
                    },
                    &mut values,
                );
            }
            return None;
        }
        let ctx = Outgoing {
            trace_id: incoming
                .parent
                .map_or_else(context::new_trace_id, |p| p.trace_id),
            span_id: context::new_span_id(),
            parent_span_id: incoming.parent.map(|p| p.span_id),
            sampled: true,
        };
        context::inject(headers, &ctx, &mut values);
        let trace_state = headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let origin = span::Origin {
            node: &self.node,
            mesh_id: &self.mesh_id,
        };
        Some(ActiveSpan::start(
            origin,
            &ctx,
            trace_state,
            parts,
            describe(parts),
            self.queue.clone(),
        ))
    }

    /// `nodemesh_trace_*` in Prometheus' text format.
    pub fn write_metrics(&self, out: &mut String) {
        self.queue.write_metrics(out);
    }
}
