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
//! - At a hand-over of the destination's agent the roles swap (`moved`):
//!   its relay quiesces the stream with the caller's agent, the parked
//!   application socket goes to the next agent, and the caller's agent
//!   resumes the stream there.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::carry::{Carried, CarriedMeta};
use super::moved::{relay_resumable, QuiescedBy};
use super::outcome::RelayError;
use super::peer::Prefixed;
use super::quiesce::{self, Closing, Start};
use super::relay::{self, Ended, RelayOptions, Stopped, Transferred};
use super::{Direction, Pod, Proxy};
use crate::identity::SpiffeId;
use crate::telemetry::LiveBytes;
use crate::transport::resume::{Resumable, ResumeId, PARK_GRACE};
use crate::transport::{Destination, Source, Tunnel};

/// How a resumable stream resumes: its id, and where its other end is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resume {
    pub id: ResumeId,
    /// The other end's node, its agent's HBONE address, and the workload's
    /// `ip:port` there (the destination's, on the caller's side; the
    /// caller's address on the destination's side, whose agent quiesces
    /// it from there).
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

    pub(super) fn destination(&self) -> Destination {
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
    /// [`RelayError::HandedOver`]). At a hand-over of the destination's
    /// agent, quiesced by it, resumes the stream with the next one. `head`,
    /// read from the client already, goes into the first stream first. What
    /// moved counts from the connection's start.
    pub(super) async fn relay_hbone(
        &self,
        client: &TcpStream,
        (first, mut head): (&mut Prefixed<Tunnel>, &[u8]),
        mut meta: CarriedMeta,
        live: Option<LiveBytes>,
    ) -> Result<Transferred, RelayError> {
        let resume = meta.hbone.clone().expect("a resumable relay's stream");
        let (source, destination) = (self.source_of(&meta)?, resume.destination());
        let how = RelayOptions {
            idle: self.idle_of(&meta),
            live,
        };
        let id = resume.id;
        let mut relaying = self.carrier.enter();
        // Disarmed once quiesced here (too late to be carried).
        let mut hand_over = Some(self.carrier.told());
        let mut moves = self.movable_end(&meta, &resume);
        let mut resumed: Option<Prefixed<Tunnel>> = None;
        loop {
            let stream = match resumed.as_mut() {
                Some(stream) => stream,
                None => &mut *first,
            };
            let ask = |sent| self.ask_to_quiesce(&source, &destination, id, sent);
            let requests = moves.as_mut().map(|end| &mut end.control);
            let start = Start {
                ended: meta.ended,
                head: std::mem::take(&mut head),
            };
            let (stopped, by) = relay_resumable(
                client,
                stream,
                how.clone(),
                start,
                hand_over.as_mut(),
                requests,
                ask,
            )
            .await?;
            if let Some(moved) = meta.moved(stopped) {
                return Ok(moved);
            }
            let ended = meta.ended;
            if let QuiescedBy::Peer(_) = by {
                // The destination's agent was handed over: its next one
                // resumes the stream.
                quiesce::close(stream, ended, Closing::Second).await;
                // Boxed, as the resumption below: rare, and 6 KiB each
                // that every open relay's future would hold otherwise.
                let next = Box::pin(self.resume_moved(&source, &destination, id)).await;
                resumed = Some(next.inspect_err(|_| relay::reset(client))?);
                continue;
            }
            hand_over = None;
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
            let resuming = (self.hbone).resume(&source, &destination, id, timeout);
            let tunnel = Box::pin(resuming).await.map_err(|e| {
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
        if meta.direction == Direction::Inbound {
            // The destination's end, moved here with its application's socket.
            return self.resume_parked(pod, client, meta).await;
        }
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
            self.relay_hbone(client, (&mut tunnel, &[]), meta.clone(), live)
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
/// socket `app` and the stream (`first`, with what the application sent
/// already to write into it first; or the one that resumes the stream
/// `parked`) until both end. Quiesced by the caller's agent (it is
/// handed over), parks `app` until a new stream resumes it, or closes it
/// after [`PARK_GRACE`]. At a hand-over of this agent, quiesces the stream
/// with the caller's agent and carries `app` to the next agent (then ends
/// with [`RelayError::HandedOver`]). What moved counts from the
/// connection's start, as the caller sees it (`sent`: what it sent).
pub(super) async fn relay_parkable(
    proxy: &Proxy,
    app: &TcpStream,
    mut first: Option<(&mut Prefixed<Tunnel>, &[u8])>,
    mut parked: Option<oneshot::Receiver<Tunnel>>,
    mut meta: CarriedMeta,
    live: Option<LiveBytes>,
    mut resumable: Resumable,
) -> Result<Transferred, RelayError> {
    let how = RelayOptions {
        idle: proxy.idle_of(&meta),
        live: live.map(LiveBytes::reversed),
    };
    let id = resumable.id;
    // Movable at this agent's hand-over when the caller's end is known.
    let mover = meta.hbone.as_ref().and_then(|caller_end| {
        let identity = SpiffeId::parse(meta.destination_identity.as_deref()?).ok()?;
        let address = meta.upstream.unwrap_or(meta.original_destination).ip();
        Some((Source { identity, address }, caller_end.destination()))
    });
    let mut relaying = mover.as_ref().map(|_| proxy.carrier.enter());
    let mut hand_over = mover.as_ref().map(|_| proxy.carrier.told());
    let mut resumed: Option<Prefixed<Tunnel>> = None;
    loop {
        if let Some(next) = parked.take() {
            log::info!(
                "stream {id} quiesced: its application socket waits for the caller's next agent"
            );
            match tokio::time::timeout(PARK_GRACE, next).await {
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
        let (stream, head) = match (resumed.as_mut(), first.take()) {
            (Some(stream), _) => (stream, &[][..]),
            (None, Some(first)) => first,
            (None, None) => unreachable!("a stream to relay, or one resuming"),
        };
        let mover = mover.as_ref();
        let ask = |sent| async move {
            let (source, caller_node) = mover?;
            proxy.ask_to_quiesce(source, caller_node, id, sent).await
        };
        let start = Start {
            ended: flip_ended(meta.ended),
            head,
        };
        let requests = Some(&mut resumable.control);
        let (stopped, by) = relay_resumable(
            app,
            stream,
            how.clone(),
            start,
            hand_over.as_mut(),
            requests,
            ask,
        )
        .await?;
        if let Some(moved) = meta.moved(flip_stopped(stopped)) {
            return Ok(moved);
        }
        let ended = flip_ended(meta.ended);
        if let QuiescedBy::Peer(next) = by {
            quiesce::close(stream, ended, Closing::Second).await;
            parked = Some(next);
            continue;
        }
        // Moved: the caller's agent resumes the stream with the next agent,
        // which gets the application's socket, parked under the same id.
        let carried = app.as_fd().try_clone_to_owned().map(|app| Carried {
            meta: meta.clone(),
            client: app,
            upstream: None,
        });
        let offered = match (carried, relaying.as_mut()) {
            (Ok(carried), Some(relaying)) => relaying.offer(carried),
            (Err(e), _) => {
                log::warn!("stream {id} cannot be handed over: {e}");
                false
            }
            (_, None) => false,
        };
        quiesce::close(stream, ended, Closing::First).await;
        if offered {
            return Err(RelayError::HandedOver);
        }
        relay::reset(app);
        return Err(format!("stream {id} was quiesced too late to be handed over").into());
    }
}

/// From the application's view (sent: to the caller) to the caller's, and
/// back.
fn flip_ended(ended: Ended) -> Ended {
    Ended {
        sent: ended.received,
        received: ended.sent,
    }
}

fn flip_stopped(stopped: Stopped) -> Stopped {
    let flip = |moved: Transferred| Transferred {
        sent: moved.received,
        received: moved.sent,
    };
    match stopped {
        Stopped::Closed(moved) => Stopped::Closed(flip(moved)),
        Stopped::Quiesced(moved, ended) => Stopped::Quiesced(flip(moved), flip_ended(ended)),
    }
}
