//! Envoy's response flags: why the proxy, not the application, shaped an
//! answer. The L7 path marks its own replies with them (as a response
//! extension) and metrics and logs print them as Envoy does.

/// A set of Envoy response flags.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

/// One flag, with Envoy's short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `UH`: no healthy upstream (no endpoint to send to).
    NoHealthyUpstream,
    /// `UF`: connecting upstream failed.
    UpstreamConnectionFailure,
    /// `UO`: a circuit breaker or a tenant limit was full.
    UpstreamOverflow,
    /// `NR`: no route matched.
    NoRouteFound,
    /// `URX`: the retry limit was reached.
    UpstreamRetryLimitExceeded,
    /// `DI`: a fault delayed the request.
    DelayInjected,
    /// `FI`: a fault aborted the request.
    FaultInjected,
    /// `UT`: the upstream did not answer in time.
    UpstreamRequestTimeout,
    /// `UC`: the upstream connection ended before an answer.
    UpstreamConnectionTermination,
    /// `DC`: the caller went away before the answer ended.
    DownstreamConnectionTermination,
}

const ALL: [(Flag, &str); 10] = [
    (Flag::NoHealthyUpstream, "UH"),
    (Flag::UpstreamConnectionFailure, "UF"),
    (Flag::UpstreamOverflow, "UO"),
    (Flag::NoRouteFound, "NR"),
    (Flag::UpstreamRetryLimitExceeded, "URX"),
    (Flag::DelayInjected, "DI"),
    (Flag::FaultInjected, "FI"),
    (Flag::UpstreamRequestTimeout, "UT"),
    (Flag::UpstreamConnectionTermination, "UC"),
    (Flag::DownstreamConnectionTermination, "DC"),
];

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);

    pub fn of(flag: Flag) -> ResponseFlags {
        ResponseFlags(1 << flag as u16)
    }

    pub fn with(self, flag: Flag) -> ResponseFlags {
        ResponseFlags(self.0 | ResponseFlags::of(flag).0)
    }

    pub fn union(self, other: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Envoy's rendering: `-` for none, else the flags joined by commas.
    pub fn render(self) -> String {
        if self.is_empty() {
            return "-".to_owned();
        }
        ALL.iter()
            .filter(|(flag, _)| self.0 & ResponseFlags::of(*flag).0 != 0)
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Adds `flag` to the flags a response carries.
pub fn mark<B>(mut response: http::Response<B>, flag: Flag) -> http::Response<B> {
    let flags = response.extensions().get::<ResponseFlags>().copied();
    response
        .extensions_mut()
        .insert(flags.unwrap_or_default().with(flag));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_as_envoy() {
        assert_eq!(ResponseFlags::NONE.render(), "-");
        assert_eq!(ResponseFlags::of(Flag::FaultInjected).render(), "FI");
        let both = ResponseFlags::of(Flag::FaultInjected).with(Flag::DelayInjected);
        assert_eq!(both.render(), "DI,FI");
    }
}
