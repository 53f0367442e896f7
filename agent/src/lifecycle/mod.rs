//! The agent's life on its node: who owns the node (`ownership`), how a new
//! agent takes it over from a running one (`handover`), and how the old one
//! lets its connections finish (`drain`). A standby (an agent waiting for
//! the node) answers `nodemesh status` through [`Front`].

pub mod drain;
pub mod handover;
pub mod ownership;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use crate::admin::{Query, Responder};
use crate::proxy::{Direction, Proxy};
use handover::{HandedOver, HandoverError, Hello, SocketId, Standbys, Start};
use ownership::NodeLock;

/// What the admin socket answers: the owning agent once this process owns
/// the node, its standby status until then.
pub struct Front {
    node: String,
    owner: OnceLock<Arc<dyn Responder>>,
    /// The owner this standby waits for, when known.
    seen: Mutex<Option<Hello>>,
    /// Queries answered so far.
    answered: watch::Sender<u64>,
}

impl Front {
    pub fn new(node: String) -> Arc<Front> {
        Arc::new(Front {
            node,
            owner: OnceLock::new(),
            seen: Mutex::default(),
            answered: watch::Sender::new(0),
        })
    }

    /// Counts the queries answered: each is a burst of control work (it
    /// runs code the data path never runs), after which the agent lets
    /// that code go ([`crate::memory::release_after_each_burst`]).
    pub fn answered(&self) -> watch::Receiver<u64> {
        self.answered.subscribe()
    }

    pub fn owner_seen(&self, hello: Option<Hello>) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = hello;
    }

    /// From now on, this process owns the node and `node` answers.
    pub fn owned_by(&self, node: Arc<dyn Responder>) {
        let _ = self.owner.set(node);
    }

    fn standby_status(&self) -> serde_json::Value {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "node": self.node,
            "role": "standby",
            "ready": false,
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "owner": seen.as_ref().map(|h| json!({
                "pid": h.owner.pid,
                "version": h.owner.version,
                "since_unix_ms": h.owner.since_unix_ms,
                "admin_socket": h.admin_socket,
            })),
        })
    }

    fn standby_answer(&self, query: Query) -> serde_json::Value {
        match query {
            Query::Status => self.standby_status(),
            _ => {
                let owner = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                let owner = owner.as_ref().map_or_else(
                    || "another agent".to_owned(),
                    |h| format!("pid {} at {}", h.owner.pid, h.admin_socket.display()),
                );
                json!({ "error": format!(
                    "this agent is a standby for node {}, owned by {owner}: ask the owner",
                    self.node
                ) })
            }
        }
    }
}

impl Responder for Front {
    fn answer(&self, query: Query) -> serde_json::Value {
        let answer = match self.owner.get() {
            Some(owner) => owner.answer(query),
            None => self.standby_answer(query),
        };
        self.answered.send_modify(|n| *n += 1);
        answer
    }
}

/// Waits (as a standby, if another agent owns the node) until this agent
/// owns `node`; `None` if `stop` resolves first. The admin socket answers
/// through `front` meanwhile.
pub async fn wait_until_owner(
    bpffs: &Path,
    node: &str,
    take_over: bool,
    front: &Arc<Front>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Option<Start>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (bpffs, node, front_) = (bpffs.to_owned(), node.to_owned(), front.clone());
    let cancelled = cancel.clone();
    // A thread of its own: it blocks, and is not waited for if the agent stops.
    std::thread::Builder::new()
        .name("standby".into())
        .spawn(move || {
            let seen = |hello| front_.owner_seen(hello);
            let _ = tx.send(handover::become_owner(
                &bpffs, &node, take_over, &cancelled, &seen,
            ));
        })?;
    tokio::select! {
        started = rx => Ok(started.map_err(|_| anyhow::anyhow!("the standby thread died"))??),
        () = stop => {
            cancel.store(true, Ordering::Relaxed);
            Ok(None)
        }
    }
}

/// How long the old owner waits for its opaque relays to quiesce before it
/// carries those that did to the new one (a relay stops only once its
/// peers took what it read).
pub const QUIESCE_WINDOW: Duration = Duration::from_secs(1);

/// The old owner's side of a hand-over: gives `sockets` (the lock among
/// them) to a standby; once it serves them, stops serving (`stop_serving`),
/// carries its opaque relays over, drains `proxy`'s other connections for
/// at most `drain_timeout`, and gives the lock away. `Err` if no standby took the node: the caller still owns it.
pub async fn retire(
    standbys: Arc<Standbys>,
    sockets: Vec<(SocketId, OwnedFd)>,
    lock: NodeLock,
    stop_serving: impl FnOnce(&HandedOver),
    proxy: &Proxy,
    drain_timeout: Duration,
) -> Result<HandedOver, (NodeLock, HandoverError)> {
    let started = Instant::now();
    let handing = {
        let standbys = standbys.clone();
        tokio::task::spawn_blocking(move || standbys.hand_over(&sockets)).await
    };
    let handed = match handing {
        Ok(Ok(handed)) => handed,
        Ok(Err(e)) => return Err((lock, e)),
        Err(e) => return Err((lock, HandoverError::Protocol(e.to_string()))),
    };
    log::info!(
        "handed the node over in {} ms; draining (at most {drain_timeout:?})",
        started.elapsed().as_millis()
    );
    // The next owner takes its standbys from here on.
    standbys.close();
    stop_serving(&handed);
    proxy.drain.start();
    let quiescing = Instant::now();
    let relays = proxy.carrier.collect(QUIESCE_WINDOW).await;
    let count = relays.len();
    let carrying = tokio::task::spawn_blocking(move || {
        let carried = handed.carry(relays);
        (handed, carried)
    })
    .await;
    let handed = match carrying {
        Ok((handed, Ok(()))) => {
            log::info!(
                "carried {count} relay(s) to the new agent in {} ms",
                quiescing.elapsed().as_millis()
            );
            handed
        }
        Ok((handed, Err(e))) => {
            log::warn!("{count} relay(s) could not be carried to the new agent (closed): {e}");
            handed
        }
        Err(e) => return Err((lock, HandoverError::Protocol(e.to_string()))),
    };
    let open = || proxy.counts(Direction::Outbound).open + proxy.counts(Direction::Inbound).open;
    let left = drain::connections_end(open, drain_timeout).await;
    if left > 0 {
        log::warn!("{left} connection(s) still open at the drain deadline are closed");
    }
    lock.give_away();
    Ok(handed)
}
