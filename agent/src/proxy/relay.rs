//! Byte relay between a client and an upstream connection.
//!
//! Half-close is preserved (EOF on one side becomes a FIN on the other), a
//! reset on either side resets the other, and a connection idle in both
//! directions for `idle` is reset. A connection holds a buffer only while
//! a write could not take what was read (see `relay_buffer`).
//!
//! A relay can also be quiesced (at a hand-over, see `carry`): each
//! direction stops before its next read, after writing all it has read, so
//! that every byte is either delivered or still in a socket's kernel buffer.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::idle::{Activity, Tracked};
use super::relay_buffer::RelayBuffer;
use crate::telemetry::LiveBytes;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Transferred {
    pub sent: u64,
    pub received: u64,
}

impl std::ops::Add for Transferred {
    type Output = Transferred;

    fn add(self, other: Transferred) -> Transferred {
        Transferred {
            sent: self.sent + other.sent,
            received: self.received + other.received,
        }
    }
}

/// Which directions of a relay have ended (their EOF passed on).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Client to upstream.
    pub sent: bool,
    /// Upstream to client.
    pub received: bool,
}

/// How a relay stopped without failing.
#[derive(Debug)]
pub enum Stopped {
    /// Both directions are closed.
    Closed(Transferred),
    /// Told to quiesce: nothing is read any more and everything read was
    /// written; the directions in `Ended` had closed before.
    Quiesced(Transferred, Ended),
}

/// How a relay runs: its idle timeout and where its bytes are counted.
#[derive(Clone)]
pub struct RelayOptions {
    pub idle: Duration,
    pub live: Option<LiveBytes>,
}

/// Relays until both directions are closed, either side fails, nothing
/// moves for `idle`, or `quiesce` turns true. The directions in `ended`
/// closed before (a relay resumed). On failure both sockets are reset.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    how: RelayOptions,
    ended: Ended,
    quiesce: Option<watch::Receiver<bool>>,
) -> io::Result<Stopped> {
    let idle = how.idle;
    let activity = Activity::counting(how.live);
    let up = copy(
        client,
        upstream,
        &activity,
        true,
        ended.sent,
        quiesce.clone(),
    );
    let down = copy(upstream, client, &activity, false, ended.received, quiesce);
    let copied = activity
        .unless_idle(idle, async { tokio::try_join!(up, down) })
        .await;
    let outcome = stopped(copied);
    if outcome.is_err() {
        reset(client);
        reset(upstream);
    }
    outcome
}

/// What one direction copied, and whether it closed.
pub(super) type Copied = (u64, bool);

/// How a relay whose two directions each copied `(bytes, closed)` stopped;
/// `None`: idle for too long.
pub(super) fn stopped(copied: Option<io::Result<(Copied, Copied)>>) -> io::Result<Stopped> {
    match copied {
        Some(copied) => copied.map(|((sent, up_closed), (received, down_closed))| {
            let transferred = Transferred { sent, received };
            match (up_closed, down_closed) {
                (true, true) => Stopped::Closed(transferred),
                (sent, received) => Stopped::Quiesced(transferred, Ended { sent, received }),
            }
        }),
        None => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
    }
}

/// A relay's client connection: a socket, or TLS the ingress terminated on
/// one. A failed relay resets the socket underneath.
pub trait ClientConn: AsyncRead + AsyncWrite + Unpin {
    fn socket(&self) -> &TcpStream;

    /// Whether the relay can be carried to the next agent at a hand-over:
    /// plaintext sockets only (a TLS session's state cannot be).
    fn carriable(&self) -> bool {
        false
    }
}

impl ClientConn for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }

    fn carriable(&self) -> bool {
        true
    }
}

/// [`relay`] between a client connection and any other stream (an HBONE
/// tunnel): the same idle rule, half-close and reset of the client's socket
/// on failure.
pub async fn relay_stream<C: ClientConn, S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    upstream: &mut S,
    how: RelayOptions,
) -> io::Result<Transferred> {
    let idle = how.idle;
    let activity = Activity::counting(how.live);
    let mut upstream = FinishedPeer::new(Tracked::new(upstream, activity.clone()));
    let copied = tokio::io::copy_bidirectional(client, &mut upstream);
    let outcome = match activity.unless_idle(idle, copied).await {
        Some(copied) => copied.map(|(sent, received)| Transferred { sent, received }),
        None => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
    };
    if outcome.is_err() {
        reset(client.socket());
    }
    outcome
}

/// A stream whose end of stream cannot fail once its peer has ended its
/// own side. A peer that sent all it had and then dropped the stream (an
/// HTTP server closing after `Connection: close` resets the HBONE stream
/// with `NO_ERROR`, as HTTP/2 lets it) makes sending our end of stream
/// fail; with TCP the same FIN would be answered by a reset nobody sees.
/// Counting such a connection as failed would report most short-lived
/// connections to a closing server as errors.
pub struct FinishedPeer<S> {
    inner: S,
    /// The peer's end of stream was read.
    ended: bool,
    /// The task of a refused end of stream, woken when the peer's arrives.
    refused: Option<Waker>,
}

impl<S> FinishedPeer<S> {
    pub fn new(inner: S) -> FinishedPeer<S> {
        FinishedPeer {
            inner,
            ended: false,
            refused: None,
        }
    }

    /// `polled` (a flush or shutdown) once the peer has ended; until then
    /// a failure waits for what the peer sends next, which the relay's
    /// other direction is reading on the same task: its end of stream (no
    /// failure: polled again, this returns `Ok`) or a reset (the read
    /// fails, and with it the relay).
    fn after_end(
        &mut self,
        cx: &Context<'_>,
        polled: Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        match polled {
            Poll::Ready(Err(_)) if self.ended => Poll::Ready(Ok(())),
            Poll::Ready(Err(_)) => {
                self.refused = Some(cx.waker().clone());
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FinishedPeer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == before {
            self.ended = true;
            if let Some(refused) = self.refused.take() {
                refused.wake();
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FinishedPeer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Not vectored: the relays write one buffer at a time.
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.after_end(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.after_end(cx, polled)
    }
}

/// Closes with RST instead of FIN when the socket is dropped.
pub fn reset(stream: &impl AsFd) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Copies until EOF (`true`: closed) or until `quiesce` turns true before a
/// read (`false`); `closed` if the direction had ended already.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    to_upstream: bool,
    closed: bool,
    quiesce: Option<watch::Receiver<bool>>,
) -> io::Result<(u64, bool)> {
    let mut buf = RelayBuffer::default();
    let mut total = 0u64;
    if closed {
        return Ok((0, true));
    }
    let quiesced = async {
        let told = match quiesce {
            Some(mut quiesce) => quiesce.wait_for(|q| *q).await.is_ok(),
            None => false,
        };
        if !told {
            // Never told (or the agent is gone): relay on.
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(quiesced);
    loop {
        // The only point where a direction stops: nothing read is unwritten.
        tokio::select! {
            biased;
            () = &mut quiesced => return Ok((total, false)),
            readable = from.readable() => readable?,
        }
        let Poll::Ready(n) = read_socket(from, &mut buf, |data| to.try_write(data)) else {
            continue;
        };
        let n = n?;
        if n == 0 {
            shutdown_write(to)?;
            return Ok((total, true));
        }
        write_unwritten(to, &mut buf).await?;
        total += n as u64;
        activity.moved(to_upstream, n as u64);
    }
}

/// Reads what `from` has and passes it to `write` at once (see
/// [`RelayBuffer::relay_once`]); `Pending`: nothing after all.
pub(super) fn read_socket(
    from: &TcpStream,
    buf: &mut RelayBuffer,
    write: impl FnOnce(&[u8]) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    let read = |space: &mut [u8]| match from.try_read(space) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        read => Poll::Ready(read),
    };
    buf.relay_once(read, write)
}

/// Writes what the last read into `buf` left to `to`.
pub(super) async fn write_unwritten(to: &TcpStream, buf: &mut RelayBuffer) -> io::Result<()> {
    write_all(to, buf.unwritten()).await?;
    buf.written();
    Ok(())
}

/// Passes an EOF on: a FIN to `to` (one already gone is no error).
pub(super) fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

pub(super) async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of real loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = listener.accept().await.unwrap();
        (a, b)
    }

    /// Relays between two sockets on a task of its own; gives them back.
    fn spawn_relay(
        client: TcpStream,
        upstream: TcpStream,
        idle: Duration,
        quiesce: Option<watch::Receiver<bool>>,
    ) -> tokio::task::JoinHandle<(io::Result<Stopped>, TcpStream, TcpStream)> {
        tokio::spawn(async move {
            let how = RelayOptions { idle, live: None };
            let stopped = relay(&client, &upstream, how, Ended::default(), quiesce).await;
            (stopped, client, upstream)
        })
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let relay = spawn_relay(proxy_client, proxy_upstream, Duration::from_secs(5), None);
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // The server can still answer after the client's half-close.
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pong");
        let Stopped::Closed(t) = relay.await.unwrap().0.unwrap() else {
            panic!("not closed")
        };
        assert_eq!((t.sent, t.received), (4, 4));
    }

    #[tokio::test]
    async fn a_quiesced_relay_leaves_unread_bytes_in_the_socket() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, mut server) = pair().await;
        let (quiesce, told) = watch::channel(false);
        let relay = spawn_relay(
            proxy_client,
            proxy_upstream,
            Duration::from_secs(5),
            Some(told),
        );
        client.write_all(b"one").await.unwrap();
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.unwrap();
        quiesce.send_replace(true);
        let (stopped, proxy_client, proxy_upstream) = relay.await.unwrap();
        let Stopped::Quiesced(t, ended) = stopped.unwrap() else {
            panic!("not quiesced")
        };
        assert_eq!((t.sent, t.received, ended), (3, 0, Ended::default()));
        // Written after the relay stopped: left for whoever relays next.
        client.write_all(b"two").await.unwrap();
        let resumed = spawn_relay(proxy_client, proxy_upstream, Duration::from_secs(5), None);
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"two");
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        let Stopped::Closed(t) = resumed.await.unwrap().0.unwrap() else {
            panic!("not closed")
        };
        assert_eq!((t.sent, t.received), (3, 0));
    }

    #[tokio::test]
    async fn reset_on_one_side_resets_the_other() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, server) = pair().await;
        let relay = spawn_relay(proxy_client, proxy_upstream, Duration::from_secs(5), None);
        reset(&server);
        drop(server);
        assert!(relay.await.unwrap().0.is_err());
        let mut buf = [0u8; 1];
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_upstream, _server) = pair().await;
        let relay = spawn_relay(
            proxy_client,
            proxy_upstream,
            Duration::from_millis(200),
            None,
        );
        let err = relay.await.unwrap().0.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let mut buf = [0u8; 1];
        assert!(client.read(&mut buf).await.is_err());
    }

    /// A tunnel that refuses our end of stream, as an HBONE stream reset
    /// by a peer that closed; what reading it gives: its end of stream at
    /// once, only after our end of stream was refused, or a reset.
    enum ResetTunnel {
        Ended,
        /// Whether our end of stream was refused yet.
        EndsLater(bool),
        Resets,
    }

    impl AsyncRead for ResetTunnel {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match *self {
                ResetTunnel::Ended | ResetTunnel::EndsLater(true) => Poll::Ready(Ok(())),
                ResetTunnel::EndsLater(false) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                ResetTunnel::Resets => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    impl AsyncWrite for ResetTunnel {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if let ResetTunnel::EndsLater(refused) = &mut *self {
                *refused = true;
            }
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
    }

    /// Relays a client's request and close into a [`ResetTunnel`].
    async fn close_into(tunnel: ResetTunnel) -> io::Result<Transferred> {
        let (mut client, mut proxy_client) = pair().await;
        client.write_all(b"GET").await.unwrap();
        client.shutdown().await.unwrap();
        // Long: a relay left waiting would end by this timeout, an error.
        let how = RelayOptions {
            idle: Duration::from_secs(60),
            live: None,
        };
        let mut tunnel = tunnel;
        relay_stream(&mut proxy_client, &mut tunnel, how).await
    }

    #[tokio::test]
    async fn a_close_after_the_peer_ended_is_no_failure() {
        let done = close_into(ResetTunnel::Ended).await.unwrap();
        assert_eq!((done.sent, done.received), (3, 0));
        // Refused first, then the peer's end of stream arrives.
        let done = close_into(ResetTunnel::EndsLater(false)).await.unwrap();
        assert_eq!((done.sent, done.received), (3, 0));
        // A peer that resets its side too fails the relay.
        let reset = close_into(ResetTunnel::Resets).await;
        assert_eq!(reset.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }
}
