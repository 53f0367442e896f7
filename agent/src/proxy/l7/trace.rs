//! The L7 path's part in tracing: the client span on the caller's agent,
//! the server span on the destination's, each named and labelled as Envoy
//! names them in Istio (`<service host>:<port>/*`, `outbound|…`/`inbound|…`).

use std::net::{IpAddr, SocketAddr};

use http::request::Parts;
use http::Response;
use http_body_util::BodyExt;

use super::body::Body;
use crate::config::Config;
use crate::proxy::{Pod, Proxy};
use crate::telemetry::peer::Peer;
use crate::telemetry::trace::{ActiveSpan, Describe, Kind};
use crate::telemetry::Side;

/// Istio's labels of the enrolled workload `pod`.
fn served(config: &Config, pod: &Pod) -> Option<Peer> {
    config.workload_by_key(&pod.key).map(|w| Peer::of(w, None))
}

/// The request's part in its trace, for `pod`, when tracing is on, as
/// the `Telemetry` resolved for `pod`'s `side` says: its sampling
/// percentage (else `--trace-sampling`), and with `disableSpanReporting`
/// the context still propagated but no span reported (as in Istio).
fn enter(
    proxy: &Proxy,
    side: &Side,
    parts: &mut Parts,
    describe: impl FnOnce(&Config, &Parts) -> Describe,
) -> Option<ActiveSpan> {
    let tracer = proxy.telemetry.tracer.as_ref()?;
    // The config is read only for a sampled request's span.
    tracer
        .enter(parts, side.sampling_percent, |parts| {
            describe(&proxy.config.current(), parts)
        })
        .filter(|_| side.span_reporting)
}

/// On the caller's agent: continues the trace (or starts it), and opens
/// the client span of a request `pod` sent to the Service at `service`.
pub fn client(
    proxy: &Proxy,
    pod: &Pod,
    side: &Side,
    service: SocketAddr,
    parts: &mut Parts,
) -> Option<ActiveSpan> {
    enter(proxy, side, parts, |config, _| {
        let host = config.service_by_cluster_ip(service.ip()).map_or_else(
            || service.ip().to_string(),
            |s| s.host(config.cluster_domain()),
        );
        let port = service.port();
        Describe {
            kind: Kind::Client,
            served: served(config, pod),
            name: format!("{host}:{port}/*"),
            peer: pod.address_for(service.ip()),
            upstream_cluster: format!("outbound|{port}||{host}"),
        }
    })
}

/// On the destination's agent: the server span of a request from
/// `caller` to `pod`'s application at `app`, child of the caller's span;
/// the application gets the server span's context.
pub fn server(
    proxy: &Proxy,
    pod: &Pod,
    side: &Side,
    caller: IpAddr,
    app: SocketAddr,
    parts: &mut Parts,
) -> Option<ActiveSpan> {
    enter(proxy, side, parts, |config, parts| {
        let served = served(config, pod);
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok())
            .unwrap_or_default();
        let (name, port) = match authority.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => (name, port.to_owned()),
            _ => (authority, app.port().to_string()),
        };
        let namespace = served.as_ref().map_or("", |p| p.namespace.as_str());
        let host = config
            .resolve_service_name(name, namespace)
            .map_or_else(|| name.to_owned(), |s| s.host(config.cluster_domain()));
        Describe {
            kind: Kind::Server,
            served,
            name: format!("{host}:{port}/*"),
            peer: caller,
            upstream_cluster: format!("inbound|{}||", app.port()),
        }
    })
}

/// The response, which ends `span` (if any) when its body ends.
pub fn answer(span: Option<ActiveSpan>, response: Response<Body>) -> Response<Body> {
    match span {
        Some(span) => span.answer(response).map(BodyExt::boxed_unsync),
        None => response,
    }
}
