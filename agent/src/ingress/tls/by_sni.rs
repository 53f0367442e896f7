//! Which server of a gateway port a ClientHello's SNI picks, as Envoy's
//! filter chain match by server name does: an exact host beats the longest
//! matching wildcard (`*.example.com` matches any name below
//! `example.com`), which beats `*`; no SNI reaches a `*` server only.
//! Pure data, so `nodemesh explain` asks the same question as the acceptor.

use std::collections::HashMap;

/// The hosts of a port's TLS servers, by server index.
#[derive(Debug, Default)]
pub struct SniIndex {
    exact: HashMap<String, usize>,
    /// `.example.com` for `*.example.com`, longest first.
    wildcards: Vec<(String, usize)>,
    catch_all: Option<usize>,
}

impl SniIndex {
    /// From the servers of one port as `(hosts, has TLS)`, hosts in Istio's
    /// form (`namespace/` prefixes are dropped here). Servers without TLS
    /// claim nothing; when two servers claim a host, the first wins.
    pub fn new<'a, H: IntoIterator<Item = &'a str>>(
        servers: impl IntoIterator<Item = (H, bool)>,
    ) -> SniIndex {
        let mut index = SniIndex::default();
        for (i, (hosts, tls)) in servers.into_iter().enumerate() {
            if tls {
                hosts.into_iter().for_each(|host| index.claim(host, i));
            }
        }
        index
            .wildcards
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        index
    }

    fn claim(&mut self, host: &str, index: usize) {
        let host = host.rsplit_once('/').map_or(host, |(_, h)| h);
        let host = host.to_ascii_lowercase();
        if host == "*" {
            self.catch_all.get_or_insert(index);
        } else if let Some(suffix) = host.strip_prefix('*') {
            if !self.wildcards.iter().any(|(s, _)| s == suffix) {
                self.wildcards.push((suffix.to_owned(), index));
            }
        } else {
            self.exact.entry(host).or_insert(index);
        }
    }

    /// The server a ClientHello with `sni` goes to.
    pub fn select(&self, sni: Option<&str>) -> Option<usize> {
        let Some(name) = sni else {
            return self.catch_all;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.exact
            .get(&name)
            .copied()
            .or_else(|| {
                let mut below = self.wildcards.iter();
                below
                    .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix))
                    .map(|&(_, index)| index)
            })
            .or(self.catch_all)
    }
}
