//! Request paths normalized as Istio's default (`BASE`) has Envoy do it:
//! percent-encoded unreserved characters decoded and dot segments removed
//! (RFC 3986 §6.2.2), while `%2F` and `//` stay as they are. The path an
//! AuthorizationPolicy judges is then the path the application gets, so
//! `/public/../admin` or `/%61dmin` cannot pass a rule on `/admin`.

/// The normalized form of `path_and_query`, when it differs.
pub fn normalize(path_and_query: &str) -> Option<String> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let dotted = |p: &str| p.split('/').any(|s| s == "." || s == "..");
    if !path.starts_with('/') || (!path.contains('%') && !dotted(path)) {
        return None;
    }
    let decoded = decode_unreserved(path);
    let mut out = remove_dot_segments(&decoded);
    if out == path {
        return None;
    }
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Some(out)
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        let escaped = (bytes[i] == b'%')
            .then(|| Some(hex(*bytes.get(i + 1)?)? * 16 + hex(*bytes.get(i + 2)?)?))
            .flatten();
        match escaped {
            Some(value) => {
                let c = value as u8 as char;
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                    out.push(c);
                } else {
                    out.push_str(&format!("%{value:02X}"));
                }
                i += 3;
            }
            None => {
                let c = path[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// RFC 3986 §5.2.4 for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    kept.pop();
                }
                if i == last {
                    kept.push("");
                }
            }
            other => kept.push(other),
        }
    }
    format!("/{}", kept.join("/"))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn dot_segments_and_unreserved_escapes_are_resolved() {
        let cases = [
            ("/public/../admin", Some("/admin")),
            ("/%61dmin?x=1", Some("/admin?x=1")),
            ("/a/%2e%2E/admin", Some("/admin")),
            ("/a/./b/.", Some("/a/b/")),
            ("/../../etc", Some("/etc")),
            ("/a/..", Some("/")),
            ("/a%2Fb", None),
            ("/a%2fb", Some("/a%2Fb")),
            ("//a//b", None),
            ("/plain/path?q=../x", None),
            ("/caf%C3%A9", None),
        ];
        for (path, expected) in cases {
            assert_eq!(normalize(path).as_deref(), expected, "{path}");
        }
    }
}
