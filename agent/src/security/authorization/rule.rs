//! The matching half of an AuthorizationPolicy: Istio's string patterns,
//! IP blocks, and rules as lists of clauses over the attributes of a
//! connection or request.

use std::fmt;
use std::net::IpAddr;

use http::HeaderName;

use super::{Attributes, HttpView};

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any
/// non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Any,
}

impl Pattern {
    /// A `*` is allowed alone, first or last, once.
    pub(super) fn parse(value: &str) -> Result<Pattern, String> {
        if value.is_empty() {
            return Err("empty value".into());
        }
        if value == "*" {
            return Ok(Pattern::Any);
        }
        let pattern = if let Some(suffix) = value.strip_prefix('*') {
            Pattern::Suffix(suffix.into())
        } else if let Some(prefix) = value.strip_suffix('*') {
            Pattern::Prefix(prefix.into())
        } else {
            Pattern::Exact(value.into())
        };
        let rest = match &pattern {
            Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) => s,
            Pattern::Any => "",
        };
        if rest.contains('*') {
            return Err(format!(
                "{value:?}: `*` is supported only alone, as a prefix or as a suffix (Istio's \
                 string match)"
            ));
        }
        Ok(pattern)
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(s) => value == &**s,
            Pattern::Prefix(s) => value.starts_with(&**s),
            Pattern::Suffix(s) => value.ends_with(&**s),
            Pattern::Any => !value.is_empty(),
        }
    }

    /// For host names, which compare without case.
    fn matches_ignore_case(&self, value: &str) -> bool {
        let (value, n) = (value.as_bytes(), |s: &str| s.len());
        match self {
            Pattern::Exact(s) => value.eq_ignore_ascii_case(s.as_bytes()),
            Pattern::Prefix(s) => {
                value.len() >= n(s) && value[..n(s)].eq_ignore_ascii_case(s.as_bytes())
            }
            Pattern::Suffix(s) => {
                value.len() >= n(s)
                    && value[value.len() - n(s)..].eq_ignore_ascii_case(s.as_bytes())
            }
            Pattern::Any => !value.is_empty(),
        }
    }

    pub(super) fn exact(&self) -> Option<&str> {
        match self {
            Pattern::Exact(s) => Some(s),
            _ => None,
        }
    }
}

/// An address or CIDR block (`10.0.0.0/16`, `10.1.2.3`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub(super) fn parse(value: &str) -> Result<IpBlock, String> {
        let (address, prefix) = match value.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (value, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{value:?} is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{value:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(IpBlock { network, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// What one clause looks at, and the values it accepts.
#[derive(Debug, Clone)]
pub(super) enum Check {
    Principal(Box<[Pattern]>),
    Namespace(Box<[Pattern]>),
    SourceIp(Box<[IpBlock]>),
    DestinationIp(Box<[IpBlock]>),
    Port(Box<[u16]>),
    Sni(Box<[Pattern]>),
    Method(Box<[Pattern]>),
    Path(Box<[Pattern]>),
    Host(Box<[Pattern]>),
    Header(HeaderName, Box<[Pattern]>),
}

impl Check {
    /// Fields that exist only in HTTP requests.
    pub(super) fn is_http(&self) -> bool {
        matches!(
            self,
            Check::Method(_) | Check::Path(_) | Check::Host(_) | Check::Header(..)
        )
    }
}

/// A check that must hold (or, `negated`, must not): `principals` /
/// `notPrincipals`, `values` / `notValues`.
#[derive(Debug, Clone)]
pub(super) struct Clause {
    pub(super) check: Check,
    pub(super) negated: bool,
}

impl Clause {
    /// `unknown` answers for an HTTP-only field when there is no request to
    /// look at (see [`Rule::matches`]).
    fn holds(&self, a: &Attributes<'_>, unknown: bool) -> bool {
        let any = |patterns: &[Pattern], value: Option<&str>| {
            value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
        };
        let within = |blocks: &[IpBlock], ip: IpAddr| blocks.iter().any(|b| b.contains(ip));
        if let (Check::Sni(_), HttpView::Unknown) = (&self.check, &a.http) {
            // Read from the connection's first bytes, not there yet.
            return unknown;
        }
        let request = match (&a.http, self.check.is_http()) {
            (HttpView::Request(request), true) => Some(request),
            (_, true) => return unknown,
            _ => None,
        };
        let matched = match (&self.check, request) {
            (Check::Principal(p), _) => any(p, a.principal),
            (Check::Namespace(p), _) => any(p, a.namespace),
            (Check::SourceIp(b), _) => within(b, a.source_ip),
            (Check::DestinationIp(b), _) => within(b, a.destination.ip()),
            (Check::Port(ports), _) => ports.contains(&a.destination.port()),
            (Check::Sni(p), _) => any(p, a.sni),
            (Check::Method(p), Some(r)) => any(p, Some(r.method)),
            (Check::Path(p), Some(r)) => any(p, Some(r.path)),
            (Check::Host(p), Some(r)) => {
                // `host` and `host:port` both name the host.
                let bare = r.host.rsplit_once(':').map_or(r.host, |(h, _)| h);
                p.iter()
                    .any(|p| p.matches_ignore_case(r.host) || p.matches_ignore_case(bare))
            }
            (Check::Header(name, p), Some(r)) => {
                let mut values = r.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => false,
                    (Some(one), None) => any(p, one.to_str().ok()),
                    // Several lines of one header read as one, comma-joined (Envoy).
                    (Some(_), Some(_)) => {
                        let joined: Vec<&str> = r
                            .headers
                            .get_all(name)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect();
                        any(p, Some(&joined.join(",")))
                    }
                }
            }
            (_, None) => unreachable!("HTTP fields are answered above"),
        };
        matched != self.negated
    }
}

/// One entry of `rules`: any `from`, any `to` (an empty list matches
/// anything), every `when`.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    from: Vec<Vec<Clause>>,
    to: Vec<Vec<Clause>>,
    when: Vec<Clause>,
    /// Whether any clause needs an HTTP request.
    pub(super) uses_http: bool,
    /// Whether any clause needs the TLS server name.
    pub(super) uses_sni: bool,
}

impl Rule {
    pub(super) fn new(from: Vec<Vec<Clause>>, to: Vec<Vec<Clause>>, when: Vec<Clause>) -> Rule {
        let clauses = || from.iter().chain(&to).flatten().chain(&when);
        let uses_http = clauses().any(|c| c.check.is_http());
        let uses_sni = clauses().any(|c| matches!(c.check, Check::Sni(_)));
        Rule {
            from,
            to,
            when,
            uses_http,
            uses_sni,
        }
    }

    /// The exact principals the rule is limited to, when every `from`
    /// names some and only exactly: then only those callers can match it.
    pub(super) fn exact_principals(&self) -> Option<Vec<&str>> {
        if self.from.is_empty() {
            return None;
        }
        let mut all = Vec::new();
        for source in &self.from {
            let principals = source.iter().find_map(|c| match &c.check {
                Check::Principal(p) if !c.negated => Some(p),
                _ => None,
            })?;
            for pattern in principals.iter() {
                all.push(pattern.exact()?);
            }
        }
        Some(all)
    }

    /// Istio's semantics for HTTP-only fields without an HTTP request: on
    /// a TCP connection an ALLOW rule that uses one never matches, and a
    /// DENY rule ignores it (so denies more). Before the protocol is known
    /// (`Unknown`), the answer is the one that errs towards "may match" for
    /// ALLOW and "may not" for DENY, so that refusing then is always right.
    pub(super) fn matches(&self, a: &Attributes<'_>, deny: bool) -> bool {
        let unknown = match a.http {
            HttpView::Request(_) => false,
            HttpView::Tcp if !deny && self.uses_http => return false,
            HttpView::Tcp => true,
            HttpView::Unknown => !deny,
        };
        let all = |clauses: &[Clause]| clauses.iter().all(|c| c.holds(a, unknown));
        (self.from.is_empty() || self.from.iter().any(|s| all(s)))
            && (self.to.is_empty() || self.to.iter().any(|o| all(o)))
            && all(&self.when)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(s) => f.write_str(s),
            Pattern::Prefix(s) => write!(f, "{s}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
            Pattern::Any => f.write_str("*"),
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl fmt::Display for Clause {
    /// `principals in [a, b*]`, `not methods in [POST]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(values: &[T]) -> String {
            let values: Vec<String> = values.iter().map(T::to_string).collect();
            values.join(", ")
        }
        let (name, values) = match &self.check {
            Check::Principal(p) => ("principal".to_owned(), list(p)),
            Check::Namespace(p) => ("namespace".to_owned(), list(p)),
            Check::SourceIp(b) => ("source ip".to_owned(), list(b)),
            Check::DestinationIp(b) => ("destination ip".to_owned(), list(b)),
            Check::Port(p) => ("port".to_owned(), list(p)),
            Check::Sni(p) => ("sni".to_owned(), list(p)),
            Check::Method(p) => ("method".to_owned(), list(p)),
            Check::Path(p) => ("path".to_owned(), list(p)),
            Check::Host(p) => ("host".to_owned(), list(p)),
            Check::Header(h, p) => (format!("header {h}"), list(p)),
        };
        let not = if self.negated { "not " } else { "" };
        write!(f, "{name} {not}in [{values}]")
    }
}

impl fmt::Display for Rule {
    /// `from (principal in [a]) or (namespace in [b]); to (method in [GET])`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = |clauses: &[Clause]| {
            let clauses: Vec<String> = clauses.iter().map(Clause::to_string).collect();
            format!("({})", clauses.join(" and "))
        };
        let any = |alternatives: &[Vec<Clause>]| {
            let alternatives: Vec<String> = alternatives.iter().map(|c| all(c)).collect();
            alternatives.join(" or ")
        };
        let mut parts = Vec::new();
        if !self.from.is_empty() {
            parts.push(format!("from {}", any(&self.from)));
        }
        if !self.to.is_empty() {
            parts.push(format!("to {}", any(&self.to)));
        }
        if !self.when.is_empty() {
            parts.push(format!("when {}", all(&self.when)));
        }
        match parts.is_empty() {
            true => f.write_str("any request"),
            false => f.write_str(&parts.join("; ")),
        }
    }
}
