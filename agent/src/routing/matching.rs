//! Evaluating match conditions against one request.

use http::HeaderMap;

use super::{RequestMatch, StringMatch};

/// What route matching may look at, borrowed from the request.
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// The port the client connected to.
    pub port: u16,
    pub source_namespace: &'a str,
    pub source_labels: &'a crate::config::Labels,
}

impl RequestMatch {
    pub fn matches(&self, r: &RequestInfo<'_>) -> bool {
        let uri_ok = self.uri.as_ref().is_none_or(|m| {
            if self.ignore_uri_case {
                m.matches_ignore_case(r.path)
            } else {
                m.matches(r.path)
            }
        });
        uri_ok
            && self.port.is_none_or(|p| p == r.port)
            && self.method.as_ref().is_none_or(|m| m.matches(r.method))
            && self.scheme.as_ref().is_none_or(|m| m.matches(r.scheme))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(r.authority))
            && self
                .source_namespace
                .as_ref()
                .is_none_or(|ns| **ns == *r.source_namespace)
            && self
                .source_labels
                .iter()
                .all(|(k, v)| r.source_labels.get(k) == Some(&**v))
            && self
                .headers
                .iter()
                .all(|(name, m)| header_matches(r.headers, name, m))
            && !self
                .without_headers
                .iter()
                .any(|(name, m)| header_matches(r.headers, name, m))
            && self
                .query_params
                .iter()
                .all(|(name, m)| query_param(r.query, name).is_some_and(|v| m.matches(v)))
    }
}

fn header_matches(headers: &HeaderMap, name: &str, m: &StringMatch) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
}

/// The first value of `name` in a query string (not percent-decoded, as in Envoy).
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == &**s,
            StringMatch::Prefix(p) => value.starts_with(&**p),
            StringMatch::PathPrefix(p) => path_prefix(value, p),
            StringMatch::Regex(re) => re.is_match(value),
            StringMatch::Present => true,
        }
    }

    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StringMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            StringMatch::PathPrefix(p) => {
                path_prefix(&value.to_ascii_lowercase(), &p.to_ascii_lowercase())
            }
            // Istio ignores `ignoreUriCase` for regexes too; `(?i)` is the way.
            StringMatch::Regex(_) | StringMatch::Present => self.matches(value),
        }
    }
}

fn path_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Labels;

    fn info<'a>(
        path: &'a str,
        headers: &'a HeaderMap,
        labels: &'a crate::config::Labels,
    ) -> RequestInfo<'a> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        RequestInfo {
            method: "GET",
            path,
            query,
            scheme: "http",
            authority: "reviews:9080",
            headers,
            port: 9080,
            source_namespace: "bookinfo",
            source_labels: labels,
        }
    }

    fn regex(s: &str) -> StringMatch {
        StringMatch::Regex(regex::Regex::new(&format!("^(?:{s})$")).unwrap().into())
    }

    #[test]
    fn string_matches() {
        assert!(StringMatch::Exact("/a".into()).matches("/a"));
        assert!(!StringMatch::Exact("/a".into()).matches("/ab"));
        assert!(StringMatch::Prefix("/a".into()).matches("/ab"));
        assert!(StringMatch::PathPrefix("/a".into()).matches("/a/b"));
        assert!(StringMatch::PathPrefix("/a/".into()).matches("/a"));
        assert!(!StringMatch::PathPrefix("/a".into()).matches("/ab"));
        assert!(StringMatch::PathPrefix("/".into()).matches("/anything"));
        // Regexes are anchored, as Envoy's RE2 matches are.
        assert!(regex("/v[0-9]+").matches("/v12"));
        assert!(!regex("/v[0-9]+").matches("/v12/x"));
        assert!(StringMatch::Prefix("/API".into()).matches_ignore_case("/api/x"));
    }

    #[test]
    fn all_conditions_must_hold() {
        let mut headers = HeaderMap::new();
        headers.insert("end-user", "jason".parse().unwrap());
        let labels = Labels::from_iter([("app", "productpage")]);
        let request = info("/reviews/1?debug=yes", &headers, &labels);
        let mut m = RequestMatch {
            uri: Some(StringMatch::Prefix("/reviews".into())),
            headers: Box::new([("end-user".into(), StringMatch::Exact("jason".into()))]),
            query_params: Box::new([("debug".into(), StringMatch::Exact("yes".into()))]),
            source_labels: Box::new([("app".into(), "productpage".into())]),
            source_namespace: Some("bookinfo".into()),
            port: Some(9080),
            ..RequestMatch::default()
        };
        assert!(m.matches(&request));
        m.without_headers = Box::new([("end-user".into(), StringMatch::Present)]);
        assert!(!m.matches(&request));
        m.without_headers = Box::default();
        m.headers = Box::new([("end-user".into(), StringMatch::Exact("mike".into()))]);
        assert!(!m.matches(&request));
        m.headers = Box::default();
        m.source_namespace = Some("other".into());
        assert!(!m.matches(&request));
    }
}
