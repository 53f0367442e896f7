//! One HBONE stream as a byte stream, closed the way TCP closes.
//!
//! Dropping an HTTP/2 stream whose peer has not ended its side resets it
//! (`RST_STREAM`). When our side ended first (a server that closed after
//! its response), the peer's end of stream is often already on its way;
//! arriving after h2 forgot the reset stream (1 s, or 50 newer resets),
//! it makes h2 answer `STREAM_CLOSED`, which counts against h2's lifetime
//! limit of 1 024 self-made resets per connection. At thousands of new
//! connections per second that limit is reached, and the whole HBONE
//! connection goes with a `GOAWAY` (`ENHANCE_YOUR_CALM`), every stream on
//! it failing. So a tunnel dropped after its own end of stream lingers, as
//! a closed TCP socket does in `FIN_WAIT2`, until the peer's end of stream
//! (then it closes without any reset), data (a reset, as TCP answers data
//! to a closed socket), a reset, or [`LINGER`].
//!
//! On the caller's side a tunnel also holds its place in its pooled
//! connection's count of open streams ([`OpenStream`]) until the stream
//! has ended, lingering included.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a tunnel we ended waits for the peer's end: Linux's default
/// `tcp_fin_timeout` for a closed socket.
const LINGER: Duration = Duration::from_secs(60);

/// One tunneled connection: bytes in both directions, end to end.
pub struct Tunnel {
    /// `None` once handed to its linger.
    stream: Option<(TokioIo<Upgraded>, Option<OpenStream>)>,
    /// Our end of stream was sent.
    ours_ended: bool,
    /// The peer's end of stream was read.
    theirs_ended: bool,
}

/// One of the streams a pooled connection counts open, until dropped.
pub(super) struct OpenStream(Arc<AtomicU32>);

impl OpenStream {
    /// Counts a stream on `open`.
    pub(super) fn on(open: &Arc<AtomicU32>) -> OpenStream {
        open.fetch_add(1, Ordering::Relaxed);
        OpenStream(open.clone())
    }

    /// The count it is on: which connection.
    pub(super) fn connection(&self) -> &Arc<AtomicU32> {
        &self.0
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tunnel {
    /// `counted`: on the caller's side, the stream counted on its pooled
    /// connection until it ends.
    pub(super) fn new(upgraded: Upgraded, counted: Option<OpenStream>) -> Tunnel {
        Tunnel {
            stream: Some((TokioIo::new(upgraded), counted)),
            ours_ended: false,
            theirs_ended: false,
        }
    }

    fn stream(&mut self) -> Pin<&mut TokioIo<Upgraded>> {
        let (stream, _) = self.stream.as_mut().expect("only a dropped tunnel lingers");
        Pin::new(stream)
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (room, before) = (buf.remaining(), buf.filled().len());
        let polled = self.stream().poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && room > 0 && buf.filled().len() == before {
            self.theirs_ended = true;
        }
        polled
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(|(s, _)| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.stream().poll_shutdown(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            self.ours_ended = true;
        }
        polled
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Dropped with our side open: an abort, which the reset reports.
        if !self.ours_ended || self.theirs_ended {
            return;
        }
        let (Some(stream), Ok(runtime)) =
            (self.stream.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(linger(stream));
    }
}

/// Waits for the peer's end of the stream; whatever comes instead, or
/// nothing within [`LINGER`], ends it with a reset when it is dropped. It
/// stays counted open until then.
async fn linger((mut stream, _counted): (TokioIo<Upgraded>, Option<OpenStream>)) {
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(LINGER, stream.read(&mut byte)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Method, Request, Response};
    use http_body_util::Empty;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    /// Both ends of one `CONNECT` stream over an in-memory HTTP/2
    /// connection: (client's, server's).
    async fn stream_pair() -> (Tunnel, Tunnel) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (accepted, mut server_side) = mpsc::unbounded_channel();
        let service = service_fn(move |mut request: Request<hyper::body::Incoming>| {
            let accepted = accepted.clone();
            async move {
                let upgrade = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    let _ = accepted.send(Tunnel::new(upgrade.await.unwrap(), None));
                });
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), service),
        );
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let client = Tunnel::new(hyper::upgrade::on(response).await.unwrap(), None);
        (client, server_side.recv().await.unwrap())
    }

    /// The server answers and closes first, as after `Connection: close`.
    async fn server_closes_first() -> Tunnel {
        let (mut client, mut server) = stream_pair().await;
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response");
        // What the server's drop sent has arrived.
        tokio::time::sleep(Duration::from_millis(50)).await;
        client
    }

    #[tokio::test]
    async fn a_tunnel_dropped_after_its_end_waits_for_the_peers() {
        let mut client = server_closes_first().await;
        // Not reset: the client's end of stream is taken.
        client.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn data_after_the_end_is_answered_with_a_reset() {
        let mut client = server_closes_first().await;
        client.write_all(b"late").await.unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(client.shutdown().await.is_err(), "not reset");
    }
}
