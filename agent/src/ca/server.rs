//! The CA's HTTPS endpoint: TLS 1.3, node credentials required, one
//! [`SignRequest`] per POST, signed only for identities the configuration
//! places on the asking node.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::authority::Authority;
use super::csr::Refusal;
use super::protocol::{ErrorResponse, SignRequest, SignResponse, MAX_BODY_BYTES, SIGN_PATH};
use crate::config::ConfigStore;
use crate::identity::{self, x509, NodeId};

/// A TLS handshake must end within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this, whatever it does (agents make one request per connection).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

pub struct CaServer {
    authority: Authority,
    config: Arc<ConfigStore>,
    max_lifetime: Duration,
    tls: TlsAcceptor,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Authority(#[from] super::authority::AuthorityError),
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl CaServer {
    pub fn new(
        authority: Authority,
        config: Arc<ConfigStore>,
        max_lifetime: Duration,
    ) -> Result<Arc<Self>, ServerError> {
        let tls = |e: &dyn std::fmt::Display| ServerError::Tls(e.to_string());
        let own = authority.server_credential()?;
        let chain = x509::certs_from_pem(&own.chain_pem).map_err(|e| tls(&e))?;
        let key = PrivateKeyDer::from_pem_slice(own.key_pem.as_bytes()).map_err(|e| tls(&e))?;
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(authority.roots().iter().cloned());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), x509::provider())
                .build()
                .map_err(|e| tls(&e))?;
        let mut config_tls = ServerConfig::builder_with_provider(x509::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| tls(&e))?;
        config_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            authority,
            config,
            max_lifetime,
            tls: TlsAcceptor::from(Arc::new(config_tls)),
        }))
    }

    /// Serves until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    tokio::spawn(self.clone().connection(tcp, peer));
                }
                Err(e) => {
                    log::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                log::warn!("refused {peer}: TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                log::warn!("refused {peer}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        let node = match self.node_of(tls.get_ref().1.peer_certificates()) {
            Ok(node) => node,
            Err(reason) => {
                log::warn!("refused {peer}: {reason}");
                return;
            }
        };
        let service = service_fn(move |request| {
            let server = self.clone();
            let node = node.clone();
            async move { Ok::<_, Infallible>(server.answer(&node, request).await) }
        });
        let connection =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
    }

    /// The node a verified client certificate names.
    fn node_of(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> Result<NodeId, String> {
        let leaf = certs
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        let node = NodeId::from_cert(leaf)
            .map_err(|e| format!("the client certificate is not a node credential: {e}"))?;
        if node.trust_domain != self.authority.trust_domain() {
            return Err(format!(
                "{node} is not in trust domain {}",
                self.authority.trust_domain()
            ));
        }
        Ok(node)
    }

    async fn answer(&self, node: &NodeId, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::POST || request.uri().path() != SIGN_PATH {
            return error(
                StatusCode::NOT_FOUND,
                format!("only POST {SIGN_PATH} is served"),
            );
        }
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the request: {e}")),
        };
        let ask: SignRequest = match serde_json::from_slice(&body) {
            Ok(ask) => ask,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
        };
        let cfg = self.config.current();
        let signed = self.authority.sign_workload(
            &ask.csr,
            Duration::from_secs(ask.lifetime_seconds),
            self.max_lifetime,
            &node.node,
            || identity::on_node(&cfg, &node.node, self.authority.trust_domain()),
        );
        match signed {
            Ok((id, chain)) => {
                log::info!("signed {id} for node {}", node.node);
                let answer = SignResponse {
                    chain,
                    roots: self.authority.roots_pem(),
                };
                json(StatusCode::OK, &answer)
            }
            Err(refusal) => {
                log::warn!(
                    "refused to sign for node {} (config generation {}): {refusal}",
                    node.node,
                    self.config.generation()
                );
                let status = match refusal {
                    Refusal::NotOnNode { .. } | Refusal::TrustDomain { .. } => {
                        StatusCode::FORBIDDEN
                    }
                    Refusal::Signing(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::BAD_REQUEST,
                };
                error(status, refusal.to_string())
            }
        }
    }
}

fn error(status: StatusCode, reason: String) -> Response<Full<Bytes>> {
    json(status, &ErrorResponse { error: reason })
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).expect("serializable answer");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}
