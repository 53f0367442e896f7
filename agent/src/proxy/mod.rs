//! The shared per-node proxy: one outbound and one inbound listener inside
//! each enrolled workload's network namespace, all served by this process.
//!
//! - `outbound`: connections the workload opens (redirected by connect4/6).
//! - `inbound`: connections to the workload's addresses (steered by sk_lookup).
//! - `hop`: which way a connection leaves: delivered on this node, over
//!   HBONE to another node's agent, or in plaintext outside the mesh.
//! - `peer`: opening that hop, and delivering into the workload.
//! - `relay`: the byte copy both directions share.
//! - `idle`: ending connections on which nothing moves (relays, HTTP).
//! - `detect`: HTTP/1.1, HTTP/2 or opaque, on connections to a Service.
//! - `l7`: requests routed one by one (VirtualService, DestinationRule...).
//! - `budget`: descriptors, shared fairly by workloads and by their callers.

mod authorize;
pub mod budget;
pub mod carry;
pub mod detect;
mod gateway_relay;
mod hop;
mod idle;
mod inbound;
mod l7;
mod moved;
mod outbound;
mod outcome;
pub(crate) mod peer;
mod quiesce;
pub mod relay;
mod relay_buffer;
mod resume;
pub(crate) mod sni;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use nodemesh_common::{AGENT_MARK, DELIVERY_MARK, DNS_PORT, INBOUND_PORT, OUTBOUND_PORT};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use budget::{CallerKey, Descriptors, Tenant};
use outcome::RelayError;

use crate::config::ConfigStore;
use crate::ebpf::{DeliveryTable, OrigDstTable};
use crate::identity::{Identities, SpiffeId};
use crate::lifecycle::drain::Drain;
use crate::netns::NetNs;
use crate::telemetry::trace::Tracer;
use crate::telemetry::{
    ConnectionDone, EdgeKey, Flag, LiveBytes, Reporter, ResponseFlags, Telemetry,
};
use crate::transport;
use crate::workers::{Acceptor, Workers};

/// Ports of the agent's own listeners inside a workload.
const AGENT_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, DNS_PORT];

/// Limits applied to every proxied connection.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Longest wait for a client's first bytes on an undeclared port.
    pub protocol_detection_timeout: Duration,
    pub http: HttpSettings,
    /// `--max-connections-per-workload`: lowers each workload's share of the
    /// descriptor budget (see `budget`); by default it is derived.
    pub max_connections_per_workload: Option<usize>,
    /// `--otlp-endpoint`: spans of sampled requests; none: no tracing.
    pub tracing: Option<crate::telemetry::trace::Settings>,
    /// `--access-log`: the format every workload logs in unless a
    /// Telemetry says otherwise; `None`: off.
    pub access_log: Option<crate::telemetry::Format>,
    /// `--workers`: the event loops connections are served on.
    pub workers: usize,
}

/// An enrolled workload, as its listeners know it.
pub struct Pod {
    /// `namespace/name`.
    pub key: String,
    /// Its SPIFFE id: what it presents to other nodes, and what callers on
    /// this node are shown as.
    pub identity: SpiffeId,
    /// Its addresses: its connections come from these.
    pub addresses: Vec<IpAddr>,
    pub netns: NetNs,
    /// The workload's share of the proxy's descriptors: every socket the
    /// proxy holds for it is charged here.
    pub tenant: Arc<Tenant>,
    /// L7 connections to endpoints opened for this workload.
    pool: Arc<l7::Pool>,
    /// DestinationRule connection limits of this workload.
    limits: l7::WorkloadLimits,
    /// Its HTTP requests in flight, bounded by `max_requests_per_workload`.
    in_flight: l7::InFlight,
}

impl Pod {
    pub fn new(
        key: String,
        identity: SpiffeId,
        addresses: Vec<IpAddr>,
        netns: NetNs,
        tenant: Arc<Tenant>,
    ) -> Pod {
        Pod {
            key,
            identity,
            addresses,
            netns,
            tenant,
            pool: Arc::default(),
            limits: l7::WorkloadLimits::default(),
            in_flight: l7::InFlight::default(),
        }
    }

    /// Its address of `family_of`'s family (else its first).
    pub fn address_for(&self, family_of: IpAddr) -> IpAddr {
        self.addresses
            .iter()
            .find(|ip| ip.is_ipv4() == family_of.is_ipv4())
            .or(self.addresses.first())
            .copied()
            .unwrap_or(family_of)
    }

    /// Its HTTP requests in flight through the proxy, over all its
    /// connections.
    pub fn http_requests_in_flight(&self) -> u32 {
        self.in_flight.count()
    }

    /// A TCP listener owned by the agent inside the workload's namespace.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.netns.enter(|| {
            let socket = agent_socket(addr, false)?;
            socket.set_reuseaddr(true)?;
            Ok(socket)
        })?;
        socket.bind(addr)?;
        socket.listen(1024)
    }

    /// A TCP socket owned by the agent inside the workload's namespace.
    fn socket(&self, family_of: SocketAddr) -> io::Result<TcpSocket> {
        self.netns.enter(|| agent_socket(family_of, false))
    }

    /// A socket inside the workload's namespace that may bind an address
    /// that is not local (`IP_TRANSPARENT`, needs CAP_NET_ADMIN): a
    /// caller's. Its mark, `DELIVERY_MARK`, routes the application's
    /// replies back to it (see `reply_routing`).
    fn transparent_socket(&self, family_of: SocketAddr) -> io::Result<TcpSocket> {
        self.netns.enter(|| agent_socket(family_of, true))
    }
}

/// A non-blocking TCP socket carrying the agent's mark (or the delivery
/// mark, its variant), so the eBPF programs never redirect it (the agent's own traffic must not loop back to itself).
fn agent_socket(family_of: SocketAddr, transparent: bool) -> io::Result<TcpSocket> {
    let domain = if family_of.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM.nonblocking(), None)?;
    socket.set_mark(if transparent {
        DELIVERY_MARK
    } else {
        AGENT_MARK
    })?;
    if transparent {
        let made = if family_of.is_ipv4() {
            socket.set_ip_transparent_v4(true)
        } else {
            socket.set_ip_transparent_v6(true)
        };
        made.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("transparent socket (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    socket.set_tcp_nodelay(true)?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// Which way a connection goes relative to the workload.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One finished connection, as `nodemesh connections` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    pub direction: Direction,
    /// The workload that opened the connection, when it is known: for
    /// outbound, from the namespace it connected from (unforgeable); for
    /// inbound, the workload with the caller's certificate identity and
    /// address (none for plaintext callers).
    pub source_workload: Option<String>,
    /// SPIFFE id of the caller (outbound: of the workload; inbound: from its
    /// certificate, or the local caller's own), none for plaintext.
    pub source_identity: Option<String>,
    /// SPIFFE id of the destination workload when it is in the mesh.
    pub destination_identity: Option<String>,
    /// `local` (same node), `hbone` (mutual TLS to another node) or
    /// `plaintext`; none for outbound HTTP, whose requests each take their
    /// own.
    pub transport: Option<&'static str>,
    pub source: SocketAddr,
    /// What the client asked for (a pod IP, a cluster IP...).
    pub original_destination: SocketAddr,
    pub service: Option<String>,
    pub destination_workload: Option<String>,
    /// Where the agent actually connected (per request, not here, on L7).
    pub upstream: Option<SocketAddr>,
    /// `tcp`, `http/1.1` or `h2`.
    pub protocol: &'static str,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `ok`, or why the connection failed.
    pub outcome: String,
    /// Its opening and bytes are counted as it is relayed, not at its close.
    #[serde(skip)]
    pub counted_live: bool,
}

impl ConnectionRecord {
    /// The workload on this node's side: the caller for outbound, the
    /// destination for inbound.
    fn local_workload(&self) -> Option<&str> {
        match self.direction {
            Direction::Outbound => self.source_workload.as_deref(),
            Direction::Inbound => self.destination_workload.as_deref(),
        }
    }
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct DirectionCounts {
    pub open: u64,
    pub total: u64,
    pub failed: u64,
    /// Reset at accept for lack of descriptors: the workload was at its
    /// share, or (inbound) the caller at its part of it.
    pub rejected: u64,
}

#[derive(Default)]
struct Counters {
    open: AtomicU64,
    total: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionCounts {
        DirectionCounts {
            open: self.open.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// How many finished connections the agent remembers for `nodemesh connections`.
const RECENT_CONNECTIONS: usize = 512;

pub use gateway_relay::serve as relay_gateway;
pub use l7::{http1_server, ExplainRequest, HttpSettings};

pub use l7::GatewayTls;

/// Serves the HTTP connection of a client outside the mesh that reached
/// the ingress at `local` from `client`; its requests go into the mesh as
/// `pod`, the ingress's own identity.
pub async fn serve_gateway<S>(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    stream: S,
    (local, client): (SocketAddr, SocketAddr),
    http2: bool,
    tls: Option<GatewayTls>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let entry = (local, l7::Entry::Gateway { client, tls });
    l7::serve(proxy, pod, stream, entry, http2, None).await
}

/// State shared by every listener of the node.
pub struct Proxy {
    /// This node's name, as Workloads' `spec.node` names it.
    pub node: String,
    pub config: Arc<ConfigStore>,
    pub identities: Arc<Identities>,
    /// HBONE connections to other nodes' agents.
    pub hbone: transport::Pool,
    /// Enrolled workloads of this node by address: same-node destinations
    /// are delivered to directly.
    /// Read on every request (the hop choice), written only as workloads
    /// enroll and leave: swapped whole, never locked by readers.
    local: ArcSwap<HashMap<IpAddr, Arc<Pod>>>,
    orig_dst: OrigDstTable,
    /// Deliveries to applications that sk_lookup lets through.
    deliveries: DeliveryTable,
    settings: Settings,
    /// Descriptors for connections, split between workloads.
    pub descriptors: Arc<Descriptors>,
    outbound: Counters,
    inbound: Counters,
    recent: Mutex<VecDeque<ConnectionRecord>>,
    /// Round-robin position per service.
    next_endpoint: Mutex<HashMap<String, usize>>,
    /// L7 endpoint state (latency, ejections) per destination.
    clusters: l7::Clusters,
    /// Set once the node was handed over: HTTP connections end at a
    /// request boundary.
    pub drain: Drain,
    /// Opaque relays that can be carried to the next agent.
    pub carrier: carry::Carrier,
    /// Resumable HBONE streams with an end here (either end).
    pub resumable: Arc<transport::resume::Registry>,
    /// Connections and requests that AuthorizationPolicy denied.
    pub denials: authorize::Denials,
    /// Istio's metrics of every request and connection.
    pub telemetry: Arc<Telemetry>,
    /// The threads connections are served on.
    pub workers: Arc<Workers>,
}

impl Proxy {
    pub fn new(
        node: String,
        config: Arc<ConfigStore>,
        identities: Arc<Identities>,
        orig_dst: OrigDstTable,
        deliveries: DeliveryTable,
        settings: Settings,
        descriptors: Arc<Descriptors>,
    ) -> std::io::Result<Proxy> {
        let trust_domain = identities.trust_domain();
        let tracer = settings
            .tracing
            .clone()
            .map(|tracing| Tracer::start(tracing, &node, trust_domain));
        let telemetry = Arc::new(Telemetry::new(
            config.clone(),
            trust_domain,
            tracer,
            settings.access_log,
        ));
        Ok(Proxy {
            workers: Arc::new(Workers::start(settings.workers)?),
            node,
            config,
            telemetry,
            hbone: transport::Pool::new(identities.clone()),
            identities,
            local: ArcSwap::default(),
            orig_dst,
            deliveries,
            settings,
            descriptors,
            outbound: Counters::default(),
            inbound: Counters::default(),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CONNECTIONS)),
            next_endpoint: Mutex::new(HashMap::new()),
            clusters: l7::Clusters::default(),
            drain: Drain::default(),
            carrier: carry::Carrier::default(),
            resumable: Arc::default(),
            denials: authorize::Denials::default(),
        })
    }

    /// The effective routing table (`nodemesh routes`).
    pub fn routes(&self, config: &crate::config::Config) -> serde_json::Value {
        l7::inspect::routes(self, config)
    }

    /// The AuthorizationPolicies that apply (`nodemesh policies`).
    pub fn policies(
        &self,
        config: &crate::config::Config,
        workload: Option<&str>,
    ) -> Result<serde_json::Value, String> {
        authorize::policies(config, &self.node, &self.denials, workload)
    }

    /// What a request would go through (`nodemesh explain`).
    pub fn explain(
        &self,
        config: &crate::config::Config,
        ask: &ExplainRequest,
    ) -> Result<serde_json::Value, String> {
        l7::inspect::explain(self, config, ask)
    }

    /// The SPIFFE id of a workload of the configuration.
    pub fn identity_of(&self, workload: &crate::config::Workload) -> SpiffeId {
        let trust_domain = self.identities.trust_domain();
        SpiffeId::new(trust_domain, &workload.namespace, &workload.service_account)
    }

    /// Serves `pod`'s addresses to same-node callers (and HBONE streams).
    pub fn add_local(&self, pod: &Arc<Pod>) {
        self.local.rcu(|local| {
            let mut local = HashMap::clone(local);
            for &ip in &pod.addresses {
                local.insert(ip, pod.clone());
            }
            local
        });
    }

    pub fn remove_local(&self, pod: &Pod) {
        self.local.rcu(|local| {
            let mut local = HashMap::clone(local);
            local.retain(|_, p| p.key != pod.key);
            local
        });
    }

    /// The enrolled workload of this node at `ip`.
    fn local_pod(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.local.load().get(&ip).cloned()
    }

    pub fn counts(&self, direction: Direction) -> DirectionCounts {
        self.counters(direction).snapshot()
    }

    /// Established redirected connections not yet accepted by the agent.
    pub fn pending_original_destinations(&self) -> usize {
        self.orig_dst.awaiting_accept()
    }

    pub fn recent_connections(&self) -> Vec<ConnectionRecord> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Counts a connection reset at accept for lack of descriptors,
    /// node-wide and for the workload.
    fn reject(&self, pod: &Pod, direction: Direction) {
        self.counters(direction)
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        pod.tenant.count_rejection(direction);
    }

    fn counters(&self, direction: Direction) -> &Counters {
        match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    /// Tracks a connection from accept to close; `finish` records it.
    fn track(
        &self,
        direction: Direction,
        source: SocketAddr,
        original_destination: SocketAddr,
    ) -> Tracked<'_> {
        let counters = self.counters(direction);
        counters.open.fetch_add(1, Ordering::Relaxed);
        counters.total.fetch_add(1, Ordering::Relaxed);
        Tracked {
            proxy: self,
            caller: source.ip(),
            started: std::time::Instant::now(),
            record: self.record(direction, source, original_destination),
        }
    }

    /// The record of a connection starting now.
    fn record(
        &self,
        direction: Direction,
        source: SocketAddr,
        original_destination: SocketAddr,
    ) -> ConnectionRecord {
        ConnectionRecord {
            direction,
            source_workload: None,
            source_identity: None,
            destination_identity: None,
            transport: match direction {
                // Until shown otherwise (HBONE sets it).
                Direction::Inbound => Some("plaintext"),
                Direction::Outbound => None,
            },
            source,
            original_destination,
            service: None,
            destination_workload: None,
            upstream: None,
            protocol: "tcp",
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            duration_ms: 0,
            bytes_sent: 0,
            bytes_received: 0,
            outcome: String::new(),
            counted_live: false,
        }
    }

    /// The live counters of a TCP relay whose two ends are connected, if its
    /// metrics are on; counts it opened when `open` (not when it was handed
    /// over: the agent it came from did).
    fn count_live(
        &self,
        record: &mut ConnectionRecord,
        caller: IpAddr,
        open: bool,
    ) -> Option<LiveBytes> {
        let edge = tcp_edge(record, caller)?;
        let live = (self.telemetry).record_connection_live(record.local_workload(), &edge, open);
        record.counted_live = live.is_some();
        live
    }

    /// Index of the next endpoint of a service, round robin.
    fn next_index(&self, service: &str, endpoints: usize) -> Option<usize> {
        if endpoints == 0 {
            return None;
        }
        let mut next = self.next_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        let position = next.entry(service.to_owned()).or_insert(0);
        let chosen = *position % endpoints;
        *position = position.wrapping_add(1);
        Some(chosen)
    }
}

struct Tracked<'a> {
    proxy: &'a Proxy,
    /// The caller's own address (outbound connections are accepted from
    /// it only through the proxy's redirect, so `record.source` may differ).
    caller: IpAddr,
    started: std::time::Instant,
    record: ConnectionRecord,
}

impl Tracked<'_> {
    fn finish(mut self, outcome: Result<relay::Transferred, RelayError>) {
        let counters = self.proxy.counters(self.record.direction);
        counters.open.fetch_sub(1, Ordering::Relaxed);
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        if let Err(handed_over @ RelayError::HandedOver) = &outcome {
            // Neither failed nor over: the next agent reports it.
            self.record.outcome = handed_over.to_string();
            log::debug!("{:?}", self.record);
            return;
        }
        let failed = outcome.as_ref().err().map(RelayError::flag);
        match outcome {
            Ok(t) => {
                self.record.bytes_sent = t.sent;
                self.record.bytes_received = t.received;
                self.record.outcome = "ok".into();
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                self.record.outcome = e.to_string();
            }
        }
        log::debug!("{:?}", self.record);
        if let Some(done) = connection_done(&self.record, self.caller, failed) {
            let start = UNIX_EPOCH + Duration::from_millis(self.record.started_unix_ms);
            let duration = Duration::from_millis(self.record.duration_ms);
            let telemetry = &self.proxy.telemetry;
            telemetry.record_connection(self.record.local_workload(), &done, start, duration);
        }
        let mut recent = self.proxy.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_CONNECTIONS {
            recent.pop_front();
        }
        recent.push_back(self.record);
    }
}

/// Istio's view of a finished connection relayed as TCP (HTTP connections
/// are reported request by request instead).
fn connection_done(
    record: &ConnectionRecord,
    caller: IpAddr,
    failed: Option<Flag>,
) -> Option<ConnectionDone> {
    Some(ConnectionDone {
        edge: tcp_edge(record, caller)?,
        live: record.counted_live,
        flags: failed.map_or(ResponseFlags::NONE, ResponseFlags::of),
        received: record.bytes_sent,
        sent: record.bytes_received,
    })
}

/// The edge Istio reports a connection relayed as TCP under; none for HTTP
/// connections.
fn tcp_edge(record: &ConnectionRecord, caller: IpAddr) -> Option<EdgeKey> {
    if record.protocol != "tcp" {
        return None;
    }
    let destination = record.upstream.unwrap_or(record.original_destination);
    let edge = match record.direction {
        Direction::Outbound => EdgeKey {
            reporter: Reporter::Source,
            source: Some(caller),
            destination,
            service: record
                .service
                .is_some()
                .then_some(record.original_destination),
            mutual_tls: false,
        },
        Direction::Inbound => EdgeKey {
            reporter: Reporter::Destination,
            source: Some(caller),
            destination,
            service: None,
            mutual_tls: matches!(record.transport, Some("hbone" | "local")),
        },
    };
    Some(edge)
}

/// Serves one of a workload's listeners; each connection gets its own task
/// on a worker ([`Workers`]), so stopping the listener leaves open
/// connections to finish. A connection is admitted only with the
/// descriptors it needs (its own and its upstream's); otherwise it is reset
/// at once.
pub async fn serve(proxy: Arc<Proxy>, pod: Arc<Pod>, listener: TcpListener, direction: Direction) {
    let Some(listener) = Acceptor::polled(listener, &format_args!("{} {direction:?}", pod.key))
    else {
        return;
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let caller = match direction {
                    Direction::Outbound => None,
                    Direction::Inbound => Some(CallerKey::Address(peer.ip())),
                };
                let fds = match pod.tenant.charge(budget::FDS_PER_CONNECTION, caller) {
                    Ok(fds) => fds,
                    Err(refused) => {
                        proxy.reject(&pod, direction);
                        log::debug!("{} {direction:?} from {peer} refused: {refused}", pod.key);
                        if direction == Direction::Outbound {
                            // Its destination is not needed any more.
                            proxy.orig_dst.take(pod.netns.cookie(), peer);
                        }
                        relay::reset(&stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let served = (proxy.clone(), pod.clone());
                proxy.workers.serve(stream, peer, move |stream| async move {
                    let (proxy, pod) = served;
                    match direction {
                        Direction::Outbound => {
                            outbound::handle(proxy, pod, stream, peer, fds).await
                        }
                        // Boxed at its own size (3 KiB): every outbound
                        // connection, the most common, holds only its own.
                        Direction::Inbound => {
                            Box::pin(inbound::handle(proxy, pod, stream, peer, fds)).await
                        }
                    }
                });
            }
            Err(e) => {
                // Cannot come from a tenant (their descriptors are budgeted);
                // back off instead of spinning.
                log::warn!("{} {direction:?} listener: accept failed: {e}", pod.key);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Handles of the tasks serving one workload; dropping them stops serving.
pub struct PodTasks(pub Vec<JoinHandle<()>>);

impl Drop for PodTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
