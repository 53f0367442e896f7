//! Connections a workload opens: recover where it wanted to go, pick the
//! endpoint (a Service's cluster IP is load-balanced over its workloads), and
//! connect on its behalf.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::relay::{self, Transferred};
use super::{peer, ConnectionRecord, Direction, Pod, Proxy};
use crate::config::{Config, Protocol};

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<Pod>, client: TcpStream, peer: SocketAddr) {
    let (proxy, pod) = (&*proxy, &*pod);
    let Some(orig) = proxy.orig_dst.take(pod.netns.cookie(), peer) else {
        // Only a client that dialled the listener itself gets here.
        log::warn!(
            "{}: connection from {peer} has no recorded destination; refused",
            pod.key
        );
        relay::reset(&client);
        return;
    };
    let mut tracked = proxy.track(Direction::Outbound, peer, orig);
    tracked.record.source_workload = Some(pod.key.clone());
    let outcome = forward(proxy, pod, &client, &mut tracked.record).await;
    if outcome.is_err() {
        relay::reset(&client);
    }
    tracked.finish(outcome);
}

async fn forward(
    proxy: &Proxy,
    pod: &Pod,
    client: &TcpStream,
    record: &mut ConnectionRecord,
) -> Result<Transferred, String> {
    let upstream = destination(proxy, &proxy.config.current(), record)?;
    record.upstream = Some(upstream);
    let server = peer::connect(pod, upstream, proxy.settings.connect_timeout)
        .await
        .map_err(|e| format!("connecting to {upstream}: {e}"))?;
    relay::relay(client, &server, proxy.settings.idle_timeout)
        .await
        .map_err(|e| e.to_string())
}

/// Where the connection really goes; fills in the service and workload.
fn destination(
    proxy: &Proxy,
    cfg: &Config,
    record: &mut ConnectionRecord,
) -> Result<SocketAddr, String> {
    let orig = record.original_destination;
    let Some(service) = cfg.service_by_cluster_ip(orig.ip()) else {
        record.destination_workload = cfg.workload_by_address(orig.ip()).map(|w| w.key());
        return Ok(orig);
    };
    let key = service.key();
    let port = service
        .port(orig.port(), Protocol::Tcp)
        .ok_or_else(|| format!("service {key} has no port {}", orig.port()))?;
    let endpoints: Vec<_> = cfg.endpoints(service).collect();
    let chosen = proxy
        .next_index(&key, endpoints.len())
        .map(|i| endpoints[i])
        .ok_or_else(|| format!("service {key} has no endpoints"))?;
    let ip = chosen
        .addresses
        .iter()
        .find(|ip| ip.is_ipv4() == orig.is_ipv4())
        .or(chosen.addresses.first())
        .copied()
        .ok_or_else(|| format!("workload {} has no address", chosen.key()))?;
    record.service = Some(key);
    record.destination_workload = Some(chosen.key());
    Ok(SocketAddr::new(ip, port.target_port))
}
