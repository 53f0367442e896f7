//! The daemon: loads the data path, keeps enrollment in line with the config,
//! serves the admin socket, and stops on SIGTERM/SIGINT.
//!
//! Stopping (or crashing) leaves the eBPF programs attached on purpose:
//! enrolled workloads fail closed (outbound and inbound connects are
//! refused) instead of bypassing the mesh, and the next agent picks the
//! pinned state up. `nodemesh uninstall` removes the node's data path.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
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
use crate::nofile::{self, Nofile};
use crate::proxy::budget::Descriptors;
use crate::proxy::{self, Direction, Proxy};
use crate::telemetry::{self, health};
use crate::sources::{self, Source};
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
}

struct Node {
    settings: Settings,
    started: Instant,
    config: Arc<ConfigStore>,
    /// Fills `config`; `nodemesh status` shows its state.
    source: sources::Running,
    proxy: Arc<Proxy>,
    /// The node's workload certificates, kept in line with the config.
    identities: Arc<Identities>,
    enroller: Enroller,
    /// The first load has ended and enrollment follows the config.
    ready: AtomicBool,
}

/// Accepts other agents' HBONE connections, when the node has the
/// credential to present to them.
async fn serve_hbone(
    proxy: &Arc<Proxy>,
    identities: &Arc<Identities>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if identities.node_certified_key().is_none() {
        log::warn!(
            "no --node-credential: other nodes cannot reach this node's workloads over mutual TLS"
        );
        return Ok(None);
    }
    // Dual-stack where the node has IPv6, else IPv4 only.
    let port = transport::HBONE_PORT;
    let listener = match tokio::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(listener) => listener,
        Err(_) => tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .with_context(|| format!("listening for HBONE on port {port}"))?,
    };
    let serving = transport::server::serve(listener, identities.clone(), proxy.clone());
    Ok(Some(tokio::spawn(serving)))
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
    // The first load runs on the loader's thread while the data path is set up; until it
    // ends, nothing is enrolled and the admin socket reports the node as not ready.
    let config = Arc::new(ConfigStore::unloaded());
    let source = sources::start(
        settings.source.clone(),
        settings.load.clone(),
        config.clone(),
    )
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
    let proxy = Arc::new(Proxy::new(
        settings.node.clone(),
        config.clone(),
        identities.clone(),
        orig_dst,
        deliveries,
        settings.proxy,
        Arc::new(descriptors),
    ));
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
    );
    let admin = admin::bind(&settings.admin_socket)?;
    if !identities.has_ca() {
        log::warn!(
            "no --ca-address: workloads get no certificates, so mesh traffic to and from \
             other nodes will be refused"
        );
    }
    let hbone = serve_hbone(&proxy, &identities).await?;
    let metrics = match settings.metrics_addr {
        Some(addr) => Some(telemetry::server::bind(addr).await?),
        None => None,
    };
    let node = Arc::new(Node {
        settings,
        started: Instant::now(),
        config: config.clone(),
        source,
        proxy,
        identities,
        enroller,
        ready: AtomicBool::new(false),
    });
    tokio::spawn(admin::serve(admin, node.clone()));
    let metrics =
        metrics.map(|listener| tokio::spawn(telemetry::server::serve(listener, node.clone())));
    let trimmer = tokio::spawn(crate::memory::return_freed_memory());

    let loaded = tokio::select! {
        () = config.first_load() => true,
        () = &mut stop => false,
    };
    let reconciler = loaded.then(|| {
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
    if loaded {
        stop.await;
    }
    if let Some(reconciler) = reconciler {
        reconciler.abort();
    }
    trimmer.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Some(hbone) = hbone {
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
            Query::Explain(ask) => self
                .proxy
                .explain(&cfg, &ask)
                .unwrap_or_else(|e| json!({ "error": e })),
            Query::Policies(workload) => self
                .proxy
                .policies(&cfg, workload.as_deref())
                .unwrap_or_else(|e| json!({ "error": e })),
        }
    }
}

impl Node {
    /// Brings enrollment and the wanted certificates in line with the current config.
    fn reconcile(&self) {
        let cfg = self.config.current();
        self.enroller.reconcile(&cfg);
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
            ebpf_maps: self.enroller.with_datapath(|d| {
                d.status()
                    .maps
                    .into_iter()
                    .map(|m| (m.name, m.entries))
                    .collect()
            }),
            certificates: self.identities.expiries(),
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
