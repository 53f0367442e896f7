//! Protocol detection on a redirected connection: peek (never consume) the
//! client's first bytes and decide between HTTP/1.1, HTTP/2 with prior
//! knowledge (h2c, gRPC) and opaque TCP.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ServicePort;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The methods of RFC 9110 and PATCH. A request line may use any token as
/// its method, but these are what a client that speaks HTTP sends first; they
/// are matched case-insensitively here so that `get /admin` cannot pass for
/// opaque TCP (the L7 path then rejects the lowercase method).
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];

/// How much of the client's first bytes detection looks at: enough for the
/// request line of any reasonable request.
pub const SNIFF_LIMIT: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
}

/// What a Service port says about its protocol (Istio's rules: the port's
/// `appProtocol`, else its name or the name's prefix before `-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    Http,
    Opaque,
    /// Not declared: detect, without delaying server-first protocols.
    Unknown,
}

pub fn declared(port: &ServicePort) -> Declared {
    let name = port
        .name
        .as_deref()
        .map(|n| n.split('-').next().unwrap_or(n));
    let Some(protocol) = port.app_protocol.as_deref().or(name) else {
        return Declared::Unknown;
    };
    match protocol.to_ascii_lowercase().as_str() {
        "http" | "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c"
        | "kubernetes.io/ws" => Declared::Http,
        "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" | "kubernetes.io/wss" => {
            Declared::Opaque
        }
        _ => Declared::Unknown,
    }
}

/// Classifies what the client has sent so far on a port whose protocol is
/// not declared. `None` while undecided; `last` says no more bytes will be
/// waited for (timeout, end of stream, or [`SNIFF_LIMIT`] reached), which
/// forces a decision.
///
/// The rule errs towards HTTP, so that a request cannot skip L7 policy by
/// being slightly malformed: whatever looks like the start of an HTTP request
/// (the HTTP/2 preface or part of it, leading empty lines, a known method in
/// any case, or a first line that names an `HTTP/` version) is handed to the
/// HTTP parser, which answers `400` if it does not parse. Opaque is only what
/// clearly is not HTTP: a first byte that cannot start a request line (TLS,
/// binary protocols: decided at once) or a complete first line that is not a
/// request line.
pub fn classify(bytes: &[u8], last: bool) -> Option<Detected> {
    let k = bytes.len().min(H2_PREFACE.len());
    if !bytes.is_empty() && bytes[..k] == H2_PREFACE[..k] {
        return match bytes.len() >= H2_PREFACE.len() {
            true => Some(Detected::Http2),
            // A cut-short preface is HTTP that will not parse.
            false => last.then_some(Detected::Http1),
        };
    }
    let rest = trim_empty_lines(bytes);
    if rest.len() < bytes.len() {
        // RFC 9112 §2.2: a server ignores empty lines before a request.
        return Some(Detected::Http1);
    }
    let Some(&first) = rest.first() else {
        return last.then_some(Detected::Opaque);
    };
    if !is_tchar(first) {
        return Some(Detected::Opaque);
    }
    let token_end = rest.iter().position(|&b| b == b' ' || b == b'\t');
    let token = &rest[..token_end.unwrap_or(rest.len())];
    if token_end.is_some() && is_method(token) {
        return Some(Detected::Http1);
    }
    if token_end.is_none() && (is_method(token) || is_method_prefix(token)) {
        // `GE`, `get`: the rest of the method is on its way; if it never
        // comes, the client was still starting an HTTP request.
        return last.then_some(Detected::Http1);
    }
    match rest.iter().position(|&b| b == b'\n') {
        Some(end) => Some(match names_http_version(&rest[..end]) {
            true => Detected::Http1,
            false => Detected::Opaque,
        }),
        None if last => Some(match names_http_version(rest) {
            true => Detected::Http1,
            false => Detected::Opaque,
        }),
        None => None,
    }
}

fn trim_empty_lines(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_method(token: &[u8]) -> bool {
    METHODS.iter().any(|m| m.eq_ignore_ascii_case(token))
}

fn is_method_prefix(token: &[u8]) -> bool {
    METHODS
        .iter()
        .any(|m| m.len() > token.len() && m[..token.len()].eq_ignore_ascii_case(token))
}

/// The line mentions an HTTP version (`HTTP/1.1`, `http/1.0`...), as the end
/// of a request line does.
fn names_http_version(line: &[u8]) -> bool {
    line.windows(5).any(|w| w.eq_ignore_ascii_case(b"HTTP/"))
}

/// On a port declared HTTP, the only question is which version: the HTTP/2
/// preface, else HTTP/1 (whose parser rejects what is not HTTP with `400`).
/// `None` while the bytes are still a prefix of the preface.
pub fn classify_declared(bytes: &[u8], last: bool) -> Option<Detected> {
    match classify(bytes, last) {
        Some(Detected::Http2) => Some(Detected::Http2),
        None if !last && H2_PREFACE.starts_with(bytes) => None,
        _ => Some(Detected::Http1),
    }
}

/// Waits for the client's first bytes, at most `wait`, and classifies them
/// with `rule` ([`classify`] or [`classify_declared`]; `rule` is told when
/// no more bytes will be looked at). `None`: the client closed or sent
/// nothing in time.
pub async fn sniff<T>(
    client: &TcpStream,
    wait: Duration,
    rule: fn(&[u8], bool) -> Option<T>,
) -> Option<T> {
    let mut buf = vec![0u8; SNIFF_LIMIT];
    let mut seen = 0;
    let sniffing = async {
        loop {
            match client.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    seen = n;
                    if let Some(found) = rule(&buf[..n], n == buf.len()) {
                        return Some(found);
                    }
                    // A partial first segment: the rest is on its way.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    };
    match tokio::time::timeout(wait, sniffing).await {
        Ok(found) => found,
        Err(_) if seen == 0 => None,
        Err(_) => rule(&buf[..seen], true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(bytes: &[u8]) -> Option<Detected> {
        classify(bytes, false)
    }

    fn finally(bytes: &[u8]) -> Option<Detected> {
        classify(bytes, true)
    }

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(now(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(now(b"CONNECT a:1 HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(now(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(now(b"PRI * HT"), None);
        assert_eq!(now(b"GE"), None);
        assert_eq!(now(b"\x16\x03\x01"), Some(Detected::Opaque)); // TLS
        assert_eq!(now(b"EHLO x\r\n"), Some(Detected::Opaque));
        assert_eq!(now(b"GETX\r\n"), Some(Detected::Opaque));
        assert_eq!(now(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Detected::Opaque));
        // A Redis inline command is not a request line.
        assert_eq!(now(b"GETX key\r\n"), Some(Detected::Opaque));
    }

    #[test]
    fn malformed_requests_are_http_not_opaque() {
        // Each of these was relayed as opaque TCP, skipping L7 policy.
        assert_eq!(now(b"\r\nGET /admin HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(now(b"\n"), Some(Detected::Http1));
        assert_eq!(now(b"get /admin HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(now(b"G\0ET /admin HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(now(b"GE\0T /admin http/1.1\r\n"), Some(Detected::Http1));
        // Sent slowly: what has arrived when detection gives up still counts.
        assert_eq!(finally(b"ge"), Some(Detected::Http1));
        assert_eq!(finally(b"GET"), Some(Detected::Http1));
        assert_eq!(finally(b"PRI * HT"), Some(Detected::Http1));
        assert_eq!(finally(b"G\0ET /admin HTTP/1"), Some(Detected::Http1));
        assert_eq!(now(b"G\0ET /admin HTTP/1"), None);
        // Silence, or bytes that are clearly something else.
        assert_eq!(finally(b""), Some(Detected::Opaque));
        assert_eq!(finally(b"HELLO"), Some(Detected::Opaque));
    }

    #[test]
    fn declared_ports_are_always_http() {
        let declared = |b: &[u8], last| classify_declared(b, last);
        assert_eq!(declared(H2_PREFACE, false), Some(Detected::Http2));
        assert_eq!(declared(b"PRI * ", false), None);
        assert_eq!(declared(b"PRI * ", true), Some(Detected::Http1));
        assert_eq!(declared(b"\x16\x03\x01", false), Some(Detected::Http1));
        assert_eq!(declared(b"EHLO x\r\n", false), Some(Detected::Http1));
        assert_eq!(declared(b"", true), Some(Detected::Http1));
    }

    #[test]
    fn reads_declared_protocols_like_istio() {
        let port = |name: Option<&str>, app: Option<&str>| ServicePort {
            name: name.map(str::to_owned),
            port: 80,
            target_port: 80,
            protocol: crate::config::Protocol::Tcp,
            app_protocol: app.map(str::to_owned),
        };
        assert_eq!(declared(&port(Some("http-web"), None)), Declared::Http);
        assert_eq!(declared(&port(Some("grpc"), None)), Declared::Http);
        assert_eq!(declared(&port(Some("tcp-db"), None)), Declared::Opaque);
        assert_eq!(declared(&port(Some("http"), Some("tcp"))), Declared::Opaque);
        assert_eq!(declared(&port(Some("web"), None)), Declared::Unknown);
        assert_eq!(declared(&port(None, None)), Declared::Unknown);
    }
}
