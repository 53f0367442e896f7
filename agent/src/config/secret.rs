//! core/v1 `Secret`s holding TLS credentials for the ingress gateway (a
//! Gateway server's `credentialName`).
//!
//! Unlike other kinds, a Secret whose *contents* are bad (not base64, PEM that
//! does not parse, a key that does not match its certificate, an expired
//! certificate) does not fail the load: certificates expire on their own,
//! and an expiring one must not stop the rest of the mesh from reloading. It
//! is skipped and reported as a warning naming the file, object and field;
//! the Gateway servers that use it report it in turn. Key material is never
//! part of a message.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::identity::x509::{self, CertFacts};

use super::model::Metadata;
use super::{check_metadata, Issues, Origin};

/// The type `kubectl create secret tls` writes; the only one watched in
/// Kubernetes mode.
pub const TLS_TYPE: &str = "kubernetes.io/tls";
/// `kubectl create secret generic`: read too in local mode, where Istio's
/// `<credentialName>-cacert` secrets are usually of this type.
const OPAQUE_TYPE: &str = "Opaque";
const CERT: &str = "tls.crt";
const KEY: &str = "tls.key";
const CA: &str = "ca.crt";
/// The data keys read; others are ignored.
pub const KEYS: [&str; 3] = [CERT, KEY, CA];
/// Istio's separate secret holding the CA of a MUTUAL server.
const CA_SECRET_SUFFIX: &str = "-cacert";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SecretDoc {
    metadata: Metadata,
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Base64 values.
    #[serde(default)]
    data: BTreeMap<String, String>,
    /// Plain values, taking precedence over `data` as in Kubernetes.
    #[serde(default)]
    string_data: BTreeMap<String, String>,
    #[serde(rename = "immutable")]
    _immutable: Option<IgnoredAny>,
}

/// A Secret read, its contents checked (or why they are unusable).
pub(crate) struct SecretDraft {
    key: String,
    contents: Result<TlsSecret, Issues>,
}

/// What the loader does with a Secret document: metadata problems fail the
/// load like for any kind; contents are checked into the draft.
pub(crate) fn secret(doc: SecretDoc, issues: &mut Issues) -> SecretDraft {
    check_metadata(&doc.metadata, issues);
    let key = format!("{}/{}", doc.metadata.namespace, doc.metadata.name);
    let mut problems = Issues::default();
    let contents = read(doc, SystemTime::now(), &mut problems);
    SecretDraft {
        key,
        contents: contents.ok_or(problems),
    }
}

/// A server certificate with its key, and/or the CA that client certificates
/// must chain to.
pub struct TlsSecret {
    pub credential: Option<Credential>,
    /// `ca.crt`, for MUTUAL servers.
    pub ca: Option<Vec<CertificateDer<'static>>>,
}

/// A certificate chain and its matching key, ready for rustls.
pub struct Credential {
    pub key: Arc<CertifiedKey>,
    /// Of the leaf certificate: shown by `nodemesh gateways`.
    pub not_after: SystemTime,
}

// The key is not shown.
impl fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSecret")
            .field("credential", &self.credential.as_ref().map(|c| c.not_after))
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .finish()
    }
}

/// The contents of `doc`, or `None` with the problems in `issues`.
fn read(doc: SecretDoc, now: SystemTime, issues: &mut Issues) -> Option<TlsSecret> {
    let kind = doc.kind.as_deref().unwrap_or(OPAQUE_TYPE);
    if kind != TLS_TYPE && kind != OPAQUE_TYPE {
        issues.add(
            "type",
            format!("type {kind:?} is not read by the agent (use {TLS_TYPE:?})"),
        );
        return None;
    }
    let mut value = |name: &str| -> Option<(String, String)> {
        if let Some(text) = doc.string_data.get(name) {
            return Some((format!("stringData[{name}]"), text.clone()));
        }
        let field = format!("data[{name}]");
        let encoded = doc.data.get(name)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        if decoded.is_none() {
            issues.add(&field, "not base64 of a PEM text");
        }
        Some((field, decoded?))
    };
    let (cert, key, ca) = (value(CERT), value(KEY), value(CA));
    if !issues.is_empty() {
        return None;
    }
    let credential = match (cert, key) {
        (Some(cert), Some(key)) => Some(credential(cert, key, now, issues)?),
        (None, None) if kind != TLS_TYPE && ca.is_some() => None,
        (None, None) if kind != TLS_TYPE => {
            issues.add("data", format!("needs {CERT} and {KEY}, or {CA}"));
            return None;
        }
        (cert, _) => {
            let missing = if cert.is_none() { CERT } else { KEY };
            issues.add("data", format!("{missing} is missing"));
            return None;
        }
    };
    let ca = match ca {
        Some((field, pem)) => Some(ca_certs(&field, &pem, issues)?),
        None => None,
    };
    Some(TlsSecret { credential, ca })
}

fn credential(
    (cert_field, cert): (String, String),
    (key_field, key): (String, String),
    now: SystemTime,
    issues: &mut Issues,
) -> Option<Credential> {
    let chain = pem_certs(&cert_field, &cert, issues)?;
    let facts = match CertFacts::of(&chain[0]) {
        Ok(facts) => facts,
        Err(e) => {
            issues.add(
                cert_field,
                format!("the first certificate does not parse: {e}"),
            );
            return None;
        }
    };
    if facts.expired(now) {
        issues.add(
            cert_field,
            format!(
                "the certificate ({}) expired at {}",
                facts.subject,
                x509::rfc3339(facts.not_after)
            ),
        );
        return None;
    }
    // The parser's error could quote the text: only say what was expected.
    let Ok(private_key) = PrivateKeyDer::from_pem_slice(key.as_bytes()) else {
        issues.add(
            key_field,
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
        );
        return None;
    };
    match CertifiedKey::from_der(chain, private_key, &x509::provider()) {
        Ok(key) => Some(Credential {
            key: Arc::new(key),
            not_after: facts.not_after,
        }),
        Err(rustls::Error::InconsistentKeys(_)) => {
            issues.add(
                key_field,
                format!("the key does not match the certificate of {cert_field}"),
            );
            None
        }
        Err(_) => {
            issues.add(
                key_field,
                "the key's algorithm or encoding is not supported",
            );
            None
        }
    }
}

/// The certificates of `pem` (at least one), read from `field`.
fn pem_certs(field: &str, pem: &str, issues: &mut Issues) -> Option<Vec<CertificateDer<'static>>> {
    match x509::certs_from_pem(pem) {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            issues.add(field, "holds no CERTIFICATE PEM block");
            None
        }
        Err(e) => {
            issues.add(field, format!("is not valid PEM: {e}"));
            None
        }
    }
}

fn ca_certs(field: &str, pem: &str, issues: &mut Issues) -> Option<Vec<CertificateDer<'static>>> {
    let certs = pem_certs(field, pem, issues)?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        if let Err(e) = roots.add(cert.clone()) {
            issues.add(
                field,
                format!("certificate {} is not a usable CA: {e}", i + 1),
            );
            return None;
        }
    }
    Some(certs)
}

/// Every usable Secret by `namespace/name`, and why the others were skipped.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    usable: HashMap<String, Arc<TlsSecret>>,
    skipped: HashMap<String, String>,
    pub warnings: Vec<String>,
}

/// Why a Secret a Gateway server names cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {0} not found (looked in {1})")]
    NotFound(String, String),
    #[error("Secret {0} is invalid: {1}")]
    Invalid(String, String),
    #[error("Secret {0} has no {CERT} and {KEY}")]
    NoCredential(String),
}

impl Secrets {
    pub(crate) fn compile(drafts: Vec<(Origin, SecretDraft)>) -> Secrets {
        let mut secrets = Secrets::default();
        for (origin, draft) in drafts {
            match draft.contents {
                Ok(secret) => {
                    secrets.usable.insert(draft.key, Arc::new(secret));
                }
                Err(issues) => {
                    let reason: Vec<_> = issues.iter().map(|(f, m)| format!("{f}: {m}")).collect();
                    for (field, message) in issues.iter() {
                        secrets
                            .warnings
                            .push(format!("{origin}: {field}: {message}; Secret skipped"));
                    }
                    secrets.skipped.insert(draft.key, reason.join("; "));
                }
            }
        }
        secrets
    }

    /// The Secret `name`, looked up in each namespace in turn (a Gateway's
    /// own, then Istio's root namespace where Istio's gateways read them).
    pub fn find(&self, namespaces: &[&str], name: &str) -> Result<Arc<TlsSecret>, SecretError> {
        for namespace in namespaces {
            let key = format!("{namespace}/{name}");
            if let Some(secret) = self.usable.get(&key) {
                return Ok(secret.clone());
            }
            if let Some(reason) = self.skipped.get(&key) {
                return Err(SecretError::Invalid(key, reason.clone()));
            }
        }
        Err(SecretError::NotFound(
            name.to_owned(),
            namespaces.join(", "),
        ))
    }

    /// The server credential `name`, and the CA for client certificates: its
    /// own `ca.crt`, else Istio's `<name>-cacert` Secret, if asked for.
    pub fn credential(
        &self,
        namespaces: &[&str],
        name: &str,
        want_ca: bool,
    ) -> Result<(Arc<TlsSecret>, Option<Arc<TlsSecret>>), SecretError> {
        let secret = self.find(namespaces, name)?;
        if secret.credential.is_none() {
            return Err(SecretError::NoCredential(name.to_owned()));
        }
        let ca = match (want_ca, &secret.ca) {
            (false, _) => None,
            (true, Some(_)) => Some(secret.clone()),
            (true, None) => Some(self.find(namespaces, &format!("{name}{CA_SECRET_SUFFIX}"))?),
        };
        Ok((secret, ca))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pem_pair(not_after: SystemTime) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.com".into()]).unwrap();
        params.not_after = x509::to_offset(not_after);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn doc(kind: &str, data: &[(&str, &str)], string_data: &[(&str, &str)]) -> SecretDoc {
        let b64 = base64::engine::general_purpose::STANDARD;
        let value = serde_json::json!({
            "metadata": {"name": "cred", "namespace": "web"},
            "type": kind,
            "data": data.iter().map(|(k, v)| (k.to_string(), b64.encode(v))).collect::<BTreeMap<_, _>>(),
            "stringData": string_data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        });
        serde_json::from_value(value).unwrap()
    }

    fn problems(doc: SecretDoc, now: SystemTime) -> Vec<String> {
        let mut issues = Issues::default();
        let read = read(doc, now, &mut issues);
        assert_eq!(read.is_none(), !issues.is_empty());
        issues.iter().map(|(f, m)| format!("{f}: {m}")).collect()
    }

    #[test]
    fn reads_a_tls_secret_from_data_or_string_data() {
        let far = SystemTime::now() + Duration::from_secs(86_400);
        let (cert, key) = pem_pair(far);
        let mut issues = Issues::default();
        let secret = read(
            doc(TLS_TYPE, &[(CERT, &cert), (KEY, &key)], &[]),
            SystemTime::now(),
            &mut issues,
        );
        let secret = secret.expect("valid");
        assert!(secret.credential.is_some() && secret.ca.is_none());
        let plain = doc(TLS_TYPE, &[], &[(CERT, &cert), (KEY, &key), (CA, &cert)]);
        let secret = read(plain, SystemTime::now(), &mut issues).unwrap();
        assert_eq!(secret.ca.map(|ca| ca.len()), Some(1));
        // Istio's `-cacert` secret holds only the CA.
        let ca_only = read(
            doc(OPAQUE_TYPE, &[(CA, &cert)], &[]),
            SystemTime::now(),
            &mut issues,
        );
        assert!(ca_only.unwrap().credential.is_none());
        assert!(issues.is_empty());
    }

    #[test]
    fn reports_bad_contents_by_field_without_key_material() {
        let now = SystemTime::now();
        let (cert, key) = pem_pair(now + Duration::from_secs(86_400));
        let (_, other_key) = pem_pair(now + Duration::from_secs(86_400));
        let mismatch = problems(doc(TLS_TYPE, &[(CERT, &cert), (KEY, &other_key)], &[]), now);
        assert_eq!(
            mismatch,
            ["data[tls.key]: the key does not match the certificate of data[tls.crt]"]
        );
        let garbage_key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n";
        let bad_key = problems(
            doc(TLS_TYPE, &[], &[(CERT, &cert), (KEY, garbage_key)]),
            now,
        );
        assert_eq!(bad_key.len(), 1);
        assert!(
            bad_key[0].starts_with("stringData[tls.key]: "),
            "{bad_key:?}"
        );
        assert!(!bad_key[0].contains("c2VjcmV0"), "{bad_key:?}");
        let expired = problems(
            doc(TLS_TYPE, &[(CERT, &cert), (KEY, &key)], &[]),
            now + Duration::from_secs(2 * 86_400),
        );
        assert!(
            expired[0].starts_with("data[tls.crt]: the certificate"),
            "{expired:?}"
        );
        assert!(expired[0].contains("expired at"), "{expired:?}");
        let missing = problems(doc(TLS_TYPE, &[(CERT, &cert)], &[]), now);
        assert_eq!(missing, ["data: tls.key is missing"]);
        let not_pem = problems(doc(TLS_TYPE, &[(CERT, "hello"), (KEY, &key)], &[]), now);
        assert_eq!(not_pem, ["data[tls.crt]: holds no CERTIFICATE PEM block"]);
        let mut not_base64 = doc(TLS_TYPE, &[(KEY, &key)], &[]);
        not_base64.data.insert(CERT.into(), "%%%".into());
        assert_eq!(
            problems(not_base64, now),
            ["data[tls.crt]: not base64 of a PEM text"]
        );
        let other = problems(doc("kubernetes.io/dockerconfigjson", &[], &[]), now);
        assert!(other[0].starts_with("type: type \"kubernetes.io/dockerconfigjson\""));
    }
}
