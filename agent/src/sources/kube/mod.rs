//! The Kubernetes source: watches of the API server (kube-rs reflectors) feeding the same
//! config snapshots as the YAML directory.
//!
//! Each watched kind ([`kinds::WATCHED`]) has a reflector that keeps a trimmed copy of
//! its objects; pods have two (this node's and the others', see [`pods`]), of typed
//! summaries. Watch events, debounced, ask the loader thread for a new snapshot, which
//! turns the objects into the YAML loader's documents and validates them per object:
//! an invalid object is logged, listed by `nodemesh status`, reported with a Kubernetes
//! Event and skipped, while the rest is applied. When the API server is slow or gone the
//! last snapshot keeps serving; watches resume with back-off and a full re-list.

mod compaction;
mod endpoint_slices;
mod events;
mod gateway_status;
mod kinds;
#[cfg(test)]
mod memory_tests;
mod netns;
mod object;
mod pod_summary;
mod pods;
mod port_status;
mod secrets;
mod snapshot;
mod status;

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::store::Writer;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{ConfigStore, LoadOptions, Reloader};

use compaction::Compaction;
use kinds::{Kind, WATCHED};
use object::Object;
use pod_summary::PodSummary;
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
    /// The Gateway ports this node's agent cannot bind, reported on the Gateways.
    pub port_failures: Option<watch::Receiver<crate::ingress::PortFailures>>,
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
    let (local_pods, pods) = pod_watches(&client, settings.node.as_deref());
    let names = watched.iter().map(|k| k.kind);
    let names = names
        .chain(local_pods.iter().map(|w| w.name))
        .chain([pods.name]);
    let status = Arc::new(Status::new(api_server.clone(), names));
    let changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let mut stores = Vec::new();
    for kind in watched {
        let writer = Writer::new(kind.api_resource());
        stores.push((kind, writer.as_reader()));
        let mut config = watcher::Config::default();
        if let Some(selector) = kind.label_selector {
            config = config.labels(selector);
        }
        if let Some(selector) = kind.field_selector {
            config = config.fields(selector);
        }
        let watched = Watched {
            name: kind.kind,
            resource: format!("{} {}", kind.api_version(), kind.plural),
            api: Api::all_with(client.clone(), &kind.api_resource()),
            config,
            strip: Box::new(move |object: &mut Object| kind.strip(object)),
        };
        tasks.push(tokio::spawn(watch(
            watched,
            writer,
            status.clone(),
            changed.clone(),
        )));
    }
    let mut spawn_pod_watch = |watched: Watched<PodSummary>| {
        let writer = Writer::default();
        let reader = writer.as_reader();
        tasks.push(tokio::spawn(watch(
            watched,
            writer,
            status.clone(),
            changed.clone(),
        )));
        reader
    };
    let local_pods = local_pods.map(&mut spawn_pod_watch);
    let pods = spawn_pod_watch(pods);
    let events = settings.node.as_ref().map(|node| {
        let (sender, invalid) = tokio::sync::mpsc::unbounded_channel();
        tasks.push(tokio::spawn(events::publish(
            client.clone(),
            node.clone(),
            invalid,
        )));
        sender
    });
    // Agents write the status of the Gateway API objects they serve; the CA does not.
    let statuses = settings.node.as_ref().map(|_| {
        let (sender, needed) = tokio::sync::watch::channel(Vec::new());
        tasks.push(tokio::spawn(gateway_status::write(client.clone(), needed)));
        sender
    });
    let netns = Arc::new(NetnsHealth::default());
    let mut snapshots = Snapshots {
        stores,
        local_pods,
        pods,
        opts,
        node: settings.node.clone(),
        status: status.clone(),
        netns: netns.clone(),
        events,
        reported: HashSet::new(),
        statuses,
        last_valid: HashMap::new(),
        port_failures: settings.port_failures.clone(),
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
    // A Gateway port bound or lost is reported with the next snapshot.
    if let (Some(_), Some(mut failures)) = (&settings.node, settings.port_failures) {
        let changed = changed.clone();
        tasks.push(tokio::spawn(async move {
            while failures.changed().await.is_ok() {
                changed.notify_one();
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

/// One watch of the API server.
struct Watched<K: Resource> {
    /// Its name in `nodemesh status`.
    name: &'static str,
    /// `group/version plural`, for logs and errors.
    resource: String,
    api: Api<K>,
    config: watcher::Config,
    /// Drops what is never read before an object is stored.
    strip: Box<dyn FnMut(&mut K) + Send>,
}

/// An agent's pod watches: this node's pods, and the other nodes' (see [`pods`]); the
/// CA's: none of its own, and every pod, as it signs every node's identities.
fn pod_watches(
    client: &Client,
    node: Option<&str>,
) -> (Option<Watched<PodSummary>>, Watched<PodSummary>) {
    let watched = |name, selector: Option<String>, strip: fn(&mut PodSummary)| Watched {
        name,
        resource: "v1 pods".to_owned(),
        api: Api::all(client.clone()),
        config: match selector {
            Some(selector) => watcher::Config::default().fields(&selector),
            None => watcher::Config::default(),
        },
        strip: Box::new(strip),
    };
    match node {
        Some(node) => (
            Some(watched(
                "Pod (this node)",
                Some(format!("spec.nodeName={node}")),
                pod_summary::strip_local,
            )),
            watched(
                "Pod (other nodes)",
                Some(format!("spec.nodeName!={node}")),
                pod_summary::strip_remote,
            ),
        ),
        None => (None, watched("Pod", None, pod_summary::strip_local)),
    }
}

/// Keeps the watch's reflector store in line with the API server, forever: errors are
/// recorded and retried with back-off, and a re-list replaces the store only once it is
/// complete, so the last state keeps serving meanwhile.
async fn watch<K>(
    watched: Watched<K>,
    mut writer: Writer<K>,
    status: Arc<Status>,
    changed: Arc<Notify>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let Watched {
        name,
        resource,
        api,
        config,
        strip,
    } = watched;
    let held = writer.as_reader();
    let events = watcher(api, config).default_backoff().modify(strip);
    let mut events = std::pin::pin!(events);
    // Logged once per outage, not at every retry.
    let mut failing: Option<String> = None;
    let mut compaction = Compaction::default();
    while let Some(event) = events.next().await {
        if let Ok(event) = &event {
            writer.apply_watcher_event(event);
        }
        if let Ok(watcher::Event::InitDone | watcher::Event::Apply(_)) = &event {
            if failing.take().is_some() {
                log::info!("watching {resource} works again");
            }
        }
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                compaction.rebuilt(held.len());
                status.listed(name, held.len());
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                if compaction.due(held.len()) {
                    log::debug!("rebuilding the store of {resource} ({} left)", held.len());
                    compaction::rebuild(&mut writer, &held);
                    compaction.rebuilt(held.len());
                }
                status.healthy(name, held.len());
                changed.notify_one();
            }
            Err(e) => {
                let error = describe(&resource, &e);
                if failing.as_ref() != Some(&error) {
                    log::warn!("watching {resource}: {error} (retrying with back-off)");
                }
                if status.failed(name, error.clone()) {
                    changed.notify_one();
                }
                failing = Some(error);
            }
        }
    }
}

/// The watch error, with the likely fix when the resource is not served at all.
fn describe(resource: &str, error: &watcher::Error) -> String {
    let not_served = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    };
    if not_served {
        format!(
            "the API server does not serve {resource} (is its CustomResourceDefinition installed?)"
        )
    } else {
        error.to_string()
    }
}
