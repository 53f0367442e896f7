//! The hops out of the proxy: to a destination on behalf of a workload, and
//! from the proxy into the workload it protects.
//!
//! `connect` is the agent-to-agent hop. Today it is plain TCP from the source
//! workload's own namespace and address, captured by the destination node's
//! agent; mutual TLS with workload identity replaces this one function.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use nodemesh_common::DELIVERY_MARK;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use super::budget::Fds;
use super::Pod;
use crate::ebpf::DeliveryTable;

/// Connects to `to` as the workload `from` would, on the descriptor `fd`
/// charged to it.
pub async fn connect(
    from: &Pod,
    to: SocketAddr,
    timeout: Duration,
    fd: Fds,
) -> io::Result<Charged> {
    connect_within(from.socket(to)?, to, timeout, fd).await
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
    pod: &Pod,
    app: SocketAddr,
    source: IpAddr,
    deliveries: &DeliveryTable,
    timeout: Duration,
    fd: Fds,
) -> io::Result<Charged> {
    if source.is_ipv4() != app.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("caller {source} and application {app} are not of the same IP family"),
        ));
    }
    let socket = pod.socket(app)?;
    socket2::SockRef::from(&socket).set_mark(DELIVERY_MARK)?;
    set_transparent(&socket, source)?;
    socket.bind(SocketAddr::new(source, 0))?;
    // Until the handshake is done (retransmitted SYNs included).
    let _announced = deliveries.announce(socket.local_addr()?, app)?;
    connect_within(socket, app, timeout, fd).await
}

/// `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (needs CAP_NET_ADMIN): lets the
/// socket bind the caller's address.
fn set_transparent(socket: &TcpSocket, family_of: IpAddr) -> io::Result<()> {
    let (level, option) = match family_of {
        IpAddr::V4(_) => (libc::SOL_IP, libc::IP_TRANSPARENT),
        IpAddr::V6(_) => (libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
    };
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is open (borrowed from `socket`), and the value
    // is a valid c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("making the delivery socket transparent (needs CAP_NET_ADMIN): {e}"),
        ))
    }
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
