//! SPIFFE ids of workloads (`spiffe://td/ns/N/sa/S`) and of nodes
//! (`spiffe://td/nodemesh/node/NODE`), and reading them out of certificates.
//!
//! The two forms never overlap, so a node credential can never pass for a
//! workload identity and the other way round.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec's limit on a whole id.
const MAX_ID_LEN: usize = 2048;
/// The SPIFFE spec's limit on the trust domain.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A workload's identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// A node's identity, carried by its node credential:
/// `spiffe://<trust-domain>/nodemesh/node/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NodeId {
    pub trust_domain: String,
    pub node: String,
}

/// Why a string is not a SPIFFE id of the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("`{0}` does not start with spiffe://")]
    Scheme(String),
    #[error("`{0}` is longer than {MAX_ID_LEN} bytes")]
    TooLong(String),
    #[error("`{0}` has an empty, too long or invalid trust domain (lowercase letters, digits, `.`, `-`, `_`)")]
    TrustDomain(String),
    #[error("`{0}` has an empty or invalid path segment (letters, digits, `.`, `-`, `_`; not `.` or `..`)")]
    Segment(String),
    #[error("`{id}` is not a {expected} id (`{form}`)")]
    Form {
        id: String,
        expected: &'static str,
        form: &'static str,
    },
}

/// Why a peer certificate carries no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the certificate has no subject alternative name")]
    NoSan,
    #[error("the certificate has {0} subject alternative names, one URI is required")]
    SeveralSans(usize),
    #[error("the certificate's alternative name is not a URI: {0}")]
    NotUri(String),
    #[error(transparent)]
    Id(#[from] SpiffeIdError),
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Strict: exactly `spiffe://td/ns/N/sa/S`, nothing before, after or in between.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        let (trust_domain, segments) = split(id)?;
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Ok(Self::new(trust_domain, namespace, service_account))
            }
            _ => Err(SpiffeIdError::Form {
                id: id.to_owned(),
                expected: "workload",
                form: "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
            }),
        }
    }

    /// The workload identity of a (leaf) certificate, in DER: exactly one
    /// subject alternative name, a URI of the workload form.
    pub fn from_cert(der: &[u8]) -> Result<Self, PeerCertError> {
        Ok(Self::parse(&only_uri_san(der)?)?)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl NodeId {
    pub fn new(trust_domain: &str, node: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            node: node.to_owned(),
        }
    }

    /// Strict: exactly `spiffe://td/nodemesh/node/NODE`.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        let (trust_domain, segments) = split(id)?;
        match segments.as_slice() {
            ["nodemesh", "node", node] => Ok(Self::new(trust_domain, node)),
            _ => Err(SpiffeIdError::Form {
                id: id.to_owned(),
                expected: "node",
                form: "spiffe://<trust-domain>/nodemesh/node/<node>",
            }),
        }
    }

    /// The node identity of a node credential (leaf certificate, DER).
    pub fn from_cert(der: &[u8]) -> Result<Self, PeerCertError> {
        Ok(Self::parse(&only_uri_san(der)?)?)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/nodemesh/node/{}",
            self.trust_domain, self.node
        )
    }
}

/// `spiffe://<td>/nodemesh/node/<node>`, the URI SAN of a node credential.
pub fn node_id(trust_domain: &str, node: &str) -> String {
    NodeId::new(trust_domain, node).to_string()
}

/// Whether `s` may be a path segment of a SPIFFE id (and so a namespace,
/// service account or node name in one).
pub fn is_valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The trust domain and the path segments of a SPIFFE id, each checked.
fn split(id: &str) -> Result<(&str, Vec<&str>), SpiffeIdError> {
    if id.len() > MAX_ID_LEN {
        return Err(SpiffeIdError::TooLong(id.chars().take(64).collect()));
    }
    let rest = id
        .strip_prefix(SCHEME)
        .ok_or_else(|| SpiffeIdError::Scheme(id.to_owned()))?;
    let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let trust_domain_ok = !trust_domain.is_empty()
        && trust_domain.len() <= MAX_TRUST_DOMAIN_LEN
        && trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if !trust_domain_ok {
        return Err(SpiffeIdError::TrustDomain(id.to_owned()));
    }
    let segments: Vec<&str> = path.split('/').collect();
    if !segments.iter().all(|s| is_valid_segment(s)) {
        return Err(SpiffeIdError::Segment(id.to_owned()));
    }
    Ok((trust_domain, segments))
}

/// The one URI SAN of a certificate; any other or further SAN is an error.
fn only_uri_san(der: &[u8]) -> Result<String, PeerCertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PeerCertError::Malformed(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PeerCertError::Malformed(e.to_string()))?
        .ok_or(PeerCertError::NoSan)?;
    match san.value.general_names.as_slice() {
        [] => Err(PeerCertError::NoSan),
        [GeneralName::URI(uri)] => Ok((*uri).to_owned()),
        [other] => Err(PeerCertError::NotUri(other.to_string())),
        several => Err(PeerCertError::SeveralSans(several.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_a_workload_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web-1").unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "shop", "web-1"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web-1");
    }

    #[test]
    fn refuses_malformed_workload_ids() {
        for bad in [
            "",
            "spiffe://",
            "http://cluster.local/ns/a/sa/b",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local:443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/./sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#f",
            "spiffe://cluster.local/ns/a%2f/sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/nodemesh/node/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} parsed");
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(MAX_ID_LEN));
        assert!(matches!(
            SpiffeId::parse(&long),
            Err(SpiffeIdError::TooLong(_))
        ));
    }

    #[test]
    fn node_and_workload_ids_never_overlap() {
        let node = NodeId::parse(&node_id("cluster.local", "node-a")).unwrap();
        assert_eq!(node, NodeId::new("cluster.local", "node-a"));
        assert!(SpiffeId::parse(&node.to_string()).is_err());
        assert!(NodeId::parse("spiffe://cluster.local/ns/nodemesh/sa/node").is_err());
        assert!(NodeId::parse("spiffe://cluster.local/nodemesh/node/a/b").is_err());
    }

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn reads_the_identity_of_a_certificate() {
        let der = cert_with_sans(vec![uri("spiffe://td/ns/a/sa/b")]);
        assert_eq!(
            SpiffeId::from_cert(&der).unwrap(),
            SpiffeId::new("td", "a", "b")
        );
        let node = cert_with_sans(vec![uri("spiffe://td/nodemesh/node/n1")]);
        assert!(matches!(
            SpiffeId::from_cert(&node),
            Err(PeerCertError::Id(SpiffeIdError::Form { .. }))
        ));
        assert_eq!(NodeId::from_cert(&node).unwrap(), NodeId::new("td", "n1"));
    }

    #[test]
    fn refuses_certificates_without_exactly_one_uri_san() {
        assert_eq!(
            SpiffeId::from_cert(&cert_with_sans(vec![])),
            Err(PeerCertError::NoSan)
        );
        let two = cert_with_sans(vec![
            uri("spiffe://td/ns/a/sa/b"),
            uri("spiffe://td/ns/c/sa/d"),
        ]);
        assert_eq!(
            SpiffeId::from_cert(&two),
            Err(PeerCertError::SeveralSans(2))
        );
        let dns = cert_with_sans(vec![rcgen::SanType::DnsName(
            "a.example".try_into().unwrap(),
        )]);
        assert!(matches!(
            SpiffeId::from_cert(&dns),
            Err(PeerCertError::NotUri(_))
        ));
        assert!(matches!(
            SpiffeId::from_cert(b"not a certificate"),
            Err(PeerCertError::Malformed(_))
        ));
    }
}
