//! Istio's `cipherSuites` (Envoy's OpenSSL/BoringSSL names) mapped to the
//! suites of the agent's one crypto provider (aws-lc-rs).
//!
//! As in Envoy, the list restricts TLS 1.2 only: TLS 1.3 suites are not
//! configurable and stay enabled. Envoy's equal-preference groups
//! (`[A|B]`) are read as their members. A name the agent does not
//! implement is an error, as Envoy refuses unknown names: rustls has only
//! ECDHE key exchange with AEAD ciphers, so no CBC, RSA-kx or 3DES suites.

use std::sync::Arc;

use rustls::crypto::aws_lc_rs::cipher_suite as suite;
use rustls::crypto::CryptoProvider;
use rustls::SupportedCipherSuite;

use crate::identity::x509;

/// Envoy name → suite.
const TLS12_SUITES: [(&str, SupportedCipherSuite); 6] = [
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// The agent's provider, its TLS 1.2 suites restricted to `names` in their
/// order (an empty list keeps the defaults).
pub(super) fn provider(names: &[String]) -> Result<Arc<CryptoProvider>, String> {
    let base = x509::provider();
    if names.is_empty() {
        return Ok(base);
    }
    let mut chosen: Vec<SupportedCipherSuite> = base
        .cipher_suites
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .copied()
        .collect();
    let mut unknown = Vec::new();
    let members = names
        .iter()
        .flat_map(|n| n.trim_matches(|c| c == '[' || c == ']').split('|'));
    for name in members.map(str::trim) {
        match TLS12_SUITES.iter().find(|(known, _)| *known == name) {
            Some((_, suite)) if !chosen.contains(suite) => chosen.push(*suite),
            Some(_) => {}
            None => unknown.push(format!("{name:?}")),
        }
    }
    if !unknown.is_empty() {
        let supported: Vec<_> = TLS12_SUITES.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "{} not supported (rustls implements only ECDHE with AEAD ciphers; supported: {})",
            unknown.join(", "),
            supported.join(", ")
        ));
    }
    Ok(Arc::new(CryptoProvider {
        cipher_suites: chosen,
        ..(*base).clone()
    }))
}
