//! One bound Gateway port: accept TCP → (the TLS step, for servers that
//! need one) → serve HTTP into the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::proxy::budget::FDS_PER_CONNECTION;
use crate::proxy::detect::{self, Detected};
use crate::proxy::{self, Pod, Proxy};

/// Longest wait for a client's first bytes (the HTTP/2 preface or not).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening socket on `addr`; fails when the port is taken on the host.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts until aborted; each connection gets its own task, so stopping
/// the listener (the port left the config) lets open connections finish.
pub async fn serve(proxy: Arc<Proxy>, pod: Arc<Pod>, listener: TcpListener) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("ingress listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The ingress's share of descriptors bounds its connections.
        let fds = match pod.tenant.charge(FDS_PER_CONNECTION, None) {
            Ok(fds) => fds,
            Err(refused) => {
                log::debug!("ingress connection from {client} refused: {refused}");
                proxy::relay::reset(&stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (proxy, pod) = (proxy.clone(), pod.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(proxy, pod, stream, client).await {
                log::debug!("ingress connection from {client}: {e}");
            }
            drop(fds);
        });
    }
}

/// One client connection.
async fn connection(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    stream: TcpStream,
    client: SocketAddr,
) -> Result<(), String> {
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let detected = detect::sniff(&stream, FIRST_BYTES_TIMEOUT, detect::classify_declared).await;
    let Some(detected) = detected else {
        return Err("closed or silent before a request".into());
    };
    let http2 = detected == Detected::Http2;
    proxy::serve_gateway(proxy, pod, stream, (local, client), http2).await
}
