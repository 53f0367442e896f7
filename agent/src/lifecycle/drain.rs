//! Draining, after a hand-over: the old agent accepts nothing new, asks its
//! HTTP connections to end at a request boundary (HTTP/1.1: `Connection:
//! close` on the next response, and closed if still idle [`IDLE_GRACE`]
//! later; HTTP/2: `GOAWAY`), lets everything else finish, and exits once its
//! connections ended or at `--drain-timeout`, whichever comes first.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, CONNECTION};
use http::{Response, StatusCode};
use tokio::sync::watch;

/// How long an HTTP/1.1 connection may stay idle once the agent drains
/// before it is closed: a busy one ends sooner, after a response with
/// `Connection: close`, with no race against the client's next request.
pub const IDLE_GRACE: Duration = Duration::from_secs(2);

/// Whether the agent drains; every HTTP connection watches it.
pub struct Drain {
    started: Arc<AtomicBool>,
    signal: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            started: Arc::default(),
            signal: watch::Sender::new(false),
        }
    }
}

impl Drain {
    pub fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
        self.signal.send_replace(true);
    }

    pub fn watch(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// What an HTTP/1.1 response path checks (lock-free).
    pub fn draining(&self) -> Draining {
        Draining(self.started.clone())
    }
}

/// Lets an HTTP/1.1 response end its connection once the agent drains.
#[derive(Clone)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Adds `Connection: close` while draining (not to a protocol switch,
    /// whose connection goes on as a tunnel).
    pub fn close_after<B>(&self, response: &mut Response<B>) {
        if self.0.load(Ordering::Relaxed) && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Runs an HTTP connection to its end; `grace` after the agent starts
/// draining, calls `shutdown` on it once (hyper's `graceful_shutdown`). A
/// future of its own (not an `async fn`): the connection may borrow the
/// caller's state and still be spawned.
pub fn until_drained<C, F>(
    conn: C,
    drain: watch::Receiver<bool>,
    grace: Duration,
    shutdown: F,
) -> UntilDrained<C, F>
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
        tokio::time::sleep(grace).await;
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
