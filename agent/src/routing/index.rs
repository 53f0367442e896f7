//! Which routes of a Service can match a request's path, found without
//! trying them all. The first matching route still wins: candidates are
//! tried in order. But a route whose every match block needs another exact
//! path or another prefix is never looked at, so a Service with thousands
//! of path routes costs a request a few hash lookups, not a scan.

use std::collections::HashMap;

use super::{HttpRoute, StringMatch};

/// Below this many routes a plain scan is as cheap as the index.
const INDEXED_FROM: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct PathIndex {
    /// Routes with a block that leaves the path open (or no blocks at all).
    any: Vec<u32>,
    exact: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    /// The distinct lengths of the keys of `prefix`, ascending.
    prefix_lengths: Vec<usize>,
}

impl PathIndex {
    /// `None` when the routes are too few to be worth indexing.
    pub fn build(routes: &[HttpRoute]) -> Option<PathIndex> {
        if routes.len() < INDEXED_FROM {
            return None;
        }
        let mut index = PathIndex::default();
        for (i, route) in routes.iter().enumerate() {
            let i = i as u32;
            if route.matches.is_empty() {
                index.any.push(i);
            }
            for block in &route.matches {
                match (&block.uri, block.ignore_uri_case) {
                    (Some(StringMatch::Exact(path)), false) => {
                        index.exact.entry(path.clone()).or_default().push(i)
                    }
                    (Some(StringMatch::Prefix(prefix)), false) => {
                        index.prefix.entry(prefix.clone()).or_default().push(i)
                    }
                    // `/a/` also matches `/a`: index the prefix without it.
                    (Some(StringMatch::PathPrefix(prefix)), false) => {
                        let prefix = prefix.trim_end_matches('/').to_owned();
                        index.prefix.entry(prefix).or_default().push(i)
                    }
                    _ => index.any.push(i),
                }
            }
        }
        index.prefix_lengths = index.prefix.keys().map(String::len).collect();
        index.prefix_lengths.sort_unstable();
        index.prefix_lengths.dedup();
        Some(index)
    }

    /// The routes that may match `path`, in route order.
    pub fn candidates(&self, path: &str) -> Vec<u32> {
        let mut found = self.any.clone();
        if let Some(routes) = self.exact.get(path) {
            found.extend(routes);
        }
        for &len in &self.prefix_lengths {
            if len > path.len() {
                break;
            }
            if let Some(routes) = path.get(..len).and_then(|p| self.prefix.get(p)) {
                found.extend(routes);
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{HeaderOps, RequestMatch, RouteAction};

    fn route(uri: Option<StringMatch>, ignore_uri_case: bool) -> HttpRoute {
        let matches = match uri {
            Some(uri) => vec![RequestMatch {
                uri: Some(uri),
                ignore_uri_case,
                ..RequestMatch::default()
            }],
            None => Vec::new(),
        };
        HttpRoute {
            name: "r".into(),
            matches,
            action: RouteAction::Forward(Vec::new()),
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
            headers: HeaderOps::default(),
            rewrite: None,
        }
    }

    #[test]
    fn keeps_every_route_that_may_match_in_order() {
        let mut routes: Vec<HttpRoute> = (0..20)
            .map(|i| route(Some(StringMatch::Exact(format!("/r{i}"))), false))
            .collect();
        routes.push(route(Some(StringMatch::Prefix("/api".into())), false)); // 20
        routes.push(route(Some(StringMatch::PathPrefix("/v1/".into())), false)); // 21
        routes.push(route(Some(StringMatch::Exact("/R3".into())), true)); // 22
        routes.push(route(None, false)); // 23
        let index = PathIndex::build(&routes).unwrap();
        assert_eq!(index.candidates("/r3"), [3, 22, 23]);
        assert_eq!(index.candidates("/api/x"), [20, 22, 23]);
        assert_eq!(index.candidates("/v1"), [21, 22, 23]);
        assert_eq!(index.candidates("/v1/x"), [21, 22, 23]);
        assert_eq!(index.candidates("/other"), [22, 23]);
        assert!(PathIndex::build(&routes[..3]).is_none());
    }
}
