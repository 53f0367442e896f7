//! The CA's signing key and certificates, from its own state directory (a
//! self-signed root it creates on first start) or from an operator's plug-in
//! CA directory (Istio's layout), and the certificates it builds with them.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::csr::{self, Refusal};
use crate::identity::x509::{self, CertFacts};
use crate::identity::{is_valid_segment, NodeId, SpiffeId};

/// Files of the self-signed root in `--state-dir`.
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
/// Istio's plug-in CA layout (`--plugin-certs`).
pub const PLUGIN_CA_CERT: &str = "ca-cert.pem";
pub const PLUGIN_CA_KEY: &str = "ca-key.pem";
pub const PLUGIN_ROOT_CERT: &str = "root-cert.pem";
pub const PLUGIN_CERT_CHAIN: &str = "cert-chain.pem";
/// What `issue-node` writes.
pub const NODE_CERT: &str = "node-cert.pem";
pub const NODE_KEY: &str = "node-key.pem";

/// Lifetime of a root the CA creates for itself.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the CA's own TLS server certificate, made at each start.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Inconsistent(String),
    #[error("cannot build a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Where the CA's signing material comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A self-signed root kept in this directory, created on first use.
    StateDir(PathBuf),
    /// An operator's intermediate in Istio's plug-in CA layout.
    Plugin(PathBuf),
}

/// A certificate and the key that goes with it, both PEM.
pub struct Credential {
    pub chain_pem: String,
    pub key_pem: String,
    pub facts: CertFacts,
}

pub struct Authority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    signer: CertFacts,
    /// Sent after every leaf: from the signing certificate up (empty when
    /// the signing certificate is itself the root).
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl Authority {
    pub fn load(source: &Source, trust_domain: &str) -> Result<Self, AuthorityError> {
        match source {
            Source::StateDir(dir) => Self::self_signed(dir, trust_domain),
            Source::Plugin(dir) => Self::plugin(dir, trust_domain),
        }
    }

    /// The root in `dir`, created (key file 0600, directory 0700) if absent.
    fn self_signed(dir: &Path, trust_domain: &str) -> Result<Self, AuthorityError> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        if !key_path.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_error(dir))?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let now = SystemTime::now();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::OrganizationName, trust_domain);
            params
                .distinguished_name
                .push(DnType::CommonName, "nodemesh root CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.serial_number = Some(random_serial());
            params.not_before = x509::to_offset(now);
            params.not_after = x509::to_offset(now + ROOT_LIFETIME);
            let cert = params.self_signed(&key)?;
            write_private(&key_path, &key.serialize_pem())?;
            fs::write(&cert_path, cert.pem()).map_err(io_error(&cert_path))?;
            log::info!(
                "created a self-signed root for trust domain {trust_domain} in {}",
                dir.display()
            );
        }
        let cert = read_certs(&cert_path)?.remove(0);
        let key = read_key(&key_path)?;
        Self::new(trust_domain, cert.clone(), key, Vec::new(), vec![cert])
    }

    /// `ca-cert.pem` + `ca-key.pem` sign; `cert-chain.pem` goes with every
    /// leaf; `root-cert.pem` (one root or several) is what the mesh trusts.
    fn plugin(dir: &Path, trust_domain: &str) -> Result<Self, AuthorityError> {
        let cert = read_certs(&dir.join(PLUGIN_CA_CERT))?.remove(0);
        let key = read_key(&dir.join(PLUGIN_CA_KEY))?;
        let mut chain = read_certs(&dir.join(PLUGIN_CERT_CHAIN))?;
        if chain.first() != Some(&cert) {
            chain.insert(0, cert.clone());
        }
        let roots = read_certs(&dir.join(PLUGIN_ROOT_CERT))?;
        Self::new(trust_domain, cert, key, chain, roots)
    }

    fn new(
        trust_domain: &str,
        cert: CertificateDer<'static>,
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, AuthorityError> {
        let signer = CertFacts::of(&cert).map_err(AuthorityError::Inconsistent)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| AuthorityError::Inconsistent(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(AuthorityError::Inconsistent(format!(
                "the signing key does not belong to the signing certificate ({})",
                signer.subject
            )));
        }
        if signer.expired(SystemTime::now()) {
            return Err(AuthorityError::Inconsistent(format!(
                "the signing certificate ({}) expired",
                signer.subject
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            signer,
            chain,
            roots,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn roots_pem(&self) -> Vec<String> {
        self.roots.iter().map(|c| x509::cert_to_pem(c)).collect()
    }

    /// Signs the workload identity a CSR asks for, if `allowed` (the
    /// identities the configuration places on the asking node) holds it.
    /// Returns the chain, leaf first, in PEM.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        asked: Duration,
        max: Duration,
        node: &str,
        allowed: impl FnOnce() -> std::collections::BTreeSet<SpiffeId>,
    ) -> Result<(SpiffeId, Vec<String>), Refusal> {
        let csr = csr::check(csr_pem)?;
        if csr.id.trust_domain != self.trust_domain {
            return Err(Refusal::TrustDomain {
                asked: csr.id,
                ours: self.trust_domain.clone(),
            });
        }
        if !allowed().contains(&csr.id) {
            return Err(Refusal::NotOnNode {
                id: csr.id,
                node: node.to_owned(),
            });
        }
        let uri = SanType::URI(
            csr.id
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| Refusal::Signing(e.to_string()))?,
        );
        let leaf = self
            .leaf(uri, &csr.public_key, asked.min(max))
            .map_err(|e| Refusal::Signing(e.to_string()))?;
        Ok((csr.id, self.chain_pem(&leaf)))
    }

    /// A node credential for `node`: its identity must never parse as a
    /// workload's, and it serves as TLS client (to the CA, to peers) and as
    /// TLS server (the node's HBONE port).
    pub fn issue_node(&self, node: &str, lifetime: Duration) -> Result<Credential, AuthorityError> {
        if !is_valid_segment(node) {
            return Err(AuthorityError::Inconsistent(format!(
                "`{node}` cannot be a node name in a SPIFFE id (letters, digits, `.`, `-`, `_`)"
            )));
        }
        let id = NodeId::new(&self.trust_domain, node).to_string();
        self.credential(SanType::URI(id.try_into()?), lifetime)
    }

    /// The CA's own TLS server certificate (DNS name [`super::protocol::CA_SERVER_NAME`]).
    pub fn server_credential(&self) -> Result<Credential, AuthorityError> {
        let name = super::protocol::CA_SERVER_NAME.try_into()?;
        self.credential(SanType::DnsName(name), SERVER_CERT_LIFETIME)
    }

    fn credential(&self, san: SanType, lifetime: Duration) -> Result<Credential, AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.leaf(san, &key, lifetime)?;
        Ok(Credential {
            chain_pem: self.chain_pem(&leaf).concat(),
            key_pem: key.serialize_pem(),
            facts: CertFacts::of(&leaf).map_err(AuthorityError::Inconsistent)?,
        })
    }

    /// An end-entity certificate for `san` alone: no subject, TLS client and
    /// server usages, valid from now for `lifetime` or until the signing
    /// certificate expires, whichever is first.
    fn leaf(
        &self,
        san: SanType,
        key: &impl PublicKeyData,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, rcgen::Error> {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = x509::to_offset(now);
        params.not_after = x509::to_offset((now + lifetime).min(self.signer.not_after));
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }

    fn chain_pem(&self, leaf: &[u8]) -> Vec<String> {
        std::iter::once(leaf)
            .chain(self.chain.iter().map(|c| c.as_ref()))
            .map(x509::cert_to_pem)
            .collect()
    }
}

/// Writes `node-cert.pem`, `node-key.pem` (0600) and `root-cert.pem` into `out`.
pub fn write_node_credential(
    out: &Path,
    credential: &Credential,
    roots_pem: &[String],
) -> Result<(), AuthorityError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(io_error(out))?;
    write_private(&out.join(NODE_KEY), &credential.key_pem)?;
    let cert = out.join(NODE_CERT);
    fs::write(&cert, &credential.chain_pem).map_err(io_error(&cert))?;
    let roots = out.join(ROOT_CERT);
    fs::write(&roots, roots_pem.concat()).map_err(io_error(&roots))
}

/// Creates `path` afresh with mode 0600 from the start, so the secret is
/// never readable by others, not even between creation and a chmod.
fn write_private(path: &Path, contents: &str) -> Result<(), AuthorityError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(path)(e)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    let certs = x509::certs_from_pem(&text).map_err(|reason| AuthorityError::BadFile {
        path: path.to_owned(),
        reason,
    })?;
    if certs.is_empty() {
        return Err(AuthorityError::BadFile {
            path: path.to_owned(),
            reason: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<KeyPair, AuthorityError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    KeyPair::from_pem(&text).map_err(|e| AuthorityError::BadFile {
        path: path.to_owned(),
        reason: format!("not a usable private key: {e}"),
    })
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// 16 random bytes, positive as RFC 5280 wants.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    x509::provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the system random source works");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}
