//! HTTP/1.1 Upgrade (WebSocket and friends) and CONNECT: after the
//! endpoint agrees, both connections are spliced and bytes pass through.
//!
//! The splice outlives the downstream connection's own charge, so it takes
//! a descriptor of its own for the client's side (and the upstream's comes
//! with its connection): a tunnel costs the workload two, like an L4 relay.
//!
//! A tunnel between a workload's socket and a plaintext upstream socket is
//! an opaque relay of two sockets once the protocol switched: it goes back
//! to the connection's own task ([`SocketTunnel`]), which relays it as any
//! opaque relay, carried to the next agent at a hand-over with its record.
//! So does a tunnel from a workload's socket to a workload on another node:
//! its HBONE stream is opened resumable, and it is relayed (and carried) as
//! an opaque relay to another node; the destination's agent parks its end
//! under the stream's id (`l7::inbound`). Other tunnels (to a workload of
//! this node, from the ingress, to a peer that does not resume) are
//! spliced here and stay with this agent.

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::balance::Pick;
use super::body::{self, Body};
use super::forward::Target;
use super::Downstream;
use crate::proxy::budget::Fds;
use crate::proxy::carry::CarriedMeta;
use crate::proxy::hop::{self, Hop};
use crate::proxy::idle::{Activity, Tracked};
use crate::proxy::outcome::RelayError;
use crate::proxy::peer::{Charged, Prefixed, Stream};
use crate::proxy::relay::{self, Transferred};
use crate::proxy::{peer, Direction, Proxy};

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
    // Resumable when the connection's task can carry the tunnel.
    let carriable = super::lock(&down.upgraded).is_some();
    let connected = match hop {
        Hop::Mesh(destination) if carriable => {
            peer::connect_resumable(proxy, &down.pod, destination, timeout, upstream_fd).await
        }
        hop => peer::connect(proxy, &down.pod, pick.addr, hop, timeout, upstream_fd).await,
    };
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
        let hand_back = super::lock(&down.upgraded).take();
        tokio::spawn(async move {
            if let (Ok(client), Ok(server)) = tokio::join!(client_side, server_side) {
                let held = Held {
                    _pick: pick,
                    _client_fd: client_fd,
                };
                let tunnel = match (SocketTunnel::of(client, server, held), hand_back) {
                    (Ok(tunnel), Some(hand_back)) => match hand_back.send(tunnel) {
                        Ok(()) => return,
                        Err(tunnel) => Spliced::Sockets(tunnel),
                    },
                    (Ok(tunnel), None) => Spliced::Sockets(tunnel),
                    (Err(other), _) => *other,
                };
                tunnel.splice(activity, idle_timeout).await;
            }
        });
        return response.map(|_| body::empty());
    }
    response.map(body::incoming)
}

/// What a tunnel holds until it ends: the endpoint's pick (counted as in
/// flight) and the client's descriptor.
struct Held {
    _pick: Pick,
    _client_fd: Fds,
}

/// A tunnel from a plain TCP socket to a plain TCP socket or a resumable
/// HBONE stream, with what hyper read from each past the HTTP exchange
/// (the client's first bytes after its request, the endpoint's after its
/// answer), not passed on yet.
pub struct SocketTunnel {
    client: TcpStream,
    client_head: Bytes,
    upstream: Charged,
    upstream_head: Bytes,
    _held: Held,
}

/// A tunnel to splice here.
enum Spliced {
    Sockets(SocketTunnel),
    Other(Upgraded, Prefixed<Charged>, Held),
    Upgrades(Upgraded, Upgraded, Held),
}

impl SocketTunnel {
    /// The tunnel's client socket and its upstream socket or resumable
    /// stream, if it has them (else it is spliced here).
    fn of(client: Upgraded, server: Upgraded, held: Held) -> Result<SocketTunnel, Box<Spliced>> {
        let server = match server.downcast::<TokioIo<Charged>>() {
            Ok(server) => server,
            Err(server) => return Err(Box::new(Spliced::Upgrades(client, server, held))),
        };
        let (upstream, upstream_head) = (server.io.into_inner(), server.read_buf);
        let carriable = match upstream.stream {
            Stream::Tcp(_) => true,
            Stream::Tunnel(_) => upstream.resume.is_some(),
            Stream::Local(_) => false,
        };
        if !carriable {
            let upstream = Prefixed::with_head(BytesMut::from(upstream_head), upstream);
            return Err(Box::new(Spliced::Other(client, upstream, held)));
        }
        match client.downcast::<TokioIo<Tracked<TcpStream>>>() {
            Ok(client) => Ok(SocketTunnel {
                client: client.io.into_inner().into_inner(),
                client_head: client.read_buf,
                upstream,
                upstream_head,
                _held: held,
            }),
            Err(client) => {
                let upstream = Prefixed::with_head(BytesMut::from(upstream_head), upstream);
                Err(Box::new(Spliced::Other(client, upstream, held)))
            }
        }
    }

    /// The endpoint's address.
    pub fn upstream(&self) -> Option<std::net::SocketAddr> {
        match &self.upstream.stream {
            Stream::Tcp(socket) => socket.peer_addr().ok(),
            _ => self.upstream.resume.as_ref().map(|resume| resume.to),
        }
    }

    /// How the tunnel reaches the endpoint, as `nodemesh connections`
    /// names it.
    pub fn transport(&self) -> &'static str {
        match &self.upstream.stream {
            Stream::Tcp(_) => Hop::Plain.name(),
            _ => "hbone",
        }
    }

    /// Relays the tunnel to its end, or until the node is handed over
    /// (then it is carried with `meta`, the connection's, and ends here
    /// with [`RelayError::HandedOver`]). What moved counts from the switch.
    pub async fn relay(
        mut self,
        proxy: &Proxy,
        mut meta: CarriedMeta,
    ) -> Result<Transferred, RelayError> {
        meta.upgraded = true;
        let resume = self.upstream.resume.take();
        let upstream = match (&mut self.upstream.stream, resume) {
            (Stream::Tcp(socket), _) => &*socket,
            (Stream::Tunnel(stream), Some(resume)) => {
                // The endpoint's first bytes are read from the stream first.
                stream.unread(&self.upstream_head);
                meta.hbone = Some(*resume);
                let first = (stream, &self.client_head[..]);
                return proxy.relay_hbone(&self.client, first, meta, None).await;
            }
            _ => unreachable!("a socket tunnel's upstream is a socket or a resumable stream"),
        };
        let heads = async {
            relay::write_all(upstream, &self.client_head).await?;
            relay::write_all(&self.client, &self.upstream_head).await
        };
        if let Err(e) = heads.await {
            relay::reset(&self.client);
            relay::reset(upstream);
            return Err(e.into());
        }
        meta.transferred.sent += self.client_head.len() as u64;
        meta.transferred.received += self.upstream_head.len() as u64;
        proxy
            .relay_carriable(&self.client, upstream, meta, None)
            .await
    }
}

impl Spliced {
    /// Splices until both ends close, under the connection's idle timeout
    /// (as Envoy's stream idle timeout applies to upgrades: an idle tunnel
    /// would otherwise hold the tenant's descriptors for good). The
    /// client's side already records its activity.
    async fn splice(self, activity: Activity, idle: std::time::Duration) {
        match self {
            Spliced::Sockets(tunnel) => {
                let client = Prefixed::with_head(tunnel.client_head.into(), tunnel.client);
                let upstream = Prefixed::with_head(tunnel.upstream_head.into(), tunnel.upstream);
                splice(client, upstream, activity, idle).await;
            }
            Spliced::Other(client, upstream, _held) => {
                splice(TokioIo::new(client), upstream, activity, idle).await;
            }
            Spliced::Upgrades(client, server, _held) => {
                splice(TokioIo::new(client), TokioIo::new(server), activity, idle).await;
            }
        }
    }
}

async fn splice<C, S>(mut client: C, server: S, activity: Activity, idle: std::time::Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = Tracked::new(server, activity.clone());
    let spliced = tokio::io::copy_bidirectional(&mut client, &mut server);
    activity.unless_idle(idle, spliced).await;
}

/// Where a connection's tunnel between two sockets goes once switched.
pub type HandBack = oneshot::Sender<SocketTunnel>;
