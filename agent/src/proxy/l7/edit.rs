//! Request and response edits a route asks for: header edits, path and
//! authority rewrites, redirects.

use http::header::{HeaderName, HeaderValue, LOCATION};
use http::{HeaderMap, Response, StatusCode};

use super::body::{self, Body};
use crate::routing::{HeaderEdits, PathRewrite, Redirect, RequestMatch, StringMatch};

/// Removes, then sets, then appends, as Envoy does.
pub fn apply(headers: &mut HeaderMap, edits: &HeaderEdits) {
    for name in &edits.remove {
        headers.remove(&**name);
    }
    let parsed = |(n, v): &(Box<str>, Box<str>)| {
        Some((
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (name, value) in edits.set.iter().filter_map(parsed) {
        headers.insert(name, value);
    }
    for (name, value) in edits.add.iter().filter_map(parsed) {
        headers.append(name, value);
    }
}

/// The new path (query kept) for `rewrite` of `path_and_query`, given the
/// match block that selected the route.
pub fn rewrite_path(
    rewrite: &PathRewrite,
    path_and_query: &str,
    matched: Option<&RequestMatch>,
) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let new_path = match rewrite {
        PathRewrite::Full(new) => new.clone(),
        PathRewrite::Regex { pattern, rewrite } => {
            // Istio writes groups as `\1`; the regex crate as `${1}`.
            let replacement = backslash_groups(rewrite);
            pattern.replace_all(path, replacement.as_str()).into_owned()
        }
        PathRewrite::MatchedPrefix(new) => match matched.and_then(|m| m.uri.as_ref()) {
            Some(StringMatch::Prefix(prefix) | StringMatch::PathPrefix(prefix))
                if path.len() >= prefix.len() =>
            {
                let rest = &path[prefix.len()..];
                if new.ends_with('/') && rest.starts_with('/') {
                    format!("{new}{}", &rest[1..])
                } else if new.is_empty() && !rest.starts_with('/') {
                    format!("/{rest}")
                } else {
                    format!("{new}{rest}")
                }
            }
            _ => new.clone(),
        },
    };
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

fn backslash_groups(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str("${");
                out.push(*d);
                out.push('}');
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// The redirect reply for a request to `authority` + `path_and_query`.
pub fn redirect(
    redirect: &Redirect,
    authority: &str,
    path_and_query: &str,
    matched: Option<&RequestMatch>,
) -> Response<Body> {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let mut host = redirect
        .authority
        .clone()
        .unwrap_or_else(|| authority.to_owned());
    if let Some(port) = redirect.port {
        let bare = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h.to_owned(),
            _ => host.clone(),
        };
        host = format!("{bare}:{port}");
    }
    let path = match &redirect.path {
        Some(rewrite) => rewrite_path(rewrite, path_and_query, matched),
        None => path_and_query.to_owned(),
    };
    let mut response = Response::new(body::empty());
    *response.status_mut() =
        StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(location) = HeaderValue::from_str(&format!("{scheme}://{host}{path}")) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix_match(p: &str) -> RequestMatch {
        RequestMatch {
            uri: Some(StringMatch::Prefix(p.into())),
            ..RequestMatch::default()
        }
    }

    #[test]
    fn rewrites_the_matched_prefix_and_keeps_the_query() {
        let m = prefix_match("/ratings");
        let r = PathRewrite::MatchedPrefix("/v1/bookRatings".into());
        assert_eq!(
            rewrite_path(&r, "/ratings/2?x=1", Some(&m)),
            "/v1/bookRatings/2?x=1"
        );
        let m = prefix_match("/api/");
        assert_eq!(
            rewrite_path(&PathRewrite::MatchedPrefix("/".into()), "/api/x", Some(&m)),
            "/x"
        );
        // Not a prefix match: the whole path is replaced.
        assert_eq!(rewrite_path(&r, "/ratings/2", None), "/v1/bookRatings");
    }

    #[test]
    fn regex_rewrite_uses_istio_groups() {
        let r = PathRewrite::Regex {
            pattern: regex::Regex::new("^/service/([^/]+)(/.*)$").unwrap().into(),
            rewrite: "\\2/instance/\\1".into(),
        };
        assert_eq!(
            rewrite_path(&r, "/service/foo/v1/api", None),
            "/v1/api/instance/foo"
        );
    }

    #[test]
    fn header_edits_remove_set_and_add() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-b", "1".parse().unwrap());
        apply(
            &mut h,
            &HeaderEdits {
                set: Box::new([("x-a".into(), "2".into())]),
                add: Box::new([("x-c".into(), "3".into())]),
                remove: Box::new(["x-b".into()]),
            },
        );
        assert_eq!(h["x-a"], "2");
        assert_eq!(h["x-c"], "3");
        assert!(!h.contains_key("x-b"));
    }

    #[test]
    fn redirects_to_a_new_authority_and_port() {
        let r = Redirect {
            scheme: Some("https".into()),
            authority: None,
            port: Some(8443),
            path: Some(PathRewrite::Full("/new".into())),
            status: 302,
        };
        let reply = redirect(&r, "web:80", "/old?q=1", None);
        assert_eq!(reply.status(), 302);
        assert_eq!(reply.headers()[LOCATION], "https://web:8443/new?q=1");
    }
}
