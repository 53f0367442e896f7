//! The agent's side of the CA protocol ([`crate::ca::protocol`]): one HTTPS
//! request per certificate, authenticated with the node credential.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::x509::provider;
use crate::ca::protocol::{
    ErrorResponse, SignRequest, SignResponse, CA_SERVER_NAME, MAX_BODY_BYTES, SIGN_PATH,
};

/// Connecting, the handshake and the answer together.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot connect to the CA at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS with the CA at {address} failed: {source}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("HTTP with the CA failed: {0}")]
    Http(String),
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("the CA's answer is unusable: {0}")]
    BadAnswer(String),
    #[error("the CA at {0} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
}

/// Talks to the mesh CA as this node.
pub struct CaClient {
    address: String,
    node: Arc<CertifiedKey>,
}

impl CaClient {
    /// `address` is `HOST:PORT`; `node` the node credential, sent as client certificate.
    pub fn new(address: String, node: Arc<CertifiedKey>) -> Self {
        Self { address, node }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Asks for a certificate; `roots` are the roots the CA's own certificate must chain to.
    pub async fn sign(
        &self,
        roots: RootCertStore,
        request: &SignRequest,
    ) -> Result<SignResponse, CaError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(roots, request))
            .await
            .map_err(|_| CaError::Timeout(self.address.clone()))?
    }

    async fn exchange(
        &self,
        roots: RootCertStore,
        request: &SignRequest,
    ) -> Result<SignResponse, CaError> {
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|source| CaError::Connect {
                address: self.address.clone(),
                source,
            })?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(self.node.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = TlsConnector::from(Arc::new(config))
            .connect(
                ServerName::try_from(CA_SERVER_NAME).expect("a DNS name"),
                tcp,
            )
            .await
            .map_err(|source| CaError::Tls {
                address: self.address.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| CaError::Http(e.to_string()))?;
        let connection = tokio::spawn(connection);
        let body = serde_json::to_vec(request).expect("serializable request");
        let http_request = http::Request::post(SIGN_PATH)
            .header(http::header::HOST, CA_SERVER_NAME)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let answer = async {
            let response = sender
                .send_request(http_request)
                .await
                .map_err(|e| CaError::Http(e.to_string()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| CaError::Http(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                let reason = serde_json::from_slice::<ErrorResponse>(&body)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| status.to_string());
                return Err(CaError::Refused(reason));
            }
            serde_json::from_slice::<SignResponse>(&body)
                .map_err(|e| CaError::BadAnswer(e.to_string()))
        }
        .await;
        connection.abort();
        answer
    }
}
