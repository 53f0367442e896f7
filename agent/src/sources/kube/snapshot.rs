//! Building a config snapshot from the watched objects: the YAML mode's validation, run
//! per object, with invalid objects skipped (and reported) instead of failing the whole.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::reflector::Store;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::config::{Config, ConfigError, ConfigErrors, ConfigStore, LoadOptions};
use crate::ingress::PortFailures;
use crate::routing::gateway_api::ObjectStatus;
use crate::routing::istio_status::{self, IstioObject};

use super::gateway_status;
use super::kinds::{Kind, GATEWAY_API, ISTIO_NETWORKING};
use super::object::Object;
use super::pod_summary::PodSummary;
use super::pods::{self, Context};
use super::port_status;
use super::status::Status;

/// An object to tell about with a Kubernetes Event: the object, the kind of problem
/// and what it is.
pub(super) type Notice = (ObjectReference, Problem, String);

#[derive(Debug, Clone, Copy)]
pub(super) enum Problem {
    /// The object is skipped.
    Invalid,
    /// The object applies, with a routing warning.
    Warning,
}

/// Whether the local pods' network namespaces need looking for again.
#[derive(Default)]
pub(super) struct NetnsHealth {
    /// Some local pod's namespace was not found.
    missing: AtomicBool,
    /// The namespaces in use (`/proc/<pid>/ns/net`: gone once that process ends).
    used: Mutex<Vec<PathBuf>>,
}

impl NetnsHealth {
    pub(super) fn needs_rescan(&self) -> bool {
        self.missing.load(Ordering::Relaxed)
            || self
                .used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|path| !path.exists())
    }
}

pub(super) struct Snapshots {
    pub stores: Vec<(&'static Kind, Store<Object>)>,
    /// This node's pods, for an agent.
    pub local_pods: Option<Store<PodSummary>>,
    /// The other nodes' pods for an agent, all pods for the CA.
    pub pods: Store<PodSummary>,
    pub opts: LoadOptions,
    pub node: Option<String>,
    pub status: Arc<Status>,
    pub netns: Arc<NetnsHealth>,
    /// Objects to publish Events for, when the source serves an agent.
    pub events: Option<UnboundedSender<Notice>>,
    /// What was reported already: each problem gets one Event, not one per snapshot.
    pub reported: HashSet<(PathBuf, String)>,
    /// The status writes of Gateway API objects, when the source serves an agent.
    pub statuses: Option<watch::Sender<Vec<gateway_status::Apply>>>,
    /// The objects of the last snapshot: an object changed into an invalid one keeps
    /// serving its last valid version, as a rejected file does in the YAML mode.
    pub last_valid: LastValid<Source>,
    /// The Gateway ports this node's agent cannot bind (see `port_status`).
    pub port_failures: Option<watch::Receiver<PortFailures>>,
}

/// Objects by path. They are the watch stores' own (`Arc`s): only the last valid
/// version of an object changed since costs memory of its own.
pub(super) type LastValid<S> = HashMap<PathBuf, S>;

/// A watched object a document is built from.
#[derive(Clone)]
pub(super) enum Source {
    Object(&'static Kind, Arc<Object>),
    Pod(Arc<PodSummary>),
}

impl Source {
    /// The object's document, built for one snapshot only: all of them at once would
    /// cost several times what the objects do.
    fn document(&self, ctx: &Context) -> Option<Value> {
        match self {
            Source::Object(kind, object) => Some(kind.document(object)),
            Source::Pod(pod) => pods::workload(pod, ctx),
        }
    }

    /// The object, for an Event about it.
    fn reference(&self) -> ObjectReference {
        match self {
            Source::Object(kind, object) => reference(kind, object),
            Source::Pod(pod) => pods::reference(pod),
        }
    }
}

impl Snapshots {
    /// Builds a snapshot of the objects as watched now and installs it in `store`.
    pub fn load(&mut self, store: &ConfigStore) {
        let local_netns = match (&self.node, &self.local_pods) {
            (Some(node), Some(pods)) => pods::local_netns(pods.state().iter().map(|p| &**p), node),
            _ => HashMap::new(),
        };
        let ctx = Context {
            node: self.node.as_deref(),
            netns: &local_netns,
        };
        let mut objects = Vec::new();
        for (kind, objects_of_kind) in &self.stores {
            for object in objects_of_kind.state() {
                objects.push((kind.path(&object), Source::Object(kind, object)));
            }
        }
        let all_pods = self.local_pods.iter().chain([&self.pods]);
        for pod in all_pods.flat_map(Store::state) {
            objects.push((pods::path(&pod), Source::Pod(pod)));
        }
        // Store order is arbitrary; conflicts (two pods claiming one address) are settled
        // the same way every time.
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        let document = |source: &Source| source.document(&ctx);
        let loaded = load_skipping_invalid(objects, &self.last_valid, document, &self.opts);
        match loaded {
            Ok(Loaded {
                config,
                kept,
                skipped,
                invalid,
            }) => {
                self.last_valid = kept;
                config.log_warnings();
                self.track_netns(&config);
                let failures = self.port_failures.as_ref().map(|f| f.borrow().clone());
                let failures = failures.unwrap_or_default();
                self.write_statuses(&config, &failures, &skipped, &invalid);
                let mut warnings = config.routing().warnings.clone();
                if let Some(node) = &self.node {
                    warnings.extend(port_status::warnings(&config, node, &failures));
                }
                let (workloads, services) = (config.workloads().len(), config.services().len());
                store.replace(config);
                log::info!(
                    "loaded config generation {} from the API server ({workloads} pods, \
                     {services} services, {} invalid objects skipped)",
                    store.generation(),
                    skipped.len()
                );
                self.report(&skipped, &warnings, &invalid);
                self.status
                    .synced(skipped.iter().map(ToString::to_string).collect());
            }
            Err(errors) => {
                log::error!("cannot build a config from the API server's objects:\n{errors}");
                store.reject(&errors);
            }
        }
    }

    fn track_netns(&self, config: &Config) {
        let Some(node) = &self.node else { return };
        let local = config.workloads().iter().filter(|w| &w.node == node);
        let (missing, used): (Vec<_>, Vec<_>) = local
            .filter(|w| config.is_enrolled(w))
            .map(|w| w.netns.clone())
            .partition(|netns| pods::is_missing(netns));
        self.netns
            .missing
            .store(!missing.is_empty(), Ordering::Relaxed);
        *self.netns.used.lock().unwrap_or_else(|e| e.into_inner()) = used;
    }

    /// Sends the writes the status of the Gateway API and Istio objects needs
    /// to the writer. An Istio object skipped as invalid gets its problems.
    fn write_statuses(
        &self,
        config: &Config,
        failures: &PortFailures,
        skipped: &[ConfigError],
        invalid: &HashMap<PathBuf, Source>,
    ) {
        let Some(statuses) = &self.statuses else {
            return;
        };
        let mut watched = gateway_status::Watched::new();
        for (kind, objects) in self.stores.iter().filter(|(k, _)| has_status(k)) {
            for object in objects.state() {
                let meta = &object.metadata;
                let key = (
                    kind.group,
                    kind.kind,
                    meta.namespace.clone(),
                    meta.name.clone().unwrap_or_default(),
                );
                watched.insert(key, (*kind, object));
            }
        }
        let routing = config.routing();
        let mut computed = routing.gateway_api_status().to_vec();
        computed.extend(istio_status_with_skipped(
            routing.istio_status(),
            skipped,
            invalid,
        ));
        if let Some(node) = &self.node {
            computed = port_status::with_ports(&computed, config, node, failures, &watched);
        }
        let needed = gateway_status::needed(&computed, &watched);
        if !needed.is_empty() {
            statuses.send_replace(needed);
        }
    }

    /// Logs every skipped object (`invalid`, as watched), and sends an Event for each
    /// problem not reported yet: for skipped objects, and for routing warnings on objects
    /// of the API server (they name the object's path, which the YAML mode's file takes
    /// the place of).
    fn report(
        &mut self,
        skipped: &[ConfigError],
        warnings: &[String],
        invalid: &HashMap<PathBuf, Source>,
    ) {
        let mut now = HashSet::new();
        for error in skipped {
            let note = note(error);
            let key = (error.file.clone(), note.clone());
            if !self.reported.contains(&key) {
                log::warn!("skipped invalid object: {error}");
                self.notify(invalid.get(&error.file), Problem::Invalid, note);
            }
            now.insert(key);
        }
        for warning in warnings {
            let Some(path) = warned_path(warning) else {
                continue;
            };
            let key = (path, warning.clone());
            if !self.reported.contains(&key) {
                self.notify(
                    self.last_valid.get(&key.0),
                    Problem::Warning,
                    warning.clone(),
                );
            }
            now.insert(key);
        }
        self.reported = now;
    }

    fn notify(&self, source: Option<&Source>, problem: Problem, note: String) {
        if let (Some(events), Some(source)) = (&self.events, source) {
            let _ = events.send((source.reference(), problem, note));
        }
    }
}

/// A config, the objects it was built from, and the problems found.
struct Loaded<S> {
    config: Config,
    kept: LastValid<S>,
    skipped: Vec<ConfigError>,
    /// Each object found invalid, as watched (to report it).
    invalid: HashMap<PathBuf, S>,
}

/// Loads `objects`, each as its `document` (built as the loader reads it, and dropped
/// once read); an object a problem is found in is replaced by its version in
/// `last_valid` if that differs, else left out, until the rest loads.
///
/// Each pass replaces or drops at least one object, and problems are nearly always within
/// one object, so this ends after two or three passes in practice.
fn load_skipping_invalid<S: Clone + Versioned>(
    mut objects: Vec<(PathBuf, S)>,
    last_valid: &LastValid<S>,
    document: impl Fn(&S) -> Option<Value>,
    opts: &LoadOptions,
) -> Result<Loaded<S>, ConfigErrors> {
    let mut skipped = Vec::new();
    let mut invalid = HashMap::new();
    loop {
        let documents = objects
            .iter()
            .filter_map(|(path, object)| Some((path.clone(), document(object)?)));
        match Config::load_objects(documents, opts) {
            Ok(config) => {
                return Ok(Loaded {
                    config,
                    kept: objects.into_iter().collect(),
                    skipped,
                    invalid,
                })
            }
            Err(errors) => {
                let found: HashSet<&PathBuf> = errors.0.iter().map(|e| &e.file).collect();
                let mut changed = false;
                objects.retain_mut(|(path, object)| {
                    if !found.contains(path) {
                        return true;
                    }
                    changed = true;
                    invalid
                        .entry(path.clone())
                        .or_insert_with(|| object.clone());
                    match last_valid.get(path).filter(|valid| !valid.same(object)) {
                        Some(valid) => {
                            *object = valid.clone();
                            true
                        }
                        None => false,
                    }
                });
                if !changed {
                    return Err(errors);
                }
                skipped.extend(errors.0);
            }
        }
    }
}

/// Whether two values are the same version of an object.
trait Versioned {
    fn same(&self, other: &Self) -> bool;
}

impl Versioned for Source {
    /// The watch store's very object: unchanged.
    fn same(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Object(_, a), Source::Object(_, b)) => Arc::ptr_eq(a, b),
            (Source::Pod(a), Source::Pod(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The object a routing warning is about: warnings start with `Kind ns/name (path):`.
fn warned_path(warning: &str) -> Option<PathBuf> {
    let start = warning.find(" (/")? + 2;
    let end = start + warning[start..].find("):")?;
    let path = &warning[start..end];
    (!path.contains(' ')).then(|| PathBuf::from(path))
}

/// `field: message`.
fn note(error: &ConfigError) -> String {
    match &error.field {
        Some(field) => format!("{field}: {}", error.message),
        None => error.message.clone(),
    }
}

/// Whether nodemesh writes the status of objects of `kind`.
fn has_status(kind: &Kind) -> bool {
    kind.group == GATEWAY_API
        || (kind.group == ISTIO_NETWORKING && ISTIO_STATUS.contains(&kind.kind))
}

/// The Istio kinds that get a status.
const ISTIO_STATUS: [&str; 2] = ["Gateway", "VirtualService"];

/// `computed` with each Istio object of `skipped` (as watched: `invalid`)
/// marked invalid, whether or not a last valid version of it serves.
fn istio_status_with_skipped(
    computed: &[ObjectStatus],
    skipped: &[ConfigError],
    invalid: &HashMap<PathBuf, Source>,
) -> Vec<ObjectStatus> {
    let mut problems: BTreeMap<IstioObject, Vec<String>> = BTreeMap::new();
    for error in skipped {
        let Some(Source::Object(kind, object)) = invalid.get(&error.file) else {
            continue;
        };
        let kind = ISTIO_STATUS
            .iter()
            .find(|k| **k == kind.kind && has_status(kind));
        let Some(kind) = kind else { continue };
        let meta = &object.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let key = (*kind, namespace, meta.name.clone().unwrap_or_default());
        problems.entry(key).or_default().push(note(error));
    }
    let mut statuses: Vec<_> = computed
        .iter()
        .filter(|s| {
            let key = (
                s.kind,
                s.namespace.clone().unwrap_or_default(),
                s.name.clone(),
            );
            !problems.contains_key(&key)
        })
        .cloned()
        .collect();
    statuses.extend(problems.iter().map(|(o, p)| istio_status::invalid(o, p)));
    statuses
}

fn reference(kind: &Kind, object: &Object) -> ObjectReference {
    ObjectReference {
        api_version: Some(kind.api_version()),
        kind: Some(kind.kind.to_owned()),
        name: object.metadata.name.clone(),
        namespace: object.metadata.namespace.clone(),
        uid: object.metadata.uid.clone(),
        resource_version: object.metadata.resource_version.clone(),
        field_path: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(path: &str, document: Value) -> (PathBuf, Value) {
        (PathBuf::from(path), document)
    }

    impl Versioned for Value {
        fn same(&self, other: &Value) -> bool {
            self == other
        }
    }

    fn load(
        objects: Vec<(PathBuf, Value)>,
        last_valid: &LastValid<Value>,
    ) -> (Config, LastValid<Value>, Vec<ConfigError>) {
        let document = |document: &Value| Some(document.clone());
        let loaded = load_skipping_invalid(objects, last_valid, document, &LoadOptions::default());
        let loaded = loaded.unwrap();
        (loaded.config, loaded.kept, loaded.skipped)
    }

    #[test]
    fn warnings_name_the_object_path() {
        let warning = "Gateway shop/b (/apis/networking.istio.io/v1/namespaces/shop/gateways/b): \
                       spec.servers[0].hosts[0]: host a.com on port 80 is already claimed";
        assert_eq!(
            warned_path(warning),
            Some(PathBuf::from(
                "/apis/networking.istio.io/v1/namespaces/shop/gateways/b"
            ))
        );
        assert_eq!(warned_path("Service shop/web: also binds it"), None);
    }

    #[test]
    fn skips_the_invalid_objects_and_keeps_the_rest() {
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"nodemesh.io/mesh": "enabled"}}});
        let web = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
        let bad_port = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"ports": [{"port": 0}]}});
        // Valid alone, invalid only once routes are compiled against the services.
        let bad_route = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"hosts": ["web"], "http": [{"route": [
                {"destination": {"host": "web"}, "weight": 150}]}]}});
        let objects = vec![
            object("/api/v1/namespaces/shop", namespace),
            object("/api/v1/namespaces/shop/services/web", web),
            object("/api/v1/namespaces/shop/services/db", bad_port),
            object(
                "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/web",
                bad_route,
            ),
        ];
        let (config, kept, skipped) = load(objects.clone(), &HashMap::new());
        assert_eq!(kept.len(), 2);
        assert!(config.namespace("shop").unwrap().mesh_enabled());
        let services: Vec<_> = config.services().iter().map(|s| s.key()).collect();
        assert_eq!(services, ["shop/web"]);
        assert_eq!(config.routing().route_count(), 0);
        let skipped: Vec<_> = skipped
            .iter()
            .map(|e| (e.file.display().to_string(), e.field.clone()))
            .collect();
        assert!(
            skipped.contains(&(
                "/api/v1/namespaces/shop/services/db".into(),
                Some("spec.ports[0].port".into())
            )),
            "{skipped:?}"
        );
        assert!(
            skipped
                .iter()
                .any(|(file, _)| file.ends_with("virtualservices/web")),
            "{skipped:?}"
        );

        // Once valid, the route serves; changed into an invalid one, its last valid
        // version keeps serving.
        let mut objects = objects;
        objects[3].1["spec"]["http"][0]["route"][0]["weight"] = json!(100);
        let (config, kept, skipped) = load(objects.clone(), &kept);
        assert_eq!(config.routing().route_count(), 1);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        objects[3].1["spec"]["http"][0]["route"][0]["weight"] = json!(150);
        let (config, _, skipped) = load(objects, &kept);
        assert_eq!(config.routing().route_count(), 1);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
    }
}
