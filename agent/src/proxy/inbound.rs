//! Connections to a workload, which arrive two ways:
//!
//! - in plaintext, on the inbound listener that sk_lookup hands every SYN
//!   for the workload's addresses (callers outside the mesh, the host, a
//!   mesh caller whose hop is DISABLE): PeerAuthentication decides, and a
//!   STRICT port refuses them;
//! - as HBONE streams from another node's agent ([`Proxy::admit`]), whose
//!   caller is authenticated by its certificate;
//! - from a mesh caller on this node, admitted the same way with the
//!   caller's own identity: its routed HTTP requests as in-process streams
//!   from the L7 proxy, its opaque connections as the caller's socket itself
//!   (one relay of two sockets, carried to the next agent at a hand-over).
//!
//! In every case the connection is delivered from the caller's own address;
//! HTTP is served request by request so that `X-Forwarded-Client-Cert`
//! carries the authenticated caller, and no caller can forge it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub use super::authorize::Caller;
use super::budget::{self, CallerKey, Fds};
use super::carry::CarriedMeta;
use super::detect::{self, Declared, Detected};
use super::idle::{self, Activity};
use super::l7::inbound::Switched;
use super::outcome::RelayError;
use super::peer::{self, Charged, Prefixed, Stream};
use super::relay::{self, RelayOptions, Transferred};
use super::{authorize, l7, resume, sni, Direction, Pod, Proxy, Tracked, AGENT_PORTS};
use crate::config::{Config, Protocol, Workload};
use crate::identity;
use crate::security::authorization::HttpView;
use crate::security::MtlsMode;
use crate::telemetry::LiveBytes;
use crate::transport::resume::Resumable;
use crate::transport::server::{Inbound, Refusal, StreamRequest};
use crate::transport::Tunnel;

/// A client that has not spoken within this is taken for one that waits
/// for a server that speaks first.
const CLIENT_FIRST_GRACE: Duration = Duration::from_millis(10);

/// Serves one plaintext inbound connection; `fds` (its own and its
/// delivery's) are charged to `pod` on behalf of the caller.
pub async fn handle(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    client: TcpStream,
    peer: SocketAddr,
    mut fds: Fds,
) {
    let (proxy, pod) = (&*proxy, &*pod);
    let Ok(app) = client.local_addr() else {
        return;
    };
    // Only SYNs steered by sk_lookup belong here. Anything else (a workload
    // dialling the listener itself, or an agent port) would make the agent
    // deliver to itself in a loop.
    if app.ip().is_loopback() || AGENT_PORTS.contains(&app.port()) {
        log::warn!(
            "{}: refused inbound connection to {app} from {peer}",
            pod.key
        );
        relay::reset(&client);
        return;
    }
    let mut tracked = proxy.track(Direction::Inbound, peer, app);
    tracked.record.destination_workload = Some(pod.key.clone());
    tracked.record.destination_identity = Some(pod.identity.to_string());
    tracked.record.upstream = Some(app);
    let declared = {
        let cfg = proxy.config.current();
        let Some(workload) = cfg.workload_by_key(&pod.key) else {
            relay::reset(&client);
            return tracked.finish(Err("the workload left the configuration".into()));
        };
        let mtls = cfg.peer_authentications().mtls_mode(workload, app.port());
        if mtls.mode == MtlsMode::Strict {
            log::warn!(
                "{}: plaintext connection from {peer} to port {} refused: mTLS mode {mtls}",
                pod.key,
                app.port()
            );
            relay::reset(&client);
            return tracked.finish(Err(format!("plaintext refused: {mtls}").into()));
        }
        declared_protocol(&cfg, workload, app.port())
    };
    let mut caller = Caller::new(None, peer.ip());
    let protocol = match declared {
        Declared::Http => {
            let wait = proxy.settings.http.header_read_timeout;
            detect::sniff(&client, wait, detect::classify_declared).await
        }
        Declared::Opaque => Some(Detected::Opaque),
        Declared::Unknown => {
            let spoke = tokio::time::timeout(CLIENT_FIRST_GRACE, client.peek(&mut [0u8; 1])).await;
            if let Ok(Ok(_)) = spoke {
                let wait = proxy.settings.protocol_detection_timeout;
                detect::sniff(&client, wait, detect::classify).await
            } else {
                Some(Detected::Opaque)
            }
        }
    };
    let Some(protocol) = protocol else {
        relay::reset(&client);
        return tracked.finish(Err("no request before the header read timeout".into()));
    };
    tracked.record.protocol = protocol_name(protocol);
    if protocol == Detected::Opaque && proxy.needs_sni(pod) {
        caller.sni = sni::peek(&client, proxy.settings.protocol_detection_timeout).await;
    }
    if let Err(denied) = proxy.authorize_connection(pod, &caller, app, protocol) {
        refuse(proxy, pod, client, &caller, protocol).await;
        return tracked.finish(Err(denied.into()));
    }
    let Some(fd) = fds.split_one() else {
        relay::reset(&client);
        let full = RelayError::Overflow("no descriptor left for the delivery".into());
        return tracked.finish(Err(full));
    };
    let timeout = proxy.settings.connect_timeout;
    let outcome = match peer::deliver(proxy, pod, app, caller.address, timeout, fd).await {
        Ok(server) => {
            let to = Delivered::of(proxy, pod, &mut tracked, &caller, protocol, None);
            serve_until_refused(proxy, client, &caller, to, protocol, server).await
        }
        Err(e) => Err(RelayError::Unreachable(format!("delivering to {app}: {e}"))),
    };
    tracked.finish(outcome);
}

/// Answers a connection that no request on it may pass: every HTTP request
/// gets Envoy's `403 RBAC: access denied`, anything else is closed before a
/// byte reaches the application.
async fn refuse<S: Io>(proxy: &Proxy, pod: &Pod, client: S, caller: &Caller, protocol: Detected) {
    match protocol {
        Detected::Http1 | Detected::Http2 => {
            let http2 = protocol == Detected::Http2;
            l7::inbound::refuse(proxy, pod, client, caller, http2).await
        }
        Detected::Opaque => drop(client),
    }
}

/// Serves a delivered connection until it ends, or until the configuration
/// refuses it: a policy that turns STRICT ends plaintext connections
/// already open, and one that denies a TCP caller ends its connections
/// (HTTP ones are judged request by request).
async fn serve_until_refused<S: Client>(
    proxy: &Proxy,
    client: S,
    caller: &Caller,
    to: Delivered<'_>,
    protocol: Detected,
    server: Charged,
) -> Result<Transferred, RelayError> {
    let (pod, app) = (to.pod, to.app);
    // Boxed, each at its own size: a TCP relay's state is 13 KiB, HTTP's
    // less than half of it, and one future for both would make every
    // connection's task hold the larger.
    let mut serving: Pin<Box<dyn Future<Output = Result<Transferred, RelayError>> + Send + '_>> =
        match protocol {
            Detected::Opaque => Box::pin(serve_tcp(proxy, client, to, server)),
            http => Box::pin(serve_http(proxy, client, caller, to, http, server)),
        };
    unless_refused(proxy, pod, caller, app, protocol, serving.as_mut()).await
}

/// Runs `serving` (a connection's service) until it ends, or until the
/// configuration refuses the connection. `serving` is pinned by the caller:
/// taken by value, a connection's whole service would be stored twice in
/// this future, once as the argument and once where `select!` polls it.
pub(super) async fn unless_refused(
    proxy: &Proxy,
    pod: &Pod,
    caller: &Caller,
    app: SocketAddr,
    protocol: Detected,
    serving: Pin<&mut (impl Future<Output = Result<Transferred, RelayError>> + ?Sized)>,
) -> Result<Transferred, RelayError> {
    tokio::select! {
        served = serving => served,
        refused = until_refused(proxy, pod, app, caller, protocol) => {
            log::warn!("{}: connection from {} closed: {refused}", pod.key, caller.address);
            Err(refused.into())
        }
    }
}

/// Resolves, with the reason, once the configuration stops accepting this
/// connection.
async fn until_refused(
    proxy: &Proxy,
    pod: &Pod,
    app: SocketAddr,
    caller: &Caller,
    protocol: Detected,
) -> String {
    let mut generations = proxy.config.subscribe();
    while generations.changed().await.is_ok() {
        let cfg = proxy.config.current();
        let Some(workload) = cfg.workload_by_key(&pod.key) else {
            return "the workload left the configuration".to_owned();
        };
        if caller.identity.is_none() {
            let mtls = cfg.peer_authentications().mtls_mode(workload, app.port());
            if mtls.mode == MtlsMode::Strict {
                return format!("plaintext refused: mTLS mode {mtls}");
            }
        }
        if protocol == Detected::Opaque {
            if let Err(denied) = proxy.authorize_connection(pod, caller, app, protocol) {
                return denied;
            }
        }
    }
    std::future::pending().await
}

/// Serves an HTTP connection once delivered, request by request, then the
/// tunnel it switched to, if any.
async fn serve_http<S: Client>(
    proxy: &Proxy,
    client: S,
    caller: &Caller,
    to: Delivered<'_>,
    protocol: Detected,
    server: Charged,
) -> Result<Transferred, RelayError> {
    let (pod, app) = (to.pod, to.app);
    let (upgrades, switched) = match to.upgradable {
        Some(upgradable) => {
            let (upgrades, switched) = oneshot::channel();
            (Some(upgrades), Some((switched, upgradable)))
        }
        None => (None, None),
    };
    let version = match protocol {
        Detected::Http2 => l7::inbound::Version::Http2,
        _ => l7::inbound::Version::Http1(upgrades),
    };
    match to.caller_side.and_then(|side| side.live) {
        // A same-node caller's agent side counts its connection's
        // bytes as TCP (it relayed them opaque).
        Some(live) => {
            let counted = Activity::counting(Some(live.reversed()));
            let client = idle::Tracked::new(client, counted);
            l7::inbound::serve(proxy, pod, client, caller, app, version, server).await?
        }
        None => l7::inbound::serve(proxy, pod, client, caller, app, version, server).await?,
    }
    match switched {
        // Boxed: a rare tunnel's 13 KiB, not every connection's.
        Some((switched, upgradable)) => match switched.await {
            Ok(switched) => Box::pin(upgradable.relay(proxy, switched)).await,
            // Not upgraded.
            Err(_) => Ok(Transferred::default()),
        },
        None => Ok(Transferred::default()),
    }
}

/// Relays a connection that is not HTTP to its delivered socket, as bytes.
async fn serve_tcp<S: Client>(
    proxy: &Proxy,
    mut client: S,
    to: Delivered<'_>,
    mut server: Charged,
) -> Result<Transferred, RelayError> {
    let (Stream::Tcp(socket), Some(tcp)) = (&mut server.stream, to.tcp) else {
        unreachable!("deliveries are sockets, and opaque ones are relayed as TCP");
    };
    client.relay_to(proxy, socket, tcp).await
}

/// Where an inbound connection was delivered.
pub struct Delivered<'a> {
    pod: &'a Pod,
    app: SocketAddr,
    /// Set when relayed as TCP.
    tcp: Option<TcpRelay>,
    caller_side: Option<CallerSide>,
    /// Set for HTTP/1.1 on a resumable stream.
    upgradable: Option<Upgradable>,
}

/// An HTTP/1.1 connection on a resumable HBONE stream: once upgraded (a
/// WebSocket), it is relayed as an opaque stream from another node,
/// parkable under the stream's id while the caller's agent is handed over,
/// and moved at a hand-over of this agent.
pub struct Upgradable {
    meta: CarriedMeta,
    resume: Resumable,
}

impl Upgradable {
    /// The connection since it switched (`meta`: its record, the caller's
    /// address and the application's), resumable as the stream `resume`.
    fn new(mut meta: CarriedMeta, resume: Resumable) -> Upgradable {
        meta.upgraded = true;
        Upgradable { meta, resume }
    }

    /// Relays the upgraded connection (the bytes either side sent behind
    /// the HTTP exchange, read already, are passed on first, once). What
    /// moved counts from the switch, as the caller sees it.
    async fn relay(self, proxy: &Proxy, switched: Switched) -> Result<Transferred, RelayError> {
        let Switched {
            mut stream,
            app,
            app_head,
        } = switched;
        let Stream::Tcp(socket) = &app.stream else {
            unreachable!("deliveries are sockets");
        };
        let first = Some((&mut stream, &app_head[..]));
        resume::relay_parkable(proxy, socket, first, None, self.meta, None, self.resume).await
    }
}

/// An inbound TCP relay's counters, added to as bytes move, and what the
/// next agent needs if it is carried there.
pub struct TcpRelay {
    live: Option<LiveBytes>,
    meta: CarriedMeta,
    /// Set for a resumable HBONE stream.
    resume: Option<Resumable>,
}

/// The caller's side of a connection between two workloads of this node,
/// which this agent reports as both ends: its outbound half hands the
/// caller's socket itself to the destination side, which relays it to the
/// application (one relay of two sockets, carried at a hand-over as any
/// plaintext one).
pub struct CallerSide {
    pub meta: CarriedMeta,
    pub live: Option<LiveBytes>,
}

impl<'a> Delivered<'a> {
    /// Where `tracked`'s connection from `caller` was delivered; relayed as
    /// TCP, it counts as opened from now.
    fn of(
        proxy: &Proxy,
        pod: &'a Pod,
        tracked: &mut Tracked<'_>,
        caller: &Caller,
        protocol: Detected,
        caller_side: Option<CallerSide>,
    ) -> Self {
        let address = tracked.caller;
        let app = tracked
            .record
            .upstream
            .unwrap_or(tracked.record.original_destination);
        let (tcp, caller_side) = match protocol {
            Detected::Opaque => {
                let live = proxy.count_live(&mut tracked.record, address, true);
                let mut meta = CarriedMeta::of(&tracked.record, app.ip(), address);
                meta.sni.clone_from(&caller.sni);
                let live = match caller_side {
                    Some(side) => {
                        meta.caller_side = Some(Box::new(side.meta));
                        LiveBytes::both(live, side.live)
                    }
                    None => live,
                };
                let resume = None;
                (Some(TcpRelay { live, meta, resume }), None)
            }
            Detected::Http1 | Detected::Http2 => (None, caller_side),
        };
        Delivered {
            pod,
            app,
            tcp,
            caller_side,
            upgradable: None,
        }
    }
}

/// An I/O stream the proxy serves.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for S {}

/// What inbound connections come in on: a socket or an HBONE stream.
pub trait Client: Io + Sized {
    /// Relays to the application; by default as a stream no other agent
    /// could take over, the application being the relay's client side.
    fn relay_to(
        &mut self,
        proxy: &Proxy,
        app: &mut TcpStream,
        tcp: TcpRelay,
    ) -> impl std::future::Future<Output = Result<Transferred, RelayError>> + Send {
        relay_opaque(self, proxy, app, tcp.live)
    }
}

/// Relays `client`, a stream, to the application; `live` counts as seen
/// from the caller.
async fn relay_opaque<S: Io>(
    client: &mut S,
    proxy: &Proxy,
    app: &mut TcpStream,
    live: Option<LiveBytes>,
) -> Result<Transferred, RelayError> {
    let how = RelayOptions {
        idle: proxy.settings.idle_timeout,
        live: live.map(LiveBytes::reversed),
    };
    relay::relay_stream(app, client, how)
        .await
        .map(|t| Transferred {
            sent: t.received,
            received: t.sent,
        })
        .map_err(RelayError::from)
}

/// A plaintext caller's socket: carried to the next agent at a hand-over.
impl Client for TcpStream {
    async fn relay_to(
        &mut self,
        proxy: &Proxy,
        app: &mut TcpStream,
        tcp: TcpRelay,
    ) -> Result<Transferred, RelayError> {
        proxy.relay_carriable(self, app, tcp.meta, tcp.live).await
    }
}

/// A same-node caller's socket, maybe read ahead: carried to the next
/// agent at a hand-over, with both sides' records.
impl Client for Prefixed<TcpStream> {
    async fn relay_to(
        &mut self,
        proxy: &Proxy,
        app: &mut TcpStream,
        mut tcp: TcpRelay,
    ) -> Result<Transferred, RelayError> {
        let head = self.take_head();
        if !head.is_empty() {
            if let Err(e) = app.write_all(&head).await {
                relay::reset(self.get_ref());
                return Err(e.into());
            }
            if let Some(live) = &tcp.live {
                live.moved(true, head.len() as u64);
            }
            tcp.meta.transferred.sent += head.len() as u64;
        }
        proxy
            .relay_carriable(self.get_ref(), app, tcp.meta, tcp.live)
            .await
    }
}

/// An HBONE stream from another node: resumable if its caller asked for
/// it, else relayed by [`Client::relay_to`]'s default.
impl Client for Prefixed<Tunnel> {
    async fn relay_to(
        &mut self,
        proxy: &Proxy,
        app: &mut TcpStream,
        tcp: TcpRelay,
    ) -> Result<Transferred, RelayError> {
        match tcp.resume {
            Some(resume) => {
                let (first, meta) = (Some((self, &[][..])), tcp.meta);
                resume::relay_parkable(proxy, app, first, None, meta, tcp.live, resume).await
            }
            None => relay_opaque(self, proxy, app, tcp.live).await,
        }
    }
}

/// An in-process stream from this node's L7 proxy.
impl Client for Prefixed<DuplexStream> {}

fn protocol_name(protocol: Detected) -> &'static str {
    match protocol {
        Detected::Http1 => "http/1.1",
        Detected::Http2 => "h2",
        Detected::Opaque => "tcp",
    }
}

/// What the Services that select `workload` declare for its port `port`.
fn declared_protocol(cfg: &Config, workload: &Workload, port: u16) -> Declared {
    let services = cfg.services();
    let start = services.partition_point(|s| s.namespace < workload.namespace);
    services[start..]
        .iter()
        .take_while(|s| s.namespace == workload.namespace)
        .filter(|s| {
            !s.selector.is_empty()
                && s.selector
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
        })
        .flat_map(|s| &s.ports)
        .find(|p| p.target_port == port && p.protocol == Protocol::Tcp)
        .map_or(Declared::Unknown, detect::declared)
}

/// A stream admitted for delivery: from another node (HBONE) or from a
/// caller on this node.
pub struct Admitted {
    pod: Arc<Pod>,
    request: StreamRequest,
    source_workload: String,
    /// `hbone` or `local`, for `nodemesh connections`.
    transport: &'static str,
    /// The delivery, already accepted by the application; or, when no
    /// request on the stream may pass, why (its HTTP requests then get 403).
    app: Result<Charged, String>,
    /// Set for a resumable HBONE stream.
    resume: Option<Resumable>,
}

impl Admitted {
    /// Resolves once the application has sent something (a server that
    /// speaks first); nothing is consumed. Never, if it was not delivered.
    pub async fn spoken(&mut self) -> std::io::Result<()> {
        match &mut self.app {
            Ok(app) => app.spoken().await,
            Err(_) => std::future::pending().await,
        }
    }

    /// Writes `head`, read from the client already (a ClientHello), to the
    /// application before the relay starts; nothing if it was not delivered.
    pub async fn send_first(&mut self, head: &[u8]) -> std::io::Result<()> {
        match &mut self.app {
            Ok(app) => tokio::io::AsyncWriteExt::write_all(app, head).await,
            Err(_) => Ok(()),
        }
    }
}

impl Inbound for Proxy {
    type Admitted = Admitted;

    async fn admit(&self, request: &StreamRequest) -> Result<Admitted, Refusal> {
        self.admit_stream(request, "hbone").await
    }

    async fn serve(
        self: Arc<Self>,
        mut admitted: Admitted,
        tunnel: Tunnel,
        resume: Option<Resumable>,
    ) {
        admitted.resume = resume;
        // Reported here; nothing waits for the outcome.
        let _ = self.serve_stream(admitted, tunnel, None).await;
    }
}

impl Proxy {
    /// The destination must be a workload enrolled here; the caller's
    /// address must be one of a workload with the caller's identity (from
    /// its certificate, or its own on this node); and the application must
    /// accept the delivery, before the stream is answered, so that a refusal
    /// reaches the caller as one (ztunnel does the same).
    pub async fn admit_stream(
        &self,
        request: &StreamRequest,
        transport: &'static str,
    ) -> Result<Admitted, Refusal> {
        let refuse = |status, reason: String| Refusal { status, reason };
        let to = request.to;
        let pod = self.local_pod(to.ip()).ok_or_else(|| {
            refuse(
                StatusCode::NOT_FOUND,
                format!("no enrolled workload at {} on node {}", to.ip(), self.node),
            )
        })?;
        if AGENT_PORTS.contains(&to.port()) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("port {} is the agent's", to.port()),
            ));
        }
        let cfg = self.config.current();
        let source_workload = self
            .caller_of(&cfg, request, transport)
            .map_err(|reason| refuse(StatusCode::FORBIDDEN, reason))?;
        // Charged as a whole connection, as plaintext ones are (the stream
        // itself holds no descriptor here): the per-workload limits count
        // connections the same way whatever the transport.
        let fd = pod
            .tenant
            .charge(
                budget::FDS_PER_CONNECTION,
                Some(CallerKey::Address(request.source)),
            )
            .map_err(|refused| {
                self.reject(&pod, Direction::Inbound);
                refuse(StatusCode::SERVICE_UNAVAILABLE, refused.to_string())
            })?;
        let own = cfg.workload_by_key(&pod.key);
        let declared = own.map_or(Declared::Unknown, |w| declared_protocol(&cfg, w, to.port()));
        let needs_sni = own.is_some_and(|w| cfg.authorizations().needs_sni(w));
        drop(cfg);
        // A TCP port is judged now and refused as a connection (unless the
        // server name its TLS will ask for matters); anything else may be
        // HTTP, whose denied requests get a 403 from here.
        let (protocol, caller) = (
            match declared {
                Declared::Opaque if !needs_sni => Some(Detected::Opaque),
                _ => None,
            },
            Caller::new(Some(request.peer.clone()), request.source),
        );
        if let Err(denied) = self.authorize(&pod, &caller, to, protocol) {
            if protocol.is_some() {
                return Err(refuse(StatusCode::FORBIDDEN, denied));
            }
            return Ok(Admitted {
                source_workload,
                pod,
                request: request.clone(),
                transport,
                app: Err(denied),
                resume: None,
            });
        }
        let timeout = self.settings.connect_timeout;
        match peer::deliver(self, &pod, to, request.source, timeout, fd).await {
            Ok(app) => Ok(Admitted {
                source_workload,
                pod,
                request: request.clone(),
                transport,
                app: Ok(app),
                resume: None,
            }),
            Err(e) => {
                let reason = format!("delivering to {to}: {e}");
                let tracked = self.track_stream(request, &pod, source_workload, transport);
                tracked.finish(Err(RelayError::Unreachable(reason.clone())));
                Err(refuse(StatusCode::SERVICE_UNAVAILABLE, reason))
            }
        }
    }

    /// Who calls (`namespace/name`): the caller's address must be one of a
    /// workload with the caller's identity, running on the node the stream
    /// comes from (a node holding an identity cannot borrow the addresses
    /// its workloads have on other nodes, nor the destination's own); or,
    /// for the ingress's identity, an address of that node, which must
    /// serve a Gateway.
    fn caller_of(
        &self,
        cfg: &Config,
        request: &StreamRequest,
        transport: &'static str,
    ) -> Result<String, String> {
        let remote = request.remote.ip().to_canonical();
        let from_node = |node: &str| match transport {
            "local" => node == self.node,
            _ => cfg
                .node(node)
                .is_some_and(|n| n.addresses.contains(&remote)),
        };
        let caller = cfg
            .workload_by_address(request.source)
            .filter(|w| self.identity_of(w) == request.peer);
        if let Some(caller) = caller {
            if !from_node(&caller.node) {
                return Err(format!(
                    "{} is {} on node {}, not on the node that opened this connection ({remote})",
                    request.source,
                    caller.key(),
                    caller.node,
                ));
            }
            return Ok(caller.key());
        }
        let ingress = identity::ingress_id(cfg, self.identities.trust_domain());
        let ingress_node = cfg.nodes().find(|n| {
            n.addresses.contains(&request.source)
                && from_node(&n.name)
                && identity::serves_ingress(cfg, &n.name)
        });
        if request.peer == ingress && ingress_node.is_some() {
            return Ok(identity::ingress_key(cfg));
        }
        Err(format!(
            "{} is not an address of a workload with identity {}",
            request.source, request.peer
        ))
    }

    /// Whether `pod`'s policies look at the TLS server name callers ask for.
    fn needs_sni(&self, pod: &Pod) -> bool {
        let cfg = self.config.current();
        let own = cfg.workload_by_key(&pod.key);
        own.is_some_and(|w| cfg.authorizations().needs_sni(w))
    }

    /// Judges a connection to `pod` once its protocol is known: TCP by
    /// Istio's TCP semantics, HTTP only as far as no request on it could
    /// pass (each request is judged again).
    fn authorize_connection(
        &self,
        pod: &Pod,
        caller: &Caller,
        app: SocketAddr,
        protocol: Detected,
    ) -> Result<(), String> {
        self.authorize(pod, caller, app, Some(protocol))
    }

    /// [`Proxy::authorize_connection`], before the protocol is known too.
    fn authorize(
        &self,
        pod: &Pod,
        caller: &Caller,
        app: SocketAddr,
        protocol: Option<Detected>,
    ) -> Result<(), String> {
        let view = match protocol {
            Some(Detected::Opaque) => HttpView::Tcp,
            _ => HttpView::Unknown,
        };
        let cfg = self.config.current();
        let attributes = caller.attributes(app, view);
        let decision = authorize::judge(&cfg, pod, &self.denials, &attributes, || {
            "connection".into()
        });
        match decision.allowed {
            true => Ok(()),
            false => Err(format!("RBAC: access denied: {decision}")),
        }
    }

    /// The record of an inbound stream.
    fn track_stream(
        &self,
        request: &StreamRequest,
        pod: &Pod,
        source_workload: String,
        transport: &'static str,
    ) -> super::Tracked<'_> {
        let app = request.to;
        let mut tracked = self.track(Direction::Inbound, SocketAddr::new(request.source, 0), app);
        let record = &mut tracked.record;
        record.source_workload = Some(source_workload);
        record.source_identity = Some(request.peer.to_string());
        record.destination_workload = Some(pod.key.clone());
        record.destination_identity = Some(pod.identity.to_string());
        record.upstream = Some(app);
        record.transport = Some(transport);
        tracked
    }

    /// Serves an admitted stream to its end: detected, delivered from the
    /// caller's address, HTTP request by request. `caller_side` is set when
    /// the stream is a same-node caller's socket itself. Returns how it
    /// ended (also reported here).
    pub async fn serve_stream<S>(
        &self,
        admitted: Admitted,
        stream: S,
        caller_side: Option<CallerSide>,
    ) -> Result<Transferred, RelayError>
    where
        S: Io,
        Prefixed<S>: Client,
    {
        let Admitted {
            pod,
            request,
            source_workload,
            transport,
            app: server,
            resume,
        } = admitted;
        let proxy = self;
        let app = request.to;
        let mut tracked = proxy.track_stream(&request, &pod, source_workload, transport);
        let declared = {
            let cfg = proxy.config.current();
            match cfg.workload_by_key(&pod.key) {
                Some(workload) => declared_protocol(&cfg, workload, app.port()),
                None => Declared::Unknown,
            }
        };
        let mut client = Prefixed::new(stream);
        // The caller's agent writes requests at once; a silent stream is a
        // protocol whose server speaks first.
        let protocol = match declared {
            Declared::Opaque => Detected::Opaque,
            Declared::Http | Declared::Unknown => {
                let spoke = tokio::time::timeout(CLIENT_FIRST_GRACE, client.fill()).await;
                let head = match spoke {
                    Ok(Ok(())) => client.head(),
                    _ => &[],
                };
                match declared {
                    Declared::Http => {
                        detect::classify_declared(head, true).unwrap_or(Detected::Http1)
                    }
                    _ => detect::classify(head, true).unwrap_or(Detected::Opaque),
                }
            }
        };
        tracked.record.protocol = protocol_name(protocol);
        let mut caller = Caller::new(Some(request.peer.clone()), request.source);
        if protocol == Detected::Opaque && proxy.needs_sni(&pod) {
            let wait = proxy.settings.protocol_detection_timeout;
            caller.sni = sni::read(&mut client, wait).await;
        }
        let denied = server.as_ref().err().cloned().or_else(|| {
            let opaque = protocol == Detected::Opaque;
            opaque.then(|| {
                proxy
                    .authorize_connection(&pod, &caller, app, protocol)
                    .err()
            })?
        });
        let outcome = match (denied, server) {
            (Some(denied), _) => {
                refuse(proxy, &pod, client, &caller, protocol).await;
                Err(denied.into())
            }
            (None, Ok(server)) => {
                let mut to =
                    Delivered::of(proxy, &pod, &mut tracked, &caller, protocol, caller_side);
                // Where the caller's end is, to move the stream at a
                // hand-over of this agent.
                let caller_end = (resume.as_ref()).and_then(|r| proxy.caller_end(&request, r.id));
                match &mut to.tcp {
                    Some(tcp) => {
                        tcp.meta.hbone = caller_end;
                        tcp.resume = resume;
                    }
                    None if protocol == Detected::Http1 => {
                        let (app, address) = (to.app.ip(), tracked.caller);
                        let mut meta = CarriedMeta::of(&tracked.record, app, address);
                        meta.hbone = caller_end;
                        to.upgradable = resume.map(|resume| Upgradable::new(meta, resume));
                    }
                    None => {}
                }
                serve_until_refused(proxy, client, &caller, to, protocol, server).await
            }
            (None, Err(_)) => unreachable!("a stream without delivery was denied"),
        };
        tracked.finish(outcome.clone());
        outcome
    }
}
