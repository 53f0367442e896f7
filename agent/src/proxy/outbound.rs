//! Connections a workload opens: recover where it wanted to go, then either
//! route its HTTP requests one by one (L7) or pick one endpoint for the whole
//! connection and relay bytes (L4). A Service's cluster IP is load-balanced
//! over its workloads; anything else goes where it was addressed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::budget::Fds;
use super::carry::CarriedMeta;
use super::detect::{self, Declared, Detected};
use super::inbound::{Admitted, CallerSide, Client, Io};
use super::outcome::RelayError;
use super::peer::{Charged, PeerError, Prefixed, Stream};
use super::relay::{self, ClientConn, RelayOptions, Transferred};
use super::{hop, l7, peer, ConnectionRecord, Direction, Pod, Proxy};
use crate::config::{Config, Protocol};

/// Serves one outbound connection; `fds` (its own and its upstream's) are
/// charged to `pod`.
pub async fn handle(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    client: TcpStream,
    peer: SocketAddr,
    mut fds: Fds,
) {
    let Some(orig) = proxy.orig_dst.take(pod.netns.cookie(), peer) else {
        // Only a client that dialled the listener itself gets here.
        log::warn!(
            "{}: connection from {peer} has no recorded destination; refused",
            pod.key
        );
        relay::reset(&client);
        return;
    };
    let mut tracked = proxy.track(Direction::Outbound, peer, orig);
    tracked.caller = pod.address_for(orig.ip());
    tracked.record.source_workload = Some(pod.key.clone());
    tracked.record.source_identity = Some(pod.identity.to_string());
    let outcome = dispatch(&proxy, &pod, client, &mut tracked.record, &mut fds).await;
    tracked.finish(outcome);
}

/// Chooses L7 or L4 for the connection and serves it.
async fn dispatch(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    client: TcpStream,
    record: &mut ConnectionRecord,
    fds: &mut Fds,
) -> Result<Transferred, RelayError> {
    let orig = record.original_destination;
    let declared = {
        let config = proxy.config.current();
        let service = config.service_by_cluster_ip(orig.ip());
        if let Some(service) = service {
            record.service = Some(service.key());
        }
        service
            .and_then(|s| s.port(orig.port(), Protocol::Tcp))
            .map(detect::declared)
    };
    // Each way is boxed at its own size: an open connection's task holds
    // a TCP relay's state (14 KiB) or an HTTP connection's (7.5 KiB), not
    // always the larger.
    match declared {
        // Not a Service (a pod IP, an outside address) or declared opaque.
        None | Some(Declared::Opaque) => Box::pin(l4(proxy, pod, client, record, fds)).await,
        // The client speaks first, and whatever it says is parsed as HTTP:
        // a declared HTTP port is never relayed opaque (that would skip L7
        // policy). A client silent for the header read timeout is closed.
        Some(Declared::Http) => {
            let wait = proxy.settings.http.header_read_timeout;
            match detect::sniff(&client, wait, detect::classify_declared).await {
                Some(http) => Box::pin(serve_l7(proxy, pod, client, record, http, fds)).await,
                None => Err(format!("no request within {wait:?}").into()),
            }
        }
        // Boxed: it may hold a connection's detection, its spare upstream
        // and its relay at once (`large_futures`).
        Some(Declared::Unknown) => Box::pin(detect_or_relay(proxy, pod, client, record, fds)).await,
    }
}

/// On an undeclared port, a client that has not spoken within this grace is
/// probably waiting for the server to speak first.
const CLIENT_FIRST_GRACE: Duration = Duration::from_millis(10);

/// On an undeclared port a client normally speaks at once and is detected
/// with no cost. If it is silent past a short grace, the endpoint is dialled
/// while its first bytes are still awaited: a server that speaks first
/// (SMTP, MySQL...) starts the relay at once; if the client then speaks
/// HTTP, the spare connection is dropped and the requests are routed.
async fn detect_or_relay(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    client: TcpStream,
    record: &mut ConnectionRecord,
    fds: &mut Fds,
) -> Result<Transferred, RelayError> {
    // `peek`, not `readable()`: readiness may be reported spuriously.
    let spoke = tokio::time::timeout(CLIENT_FIRST_GRACE, client.peek(&mut [0u8; 1])).await;
    if let Ok(Ok(_)) = spoke {
        let wait = proxy.settings.protocol_detection_timeout;
        return match detect::sniff(&client, wait, detect::classify).await {
            None | Some(Detected::Opaque) => l4(proxy, pod, client, record, fds).await,
            Some(http) => serve_l7(proxy, pod, client, record, http, fds).await,
        };
    }
    let (detected, connected) = {
        let sniffing = async {
            let wait = proxy.settings.protocol_detection_timeout;
            let detected = detect::sniff(&client, wait, detect::classify).await;
            detected.unwrap_or(Detected::Opaque)
        };
        tokio::pin!(sniffing);
        let connecting = connect_as(proxy, pod, record.clone(), fds.split_one());
        tokio::pin!(connecting);
        let first = tokio::select! {
            detected = &mut sniffing => Err(detected),
            connected = &mut connecting => Ok(connected),
        };
        match first {
            Err(Detected::Opaque) => (Detected::Opaque, Some(connecting.await)),
            Err(http) => (http, None),
            Ok((endpoint, Ok(mut server))) => {
                let client_spoke = tokio::select! {
                    detected = &mut sniffing => Some(detected),
                    _ = server.spoken() => None,
                };
                match client_spoke {
                    Some(Detected::Opaque) | None => {
                        (Detected::Opaque, Some((endpoint, Ok(server))))
                    }
                    Some(http) => (http, None),
                }
            }
            Ok(failed) => (Detected::Opaque, Some(failed)),
        }
    };
    match connected {
        None => serve_l7(proxy, pod, client, record, detected, fds).await,
        Some((endpoint, server)) => {
            *record = endpoint;
            relay_connected(proxy, pod, client, server, record).await
        }
    }
}

/// [`connect`] on a copy of the record, so it can run while detection
/// decides whether the connection is needed at all.
async fn connect_as(
    proxy: &Arc<Proxy>,
    pod: &Pod,
    mut record: ConnectionRecord,
    fd: Option<Fds>,
) -> (ConnectionRecord, Result<Upstream, RelayError>) {
    let server = connect(proxy, pod, &mut record, fd, true).await;
    (record, server)
}

async fn serve_l7(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    client: TcpStream,
    record: &mut ConnectionRecord,
    detected: Detected,
    fds: &mut Fds,
) -> Result<Transferred, RelayError> {
    // Only the client's side stays; upstream connections are pooled and
    // charged one by one.
    fds.keep(1);
    let http2 = detected == Detected::Http2;
    record.protocol = if http2 { "h2" } else { "http/1.1" };
    let orig = record.original_destination;
    let (hand_back, upgraded) = tokio::sync::oneshot::channel();
    let entry = (orig, l7::Entry::Workload);
    l7::serve(
        proxy.clone(),
        pod.clone(),
        client,
        entry,
        http2,
        Some(hand_back),
    )
    .await?;
    // A tunnel from the client's socket to a socket or a resumable stream
    // (a WebSocket to a plaintext endpoint, or to a workload on another
    // node) goes on as this connection, carried at a hand-over with its
    // record.
    let Ok(tunnel) = upgraded.await else {
        return Ok(Transferred::default());
    };
    record.upstream = tunnel.upstream();
    record.transport = Some(tunnel.transport());
    if let (Some(upstream), "hbone") = (record.upstream, tunnel.transport()) {
        // The destination's agent moves the stream, as that workload, at
        // its own hand-over.
        record.destination_identity = identity_at(proxy, &proxy.config.current(), upstream);
    }
    let address = pod.address_for(orig.ip());
    // Boxed: a tunnel's 8 KiB of state, which every HTTP connection's task
    // would hold otherwise.
    Box::pin(tunnel.relay(proxy, CarriedMeta::of(record, address, address))).await
}

/// Relays the whole connection to one endpoint.
async fn l4(
    proxy: &Arc<Proxy>,
    pod: &Pod,
    client: TcpStream,
    record: &mut ConnectionRecord,
    fds: &mut Fds,
) -> Result<Transferred, RelayError> {
    let server = connect(proxy, pod, record, fds.split_one(), true).await;
    relay_connected(proxy, pod, client, server, record).await
}

/// Where an L4 connection goes once connected.
enum Upstream {
    /// A socket, or an HBONE stream to another node.
    Peer(Charged),
    /// A workload of this node, admitted: this agent's destination side
    /// takes the client's socket itself and relays it to the application.
    Local(Box<Admitted>),
}

impl Upstream {
    /// Resolves once the far end has sent something; nothing is consumed.
    async fn spoken(&mut self) -> std::io::Result<()> {
        match self {
            Upstream::Peer(charged) => charged.spoken().await,
            Upstream::Local(admitted) => admitted.spoken().await,
        }
    }

    /// Writes `head` to the far end before the relay starts.
    async fn send_first(&mut self, head: &[u8]) -> std::io::Result<()> {
        match self {
            Upstream::Peer(charged) => charged.write_all(head).await,
            Upstream::Local(admitted) => admitted.send_first(head).await,
        }
    }
}

/// Relays to `server` (a plaintext one, a workload of this node, or a
/// resumable HBONE stream, is carried to the next agent at a hand-over when
/// the client is a plaintext socket), or resets the client if connecting
/// failed.
async fn relay_connected<C>(
    proxy: &Arc<Proxy>,
    pod: &Pod,
    mut client: C,
    server: Result<Upstream, RelayError>,
    record: &mut ConnectionRecord,
) -> Result<Transferred, RelayError>
where
    C: ClientConn + Io,
    Prefixed<C>: Client,
{
    let caller = pod.address_for(record.original_destination.ip());
    let live = server
        .is_ok()
        .then(|| proxy.count_live(record, caller, true))
        .flatten();
    let server = match server {
        Ok(Upstream::Local(admitted)) => {
            let meta = CarriedMeta::of(record, caller, caller);
            let side = CallerSide { meta, live };
            return proxy.serve_stream(*admitted, client, Some(side)).await;
        }
        Ok(Upstream::Peer(server)) => Ok(server),
        Err(e) => Err(e),
    };
    let how = RelayOptions {
        idle: proxy.settings.idle_timeout,
        live,
    };
    let address = pod.address_for(record.original_destination.ip());
    let carriable = client.carriable();
    let outcome = match server {
        Ok(mut server) => match (&mut server.stream, server.resume.take()) {
            (Stream::Tcp(server), _) if carriable => {
                let meta = CarriedMeta::of(record, address, address);
                let client = client.socket();
                return proxy.relay_carriable(client, server, meta, how.live).await;
            }
            (Stream::Tunnel(tunnel), Some(resume)) if carriable => {
                let mut meta = CarriedMeta::of(record, address, address);
                meta.hbone = Some(*resume);
                return proxy
                    .relay_hbone(client.socket(), (tunnel, &[]), meta, how.live)
                    .await;
            }
            (Stream::Tcp(server), _) => relay::relay_stream(&mut client, server, how).await,
            (Stream::Tunnel(tunnel), _) => relay::relay_stream(&mut client, tunnel, how).await,
            (Stream::Local(local), _) => relay::relay_stream(&mut client, local, how).await,
        },
        Err(e) => {
            relay::reset(client.socket());
            return Err(e);
        }
    };
    outcome.map_err(|e| {
        relay::reset(client.socket());
        e.into()
    })
}

/// Relays a connection whose upstream a Gateway's tls or tcp rule chose
/// (`record.upstream`); `head`, already read from the client (its
/// ClientHello, when passed through), is sent first. A client whose TLS the
/// ingress terminated is relayed decrypted, and not carried at a hand-over.
pub(super) async fn relay_chosen<C>(
    proxy: &Arc<Proxy>,
    pod: &Pod,
    client: C,
    head: &[u8],
    record: &mut ConnectionRecord,
    fds: &mut Fds,
) -> Result<Transferred, RelayError>
where
    C: ClientConn + Io,
    Prefixed<C>: Client,
{
    let resumable = client.carriable();
    let server = match connect(proxy, pod, record, fds.split_one(), resumable).await {
        Ok(mut server) => match server.send_first(head).await {
            Ok(()) => Ok(server),
            Err(e) => Err(RelayError::Unreachable(format!(
                "connecting to {:?}: {e}",
                record.upstream
            ))),
        },
        Err(e) => Err(e),
    };
    let relayed = relay_connected(proxy, pod, client, server, record).await?;
    Ok(relayed
        + Transferred {
            sent: head.len() as u64,
            received: 0,
        })
}

/// Picks the endpoint (unless the record names it already) and the hop to
/// it, filling in the record, and connects on `fd` (a workload of this node
/// is admitted instead: the client's socket is relayed to its application
/// directly). `resumable`: an HBONE stream that can outlive this agent (the
/// client's socket is carried at a hand-over).
async fn connect(
    proxy: &Arc<Proxy>,
    pod: &Pod,
    record: &mut ConnectionRecord,
    fd: Option<Fds>,
    resumable: bool,
) -> Result<Upstream, RelayError> {
    let fd = fd.ok_or_else(|| {
        RelayError::Overflow("no descriptor left for the upstream connection".into())
    })?;
    let hop = {
        let cfg = proxy.config.current();
        let upstream = match record.upstream {
            Some(chosen) => chosen,
            None => destination(proxy, &cfg, record)?,
        };
        record.upstream = Some(upstream);
        let port = record.original_destination.port();
        let tls = record
            .service
            .as_deref()
            .map_or_else(Default::default, |service| {
                cfg.routing().upstream_tls(service, None, port).tls
            });
        let hop = hop::choose(proxy, &cfg, upstream, tls)
            .map_err(|e| RelayError::Unreachable(e.to_string()))?;
        record.transport = Some(hop.name());
        if !matches!(hop, hop::Hop::Plain) {
            record.destination_identity = identity_at(proxy, &cfg, upstream);
        }
        hop
    };
    let upstream = record.upstream.unwrap_or(record.original_destination);
    let connected = match hop {
        // The destination side charges its own delivery.
        hop::Hop::Local => peer::admit_local(proxy, pod, upstream)
            .await
            .map(|admitted| Upstream::Local(Box::new(admitted)))
            .map_err(PeerError::from),
        // Resumable: the relay survives a hand-over of this agent.
        hop::Hop::Mesh(destination) if resumable => {
            let timeout = proxy.settings.connect_timeout;
            peer::connect_resumable(proxy, pod, destination, timeout, fd)
                .await
                .map(Upstream::Peer)
        }
        hop => peer::connect(
            proxy,
            pod,
            upstream,
            hop,
            proxy.settings.connect_timeout,
            fd,
        )
        .await
        .map(Upstream::Peer),
    };
    connected.map_err(|e| RelayError::Unreachable(format!("connecting to {upstream}: {e}")))
}

/// The identity of the workload at `upstream`, if it is one.
fn identity_at(proxy: &Proxy, cfg: &Config, upstream: SocketAddr) -> Option<String> {
    cfg.workload_by_address(upstream.ip())
        .map(|w| proxy.identity_of(w).to_string())
}

/// Where the connection really goes; fills in the service and workload.
fn destination(
    proxy: &Proxy,
    cfg: &Config,
    record: &mut ConnectionRecord,
) -> Result<SocketAddr, RelayError> {
    let orig = record.original_destination;
    let Some(service) = cfg.service_by_cluster_ip(orig.ip()) else {
        record.destination_workload = cfg.workload_by_address(orig.ip()).map(|w| w.key());
        return Ok(orig);
    };
    let key = service.key();
    let port = service.port(orig.port(), Protocol::Tcp).ok_or_else(|| {
        RelayError::Unreachable(format!("service {key} has no port {}", orig.port()))
    })?;
    let endpoints: Vec<_> = cfg.endpoints(service).collect();
    let chosen = proxy
        .next_index(&key, endpoints.len())
        .map(|i| endpoints[i]);
    // Named in the record even when it has no endpoint (`UH`).
    let chosen = chosen
        .ok_or_else(|| RelayError::NoHealthyUpstream(format!("service {key} has no endpoints")));
    record.service = Some(key);
    let chosen = chosen?;
    let ip = chosen
        .addresses
        .iter()
        .find(|ip| ip.is_ipv4() == orig.is_ipv4())
        .or(chosen.addresses.first())
        .copied()
        .ok_or_else(|| {
            RelayError::NoHealthyUpstream(format!("workload {} has no address", chosen.key()))
        })?;
    record.destination_workload = Some(chosen.key());
    Ok(SocketAddr::new(ip, port.target_port))
}
