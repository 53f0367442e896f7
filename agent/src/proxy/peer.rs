//! The hops out of the proxy: to a destination on behalf of a workload (as
//! [`hop`](super::hop) chose), and from the proxy into the workload it
//! protects.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use super::budget::Fds;
use super::hop::Hop;
use super::inbound::Admitted;
use super::resume::Resume;
use super::{Pod, Proxy};
use crate::transport::server::StreamRequest;
use crate::transport::{Destination, Source, TransportError, Tunnel};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// What an in-process stream to a same-node workload buffers each way.
const LOCAL_BUFFER: usize = 64 * 1024;

/// Connects to `to` for the workload `from` over `hop`, on the descriptor
/// `fd` charged to it.
pub async fn connect(
    proxy: &Arc<Proxy>,
    from: &Pod,
    to: SocketAddr,
    hop: Hop,
    timeout: Duration,
    fd: Fds,
) -> Result<Charged, PeerError> {
    let source = from.address_for(to.ip());
    match hop {
        Hop::Plain => Ok(connect_within(from.socket(to)?, to, timeout, fd).await?),
        Hop::Local => {
            let admitted = admit_local(proxy, from, to).await?;
            let (near, far) = tokio::io::duplex(LOCAL_BUFFER);
            let proxy = proxy.clone();
            // Boxed: kilobytes of state, which tokio would move by value
            // several times on its way into a task.
            tokio::spawn(Box::pin(async move {
                proxy.serve_stream(admitted, far, None).await
            }));
            Ok(Charged::new(Stream::Local(Prefixed::new(near)), fd))
        }
        Hop::Mesh(destination) => {
            let source = Source {
                identity: from.identity.clone(),
                address: source,
            };
            let tunnel = proxy.hbone.connect(&source, &destination, timeout).await?;
            Ok(Charged::new(Stream::Tunnel(Prefixed::new(tunnel)), fd))
        }
    }
}

/// [`connect`] over HBONE for a relay that outlives this agent: the stream
/// is resumable if the destination's agent agrees.
pub async fn connect_resumable(
    proxy: &Arc<Proxy>,
    from: &Pod,
    destination: Destination,
    timeout: Duration,
    fd: Fds,
) -> Result<Charged, PeerError> {
    let source = Source {
        identity: from.identity.clone(),
        address: from.address_for(destination.to.ip()),
    };
    let hbone = &proxy.hbone;
    let (tunnel, id) = hbone
        .connect_resumable(&source, &destination, timeout)
        .await?;
    let mut charged = Charged::new(Stream::Tunnel(Prefixed::new(tunnel)), fd);
    charged.resume = id.map(|id| Box::new(Resume::of(id, &destination)));
    Ok(charged)
}

/// Admits a connection from the workload `from` to `to`, a workload of
/// this node: the destination side runs as for a stream from another node,
/// with the caller's own identity (same policy, same delivery).
pub async fn admit_local(proxy: &Proxy, from: &Pod, to: SocketAddr) -> io::Result<Admitted> {
    let source = from.address_for(to.ip());
    let request = StreamRequest {
        peer: from.identity.clone(),
        source,
        to,
        remote: SocketAddr::new(source, 0),
    };
    proxy
        .admit_stream(&request, "local")
        .await
        .map_err(|refused| io::Error::new(io::ErrorKind::ConnectionRefused, refused.reason))
}

/// Delivers an inbound connection to the application in `pod` from the
/// caller's own address `source`, so the application sees who called (its
/// logs, rate limits and allow-lists keep working). The socket is
/// transparent (it may bind an address that is not local); its SYN loops
/// over the workload's `lo` and `sk_lookup` lets it through to the
/// application because the agent announced it in `deliveries` first; the
/// application's replies come back over `lo` by the routing
/// `reply_routing` installed at enrollment.
pub async fn deliver(
    proxy: &Proxy,
    pod: &Pod,
    app: SocketAddr,
    source: IpAddr,
    timeout: Duration,
    fd: Fds,
) -> io::Result<Charged> {
    if source.is_ipv4() != app.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("caller {source} and application {app} are not of the same IP family"),
        ));
    }
    let socket = pod.transparent_socket(app)?;
    socket.bind(SocketAddr::new(source, 0))?;
    // Until the handshake is done (retransmitted SYNs included).
    let _announced = proxy.deliveries.announce(socket.local_addr()?, app)?;
    connect_within(socket, app, timeout, fd).await
}

async fn connect_within(
    socket: TcpSocket,
    to: SocketAddr,
    timeout: Duration,
    fd: Fds,
) -> io::Result<Charged> {
    match tokio::time::timeout(timeout, socket.connect(to)).await {
        Ok(result) => result.map(|stream| Charged::new(Stream::Tcp(stream), fd)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// A connection the proxy opened, with the descriptor charged for it: the
/// charge follows the connection wherever it goes (a pool, a spliced
/// tunnel) and ends when it closes.
pub struct Charged {
    pub stream: Stream,
    /// How a resumable HBONE stream resumes.
    pub resume: Option<Box<Resume>>,
    _fd: Fds,
}

/// A socket, an HBONE stream to another node's agent, or a stream to the
/// destination side of this agent.
pub enum Stream {
    Tcp(TcpStream),
    Tunnel(Prefixed<Tunnel>),
    Local(Prefixed<DuplexStream>),
}

impl Charged {
    fn new(stream: Stream, fd: Fds) -> Charged {
        Charged {
            stream,
            resume: None,
            _fd: fd,
        }
    }

    /// Resolves once the far end has sent something (a server that speaks
    /// first); nothing is consumed.
    pub async fn spoken(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(tcp) => tcp.peek(&mut [0u8; 1]).await.map(drop),
            Stream::Tunnel(tunnel) => tunnel.fill().await,
            Stream::Local(local) => local.fill().await,
        }
    }
}

/// An I/O stream that can look at its first bytes without consuming them.
pub struct Prefixed<S> {
    head: BytesMut,
    io: S,
}

impl<S: AsyncRead + Unpin> Prefixed<S> {
    pub fn new(io: S) -> Prefixed<S> {
        Prefixed {
            head: BytesMut::new(),
            io,
        }
    }

    /// `io`, with `head` read from it already.
    pub fn with_head(head: BytesMut, io: S) -> Prefixed<S> {
        Prefixed { head, io }
    }

    /// Bytes read ahead and not yet consumed.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Puts `bytes`, read from the stream before the head, back in front
    /// of it.
    pub fn unread(&mut self, bytes: &[u8]) {
        let mut head = BytesMut::from(bytes);
        head.extend_from_slice(&self.head);
        self.head = head;
    }

    /// Consumes the bytes read ahead, leaving the stream itself to read.
    pub fn take_head(&mut self) -> BytesMut {
        std::mem::take(&mut self.head)
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Reads once more into the head, unless it holds `limit` bytes
    /// already; how many came (0 at the end of the stream).
    pub async fn read_more(&mut self, limit: usize) -> io::Result<usize> {
        if self.head.len() >= limit {
            return Ok(0);
        }
        self.head.reserve(limit - self.head.len());
        self.io.read_buf(&mut self.head).await
    }

    /// The bytes read ahead, and the stream after them.
    pub fn into_parts(self) -> (BytesMut, S) {
        (self.head, self.io)
    }

    /// Reads once into the head unless it already holds bytes.
    pub async fn fill(&mut self) -> io::Result<()> {
        if self.head.is_empty() {
            self.head.reserve(4096);
            self.io.read_buf(&mut self.head).await?;
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.advance(n);
            if this.head.is_empty() {
                // Read on, the head is a copy nothing needs: its 4 KiB would
                // stay with the connection for its life.
                this.head = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Dispatches to the socket or the tunnel.
macro_rules! each_stream {
    ($stream:expr, $s:ident => $body:expr) => {
        match $stream {
            Stream::Tcp($s) => $body,
            Stream::Tunnel($s) => $body,
            Stream::Local($s) => $body,
        }
    };
}

impl AsyncRead for Charged {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_stream!(&mut self.get_mut().stream, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Charged {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_stream!(&mut self.get_mut().stream, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_stream!(&mut self.get_mut().stream, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tunnel(_) | Stream::Local(_) => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(&mut self.get_mut().stream, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(&mut self.get_mut().stream, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn the_head_is_let_go_once_read() {
        let request = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";
        let mut stream = Prefixed::new(&request[..]);
        stream.fill().await.unwrap();
        assert_eq!(stream.head(), request);
        let mut read = [0; 8];
        stream.read_exact(&mut read).await.unwrap();
        assert!(stream.head.capacity() > 0, "still holds the rest");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!([&read[..], &rest].concat(), request);
        assert_eq!(stream.head.capacity(), 0);
    }
}
