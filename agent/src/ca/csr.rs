//! Reading a CSR the way the CA trusts it: its signature proves the requester
//! holds the key, the key must be ECDSA P-256, and it must name exactly one
//! workload SPIFFE id. Everything else in it is ignored, since the CA builds
//! the certificate itself.

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::identity::{SpiffeId, SpiffeIdError};

/// Why the CA refuses to sign; sent back to the agent and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the CSR cannot be parsed: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify (the requester does not hold its key)")]
    BadSignature,
    #[error("the CSR's key is not ECDSA P-256")]
    KeyNotP256,
    #[error("the CSR names no identity (exactly one URI SAN is required)")]
    NoSan,
    #[error("the CSR names {0} subject alternative names (exactly one URI SAN is accepted)")]
    SeveralSans(usize),
    #[error("the CSR names the DNS name `{0}` (only a SPIFFE URI SAN is accepted)")]
    DnsSan(String),
    #[error("the CSR names `{0}` (only a SPIFFE URI SAN is accepted)")]
    OtherSan(String),
    #[error("the CSR's URI is not a workload identity: {0}")]
    NotWorkload(SpiffeIdError),
    #[error("{asked} is in trust domain `{}`, this CA signs for `{ours}`", asked.trust_domain)]
    TrustDomain { asked: SpiffeId, ours: String },
    #[error("no workload with identity {id} runs on node `{node}` in an enrolled namespace")]
    NotOnNode { id: SpiffeId, node: String },
    #[error("signing failed: {0}")]
    Signing(String),
}

/// What the CA takes from a valid CSR.
#[derive(Debug)]
pub struct CheckedCsr {
    pub id: SpiffeId,
    pub public_key: P256PublicKey,
}

/// An uncompressed P-256 point taken from a CSR, for rcgen to certify.
#[derive(Debug)]
pub struct P256PublicKey(Vec<u8>);

impl rcgen::PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Checks a PEM CSR and returns the identity it asks for (in any trust domain:
/// the caller compares) and its key.
pub fn check(pem: &str) -> Result<CheckedCsr, Refusal> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(Refusal::KeyNotP256);
    }
    csr.verify_signature().map_err(|_| Refusal::BadSignature)?;
    let names: Vec<&GeneralName> = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
            _ => None,
        })
        .flatten()
        .collect();
    let id = match names.as_slice() {
        [] => return Err(Refusal::NoSan),
        [GeneralName::URI(uri)] => SpiffeId::parse(uri).map_err(Refusal::NotWorkload)?,
        [GeneralName::DNSName(name)] => return Err(Refusal::DnsSan((*name).to_owned())),
        [other] => return Err(Refusal::OtherSan(other.to_string())),
        several => return Err(Refusal::SeveralSans(several.len())),
    };
    Ok(CheckedCsr {
        id,
        public_key: P256PublicKey(spki.subject_public_key.data.to_vec()),
    })
}
