//! Connections to a workload: sk_lookup hands the agent the SYN, so the
//! accepted socket's local address is what the client asked for.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::budget::Fds;
use super::relay::{self, Transferred};
use super::{peer, Direction, Pod, Proxy, AGENT_PORTS};

/// Serves one inbound connection; `fds` (its own and its delivery's) are
/// charged to `pod` on behalf of the caller.
pub async fn handle(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    client: TcpStream,
    peer: SocketAddr,
    mut fds: Fds,
) {
    let (proxy, pod) = (&*proxy, &*pod);
    let Ok(app) = client.local_addr() else {
        return;
    };
    // Only SYNs steered by sk_lookup belong here. Anything else (a workload
    // dialling the listener itself, or an agent port) would make the agent
    // deliver to itself in a loop.
    if app.ip().is_loopback() || AGENT_PORTS.contains(&app.port()) {
        log::warn!(
            "{}: refused inbound connection to {app} from {peer}",
            pod.key
        );
        relay::reset(&client);
        return;
    }
    let mut tracked = proxy.track(Direction::Inbound, peer, app);
    tracked.record.source_workload = proxy
        .config
        .current()
        .workload_by_address(peer.ip())
        .map(|w| w.key());
    tracked.record.destination_workload = Some(pod.key.clone());
    tracked.record.upstream = Some(app);
    let outcome = match fds.split_one() {
        Some(fd) => deliver(proxy, pod, &client, peer, app, fd).await,
        None => Err("no descriptor left for the delivery".to_owned()),
    };
    if outcome.is_err() {
        relay::reset(&client);
    }
    tracked.finish(outcome);
}

async fn deliver(
    proxy: &Proxy,
    pod: &Pod,
    client: &TcpStream,
    caller: SocketAddr,
    app: SocketAddr,
    fd: Fds,
) -> Result<Transferred, String> {
    // Today the hop from another node is plain TCP from the caller's own
    // namespace, so the peer address is the caller's.
    let server = peer::deliver(
        pod,
        app,
        caller.ip(),
        &proxy.deliveries,
        proxy.settings.connect_timeout,
        fd,
    )
    .await
    .map_err(|e| format!("delivering to {app}: {e}"))?;
    relay::relay(client, &server, proxy.settings.idle_timeout)
        .await
        .map_err(|e| e.to_string())
}
