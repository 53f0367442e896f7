//! Hand-over of a node from its owner to a standby agent, over a unix
//! socket with `SCM_RIGHTS`: the owner passes the listening sockets
//! themselves (every enrolled workload's listeners and DNS socket, the HBONE
//! listener, the admin socket) and its node lock. The kernel keeps one
//! accept queue per socket, so a connection waiting there is accepted by
//! whichever agent accepts next: none is refused or lost during the switch.
//!
//! Passing descriptors was chosen over swapping sockets in the pinned
//! `INBOUND_SOCKS` and re-pointing connect redirection: it covers every
//! listener alike (outbound listeners and DNS are not in any map, the HBONE
//! port is a plain port), needs no window in which two sockets compete for
//! the same port, and leaves the eBPF side untouched.
//!
//! The socket is abstract (`@nodemesh-handover<pin dir>`), in the agent's
//! network namespace; both ends check that the other runs as root.
//! Messages are JSON, one per `SOCK_SEQPACKET` record.
//!
//! Once the new agent serves, the old one passes the opaque relays it could
//! quiesce (`proxy::carry`): two sockets and their metadata each.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use super::ownership::{NodeLock, Owner, OwnershipError};
use crate::proxy::carry::{Carried, CarriedMeta};

/// Descriptors per record (the kernel takes at most 253).
const CHUNK_FDS: usize = 200;
const MAX_RECORD: usize = 256 * 1024;
/// A standby answers the owner's greeting within this.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a standby checks the lock and its connection to the owner.
const STANDBY_POLL: Duration = Duration::from_millis(100);
/// Longest time the new agent may take to serve what it was handed (load
/// the config, enroll, get its certificates); the old one serves meanwhile.
const ACCEPTING_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest time the new agent waits for the relays once it serves (the old
/// one quiesces them for at most `lifecycle::QUIESCE_WINDOW`).
const RELAYS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket: {what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("hand-over: {0}")]
    Protocol(String),
    #[error("hand-over peer runs as uid {0}, not root: ignored")]
    NotRoot(u32),
    #[error("no standby agent took the node over")]
    NoStandby,
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
    move |source| HandoverError::Io { what, source }
}

/// What a handed-over descriptor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Lock,
    Admin,
    Hbone,
    Outbound,
    Outbound6,
    Inbound,
    Dns,
}

/// A handed-over descriptor: its kind, and the network namespace of the
/// workload it serves (0 for the node's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SocketId {
    pub kind: Kind,
    pub netns_cookie: u64,
}

impl SocketId {
    pub fn node(kind: Kind) -> SocketId {
        SocketId {
            kind,
            netns_cookie: 0,
        }
    }

    pub fn workload(kind: Kind, netns_cookie: u64) -> SocketId {
        SocketId { kind, netns_cookie }
    }
}

/// The owner, as a standby sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub owner: Owner,
    pub admin_socket: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// Owner → standby, on connect.
    Hello(Hello),
    /// Standby → owner: wait, or take the node over now.
    Register { take_over: bool },
    /// Owner → standby: the descriptors attached, in order; `last` ends it.
    Sockets { ids: Vec<SocketId>, last: bool },
    /// Standby → owner: serving now (and whether it kept the admin socket).
    Accepting { took_admin: bool },
    /// Owner → new owner: relays carried over, two descriptors each (client,
    /// upstream; the client's alone for a resumable HBONE stream); `last`
    /// ends them.
    Relays {
        relays: Vec<CarriedMeta>,
        last: bool,
    },
}

fn address(pin_dir: &Path) -> Result<SockAddr, HandoverError> {
    SockAddr::unix(format!("\0nodemesh-handover{}", pin_dir.display())).map_err(io_err(
        "the pin directory's path is too long for an abstract address",
    ))
}

fn bind(address: &SockAddr) -> Result<Socket, HandoverError> {
    let listener = seqpacket()?;
    listener.bind(address).map_err(io_err("binding"))?;
    listener.listen(16).map_err(io_err("listening"))?;
    Ok(listener)
}

fn seqpacket() -> Result<Socket, HandoverError> {
    Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io_err("creating"))
}

fn ensure_root(socket: &Socket) -> Result<(), HandoverError> {
    let cred = getsockopt(socket, sockopt::PeerCredentials)
        .map_err(|e| io_err("peer credentials")(e.into()))?;
    match cred.uid() {
        0 => Ok(()),
        uid => Err(HandoverError::NotRoot(uid)),
    }
}

fn send(socket: &Socket, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(message).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs = if raw.is_empty() { &[][..] } else { &rights[..] };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| io_err("sending")(e.into()))?;
    Ok(())
}

/// The next record and its descriptors; `None` when the peer closed.
/// A read timeout set on `socket` surfaces as `WouldBlock`.
fn recv(socket: &Socket) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoverError> {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut space = nix::cmsg_space!([RawFd; CHUNK_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let received = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| io_err("receiving")(e.into()))?;
    let mut fds = Vec::new();
    for cmsg in received
        .cmsgs()
        .map_err(|e| io_err("control message")(e.into()))?
    {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel has just installed these descriptors in this
            // process for this message; nothing else refers to them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let (bytes, flags) = (received.bytes, received.flags);
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(HandoverError::Protocol("a record was truncated".into()));
    }
    if bytes == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buf[..bytes])
        .map_err(|e| HandoverError::Protocol(format!("unreadable record: {e}")))?;
    Ok(Some((message, fds)))
}

/// The owner's side: the standbys waiting for the node, and their requests
/// to take it over now.
pub struct Standbys {
    waiting: Mutex<Vec<Socket>>,
    take_over: tokio::sync::Notify,
    /// The bound hand-over socket, until [`close`](Standbys::close).
    listener: Mutex<Option<Arc<Socket>>>,
    closed: AtomicBool,
    /// Standbys accepted whose registration is under way: they already
    /// consider themselves standing by.
    registering: AtomicUsize,
}

/// How a hand-over ended for the old owner.
#[derive(Debug)]
pub struct HandedOver {
    /// The new agent serves the old admin socket (same path).
    pub took_admin: bool,
    /// To the new agent, for [`carry`](HandedOver::carry).
    conn: Socket,
}

impl HandedOver {
    /// Passes quiesced relays to the new agent (none at all ends it too).
    /// Blocking. Those not passed close when dropped.
    pub fn carry(&self, relays: Vec<Carried>) -> Result<(), HandoverError> {
        let mut chunks: Vec<&[Carried]> = relays.chunks(CHUNK_FDS / 2).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let metas = chunk.iter().map(|c| c.meta.clone()).collect();
            let fds: Vec<BorrowedFd<'_>> = chunk
                .iter()
                .flat_map(|c| [Some(c.client.as_fd()), c.upstream.as_ref().map(AsFd::as_fd)])
                .flatten()
                .collect();
            let last = i + 1 == chunks.len();
            send(
                &self.conn,
                &Message::Relays {
                    relays: metas,
                    last,
                },
                &fds,
            )?;
        }
        Ok(())
    }
}

impl Standbys {
    /// Listens for standbys of the node at `pin_dir` (which the caller owns),
    /// on a thread of its own. After a hand-over, the previous owner holds
    /// the address until it closes it: the thread waits for it meanwhile.
    pub fn listen(pin_dir: &Path, hello: Hello) -> Result<Arc<Standbys>, HandoverError> {
        let address = address(pin_dir)?;
        let standbys = Arc::new(Standbys {
            waiting: Mutex::default(),
            take_over: tokio::sync::Notify::new(),
            listener: Mutex::default(),
            closed: AtomicBool::new(false),
            registering: AtomicUsize::new(0),
        });
        let registry = standbys.clone();
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || registry.serve(&address, &hello))
            .map_err(io_err("starting its thread"))?;
        Ok(standbys)
    }

    fn serve(&self, address: &SockAddr, hello: &Hello) {
        let mut said = String::new();
        let listener = loop {
            match bind(address) {
                Ok(listener) => break Arc::new(listener),
                Err(e) if e.to_string() != said => {
                    log::info!(
                        "waiting for the previous owner to release the hand-over socket ({e})"
                    );
                    said = e.to_string();
                }
                Err(_) => {}
            }
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(STANDBY_POLL);
        };
        *self.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener.clone());
        while !self.closed.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    self.registering.fetch_add(1, Ordering::AcqRel);
                    if let Err(e) = self.register(conn, hello) {
                        log::warn!("a standby agent could not register: {e}");
                    }
                    self.registering.fetch_sub(1, Ordering::AcqRel);
                }
                Err(_) if self.closed.load(Ordering::Relaxed) => {}
                Err(e) => {
                    log::warn!("hand-over socket: accept failed: {e}");
                    std::thread::sleep(STANDBY_POLL);
                }
            }
        }
    }

    /// Stops listening and frees the address for the next owner.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(listener) = listener {
            // Wakes the thread's accept; the socket closes with its last handle.
            let _ = listener.shutdown(std::net::Shutdown::Both);
        }
    }

    fn register(&self, conn: Socket, hello: &Hello) -> Result<(), HandoverError> {
        ensure_root(&conn)?;
        conn.set_read_timeout(Some(REGISTER_TIMEOUT))
            .map_err(io_err("timeout"))?;
        send(&conn, &Message::Hello(hello.clone()), &[])?;
        let take_over = match recv(&conn)? {
            Some((Message::Register { take_over }, _)) => take_over,
            other => {
                return Err(HandoverError::Protocol(format!(
                    "expected a registration, got {other:?}"
                )))
            }
        };
        log::info!(
            "a standby agent registered{}",
            if take_over {
                " and asks to take the node over"
            } else {
                ""
            }
        );
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        if take_over {
            self.take_over.notify_one();
        }
        Ok(())
    }

    /// Resolves when a standby asks to take the node over now.
    pub async fn take_over_requested(&self) {
        self.take_over.notified().await
    }

    /// Whether a standby is connected (it may have gone since). Registrations
    /// under way are waited for (each at most `REGISTER_TIMEOUT`): a standby
    /// that was told who owns the node must not be left behind by a stop
    /// that comes meanwhile.
    pub async fn any_waiting(&self) -> bool {
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        while self.registering.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Hands `sockets` to the newest standby that takes them and waits until
    /// it serves them. Blocking: run it off the runtime's threads.
    pub fn hand_over(&self, sockets: &[(SocketId, OwnedFd)]) -> Result<HandedOver, HandoverError> {
        loop {
            let Some(conn) = self.waiting.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                return Err(HandoverError::NoStandby);
            };
            match hand_to(&conn, sockets) {
                Ok(done) => return Ok(done),
                Err(e) => log::warn!("handing the node over to a standby failed: {e}"),
            }
        }
    }
}

fn hand_to(conn: &Socket, sockets: &[(SocketId, OwnedFd)]) -> Result<HandedOver, HandoverError> {
    let chunks: Vec<_> = sockets.chunks(CHUNK_FDS).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let ids = chunk.iter().map(|(id, _)| *id).collect();
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
        let last = i + 1 == chunks.len();
        send(conn, &Message::Sockets { ids, last }, &fds)?;
    }
    conn.set_read_timeout(Some(ACCEPTING_TIMEOUT))
        .map_err(io_err("timeout"))?;
    match recv(conn)? {
        Some((Message::Accepting { took_admin }, _)) => Ok(HandedOver {
            took_admin,
            conn: conn.try_clone().map_err(io_err("keeping"))?,
        }),
        other => Err(HandoverError::Protocol(format!(
            "the new agent did not take over (answered {other:?})"
        ))),
    }
}

/// Descriptors handed over by the previous owner, taken as the new agent
/// sets up what they serve; those left over are closed.
#[derive(Default)]
pub struct Inherited(Mutex<HashMap<SocketId, OwnedFd>>);

impl Inherited {
    pub fn take(&self, id: SocketId) -> Option<OwnedFd> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
    }

    /// A handed-over TCP listener, registered with the runtime.
    pub fn tcp_listener(&self, id: SocketId) -> Option<io::Result<tokio::net::TcpListener>> {
        self.take(id).map(|fd| {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)
        })
    }

    /// A handed-over UDP socket, registered with the runtime.
    pub fn udp_socket(&self, id: SocketId) -> Option<io::Result<tokio::net::UdpSocket>> {
        self.take(id).map(|fd| {
            let socket = std::net::UdpSocket::from(fd);
            socket.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(socket)
        })
    }

    /// Closes what nothing took (workloads gone from the config meanwhile).
    pub fn close_rest(&self) -> usize {
        let mut rest = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = rest.len();
        rest.clear();
        n
    }
}

/// How an agent came to own its node.
pub enum Start {
    /// It took the free lock: a cold start (the previous owner, if any, is gone).
    Locked(NodeLock),
    /// The previous owner handed the node over.
    HandedIn(HandedIn),
}

/// What the previous owner handed over; it serves until told
/// [`accepting`](HandedIn::accepting).
pub struct HandedIn {
    pub lock: NodeLock,
    pub sockets: Arc<Inherited>,
    pub from: Hello,
    pub ack: Ack,
}

/// The answer the previous owner waits for.
pub struct Ack(Socket);

impl Ack {
    /// Tells the previous owner this agent serves now: it stops accepting,
    /// carries its relays over and drains.
    pub fn accepting(self, took_admin: bool) -> Result<CarriedIn, HandoverError> {
        send(&self.0, &Message::Accepting { took_admin }, &[])?;
        Ok(CarriedIn(self.0))
    }
}

/// Where the relays the previous owner carries over arrive.
pub struct CarriedIn(Socket);

impl CarriedIn {
    /// The relays carried over (none from an agent that carries none).
    /// Blocking.
    pub fn receive(self) -> Result<Vec<Carried>, HandoverError> {
        self.0
            .set_read_timeout(Some(RELAYS_TIMEOUT))
            .map_err(io_err("timeout"))?;
        let mut carried = Vec::new();
        loop {
            match recv(&self.0)? {
                Some((Message::Relays { relays, last }, fds)) => {
                    // Two each, but one for a relay to a resumable stream.
                    let wanted: usize = relays.iter().map(|r| 2 - r.hbone.is_some() as usize).sum();
                    if fds.len() != wanted {
                        return Err(HandoverError::Protocol(format!(
                            "{} descriptors for {} relays",
                            fds.len(),
                            relays.len()
                        )));
                    }
                    let mut fds = fds.into_iter();
                    for meta in relays {
                        let client = fds.next().expect("counted above");
                        let upstream = match meta.hbone {
                            Some(_) => None,
                            None => Some(fds.next().expect("counted above")),
                        };
                        carried.push(Carried {
                            meta,
                            client,
                            upstream,
                        });
                    }
                    if last {
                        return Ok(carried);
                    }
                }
                None => return Ok(carried),
                Some((other, _)) => {
                    return Err(HandoverError::Protocol(format!(
                        "expected relays, got {other:?}"
                    )))
                }
            }
        }
    }
}

/// Waits until this agent owns the node at `pin_dir`: by taking its lock when
/// free, or by a hand-over from the owner (right away with `take_over`,
/// else when the owner is told to stop). `seen` learns who the owner is
/// (`None` once it is gone). Blocking; returns `Ok(None)` once `cancel` is
/// set.
pub fn become_owner(
    bpffs: &Path,
    node: &str,
    take_over: bool,
    cancel: &AtomicBool,
    seen: &dyn Fn(Option<Hello>),
) -> Result<Option<Start>, HandoverError> {
    let pin_dir = crate::ebpf::pin_dir(bpffs, node);
    let mut owner: Option<(Socket, Hello)> = None;
    let mut said = String::new();
    while !cancel.load(Ordering::Relaxed) {
        if let Some(lock) = NodeLock::try_acquire(bpffs, node)? {
            seen(None);
            return Ok(Some(Start::Locked(lock)));
        }
        let Some((conn, _)) = &owner else {
            match register(&pin_dir, take_over) {
                Ok((conn, hello)) => {
                    log::info!(
                        "standing by: node {node} is owned by pid {} (nodemesh {}){}",
                        hello.owner.pid,
                        hello.owner.version,
                        if take_over {
                            "; asked it to hand over"
                        } else {
                            ""
                        }
                    );
                    seen(Some(hello.clone()));
                    owner = Some((conn, hello));
                }
                Err(e) => {
                    if e.to_string() != said {
                        log::info!("standing by: node {node} is locked by another agent ({e})");
                        said = e.to_string();
                    }
                    std::thread::sleep(STANDBY_POLL);
                }
            }
            continue;
        };
        match recv(conn) {
            Ok(Some((Message::Sockets { ids, last }, fds))) => {
                let (conn, hello) = owner.take().expect("connected");
                match receive_sockets(conn, hello, &pin_dir, ids, last, fds) {
                    Ok(handed) => return Ok(Some(Start::HandedIn(handed))),
                    Err(e) => log::warn!("the hand-over failed, standing by: {e}"),
                }
            }
            Ok(Some((other, _))) => {
                log::warn!("unexpected record from the owner: {other:?}");
                owner = None;
            }
            Ok(None) => {
                log::info!("the owner of node {node} went away");
                seen(None);
                owner = None;
            }
            Err(HandoverError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
            }
            Err(e) => {
                log::warn!("connection to the owner: {e}");
                owner = None;
            }
        }
    }
    Ok(None)
}

fn register(pin_dir: &Path, take_over: bool) -> Result<(Socket, Hello), HandoverError> {
    let conn = seqpacket()?;
    conn.connect(&address(pin_dir)?)
        .map_err(io_err("connecting to the owner"))?;
    ensure_root(&conn)?;
    conn.set_read_timeout(Some(REGISTER_TIMEOUT))
        .map_err(io_err("timeout"))?;
    let hello = match recv(&conn)? {
        Some((Message::Hello(hello), _)) => hello,
        other => {
            return Err(HandoverError::Protocol(format!(
                "expected the owner's greeting, got {other:?}"
            )))
        }
    };
    send(&conn, &Message::Register { take_over }, &[])?;
    conn.set_read_timeout(Some(STANDBY_POLL))
        .map_err(io_err("timeout"))?;
    Ok((conn, hello))
}

fn receive_sockets(
    conn: Socket,
    from: Hello,
    pin_dir: &Path,
    mut ids: Vec<SocketId>,
    mut last: bool,
    mut fds: Vec<OwnedFd>,
) -> Result<HandedIn, HandoverError> {
    conn.set_read_timeout(Some(REGISTER_TIMEOUT))
        .map_err(io_err("timeout"))?;
    let mut sockets = HashMap::new();
    loop {
        if ids.len() != fds.len() {
            return Err(HandoverError::Protocol(format!(
                "{} descriptors for {} sockets",
                fds.len(),
                ids.len()
            )));
        }
        sockets.extend(ids.into_iter().zip(fds));
        if last {
            break;
        }
        match recv(&conn)? {
            Some((Message::Sockets { ids: i, last: l }, f)) => (ids, last, fds) = (i, l, f),
            other => {
                return Err(HandoverError::Protocol(format!(
                    "expected sockets, got {other:?}"
                )))
            }
        }
    }
    let lock = sockets
        .remove(&SocketId::node(Kind::Lock))
        .ok_or_else(|| HandoverError::Protocol("the node lock was not handed over".into()))?;
    let lock = NodeLock::adopt(lock, pin_dir.to_owned())?;
    Ok(HandedIn {
        lock,
        sockets: Arc::new(Inherited(Mutex::new(sockets))),
        from,
        ack: Ack(conn),
    })
}
