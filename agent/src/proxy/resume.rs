//! Opaque relays through resumable HBONE streams, across a hand-over of
//! the caller's agent (see `transport::resume` for the exchange).
//!
//! - The caller's side ([`Proxy::relay_hbone`]): at a hand-over the relay
//!   quiesces with the destination's agent, and its client's socket is
//!   carried to the next agent, which resumes the stream
//!   ([`Proxy::resume_hbone`]) as the same workload to the same node.
//! - The destination's side ([`relay_parkable`]): a quiesced stream's
//!   application socket is parked, still charged to its workload, for at
//!   most [`PARK_GRACE`]; a resumed stream picks it up, and the connection
//!   goes on as one, with one record.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::carry::{Carried, CarriedMeta};
use super::outcome::RelayError;
use super::peer::Prefixed;
use super::quiesce::{self, Closing};
use super::relay::{self, RelayOptions, Stopped, Transferred};
use super::{Pod, Proxy};
use crate::identity::SpiffeId;
use crate::telemetry::LiveBytes;
use crate::transport::resume::{Resumable, ResumeId, PARK_GRACE};
use crate::transport::{Destination, Source, Tunnel};

/// How a resumable stream resumes: its id, and where it goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resume {
    pub id: ResumeId,
    /// The destination's node, its HBONE address, and the workload's
    /// `ip:port` there.
    pub node: String,
    pub node_addr: SocketAddr,
    pub to: SocketAddr,
}

impl Resume {
    pub fn of(id: ResumeId, destination: &Destination) -> Resume {
        Resume {
            id,
            node: destination.node.clone(),
            node_addr: destination.node_addr,
            to: destination.to,
        }
    }

    fn destination(&self) -> Destination {
        Destination {
            node: self.node.clone(),
            node_addr: self.node_addr,
            to: self.to,
        }
    }
}

impl Proxy {
    /// Relays `client` and a resumable stream (`meta.hbone`) to their end;
    /// at a hand-over, quiesces the stream with the destination's agent and
    /// carries the client to the next agent (then ends with
    /// [`RelayError::HandedOver`]). What moved counts from the connection's start.
    pub(super) async fn relay_hbone(
        &self,
        client: &TcpStream,
        first: &mut Prefixed<Tunnel>,
        mut meta: CarriedMeta,
        live: Option<LiveBytes>,
    ) -> Result<Transferred, RelayError> {
        let resume = meta.hbone.clone().expect("a resumable relay's stream");
        let (source, destination) = (self.source_of(&meta)?, resume.destination());
        let how = RelayOptions {
            idle: self.settings.idle_timeout,
            live,
        };
        let id = resume.id;
        let mut relaying = self.carrier.enter();
        let mut hand_over = Some(self.carrier.told());
        let mut resumed: Option<Prefixed<Tunnel>> = None;
        loop {
            let stream = match resumed.as_mut() {
                Some(stream) => stream,
                None => &mut *first,
            };
            let quiesce = hand_over.take();
            let told = async move {
                if let Some(mut quiesce) = quiesce {
                    if quiesce.wait_for(|q| *q).await.is_ok() {
                        return;
                    }
                }
                // Quiesced here once already (too late to be carried).
                std::future::pending().await
            };
            let exchange = |sent| {
                let (source, destination) = (&source, &destination);
                async move {
                    let timeout = self.settings.connect_timeout;
                    let hbone = &self.hbone;
                    match hbone.quiesce(source, destination, id, sent, timeout).await {
                        Ok(theirs) => Some(theirs),
                        Err(e) => {
                            log::warn!("stream {id} cannot be quiesced, relayed on: {e}");
                            None
                        }
                    }
                }
            };
            let stopped =
                quiesce::relay(client, stream, how.clone(), meta.ended, told, exchange).await?;
            if let Some(moved) = meta.moved(stopped) {
                return Ok(moved);
            }
            let ended = meta.ended;
            let carried = client.as_fd().try_clone_to_owned().map(|client| Carried {
                meta: meta.clone(),
                client,
                upstream: None,
            });
            let offered = match carried {
                Ok(carried) => relaying.offer(carried),
                Err(e) => {
                    log::warn!("a relay cannot be handed over: {e}");
                    false
                }
            };
            quiesce::close(stream, ended, Closing::First).await;
            if offered {
                return Err(RelayError::HandedOver);
            }
            // Too late to be carried: resumed here, until the drain deadline.
            let timeout = self.settings.connect_timeout;
            let tunnel = (self.hbone)
                .resume(&source, &destination, id, timeout)
                .await
                .map_err(|e| {
                    relay::reset(client);
                    format!("resuming stream {id}: {e}")
                })?;
            resumed = Some(Prefixed::new(tunnel));
        }
    }

    /// Relays on a connection to a workload on another node that the
    /// previous agent carried over: a new stream resumes the quiesced one,
    /// as the same workload (still enrolled here with the same identity)
    /// to the same node.
    pub(super) async fn resume_hbone(&self, pod: &Pod, client: &TcpStream, meta: CarriedMeta) {
        let mut tracked = self.track_carried(&meta, "hbone");
        let live = self.count_live(&mut tracked.record, meta.caller, false);
        let resume = meta.hbone.clone().expect("an HBONE relay's stream");
        let outcome = async {
            let source = self.source_of(&meta)?;
            if source.identity != pod.identity {
                return Err(RelayError::Failed(format!(
                    "{} is {} now, not {}",
                    meta.workload_address, pod.identity, source.identity
                )));
            }
            let timeout = self.settings.connect_timeout;
            let destination = resume.destination();
            let tunnel = (self.hbone)
                .resume(&source, &destination, resume.id, timeout)
                .await
                .map_err(|e| format!("resuming stream {}: {e}", resume.id))?;
            let mut tunnel = Prefixed::new(tunnel);
            self.relay_hbone(client, &mut tunnel, meta.clone(), live)
                .await
        };
        let outcome = outcome.await;
        if let Err(e) = &outcome {
            if *e != RelayError::HandedOver {
                log::warn!("{}: relay handed over closed: {e}", pod.key);
                relay::reset(client);
            }
        }
        tracked.finish(outcome);
    }

    /// The workload a carried relay opened its stream as.
    fn source_of(&self, meta: &CarriedMeta) -> Result<Source, String> {
        let identity = meta.source_identity.as_deref().unwrap_or_default();
        let identity = SpiffeId::parse(identity)
            .map_err(|e| format!("a resumable relay's source identity: {e}"))?;
        Ok(Source {
            identity,
            address: meta.caller,
        })
    }
}

/// The destination's side of a resumable stream: relays the application's
/// socket `app` and the stream until both end; quiesced (the caller's agent
/// is handed over), parks `app` until a new stream resumes it, or closes it
/// after [`PARK_GRACE`]. `sent` is what the caller sent, as for any
/// inbound relay.
pub(super) async fn relay_parkable(
    first: &mut Prefixed<Tunnel>,
    proxy: &Proxy,
    app: &TcpStream,
    live: Option<LiveBytes>,
    mut resumable: Resumable,
) -> Result<Transferred, RelayError> {
    let how = RelayOptions {
        idle: proxy.settings.idle_timeout,
        live: live.map(LiveBytes::reversed),
    };
    let id = resumable.id;
    let (mut moved, mut ended) = (Transferred::default(), relay::Ended::default());
    let mut resumed: Option<Prefixed<Tunnel>> = None;
    loop {
        let stream = match resumed.as_mut() {
            Some(stream) => stream,
            None => &mut *first,
        };
        // The quiesce asked for, then the stream that will resume it.
        let (asked, next) = (Mutex::new(None), Mutex::new(None));
        let told = async {
            match resumable.control.recv().await {
                Some(quiesce) => *lock(&asked) = Some(quiesce),
                None => std::future::pending().await,
            }
        };
        let exchange = |sent| {
            let quiesce = lock(&asked).take();
            let next = &next;
            async move {
                let quiesce = quiesce?;
                quiesce.reply.send(sent).ok()?;
                *lock(next) = Some(quiesce.next);
                Some(quiesce.their_sent)
            }
        };
        let stopped = quiesce::relay(app, stream, how.clone(), ended, told, exchange).await?;
        let (transferred, now_ended) = match stopped {
            Stopped::Closed(transferred) => return Ok(flip(moved + transferred)),
            Stopped::Quiesced(transferred, now_ended) => (transferred, now_ended),
        };
        (moved, ended) = (moved + transferred, now_ended);
        quiesce::close(stream, ended, Closing::Second).await;
        let parked = lock(&next).take();
        let parked = parked.expect("a quiesced stream has its next one coming");
        log::info!(
            "stream {id} quiesced: its application socket waits for the caller's next agent"
        );
        match tokio::time::timeout(PARK_GRACE, parked).await {
            Ok(Ok(tunnel)) => resumed = Some(Prefixed::new(tunnel)),
            _ => {
                relay::reset(app);
                return Err(format!(
                    "the caller's agent did not resume stream {id} within {PARK_GRACE:?}"
                )
                .into());
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// From the application's view (sent: to the caller) to the caller's.
fn flip(moved: Transferred) -> Transferred {
    Transferred {
        sent: moved.received,
        received: moved.sent,
    }
}
