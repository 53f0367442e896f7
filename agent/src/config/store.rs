//! The current configuration, swapped atomically, and what its loader is doing.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::{Config, ConfigErrors};

/// The current configuration, shared (via `Arc`) between the request path and the loader.
#[derive(Debug)]
pub struct ConfigStore {
    config: ArcSwap<Config>,
    /// Also the source of [`ConfigStore::generation`].
    generation: watch::Sender<u64>,
    loads: watch::Sender<LoadState>,
}

/// The loader's progress, for `nodemesh status` and for waiting on the first load.
#[derive(Debug, Clone, Default)]
struct LoadState {
    /// Loads that ended, applied or rejected.
    finished: u64,
    /// A load is running.
    running: bool,
    /// Display of the last rejected load, cleared by the next successful one.
    last_error: Option<String>,
    /// Loads rejected since start.
    rejected: u64,
}

impl ConfigStore {
    /// An empty config at generation 0, until the first load ends; every successful load
    /// then makes the next generation.
    pub fn unloaded() -> Self {
        Self {
            config: ArcSwap::from_pointee(Config::empty()),
            generation: watch::Sender::new(0),
            loads: watch::Sender::new(LoadState::default()),
        }
    }

    /// Lock-free; the snapshot stays valid for as long as the caller holds it.
    pub fn current(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Display of the last rejected load, cleared by the next successful one.
    pub fn last_error(&self) -> Option<String> {
        self.loads.borrow().last_error.clone()
    }

    /// Loads rejected since the agent started.
    pub fn rejected_loads(&self) -> u64 {
        self.loads.borrow().rejected
    }

    /// Whether a load is running now.
    pub fn loading(&self) -> bool {
        self.loads.borrow().running
    }

    /// Returns once a load has ended (applied or rejected), at once if one already has.
    pub async fn first_load(&self) {
        let mut loads = self.loads.subscribe();
        // The sender lives as long as `self`, so this only ends when a load does.
        let _ = loads.wait_for(|state| state.finished > 0).await;
    }

    /// Marks a load as running.
    pub fn load_started(&self) {
        self.loads.send_modify(|state| state.running = true);
    }

    /// Installs `config` as the next generation and notifies subscribers.
    pub fn replace(&self, config: Config) {
        // Swapping under the channel's lock keeps generations distinct if callers race, and
        // guarantees that a subscriber woken for generation N (or for the end of the load)
        // sees a config at least that new, and no error from before it.
        self.generation.send_modify(|generation| {
            self.config.store(Arc::new(config));
            self.load_ended(None);
            *generation += 1;
        });
    }

    /// Records a failed load; the current config keeps serving.
    pub fn reject(&self, errors: &ConfigErrors) {
        self.load_ended(Some(errors.to_string()));
    }

    fn load_ended(&self, error: Option<String>) {
        self.loads.send_modify(|state| {
            state.finished += 1;
            state.running = false;
            state.rejected += u64::from(error.is_some());
            state.last_error = error;
        });
    }

    /// Yields the new generation after every [`ConfigStore::replace`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
