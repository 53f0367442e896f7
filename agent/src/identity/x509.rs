//! PEM, certificate facts and times, as the CA and its clients need them.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The one crypto provider of the build (aws-lc-rs), shared.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Every `CERTIFICATE` block of a PEM text, in order; other blocks are skipped.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// Every certificate of several PEM texts, in order.
pub fn certs_from_pems(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for pem in pems {
        certs.extend(certs_from_pem(pem)?);
    }
    Ok(certs)
}

/// One `CERTIFICATE` PEM block.
pub fn cert_to_pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// What the CLI and the renewal schedule need to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub issuer: String,
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertFacts {
    pub fn of(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let validity = cert.validity();
        Ok(Self {
            serial: cert.raw_serial_as_string().replace(':', ""),
            issuer: cert.issuer().to_string(),
            subject: cert.subject().to_string(),
            not_before: at_unix(validity.not_before.timestamp()),
            not_after: at_unix(validity.not_after.timestamp()),
        })
    }

    /// Halfway through the validity: when a holder renews.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

fn at_unix(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds.max(0).unsigned_abs())
}

/// A time for rcgen's certificate parameters.
pub fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    let seconds = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// RFC 3339 in UTC to the second (`2026-12-02T02:15:36Z`), for people and JSON.
pub fn rfc3339(t: SystemTime) -> String {
    let t = to_offset(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_facts() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.not_before = to_offset(UNIX_EPOCH + Duration::from_secs(1_000));
        params.not_after = to_offset(UNIX_EPOCH + Duration::from_secs(3_000));
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let pem = cert_to_pem(&der) + &cert_to_pem(&der);
        let certs = certs_from_pem(&pem).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].as_ref(), der.as_slice());
        let facts = CertFacts::of(&der).unwrap();
        assert_eq!(facts.renew_at(), UNIX_EPOCH + Duration::from_secs(2_000));
        assert!(facts.expired(UNIX_EPOCH + Duration::from_secs(3_000)));
        assert!(!facts.expired(UNIX_EPOCH + Duration::from_secs(2_999)));
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_000)),
            "1970-01-01T00:16:40Z"
        );
    }
}
