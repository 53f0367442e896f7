//! `nodemesh ca`: the mesh certificate authority.
//!
//! It signs workload certificates for agents, which authenticate with a node
//! credential (`nodemesh ca issue-node`), and only for identities that its
//! own view of the configuration (the same directory the agents read) places
//! on the asking node: a compromised node cannot mint another node's
//! identities. It signs with a root it creates in its state directory, or
//! with an operator's intermediate in Istio's plug-in CA layout.

mod authority;
mod csr;
pub mod protocol;
mod server;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

pub use authority::{
    write_node_credential, Authority, AuthorityError, Credential, Source, NODE_CERT, NODE_KEY,
    PLUGIN_CA_CERT, PLUGIN_CA_KEY, PLUGIN_CERT_CHAIN, PLUGIN_ROOT_CERT, ROOT_CERT, ROOT_KEY,
};
pub use csr::Refusal;
pub use server::{CaServer, ServerError};

use crate::config::{ConfigStore, LoadOptions};
use crate::sources;

pub struct Settings {
    pub source: Source,
    pub listen: SocketAddr,
    /// Where the CA learns which workloads run on which node.
    pub config: sources::Source,
    pub trust_domain: String,
    pub max_cert_lifetime: Duration,
}

/// Runs the CA until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let authority = Authority::load(&settings.source, &settings.trust_domain)
        .context("loading the CA's signing certificate")?;
    let config = Arc::new(ConfigStore::unloaded());
    let source = sources::start(settings.config, LoadOptions::default(), config.clone()).await?;
    config.first_load().await;
    if let Some(error) = config.last_error() {
        log::error!("configuration rejected, signing nothing until it is fixed:\n{error}");
    }
    let server = CaServer::new(authority, config, settings.max_cert_lifetime)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    log::info!(
        "mesh CA for trust domain {} listening on {}",
        settings.trust_domain,
        settings.listen
    );
    let serving = tokio::spawn(server.serve(listener));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    serving.abort();
    drop(source);
    log::info!("mesh CA stopped");
    Ok(())
}

/// `nodemesh ca issue-node`: writes `NODE`'s credential into `out`.
pub fn issue_node(
    source: &Source,
    trust_domain: &str,
    node: &str,
    lifetime: Duration,
    out: &std::path::Path,
) -> anyhow::Result<Credential> {
    let authority =
        Authority::load(source, trust_domain).context("loading the CA's signing certificate")?;
    let credential = authority.issue_node(node, lifetime)?;
    write_node_credential(out, &credential, &authority.roots_pem())?;
    Ok(credential)
}
