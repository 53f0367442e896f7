//! The hops out of the proxy: to a destination on behalf of a workload, and
//! from the proxy into the workload it protects.
//!
//! `connect` is the agent-to-agent hop. Today it is plain TCP from the source
//! workload's own namespace and address, captured by the destination node's
//! agent; mutual TLS with workload identity replaces this one function.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use nodemesh_common::INBOUND_PASSTHROUGH_V4;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use super::budget::Fds;
use super::Pod;

/// Connects to `to` as the workload `from` would, on the descriptor `fd`
/// charged to it.
pub async fn connect(
    from: &Pod,
    to: SocketAddr,
    timeout: Duration,
    fd: Fds,
) -> io::Result<Charged> {
    connect_within(from.socket(to, None)?, to, timeout, fd).await
}

/// Delivers an inbound connection to the application in `pod`, from the
/// passthrough address that sk_lookup lets through.
pub async fn deliver(
    pod: &Pod,
    app: SocketAddr,
    timeout: Duration,
    fd: Fds,
) -> io::Result<Charged> {
    let source = app
        .is_ipv4()
        .then(|| SocketAddr::new(Ipv4Addr::from(INBOUND_PASSTHROUGH_V4).into(), 0));
    connect_within(pod.socket(app, source)?, app, timeout, fd).await
}

async fn connect_within(
    socket: TcpSocket,
    to: SocketAddr,
    timeout: Duration,
    fd: Fds,
) -> io::Result<Charged> {
    match tokio::time::timeout(timeout, socket.connect(to)).await {
        Ok(result) => result.map(|stream| Charged { stream, _fd: fd }),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// A connection the proxy opened, with the descriptor charged for it: the
/// charge follows the socket wherever it goes (a pool, a spliced tunnel)
/// and ends when it closes.
pub struct Charged {
    stream: TcpStream,
    _fd: Fds,
}

impl Deref for Charged {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Charged {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Charged {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
