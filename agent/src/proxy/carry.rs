//! Opaque TCP relays carried to the next agent at a hand-over.
//!
//! A relay whose two sockets are plain TCP held by this agent (plaintext to
//! a destination outside the mesh, plaintext inbound) survives an upgrade:
//! once the node is handed over, every such relay is quiesced (it stops
//! reading both sides after writing everything it read, see `relay`), its
//! two sockets are duplicated and given with its metadata to the
//! hand-over, which passes them to the new agent; there [`Proxy::resume`]
//! relays them on. Bytes not read yet wait in the sockets' kernel buffers,
//! so none is lost or sent twice. A relay that quiesces too late (after
//! [`Carrier::collect`]) goes on in the old agent until the drain deadline.
//!
//! A relay between two workloads of this node is one such relay (the
//! caller's socket relayed to the application's), carried with the records
//! of both its ends. A relay to a workload on another node, through a
//! resumable HBONE stream, is carried with its client's socket alone: TLS
//! and HTTP/2 state cannot move, so the stream is quiesced with the
//! destination's agent and the next agent opens a new one (`resume`). The
//! destination's end of such a stream is carried with its application's
//! socket alone, parked until the caller's agent resumes the stream with
//! the next agent (`moved`).
//! Streams that are not resumable (to a ztunnel) stay with the old agent.
//! An L7 tunnel from a workload's socket to a plain socket or a resumable
//! HBONE stream (a WebSocket to a plaintext endpoint, or to a workload on
//! another node) is relayed, and carried, as an opaque relay once its
//! protocol switched (`l7::tunnel`); at the stream's destination, the
//! upgraded connection becomes a parkable relay (`l7::inbound`).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::budget::{self, CallerKey};
use super::detect::Detected;
use super::outcome::RelayError;
use super::relay::{self, Ended, RelayOptions, Stopped, Transferred};
use super::resume::Resume;
use super::{inbound, ConnectionRecord, Direction, Proxy, Tracked};
use crate::identity::SpiffeId;
use crate::telemetry::LiveBytes;

/// What the next agent needs to relay a connection on, report it and charge
/// it to its workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedMeta {
    pub direction: Direction,
    /// The address of the enrolled workload the relay is charged to.
    pub workload_address: IpAddr,
    /// The caller's own address (telemetry's source).
    pub caller: IpAddr,
    pub source: SocketAddr,
    pub original_destination: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub service: Option<String>,
    pub source_workload: Option<String>,
    pub source_identity: Option<String>,
    pub destination_workload: Option<String>,
    pub destination_identity: Option<String>,
    pub started_unix_ms: u64,
    /// Moved before this agent had it (earlier agents included).
    pub transferred: Transferred,
    pub ended: Ended,
    /// The TLS server name the caller asked for, when a policy needs it.
    #[serde(default)]
    pub sni: Option<String>,
    /// For a relay between two workloads of this node (inbound), the same
    /// connection as its caller's side records it.
    #[serde(default)]
    pub caller_side: Option<Box<CarriedMeta>>,
    /// For a relay to a workload on another node, the resumable HBONE
    /// stream it relays to (quiesced with the destination's agent): the
    /// next agent resumes it with a new stream.
    #[serde(default)]
    pub hbone: Option<Resume>,
    /// An HTTP/1.1 connection that switched protocols (a WebSocket): its
    /// record stays an HTTP one (see `l7::tunnel`).
    #[serde(default)]
    pub upgraded: bool,
}

impl CarriedMeta {
    /// The metadata of a relay about to start, for `record` charged to the
    /// workload at `workload_address`.
    pub fn of(record: &ConnectionRecord, workload_address: IpAddr, caller: IpAddr) -> CarriedMeta {
        CarriedMeta {
            direction: record.direction,
            workload_address,
            caller,
            source: record.source,
            original_destination: record.original_destination,
            upstream: record.upstream,
            service: record.service.clone(),
            source_workload: record.source_workload.clone(),
            source_identity: record.source_identity.clone(),
            destination_workload: record.destination_workload.clone(),
            destination_identity: record.destination_identity.clone(),
            started_unix_ms: record.started_unix_ms,
            transferred: Transferred::default(),
            ended: Ended::default(),
            sni: None,
            caller_side: None,
            hbone: None,
            upgraded: false,
        }
    }
}

impl CarriedMeta {
    /// Adds what a relay moved until it `stopped`: everything it moved
    /// once closed, `None` when quiesced (what ended is kept).
    pub(super) fn moved(&mut self, stopped: Stopped) -> Option<Transferred> {
        match stopped {
            Stopped::Closed(transferred) => Some(self.transferred + transferred),
            Stopped::Quiesced(transferred, ended) => {
                self.transferred = self.transferred + transferred;
                self.ended = ended;
                None
            }
        }
    }
}

/// A quiesced relay: its client's socket, and its upstream's unless it
/// relays to a resumable HBONE stream (`meta.hbone`; at the stream's
/// destination, `client` is the application's socket).
pub struct Carried {
    pub meta: CarriedMeta,
    pub client: OwnedFd,
    pub upstream: Option<OwnedFd>,
}

#[derive(Default)]
struct State {
    /// Carriable relays running.
    relaying: usize,
    /// `collect` has not ended yet.
    closed: bool,
    carried: Vec<Carried>,
}

/// The carriable relays of this agent.
pub struct Carrier {
    quiesce: watch::Sender<bool>,
    state: Mutex<State>,
    changed: Notify,
}

impl Default for Carrier {
    fn default() -> Self {
        Carrier {
            quiesce: watch::Sender::new(false),
            state: Mutex::default(),
            changed: Notify::new(),
        }
    }
}

/// A carriable relay running; counted until carried or dropped.
pub(super) struct Relaying<'a> {
    carrier: &'a Carrier,
    counted: bool,
}

impl Relaying<'_> {
    /// Hands a quiesced relay over, unless collecting is over (`false`:
    /// relay on here; the duplicates close).
    pub(super) fn offer(&mut self, carried: Carried) -> bool {
        let mut state = self.carrier.lock();
        if state.closed || !self.counted {
            return false;
        }
        state.carried.push(carried);
        state.relaying -= 1;
        self.counted = false;
        drop(state);
        self.carrier.changed.notify_one();
        true
    }
}

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.carrier.lock().relaying -= 1;
            self.carrier.changed.notify_one();
        }
    }
}

impl Carrier {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn enter(&self) -> Relaying<'_> {
        self.lock().relaying += 1;
        Relaying {
            carrier: self,
            counted: true,
        }
    }

    /// Turns true when the relays are to quiesce.
    pub(super) fn told(&self) -> watch::Receiver<bool> {
        self.quiesce.subscribe()
    }

    /// Quiesces every carriable relay and returns those that stopped within
    /// `window` (the others relay on here).
    pub async fn collect(&self, window: Duration) -> Vec<Carried> {
        self.quiesce.send_replace(true);
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.lock();
                if state.relaying == 0 {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let mut state = self.lock();
        state.closed = true;
        std::mem::take(&mut state.carried)
    }
}

impl Proxy {
    /// Relays `client` and `upstream` to their end, or until the node is
    /// handed over: then the relay is carried to the next agent and ends
    /// here with [`RelayError::HandedOver`]. On failure both sockets are reset. What
    /// moved counts from the connection's start (`meta` says what moved
    /// before).
    pub(super) async fn relay_carriable(
        &self,
        client: &TcpStream,
        upstream: &TcpStream,
        mut meta: CarriedMeta,
        live: Option<LiveBytes>,
    ) -> Result<Transferred, RelayError> {
        let how = RelayOptions {
            idle: self.idle_of(&meta),
            live,
        };
        let mut relaying = self.carrier.enter();
        let mut quiesce = Some(self.carrier.told());
        loop {
            let stopped =
                relay::relay(client, upstream, how.clone(), meta.ended, quiesce.take()).await?;
            if let Some(moved) = meta.moved(stopped) {
                return Ok(moved);
            }
            let carried = (|| {
                Ok::<_, std::io::Error>(Carried {
                    meta: meta.clone(),
                    client: client.as_fd().try_clone_to_owned()?,
                    upstream: Some(upstream.as_fd().try_clone_to_owned()?),
                })
            })();
            match carried.map(|carried| relaying.offer(carried)) {
                Ok(true) => return Err(RelayError::HandedOver),
                // Too late, or out of descriptors: relayed here until the
                // drain deadline.
                Ok(false) => {}
                Err(e) => log::warn!("a relay cannot be handed over: {e}"),
            }
        }
    }

    /// How long a carriable relay may stand idle: an upgraded HTTP
    /// connection keeps HTTP's idle timeout.
    pub(super) fn idle_of(&self, meta: &CarriedMeta) -> Duration {
        match meta.upgraded {
            true => self.settings.http.idle_timeout,
            false => self.settings.idle_timeout,
        }
    }

    /// Relays on a connection the previous agent carried over.
    pub async fn resume(self: Arc<Self>, carried: Carried) {
        let Carried {
            meta,
            client,
            upstream,
        } = carried;
        let (client, upstream) = match (stream(client), upstream.map(stream).transpose()) {
            (Ok(client), Ok(upstream)) => (client, upstream),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("a relay handed over cannot be resumed: {e}");
                return;
            }
        };
        let close = |why: &dyn std::fmt::Display| {
            log::warn!("relay from {} handed over closed: {why}", meta.source);
            relay::reset(&client);
            if let Some(upstream) = &upstream {
                relay::reset(upstream);
            }
        };
        let Some(pod) = self.local_pod(meta.workload_address) else {
            let gone = format!("no enrolled workload at {} any more", meta.workload_address);
            return close(&gone);
        };
        let caller = match meta.direction {
            Direction::Inbound => Some(CallerKey::Address(meta.caller)),
            Direction::Outbound => None,
        };
        let _fds = match pod.tenant.charge(budget::FDS_PER_CONNECTION, caller) {
            Ok(fds) => fds,
            Err(refused) => return close(&format!("{}: {refused}", pod.key)),
        };
        let Some(upstream) = upstream else {
            // To a workload on another node: a new HBONE stream resumes it.
            return self.resume_hbone(&pod, &client, meta).await;
        };
        // A same-node relay was "local" on both sides; others plaintext.
        let transport = match meta.caller_side {
            Some(_) => "local",
            None => "plaintext",
        };
        let mut tracked = self.track_carried(&meta, transport);
        let mut caller_side = meta
            .caller_side
            .as_deref()
            .map(|side| (self.track_carried(side, transport), side.caller));
        // The agent it came from counted it opened.
        let live = self.count_live(&mut tracked.record, meta.caller, false);
        let caller_live = caller_side
            .as_mut()
            .and_then(|(side, caller)| self.count_live(&mut side.record, *caller, false));
        let live = LiveBytes::both(live, caller_live);
        let relayed = pin!(self.relay_carriable(&client, &upstream, meta.clone(), live));
        let outcome = match meta.direction {
            Direction::Outbound => relayed.await,
            // The configuration may refuse it from now on, as any other.
            Direction::Inbound => {
                let app = meta.upstream.unwrap_or(meta.original_destination);
                // Only a same-node caller's is set (HBONE relays stay).
                let identity =
                    (meta.source_identity.as_deref()).and_then(|id| SpiffeId::parse(id).ok());
                let mut caller = inbound::Caller::new(identity, meta.caller);
                caller.sni.clone_from(&meta.sni);
                let tcp = Detected::Opaque;
                inbound::unless_refused(&self, &pod, &caller, app, tcp, relayed).await
            }
        };
        if let Some((side, _)) = caller_side {
            side.finish(outcome.clone());
        }
        tracked.finish(outcome);
    }

    /// The record of a relay handed over, as the agent it came from had it.
    pub(super) fn track_carried(&self, meta: &CarriedMeta, transport: &'static str) -> Tracked<'_> {
        let mut tracked = self.track(meta.direction, meta.source, meta.original_destination);
        let ago = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| now.as_millis() as u64)
            .saturating_sub(meta.started_unix_ms);
        tracked.started = Instant::now()
            .checked_sub(Duration::from_millis(ago))
            .unwrap_or_else(Instant::now);
        tracked.caller = meta.caller;
        let record = &mut tracked.record;
        record.started_unix_ms = meta.started_unix_ms;
        record.transport = Some(transport);
        if meta.upgraded {
            record.protocol = "http/1.1";
        }
        record.upstream = meta.upstream;
        record.service.clone_from(&meta.service);
        record.source_workload.clone_from(&meta.source_workload);
        record.source_identity.clone_from(&meta.source_identity);
        record
            .destination_workload
            .clone_from(&meta.destination_workload);
        record
            .destination_identity
            .clone_from(&meta.destination_identity);
        tracked
    }
}

fn stream(fd: OwnedFd) -> std::io::Result<TcpStream> {
    let socket = std::net::TcpStream::from(fd);
    socket.set_nonblocking(true)?;
    TcpStream::from_std(socket)
}
