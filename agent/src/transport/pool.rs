//! The caller's side of HBONE: HTTP/2 connections per (source identity,
//! destination node), shared by every stream between them; one, unless
//! more streams are open at once than one carries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::resume::{self, ResumeId};
use super::tunnel::OpenStream;
use super::{
    forwarded_for, tls, Destination, Source, TransportError, Tunnel, CONNECTION_WINDOW, FORWARDED,
    MAX_STREAMS, STREAM_WINDOW,
};
use crate::identity::{Identities, SpiffeId};
use crate::workers;

/// A connection that stops answering pings is closed, and its streams fail
/// instead of hanging.
const KEEPALIVE: Duration = Duration::from_secs(20);

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    source: SpiffeId,
    node: String,
    node_addr: std::net::SocketAddr,
    /// Connections are used on the worker that drives them.
    worker: Option<usize>,
}

/// A slot's connections are made under its async lock, so concurrent
/// first streams wait for one handshake instead of each making their own.
type Slot = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// A connection and the certificate it was opened with: once that is
/// renewed, new streams go to a new connection (the old one ends with its
/// last stream), so no connection outlives its certificate by much.
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    certificate: Arc<CertifiedKey>,
    /// Streams open on it: at [`MAX_STREAMS`], new ones go to another
    /// connection instead of waiting for one of these to end.
    open: Arc<AtomicU32>,
}

/// A stream's place on a pooled connection, taken before it is asked for.
struct Lease {
    sender: SendRequest<Empty<Bytes>>,
    stream: OpenStream,
}

pub struct Pool {
    identities: Arc<Identities>,
    configs: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
    slots: Mutex<HashMap<Key, Slot>>,
    opened: AtomicU64,
}

impl Pool {
    pub fn new(identities: Arc<Identities>) -> Pool {
        Pool {
            identities,
            configs: Mutex::default(),
            slots: Mutex::default(),
            opened: AtomicU64::new(0),
        }
    }

    /// TLS connections opened to other agents since start.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Open pooled connections.
    pub fn connections_open(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .map(|slot| {
                slot.try_lock().map_or(1, |pooled| {
                    pooled.iter().filter(|p| !p.sender.is_closed()).count()
                })
            })
            .sum()
    }

    /// A stream to `to.to`, opened as `source`. A pooled connection that
    /// turns out closed is replaced once.
    pub async fn connect(
        &self,
        source: &Source,
        to: &Destination,
        timeout: Duration,
    ) -> Result<Tunnel, TransportError> {
        let asked = self.request(source, to, timeout, Ask::Stream(None)).await?;
        Ok(asked.stream().0)
    }

    /// [`connect`](Pool::connect), asking for a resumable stream: its id,
    /// unless the destination does not resume streams (a ztunnel).
    pub async fn connect_resumable(
        &self,
        source: &Source,
        to: &Destination,
        timeout: Duration,
    ) -> Result<(Tunnel, Option<ResumeId>), TransportError> {
        let asked = self
            .request(source, to, timeout, Ask::Stream(Some(Resume::New)))
            .await?;
        Ok(asked.stream())
    }

    /// A new stream for the quiesced stream `id`.
    pub async fn resume(
        &self,
        source: &Source,
        to: &Destination,
        id: ResumeId,
        timeout: Duration,
    ) -> Result<Tunnel, TransportError> {
        let ask = Ask::Stream(Some(Resume::Stream(id)));
        Ok(self.request(source, to, timeout, ask).await?.stream().0)
    }

    /// Quiesces stream `id`, into which this side wrote `sent` bytes: the
    /// bytes the destination wrote into it.
    pub async fn quiesce(
        &self,
        source: &Source,
        to: &Destination,
        id: ResumeId,
        sent: u64,
        timeout: Duration,
    ) -> Result<u64, TransportError> {
        match self
            .request(source, to, timeout, Ask::Quiesce(id, sent))
            .await?
        {
            Answered::Quiesced(theirs) => Ok(theirs),
            Answered::Stream(..) => unreachable!("a quiesce is answered with a count"),
        }
    }

    async fn request(
        &self,
        source: &Source,
        to: &Destination,
        timeout: Duration,
        ask: Ask,
    ) -> Result<Answered, TransportError> {
        let within = async {
            let slot = self.slot(source, to);
            let lease = self.lease(&slot, source, to, None).await?;
            let failed_on = lease.stream.connection().clone();
            match send(lease, source, to, &ask).await {
                Err(TransportError::Http2 { source: e, .. })
                    if e.is_canceled() || e.is_closed() =>
                {
                    let lease = self.lease(&slot, source, to, Some(&failed_on)).await?;
                    send(lease, source, to, &ask).await
                }
                other => other,
            }
        };
        tokio::time::timeout(timeout, within)
            .await
            .unwrap_or_else(|_| {
                Err(TransportError::Timeout {
                    node: to.node.clone(),
                    timeout,
                })
            })
    }

    fn slot(&self, source: &Source, to: &Destination) -> Slot {
        let key = Key {
            source: source.identity.clone(),
            node: to.node.clone(),
            node_addr: to.node_addr,
            worker: workers::current(),
        };
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key).or_default().clone()
    }

    /// A stream on one of the slot's live connections with room for it, or
    /// on a new one; never on `failed` (a connection a stream just failed
    /// on, which is dropped).
    async fn lease(
        &self,
        slot: &Slot,
        source: &Source,
        to: &Destination,
        failed: Option<&Arc<AtomicU32>>,
    ) -> Result<Lease, TransportError> {
        let mut pooled = slot.lock().await;
        let certificate = match self.identities.certified_key(&source.identity) {
            Some(certificate) => certificate,
            // A workload that just arrived may race its first certificate.
            None => self
                .identities
                .wait_for(&source.identity, Duration::from_secs(5))
                .await
                .ok_or_else(|| TransportError::NoCertificate(source.identity.clone()))?,
        };
        pooled.retain(|p| {
            !p.sender.is_closed()
                && Arc::ptr_eq(&p.certificate, &certificate)
                && !failed.is_some_and(|failed| Arc::ptr_eq(&p.open, failed))
        });
        let with_room = pooled
            .iter()
            .position(|p| p.open.load(Ordering::Relaxed) < MAX_STREAMS);
        let chosen = match with_room {
            Some(index) => &pooled[index],
            None => {
                let sender = self.handshake(source, to).await?;
                pooled.push(Pooled {
                    sender,
                    certificate,
                    open: Arc::default(),
                });
                &pooled[pooled.len() - 1]
            }
        };
        Ok(Lease {
            sender: chosen.sender.clone(),
            stream: OpenStream::on(&chosen.open),
        })
    }

    async fn handshake(
        &self,
        source: &Source,
        to: &Destination,
    ) -> Result<SendRequest<Empty<Bytes>>, TransportError> {
        let node = || to.node.clone();
        let tcp =
            TcpStream::connect(to.node_addr)
                .await
                .map_err(|source| TransportError::Connect {
                    node: node(),
                    addr: to.node_addr,
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        let name = tls::node_server_name(&to.node).map_err(|e| TransportError::Tls {
            node: node(),
            source: std::io::Error::other(e),
        })?;
        let tls = TlsConnector::from(self.client_config(&source.identity))
            .connect(name, tcp)
            .await
            .map_err(|source| TransportError::Tls {
                node: node(),
                source,
            })?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| TransportError::Http2 {
                node: node(),
                source,
            })?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        let node = to.node.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("HBONE connection to node {node} ended: {e}");
            }
        });
        Ok(sender)
    }

    fn client_config(&self, source: &SpiffeId) -> Arc<rustls::ClientConfig> {
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        configs
            .entry(source.clone())
            .or_insert_with(|| tls::client_config(&self.identities, source))
            .clone()
    }
}

/// What a request to the destination's agent is for.
enum Ask {
    Stream(Option<Resume>),
    Quiesce(ResumeId, u64),
}

enum Resume {
    New,
    Stream(ResumeId),
}

/// A stream (with its resume id, if resumable), or a quiesce's answer:
/// the bytes the destination wrote into the stream.
enum Answered {
    Stream(Tunnel, Option<ResumeId>),
    Quiesced(u64),
}

impl Answered {
    fn stream(self) -> (Tunnel, Option<ResumeId>) {
        match self {
            Answered::Stream(tunnel, id) => (tunnel, id),
            Answered::Quiesced(_) => unreachable!("a CONNECT is answered with a stream"),
        }
    }
}

/// `CONNECT ip:port` (or a quiesce) on the lease's connection; the tunnel,
/// counted open there until it ends, once the destination says 200.
async fn send(
    lease: Lease,
    source: &Source,
    to: &Destination,
    ask: &Ask,
) -> Result<Answered, TransportError> {
    let http2 = |source| TransportError::Http2 {
        node: to.node.clone(),
        source,
    };
    let Lease { mut sender, stream } = lease;
    sender.ready().await.map_err(http2)?;
    let request = Request::builder()
        .version(http::Version::HTTP_2)
        .header(FORWARDED, forwarded_for(source.address));
    let request = match ask {
        Ask::Stream(resume) => {
            let request = request.method(Method::CONNECT).uri(to.to.to_string());
            match resume {
                None => request,
                Some(Resume::New) => request.header(resume::RESUME, "new"),
                Some(Resume::Stream(id)) => request.header(resume::RESUME, id.to_string()),
            }
        }
        Ask::Quiesce(id, sent) => request
            .method(Method::POST)
            .uri(format!("https://{}{}", to.node, resume::QUIESCE_PATH))
            .header(resume::RESUME, id.to_string())
            .header(resume::SENT, sent.to_string()),
    };
    let request = request
        .body(Empty::new())
        .expect("a request to a socket address or node name is valid");
    let mut response = sender.send_request(request).await.map_err(http2)?;
    if response.status() != StatusCode::OK {
        let status = response.status();
        let reason = match response.body_mut().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
            Err(_) => String::new(),
        };
        return Err(TransportError::Refused {
            node: to.node.clone(),
            to: to.to,
            status,
            reason,
        });
    }
    let header = |name| response.headers().get(name)?.to_str().ok();
    if let Ask::Quiesce(..) = ask {
        return header(resume::SENT)
            .and_then(|sent| sent.parse().ok())
            .map(Answered::Quiesced)
            .ok_or_else(|| TransportError::Refused {
                node: to.node.clone(),
                to: to.to,
                status: response.status(),
                reason: "no byte count in the answer to a quiesce".into(),
            });
    }
    let id = header(resume::RESUME_ID).and_then(|id| id.parse().ok());
    let upgraded = hyper::upgrade::on(response).await.map_err(http2)?;
    Ok(Answered::Stream(Tunnel::new(upgraded, Some(stream)), id))
}
