//! Idle detection: a connection on which no byte moves in either direction
//! for its idle timeout is ended, whatever state it is in. The L4 relay uses
//! it with `--idle-timeout`; HTTP connections and the tunnels they upgrade
//! to use it with `--http-idle-timeout` (Envoy's `stream_idle_timeout` at
//! connection granularity): it catches stalled uploads, responses the client
//! never reads (an HTTP/2 window held at zero), silent HTTP/2 connections and
//! idle WebSockets, which would otherwise pin the proxy's memory and
//! descriptors for as long as the tenant likes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::telemetry::LiveBytes;

/// When the connection last moved a byte, in milliseconds since `epoch`;
/// a TCP relay also counts the bytes in its metrics as they move.
#[derive(Clone)]
pub struct Activity {
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
    live: Option<LiveBytes>,
}

impl Activity {
    pub fn new() -> Activity {
        Activity::counting(None)
    }

    /// An activity whose moves are also counted in `live`.
    pub fn counting(live: Option<LiveBytes>) -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: Arc::default(),
            live,
        }
    }

    /// Something moved just now.
    pub fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// `n` bytes moved just now, to the upstream side (`true`) or back.
    pub fn moved(&self, to_upstream: bool, n: u64) {
        self.touch();
        if let Some(live) = &self.live {
            live.moved(to_upstream, n);
        }
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Nothing has moved for at least `span`.
    pub fn quiet_for(&self, span: Duration) -> bool {
        Instant::now() >= self.last() + span
    }

    /// Runs `work` until it ends, or until nothing has moved for `timeout`
    /// (then `None`, and `work` is dropped).
    pub async fn unless_idle<F: Future>(&self, timeout: Duration, work: F) -> Option<F::Output> {
        tokio::select! {
            done = work => Some(done),
            () = self.idle_for(timeout) => None,
        }
    }

    /// Resolves once nothing has moved for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An I/O object that records its [`Activity`]; it is the upstream side:
/// what is written to it moves to the upstream.
pub struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Activity) -> Tracked<T> {
        Tracked { inner, activity }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if matches!(polled, Poll::Ready(Ok(()))) && read > 0 {
            self.activity.moved(false, read as u64);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n @ 1..)) = polled {
            self.activity.moved(true, n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n @ 1..)) = polled {
            self.activity.moved(true, n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn work_that_ends_is_not_idle() {
        let activity = Activity::new();
        let done = activity
            .unless_idle(Duration::from_secs(60), async { 7 })
            .await;
        assert_eq!(done, Some(7));
    }

    #[tokio::test]
    async fn idle_is_counted_from_the_last_byte() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut tracked = Tracked::new(a, activity.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.write_all(b"x").await.unwrap();
        tracked.read_exact(&mut [0u8; 1]).await.unwrap();
        let touched = Instant::now();
        activity.idle_for(Duration::from_millis(300)).await;
        // Counted from the byte read, not from the start.
        assert!(touched.elapsed() >= Duration::from_millis(290));
    }
}
