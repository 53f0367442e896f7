//! The ingress gateway: every agent can serve Istio Gateways on its node's
//! own addresses, so no separate gateway proxy is needed. Which Gateways
//! this node serves and what is bound to them is decided in
//! [`crate::routing::ingress`] (pure data); this module keeps one listener
//! task per port in line with the config, and requests enter the mesh as
//! the ingress's own identity ([`crate::identity::ingress_id`]), over the
//! same hop as any workload's.
//!
//! - `listener`: accept TCP → TLS step (for servers that need one) → HTTP.

mod listener;
pub mod tls;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, Labels};
use crate::identity;
use crate::netns::NetNs;
use crate::proxy::budget::Tenant;
use crate::proxy::{Pod, Proxy};
use tls::{PortTls, TlsMode};

/// The ports this node cannot bind, with why (taken on the host...).
pub type PortFailures = BTreeMap<u16, String>;

/// The ingress of one node.
pub struct Ingress {
    proxy: Arc<Proxy>,
    /// The caller requests go into the mesh as; made on first use.
    pod: Mutex<Option<Arc<Pod>>>,
    listeners: Mutex<BTreeMap<u16, Port>>,
    /// Published at each change, for the Kubernetes source to report.
    failures: watch::Sender<PortFailures>,
}

/// One port the node's Gateways need.
struct Port {
    addresses: Vec<SocketAddr>,
    /// The TLS step, replaced at each config change (`None`: plaintext).
    tls: Arc<ArcSwapOption<PortTls>>,
    /// Why the port is not served (taken on the host...); `None`: served.
    error: Option<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Port {
    fn drop(&mut self) {
        // Open connections run in their own tasks and finish.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Ingress {
    pub fn new(proxy: Arc<Proxy>, failures: watch::Sender<PortFailures>) -> Ingress {
        Ingress {
            proxy,
            pod: Mutex::new(None),
            listeners: Mutex::new(BTreeMap::new()),
            failures,
        }
    }

    /// Opens the ports the config's Gateways need on this node and closes
    /// the others; a port that cannot be bound is retried on the next call.
    pub fn reconcile(&self, cfg: &Config) {
        let node = cfg.node(&self.proxy.node);
        let no_labels = Default::default();
        let labels = node.map_or(&no_labels, |n| &n.labels);
        let wanted = cfg.routing().ingress().ports(labels);
        let ips = match node {
            Some(n) if !n.addresses.is_empty() => n.addresses.clone(),
            _ => vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
        };
        let mut listeners = lock(&self.listeners);
        listeners.retain(|port, _| wanted.contains_key(port));
        self.publish_failures(&listeners);
        if wanted.is_empty() {
            return;
        }
        let Some(pod) = self.pod(cfg) else {
            return;
        };
        for &port in wanted.keys() {
            let addresses: Vec<_> = ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect();
            let tls = self.port_tls(cfg, labels, port);
            let current = listeners.get(&port);
            if let Some(current) = current.filter(|p| p.error.is_none() && p.addresses == addresses)
            {
                current.tls.store(tls);
                continue;
            }
            listeners.remove(&port);
            listeners.insert(port, self.open(&pod, addresses, tls));
        }
        self.publish_failures(&listeners);
    }

    fn publish_failures(&self, listeners: &BTreeMap<u16, Port>) {
        let failures: PortFailures = listeners
            .iter()
            .filter_map(|(port, p)| Some((*port, p.error.clone()?)))
            .collect();
        self.failures.send_if_modified(|current| {
            let changed = *current != failures;
            *current = failures;
            changed
        });
    }

    /// The TLS step of `port`; a server whose settings rustls refuses is
    /// logged, and the port then serves plaintext servers only.
    fn port_tls(&self, cfg: &Config, labels: &Labels, port: u16) -> Option<Arc<PortTls>> {
        match PortTls::build(cfg, labels, port, &self.proxy.identities) {
            Ok(tls) => tls.map(Arc::new),
            Err(e) => {
                log::warn!("ingress: TLS on port {port} not served: {e}");
                None
            }
        }
    }

    /// Binds every address of a port, or none.
    fn open(&self, pod: &Arc<Pod>, addresses: Vec<SocketAddr>, tls: Option<Arc<PortTls>>) -> Port {
        let tls = Arc::new(ArcSwapOption::new(tls));
        let bound: Result<Vec<_>, String> = addresses
            .iter()
            .map(|&addr| listener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}")))
            .collect();
        match bound {
            Ok(sockets) => {
                log::info!("ingress listening on {addresses:?}");
                let tasks = sockets
                    .into_iter()
                    .map(|socket| {
                        let (proxy, pod) = (self.proxy.clone(), pod.clone());
                        tokio::spawn(listener::serve(proxy, pod, socket, tls.clone()))
                    })
                    .collect();
                Port {
                    addresses,
                    tls,
                    error: None,
                    tasks,
                }
            }
            Err(error) => {
                log::warn!("ingress: {error}");
                Port {
                    addresses,
                    tls,
                    error: Some(error),
                    tasks: Vec::new(),
                }
            }
        }
    }

    /// The ingress's caller: its identity, the node's addresses, the
    /// agent's own network namespace and a descriptor share of its own.
    fn pod(&self, cfg: &Config) -> Option<Arc<Pod>> {
        let mut pod = lock(&self.pod);
        if let Some(pod) = pod.as_ref() {
            return Some(pod.clone());
        }
        let netns = match NetNs::open(Path::new("/proc/self/ns/net")) {
            Ok(netns) => netns,
            Err(e) => {
                log::error!("ingress: the agent's own network namespace: {e}");
                return None;
            }
        };
        let id = identity::ingress_id(cfg, self.proxy.identities.trust_domain());
        let addresses = cfg
            .node(&self.proxy.node)
            .map(|n| n.addresses.clone())
            .unwrap_or_default();
        let made = Arc::new(Pod::new(
            identity::ingress_key(cfg),
            id,
            addresses,
            netns,
            Tenant::new(self.proxy.descriptors.clone()),
        ));
        *pod = Some(made.clone());
        Some(made)
    }

    /// `nodemesh gateways`: what this node serves, where, and what is
    /// bound to it.
    pub fn status(&self, cfg: &Config) -> serde_json::Value {
        let node = cfg.node(&self.proxy.node);
        let no_labels = Default::default();
        let labels = node.map_or(&no_labels, |n| &n.labels);
        let listeners = lock(&self.listeners);
        let mut servers = Vec::new();
        for gateway in cfg.routing().ingress().served_by(labels) {
            for server in &gateway.servers {
                let port = listeners.get(&server.port);
                let state = match (&server.not_served, port) {
                    (Some(reason), _) => format!("not served: {reason}"),
                    (None, Some(Port { error: Some(e), .. })) => format!("not served: {e}"),
                    (None, Some(_)) => "listening".to_owned(),
                    (None, None) => "pending".to_owned(),
                };
                let http = server.routes.iter();
                let http =
                    http.map(|r| json!({ "host": r.domain, "virtualService": r.routes.origin }));
                let l4 = server.l4_routes.iter().map(|r| {
                    let sni: Vec<_> = r.matches.iter().flat_map(|m| &m.sni_hosts).collect();
                    json!({
                        "host": if sni.is_empty() { "*".to_owned() } else { join(&sni) },
                        "virtualService": r.origin,
                        "rule": r.field(),
                        "destinations": r.destinations().iter().map(|d| json!({
                            "service": d.destination.service,
                            "subset": d.destination.subset,
                            "port": d.destination.port,
                            "weight": d.weight,
                        })).collect::<Vec<_>>(),
                    })
                });
                let routes: Vec<_> = http.chain(l4).collect();
                servers.push(json!({
                    "gateway": gateway.key,
                    "origin": gateway.origin,
                    "server": server.field,
                    "addresses": port.map(|p| p.addresses.clone()).unwrap_or_default(),
                    "port": server.port,
                    "protocol": server.protocol,
                    "hosts": server.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "tls": server.tls.as_ref().map(|t| json!({
                        "mode": t.mode.as_ref().map(TlsMode::name),
                        "httpsRedirect": t.https_redirect,
                        "certificateExpiry": t.mode.as_ref().and_then(TlsMode::expiry),
                    })),
                    "routes": routes,
                    "state": state,
                }));
            }
        }
        json!({
            "identity": identity::ingress_id(cfg, self.proxy.identities.trust_domain()).to_string(),
            "servers": servers,
        })
    }
}

fn join(hosts: &[&String]) -> String {
    let hosts: Vec<&str> = hosts.iter().map(|h| h.as_str()).collect();
    hosts.join(" ")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
