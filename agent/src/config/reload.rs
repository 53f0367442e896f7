//! Loads of the config directory, run one at a time on a thread of their own.
//!
//! Parsing, validating and compiling a large or hostile directory can take seconds of CPU.
//! Doing it on the runtime's worker threads would stall the connections and the admin
//! socket they serve (and SIGTERM handling with them), so every load, the first one
//! included, runs on the `config-loader` thread, at a lower CPU priority than the proxy.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;

use super::{Config, ConfigStore, LoadOptions};

/// Nice value of the loader thread: under contention it gets about a tenth of the CPU time
/// of a proxy thread, yet still finishes when the node is busy.
const LOADER_NICENESS: libc::c_int = 10;

/// Asks the loader thread for loads. Dropping it lets the thread end after its current load.
#[derive(Debug)]
pub struct Reloader {
    /// Capacity 1: a request made while one is already waiting adds nothing, since the
    /// waiting load will read the directory as it is then.
    requests: SyncSender<()>,
}

impl Reloader {
    /// Starts the loader thread and asks it for a first load of `dir` into `store`.
    pub fn spawn(dir: PathBuf, opts: LoadOptions, store: Arc<ConfigStore>) -> io::Result<Self> {
        let reloader = Self::spawn_with(store, move |store| load_dir(&dir, &opts, store))?;
        reloader.request();
        Ok(reloader)
    }

    /// Starts the loader thread: every request runs `load`, which fills `store` from
    /// wherever the config comes from. Nothing is loaded until the first request.
    pub fn spawn_with(
        store: Arc<ConfigStore>,
        mut load: impl FnMut(&ConfigStore) + Send + 'static,
    ) -> io::Result<Self> {
        let (requests, pending) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name("config-loader".into())
            .spawn(move || {
                lower_priority();
                serve(&store, &pending, &mut load);
            })?;
        Ok(Reloader { requests })
    }

    /// Asks for a load of the directory as it is from now on; never blocks. A change made
    /// while a load runs is picked up by the next one, and requests made meanwhile coalesce
    /// into that one.
    pub fn request(&self) {
        match self.requests.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                log::error!("the config loader thread is gone; config changes are not applied");
            }
        }
    }
}

fn serve(store: &ConfigStore, pending: &Receiver<()>, load: &mut impl FnMut(&ConfigStore)) {
    while pending.recv().is_ok() {
        store.load_started();
        load(store);
    }
}

fn load_dir(dir: &Path, opts: &LoadOptions, store: &ConfigStore) {
    match Config::load_dir(dir, opts) {
        Ok(config) => {
            config.log_warnings();
            let routes = config.routing().route_count();
            store.replace(config);
            log::info!(
                "loaded config generation {} from {} ({routes} HTTP routes)",
                store.generation(),
                dir.display()
            );
        }
        Err(errors) => {
            log::warn!(
                "rejected config in {}, still serving generation {}:\n{errors}",
                dir.display(),
                store.generation()
            );
            store.reject(&errors);
        }
    }
}

/// Lowers the calling thread's CPU priority; a failure only costs fairness, so it is logged.
fn lower_priority() {
    // SAFETY: setpriority takes no pointers. On Linux, PRIO_PROCESS with `who` 0 applies
    // to the calling thread only, not to the rest of the agent.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, LOADER_NICENESS) };
    if rc != 0 {
        log::warn!(
            "cannot lower the config loader's priority: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::timeout;

    use super::super::test_support::TestDir;
    use super::super::{ConfigStore, LoadOptions};
    use super::Reloader;

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    /// Generous, since the machine running the tests may be busy.
    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn loads_on_its_own_thread_and_coalesces_requests() {
        let dir = TestDir::new();
        dir.write("mesh.yaml", NAMESPACE);
        let store = Arc::new(ConfigStore::unloaded());
        assert_eq!(store.generation(), 0);
        let reloader =
            Reloader::spawn(dir.path().to_owned(), LoadOptions::default(), store.clone()).unwrap();
        timeout(TIMEOUT, store.first_load()).await.unwrap();
        assert_eq!(store.generation(), 1);
        assert!(store.current().namespace("shop").is_some());

        // However many requests arrive at once, at most one load is queued behind the
        // running one. Once a load made after them all has ended, at most three have run.
        // (Thousands of namespaces make each load last far longer than the requests take.)
        let padding: String = (0..20_000)
            .map(|i| format!("---\n{}", NAMESPACE.replace("shop", &format!("ns-{i}"))))
            .collect();
        dir.write("padding.yaml", &padding);
        let mut generations = store.subscribe();
        dir.write("mesh.yaml", "");
        for _ in 0..1_000 {
            reloader.request();
        }
        dir.write("web.yaml", &NAMESPACE.replace("shop", "web"));
        reloader.request();
        let sentinel = generations.wait_for(|_| store.current().namespace("web").is_some());
        timeout(TIMEOUT, sentinel).await.unwrap().unwrap();
        assert!(store.current().namespace("shop").is_none());
        let generation = store.generation();
        assert!((2..=4).contains(&generation), "{generation}");
    }
}
