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
//! and metrics servers) stays on the agent's main runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
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
        worker.handle.spawn(async move {
            let _serving = serving;
            task.await
        });
    }

    /// Serves a connection accepted elsewhere on the least busy worker: its
    /// socket moves to that worker's event loop.
    pub fn serve<S, F>(&self, stream: TcpStream, serve: S)
    where
        S: FnOnce(TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let peer = stream.peer_addr().ok();
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("connection from {peer:?} dropped: cannot move it to a worker: {e}");
                return;
            }
        };
        self.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => {
                    log::warn!("connection from {peer:?} dropped: a worker cannot poll it: {e}")
                }
            }
        });
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
}
