//! Local YAML configuration of the mesh.
//!
//! A directory of Kubernetes-style manifests (Namespaces, Workloads, Services, the
//! routing kinds of [`crate::routing`] and the policies of [`crate::security`]) is validated
//! as a whole into an immutable [`Config`] snapshot; [`watch_dir`] hot-reloads it into a
//! [`ConfigStore`] that the request path reads without locking.

mod cluster_ip;
mod endpoint_slice;
pub(crate) mod label_selector;
mod labels;
#[cfg(test)]
mod limits_tests;
mod load;
mod model;
mod reload;
pub mod secret;
mod source;
mod store;
mod watch;
mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use labels::Labels;
pub(crate) use load::{check_dns_label, check_labels, check_metadata, port_number, Issues, Origin};
pub(crate) use model::{Meta, Object};
pub use reload::Reloader;
pub use store::ConfigStore;
pub use watch::watch_dir;

use crate::routing::RoutingTable;
use crate::security::{Authorizations, PeerAuthentications};
use crate::telemetry::policy::Telemetries;
use secret::Secrets;

/// Label that enrolls the workloads of a namespace in the mesh.
const MESH_LABEL: &str = "nodemesh.io/mesh";

/// Cluster-wide settings that are not part of the manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadOptions {
    /// Range that cluster IPs are allocated from when a Service does not set one.
    pub service_cidr: (Ipv4Addr, u8),
    /// Suffix of fully qualified service names (`web.shop.svc.<cluster_domain>`).
    pub cluster_domain: String,
    /// Namespace whose PeerAuthentication without a selector is mesh-wide (Istio's
    /// `rootNamespace`).
    pub root_namespace: String,
    pub limits: Limits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            service_cidr: (Ipv4Addr::new(10, 96, 0, 0), 16),
            cluster_domain: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
            limits: Limits::default(),
        }
    }
}

/// What one load reads at most, so that a broken or hostile file costs bounded time and
/// memory; beyond any of them the load is rejected and the last good config keeps serving.
///
/// The defaults are far above what a real cluster needs (Kubernetes itself supports at most
/// 150 000 Pods and 10 000 Services per cluster, and caps one object at 1.5 MiB); the
/// README's Configuration section lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Bytes in one file.
    pub file_bytes: usize,
    /// Bytes in all files together.
    pub total_bytes: usize,
    /// Levels of mappings and sequences nested in one document (the deepest object the
    /// agent reads, a VirtualService with header matches, nests about 10).
    pub depth: usize,
    /// Mappings, sequences and scalars in one document (a 10 000-route VirtualService has
    /// about 150 000).
    pub document_nodes: usize,
    /// Objects (non-empty documents) in all files together.
    pub objects: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            file_bytes: 64 << 20,
            total_bytes: 256 << 20,
            depth: 64,
            document_nodes: 1_000_000,
            objects: 500_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    pub fn mesh_enabled(&self) -> bool {
        self.labels.get(MESH_LABEL).is_some_and(|v| v == "enabled")
    }
}

/// A node of the mesh, as other agents reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    /// Gateways select the agents that serve them by these.
    pub labels: Labels,
    /// `InternalIP` addresses, in the order given.
    pub addresses: Vec<IpAddr>,
}

impl Node {
    /// The address to reach it on from a caller of `family_of`'s family,
    /// else its first.
    pub fn address_for(&self, family_of: IpAddr) -> Option<IpAddr> {
        let same_family = |ip: &&IpAddr| ip.is_ipv4() == family_of.is_ipv4();
        self.addresses
            .iter()
            .find(same_family)
            .or(self.addresses.first())
            .copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub service_account: String,
    /// Network namespace of the workload, e.g. `/var/run/netns/pod-a`.
    pub netns: PathBuf,
    pub addresses: Vec<IpAddr>,
    /// Node the workload runs on.
    pub node: String,
}

impl Workload {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
    /// `None` for a headless service.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<IpAddr>,
}

impl Service {
    /// The port definition for `port` over `protocol` (Kubernetes allows the
    /// same number once per protocol, e.g. DNS on 53/TCP and 53/UDP).
    pub fn port(&self, port: u16, protocol: Protocol) -> Option<&ServicePort> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its fully qualified name, `name.namespace.svc.<cluster domain>`.
    pub fn host(&self, cluster_domain: &str) -> String {
        format!("{}.{}.svc.{cluster_domain}", self.name, self.namespace)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Immutable, validated snapshot of the configuration directory.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    namespaces: BTreeMap<String, Namespace>,
    nodes: BTreeMap<String, Node>,
    /// Sorted by namespace, name.
    workloads: Vec<Workload>,
    /// Sorted by namespace, name.
    services: Vec<Service>,
    /// Lowercase, without trailing dot.
    cluster_domain: String,
    /// Istio's `rootNamespace`: mesh-wide policies, and the ingress's identity.
    root_namespace: String,
    #[serde(skip)]
    index: Index,
    #[serde(skip)]
    routing: RoutingTable,
    #[serde(skip)]
    peer_authentications: PeerAuthentications,
    #[serde(skip)]
    authorizations: Authorizations,
    #[serde(skip)]
    telemetries: Telemetries,
    #[serde(skip)]
    secrets: Secrets,
    /// Unique per snapshot: state derived from one (locality groups) is
    /// recomputed only when it changes.
    #[serde(skip)]
    generation: u64,
}

/// A number no snapshot had before.
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Lookup tables built at load time so that request-path queries are O(1).
#[derive(Debug, Clone, Default)]
struct Index {
    workload_by_address: HashMap<IpAddr, usize>,
    service_by_cluster_ip: HashMap<IpAddr, usize>,
    /// namespace → name → service; nested so that lookups by `&str` need no allocation.
    service_by_name: HashMap<String, HashMap<String, usize>>,
    /// Selected workloads of each service, parallel to `Config::services`.
    endpoints: Vec<Vec<usize>>,
}

impl Config {
    pub fn empty() -> Config {
        Config {
            namespaces: BTreeMap::new(),
            nodes: BTreeMap::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            cluster_domain: LoadOptions::default().cluster_domain,
            root_namespace: LoadOptions::default().root_namespace,
            index: Index::default(),
            routing: RoutingTable::default(),
            peer_authentications: PeerAuthentications::default(),
            authorizations: Authorizations::default(),
            telemetries: Telemetries::default(),
            secrets: Secrets::default(),
            generation: next_generation(),
        }
    }

    /// Changes with every snapshot loaded.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Logs what the routing and policy compilers warned about (objects kept, but not
    /// applied as written).
    pub fn log_warnings(&self) {
        let warnings = self.routing.warnings.iter();
        let warnings = warnings.chain(&self.peer_authentications.warnings);
        let warnings = warnings.chain(&self.authorizations.warnings);
        let warnings = warnings.chain(&self.secrets.warnings);
        for warning in warnings.chain(&self.telemetries.warnings) {
            log::warn!("{warning}");
        }
    }

    /// VirtualServices, DestinationRules and HTTPRoutes, compiled per Service.
    pub fn routing(&self) -> &RoutingTable {
        &self.routing
    }

    /// PeerAuthentications, compiled for lookups by workload and port.
    pub fn peer_authentications(&self) -> &PeerAuthentications {
        &self.peer_authentications
    }

    /// AuthorizationPolicies, compiled for lookups by workload.
    pub fn authorizations(&self) -> &Authorizations {
        &self.authorizations
    }

    /// Telemetry resources, sorted into levels for resolution by workload.
    pub fn telemetries(&self) -> &Telemetries {
        &self.telemetries
    }

    /// TLS Secrets usable by Gateway servers, and why others were skipped.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Lowercase, without trailing dot (`cluster.local`).
    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    /// Istio's `rootNamespace` (`istio-system`).
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Sorted by name.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Sorted by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Whether the workload's namespace is declared and mesh enabled.
    pub fn is_enrolled(&self, workload: &Workload) -> bool {
        self.namespace(&workload.namespace)
            .is_some_and(Namespace::mesh_enabled)
    }

    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Workload> {
        let &i = self.index.workload_by_address.get(&ip)?;
        Some(&self.workloads[i])
    }

    pub fn service_by_cluster_ip(&self, ip: IpAddr) -> Option<&Service> {
        let &i = self.index.service_by_cluster_ip.get(&ip)?;
        Some(&self.services[i])
    }

    /// Workloads (on any node) of the service's namespace whose labels contain its whole
    /// selector; an empty selector selects nothing.
    ///
    /// The service is matched by namespace and name, so one taken from an older snapshot
    /// yields the endpoints of its current version.
    pub fn endpoints<'a>(&'a self, service: &Service) -> impl Iterator<Item = &'a Workload> + 'a {
        self.service_index(&service.namespace, &service.name)
            .map_or(&[][..], |i| &self.index.endpoints[i])
            .iter()
            .map(|&i| &self.workloads[i])
    }

    /// Resolves `svc` (in `client_namespace`), `svc.ns`, `svc.ns.svc` or
    /// `svc.ns.svc.<cluster domain>`, case-insensitively and ignoring a trailing dot.
    pub fn resolve_service_name(&self, name: &str, client_namespace: &str) -> Option<&Service> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let mut labels = name.splitn(3, '.');
        let service = labels.next()?;
        let namespace = match (labels.next(), labels.next()) {
            (None, _) => client_namespace,
            (Some(namespace), None) => namespace,
            (Some(namespace), Some(rest))
                if rest == "svc"
                    || rest.strip_prefix("svc.") == Some(self.cluster_domain.as_str()) =>
            {
                namespace
            }
            _ => return None,
        };
        Some(&self.services[self.service_index(namespace, service)?])
    }

    /// The service `namespace/name`.
    pub fn service_by_key(&self, key: &str) -> Option<&Service> {
        let (namespace, name) = key.split_once('/')?;
        Some(&self.services[self.service_index(namespace, name)?])
    }

    /// The workload `namespace/name` (workloads are sorted by that key).
    pub fn workload_by_key(&self, key: &str) -> Option<&Workload> {
        let (namespace, name) = key.split_once('/')?;
        let i = self
            .workloads
            .binary_search_by(|w| (w.namespace.as_str(), w.name.as_str()).cmp(&(namespace, name)))
            .ok()?;
        Some(&self.workloads[i])
    }

    fn service_index(&self, namespace: &str, name: &str) -> Option<usize> {
        self.index
            .service_by_name
            .get(namespace)?
            .get(name)
            .copied()
    }
}

/// One problem found while loading the configuration directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    /// The offending file, or the directory itself when it cannot be read.
    pub file: PathBuf,
    /// `Kind namespace/name` (`Namespace name` for namespaces), or `document N` (the N-th
    /// non-empty document of the file) when the document has no usable name.
    pub object: Option<String>,
    /// Path of the field inside the document, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        for part in [&self.object, &self.field].into_iter().flatten() {
            write!(f, "{part}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one load, so that they can all be fixed in one go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Errors shown at most, so that a file of a million bad objects does not make a
    /// million-line status or log entry.
    const SHOWN: usize = 100;
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().take(Self::SHOWN).enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        if let Some(more) = self.0.len().checked_sub(Self::SHOWN).filter(|&n| n > 0) {
            write!(f, "\n… and {more} more problems")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
pub(crate) mod test_support {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TestDir(PathBuf);

    impl TestDir {
        pub fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "nodemesh-config-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        pub fn write(&self, name: &str, contents: &str) {
            fs::write(self.0.join(name), contents).unwrap();
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}
