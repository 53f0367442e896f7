//! Draining, after a hand-over: the old agent accepts nothing new, asks its
//! HTTP connections to end at a request boundary (HTTP/1.1 `Connection:
//! close` on the next response, or closed when idle; HTTP/2 `GOAWAY`), lets
//! everything else finish, and exits once its connections ended or at
//! `--drain-timeout`, whichever comes first.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Whether the agent drains; every HTTP connection watches it.
pub struct Drain(watch::Sender<bool>);

impl Default for Drain {
    fn default() -> Self {
        Drain(watch::Sender::new(false))
    }
}

impl Drain {
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    pub fn watch(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

/// Runs an HTTP connection to its end; when the agent starts draining,
/// calls `shutdown` on it once (hyper's `graceful_shutdown`). A future of
/// its own (not an `async fn`): the connection may borrow the caller's state
/// and still be spawned.
pub fn until_drained<C, F>(conn: C, drain: watch::Receiver<bool>, shutdown: F) -> UntilDrained<C, F>
where
    C: Future,
    F: FnOnce(Pin<&mut C>) + Unpin,
{
    let mut drain = drain;
    let draining = async move {
        if drain.wait_for(|draining| *draining).await.is_err() {
            // The agent is gone: nothing will drain.
            std::future::pending::<()>().await;
        }
    };
    UntilDrained {
        conn: Box::pin(conn),
        draining: Some(Box::pin(draining)),
        shutdown: Some(shutdown),
    }
}

pub struct UntilDrained<C, F> {
    conn: Pin<Box<C>>,
    draining: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    shutdown: Option<F>,
}

impl<C, F> Future for UntilDrained<C, F>
where
    C: Future,
    F: FnOnce(Pin<&mut C>) + Unpin,
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if let Some(draining) = &mut this.draining {
            if draining.as_mut().poll(cx).is_ready() {
                this.draining = None;
                if let Some(shutdown) = this.shutdown.take() {
                    shutdown(this.conn.as_mut());
                }
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

/// Waits until `open()` is 0 or `timeout` passed; returns what is still open.
pub async fn connections_end(open: impl Fn() -> u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let left = open();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
