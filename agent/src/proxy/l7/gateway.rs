//! Requests from outside the mesh at the ingress: the Gateway server their
//! port and host select, and the routes of the VirtualService bound there.
//! From there on they run the same route execution as a workload's.

use std::net::SocketAddr;

use http::header::HeaderValue;
use http::HeaderMap;

use http::{Response, StatusCode};

use super::body::{self, Body};
use super::{Chosen, NoRoute};
use crate::config::Config;
use crate::routing::ingress::{request_host, Selected, ServerRef};
use crate::routing::{HttpRoute, RequestInfo};

/// Headers Istio's ingress gateway sets: the client's address appended to
/// `x-forwarded-for`, the scheme it used, and a request id when it has none.
pub fn forwarded(headers: &mut HeaderMap, client: SocketAddr, https: bool) {
    let ip = client.ip().to_string();
    let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) if !before.trim().is_empty() => format!("{before}, {ip}"),
        _ => ip,
    };
    if let Ok(chain) = HeaderValue::from_str(&chain) {
        headers.insert("x-forwarded-for", chain);
    }
    let proto = if https { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if !headers.contains_key("x-request-id") {
        if let Ok(id) = HeaderValue::from_str(&request_id()) {
            headers.insert("x-request-id", id);
        }
    }
}

/// The request's URL with scheme https and no port (Envoy's
/// `https_redirect`).
fn https_url(info: &RequestInfo<'_>) -> String {
    let host = request_host(info.authority);
    let query = info.query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("https://{host}{}{query}", info.path)
}

/// `301 Moved Permanently` to `location`.
pub(super) fn redirect(location: &str) -> Response<Body> {
    let mut reply = body::local_reply(StatusCode::MOVED_PERMANENTLY, "", false);
    if let Ok(location) = HeaderValue::from_str(location) {
        reply.headers_mut().insert(http::header::LOCATION, location);
    }
    reply
}

/// A random UUID (version 4), as Envoy generates.
fn request_id() -> String {
    let hi = fastrand::u64(..);
    let lo = fastrand::u64(..);
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x4000;
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// The route of a request that arrived at the ingress on `info.port`,
/// over TLS at server `tls`.
pub(super) fn route<'c>(
    config: &'c Config,
    node: &str,
    info: &RequestInfo<'_>,
    tls: Option<&ServerRef>,
) -> Result<Chosen<'c>, NoRoute> {
    let (selected, found) = select(config, node, info, tls)?;
    Ok((selected.gateway.key.clone(), Some(found)))
}

/// The Gateway server a request takes and the route (with its matching
/// block) of the VirtualService or HTTPRoute bound there: the data path's
/// choice, and what `nodemesh explain --gateway` shows.
pub(super) fn select<'c>(
    config: &'c Config,
    node: &str,
    info: &RequestInfo<'_>,
    tls: Option<&ServerRef>,
) -> Result<(Selected<'c>, (&'c HttpRoute, Option<usize>)), NoRoute> {
    let labels = config.node(node).map(|n| &n.labels);
    let no_labels = Default::default();
    let ingress = config.routing().ingress();
    let labels = labels.unwrap_or(&no_labels);
    let Some(selected) = ingress.select_at(labels, info.port, tls, info.authority) else {
        return Err(NoRoute::not_found(format!(
            "no Gateway server on port {} admits host {:?}",
            info.port, info.authority
        )));
    };
    if tls.is_none()
        && selected
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.https_redirect)
    {
        let mut redirect = NoRoute::not_found("httpsRedirect".into());
        redirect.redirect = Some(https_url(info));
        return Err(redirect);
    }
    let Some(routes) = selected.routes else {
        return Err(NoRoute::not_found(format!(
            "no VirtualService binds host {:?} at Gateway {} ({})",
            info.authority, selected.gateway.key, selected.server.field
        )));
    };
    match routes.routes.select(info) {
        Some(found) => Ok((selected, found)),
        None => Err(NoRoute::not_found(format!(
            "no route of {} matches this request",
            routes.routes.origin
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_the_client_and_keeps_a_request_id() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        forwarded(&mut headers, "10.0.0.9:40000".parse().unwrap(), false);
        assert_eq!(headers["x-forwarded-for"], "192.0.2.1, 10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-request-id"], "abc");
    }

    #[test]
    fn request_ids_are_uuids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }
}
