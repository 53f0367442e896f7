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
    /// The destination had no endpoint to send to.
    #[error("{0}")]
    NoHealthyUpstream(String),
    /// A limit was full (the workload's descriptors): nothing was tried.
    #[error("{0}")]
    Overflow(String),
    /// Refused, or ended abnormally once connected.
    #[error("{0}")]
    Failed(String),
}

impl RelayError {
    /// Envoy's flag for the connection: it never reached its upstream
    /// (`UF`), had none (`UH`), hit a limit (`UO`), or ended abnormally
    /// (`UC`).
    pub fn flag(&self) -> Flag {
        match self {
            RelayError::Unreachable(_) => Flag::UpstreamConnectionFailure,
            RelayError::NoHealthyUpstream(_) => Flag::NoHealthyUpstream,
            RelayError::Overflow(_) => Flag::UpstreamOverflow,
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
    fn each_way_of_failing_has_its_envoy_flag() {
        let never = RelayError::Unreachable("connecting to 10.0.0.2:80: refused".into());
        assert_eq!(never.flag(), Flag::UpstreamConnectionFailure);
        let cut = RelayError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(cut.flag(), Flag::UpstreamConnectionTermination);
        let none = RelayError::NoHealthyUpstream("service default/db has no endpoints".into());
        assert_eq!(none.flag(), Flag::NoHealthyUpstream);
        let full = RelayError::Overflow("no descriptor left for the delivery".into());
        assert_eq!(full.flag(), Flag::UpstreamOverflow);
        let denied = RelayError::from("RBAC: access denied");
        assert_eq!(denied.to_string(), "RBAC: access denied");
        assert_eq!(denied.flag(), Flag::UpstreamConnectionTermination);
    }
}
