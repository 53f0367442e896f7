//! Resumable HBONE streams (a nodemesh extension of extra headers only: a
//! ztunnel peer ignores them, and its streams are not resumable).
//!
//! A caller that asks (`nodemesh-resume: new` on its `CONNECT`) gets a
//! random id (`nodemesh-resume-id`) that only the same workload identity,
//! from the same node, can use. At a hand-over of the caller's agent the
//! stream is quiesced cooperatively: the caller's agent stops reading its
//! application and sends `POST /nodemesh/quiesce` naming the id and the
//! bytes it wrote into the stream (`nodemesh-sent`); the destination stops
//! reading its application and answers with its own count. Each side reads
//! the stream up to the other's count, so no byte is lost or sent twice;
//! the destination then parks the application socket for [`PARK_GRACE`]
//! until a `CONNECT` with `nodemesh-resume: <id>` (from the next agent)
//! gives it a new stream.
//!
//! At a hand-over of the destination's agent the same exchange runs the
//! other way: the caller's agent registers its end of the stream here too
//! ([`Registry::register`], bound to the destination's workload identity
//! and node), the old destination agent sends the same quiesce to the
//! caller's node as that workload, and once both ends read up to the
//! other's count the caller's agent resumes the stream with a `CONNECT`,
//! which reaches the new destination agent: it adopted the parked
//! application socket with the id ([`Registry::adopt`]).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Tunnel;
use crate::identity::SpiffeId;

/// Request header: `new` asks for a resumable stream; an id resumes one.
pub const RESUME: &str = "nodemesh-resume";
/// Response header: the id of a resumable stream.
pub const RESUME_ID: &str = "nodemesh-resume-id";
/// Bytes one side wrote into the stream being quiesced.
pub const SENT: &str = "nodemesh-sent";
/// Where the caller's agent asks to quiesce a stream.
pub const QUIESCE_PATH: &str = "/nodemesh/quiesce";
/// How long a quiesced stream's application socket waits for its caller's
/// next agent before it is closed.
pub const PARK_GRACE: Duration = Duration::from_secs(10);

/// A stream's resume id: 128 random bits, shown in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResumeId(u128);

impl From<ResumeId> for String {
    fn from(id: ResumeId) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for ResumeId {
    type Error = std::num::ParseIntError;

    fn try_from(s: String) -> Result<ResumeId, Self::Error> {
        s.parse()
    }
}

impl ResumeId {
    fn random() -> ResumeId {
        let mut bytes = [0u8; 16];
        // An id others could guess would still be refused to them (it is
        // bound to the identity and node), but it must not be predictable.
        crate::identity::x509::provider()
            .secure_random
            .fill(&mut bytes)
            .expect("the crypto provider's random source works");
        ResumeId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for ResumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for ResumeId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<ResumeId, Self::Err> {
        u128::from_str_radix(s, 16).map(ResumeId)
    }
}

/// A caller's agent asks the destination to quiesce a stream.
pub struct Quiesce {
    /// Bytes the caller's agent wrote into the stream.
    pub their_sent: u64,
    /// Answered with the bytes the destination wrote, once it stopped
    /// reading its application.
    pub reply: oneshot::Sender<u64>,
    /// The stream that resumes it.
    pub next: oneshot::Receiver<Tunnel>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResumeRefused {
    #[error("no resumable stream has this id")]
    Unknown,
    #[error("the resumable stream belongs to another workload or node")]
    NotYours,
    #[error("the stream was not quiesced")]
    NotQuiesced,
    #[error("the stream ended while quiescing")]
    Ended,
}

struct Entry {
    peer: SpiffeId,
    remote: IpAddr,
    control: mpsc::Sender<Quiesce>,
    next: Option<oneshot::Sender<Tunnel>>,
    /// The destination's end: a `CONNECT` may resume it. The caller's end
    /// is only ever quiesced.
    resumes_here: bool,
}

/// The destination's resumable streams.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<ResumeId, Entry>>,
}

/// The destination's end of a resumable stream: quiesce requests arrive on
/// `control`. Dropped, the id is forgotten.
pub struct Resumable {
    pub id: ResumeId,
    pub control: mpsc::Receiver<Quiesce>,
    registry: Arc<Registry>,
}

impl Drop for Resumable {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ResumeId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new resumable stream for `peer` calling from `remote` (its node).
    pub fn open(self: &Arc<Self>, peer: &SpiffeId, remote: IpAddr) -> Resumable {
        let mut entries = self.lock();
        let id = loop {
            let id = ResumeId::random();
            if !entries.contains_key(&id) {
                break id;
            }
        };
        let (resumable, _) = self.insert(&mut entries, id, peer, remote, true);
        resumable
    }

    /// The caller's end of stream `id`, which the destination's workload
    /// `peer` on the node at `remote` may quiesce (when its agent is handed
    /// over); `None` if the id is taken here.
    pub fn register(
        self: &Arc<Self>,
        id: ResumeId,
        peer: &SpiffeId,
        remote: IpAddr,
    ) -> Option<Resumable> {
        let mut entries = self.lock();
        if entries.contains_key(&id) {
            return None;
        }
        Some(self.insert(&mut entries, id, peer, remote, false).0)
    }

    /// The destination's end of stream `id`, handed over quiesced by the
    /// previous agent: the stream that resumes it arrives on the receiver
    /// (from `peer` at `remote` only, as before); `None` if the id is taken.
    pub fn adopt(
        self: &Arc<Self>,
        id: ResumeId,
        peer: &SpiffeId,
        remote: IpAddr,
    ) -> Option<(Resumable, oneshot::Receiver<Tunnel>)> {
        let mut entries = self.lock();
        if entries.contains_key(&id) {
            return None;
        }
        let (resumable, entry) = self.insert(&mut entries, id, peer, remote, true);
        let (next, resumed) = oneshot::channel();
        entry.next = Some(next);
        Some((resumable, resumed))
    }

    fn insert<'a>(
        self: &Arc<Self>,
        entries: &'a mut HashMap<ResumeId, Entry>,
        id: ResumeId,
        peer: &SpiffeId,
        remote: IpAddr,
        resumes_here: bool,
    ) -> (Resumable, &'a mut Entry) {
        let (control, requests) = mpsc::channel(1);
        let entry = entries.entry(id).insert_entry(Entry {
            peer: peer.clone(),
            remote: remote.to_canonical(),
            control,
            next: None,
            resumes_here,
        });
        let resumable = Resumable {
            id,
            control: requests,
            registry: self.clone(),
        };
        (resumable, entry.into_mut())
    }

    /// The entry `id`, if `peer` from `remote` may use it: exactly the
    /// identity and node that opened the stream.
    fn check<'a>(
        entries: &'a mut HashMap<ResumeId, Entry>,
        id: ResumeId,
        peer: &SpiffeId,
        remote: IpAddr,
    ) -> Result<&'a mut Entry, ResumeRefused> {
        let entry = entries.get_mut(&id).ok_or(ResumeRefused::Unknown)?;
        if entry.peer != *peer || entry.remote != remote.to_canonical() {
            return Err(ResumeRefused::NotYours);
        }
        Ok(entry)
    }

    /// Quiesces stream `id`; the bytes the destination wrote into it.
    pub async fn quiesce(
        &self,
        id: ResumeId,
        peer: &SpiffeId,
        remote: IpAddr,
        their_sent: u64,
    ) -> Result<u64, ResumeRefused> {
        let (next_tx, next) = oneshot::channel();
        let control = {
            let mut entries = self.lock();
            let entry = Self::check(&mut entries, id, peer, remote)?;
            entry.next = Some(next_tx);
            entry.control.clone()
        };
        let (reply, sent) = oneshot::channel();
        let asked = Quiesce {
            their_sent,
            reply,
            next,
        };
        control
            .send(asked)
            .await
            .map_err(|_| ResumeRefused::Ended)?;
        sent.await.map_err(|_| ResumeRefused::Ended)
    }

    /// Where the stream that resumes `id` goes (once: a second resume of
    /// the same quiesce is refused).
    pub fn attach(
        &self,
        id: ResumeId,
        peer: &SpiffeId,
        remote: IpAddr,
    ) -> Result<oneshot::Sender<Tunnel>, ResumeRefused> {
        let mut entries = self.lock();
        let entry = Self::check(&mut entries, id, peer, remote)?;
        if !entry.resumes_here {
            return Err(ResumeRefused::Unknown);
        }
        entry.next.take().ok_or(ResumeRefused::NotQuiesced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(workload: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{workload}")).unwrap()
    }

    #[test]
    fn ids_round_trip_and_differ() {
        let a = ResumeId::random();
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(a.to_string().parse::<ResumeId>().unwrap(), a);
        assert_ne!(a, ResumeId::random());
    }

    #[tokio::test]
    async fn only_the_identity_and_node_that_opened_a_stream_can_quiesce_or_resume_it() {
        let registry = Arc::new(Registry::default());
        let node_a: IpAddr = "10.0.0.1".parse().unwrap();
        let node_c: IpAddr = "10.0.0.3".parse().unwrap();
        let mut stream = registry.open(&id("client"), node_a);
        let stream_id = stream.id;
        // Another workload (even with the id), or the same one from
        // another node, is refused; an unknown id too.
        let forged = registry.quiesce(stream_id, &id("thief"), node_a, 0).await;
        assert_eq!(forged, Err(ResumeRefused::NotYours));
        let elsewhere = registry.quiesce(stream_id, &id("client"), node_c, 0).await;
        assert_eq!(elsewhere, Err(ResumeRefused::NotYours));
        let unknown = registry.attach(ResumeId::random(), &id("client"), node_a);
        assert_eq!(unknown.err(), Some(ResumeRefused::Unknown));
        // Not quiesced yet: nothing to resume.
        let early = registry.attach(stream_id, &id("client"), node_a);
        assert_eq!(early.err(), Some(ResumeRefused::NotQuiesced));
        // The owner quiesces it; a thief still cannot take the next stream.
        let quiescing = tokio::spawn({
            let registry = registry.clone();
            async move { registry.quiesce(stream_id, &id("client"), node_a, 7).await }
        });
        let asked = stream.control.recv().await.unwrap();
        assert_eq!(asked.their_sent, 7);
        asked.reply.send(5).unwrap();
        assert_eq!(quiescing.await.unwrap(), Ok(5));
        let stolen = registry.attach(stream_id, &id("thief"), node_a);
        assert_eq!(stolen.err(), Some(ResumeRefused::NotYours));
        assert!(registry.attach(stream_id, &id("client"), node_a).is_ok());
        // Once the stream ends, its id is forgotten.
        drop(stream);
        let gone = registry.attach(stream_id, &id("client"), node_a);
        assert_eq!(gone.err(), Some(ResumeRefused::Unknown));
    }

    /// A stream moved to the next destination agent keeps its binding: only
    /// the caller's identity from the caller's node resumes it; and the
    /// caller's end, registered for the destination's move, is quiesced
    /// only by the destination's workload from its node, never resumed.
    #[tokio::test]
    async fn a_moved_stream_is_resumed_and_quiesced_only_by_its_two_ends() {
        let registry = Arc::new(Registry::default());
        let node_a: IpAddr = "10.0.0.1".parse().unwrap();
        let node_b: IpAddr = "10.0.0.2".parse().unwrap();
        let stream_id = ResumeId::random();
        let (_parked, mut resumed) = registry.adopt(stream_id, &id("client"), node_a).unwrap();
        // Adopted once: the same id again is refused.
        assert!(registry.adopt(stream_id, &id("client"), node_a).is_none());
        assert!(registry
            .register(stream_id, &id("server"), node_b)
            .is_none());
        // A forged resume (another workload, or the same from another node).
        let forged = registry.attach(stream_id, &id("thief"), node_a);
        assert_eq!(forged.err(), Some(ResumeRefused::NotYours));
        let elsewhere = registry.attach(stream_id, &id("client"), node_b);
        assert_eq!(elsewhere.err(), Some(ResumeRefused::NotYours));
        assert!(resumed.try_recv().is_err(), "nothing resumed it yet");
        // The caller's agent resumes it, once.
        assert!(registry.attach(stream_id, &id("client"), node_a).is_ok());
        let again = registry.attach(stream_id, &id("client"), node_a);
        assert_eq!(again.err(), Some(ResumeRefused::NotQuiesced));

        // The caller's end of another stream, on the caller's node.
        let callers = Arc::new(Registry::default());
        let other = ResumeId::random();
        let mut end = callers.register(other, &id("server"), node_b).unwrap();
        let stolen = callers.quiesce(other, &id("thief"), node_b, 3).await;
        assert_eq!(stolen, Err(ResumeRefused::NotYours));
        let from_elsewhere = callers.quiesce(other, &id("server"), node_a, 3).await;
        assert_eq!(from_elsewhere, Err(ResumeRefused::NotYours));
        let moving = tokio::spawn({
            let callers = callers.clone();
            async move { callers.quiesce(other, &id("server"), node_b, 3).await }
        });
        let asked = end.control.recv().await.unwrap();
        assert_eq!(asked.their_sent, 3);
        asked.reply.send(9).unwrap();
        assert_eq!(moving.await.unwrap(), Ok(9));
        // Quiesced, the caller's end is still not a stream to resume.
        let connect = callers.attach(other, &id("server"), node_b);
        assert_eq!(connect.err(), Some(ResumeRefused::Unknown));
    }
}
