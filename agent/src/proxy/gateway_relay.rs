//! Connections a Gateway's TLS PASSTHROUGH or TCP server relays: the rule
//! their SNI (or port) selects picks a destination, and the bytes leave as
//! the ingress over the workloads' outbound L4 path (HBONE to another node,
//! in process to a pod of this one), with its idle timeout, descriptor
//! budget and telemetry.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::budget::Fds;
use super::{l7, outbound, relay, Direction, Pod, Proxy};
use crate::config::Config;
use crate::routing::ingress::ServerRef;

/// Where a relayed connection goes.
struct Chosen {
    /// The Service address (its cluster IP and port), as telemetry keys it.
    service_addr: SocketAddr,
    service: String,
    upstream: SocketAddr,
    workload: Option<String>,
}

/// Relays `client` (which reached `local` from `peer`) by the rules of the
/// server `at` (a PASSTHROUGH one; `None`: the port's TCP server). `head`
/// was read from the client already; `sni` is its ClientHello's.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    client: TcpStream,
    head: &[u8],
    (local, peer): (SocketAddr, SocketAddr),
    at: Option<&ServerRef>,
    sni: Option<&str>,
    fds: &mut Fds,
) -> Result<(), String> {
    let chosen = choose(&proxy, &proxy.config.current(), local, at, sni);
    let chosen = match chosen {
        Ok(chosen) => chosen,
        Err(e) => {
            relay::reset(&client);
            return Err(e);
        }
    };
    let mut tracked = proxy.track(Direction::Outbound, peer, chosen.service_addr);
    tracked.caller = pod.address_for(chosen.upstream.ip());
    let record = &mut tracked.record;
    record.source_workload = Some(pod.key.clone());
    record.source_identity = Some(pod.identity.to_string());
    record.service = Some(chosen.service);
    record.upstream = Some(chosen.upstream);
    record.destination_workload = chosen.workload;
    let outcome = outbound::relay_chosen(&proxy, &pod, client, head, record, fds).await;
    let failed = outcome.as_ref().err().map(ToString::to_string);
    tracked.finish(outcome);
    failed.map_or(Ok(()), Err)
}

/// The rule's destination, and one of its endpoints (round robin).
fn choose(
    proxy: &Proxy,
    cfg: &Config,
    local: SocketAddr,
    at: Option<&ServerRef>,
    sni: Option<&str>,
) -> Result<Chosen, String> {
    let no_labels = Default::default();
    let labels = cfg.node(&proxy.node).map_or(&no_labels, |n| &n.labels);
    let ingress = cfg.routing().ingress();
    let port = local.port();
    let selected = ingress
        .select_l4(labels, port, at, sni)
        .ok_or_else(|| format!("no TCP or TLS server on port {port}"))?;
    let route = selected.routes.ok_or_else(|| {
        format!(
            "no tls or tcp rule at Gateway {} ({}) matches SNI {sni:?}",
            selected.gateway.key, selected.server.field
        )
    })?;
    let destination = l7::pick_weighted(route.destinations())
        .map(|d| &d.destination)
        .ok_or_else(|| format!("{} {} has no destination", route.origin, route.field()))?;
    let service = cfg
        .service_by_key(&destination.service)
        .ok_or_else(|| format!("Service {} does not exist", destination.service))?;
    let service_port = destination
        .port
        .ok_or_else(|| format!("{} {}: no destination port", route.origin, route.field()))?;
    let target = l7::resolve(cfg, destination, service_port, local.is_ipv4())
        .ok_or_else(|| format!("Service {} has no port {service_port}", service.key()))?;
    let key = service.key();
    let upstream = proxy
        .next_index(&key, target.endpoints.len())
        .map(|i| target.endpoints[i])
        .ok_or_else(|| format!("Service {key} has no endpoints"))?;
    let ip = service.cluster_ip.unwrap_or(upstream.ip());
    Ok(Chosen {
        service_addr: SocketAddr::new(ip, service_port),
        workload: cfg.workload_by_address(upstream.ip()).map(|w| w.key()),
        service: key,
        upstream,
    })
}
