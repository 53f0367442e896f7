//! Security policy as pure data: Istio `PeerAuthentication`
//! (security.istio.io), compiled at load time into decisions that the data
//! path and `nodemesh explain` both ask through the same function, so that
//! what is explained is what is enforced.

mod peer_authentication;
#[cfg(test)]
mod tests;

pub(crate) use peer_authentication::{peer_authentication, PeerAuthenticationDraft};
pub use peer_authentication::{MtlsDecision, MtlsMode, PeerAuthentications};
