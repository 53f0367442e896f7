//! One bound Gateway port: accept TCP → (the TLS step, for servers that
//! need one) → serve HTTP into the mesh, or relay the bytes (TLS and TCP
//! servers: passed through or decrypted).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::tls::{Accepted, Alpn, PortTls};

use crate::proxy::budget::{Fds, FDS_PER_CONNECTION};
use crate::proxy::detect::{self, Detected};
use crate::proxy::{self, Pod, Proxy};
use crate::workers::Acceptor;

/// Longest wait for a client's first bytes (the HTTP/2 preface or not),
/// and for a TLS handshake.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 22;

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

/// Accepts until aborted; each connection gets its own task on a worker,
/// so stopping the listener (the port left the config) lets open
/// connections finish.
pub async fn serve(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    listener: TcpListener,
    tls: Arc<ArcSwapOption<PortTls>>,
) {
    let Some(listener) = Acceptor::polled(listener, &"ingress") else {
        return;
    };
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
        let mut fds = match pod.tenant.charge(FDS_PER_CONNECTION, None) {
            Ok(fds) => fds,
            Err(refused) => {
                log::debug!("ingress connection from {client} refused: {refused}");
                proxy::relay::reset(&stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let served = (proxy.clone(), pod.clone());
        // The TLS step as the config is when the connection comes.
        let tls = tls.load_full();
        proxy
            .workers
            .serve(stream, client, move |stream| async move {
                let (proxy, pod) = served;
                if let Err(e) = connection(proxy, pod, stream, client, tls, &mut fds).await {
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
    tls: Option<Arc<PortTls>>,
    fds: &mut Fds,
) -> Result<(), String> {
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    if let Some(tls) = tls {
        if starts_tls(&stream).await {
            // Boxed: TLS and its decrypted service would otherwise make
            // every gateway connection's future as large (`large_futures`).
            return Box::pin(terminate(proxy, pod, stream, (local, client), &tls, fds)).await;
        }
    }
    if serves_tcp(&proxy, local.port()) {
        let addresses = (local, client);
        // Boxed too: a TCP relay's 9.3 KiB, which every HTTP connection's
        // future would hold otherwise.
        let relay = proxy::relay_gateway(proxy, pod, stream, &[], addresses, None, None, fds);
        return Box::pin(relay).await;
    }
    let detected = detect::sniff(&stream, FIRST_BYTES_TIMEOUT, detect::classify_declared).await;
    let Some(detected) = detected else {
        return Err("closed or silent before a request".into());
    };
    let http2 = detected == Detected::Http2;
    proxy::serve_gateway(proxy, pod, stream, (local, client), http2, None).await
}

/// Whether the client's first byte opens a TLS handshake: a port may mix
/// TLS servers and plaintext ones (`httpsRedirect` on its HTTP server).
async fn starts_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.peek(&mut first)).await;
    matches!(peeked, Ok(Ok(1))) && first[0] == TLS_HANDSHAKE
}

/// The TLS step, then HTTP over the terminated stream at the chosen server.
async fn terminate(
    proxy: Arc<Proxy>,
    pod: Arc<Pod>,
    stream: TcpStream,
    addresses: (SocketAddr, SocketAddr),
    tls: &PortTls,
    fds: &mut Fds,
) -> Result<(), String> {
    let accepted = tls.acceptor.accept(stream, FIRST_BYTES_TIMEOUT).await;
    match accepted.map_err(|e| e.to_string())? {
        Accepted::Terminated(t) => {
            let server = tls.servers[t.server].clone();
            let Some(alpn) = t.alpn else {
                // A TLS server: the decrypted bytes are relayed.
                let (at, sni) = (Some(&*server), t.sni.as_deref());
                let relay =
                    proxy::relay_gateway(proxy, pod, t.stream, &[], addresses, at, sni, fds);
                return Box::pin(relay).await;
            };
            let http2 = alpn == Alpn::H2;
            let tls = proxy::GatewayTls {
                server,
                client_cert: t.xfcc.and_then(|x| HeaderValue::try_from(x).ok()),
            };
            proxy::serve_gateway(proxy, pod, t.stream, addresses, http2, Some(tls)).await
        }
        Accepted::Passthrough {
            stream,
            server,
            sni,
        } => {
            let (head, stream) = stream.into_parts();
            let at = Some(&*tls.servers[server]);
            let sni = sni.as_deref();
            proxy::relay_gateway(proxy, pod, stream, &head, addresses, at, sni, fds).await
        }
    }
}

/// Whether `port` is a TCP server's: its connections are relayed as bytes.
fn serves_tcp(proxy: &Proxy, port: u16) -> bool {
    let cfg = proxy.config.current();
    let no_labels = Default::default();
    let labels = cfg.node(&proxy.node).map_or(&no_labels, |n| &n.labels);
    let ingress = cfg.routing().ingress();
    ingress.select_l4(labels, port, None, None).is_some()
}
