//! TLS between agents: TLS 1.3 only, ALPN `h2`, one crypto provider.
//!
//! - The caller presents the *source workload's* certificate (its SPIFFE id
//!   is what the destination authorizes), chosen at each handshake, so a
//!   renewed certificate is used from the next connection on.
//! - The destination presents its *node* credential: connections are pooled
//!   per destination node and carry streams for any workload on it, so no
//!   one workload certificate could stand for them all. The caller checks
//!   it is the node the configuration places the destination on.
//! - Both sides verify chains against the mesh roots as they are at that
//!   handshake (several during a root rotation).
//! - The destination refuses a caller whose certificate is not exactly one
//!   workload id of the trust domain in the handshake itself, with the
//!   alert `access_denied`, so the caller's side learns why.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

use crate::identity::{x509, Identities, NodeId, SpiffeId};

const ALPN_H2: &[u8] = b"h2";

/// The caller's side, for one source identity.
pub fn client_config(identities: &Arc<Identities>, source: &SpiffeId) -> Arc<ClientConfig> {
    let provider = x509::provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeVerifier {
            identities: identities.clone(),
            provider,
        }))
        .with_client_cert_resolver(Arc::new(WorkloadCertificate {
            identities: identities.clone(),
            id: source.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Destinations never resume (see `server_config`).
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The destination's side, for one handshake: the node credential, and
/// the caller's certificate required, chained to the mesh roots and naming
/// one workload of the trust domain. Once the handshake is over, the
/// [`CallerCheck`] holds who called, or why it was refused.
pub fn server_config(
    identities: &Arc<Identities>,
) -> Result<(Arc<ServerConfig>, Arc<CallerCheck>), Error> {
    let provider = x509::provider();
    let chain =
        WebPkiClientVerifier::builder_with_provider(identities.trust_anchors(), provider.clone())
            .build()
            .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let check = Arc::new(CallerCheck::default());
    let verifier = CallerVerifier {
        chain,
        trust_domain: identities.trust_domain().to_owned(),
        check: check.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(NodeCertificate(identities.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: each connection checks the caller's current
    // certificate, and this config (with its session cache) is the
    // handshake's alone, so tickets would only cost work.
    config.send_tls13_tickets = 0;
    Ok((Arc::new(config), check))
}

/// What the destination's verifier made of the caller's certificate: its
/// workload identity, or why it was refused (the alert cannot say).
#[derive(Default)]
pub struct CallerCheck(Mutex<Option<Result<SpiffeId, String>>>);

impl CallerCheck {
    /// The verdict; none when no certificate got past the chain check.
    pub fn take(&self) -> Option<Result<SpiffeId, String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The caller's workload id, if `cert` names exactly one of `trust_domain`.
fn workload_id(cert: &CertificateDer<'_>, trust_domain: &str) -> Result<SpiffeId, String> {
    let id = SpiffeId::from_cert(cert).map_err(|e| format!("client certificate: {e}"))?;
    if id.trust_domain != trust_domain {
        return Err(format!("{id} is not in trust domain {trust_domain}"));
    }
    Ok(id)
}

/// The mesh roots' chain check, then the workload id, recorded in `check`.
struct CallerVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    check: Arc<CallerCheck>,
}

impl ClientCertVerifier for CallerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = workload_id(end_entity, &self.trust_domain);
        let verdict = match id {
            Ok(_) => Ok(verified),
            Err(_) => Err(CertificateError::ApplicationVerificationFailure.into()),
        };
        *self.check.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The server name a caller asks for: the destination node's name.
pub fn node_server_name(node: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(node.to_owned())
        .map_err(|_| Error::General(format!("node name {node:?} is not a DNS name")))
}

/// A workload identity's certificate, as renewed at each handshake: a
/// caller's client certificate, or the ingress's server certificate at an
/// ISTIO_MUTUAL Gateway server.
pub(crate) struct WorkloadCertificate {
    pub(crate) identities: Arc<Identities>,
    pub(crate) id: SpiffeId,
}

impl ResolvesServerCert for WorkloadCertificate {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.identities.certified_key(&self.id)
    }
}

impl ResolvesClientCert for WorkloadCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.identities.certified_key(&self.id)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents the node credential, as renewed at each handshake.
struct NodeCertificate(Arc<Identities>);

impl ResolvesServerCert for NodeCertificate {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.node_certified_key()
    }
}

/// Accepts exactly the node credential of the node named as server name,
/// chained to the current mesh roots.
struct NodeVerifier {
    identities: Arc<Identities>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.identities.trust_anchors(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ServerName::DnsName(node) = server_name else {
            return Err(Error::General("the server name must be a node name".into()));
        };
        let presented = NodeId::from_cert(end_entity)
            .map_err(|e| Error::General(format!("peer is not a mesh node: {e}")))?;
        let expected = NodeId::new(self.identities.trust_domain(), node.as_ref());
        if presented != expected {
            return Err(Error::General(format!(
                "peer is {presented}, expected {expected}"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// rustls wants its pluggable parts `Debug`; the key material is not shown.
impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkloadCertificate({})", self.id)
    }
}

impl std::fmt::Debug for NodeCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCertificate")
    }
}

impl std::fmt::Debug for CallerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallerVerifier({})", self.trust_domain)
    }
}

impl std::fmt::Debug for NodeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeVerifier")
    }
}
