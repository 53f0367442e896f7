//! The Kubernetes source: watches of the API server (kube-rs reflectors) feeding the same
//! config snapshots as the YAML directory.
//!
//! Each watched kind ([`kinds::WATCHED`]) has a reflector that keeps a trimmed copy of
//! its objects. Watch events, debounced, ask the loader thread for a new snapshot, which
//! turns the objects into the YAML loader's documents and validates them per object:
//! an invalid object is logged, listed by `nodemesh status`, reported with a Kubernetes
//! Event and skipped, while the rest is applied. When the API server is slow or gone the
//! last snapshot keeps serving; watches resume with back-off and a full re-list.

mod endpoint_slices;
mod events;
mod kinds;
mod netns;
mod pods;
mod secrets;
mod snapshot;
mod status;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::store::Writer;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{ConfigStore, LoadOptions, Reloader};

use kinds::{Kind, WATCHED};
use snapshot::{NetnsHealth, Snapshots};
pub use status::Status;

/// Namespaces carrying it are in the mesh; only those are watched.
const MESH_LABEL_SELECTOR: &str = "nodemesh.io/mesh=enabled";
/// Time to let a burst of watch events (a `kubectl apply` of many objects, a re-list)
/// settle into one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often to look again for local pods' network namespaces not found yet (or whose
/// process ended), as a pod's processes start after its address is set.
const NETNS_RESCAN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Settings {
    /// `--kubeconfig`; without it the in-cluster service account (or `$KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// The node whose pods are enrolled and that reports invalid objects with Events; the
    /// CA, which enrolls nothing, has none.
    pub node: Option<String>,
}

pub(super) async fn start(
    settings: Settings,
    opts: LoadOptions,
    store: Arc<ConfigStore>,
) -> anyhow::Result<(Vec<JoinHandle<()>>, Arc<Status>)> {
    let client_config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster service account or kubeconfig found (give --kubeconfig)")?,
    };
    let api_server = client_config.cluster_url.to_string();
    let client = Client::try_from(client_config).context("creating the Kubernetes client")?;
    // The CA (no node) reads only what deciding identities needs.
    let watched: Vec<&'static Kind> = WATCHED
        .iter()
        .filter(|k| settings.node.is_some() || !k.agents_only)
        .collect();
    let status = Arc::new(Status::new(
        api_server.clone(),
        watched.iter().map(|k| k.kind),
    ));
    let changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let mut stores = Vec::new();
    for kind in watched {
        let writer = Writer::new(kind.api_resource());
        stores.push((kind, writer.as_reader()));
        let watch = watch(
            client.clone(),
            kind,
            writer,
            status.clone(),
            changed.clone(),
        );
        tasks.push(tokio::spawn(watch));
    }
    let events = settings.node.as_ref().map(|node| {
        let (sender, invalid) = tokio::sync::mpsc::unbounded_channel();
        tasks.push(tokio::spawn(events::publish(
            client.clone(),
            node.clone(),
            invalid,
        )));
        sender
    });
    let netns = Arc::new(NetnsHealth::default());
    let mut snapshots = Snapshots {
        stores,
        opts,
        node: settings.node.clone(),
        status: status.clone(),
        netns: netns.clone(),
        events,
        reported: HashSet::new(),
        last_valid: HashMap::new(),
    };
    let reloader = Reloader::spawn_with(store, move |store| snapshots.load(store))
        .context("starting the config loader thread")?;
    if settings.node.is_some() {
        let changed = changed.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(NETNS_RESCAN).await;
                if netns.needs_rescan() {
                    changed.notify_one();
                }
            }
        }));
    }
    let first = status.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            changed.notified().await;
            // The first snapshot waits for every kind's first list (or its failure), so
            // that a starting agent never serves a partial view as if it were whole.
            if !first.all_tried() {
                continue;
            }
            tokio::time::sleep(DEBOUNCE).await;
            reloader.request();
        }
    }));
    log::info!("watching the Kubernetes API server at {api_server}");
    Ok((tasks, status))
}

/// Keeps the kind's reflector store in line with the API server, forever: errors are
/// recorded and retried with back-off, and a re-list replaces the store only once it is
/// complete, so the last state keeps serving meanwhile.
async fn watch(
    client: Client,
    kind: &'static Kind,
    writer: Writer<DynamicObject>,
    status: Arc<Status>,
    changed: Arc<Notify>,
) {
    let api = Api::<DynamicObject>::all_with(client, &kind.api_resource());
    let mut config = watcher::Config::default();
    if let Some(selector) = kind.label_selector {
        config = config.labels(selector);
    }
    if let Some(selector) = kind.field_selector {
        config = config.fields(selector);
    }
    let events = watcher(api, config)
        .default_backoff()
        .modify(kind.strip)
        .reflect(writer);
    let mut events = std::pin::pin!(events);
    // Logged once per outage, not at every retry.
    let mut failing: Option<String> = None;
    while let Some(event) = events.next().await {
        if let Ok(watcher::Event::InitDone | watcher::Event::Apply(_)) = &event {
            if failing.take().is_some() {
                log::info!("watching {} works again", kind.plural);
            }
        }
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                status.listed(kind.kind);
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                status.healthy(kind.kind);
                changed.notify_one();
            }
            Err(e) => {
                let error = describe(kind, &e);
                if failing.as_ref() != Some(&error) {
                    log::warn!("watching {}: {error} (retrying with back-off)", kind.plural);
                }
                if status.failed(kind.kind, error.clone()) {
                    changed.notify_one();
                }
                failing = Some(error);
            }
        }
    }
}

/// The watch error, with the likely fix when the kind is not served at all.
fn describe(kind: &Kind, error: &watcher::Error) -> String {
    let not_served = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    };
    if not_served {
        format!(
            "the API server does not serve {}/{} {} (is its CustomResourceDefinition installed?)",
            kind.group, kind.version, kind.plural
        )
    } else {
        error.to_string()
    }
}
