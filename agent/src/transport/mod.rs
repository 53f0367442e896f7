//! Agent-to-agent transport: HBONE, as Istio ambient's ztunnel speaks it.
//!
//! A connection between two enrolled workloads on different nodes becomes
//! one HTTP/2 `CONNECT` stream to the original destination `ip:port`, on a
//! mutual-TLS connection between the two agents (port 15008, TLS 1.3, ALPN
//! `h2`) that carries the source workload's certificate. Connections are
//! pooled per (source identity, destination node): a new client connection
//! costs a stream, not a TCP and TLS handshake.
//!
//! - `tls`: certificates presented and verified on each side.
//! - `pool`: the caller's side, connections shared by streams.
//! - `server`: the destination's side, which authenticates the caller and
//!   hands each admitted stream to the proxy's inbound path.
//! - `resume`: streams that survive a hand-over of the caller's agent.
//! - `tunnel`: one stream as a byte stream, closed without needless resets.
//!
//! The caller's pod address travels in `Forwarded: for=` (RFC 7239), which
//! ztunnel also reads; the destination accepts it only for an address of a
//! workload with the certificate's identity.

mod pool;
pub mod resume;
pub mod server;
pub(crate) mod tls;
mod tunnel;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use pool::Pool;
pub use tunnel::Tunnel;

use crate::identity::SpiffeId;

/// The port agents accept HBONE on (ztunnel's).
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 flow-control windows of an HBONE connection, both ways. A stream's
/// window of 1 MiB lets a bulk transfer run on while the receiver's window
/// updates are on their way (+22 % bulk TCP over 256 KiB in `cargo xtask
/// bench --focus`); the connection's, shared by its streams, still bounds
/// what one peer can make an agent buffer.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// Streams one HBONE connection carries at once. Each holds descriptors at
/// the destination, charged to the destination workload on behalf of the
/// caller; the caller opens another connection beyond.
const MAX_STREAMS: u32 = 1024;

/// Request header carrying the caller's address, e.g. `for=10.1.1.11` or
/// `for="[fd00::1]"`.
const FORWARDED: &str = "forwarded";

/// Where a stream goes: the workload's address, behind the agent of `node`.
#[derive(Debug, Clone)]
pub struct Destination {
    pub node: String,
    /// The node's address and HBONE port.
    pub node_addr: SocketAddr,
    /// What the client asked for (a pod `ip:port`).
    pub to: SocketAddr,
}

/// Who opens a stream: the source workload's identity and address.
#[derive(Debug, Clone)]
pub struct Source {
    pub identity: SpiffeId,
    pub address: IpAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no certificate for {0} yet (is the mesh CA reachable? see `nodemesh certs`)")]
    NoCertificate(SpiffeId),
    #[error("connecting to node {node} at {addr}: {source}")]
    Connect {
        node: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("mutual TLS with node {node}: {source}")]
    Tls { node: String, source: io::Error },
    #[error("HTTP/2 with node {node}: {source}")]
    Http2 { node: String, source: hyper::Error },
    #[error("node {node} refused the stream to {to}: {status} {reason}")]
    Refused {
        node: String,
        to: SocketAddr,
        status: http::StatusCode,
        reason: String,
    },
    #[error("node {node} did not answer within {timeout:?}")]
    Timeout { node: String, timeout: Duration },
}

/// `for=` value of the `Forwarded` header for `ip`.
fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The address in a `Forwarded` header's first `for=` element.
fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    let pair = first.split(';').find_map(|p| {
        p.trim()
            .strip_prefix("for=")
            .or_else(|| p.trim().strip_prefix("For="))
    })?;
    let unquoted = pair.trim_matches('"');
    let host = unquoted
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']').map(|(ip, _)| ip))
        .unwrap_or(unquoted);
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips_both_families() {
        for ip in ["10.1.1.11", "fd00::11"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
        }
        let many = "for=10.0.0.1;proto=https, for=10.0.0.2";
        assert_eq!(parse_forwarded_for(many), "10.0.0.1".parse().ok());
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for("proto=http"), None);
    }
}
