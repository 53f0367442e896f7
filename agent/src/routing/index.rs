//! Which routes of a Service can match a request's path, found without
//! trying them all. The first matching route still wins: candidates are
//! tried in order. But a route whose every match block needs another exact
//! path or another prefix is never looked at, so a Service with thousands
//! of path routes costs a request a few hash lookups, not a scan.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use super::{HttpRoute, StringMatch};

/// Below this many routes a plain scan is as cheap as the index.
const INDEXED_FROM: usize = 16;

/// Keys are hashes of paths, not the paths: a table of 10 000 exact-path
/// routes would otherwise hold every path twice. A hash collision only adds
/// a candidate, which is then tried and rejected like any other.
#[derive(Debug, Clone, Default)]
pub struct PathIndex {
    /// Routes with a block that leaves the path open (or no blocks at all).
    any: Box<[u32]>,
    exact: PathMap,
    prefix: PathMap,
    /// The distinct lengths of the indexed prefixes, ascending.
    prefix_lengths: Box<[usize]>,
    hasher: RandomState,
}

/// Path hash → the routes indexed under it, as a range of `routes`.
#[derive(Debug, Clone, Default)]
struct PathMap {
    ranges: HashMap<u64, (u32, u32)>,
    /// Route numbers grouped by hash, each group in route order.
    routes: Box<[u32]>,
}

impl PathMap {
    /// From (hash, route) pairs in any order.
    fn build(mut entries: Vec<(u64, u32)>) -> PathMap {
        entries.sort_unstable();
        entries.dedup();
        let mut ranges = HashMap::new();
        for (i, &(hash, _)) in entries.iter().enumerate() {
            let i = i as u32;
            ranges.entry(hash).or_insert((i, i)).1 = i + 1;
        }
        ranges.shrink_to_fit();
        let routes = entries.into_iter().map(|(_, route)| route).collect();
        PathMap { ranges, routes }
    }

    fn get(&self, hash: u64) -> &[u32] {
        match self.ranges.get(&hash) {
            Some(&(start, end)) => &self.routes[start as usize..end as usize],
            None => &[],
        }
    }
}

impl PathIndex {
    /// `None` when the routes are too few to be worth indexing.
    pub fn build(routes: &[HttpRoute]) -> Option<PathIndex> {
        if routes.len() < INDEXED_FROM {
            return None;
        }
        let hasher = RandomState::new();
        let (mut any, mut exact, mut prefix) = (Vec::new(), Vec::new(), Vec::new());
        let mut prefix_lengths = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let i = i as u32;
            if route.matches.is_empty() {
                any.push(i);
            }
            for block in &route.matches {
                let mut add_prefix = |p: &str| {
                    prefix_lengths.push(p.len());
                    prefix.push((hasher.hash_one(p), i));
                };
                match (&block.uri, block.ignore_uri_case) {
                    (Some(StringMatch::Exact(path)), false) => {
                        exact.push((hasher.hash_one(&**path), i))
                    }
                    (Some(StringMatch::Prefix(p)), false) => add_prefix(p),
                    // `/a/` also matches `/a`: index the prefix without it.
                    (Some(StringMatch::PathPrefix(p)), false) => {
                        add_prefix(p.trim_end_matches('/'))
                    }
                    _ => any.push(i),
                }
            }
        }
        prefix_lengths.sort_unstable();
        prefix_lengths.dedup();
        any.dedup();
        Some(PathIndex {
            any: any.into(),
            exact: PathMap::build(exact),
            prefix: PathMap::build(prefix),
            prefix_lengths: prefix_lengths.into(),
            hasher,
        })
    }

    /// The routes that may match `path`, in route order.
    pub fn candidates(&self, path: &str) -> Vec<u32> {
        let mut found = self.any.to_vec();
        found.extend(self.exact.get(self.hasher.hash_one(path)));
        for &len in &self.prefix_lengths {
            if len > path.len() {
                break;
            }
            if let Some(p) = path.get(..len) {
                found.extend(self.prefix.get(self.hasher.hash_one(p)));
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
    use crate::routing::{RequestMatch, RouteAction};

    fn route(uri: Option<StringMatch>, ignore_uri_case: bool) -> HttpRoute {
        let matches = match uri {
            Some(uri) => Box::new([RequestMatch {
                uri: Some(uri),
                ignore_uri_case,
                ..RequestMatch::default()
            }]),
            None => Box::default(),
        };
        HttpRoute {
            name: "r".into(),
            matches,
            action: RouteAction::Forward(Box::default()),
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Box::default(),
            headers: None,
            rewrite: None,
        }
    }

    #[test]
    fn keeps_every_route_that_may_match_in_order() {
        let mut routes: Vec<HttpRoute> = (0..20)
            .map(|i| route(Some(StringMatch::Exact(format!("/r{i}").into())), false))
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
