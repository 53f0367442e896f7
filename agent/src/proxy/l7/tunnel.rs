//! HTTP/1.1 Upgrade (WebSocket and friends) and CONNECT: after the
//! endpoint agrees, both connections are spliced and bytes pass through.
//!
//! The splice outlives the downstream connection's own charge, so it takes
//! a descriptor of its own for the client's side (and the upstream's comes
//! with its connection): a tunnel costs the workload two, like an L4 relay.

use http::header::{CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::body::{self, Body};
use super::forward::Target;
use super::Downstream;
use crate::proxy::hop;
use crate::proxy::idle::Tracked;
use crate::proxy::{peer, Direction};

pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() <= http::Version::HTTP_11
        && (request.method() == Method::CONNECT
            || (request.headers().contains_key(UPGRADE)
                && request
                    .headers()
                    .get_all(CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| {
                        v.split(',')
                            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                    })))
}

/// Forwards the upgrade request on a connection of its own (it is never
/// returned to a pool), and splices once the endpoint switches protocols.
pub async fn run(down: &Downstream, target: &Target, mut request: Request<Body>) -> Response<Body> {
    let fail = |reason: &str| body::local_reply(StatusCode::SERVICE_UNAVAILABLE, reason, false);
    let cluster = down.proxy.clusters.get(&target.key);
    let headers = http::HeaderMap::new();
    let hash = super::balance::HashInput {
        headers: &headers,
        query: None,
        source_ip: None,
    };
    let Some(pick) = cluster.pick(&target.endpoints, &[], None, &hash) else {
        return fail("no healthy upstream");
    };
    let tenant = &down.pod.tenant;
    let (client_fd, upstream_fd) = match (tenant.charge(1, None), tenant.charge(1, None)) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(refused), _) | (_, Err(refused)) => {
            tenant.count_rejection(Direction::Outbound);
            return fail(&format!("upstream connect error: {refused}"));
        }
    };
    let proxy = &down.proxy;
    let tls = target.policy.tls.unwrap_or_default();
    let hop = match hop::choose(proxy, &proxy.config.current(), pick.addr, tls) {
        Ok(hop) => hop,
        Err(e) => return fail(&format!("upstream connect error: {e}")),
    };
    let timeout = proxy.settings.connect_timeout;
    let connected = peer::connect(proxy, &down.pod, pick.addr, hop, timeout, upstream_fd).await;
    let stream = match connected {
        Ok(stream) => stream,
        Err(e) => return fail(&format!("upstream connect error: {e}")),
    };
    let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return fail(&format!("upstream handshake: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let client_side = hyper::upgrade::on(&mut request);
    let connect = request.method() == Method::CONNECT;
    let mut response = match send.send_request(request).await {
        Ok(response) => response,
        Err(e) => return fail(&format!("upstream reset: {e}")),
    };
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
        || (connect && response.status().is_success());
    if switched {
        let server_side = hyper::upgrade::on(&mut response);
        let idle_timeout = down.proxy.settings.http.idle_timeout;
        let activity = down.activity.clone();
        tokio::spawn(async move {
            if let (Ok(client), Ok(server)) = tokio::join!(client_side, server_side) {
                // The connection's idle timeout still applies once spliced
                // (as Envoy's stream idle timeout does to upgrades): an idle
                // tunnel would otherwise hold the tenant's descriptors for
                // good. The client's side already records its activity.
                let mut client = TokioIo::new(client);
                let mut server = Tracked::new(TokioIo::new(server), activity.clone());
                let splice = tokio::io::copy_bidirectional(&mut client, &mut server);
                activity.unless_idle(idle_timeout, splice).await;
            }
            drop((pick, client_fd));
        });
        return response.map(|_| body::empty());
    }
    response.map(body::incoming)
}
