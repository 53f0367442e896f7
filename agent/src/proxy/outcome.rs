//! Why a relayed connection did not end cleanly, by kind: telemetry's flag
//! and a hand-over are told apart by the variant, not by a message's text.

use crate::telemetry::Flag;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Carried to the next agent, which reports the connection when it
    /// ends: neither failed nor over here.
    #[error("handed over to the next agent")]
    HandedOver,
    /// The upstream, or the application on this node, was never reached.
    #[error("{0}")]
    Unreachable(String),
    /// Refused, or ended abnormally once connected.
    #[error("{0}")]
    Failed(String),
}

impl RelayError {
    /// Envoy's flag for the connection: it never reached its upstream
    /// (`UF`), or it ended abnormally (`UC`).
    pub fn flag(&self) -> Flag {
        match self {
            RelayError::Unreachable(_) => Flag::UpstreamConnectionFailure,
            RelayError::HandedOver | RelayError::Failed(_) => Flag::UpstreamConnectionTermination,
        }
    }
}

impl From<String> for RelayError {
    fn from(reason: String) -> RelayError {
        RelayError::Failed(reason)
    }
}

impl From<&str> for RelayError {
    fn from(reason: &str) -> RelayError {
        RelayError::Failed(reason.to_owned())
    }
}

impl From<std::io::Error> for RelayError {
    fn from(e: std::io::Error) -> RelayError {
        RelayError::Failed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_upstream_never_reached_is_a_connection_failure() {
        let never = RelayError::Unreachable("connecting to 10.0.0.2:80: refused".into());
        assert_eq!(never.flag(), Flag::UpstreamConnectionFailure);
        let cut = RelayError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(cut.flag(), Flag::UpstreamConnectionTermination);
        let denied = RelayError::from("RBAC: access denied");
        assert_eq!(denied.to_string(), "RBAC: access denied");
        assert_eq!(denied.flag(), Flag::UpstreamConnectionTermination);
    }
}
