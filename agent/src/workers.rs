//! The proxy's event loops: one single-threaded tokio runtime per worker
//! thread, in the manner of Envoy's workers. An accepted connection is
//! placed on the worker serving the fewest connections and stays there with
//! every task it spawns (its HTTP/2 streams, its upstream and HBONE
//! connections, which are pooled per worker), so a request is handled from
//! first byte to last on one thread. A work-stealing runtime instead wakes
//! a second thread for about every request at moderate load: measured, this
//! cuts the agent's context switches by a third and its CPU at 2000 req/s
//! by a tenth (README, Performance).
//!
//! Control work (configuration, enrollment, certificates, DNS, the admin
//! and metrics servers) stays on the agent's main runtime. Listeners are
//! polled there too, but a connection they accept is never registered with
//! that runtime: [`Acceptor`] hands it over as a plain socket, and only the
//! worker that serves it registers it.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;

thread_local! {
    /// The worker this thread runs, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker the calling task runs on; `None` off the workers. Pools key
/// their connections by it, so a connection is only used where it is
/// driven.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The proxy's worker threads.
pub struct Workers {
    workers: Vec<Worker>,
    /// Where the search for the least busy worker starts, so that equally
    /// busy workers take turns.
    next: AtomicUsize,
}

struct Worker {
    handle: Handle,
    /// Connections (and other tasks given with [`Workers::spawn`]) it serves.
    serving: Arc<AtomicUsize>,
}

impl Workers {
    /// Starts `count` worker threads (at least one). They run until the
    /// process ends: the connections they serve are only ever dropped
    /// with it, or handed to the next agent.
    pub fn start(count: usize) -> io::Result<Workers> {
        let workers = (0..count.max(1))
            .map(|index| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let handle = runtime.handle().clone();
                std::thread::Builder::new()
                    .name(format!("nodemesh-worker-{index}"))
                    .spawn(move || {
                        CURRENT.with(|current| current.set(Some(index)));
                        runtime.block_on(std::future::pending::<()>())
                    })?;
                Ok(Worker {
                    handle,
                    serving: Arc::default(),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// Connections each worker serves, by worker index.
    pub fn serving(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|worker| worker.serving.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `task` to its end on the least busy worker. It must create its
    /// sockets' tokio handles itself, there (see [`Workers::serve`]).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.workers.len();
        let worker = (0..count)
            .map(|k| &self.workers[(start + k) % count])
            .min_by_key(|worker| worker.serving.load(Ordering::Relaxed))
            .expect("at least one worker");
        let serving = Serving::count(&worker.serving);
        // Boxed: a connection's future is tens of kilobytes, which tokio
        // would move by value several times on its way into a task (and
        // this wrapper would hold twice); a box moves as a pointer.
        let task = Box::pin(task);
        worker.handle.spawn(async move {
            let _serving = serving;
            task.await
        });
    }

    /// Serves a connection from an [`Acceptor`] on the least busy worker,
    /// which registers its socket with its own event loop.
    pub fn serve<S, F>(&self, stream: std::net::TcpStream, peer: SocketAddr, serve: S)
    where
        S: FnOnce(TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => {
                    log::warn!("connection from {peer} dropped: a worker cannot poll it: {e}")
                }
            }
        });
    }
}

/// A listener whose connections go to the workers. tokio's own `accept`
/// registers each connection with the accepting runtime, and moving it to
/// a worker deregisters it again: two `epoll_ctl` and a registration per
/// connection spent on a runtime that never reads from it.
pub struct Acceptor(AsyncFd<std::net::TcpListener>);

impl Acceptor {
    /// Takes over `listener`, named `what` in the error logged when it
    /// cannot be polled (then `None`: the accept loop has nothing to run).
    pub fn polled(listener: TcpListener, what: &dyn std::fmt::Display) -> Option<Acceptor> {
        Acceptor::new(listener)
            .inspect_err(|e| log::error!("{what} listener: cannot poll it: {e}"))
            .ok()
    }

    /// Takes over `listener`; it must be polled from a runtime's task.
    pub fn new(listener: TcpListener) -> io::Result<Acceptor> {
        let listener = listener.into_std()?;
        // SAFETY: the listener owns its descriptor, and the `AsyncFd` owns
        // the listener and lends it out only by reference, so the
        // descriptor stays open and the same for as long as it is
        // registered.
        let registered = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) };
        Ok(Acceptor(registered?))
    }

    /// The next connection, non-blocking and not registered anywhere yet,
    /// with its peer's address.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            let accepted = ready.try_io(|listener| {
                SockRef::from(listener.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            });
            let Ok(accepted) = accepted else { continue };
            let (socket, peer) = accepted?;
            let peer = peer.as_socket().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP connection")
            })?;
            return Ok((socket.into(), peer));
        }
    }
}

/// One task counted on its worker for as long as it lives.
struct Serving(Arc<AtomicUsize>);

impl Serving {
    fn count(serving: &Arc<AtomicUsize>) -> Serving {
        serving.fetch_add(1, Ordering::Relaxed);
        Serving(serving.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_go_to_the_least_busy_worker_and_run_there() {
        let workers = Workers::start(2).unwrap();
        let (held, hold) = tokio::sync::watch::channel(());
        let (ran, mut on) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..5 {
            let (mut hold, ran) = (hold.clone(), ran.clone());
            workers.spawn(async move {
                ran.send(current()).unwrap();
                let _ = hold.changed().await;
            });
        }
        let mut places = Vec::new();
        for _ in 0..5 {
            places.push(on.recv().await.unwrap().expect("on a worker"));
        }
        places.sort_unstable();
        assert_eq!(places, [0, 0, 0, 1, 1]);
        assert_eq!(workers.serving(), [3, 2]);
        drop(held);
        while workers.serving() != [0, 0] {
            tokio::task::yield_now().await;
        }
        assert_eq!(current(), None);
    }

    #[tokio::test]
    async fn an_accepted_connection_is_served_on_a_worker_with_its_peer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let workers = Workers::start(1).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = Acceptor::new(listener).unwrap();
        let mut client = TcpStream::connect(address).await.unwrap();
        let (stream, peer) = acceptor.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        workers.serve(stream, peer, |mut stream| async move {
            let worker = current().expect("on a worker") as u8;
            stream.write_all(&[worker]).await.unwrap();
        });
        let mut served_by = [9u8; 1];
        client.read_exact(&mut served_by).await.unwrap();
        assert_eq!(served_by, [0]);
    }
}
