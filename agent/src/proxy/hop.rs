//! Which way a connection leaves the proxy for a destination address:
//! Istio's automatic mutual TLS, with DestinationRule `tls` able to force
//! it either way.
//!
//! - An enrolled workload of this node: delivered directly (nothing crosses
//!   a wire), and treated at the destination as if it had come over mutual
//!   TLS with the caller's identity.
//! - An enrolled workload of another node: HBONE to that node's agent.
//! - Either of them, when its PeerAuthentication mode is DISABLE or a
//!   DestinationRule says `DISABLE`: plaintext from the caller's namespace.
//! - Anything else: plaintext, as before the mesh, unless a DestinationRule
//!   says `ISTIO_MUTUAL` (then the connection fails: nothing falls back).

use super::Proxy;
use crate::config::{Config, Workload};
use crate::routing::UpstreamTls;
use crate::security::MtlsMode;
use crate::transport::{Destination, HBONE_PORT};
use std::net::SocketAddr;

pub enum Hop {
    Local,
    Mesh(Destination),
    Plain,
}

/// [`Hop::name`]s.
const LOCAL: &str = "local";
const HBONE: &str = "hbone";
const PLAINTEXT: &str = "plaintext";

impl Hop {
    /// As `nodemesh connections` names it.
    pub fn name(&self) -> &'static str {
        match self {
            Hop::Local => LOCAL,
            Hop::Mesh(_) => HBONE,
            Hop::Plain => PLAINTEXT,
        }
    }
}

/// A [`Hop`] that borrows the destination node's name from the config
/// snapshot: what a request on a pooled connection needs (the hop's name)
/// without copying the name for every request.
pub enum HopIn<'c> {
    Local,
    Mesh {
        node: &'c str,
        node_addr: SocketAddr,
        to: SocketAddr,
    },
    Plain,
}

impl HopIn<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            HopIn::Local => LOCAL,
            HopIn::Mesh { .. } => HBONE,
            HopIn::Plain => PLAINTEXT,
        }
    }

    /// The hop, owned (to open a connection over it).
    pub fn to_hop(&self) -> Hop {
        match *self {
            HopIn::Local => Hop::Local,
            HopIn::Mesh {
                node,
                node_addr,
                to,
            } => Hop::Mesh(Destination {
                node: node.to_owned(),
                node_addr,
                to,
            }),
            HopIn::Plain => Hop::Plain,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HopError {
    #[error(
        "{to} is workload {workload} on node {node}, which has no address: \
         add a Node document with an InternalIP for it"
    )]
    NodeWithoutAddress {
        to: SocketAddr,
        workload: String,
        node: String,
    },
    #[error("{to} is workload {workload} of this node, which is not enrolled (yet)")]
    NotEnrolledHere { to: SocketAddr, workload: String },
    #[error("a DestinationRule requires ISTIO_MUTUAL, but {to} is not a workload in the mesh")]
    MutualOutsideMesh { to: SocketAddr },
}

/// The hop to `to`, under the DestinationRule `tls` setting that applies.
pub fn choose(
    proxy: &Proxy,
    cfg: &Config,
    to: SocketAddr,
    tls: UpstreamTls,
) -> Result<Hop, HopError> {
    choose_in(proxy, cfg, to, tls).map(|hop| hop.to_hop())
}

/// [`choose`], borrowing from the snapshot `cfg`.
pub fn choose_in<'c>(
    proxy: &Proxy,
    cfg: &'c Config,
    to: SocketAddr,
    tls: UpstreamTls,
) -> Result<HopIn<'c>, HopError> {
    let in_mesh = cfg
        .workload_by_address(to.ip())
        .filter(|w| cfg.is_enrolled(w));
    let Some(workload) = in_mesh else {
        return match tls {
            UpstreamTls::IstioMutual => Err(HopError::MutualOutsideMesh { to }),
            _ => Ok(HopIn::Plain),
        };
    };
    if !is_mutual(cfg, workload, to.port(), tls) {
        // Also on this node: the destination then sees a plaintext caller.
        return Ok(HopIn::Plain);
    }
    if workload.node == proxy.node {
        // Nothing to encrypt: the destination side applies the caller's
        // identity as if it had come over mutual TLS.
        return match proxy.local_pod(to.ip()) {
            Some(_) => Ok(HopIn::Local),
            None => Err(HopError::NotEnrolledHere {
                to,
                workload: workload.key(),
            }),
        };
    }
    let address = cfg
        .node(&workload.node)
        .and_then(|node| node.address_for(to.ip()))
        .ok_or_else(|| HopError::NodeWithoutAddress {
            to,
            workload: workload.key(),
            node: workload.node.clone(),
        })?;
    Ok(HopIn::Mesh {
        node: &workload.node,
        node_addr: SocketAddr::new(address, HBONE_PORT),
        to,
    })
}

/// Whether a call to the mesh `workload` on `port` goes over mutual TLS
/// (so that the destination knows the caller's identity). Automatic mTLS:
/// yes unless its own PeerAuthentication for the port is DISABLE.
pub fn is_mutual(cfg: &Config, workload: &Workload, port: u16, tls: UpstreamTls) -> bool {
    match tls {
        UpstreamTls::IstioMutual => true,
        UpstreamTls::Disable => false,
        UpstreamTls::Auto => {
            cfg.peer_authentications().mtls_mode(workload, port).mode != MtlsMode::Disable
        }
    }
}
