//! The plain-host source: a directory of YAML files, loaded whole and hot-reloaded
//! (see [`crate::config`] for the loading and validation).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::task::JoinHandle;

use crate::config::{self, ConfigStore, LoadOptions, Reloader};

/// Loads `dir` into `store` on the loader thread, and again whenever it changes.
pub fn start(
    dir: PathBuf,
    opts: LoadOptions,
    store: Arc<ConfigStore>,
) -> anyhow::Result<JoinHandle<()>> {
    let reloader =
        Reloader::spawn(dir.clone(), opts, store).context("starting the config loader thread")?;
    Ok(tokio::spawn(async move {
        let Err(e) = config::watch_dir(dir, reloader).await;
        log::error!("{e}: configuration changes will not be applied until a restart");
    }))
}
