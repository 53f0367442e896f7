//! Connections a workload opens: recover where it wanted to go, then either
//! route its HTTP requests one by one (L7) or pick one endpoint for the whole
//! connection and relay bytes (L4). A Service's cluster IP is load-balanced
//! over its workloads; anything else goes where it was addressed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::detect::{self, Declared, Detected};
use super::relay::{self, Transferred};
use super::{l7, peer, ConnectionRecord, Direction, Pod, Proxy};
use crate::config::{Config, Protocol};

pub async fn handle(proxy: Arc<Proxy>, pod: Arc<Pod>, client: TcpStream, peer: SocketAddr) {
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
    let outcome = dispatch(&proxy, &pod, client, &mut tracked.record).await;
    tracked.finish(outcome);
}

/// Chooses L7 or L4 for the connection and serves it.
async fn dispatch(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    client: TcpStream,
    record: &mut ConnectionRecord,
) -> Result<Transferred, String> {
    let orig = record.original_destination;
    let declared = {
        let config = proxy.config.current();
        let service = config.service_by_cluster_ip(orig.ip());
        if let Some(service) = service {
            record.service = Some(service.key());
        }
        service
            .and_then(|s| s.port(orig.port(), Protocol::Tcp))
            .map(detect::declared)
    };
    match declared {
        // Not a Service (a pod IP, an outside address) or declared opaque.
        None | Some(Declared::Opaque) => l4(proxy, pod, client, record).await,
        // The client speaks first, and whatever it says is parsed as HTTP:
        // a declared HTTP port is never relayed opaque (that would skip L7
        // policy). A client silent for the header read timeout is closed.
        Some(Declared::Http) => {
            let wait = proxy.settings.http.header_read_timeout;
            match detect::sniff(&client, wait, detect::classify_declared).await {
                Some(http) => serve_l7(proxy, pod, client, record, http).await,
                None => Err(format!("no request within {wait:?}")),
            }
        }
        Some(Declared::Unknown) => detect_or_relay(proxy, pod, client, record).await,
    }
}

/// On an undeclared port, a client that has not spoken within this grace is
/// probably waiting for the server to speak first.
const CLIENT_FIRST_GRACE: Duration = Duration::from_millis(10);

/// On an undeclared port a client normally speaks at once and is detected
/// with no cost. If it is silent past a short grace, the endpoint is dialled
/// while its first bytes are still awaited: a server that speaks first
/// (SMTP, MySQL...) starts the relay at once; if the client then speaks
/// HTTP, the spare connection is dropped and the requests are routed.
async fn detect_or_relay(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    client: TcpStream,
    record: &mut ConnectionRecord,
) -> Result<Transferred, String> {
    // `peek`, not `readable()`: readiness may be reported spuriously.
    let spoke = tokio::time::timeout(CLIENT_FIRST_GRACE, client.peek(&mut [0u8; 1])).await;
    if let Ok(Ok(_)) = spoke {
        let wait = proxy.settings.protocol_detection_timeout;
        return match detect::sniff(&client, wait, detect::classify).await {
            None | Some(Detected::Opaque) => l4(proxy, pod, client, record).await,
            Some(http) => serve_l7(proxy, pod, client, record, http).await,
        };
    }
    let (detected, connected) = {
        let sniffing = async {
            let wait = proxy.settings.protocol_detection_timeout;
            let detected = detect::sniff(&client, wait, detect::classify).await;
            detected.unwrap_or(Detected::Opaque)
        };
        tokio::pin!(sniffing);
        let connecting = connect_as(proxy, pod, record.clone());
        tokio::pin!(connecting);
        let first = tokio::select! {
            detected = &mut sniffing => Err(detected),
            connected = &mut connecting => Ok(connected),
        };
        match first {
            Err(Detected::Opaque) => (Detected::Opaque, Some(connecting.await)),
            Err(http) => (http, None),
            Ok((endpoint, Ok(server))) => {
                let mut first = [0u8; 1];
                let client_spoke = tokio::select! {
                    detected = &mut sniffing => Some(detected),
                    _ = server.peek(&mut first) => None,
                };
                match client_spoke {
                    Some(Detected::Opaque) | None => {
                        (Detected::Opaque, Some((endpoint, Ok(server))))
                    }
                    Some(http) => (http, None),
                }
            }
            Ok(failed) => (Detected::Opaque, Some(failed)),
        }
    };
    match connected {
        None => serve_l7(proxy, pod, client, record, detected).await,
        Some((endpoint, server)) => {
            *record = endpoint;
            relay_connected(proxy, &client, server).await
        }
    }
}

/// [`connect`] on a copy of the record, so it can run while detection
/// decides whether the connection is needed at all.
async fn connect_as(
    proxy: &Proxy,
    pod: &Pod,
    mut record: ConnectionRecord,
) -> (ConnectionRecord, Result<TcpStream, String>) {
    let server = connect(proxy, pod, &mut record).await;
    (record, server)
}

async fn serve_l7(
    proxy: &Arc<Proxy>,
    pod: &Arc<Pod>,
    client: TcpStream,
    record: &mut ConnectionRecord,
    detected: Detected,
) -> Result<Transferred, String> {
    let http2 = detected == Detected::Http2;
    record.protocol = if http2 { "h2" } else { "http/1.1" };
    let orig = record.original_destination;
    l7::serve(proxy.clone(), pod.clone(), client, orig, http2).await?;
    Ok(Transferred::default())
}

/// Relays the whole connection to one endpoint.
async fn l4(
    proxy: &Proxy,
    pod: &Pod,
    client: TcpStream,
    record: &mut ConnectionRecord,
) -> Result<Transferred, String> {
    let server = connect(proxy, pod, record).await;
    relay_connected(proxy, &client, server).await
}

/// Relays to `server`, or resets the client if connecting failed.
async fn relay_connected(
    proxy: &Proxy,
    client: &TcpStream,
    server: Result<TcpStream, String>,
) -> Result<Transferred, String> {
    match server {
        Ok(server) => relay_to(proxy, client, &server).await,
        Err(e) => {
            relay::reset(client);
            Err(e)
        }
    }
}

async fn relay_to(
    proxy: &Proxy,
    client: &TcpStream,
    server: &TcpStream,
) -> Result<Transferred, String> {
    let outcome = relay::relay(client, server, proxy.settings.idle_timeout)
        .await
        .map_err(|e| e.to_string());
    if outcome.is_err() {
        relay::reset(client);
    }
    outcome
}

/// Picks the endpoint (filling in the record) and connects to it.
async fn connect(
    proxy: &Proxy,
    pod: &Pod,
    record: &mut ConnectionRecord,
) -> Result<TcpStream, String> {
    let upstream = destination(proxy, &proxy.config.current(), record)?;
    record.upstream = Some(upstream);
    peer::connect(pod, upstream, proxy.settings.connect_timeout)
        .await
        .map_err(|e| format!("connecting to {upstream}: {e}"))
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
