//! Where the configuration comes from: a directory of YAML files ([`dir`]) or the
//! Kubernetes API server ([`kube`]).
//!
//! Both fill one [`ConfigStore`] with [`crate::config::Config`] snapshots validated by the
//! same per-kind code; routing, DNS, enrollment, mutual TLS and policy only ever read the
//! store and do not know which source is in use.

pub mod dir;
pub mod kube;

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::config::{ConfigStore, LoadOptions};

/// The configuration source chosen on the command line.
#[derive(Debug, Clone)]
pub enum Source {
    /// `--config-dir`: YAML files, hot-reloaded.
    Dir(PathBuf),
    /// `--kubernetes`: watches of the API server.
    Kubernetes(kube::Settings),
}

/// A source feeding a store; dropping it stops the watching (the store keeps its last
/// snapshot).
pub struct Running {
    tasks: Vec<JoinHandle<()>>,
    status: Status,
}

enum Status {
    Dir(PathBuf),
    Kubernetes(Arc<kube::Status>),
}

impl Running {
    /// What `nodemesh status` shows under `source`.
    pub fn status(&self) -> Value {
        match &self.status {
            Status::Dir(dir) => json!({ "kind": "directory", "dir": dir }),
            Status::Kubernetes(status) => status.json(),
        }
    }
}

impl Running {
    /// `Err(why)` while the source has not given a whole view once (see `/healthz/ready`).
    pub fn readiness(&self) -> Result<(), String> {
        match &self.status {
            Status::Dir(_) => Ok(()),
            Status::Kubernetes(status) => status.readiness(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts filling `store` from `source`; the first snapshot arrives in the background
/// (see [`ConfigStore::first_load`]). Must run inside the runtime.
pub async fn start(
    source: Source,
    opts: LoadOptions,
    store: Arc<ConfigStore>,
) -> anyhow::Result<Running> {
    Ok(match source {
        Source::Dir(dir) => Running {
            tasks: vec![dir::start(dir.clone(), opts, store)?],
            status: Status::Dir(dir),
        },
        Source::Kubernetes(settings) => {
            let (tasks, status) = kube::start(settings, opts, store).await?;
            Running {
                tasks,
                status: Status::Kubernetes(status),
            }
        }
    })
}
