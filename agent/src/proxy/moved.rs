//! Resumable HBONE streams quiesced by either end's agent, so that they
//! survive a hand-over of the destination's agent as well as the caller's
//! (see `transport::resume` for the exchange).
//!
//! A hand-over of the destination's agent moves the stream the other way
//! round from the caller's: the old destination agent cannot start a
//! request on the caller's HTTP/2 connection, so it opens its own to the
//! caller's node, as the destination workload (the identity the caller's
//! agent registered its end for), and sends the same quiesce with its
//! count. Both ends read up to the other's count; the old agent carries
//! the application's socket to the new one, which adopts it parked under
//! the same id ([`Proxy::resume_parked`]); the caller's agent resumes the
//! stream with a `CONNECT` that the new agent (now owning port 15008)
//! answers. A caller's agent that registered nothing (a ztunnel, an older
//! nodemesh) refuses the quiesce, and the stream stays with the old agent
//! until the drain deadline, as before.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::carry::CarriedMeta;
use super::detect::Detected;
use super::inbound::{self, Caller};
use super::outcome::RelayError;
use super::peer::Prefixed;
use super::quiesce::{self, Start};
use super::relay::{self, RelayOptions, Stopped};
use super::resume::{relay_parkable, Resume};
use super::{Pod, Proxy};
use crate::identity::SpiffeId;
use crate::transport::resume::{Quiesce, Resumable, ResumeId, PARK_GRACE};
use crate::transport::server::StreamRequest;
use crate::transport::{Destination, Source, TransportError, Tunnel, HBONE_PORT};

/// How often the caller's agent asks again for a moved stream that the
/// new destination agent does not know yet (its socket is on its way).
const RESUME_RETRY: Duration = Duration::from_millis(20);

/// Who quiesced a resumable stream.
pub(super) enum QuiescedBy {
    /// This agent, at its hand-over: it asked the other end's agent.
    ThisAgent,
    /// The other end's agent; on the destination's side, the stream that
    /// resumes it arrives on the receiver.
    Peer(oneshot::Receiver<Tunnel>),
}

/// [`quiesce::relay`] (from `start`) on a resumable stream that either
/// end's agent can quiesce: this agent's hand-over (`hand_over`, when
/// armed), and then `ask` exchanges the counts with the other end's agent;
/// or a request of the other end's agent on `requests`, answered with this
/// side's count.
pub(super) async fn relay_resumable<F: Future<Output = Option<u64>>>(
    socket: &TcpStream,
    stream: &mut Prefixed<Tunnel>,
    how: RelayOptions,
    start: Start<'_>,
    hand_over: Option<&mut watch::Receiver<bool>>,
    requests: Option<&mut mpsc::Receiver<Quiesce>>,
    ask: impl FnOnce(u64) -> F,
) -> io::Result<(Stopped, QuiescedBy)> {
    let asked: Mutex<Option<Quiesce>> = Mutex::new(None);
    let by = Mutex::new(QuiescedBy::ThisAgent);
    let told = async {
        let handed = async {
            if let Some(told) = hand_over {
                if told.wait_for(|q| *q).await.is_ok() {
                    return;
                }
            }
            std::future::pending().await
        };
        let requested = async {
            match requests {
                Some(requests) => match requests.recv().await {
                    Some(quiesce) => *lock(&asked) = Some(quiesce),
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = handed => {}
            () = requested => {}
        }
    };
    let exchange = |sent| {
        let asked = lock(&asked).take();
        let by = &by;
        async move {
            match asked {
                Some(quiesce) => {
                    quiesce.reply.send(sent).ok()?;
                    *lock(by) = QuiescedBy::Peer(quiesce.next);
                    Some(quiesce.their_sent)
                }
                None => ask(sent).await,
            }
        }
    };
    let stopped = quiesce::relay(socket, stream, how, start, told, exchange).await?;
    let by = by.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok((stopped, by))
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Asks the agent at `to` to quiesce stream `id`, into which this side
    /// wrote `sent` bytes: the bytes the other end wrote, or `None` (the
    /// stream is relayed on).
    pub(super) async fn ask_to_quiesce(
        &self,
        source: &Source,
        to: &Destination,
        id: ResumeId,
        sent: u64,
    ) -> Option<u64> {
        let timeout = self.settings.connect_timeout;
        match self.hbone.quiesce(source, to, id, sent, timeout).await {
            Ok(theirs) => Some(theirs),
            Err(e) => {
                log::warn!("stream {id} cannot be quiesced, relayed on: {e}");
                None
            }
        }
    }

    /// The caller's end of a resumable stream, registered so that the
    /// destination's workload (from its node) can quiesce it when its
    /// agent is handed over; `None` without a destination identity.
    pub(super) fn movable_end(&self, meta: &CarriedMeta, resume: &Resume) -> Option<Resumable> {
        let peer = SpiffeId::parse(meta.destination_identity.as_deref()?).ok()?;
        let end = self
            .resumable
            .register(resume.id, &peer, resume.node_addr.ip());
        if end.is_none() {
            log::warn!("stream {}: its id is taken here, it cannot move", resume.id);
        }
        end
    }

    /// A new stream for `id` after the destination's agent moved it: the
    /// next destination agent knows the id once the previous one carried
    /// the application's socket over, which it does within [`PARK_GRACE`].
    pub(super) async fn resume_moved(
        &self,
        source: &Source,
        to: &Destination,
        id: ResumeId,
    ) -> Result<Prefixed<Tunnel>, RelayError> {
        let deadline = Instant::now() + PARK_GRACE;
        let timeout = self.settings.connect_timeout;
        let last = loop {
            match self.hbone.resume(source, to, id, timeout).await {
                Ok(tunnel) => {
                    log::info!(
                        "stream {id} moved by its destination's agent: resumed with the next"
                    );
                    return Ok(Prefixed::new(tunnel));
                }
                // Refused for good (another identity or node); anything
                // else may be the old agent's connection going away.
                Err(e @ TransportError::Refused { status, .. })
                    if status != http::StatusCode::NOT_FOUND =>
                {
                    break e
                }
                Err(_) if Instant::now() < deadline => tokio::time::sleep(RESUME_RETRY).await,
                Err(e) => break e,
            }
        };
        Err(format!("resuming stream {id} moved by its destination's agent: {last}").into())
    }

    /// The caller's end of a resumable stream `id` this agent is the
    /// destination of: the caller's node, and its agent's HBONE address
    /// (where its stream came from), to quiesce it from here.
    pub(super) fn caller_end(&self, request: &StreamRequest, id: ResumeId) -> Option<Resume> {
        let cfg = self.config.current();
        let node = cfg.workload_by_address(request.source)?.node.clone();
        let caller_node = Destination {
            node,
            node_addr: SocketAddr::new(request.remote.ip().to_canonical(), HBONE_PORT),
            to: SocketAddr::new(request.source, 0),
        };
        Some(Resume::of(id, &caller_node))
    }

    /// The destination's end of a resumable stream that the previous
    /// agent moved here with its application's socket `app`: parked under
    /// its id until the caller's agent resumes it, then relayed as any
    /// other (judged by the destination's policies, reported once).
    pub(super) async fn resume_parked(&self, pod: &Pod, app: &TcpStream, meta: CarriedMeta) {
        let mut tracked = self.track_carried(&meta, "hbone");
        let live = self.count_live(&mut tracked.record, meta.caller, false);
        let resume = meta.hbone.clone().expect("a parked stream's caller end");
        let identity = meta.source_identity.as_deref().map(SpiffeId::parse);
        let outcome = match identity {
            Some(Ok(peer)) => match self
                .resumable
                .adopt(resume.id, &peer, resume.node_addr.ip())
            {
                Some((resumable, next)) => {
                    let to = meta.upstream.unwrap_or(meta.original_destination);
                    let caller = Caller::new(Some(peer), meta.caller);
                    // An upgraded HTTP connection is judged as HTTP (its
                    // request was, when it switched).
                    let protocol = match meta.upgraded {
                        true => Detected::Http1,
                        false => Detected::Opaque,
                    };
                    let relayed = pin!(relay_parkable(
                        self,
                        app,
                        None,
                        Some(next),
                        meta,
                        live,
                        resumable
                    ));
                    inbound::unless_refused(self, pod, &caller, to, protocol, relayed).await
                }
                None => Err(format!("stream {} is known here already", resume.id).into()),
            },
            _ => Err(RelayError::Failed(
                "a parked stream without its caller's identity".into(),
            )),
        };
        if let Some(e) = outcome
            .as_ref()
            .err()
            .filter(|e| **e != RelayError::HandedOver)
        {
            log::warn!("{}: stream {} handed over closed: {e}", pod.key, resume.id);
            relay::reset(app);
        }
        tracked.finish(outcome);
    }
}
