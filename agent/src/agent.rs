//! The daemon: loads the data path, keeps enrollment in line with the config,
//! serves the admin socket, and stops on SIGTERM/SIGINT.
//!
//! Stopping (or crashing) leaves the eBPF programs attached on purpose:
//! enrolled workloads fail closed (outbound and inbound connects are
//! refused) instead of bypassing the mesh, and the next agent picks the
//! pinned state up. `nodemesh uninstall` removes the node's data path.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::{self, Query, Responder};
use crate::config::{Config, ConfigStore, LoadOptions};
use crate::dns::{self, Upstream};
use crate::ebpf::Datapath;
use crate::identity::{self, Identities};
use crate::ingress::Ingress;
use crate::lifecycle::handover::{HandedOver, Hello, Inherited, Kind, SocketId, Standbys, Start};
use crate::lifecycle::ownership::{NodeLock, Owner};
use crate::lifecycle::{self, Front};
use crate::memory;
use crate::nofile::{self, Nofile};
use crate::proxy::budget::Descriptors;
use crate::proxy::{self, Direction, Proxy};
use crate::sources::{self, Source};
use crate::telemetry::{self, health};
use crate::transport;
use crate::workloads::Enroller;

/// Re-check enrollment this often even without config changes: a workload's
/// network namespace may appear after its config.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);

pub struct Settings {
    /// Where the config comes from.
    pub source: Source,
    pub node: String,
    pub admin_socket: PathBuf,
    pub bpffs: PathBuf,
    pub upstream_dns: Option<SocketAddr>,
    pub load: LoadOptions,
    pub proxy: proxy::Settings,
    /// The open-file limit the agent runs with (already raised).
    pub nofile: Nofile,
    /// Where Prometheus scrapes `/metrics` (`--metrics-addr`); none: off.
    pub metrics_addr: Option<SocketAddr>,
    /// Ask the node's owner to hand the node over now (else stand by
    /// until it stops or is told to).
    pub take_over: bool,
    /// After a hand-over, longest time to let connections finish.
    pub drain_timeout: Duration,
}

struct Node {
    settings: Settings,
    started: Instant,
    /// This process, owner of the node since.
    owner: Owner,
    config: Arc<ConfigStore>,
    /// Fills `config`; `nodemesh status` shows its state.
    source: sources::Running,
    proxy: Arc<Proxy>,
    /// The node's workload certificates, kept in line with the config.
    identities: Arc<Identities>,
    enroller: Enroller,
    /// Listeners of the Gateways this node serves.
    ingress: Ingress,
    /// The first load has ended and enrollment follows the config.
    ready: AtomicBool,
}

/// Accepts other agents' HBONE connections, when the node has the
/// credential to present to them; returns the task and the listener (a
/// duplicate, for a hand-over).
async fn serve_hbone(
    proxy: &Arc<Proxy>,
    identities: &Arc<Identities>,
    inherited: &Inherited,
) -> anyhow::Result<Option<(tokio::task::JoinHandle<()>, OwnedFd)>> {
    if identities.node_certified_key().is_none() {
        log::warn!(
            "no --node-credential: other nodes cannot reach this node's workloads over mutual TLS"
        );
        return Ok(None);
    }
    let port = transport::HBONE_PORT;
    let listener = match inherited.tcp_listener(SocketId::node(Kind::Hbone)) {
        Some(listener) => listener.context("the HBONE listener handed over")?,
        // Dual-stack where the node has IPv6, else IPv4 only.
        None => match tokio::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
            Ok(listener) => listener,
            Err(_) => tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .await
                .with_context(|| format!("listening for HBONE on port {port}"))?,
        },
    };
    let kept = listener.as_fd().try_clone_to_owned()?;
    let serving = transport::server::serve(
        listener,
        identities.clone(),
        proxy.clone(),
        proxy.resumable.clone(),
        proxy.drain.watch(),
        proxy.workers.clone(),
    );
    Ok(Some((tokio::spawn(serving), kept)))
}

/// Serves the admin socket through `front`; returns the task and the
/// listener (a duplicate, for a hand-over).
fn serve_admin(
    listener: tokio::net::UnixListener,
    front: &Arc<Front>,
) -> std::io::Result<(tokio::task::JoinHandle<()>, OwnedFd)> {
    let kept = listener.as_fd().try_clone_to_owned()?;
    Ok((tokio::spawn(admin::serve(listener, front.clone())), kept))
}

/// Binds the admin socket, unless another agent serves that path (this one
/// may get it at a hand-over).
fn bind_admin(path: &Path) -> anyhow::Result<Option<tokio::net::UnixListener>> {
    match admin::bind(path) {
        Ok(listener) => Ok(Some(listener)),
        Err(admin::AdminError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the agent; `identities` holds the node's credential and gets the
/// workload certificates the config calls for.
pub async fn run(settings: Settings, identities: Arc<Identities>) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the agent loads eBPF programs and must run as root"
    );
    let stop = stop_requested()?;
    tokio::pin!(stop);
    let front = Front::new(settings.node.clone());
    let mut admin = bind_admin(&settings.admin_socket)?
        .map(|listener| serve_admin(listener, &front))
        .transpose()?;
    // Nothing of the node's data path is touched before this agent owns it.
    let Some(start) = lifecycle::wait_until_owner(
        &settings.bpffs,
        &settings.node,
        settings.take_over,
        &front,
        &mut stop,
    )
    .await?
    else {
        if admin.is_some() {
            let _ = std::fs::remove_file(&settings.admin_socket);
        }
        log::info!("stopped while standing by");
        return Ok(());
    };
    let (lock, inherited, handed_in) = match start {
        Start::Locked(lock) => (lock, Arc::new(Inherited::default()), None),
        Start::HandedIn(h) => (h.lock, h.sockets, Some((h.ack, h.from))),
    };
    let owner = Owner::this_process();
    let owned_since = Instant::now();
    let mut took_admin = false;
    if admin.is_none() {
        let handed_admin = handed_in
            .as_ref()
            .filter(|(_, from)| from.admin_socket == settings.admin_socket)
            .and_then(|_| inherited.take(SocketId::node(Kind::Admin)));
        let listener = match handed_admin {
            Some(fd) => {
                took_admin = true;
                let listener = std::os::unix::net::UnixListener::from(fd);
                listener.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(listener)?
            }
            None => admin::bind(&settings.admin_socket)?,
        };
        admin = Some(serve_admin(listener, &front)?);
    }
    let (admin_task, admin_fd) = admin.expect("bound above");
    // The first load runs on the loader's thread while the data path is set up; until it
    // ends, nothing is enrolled and the admin socket reports the node as not ready.
    let config = Arc::new(ConfigStore::unloaded());
    // The ingress's ports it cannot bind, which the Kubernetes source reports.
    let (port_failures, failures) = tokio::sync::watch::channel(Default::default());
    let mut source_settings = settings.source.clone();
    if let Source::Kubernetes(kube) = &mut source_settings {
        kube.port_failures = Some(failures);
    }
    let source = sources::start(source_settings, settings.load.clone(), config.clone())
        .await
        .context("starting the configuration source")?;
    let (datapath, orig_dst, deliveries) =
        Datapath::load(&settings.bpffs, &settings.node).context("setting up the eBPF data path")?;
    // Measured once the data path holds its descriptors: what the agent
    // keeps for itself is what it holds now plus headroom.
    let descriptors = Descriptors::new(
        settings.nofile,
        nofile::open_count().context("counting the agent's open descriptors")?,
        settings.proxy.max_connections_per_workload,
    )?;
    let proxy = Arc::new(
        Proxy::new(
            settings.node.clone(),
            config.clone(),
            identities.clone(),
            orig_dst,
            deliveries,
            settings.proxy.clone(),
            Arc::new(descriptors),
        )
        .context("starting the proxy's worker threads")?,
    );
    let upstream = Upstream {
        addr: dns_upstream(settings.upstream_dns),
        timeout: Duration::from_secs(2),
    };
    let enroller = Enroller::new(
        settings.node.clone(),
        settings.load.cluster_domain.clone(),
        upstream,
        proxy.clone(),
        datapath,
        inherited.clone(),
    );
    if !identities.has_ca() {
        log::warn!(
            "no --ca-address: workloads get no certificates, so mesh traffic to and from \
             other nodes will be refused"
        );
    }
    let hbone = serve_hbone(&proxy, &identities, &inherited).await?;
    let hello = Hello {
        owner: owner.clone(),
        admin_socket: settings.admin_socket.clone(),
    };
    let standbys = Standbys::listen(lock.pin_dir(), hello)
        .inspect_err(|e| log::warn!("no hand-over to a next agent will be possible: {e}"))
        .ok();
    let metrics = match settings.metrics_addr {
        Some(addr) => Some(telemetry::server::bind(addr).await?),
        None => None,
    };
    let proxy_for_ingress = proxy.clone();
    let node = Arc::new(Node {
        settings,
        started: Instant::now(),
        owner,
        config: config.clone(),
        source,
        proxy,
        identities,
        enroller,
        ingress: Ingress::new(proxy_for_ingress, port_failures),
        ready: AtomicBool::new(false),
    });
    front.owned_by(node.clone());
    let metrics =
        metrics.map(|listener| tokio::spawn(telemetry::server::serve(listener, node.clone())));
    let window = tokio::spawn(node.proxy.telemetry.clone().keep_window());
    let releaser = tokio::spawn(memory::release_after_each_burst(
        vec![
            config.subscribe(),
            node.identities.subscribe_issued(),
            front.answered(),
        ],
        memory::SETTLED_AFTER,
        memory::release_code_pages_logged,
    ));

    let loaded = tokio::select! {
        () = config.first_load() => true,
        () = &mut stop => false,
    };
    let mut reconciler = loaded.then(|| {
        if let Some(error) = config.last_error() {
            // Start anyway, so `nodemesh status` shows the error and a fix is picked up.
            log::error!("configuration rejected, starting with none:\n{error}");
        }
        node.reconcile();
        node.ready.store(true, Ordering::Relaxed);
        log::info!(
            "node {} ready: {} workload(s) enrolled, config generation {}, admin socket {}",
            node.settings.node,
            node.enroller.enrolled_count(),
            config.generation(),
            node.settings.admin_socket.display()
        );
        tokio::spawn(reconcile_loop(node.clone()))
    });
    if let Some((ack, from)) = handed_in.filter(|_| loaded) {
        node.certificates_issued().await;
        let unused = inherited.close_rest();
        let carried = ack
            .accepting(took_admin)
            .context("telling the previous agent this one serves")?;
        let proxy = node.proxy.clone();
        tokio::spawn(async move {
            match tokio::task::spawn_blocking(move || carried.receive()).await {
                Ok(Ok(relays)) => {
                    log::info!("resuming {} relay(s) carried over", relays.len());
                    for relay in relays {
                        proxy.workers.spawn(proxy.clone().resume(relay));
                    }
                }
                Ok(Err(e)) => log::warn!("relays carried over are lost: {e}"),
                Err(e) => log::warn!("relays carried over are lost: {e}"),
            }
        });
        log::info!(
            "took node {} over from pid {} (nodemesh {}) {} ms after its hand-over began \
             ({unused} handed-over socket(s) unused: closed)",
            node.settings.node,
            from.owner.pid,
            from.owner.version,
            owned_since.elapsed().as_millis(),
        );
    }
    let mut lock = Some(lock);
    while reconciler.is_some() {
        let take_over = async {
            match &standbys {
                Some(s) => s.take_over_requested().await,
                None => std::future::pending().await,
            }
        };
        let stopping = tokio::select! {
            () = &mut stop => true,
            () = take_over => false,
        };
        let standbys = match standbys.clone() {
            Some(standbys) if standbys.any_waiting().await => standbys,
            _ if stopping => break,
            _ => continue,
        };
        // From here on, enrollment is the next agent's.
        node.ready.store(false, Ordering::Relaxed);
        if let Some(task) = reconciler.take() {
            task.abort();
        }
        let sockets = node.handover_sockets(
            lock.as_ref().expect("owned"),
            &admin_fd,
            hbone.as_ref().map(|(_, fd)| fd),
        )?;
        let stop_serving = |handed: &HandedOver| {
            node.enroller.stop_serving();
            if let Some((task, _)) = &hbone {
                task.abort();
            }
            if handed.took_admin {
                admin_task.abort();
            }
        };
        let retired = lifecycle::retire(
            standbys,
            sockets,
            lock.take().expect("owned"),
            stop_serving,
            &node.proxy,
            node.settings.drain_timeout,
        )
        .await;
        match retired {
            Ok(handed) => {
                if !handed.took_admin {
                    let _ = std::fs::remove_file(&node.settings.admin_socket);
                }
                log::info!("drained; exiting");
                return Ok(());
            }
            Err((kept, e)) => {
                log::error!("{e}; this agent keeps the node");
                node.ready.store(true, Ordering::Relaxed);
                lock = Some(kept);
                if stopping {
                    break;
                }
                reconciler = Some(tokio::spawn(reconcile_loop(node.clone())));
            }
        }
    }
    if let Some(reconciler) = reconciler {
        reconciler.abort();
    }
    window.abort();
    releaser.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Some((hbone, _)) = hbone {
        hbone.abort();
    }
    let _ = std::fs::remove_file(&node.settings.admin_socket);
    log::info!(
        "stopped; eBPF programs stay attached so enrolled workloads fail closed until an agent \
         is back (`nodemesh uninstall --node-name {}` removes them)",
        node.settings.node
    );
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. A load in progress never delays it: loads run on a thread
/// of their own, which is not waited for.
fn stop_requested() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

async fn reconcile_loop(node: Arc<Node>) {
    let mut changes = node.config.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RECONCILE_EVERY) => {}
        }
        node.reconcile();
    }
}

/// `--upstream-dns`, else the node's first resolv.conf nameserver.
fn dns_upstream(flag: Option<SocketAddr>) -> SocketAddr {
    flag.or_else(|| {
        let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
        dns::upstream_from_resolv_conf(&conf).map(|ip| SocketAddr::new(ip, 53))
    })
    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 53], 53)))
}

impl Responder for Node {
    fn answer(&self, query: Query) -> serde_json::Value {
        let cfg = self.config.current();
        match query {
            Query::Status => self.status(&cfg),
            Query::Workloads => json!(self.enroller.status(&cfg)),
            Query::Services => services(&cfg),
            Query::Connections => json!(self.proxy.recent_connections()),
            Query::Certs => json!(self.identities.certs()),
            Query::Routes => self.proxy.routes(&cfg),
            Query::Gateways => self.ingress.status(&cfg),
            Query::Explain(ask) => self
                .proxy
                .explain(&cfg, &ask)
                .unwrap_or_else(|e| json!({ "error": e })),
            Query::Policies(workload) => self
                .proxy
                .policies(&cfg, workload.as_deref())
                .unwrap_or_else(|e| json!({ "error": e })),
            Query::Stats(seconds) => match self.proxy.telemetry.stats(Duration::from_secs(seconds))
            {
                Ok(stats) => json!(stats),
                Err(e) => json!({ "error": e.to_string() }),
            },
        }
    }
}

impl Node {
    /// Waits (10 s at most) for the certificates of the node's workloads, so
    /// that an agent taking over serves mutual TLS from its first connection.
    async fn certificates_issued(&self) {
        if !self.identities.has_ca() {
            return;
        }
        let cfg = self.config.current();
        let wanted = identity::on_node(&cfg, &self.settings.node, self.identities.trust_domain());
        let deadline = Instant::now() + Duration::from_secs(10);
        for id in wanted {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.identities.wait_for(&id, left).await.is_none() {
                log::warn!("taking over without a certificate for {id} yet");
            }
        }
    }

    /// Duplicates of everything this agent hands to the next one.
    fn handover_sockets(
        &self,
        lock: &NodeLock,
        admin: &OwnedFd,
        hbone: Option<&OwnedFd>,
    ) -> std::io::Result<Vec<(SocketId, OwnedFd)>> {
        let mut sockets = vec![
            (
                SocketId::node(Kind::Lock),
                lock.as_fd().try_clone_to_owned()?,
            ),
            (SocketId::node(Kind::Admin), admin.try_clone()?),
        ];
        if let Some(hbone) = hbone {
            sockets.push((SocketId::node(Kind::Hbone), hbone.try_clone()?));
        }
        sockets.extend(self.enroller.handover_sockets()?);
        Ok(sockets)
    }

    /// Brings enrollment and the wanted certificates in line with the current config.
    fn reconcile(&self) {
        let cfg = self.config.current();
        self.proxy.telemetry.refresh(&cfg, &self.settings.node);
        self.enroller.reconcile(&cfg);
        self.ingress.reconcile(&cfg);
        self.identities.set_wanted(identity::on_node(
            &cfg,
            &self.settings.node,
            self.identities.trust_domain(),
        ));
    }

    fn status(&self, cfg: &Config) -> serde_json::Value {
        let on_node = cfg
            .workloads()
            .iter()
            .filter(|w| w.node == self.settings.node)
            .count();
        json!({
            "node": self.settings.node,
            "role": "owner",
            "owner": self.owner,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "ready": self.ready.load(Ordering::Relaxed),
            "config": {
                "source": self.source.status(),
                "generation": self.config.generation(),
                "loading": self.config.loading(),
                "last_error": self.config.last_error(),
                "namespaces": cfg.namespaces().count(),
                "workloads": cfg.workloads().len(),
                "services": cfg.services().len(),
                "http_routes": cfg.routing().route_count(),
                "routing_warnings": cfg.routing().warnings,
                "peer_authentication_warnings": cfg.peer_authentications().warnings,
                "authorization_policy_warnings": cfg.authorizations().warnings,
                "secret_warnings": cfg.secrets().warnings,
            },
            "ebpf": self.enroller.with_datapath(|d| d.status()),
            "workloads": {
                "on_node": on_node,
                "enrolled": self.enroller.enrolled_count(),
                "failures": self.enroller.failures(),
            },
            "connections": {
                "outbound": self.proxy.counts(Direction::Outbound),
                "inbound": self.proxy.counts(Direction::Inbound),
                "awaiting_accept": self.proxy.pending_original_destinations(),
                "hbone": {
                    "opened": self.proxy.hbone.connections_opened(),
                    "open": self.proxy.hbone.connections_open(),
                },
            },
            "identity": self.identities.status(),
            "limits": {
                "descriptors": self.proxy.descriptors.status(),
                "per_workload": self.enroller.usage(),
            },
        })
    }
}

impl telemetry::server::Scrape for Node {
    fn scrape(&self) -> String {
        self.proxy.telemetry.exposition(&self.health())
    }

    /// Only an owner serves this endpoint (a standby binds nothing), so ready means: its
    /// first config applied, the source's whole view had once (the API server: every kind
    /// listed), and not handing the node over.
    fn readiness(&self) -> Result<(), String> {
        if self.ready.load(Ordering::Relaxed) {
            self.source.readiness()
        } else if self.config.generation() == 0 {
            Err("the first configuration is not applied yet".to_owned())
        } else {
            Err("handing the node over to the next agent".to_owned())
        }
    }
}

impl Node {
    /// The agent's health, for `nodemesh_*` metrics.
    fn health(&self) -> telemetry::Health {
        let direction = |direction, name| {
            let counts = self.proxy.counts(direction);
            health::DirectionHealth {
                direction: name,
                open: counts.open,
                total: counts.total,
                failed: counts.failed,
                rejected: counts.rejected,
            }
        };
        let workloads = self
            .enroller
            .usage()
            .into_iter()
            .map(|(workload, usage)| health::WorkloadHealth {
                workload,
                descriptors: usage.descriptors.descriptors,
                http_requests_in_flight: usage.http_requests_in_flight,
                rejected_outbound: usage.descriptors.rejected_outbound,
                rejected_inbound: usage.descriptors.rejected_inbound,
            })
            .collect();
        telemetry::Health {
            workloads_enrolled: self.enroller.enrolled_count(),
            workloads_failed: self.enroller.failures().len(),
            config_generation: self.config.generation(),
            config_rejected_loads: self.config.rejected_loads(),
            config_last_load_failed: self.config.last_error().is_some(),
            workloads,
            directions: vec![
                direction(Direction::Outbound, "outbound"),
                direction(Direction::Inbound, "inbound"),
            ],
            hbone_open: self.proxy.hbone.connections_open(),
            hbone_opened: self.proxy.hbone.connections_opened(),
            worker_connections: self.proxy.workers.serving(),
            ebpf_maps: self.enroller.with_datapath(|d| {
                d.status()
                    .maps
                    .into_iter()
                    .map(|m| (m.name, m.entries))
                    .collect()
            }),
            certificates: self.identities.expiries(),
            dns: self.enroller.dns_counts(),
        }
    }
}

fn services(cfg: &Config) -> serde_json::Value {
    let services: Vec<_> = cfg
        .services()
        .iter()
        .map(|s| {
            let endpoints: Vec<_> = cfg
                .endpoints(s)
                .map(|w| json!({ "workload": w.key(), "addresses": w.addresses, "node": w.node }))
                .collect();
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "cluster_ip": s.cluster_ip,
                "ports": s.ports,
                "endpoints": endpoints,
            })
        })
        .collect();
    json!(services)
}
