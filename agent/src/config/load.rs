//! Reading a configuration directory into a validated [`Config`].

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::routing::{self, RoutingTable};
use crate::security::authorization::{self, AuthorizationPolicyDraft};
use crate::security::{self, Authorizations, PeerAuthenticationDraft, PeerAuthentications};
use crate::telemetry::policy::{self as telemetry, Telemetries, TelemetryDraft};

use super::cluster_ip::ClusterIpRange;
use super::endpoint_slice::{self, EndpointSlice, SlicesByService};
use super::model::{
    self, Metadata, NamespaceDoc, NodeDoc, Object, ServiceSpec, TargetPort, WorkloadSpec,
};
use super::secret::{self, SecretDraft, Secrets};
use super::source::{self, ReadError};
use super::{
    yaml, Config, ConfigError, ConfigErrors, Index, Limits, LoadOptions, Namespace, Node, Service,
    ServicePort, Workload,
};

impl Config {
    /// Loads every `*.yaml` / `*.yml` file of `dir` (not recursive, hidden files skipped) in
    /// file name order, one file at a time. Fails with every problem found, not just the
    /// first, including entries that cannot be read (such as a symlink loop).
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
        let files = source::config_files(dir).map_err(|e| {
            ConfigErrors(vec![file_error(
                dir,
                format!("cannot read config directory: {e}"),
            )])
        })?;
        let mut loader = Loader::new(opts);
        for file in files {
            let proceed = match file.unreadable {
                Some(reason) => loader.not_loaded(&file.path, reason),
                None => match source::read_file(&file.path, opts.limits.file_bytes) {
                    Ok(text) => loader.load_text(&file.path, &text),
                    Err(ReadError::TooLarge) => loader.too_large(&file.path),
                    Err(ReadError::Failed(reason)) => loader.not_loaded(&file.path, reason),
                },
            };
            if proceed.is_break() {
                break;
            }
        }
        loader.finish(opts)
    }

    /// Loads config documents held in memory, `(file name, YAML text)` in the order given,
    /// exactly as [`Config::load_dir`] loads the files of a directory.
    pub fn load_documents(
        files: &[(PathBuf, String)],
        opts: &LoadOptions,
    ) -> Result<Config, ConfigErrors> {
        let mut loader = Loader::new(opts);
        for (file, text) in files {
            if loader.load_text(file, text).is_break() {
                break;
            }
        }
        loader.finish(opts)
    }
}

impl Config {
    /// Loads objects already parsed (as the Kubernetes API server serves them), each named
    /// by a path of its own that errors report in place of a file; as strict as
    /// [`Config::load_dir`]: any problem fails the whole load.
    pub fn load_objects(
        objects: impl IntoIterator<Item = (PathBuf, Value)>,
        opts: &LoadOptions,
    ) -> Result<Config, ConfigErrors> {
        let mut loader = Loader::new(opts);
        for (path, object) in objects {
            loader.load_document(&path, 1, object);
        }
        loader.finish(opts)
    }
}

fn file_error(file: &Path, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        object: None,
        field: None,
        message,
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Namespace,
    Node,
    Workload,
    Service,
    EndpointSlice,
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
    Gateway,
    GatewayClass,
    /// The Gateway API's `Gateway`, named like Istio's.
    ApiGateway,
    ReferenceGrant,
    PeerAuthentication,
    AuthorizationPolicy,
    Telemetry,
    Secret,
}

const ISTIO_NETWORKING: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

impl Kind {
    const ALL: [Kind; 17] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Workload,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::Gateway,
        Kind::GatewayClass,
        Kind::ApiGateway,
        Kind::ReferenceGrant,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Telemetry,
        Kind::Secret,
    ];

    /// Every version is read with the same schema: they differ only in
    /// maturity, not in fields.
    fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Workload => &["nodemesh.io/v1alpha1"],
            Kind::Namespace | Kind::Node | Kind::Service | Kind::Secret => &["v1"],
            Kind::EndpointSlice => &["discovery.k8s.io/v1"],
            Kind::VirtualService | Kind::DestinationRule | Kind::Gateway => ISTIO_NETWORKING,
            Kind::HttpRoute | Kind::GatewayClass | Kind::ApiGateway => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1beta1",
            ],
            Kind::ReferenceGrant => &[
                "gateway.networking.k8s.io/v1beta1",
                "gateway.networking.k8s.io/v1alpha2",
            ],
            Kind::GrpcRoute => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1alpha2",
            ],
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => {
                &["security.istio.io/v1", "security.istio.io/v1beta1"]
            }
            Kind::Telemetry => &["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Workload => "Workload",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::Gateway | Kind::ApiGateway => "Gateway",
            Kind::GatewayClass => "GatewayClass",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Telemetry => "Telemetry",
            Kind::Secret => "Secret",
        }
    }

    /// `group/v1|v1beta1 Kind`, for the list of supported kinds.
    fn describe(self) -> String {
        let versions = self.api_versions();
        let (group, _) = versions[0].rsplit_once('/').unwrap_or(("", ""));
        let versions: Vec<_> = versions
            .iter()
            .map(|v| v.rsplit_once('/').map_or(*v, |(_, v)| v))
            .collect();
        let versions = versions.join("|");
        match group {
            "" => format!("{versions} {}", self.name()),
            _ => format!("{group}/{versions} {}", self.name()),
        }
    }
}

/// Where an object was defined, for error messages.
pub(crate) struct Origin {
    file: PathBuf,
    object: String,
}

impl Origin {
    pub(crate) fn error(&self, field: Option<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            object: Some(self.object.clone()),
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.object, self.file.display())
    }
}

/// A parsed service whose cluster IP may still have to be allocated.
struct ServiceDraft {
    service: Service,
    allocate_ip: bool,
    /// Ports whose `targetPort` is a name: (index in `service.ports`, field, name). Their
    /// target port is [`UNRESOLVED_PORT`] until an EndpointSlice gives the number.
    named_targets: Vec<(usize, String, String)>,
}

/// Never a valid port number, so never mistaken for a resolved one.
const UNRESOLVED_PORT: u16 = 0;

/// Field-level problems of one object: (field path, message).
#[derive(Default)]
pub(crate) struct Issues(Vec<(String, String)>);

impl Issues {
    pub(crate) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push((field.into(), message.into()));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Problems found so far.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// (field path, message) pairs.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }
}

struct Loader {
    limits: Limits,
    /// Bytes of the files loaded so far, against [`Limits::total_bytes`].
    bytes: usize,
    /// Non-empty documents loaded so far, against [`Limits::objects`].
    objects: usize,
    errors: Vec<ConfigError>,
    /// File of the first definition of each object, to report duplicates.
    defined_in: HashMap<String, PathBuf>,
    namespaces: Vec<Namespace>,
    nodes: Vec<Node>,
    workloads: Vec<(Origin, Workload)>,
    services: Vec<(Origin, ServiceDraft)>,
    endpoint_slices: Vec<EndpointSlice>,
    routing: routing::Drafts,
    peer_authentications: Vec<(Origin, PeerAuthenticationDraft)>,
    authorization_policies: Vec<(Origin, AuthorizationPolicyDraft)>,
    telemetries: Vec<(Origin, TelemetryDraft)>,
    secrets: Vec<(Origin, SecretDraft)>,
}

impl Loader {
    fn new(opts: &LoadOptions) -> Self {
        Self {
            limits: opts.limits,
            bytes: 0,
            objects: 0,
            errors: Vec::new(),
            defined_in: HashMap::new(),
            namespaces: Vec::new(),
            nodes: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            endpoint_slices: Vec::new(),
            routing: routing::Drafts::default(),
            peer_authentications: Vec::new(),
            authorization_policies: Vec::new(),
            telemetries: Vec::new(),
            secrets: Vec::new(),
        }
    }

    /// Loads one file's text, unless it breaks the limit on the size of one file (the load
    /// goes on) or of all files together (the load stops).
    fn load_text(&mut self, file: &Path, text: &str) -> ControlFlow<()> {
        if text.len() > self.limits.file_bytes {
            return self.too_large(file);
        }
        if self.bytes + text.len() > self.limits.total_bytes {
            let message = format!(
                "config files larger than the limit of {} bytes together; stopped loading at \
                 this file",
                self.limits.total_bytes
            );
            self.errors.push(file_error(file, message));
            return ControlFlow::Break(());
        }
        self.load_file(file, text)
    }

    fn too_large(&mut self, file: &Path) -> ControlFlow<()> {
        let message = format!(
            "file larger than the limit of {} bytes",
            self.limits.file_bytes
        );
        self.not_loaded(file, message)
    }

    /// Records why a file is not loaded; the load goes on, to report every problem.
    fn not_loaded(&mut self, file: &Path, reason: String) -> ControlFlow<()> {
        self.errors.push(file_error(file, reason));
        ControlFlow::Continue(())
    }

    /// Loads the documents of one file; breaks once the limit on objects is reached.
    fn load_file(&mut self, file: &Path, text: &str) -> ControlFlow<()> {
        self.bytes += text.len();
        let limits = self.limits;
        let mut number = 0;
        let parsed = yaml::for_each_document(text, &limits, |document| {
            number += 1;
            self.objects += 1;
            if self.objects > limits.objects {
                return ControlFlow::Break(());
            }
            self.load_document(file, number, document);
            ControlFlow::Continue(())
        });
        if let Err(message) = parsed {
            self.errors.push(file_error(file, message));
        }
        if self.objects > limits.objects {
            let message = format!(
                "more than the limit of {} objects in the config files together; stopped \
                 loading at document {number} of this file",
                limits.objects
            );
            self.errors.push(file_error(file, message));
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn load_document(&mut self, file: &Path, number: usize, value: Value) {
        let mut origin = Origin {
            file: file.to_owned(),
            object: format!("document {number}"),
        };
        let Value::Object(mut doc) = value else {
            return self.errors.push(origin.error(
                None,
                "expected a mapping with apiVersion, kind and metadata",
            ));
        };
        let api_version = doc.remove("apiVersion");
        let kind = doc.remove("kind");
        let (api_version, kind_name) = (
            api_version.as_ref().and_then(Value::as_str),
            kind.as_ref().and_then(Value::as_str),
        );
        let Some(kind) = Kind::ALL.into_iter().find(|k| {
            api_version.is_some_and(|v| k.api_versions().contains(&v))
                && Some(k.name()) == kind_name
        }) else {
            let supported: Vec<_> = Kind::ALL.iter().map(|k| k.describe()).collect();
            return self.errors.push(origin.error(
                None,
                format!(
                    "unsupported apiVersion {:?} with kind {:?} (supported: {})",
                    api_version.unwrap_or_default(),
                    kind_name.unwrap_or_default(),
                    supported.join(", ")
                ),
            ));
        };

        if let Some(object) = object_name(kind, &doc) {
            origin.object = object;
            match self.defined_in.entry(origin.object.clone()) {
                Entry::Occupied(first) => {
                    let message = format!(
                        "duplicate definition, first defined in {}",
                        first.get().display()
                    );
                    return self.errors.push(origin.error(None, message));
                }
                Entry::Vacant(slot) => {
                    slot.insert(file.to_owned());
                }
            }
        }

        match kind {
            Kind::Namespace => {
                if let Some(namespace) = self.parse(&origin, doc, namespace) {
                    self.namespaces.push(namespace);
                }
            }
            Kind::Node => {
                if let Some(node) = self.parse(&origin, doc, node) {
                    self.nodes.push(node);
                }
            }
            Kind::Workload => {
                if let Some(workload) = self.parse(&origin, doc, workload) {
                    self.workloads.push((origin, workload));
                }
            }
            Kind::Service => {
                if let Some(draft) = self.parse(&origin, doc, service) {
                    self.services.push((origin, draft));
                }
            }
            Kind::EndpointSlice => {
                if let Some(slice) = self.parse(&origin, doc, endpoint_slice::endpoint_slice) {
                    self.endpoint_slices.push(slice);
                }
            }
            Kind::VirtualService => {
                if let Some(draft) = self.parse(&origin, doc, routing::virtual_service) {
                    self.routing.virtual_services.push((origin, draft));
                }
            }
            Kind::DestinationRule => {
                if let Some(draft) = self.parse(&origin, doc, routing::destination_rule) {
                    self.routing.destination_rules.push((origin, draft));
                }
            }
            Kind::HttpRoute => {
                if let Some(draft) = self.parse(&origin, doc, routing::http_route) {
                    self.routing.http_routes.push((origin, draft));
                }
            }
            // Compiled into the HTTPRoute model (see `routing::grpc_route`).
            Kind::GrpcRoute => {
                if let Some(draft) = self.parse(&origin, doc, routing::grpc_route) {
                    self.routing.http_routes.push((origin, draft));
                }
            }
            Kind::Gateway => {
                if let Some(draft) = self.parse(&origin, doc, routing::istio_gateway) {
                    self.routing.gateways.push((origin, draft));
                }
            }
            Kind::GatewayClass => {
                if let Some(draft) = self.parse(&origin, doc, routing::gateway_class) {
                    self.routing.gateway_classes.push((origin, draft));
                }
            }
            Kind::ApiGateway => {
                if let Some(draft) = self.parse(&origin, doc, routing::api_gateway) {
                    self.routing.api_gateways.push((origin, draft));
                }
            }
            Kind::ReferenceGrant => {
                if let Some(draft) = self.parse(&origin, doc, routing::reference_grant) {
                    self.routing.reference_grants.push(draft);
                }
            }
            Kind::PeerAuthentication => {
                if let Some(draft) = self.parse(&origin, doc, security::peer_authentication) {
                    self.peer_authentications.push((origin, draft));
                }
            }
            Kind::AuthorizationPolicy => {
                let parsed = self.parse(&origin, doc, authorization::authorization_policy);
                if let Some(draft) = parsed {
                    self.authorization_policies.push((origin, draft));
                }
            }
            Kind::Telemetry => {
                if let Some(draft) = self.parse(&origin, doc, telemetry::telemetry) {
                    self.telemetries.push((origin, draft));
                }
            }
            Kind::Secret => {
                if let Some(draft) = self.parse(&origin, doc, secret::secret) {
                    self.secrets.push((origin, draft));
                }
            }
        }
    }

    /// Deserializes `doc` as `T` and converts it, recording every problem found.
    fn parse<T: DeserializeOwned, U>(
        &mut self,
        origin: &Origin,
        doc: Map<String, Value>,
        convert: fn(T, &mut Issues) -> U,
    ) -> Option<U> {
        let typed = serde_path_to_error::deserialize(Value::Object(doc)).map_err(|e| {
            let field = e.path().to_string();
            let field = (field != ".").then_some(field);
            origin.error(field, e.into_inner().to_string())
        });
        let mut issues = Issues::default();
        match typed.map(|typed| convert(typed, &mut issues)) {
            Ok(item) if issues.0.is_empty() => Some(item),
            Ok(_) => {
                let errors = issues.0.into_iter();
                self.errors
                    .extend(errors.map(|(f, m)| origin.error(Some(f), m)));
                None
            }
            Err(error) => {
                self.errors.push(error);
                None
            }
        }
    }

    fn finish(mut self, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
        self.workloads
            .sort_by(|(_, a), (_, b)| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.services.sort_by(|(_, a), (_, b)| {
            let (a, b) = (&a.service, &b.service);
            (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
        });
        let workload_by_address = self.index_addresses();
        let service_by_cluster_ip = self.assign_cluster_ips(opts.service_cidr);
        let slices = SlicesByService::new(std::mem::take(&mut self.endpoint_slices));
        self.resolve_ports(&slices, &workload_by_address);

        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }

        let workloads: Vec<_> = self.workloads.into_iter().map(|(_, w)| w).collect();
        let services: Vec<_> = self.services.into_iter().map(|(_, d)| d.service).collect();
        let mut service_by_name = HashMap::<_, HashMap<_, _>>::new();
        for (i, service) in services.iter().enumerate() {
            service_by_name
                .entry(service.namespace.clone())
                .or_default()
                .insert(service.name.clone(), i);
        }
        let endpoints = services
            .iter()
            .map(|s| {
                slices
                    .endpoints(s, &workload_by_address)
                    .unwrap_or_else(|| select(s, &workloads, |w| w))
            })
            .collect();
        let mut config = Config {
            namespaces: self
                .namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
            nodes: self
                .nodes
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
            workloads,
            services,
            cluster_domain: opts
                .cluster_domain
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            root_namespace: opts.root_namespace.clone(),
            index: Index {
                workload_by_address,
                service_by_cluster_ip,
                service_by_name,
                endpoints,
            },
            routing: RoutingTable::default(),
            authorizations: Authorizations::default(),
            telemetries: Telemetries::default(),
            secrets: Secrets::compile(self.secrets),
            peer_authentications: PeerAuthentications::compile(
                self.peer_authentications,
                &opts.root_namespace,
            ),
            generation: super::next_generation(),
        };
        // Routes refer to Services, so they are resolved once all are known.
        config.routing = routing::compile(&config, self.routing, &mut self.errors);
        config.authorizations = Authorizations::compile(
            self.authorization_policies,
            &opts.root_namespace,
            &config.services,
        );
        config.telemetries =
            Telemetries::compile(self.telemetries, &opts.root_namespace, &config.services);
        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }
        Ok(config)
    }

    /// Takes Services' target port numbers from their EndpointSlices, reporting named
    /// target ports that none resolves while the Service has endpoints. Without any (a
    /// Deployment scaled to zero leaves an EndpointSlice without endpoints or ports) the
    /// port is never used, and the Service stays one: its address, name and routes.
    fn resolve_ports(&mut self, slices: &SlicesByService, by_address: &HashMap<IpAddr, usize>) {
        for (origin, draft) in &mut self.services {
            slices.resolve_ports(&mut draft.service);
            let has_endpoints = || match slices.endpoints(&draft.service, by_address) {
                Some(endpoints) => !endpoints.is_empty(),
                None => !select(&draft.service, &self.workloads, |(_, w)| w).is_empty(),
            };
            for (i, field, name) in &draft.named_targets {
                if draft.service.ports[*i].target_port == UNRESOLVED_PORT && has_endpoints() {
                    let message = format!(
                        "named port {name:?} needs an EndpointSlice of the Service giving its \
                         number (Workloads declare no ports), else use a number"
                    );
                    self.errors.push(origin.error(Some(field.clone()), message));
                }
            }
        }
    }

    /// Indexes workloads by address, reporting addresses used twice.
    fn index_addresses(&mut self) -> HashMap<IpAddr, usize> {
        let mut owners = HashMap::new();
        for (i, (origin, workload)) in self.workloads.iter().enumerate() {
            for (j, &ip) in workload.addresses.iter().enumerate() {
                if let Err(owner) = claim(&mut owners, ip, i) {
                    let message = format!(
                        "address {ip} is already used by {}",
                        self.workloads[owner].0
                    );
                    self.errors
                        .push(origin.error(Some(format!("spec.addresses[{j}]")), message));
                }
            }
        }
        owners
    }

    /// Indexes services by cluster IP, allocating the missing ones (see [`cluster_ip`]) and
    /// reporting addresses used twice and Services left without one by a full range.
    fn assign_cluster_ips(&mut self, cidr: (Ipv4Addr, u8)) -> HashMap<IpAddr, usize> {
        let mut owners = HashMap::new();
        let mut range = ClusterIpRange::new(cidr);
        for (i, (origin, draft)) in self.services.iter().enumerate() {
            let Some(ip) = draft.service.cluster_ip else {
                continue;
            };
            range.reserve(ip);
            if let Err(owner) = claim(&mut owners, ip, i) {
                let message = format!(
                    "cluster IP {ip} is already used by {}",
                    self.services[owner].0
                );
                self.errors
                    .push(origin.error(Some("spec.clusterIP".into()), message));
            }
        }
        // Only once all explicit addresses are claimed, so that they always win.
        let mut left_out = Vec::new();
        for (i, (_, draft)) in self.services.iter_mut().enumerate() {
            if !draft.allocate_ip {
                continue;
            }
            let service = &mut draft.service;
            match range.allocate(&service.key()) {
                Some(ip) => {
                    service.cluster_ip = Some(ip);
                    owners.insert(ip, i);
                }
                None => left_out.push(i),
            }
        }
        if let Some(&first) = left_out.first() {
            let error = self.services[first]
                .0
                .error(None, self.range_full(&range, &left_out));
            self.errors.push(error);
        }
        owners
    }

    /// One message for all the Services that `range` had no address left for, however many.
    fn range_full(&self, range: &ClusterIpRange, left_out: &[usize]) -> String {
        const NAMED: usize = 10;
        let mut names: Vec<_> = left_out[..left_out.len().min(NAMED)]
            .iter()
            .map(|&i| self.services[i].1.service.key())
            .collect();
        if left_out.len() > NAMED {
            names.push(format!("and {} more", left_out.len() - NAMED));
        }
        format!(
            "no free cluster IP left in service CIDR {} ({} addresses) for {} Service(s) without \
             clusterIP: {}; use a larger --service-cidr or set clusterIP",
            range.cidr(),
            range.size(),
            left_out.len(),
            names.join(", ")
        )
    }
}

/// `Kind namespace/name` (`Namespace name`), read leniently from the raw document so that
/// errors found while deserializing it can already name it.
fn object_name(kind: Kind, doc: &Map<String, Value>) -> Option<String> {
    let metadata = doc.get("metadata")?;
    let name = metadata.get("name")?.as_str()?;
    Some(match kind {
        Kind::Namespace | Kind::Node | Kind::GatewayClass => format!("{} {name}", kind.name()),
        // Told apart from an Istio Gateway of the same name.
        Kind::ApiGateway => format!(
            "Gateway.gateway.networking.k8s.io {}/{name}",
            metadata
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(model::DEFAULT)
        ),
        _ => {
            let namespace = metadata.get("namespace").and_then(Value::as_str);
            format!(
                "{} {}/{name}",
                kind.name(),
                namespace.unwrap_or(model::DEFAULT)
            )
        }
    })
}

/// Records `owner` for `ip`, or returns the owner that already has it.
fn claim(owners: &mut HashMap<IpAddr, usize>, ip: IpAddr, owner: usize) -> Result<(), usize> {
    match owners.entry(ip) {
        Entry::Occupied(existing) => Err(*existing.get()),
        Entry::Vacant(slot) => {
            slot.insert(owner);
            Ok(())
        }
    }
}

/// Indices of the workloads selected by `service`; `items` (each holding a
/// `workload`) are sorted by namespace.
fn select<T>(service: &Service, items: &[T], workload: impl Fn(&T) -> &Workload) -> Vec<usize> {
    if service.selector.is_empty() {
        return Vec::new();
    }
    let start = items.partition_point(|t| workload(t).namespace < service.namespace);
    let len = items[start..].partition_point(|t| workload(t).namespace == service.namespace);
    (start..start + len)
        .filter(|&i| {
            workload(&items[i])
                .labels
                .contains_all(service.selector.iter())
        })
        .collect()
}

fn namespace(doc: NamespaceDoc, issues: &mut Issues) -> Namespace {
    check_metadata(&doc.metadata, issues);
    Namespace {
        name: doc.metadata.name,
        labels: doc.metadata.labels.into(),
    }
}

/// A node's addresses are what other agents dial (the HBONE port) to reach
/// the workloads it serves; Kubernetes' `InternalIP` entries are the ones
/// used, in order.
fn node(doc: NodeDoc, issues: &mut Issues) -> Node {
    check_metadata(&doc.metadata, issues);
    let mut addresses = Vec::new();
    for (i, entry) in doc.status.addresses.iter().enumerate() {
        if entry.r#type != "InternalIP" {
            continue;
        }
        let field = format!("status.addresses[{i}].address");
        match entry.address.parse::<IpAddr>() {
            Ok(ip) => {
                check_unicast(ip, field, issues);
                addresses.push(ip);
            }
            Err(_) => issues.add(field, format!("{:?} is not an IP address", entry.address)),
        }
    }
    if doc
        .status
        .addresses
        .iter()
        .all(|a| a.r#type != "InternalIP")
    {
        issues.add("status.addresses", "needs an InternalIP address");
    }
    Node {
        name: doc.metadata.name,
        labels: doc.metadata.labels.into(),
        addresses,
    }
}

fn workload(doc: Object<WorkloadSpec>, issues: &mut Issues) -> Workload {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    check_dns_label(&spec.service_account, "spec.serviceAccount", issues);
    if !spec.netns.is_absolute() {
        issues.add("spec.netns", "must be an absolute path");
    }
    if spec.addresses.is_empty() {
        issues.add("spec.addresses", "at least one address is required");
    }
    for (i, &ip) in spec.addresses.iter().enumerate() {
        check_unicast(ip, format!("spec.addresses[{i}]"), issues);
    }
    if spec.node.is_empty() {
        issues.add("spec.node", "must not be empty");
    }
    let Metadata {
        name,
        namespace,
        labels,
        ..
    } = doc.metadata;
    Workload {
        name,
        namespace,
        labels: labels.into(),
        service_account: spec.service_account,
        netns: spec.netns,
        addresses: spec.addresses,
        node: spec.node,
    }
}

fn service(doc: Object<ServiceSpec>, issues: &mut Issues) -> ServiceDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    if let Some(other) = spec.r#type.as_deref().filter(|&t| t != "ClusterIP") {
        issues.add(
            "spec.type",
            format!("unsupported service type {other:?}, only ClusterIP is supported"),
        );
    }
    let (cluster_ip, allocate_ip) = match spec.cluster_ip.as_deref() {
        None | Some("") => (None, true),
        Some("None") => (None, false),
        Some(ip) => match ip.parse() {
            Ok(ip) => {
                check_unicast(ip, "spec.clusterIP".into(), issues);
                (Some(ip), false)
            }
            Err(_) => {
                let message =
                    format!("invalid IP address {ip:?} (use None for a headless service)");
                issues.add("spec.clusterIP", message);
                (None, false)
            }
        },
    };

    let mut ports = Vec::with_capacity(spec.ports.len());
    let mut named_targets = Vec::new();
    let mut seen = HashSet::new();
    for (i, p) in spec.ports.into_iter().enumerate() {
        let field = |name: &str| format!("spec.ports[{i}].{name}");
        let port = port_number(p.port, field("port"), issues);
        let target_port = match p.target_port {
            None => port,
            Some(TargetPort::Number(n)) => port_number(n, field("targetPort"), issues),
            // Resolved from the Service's EndpointSlices, if it has any (see `finish`).
            Some(TargetPort::Name(name)) => {
                named_targets.push((ports.len(), field("targetPort"), name));
                Some(UNRESOLVED_PORT)
            }
        };
        if let Some(port) = port.filter(|&port| !seen.insert((port, p.protocol))) {
            let message = format!("duplicate port {port}/{}", p.protocol);
            issues.add(field("port"), message);
        }
        if let (Some(port), Some(target_port)) = (port, target_port) {
            ports.push(ServicePort {
                name: p.name,
                port,
                target_port,
                protocol: p.protocol,
                app_protocol: p.app_protocol,
            });
        }
    }

    let Metadata {
        name,
        namespace,
        labels,
        ..
    } = doc.metadata;
    ServiceDraft {
        service: Service {
            name,
            namespace,
            labels: labels.into(),
            selector: spec.selector.into(),
            ports,
            cluster_ip,
        },
        allocate_ip,
        named_targets,
    }
}

pub(crate) fn check_metadata(metadata: &Metadata, issues: &mut Issues) {
    check_dns_label(&metadata.name, "metadata.name", issues);
    check_dns_label(&metadata.namespace, "metadata.namespace", issues);
}

pub(crate) fn check_dns_label(value: &str, field: &str, issues: &mut Issues) {
    let valid = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if !valid {
        issues.add(
            field,
            format!(
                "invalid name {value:?}: must be 1 to 63 lowercase letters, digits or '-', \
                 starting and ending with a letter or digit (DNS-1123 label)"
            ),
        );
    }
}

/// Kubernetes label syntax: `[prefix/]name` keys, values of up to 63
/// characters.
pub(crate) fn check_labels(labels: &BTreeMap<String, String>, field: &str, issues: &mut Issues) {
    fn name(s: &str) -> bool {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    }
    for (key, value) in labels {
        let (prefix, key_name) = key.rsplit_once('/').unwrap_or(("", key));
        let prefix_ok = prefix.len() <= 253
            && prefix
                .split('.')
                .all(|l| prefix.is_empty() || (!l.is_empty() && name(l) && !l.contains('_')));
        if key_name.is_empty() || !name(key_name) || !prefix_ok {
            issues.add(
                format!("{field}.{key}"),
                format!("invalid label key {key:?}"),
            );
        }
        if !name(value) {
            issues.add(
                format!("{field}.{key}"),
                format!("invalid label value {value:?}"),
            );
        }
    }
}

fn check_unicast(ip: IpAddr, field: String, issues: &mut Issues) {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        issues.add(field, format!("{ip} is not a unicast address"));
    }
}

pub(crate) fn port_number(n: i64, field: String, issues: &mut Issues) -> Option<u16> {
    let port = u16::try_from(n).ok().filter(|&p| p != 0);
    if port.is_none() {
        issues.add(field, "must be between 1 and 65535");
    }
    port
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::super::test_support::TestDir;
    use super::super::{Config, ConfigErrors, LoadOptions, Protocol};

    const NAMESPACES: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {nodemesh.io/mesh: enabled}
  annotations: {owner: team-a}
  uid: 6a1f0c3e-1d2b-4c5d-8e9f-0a1b2c3d4e5f
  resourceVersion: \"42\"
  creationTimestamp: 2024-01-01T00:00:00Z
---
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
";

    const WORKLOADS: &str = "
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata:
  name: web-b
  namespace: shop
  labels: {app: web, version: v2}
spec:
  netns: /var/run/netns/web-b
  addresses: [10.0.0.2, fd00::2]
  node: node-2
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, netns: /var/run/netns/web-a, addresses: [10.0.0.1], node: node-1}
---
# Same labels, other namespace: never selected by shop services.
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: batch, labels: {app: web}}
spec: {netns: /var/run/netns/batch, addresses: [10.0.0.3], node: node-1}
";

    const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  type: ClusterIP
  clusterIP: 192.168.7.7   # outside the service CIDR, which is allowed
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: shop}
spec:
  clusterIP: None
  selector: {app: web, version: v2}
  ports: [{port: 7000}]
";

    fn service(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\n\
             metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }

    fn workload(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: nodemesh.io/v1alpha1\nkind: Workload\n\
             metadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
        )
    }

    fn load_with(files: &[(&str, &str)], opts: &LoadOptions) -> Result<Config, ConfigErrors> {
        let dir = TestDir::new();
        for (name, contents) in files {
            dir.write(name, contents);
        }
        Config::load_dir(dir.path(), opts)
    }

    fn load(files: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        load_with(files, &LoadOptions::default())
    }

    fn errors(files: &[(&str, &str)]) -> Vec<String> {
        let errors = load(files).expect_err("load should fail").0;
        errors.iter().map(ToString::to_string).collect()
    }

    /// Asserts that loading `files` fails with exactly one error containing all `parts`.
    #[track_caller]
    fn assert_error(files: &[(&str, &str)], parts: &[&str]) {
        let errors = errors(files);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        for part in parts {
            assert!(errors[0].contains(part), "{:?} lacks {part:?}", errors[0]);
        }
    }

    fn valid() -> Config {
        let dir = TestDir::new();
        dir.write("namespaces.yaml", NAMESPACES);
        dir.write("workloads.yml", WORKLOADS);
        dir.write("services.yaml", SERVICES);
        // Ignored: hidden, other extensions, subdirectories.
        dir.write(".hidden.yaml", "garbage: [");
        dir.write("README.md", "garbage: [");
        std::fs::create_dir_all(dir.path().join("sub.yaml")).unwrap();
        dir.write("sub.yaml/nested.yaml", "garbage: [");
        Config::load_dir(dir.path(), &LoadOptions::default()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn keys<'a, T: 'a>(
        items: impl IntoIterator<Item = &'a T>,
        key: fn(&T) -> String,
    ) -> Vec<String> {
        items.into_iter().map(key).collect()
    }

    #[test]
    fn loads_a_valid_directory() {
        let config = valid();
        let names: Vec<_> = config.namespaces().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["legacy", "shop"]);
        assert!(config.namespace("shop").unwrap().mesh_enabled());
        assert!(!config.namespace("legacy").unwrap().mesh_enabled());

        let workloads = config.workloads();
        assert_eq!(
            keys(workloads, |w| w.key()),
            ["default/batch", "shop/web-a", "shop/web-b"]
        );
        let (batch, web_a, web_b) = (&workloads[0], &workloads[1], &workloads[2]);
        assert_eq!(web_a.service_account, "web");
        assert_eq!(web_b.service_account, "default");
        assert_eq!(web_b.node, "node-2");
        assert_eq!(web_b.netns.to_str(), Some("/var/run/netns/web-b"));
        assert!(config.is_enrolled(web_a));
        assert!(
            !config.is_enrolled(batch),
            "namespace without a Namespace document"
        );
        assert_eq!(config.workload_by_address(ip("fd00::2")), Some(web_b));
        assert_eq!(config.workload_by_address(ip("10.0.0.3")), Some(batch));
        assert_eq!(config.workload_by_address(ip("10.0.0.9")), None);

        let services = config.services();
        assert_eq!(
            keys(services, |s| s.key()),
            ["shop/db", "shop/peers", "shop/web"]
        );
        let (db, peers, web) = (&services[0], &services[1], &services[2]);
        assert_eq!(db.cluster_ip, Some(ip("192.168.7.7")));
        assert_eq!(peers.cluster_ip, None);
        let Some(IpAddr::V4(web_ip)) = web.cluster_ip else {
            panic!("no cluster IP allocated")
        };
        assert_eq!(web_ip.octets()[..2], [10, 96]);
        assert_eq!(config.service_by_cluster_ip(IpAddr::V4(web_ip)), Some(web));
        assert_eq!(config.service_by_cluster_ip(ip("192.168.7.7")), Some(db));

        let http = web.port(80, Protocol::Tcp).unwrap();
        assert_eq!(
            (http.name.as_deref(), http.target_port),
            (Some("http"), 8080)
        );
        assert_eq!(
            (http.protocol, http.app_protocol.as_deref()),
            (Protocol::Tcp, Some("http"))
        );
        let dns = web.port(53, Protocol::Udp).unwrap();
        assert_eq!((dns.target_port, dns.protocol), (53, Protocol::Udp));
        assert_eq!(web.port(53, Protocol::Tcp), None);
        assert_eq!(web.port(81, Protocol::Tcp), None);
        assert_eq!(serde_json::to_string(&Protocol::Udp).unwrap(), "\"UDP\"");

        assert_eq!(
            keys(config.endpoints(web), |w| w.key()),
            ["shop/web-a", "shop/web-b"]
        );
        assert_eq!(keys(config.endpoints(peers), |w| w.key()), ["shop/web-b"]);
        assert_eq!(
            config.endpoints(db).count(),
            0,
            "empty selector selects nothing"
        );
    }

    #[test]
    fn resolves_service_names() {
        let config = valid();
        let resolve = |name, namespace| {
            config
                .resolve_service_name(name, namespace)
                .map(|s| s.key())
        };
        let web = Some("shop/web".to_owned());
        assert_eq!(resolve("web", "shop"), web);
        assert_eq!(resolve("web", "default"), None);
        assert_eq!(resolve("web.shop", "default"), web);
        assert_eq!(resolve("web.shop.svc", "default"), web);
        assert_eq!(resolve("web.shop.svc.cluster.local", "default"), web);
        assert_eq!(resolve("WEB.Shop.SVC.Cluster.Local.", "default"), web);
        assert_eq!(resolve("web.shop.svc.other.local", "default"), None);
        assert_eq!(resolve("web.shop.pod", "default"), None);
        assert_eq!(resolve("web.other", "shop"), None);

        let opts = LoadOptions {
            cluster_domain: "Mesh.Example.".to_owned(),
            ..LoadOptions::default()
        };
        let config = load_with(&[("s.yaml", SERVICES)], &opts).unwrap();
        let resolve = |name| {
            config
                .resolve_service_name(name, "default")
                .map(|s| s.key())
        };
        assert_eq!(resolve("web.shop.svc.mesh.example."), web);
        assert_eq!(resolve("web.shop.svc.cluster.local"), None);
    }

    fn cluster_ips(config: &Config) -> Vec<(String, Option<IpAddr>)> {
        config
            .services()
            .iter()
            .map(|s| (s.key(), s.cluster_ip))
            .collect()
    }

    #[test]
    fn allocated_cluster_ips_are_stable() {
        let base: String = ["a", "b", "c", "d", "e"]
            .into_iter()
            .map(|name| service("shop", name, "{ports: [{port: 80}]}"))
            .collect();
        let first = cluster_ips(&load(&[("s.yaml", &base)]).unwrap());
        assert_eq!(first, cluster_ips(&load(&[("s.yaml", &base)]).unwrap()));
        for (_, ip) in &first {
            let Some(IpAddr::V4(ip)) = ip else {
                panic!("{ip:?}")
            };
            assert_eq!(ip.octets()[..2], [10, 96]);
            assert!(![[0, 0], [255, 255]].contains(&[ip.octets()[2], ip.octets()[3]]));
        }
        let unique: std::collections::HashSet<_> = first.iter().map(|(_, ip)| ip).collect();
        assert_eq!(unique.len(), first.len());

        // An unrelated service, sorted first, leaves the others alone.
        let extra = service("aaa", "zzz", "{ports: [{port: 80}]}");
        let grown = cluster_ips(&load(&[("s.yaml", &base), ("t.yaml", &extra)]).unwrap());
        assert_eq!(grown[1..], first[..]);

        // An explicit address taking shop/a's slot wins; shop/a probes to the next one.
        let Some(IpAddr::V4(a_ip)) = first[0].1 else {
            unreachable!()
        };
        let pinned = service(
            "shop",
            "pinned",
            &format!("{{clusterIP: {a_ip}, ports: [{{port: 80}}]}}"),
        );
        let moved = cluster_ips(&load(&[("s.yaml", &base), ("t.yaml", &pinned)]).unwrap());
        let next = Ipv4Addr::from(u32::from(a_ip) + 1);
        assert_eq!(moved[0], ("shop/a".to_owned(), Some(IpAddr::V4(next))));
        assert_eq!(moved[5], ("shop/pinned".to_owned(), Some(IpAddr::V4(a_ip))));
        assert_eq!(moved[1..5], first[1..]);
    }

    #[test]
    fn reports_an_exhausted_service_cidr() {
        let opts = LoadOptions {
            service_cidr: (Ipv4Addr::new(10, 0, 0, 0), 30),
            ..LoadOptions::default()
        };
        let two: String = ["a", "b"]
            .into_iter()
            .map(|name| service("shop", name, "{ports: [{port: 80}]}"))
            .collect();
        let mut ips: Vec<_> = cluster_ips(&load_with(&[("s.yaml", &two)], &opts).unwrap())
            .into_iter()
            .map(|(_, ip)| ip.unwrap())
            .collect();
        ips.sort();
        assert_eq!(ips, [ip("10.0.0.1"), ip("10.0.0.2")]);

        let five = two
            + &service("shop", "c", "{ports: [{port: 80}]}")
            + &service("shop", "d", "{ports: [{port: 80}]}")
            + &service("shop", "e", "{clusterIP: None, ports: [{port: 80}]}");
        let errors = load_with(&[("s.yaml", &five)], &opts).unwrap_err().0;
        assert_eq!(
            errors.len(),
            1,
            "one error however many Services are left out"
        );
        let expected = "s.yaml: Service shop/c: no free cluster IP left in service CIDR \
                        10.0.0.0/30 (2 addresses) for 2 Service(s) without clusterIP: shop/c, \
                        shop/d; use a larger --service-cidr or set clusterIP";
        assert!(errors[0].to_string().ends_with(expected), "{}", errors[0]);
    }

    #[test]
    fn a_full_range_names_ten_services_and_counts_the_rest() {
        let opts = LoadOptions {
            service_cidr: (Ipv4Addr::new(10, 0, 0, 0), 24),
            ..LoadOptions::default()
        };
        let services: String = (0..300)
            .map(|i| service("shop", &format!("s{i:03}"), "{ports: [{port: 80}]}"))
            .collect();
        let errors = load_with(&[("s.yaml", &services)], &opts).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        let names: Vec<_> = (254..264).map(|i| format!("shop/s{i}")).collect();
        let expected = format!(
            "(254 addresses) for 46 Service(s) without clusterIP: {}, and 36 more;",
            names.join(", ")
        );
        assert!(errors[0].message.contains(&expected), "{}", errors[0]);
    }

    #[test]
    fn error_display_names_file_object_and_field() {
        let dir = TestDir::new();
        dir.write(
            "services.yaml",
            &service("shop", "web", "{ports: [{port: 0}]}"),
        );
        let errors = Config::load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
        let expected = format!(
            "{}: Service shop/web: spec.ports[0].port: must be between 1 and 65535",
            dir.path().join("services.yaml").display()
        );
        assert_eq!(errors.to_string(), expected);
        let error = &errors.0[0];
        assert_eq!(error.object.as_deref(), Some("Service shop/web"));
        assert_eq!(error.field.as_deref(), Some("spec.ports[0].port"));
    }

    #[test]
    fn reads_node_addresses() {
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n\
                    status:\n  addresses:\n  - {type: Hostname, address: node-b}\n  \
                    - {type: InternalIP, address: 10.0.0.2}\n";
        let config = load(&[("nodes.yaml", node)]).unwrap();
        let node = config.node("node-b").unwrap();
        assert_eq!(node.addresses, [ip("10.0.0.2")]);
        assert_eq!(node.address_for(ip("10.1.1.11")), Some(ip("10.0.0.2")));

        let no_address = "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n\
                          status: {addresses: [{type: InternalIP, address: nowhere}]}\n";
        assert_error(
            &[("nodes.yaml", no_address)],
            &[
                "Node node-b",
                "status.addresses[0].address",
                "not an IP address",
            ],
        );
    }

    #[test]
    fn rejects_unsupported_kinds() {
        let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
        let supported =
            "(supported: v1 Namespace, v1 Node, nodemesh.io/v1alpha1 Workload, v1 Service, \
                         discovery.k8s.io/v1 EndpointSlice, \
                         networking.istio.io/v1|v1beta1|v1alpha3 VirtualService, \
                         networking.istio.io/v1|v1beta1|v1alpha3 DestinationRule, \
                         gateway.networking.k8s.io/v1|v1beta1 HTTPRoute, \
                         gateway.networking.k8s.io/v1|v1alpha2 GRPCRoute, \
                         networking.istio.io/v1|v1beta1|v1alpha3 Gateway, \
                         gateway.networking.k8s.io/v1|v1beta1 GatewayClass, \
                         gateway.networking.k8s.io/v1|v1beta1 Gateway, \
                         gateway.networking.k8s.io/v1beta1|v1alpha2 ReferenceGrant, \
                         security.istio.io/v1|v1beta1 PeerAuthentication, \
                         security.istio.io/v1|v1beta1 AuthorizationPolicy, \
                         telemetry.istio.io/v1|v1alpha1 Telemetry, v1 Secret)";
        assert_error(
            &[("x.yaml", deployment)],
            &[
                "x.yaml: document 1: ",
                "\"apps/v1\"",
                "\"Deployment\"",
                supported,
            ],
        );
        let wrong_group = "apiVersion: v1\nkind: Workload\nmetadata: {name: web}\n";
        assert_error(
            &[("x.yaml", wrong_group)],
            &["\"v1\" with kind \"Workload\""],
        );
        assert_error(&[("x.yaml", "[1, 2]")], &["document 1: expected a mapping"]);
    }

    #[test]
    fn rejects_invalid_documents() {
        let w = |spec: &str| workload("a", spec);
        let s = |spec: &str| service("shop", "web", spec);
        let cases = [
            (
                w("{netns: /n, addresses: [10.0.0.1]}"),
                "Workload shop/a: spec: missing field `node`",
            ),
            (
                w("{netns: n, addresses: [10.0.0.1], node: n1}"),
                "Workload shop/a: spec.netns: must be an absolute path",
            ),
            (
                w("{netns: /n, addresses: [], node: n1}"),
                "Workload shop/a: spec.addresses: at least one address",
            ),
            (
                w("{netns: /n, addresses: [10.0.0.1, 10.0.0.300], node: n1}"),
                "Workload shop/a: spec.addresses[1]: invalid IP address",
            ),
            (
                w("{netns: /n, addresses: [0.0.0.0], node: n1}"),
                "spec.addresses[0]: 0.0.0.0 is not a unicast address",
            ),
            (
                w("{netns: /n, addresses: [10.0.0.1], node: n1, ports: [80]}"),
                "Workload shop/a: spec.ports: unknown field `ports`",
            ),
            (
                w("{netns: /n, addresses: [10.0.0.1], node: ''}"),
                "Workload shop/a: spec.node: must not be empty",
            ),
            (
                w("{serviceAccount: Web, netns: /n, addresses: [10.0.0.1], node: n1}"),
                "spec.serviceAccount: invalid name \"Web\"",
            ),
            (
                s("{ports: [{port: 70000}]}"),
                "Service shop/web: spec.ports[0].port: must be between 1 and 65535",
            ),
            (
                s("{ports: [{port: 80, targetPort: -1}]}"),
                "spec.ports[0].targetPort: must be between 1 and 65535",
            ),
            (
                s("{ports: [{port: 80}, {port: 8080}, {port: 80, protocol: TCP}]}"),
                "spec.ports[2].port: duplicate port 80/TCP",
            ),
            (
                s("{ports: [{port: 80, protocol: SCTP}]}"),
                "spec.ports[0].protocol: unknown variant `SCTP`",
            ),
            (
                s("{ports: [{port: 80, nodePort: 30080}]}"),
                "Service shop/web: spec.ports[0].nodePort: unknown field `nodePort`",
            ),
            (
                s("{type: NodePort, ports: [{port: 80}]}"),
                "spec.type: unsupported service type \"NodePort\"",
            ),
            (
                s("{clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
                "spec.clusterIP: invalid IP address \"10.96.0.300\"",
            ),
            (
                service("shop", "Web_1", "{}"),
                "Service shop/Web_1: metadata.name: invalid name \"Web_1\"",
            ),
            (
                service("shop", "-web", "{}"),
                "metadata.name: invalid name \"-web\"",
            ),
            (
                service(&"n".repeat(64), "web", "{}"),
                "metadata.namespace: invalid name",
            ),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, lables: {}}\n".into(),
                "Namespace shop: metadata.lables: unknown field `lables`",
            ),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {a: 1}}\n".into(),
                "Namespace shop: metadata.labels.a: invalid type: integer",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\nspec: {}\n".into(),
                "x.yaml: document 1: metadata: missing field `name`",
            ),
            ("kind: [".into(), "x.yaml: invalid YAML: "),
        ];
        for (doc, expected) in cases {
            assert_error(&[("x.yaml", &doc)], &[expected]);
        }
    }

    #[test]
    fn one_port_number_may_serve_tcp_and_udp() {
        let dns = service(
            "kube-system",
            "dns",
            "{clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}, {port: 53, targetPort: 5353}]}",
        );
        let config = load(&[("dns.yaml", &dns)]).expect("53/UDP and 53/TCP together are valid");
        let dns = &config.services()[0];
        assert_eq!(dns.port(53, Protocol::Udp).map(|p| p.target_port), Some(53));
        assert_eq!(
            dns.port(53, Protocol::Tcp).map(|p| p.target_port),
            Some(5353)
        );
    }

    #[test]
    fn rejects_duplicates_and_collisions() {
        let web = service("shop", "web", "{ports: [{port: 80}]}");
        let errors = errors(&[("a.yaml", &web), ("b.yaml", &web)]);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("b.yaml: Service shop/web: duplicate definition, first defined in ")
        );
        assert!(errors[0].ends_with("a.yaml"));
        assert_error(
            &[("a.yaml", &format!("{web}{web}"))],
            &["a.yaml: Service shop/web: duplicate", "first defined in"],
        );

        let spec = "{netns: /n, addresses: [fd00::1, 10.0.0.1], node: n1}";
        let shared = format!(
            "{}{}",
            workload("a", spec),
            workload("b", "{netns: /n, addresses: [10.0.0.1], node: n1}")
        );
        assert_error(
            &[("w.yaml", &shared)],
            &[
                "w.yaml: Workload shop/b: spec.addresses[0]: ",
                "address 10.0.0.1 is already used by Workload shop/a (",
                "w.yaml)",
            ],
        );

        let pinned = |name| service("shop", name, "{clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        assert_error(
            &[("a.yaml", &pinned("one")), ("b.yaml", &pinned("two"))],
            &[
                "b.yaml: Service shop/two: spec.clusterIP: ",
                "cluster IP 10.96.0.10 is already used by Service shop/one (",
                "a.yaml)",
            ],
        );
    }

    #[test]
    fn collects_all_errors() {
        let bad_service = service(
            "shop",
            "Web",
            "{ports: [{port: 0}, {port: 80, targetPort: 99999}]}",
        );
        let third = format!(
            "{}{}{}",
            workload("a", "{netns: /n, addresses: [10.0.0.1], node: n1}"),
            workload("b", "{netns: /n, addresses: [10.0.0.1], node: n1}"),
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {}\n"
        );
        let errors = errors(&[
            ("1.yaml", &bad_service),
            ("2.yaml", "apiVersion: apps/v1\nkind: Deployment\n"),
            ("3.yaml", &third),
        ]);
        let expected = [
            "1.yaml: Service shop/Web: metadata.name: invalid name",
            "1.yaml: Service shop/Web: spec.ports[0].port: must be between",
            "1.yaml: Service shop/Web: spec.ports[1].targetPort: must be between",
            "2.yaml: document 1: unsupported apiVersion",
            "3.yaml: document 3: metadata: missing field `name`",
            "3.yaml: Workload shop/b: spec.addresses[0]: address 10.0.0.1 is already used",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, expected) in errors.iter().zip(expected) {
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn reports_a_missing_directory() {
        let dir = TestDir::new();
        let missing = dir.path().join("missing");
        let errors = Config::load_dir(&missing, &LoadOptions::default()).unwrap_err();
        let expected = format!("{}: cannot read config directory: ", missing.display());
        assert!(errors.to_string().starts_with(&expected), "{errors}");
    }
}
