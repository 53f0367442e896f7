//! What agents and the CA say to each other: one JSON request and answer per
//! HTTPS POST, over TLS 1.3 with the node credential as client certificate.

use serde::{Deserialize, Serialize};

/// Where agents POST their [`SignRequest`]s.
pub const SIGN_PATH: &str = "/v1/sign";

/// The DNS name in the CA's own server certificate, which agents check. In
/// `.invalid`, so no public CA issues it, and the mesh CA never signs a DNS
/// name for anyone else.
pub const CA_SERVER_NAME: &str = "nodemesh-ca.invalid";

/// Largest request or answer body either side reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignRequest {
    /// A PKCS#10 CSR in PEM. Only its key and its one URI SAN are used.
    pub csr: String,
    /// The lifetime asked for; the CA may give less.
    pub lifetime_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignResponse {
    /// The new certificate then the intermediates up to (maybe including) a root, PEM.
    pub chain: Vec<String>,
    /// Every root the mesh trusts now (several during a root rotation), PEM.
    pub roots: Vec<String>,
}

/// The body of every non-200 answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}
