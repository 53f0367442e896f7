//! The hops out of the proxy: to a destination on behalf of a workload, and
//! from the proxy into the workload it protects.
//!
//! `connect` is the agent-to-agent hop. Today it is plain TCP from the source
//! workload's own namespace and address, captured by the destination node's
//! agent; mutual TLS with workload identity replaces this one function.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nodemesh_common::INBOUND_PASSTHROUGH_V4;
use tokio::net::{TcpSocket, TcpStream};

use super::Pod;

/// Connects to `to` as the workload `from` would.
pub async fn connect(from: &Pod, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_within(from.socket(to, None)?, to, timeout).await
}

/// Delivers an inbound connection to the application in `pod`, from the
/// passthrough address that sk_lookup lets through.
pub async fn deliver(pod: &Pod, app: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let source = app
        .is_ipv4()
        .then(|| SocketAddr::new(Ipv4Addr::from(INBOUND_PASSTHROUGH_V4).into(), 0));
    connect_within(pod.socket(app, source)?, app, timeout).await
}

async fn connect_within(
    socket: TcpSocket,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, socket.connect(to)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}
