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

mod balance;
mod body;
mod edit;
mod forward;
pub mod inspect;
mod limits;
mod tunnel;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

pub use balance::Clusters;
pub use body::Body;
pub use inspect::ExplainRequest;
pub use limits::WorkloadLimits;
pub use upstream::Pool;

use super::{Pod, Proxy};
use crate::routing::RequestInfo;

/// One downstream connection: who opened it and which Service it dialled.
struct Downstream {
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    /// The Service address the workload connected to.
    service_addr: SocketAddr,
    http2: bool,
}

/// Serves HTTP on a connection whose protocol detection said `http2` or not.
pub async fn serve(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    stream: TcpStream,
    service_addr: SocketAddr,
    http2: bool,
) -> Result<(), String> {
    let downstream = Arc::new(Downstream {
        proxy,
        pod,
        service_addr,
        http2,
    });
    let io = TokioIo::new(stream);
    let service = service_fn(move |request| {
        let downstream = downstream.clone();
        async move { Ok::<_, Infallible>(downstream.handle(request).await) }
    });
    let served = if http2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    served.map_err(|e| e.to_string())
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
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
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let grpc = is_grpc(&request);
        let config = self.proxy.config.current();
        let Some(service) = config.service_by_cluster_ip(self.service_addr.ip()) else {
            return body::local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "the Service this connection was opened to no longer exists",
                grpc,
            );
        };
        let service_key = service.key();
        let source = config.workload_by_key(&self.pod.key);
        let authority = authority(&request);
        let no_labels = Default::default();
        let info = RequestInfo {
            method: request.method().as_str(),
            path: request.uri().path(),
            query: request.uri().query(),
            scheme: "http",
            authority: &authority,
            headers: request.headers(),
            port: self.service_addr.port(),
            source_namespace: source.map_or("", |w| w.namespace.as_str()),
            source_labels: source.map_or(&no_labels, |w| &w.labels),
        };
        let selected = match config.routing().host(&service_key) {
            None => None,
            Some(host) => match host.select(&info) {
                Some(found) => Some(found),
                None => {
                    return body::local_reply(
                        StatusCode::NOT_FOUND,
                        &format!("no route of {} matches this request", host.origin),
                        grpc,
                    )
                }
            },
        };
        let plan = forward::Plan {
            config: &config,
            service_key: &service_key,
            route: selected.map(|(route, _)| route),
            matched: selected.and_then(|(route, i)| i.map(|i| &route.matches[i])),
            authority,
            grpc,
            source_ip: source.and_then(|w| w.addresses.first().copied()),
        };
        forward::run(self, plan, request).await
    }
}
