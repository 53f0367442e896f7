//! Which workloads on this node are in the mesh, kept in line with the config.
//!
//! A workload is enrolled when it runs on this node and its namespace carries
//! `nodemesh.io/mesh: enabled`. Enrolling opens the agent's listeners inside
//! the workload's network namespace, then tells the kernel to steer its
//! traffic there; un-enrolling does the reverse. Open connections are left to
//! finish either way. Every change re-splits the proxy's descriptors between
//! the workloads enrolled (`proxy::budget`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nodemesh_common::{DNS_PORT, INBOUND_PORT, OUTBOUND_PORT};
use serde::Serialize;

use crate::config::{Config, ConfigStore, Workload};
use crate::dns::{self, Lookup, Resolver, Upstream};
use crate::ebpf::Datapath;
use crate::lifecycle::handover::{Inherited, Kind, SocketId};
use crate::netns::NetNs;
use crate::proxy::budget::{Listeners, Tenant, TenantUsage};
use crate::proxy::{self, Direction, Pod, PodTasks, Proxy};
use crate::reply_routing;

/// One enrolled workload's share of the proxy, as `nodemesh status` shows it:
/// descriptors held and connections refused, and HTTP requests in flight.
#[derive(Debug, Serialize)]
pub struct WorkloadUsage {
    #[serde(flatten)]
    pub descriptors: TenantUsage,
    pub http_requests_in_flight: u32,
}

/// How a configured workload stands on this node.
#[derive(Debug, Serialize)]
pub struct WorkloadStatus {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub service_account: String,
    pub netns: String,
    pub enrolled: bool,
    /// `enrolled`, `not in mesh`, `on another node`, or the enrollment error.
    pub state: String,
}

struct Enrolled {
    workload: Workload,
    pod: Arc<Pod>,
    _tasks: PodTasks,
    _listeners: Listeners,
    /// Its listeners and DNS socket (duplicates), to hand over to the next agent.
    sockets: Vec<(SocketId, OwnedFd)>,
}

pub struct Enroller {
    node: String,
    cluster_domain: String,
    dns_upstream: Upstream,
    proxy: Arc<Proxy>,
    datapath: Mutex<Datapath>,
    enrolled: Mutex<HashMap<String, Enrolled>>,
    /// Enrollment failures by workload, retried on every reconcile.
    failures: Mutex<BTreeMap<String, String>>,
    next_id: AtomicU32,
    /// Sockets handed over by the previous agent, used instead of new ones.
    inherited: Arc<Inherited>,
    /// What every workload's DNS responder answered.
    dns_counts: Arc<dns::DnsCounts>,
}

impl Enroller {
    pub fn new(
        node: String,
        cluster_domain: String,
        dns_upstream: Upstream,
        proxy: Arc<Proxy>,
        datapath: Datapath,
        inherited: Arc<Inherited>,
    ) -> Self {
        Enroller {
            node,
            cluster_domain,
            dns_upstream,
            proxy,
            datapath: Mutex::new(datapath),
            enrolled: Mutex::new(HashMap::new()),
            failures: Mutex::new(BTreeMap::new()),
            next_id: AtomicU32::new(1),
            inherited,
            dns_counts: Arc::default(),
        }
    }

    /// Queries the workloads' DNS responders handled, by outcome.
    pub fn dns_counts(&self) -> [(&'static str, u64); 6] {
        self.dns_counts.snapshot()
    }

    pub fn with_datapath<T>(&self, f: impl FnOnce(&Datapath) -> T) -> T {
        f(&self.datapath.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn enrolled_count(&self) -> usize {
        self.enrolled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn failures(&self) -> BTreeMap<String, String> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Brings enrollment in line with `cfg`. Must run inside the runtime.
    pub fn reconcile(&self, cfg: &Config) {
        let desired: HashMap<String, &Workload> = cfg
            .workloads()
            .iter()
            .filter(|w| w.node == self.node && cfg.is_enrolled(w))
            .map(|w| (w.key(), w))
            .collect();
        let mut enrolled = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
        let mut datapath = self.datapath.lock().unwrap_or_else(|e| e.into_inner());
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.retain(|key, _| desired.contains_key(key));

        let stale: Vec<String> = enrolled
            .iter()
            .filter(|(key, e)| {
                desired
                    .get(*key)
                    .is_none_or(|w| !same_placement(w, &e.workload))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(gone) = enrolled.remove(&key) {
                self.proxy.remove_local(&gone.pod);
                if let Err(e) = datapath.unenroll(gone.pod.netns.cookie(), &gone.workload.addresses)
                {
                    log::warn!("un-enrolling {key}: {e}");
                }
                if let Err(e) = reply_routing::remove(&gone.pod.netns) {
                    log::warn!("un-enrolling {key}: {e}");
                }
                log::info!("un-enrolled {key}");
            }
        }
        for (key, workload) in desired {
            if enrolled.contains_key(&key) {
                continue;
            }
            match self.enroll(&mut datapath, workload) {
                Ok(e) => {
                    log::info!(
                        "enrolled {key} (netns {}, {:?})",
                        workload.netns.display(),
                        workload.addresses
                    );
                    failures.remove(&key);
                    enrolled.insert(key, e);
                }
                Err(e) => {
                    if failures.get(&key) != Some(&e) {
                        log::warn!("cannot enroll {key}: {e}");
                    }
                    failures.insert(key, e);
                }
            }
        }
        forget_previous_run(&mut datapath, &enrolled, cfg, &self.node);
        self.proxy.descriptors.set_workloads(enrolled.len());
    }

    /// What each enrolled workload holds of the shared proxy.
    pub fn usage(&self) -> BTreeMap<String, WorkloadUsage> {
        self.enrolled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(key, e)| {
                let usage = WorkloadUsage {
                    descriptors: e.pod.tenant.usage(),
                    http_requests_in_flight: e.pod.http_requests_in_flight(),
                };
                (key.clone(), usage)
            })
            .collect()
    }

    fn enroll(&self, datapath: &mut Datapath, workload: &Workload) -> Result<Enrolled, String> {
        let reserved = self.proxy.descriptors.reserve_listeners().map_err(|_| {
            "the proxy has no descriptors left for the workload's listeners; \
             retrying as connections close"
                .to_owned()
        })?;
        let netns =
            NetNs::open(&workload.netns).map_err(|e| format!("opening network namespace {e}"))?;
        let pod = Arc::new(Pod::new(
            workload.key(),
            self.proxy.identity_of(workload),
            workload.addresses.clone(),
            netns,
            Tenant::new(self.proxy.descriptors.clone()),
        ));
        let cookie = pod.netns.cookie();
        let listen = |kind: Kind, addr: SocketAddr| {
            self.inherited
                .tcp_listener(SocketId::workload(kind, cookie))
                .unwrap_or_else(|| pod.listen(addr))
                .map_err(|e| format!("listening on {addr} in the workload: {e}"))
        };
        let outbound = listen(
            Kind::Outbound,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
        )?;
        // Loopback: sk_lookup hands it SYNs for any of the workload's
        // addresses, and nothing can reach it on those addresses directly.
        let inbound = listen(
            Kind::Inbound,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), INBOUND_PORT),
        )?;
        let dns = match self
            .inherited
            .udp_socket(SocketId::workload(Kind::Dns, cookie))
        {
            Some(socket) => socket.map_err(|e| format!("the DNS socket handed over: {e}"))?,
            None => self.dns_socket(&pod)?,
        };
        // IPv6 is optional in a workload: without ::1 its v6 connects fail.
        let outbound6 = listen(
            Kind::Outbound6,
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT),
        )
        .inspect_err(|e| log::debug!("{}: no IPv6 outbound listener: {e}", pod.key))
        .ok();
        let sockets = [
            (Kind::Outbound, Some(outbound.as_fd())),
            (Kind::Inbound, Some(inbound.as_fd())),
            (Kind::Dns, Some(dns.as_fd())),
            (Kind::Outbound6, outbound6.as_ref().map(AsFd::as_fd)),
        ]
        .into_iter()
        .filter_map(|(kind, fd)| Some((SocketId::workload(kind, cookie), fd?)))
        .map(|(id, fd)| fd.try_clone_to_owned().map(|fd| (id, fd)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("keeping the workload's sockets for a hand-over: {e}"))?;
        // Before sk_lookup steers anything to the agent: its deliveries'
        // replies need it.
        reply_routing::install(&pod.netns).map_err(|e| e.to_string())?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = datapath.enroll(&pod.netns, id, &workload.addresses, &inbound) {
            if let Err(e) = reply_routing::remove(&pod.netns) {
                log::warn!("{}: {e}", pod.key);
            }
            return Err(format!("attaching the data path: {e}"));
        }

        let listeners = [
            (outbound, Direction::Outbound),
            (inbound, Direction::Inbound),
        ]
        .into_iter()
        .chain(outbound6.map(|v6| (v6, Direction::Outbound)));
        let mut tasks: Vec<_> = listeners
            .map(|(listener, direction)| {
                tokio::spawn(proxy::serve(
                    self.proxy.clone(),
                    pod.clone(),
                    listener,
                    direction,
                ))
            })
            .collect();
        let resolver = Arc::new(MeshResolver {
            config: self.proxy.config.clone(),
            namespace: workload.namespace.clone(),
            cluster_suffix: format!(".{}", self.cluster_domain),
        });
        let (upstream, key, tenant) = (self.dns_upstream, pod.key.clone(), pod.tenant.clone());
        let descriptor = move || tenant.charge(1, None).ok();
        let dns_counts = self.dns_counts.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dns::serve(dns, resolver, upstream, descriptor, dns_counts).await {
                log::warn!("{key}: DNS responder stopped: {e}");
            }
        }));
        self.proxy.add_local(&pod);
        Ok(Enrolled {
            workload: workload.clone(),
            pod,
            _tasks: PodTasks(tasks),
            _listeners: reserved,
            sockets,
        })
    }

    /// Duplicates of every enrolled workload's sockets, for the next agent.
    pub fn handover_sockets(&self) -> std::io::Result<Vec<(SocketId, OwnedFd)>> {
        let enrolled = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
        enrolled
            .values()
            .flat_map(|e| &e.sockets)
            .map(|(id, fd)| Ok((*id, fd.try_clone()?)))
            .collect()
    }

    /// After a hand-over: stops accepting and answering DNS (the next agent
    /// does), leaving the node's maps, links and open connections as they are.
    pub fn stop_serving(&self) {
        self.enrolled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn dns_socket(&self, pod: &Pod) -> Result<tokio::net::UdpSocket, String> {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), DNS_PORT);
        let socket = pod
            .netns
            .enter(|| {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM.nonblocking(),
                    None,
                )?;
                s.set_mark(nodemesh_common::AGENT_MARK)?;
                Ok(s)
            })
            .and_then(|s| s.bind(&addr.into()).map(|()| s))
            .map_err(|e| format!("DNS socket on {addr} in the workload: {e}"))?;
        tokio::net::UdpSocket::from_std(socket.into()).map_err(|e| e.to_string())
    }

    /// Every configured workload and how it stands here.
    pub fn status(&self, cfg: &Config) -> Vec<WorkloadStatus> {
        let enrolled = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        cfg.workloads()
            .iter()
            .map(|w| {
                let key = w.key();
                let is_enrolled = enrolled.contains_key(&key);
                let state = if is_enrolled {
                    "enrolled".to_owned()
                } else if let Some(e) = failures.get(&key) {
                    format!("error: {e}")
                } else if w.node != self.node {
                    "on another node".to_owned()
                } else {
                    "not in mesh".to_owned()
                };
                WorkloadStatus {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    node: w.node.clone(),
                    addresses: w.addresses.clone(),
                    service_account: w.service_account.clone(),
                    netns: w.netns.display().to_string(),
                    enrolled: is_enrolled,
                    state,
                }
            })
            .collect()
    }
}

fn same_placement(a: &Workload, b: &Workload) -> bool {
    a.netns == b.netns && a.addresses == b.addresses && a.namespace == b.namespace
}

/// Removes what a previous agent run enrolled and this one does not: its
/// data path entries, and the reply routing inside those of the node's
/// configured workloads it had enrolled (a namespace no longer configured
/// is gone with its pod).
fn forget_previous_run(
    datapath: &mut Datapath,
    enrolled: &HashMap<String, Enrolled>,
    cfg: &Config,
    node: &str,
) {
    let cookies: Vec<u64> = enrolled.values().map(|e| e.pod.netns.cookie()).collect();
    let addresses: Vec<IpAddr> = enrolled
        .values()
        .flat_map(|e| e.workload.addresses.iter().copied())
        .collect();
    let stale_addresses: Vec<IpAddr> = datapath
        .inbound_addresses()
        .into_iter()
        .filter(|a| !addresses.contains(a))
        .collect();
    datapath.release_addresses(&stale_addresses);
    let stale_cookies: Vec<u64> = datapath
        .enrolled_cookies()
        .into_iter()
        .filter(|c| !cookies.contains(c))
        .collect();
    for &cookie in &stale_cookies {
        log::info!("forgetting network namespace {cookie} enrolled by a previous run");
        if let Err(e) = datapath.release_namespace(cookie) {
            log::warn!("forgetting netns {cookie}: {e}");
        }
    }
    if stale_cookies.is_empty() {
        return;
    }
    let not_enrolled = cfg
        .workloads()
        .iter()
        .filter(|w| w.node == node && !enrolled.contains_key(&w.key()));
    for workload in not_enrolled {
        let Ok(netns) = NetNs::open(&workload.netns) else {
            continue;
        };
        if stale_cookies.contains(&netns.cookie()) {
            if let Err(e) = reply_routing::remove(&netns) {
                log::warn!("forgetting {}: {e}", workload.key());
            }
        }
    }
}

/// Answers Service names for one workload (short names are relative to its
/// namespace) and leaves every other name to the upstream resolver.
struct MeshResolver {
    config: Arc<ConfigStore>,
    namespace: String,
    /// `.cluster.local`: names under it are ours, known or not.
    cluster_suffix: String,
}

impl Resolver for MeshResolver {
    fn lookup(&self, name: &str) -> Lookup {
        let cfg = self.config.current();
        match cfg.resolve_service_name(name, &self.namespace) {
            Some(service) => match service.cluster_ip {
                Some(ip) => Lookup::Addresses(vec![ip]),
                // Headless: the endpoints themselves.
                None => Lookup::Addresses(
                    cfg.endpoints(service)
                        .flat_map(|w| w.addresses.iter().copied())
                        .collect(),
                ),
            },
            None if name.ends_with(&self.cluster_suffix) => Lookup::NxDomain,
            None => Lookup::Forward,
        }
    }
}
