//! Protocol detection on a redirected connection: peek (never consume) the
//! client's first bytes and decide between HTTP/1.1, HTTP/2 with prior
//! knowledge (h2c, gRPC) and opaque TCP.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ServicePort;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/1 methods that start a request we route; anything else is opaque.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

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

/// Classifies what the client has sent so far; `None` while undecided.
fn classify(bytes: &[u8]) -> Option<Detected> {
    let n = bytes.len();
    let k = n.min(H2_PREFACE.len());
    if bytes[..k] == H2_PREFACE[..k] {
        return (n >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let mut undecided = false;
    for method in METHODS {
        let k = n.min(method.len());
        if bytes[..k] == method[..k] {
            if n >= method.len() {
                return Some(Detected::Http1);
            }
            undecided = true;
        }
    }
    (!undecided).then_some(Detected::Opaque)
}

/// Waits for the client's first bytes, at most `wait`; a client that says
/// nothing (or too little to tell) in time is opaque.
pub async fn sniff(client: &TcpStream, wait: Duration) -> Detected {
    let sniffing = async {
        let mut buf = [0u8; 32];
        loop {
            match client.peek(&mut buf).await {
                Ok(0) | Err(_) => return Detected::Opaque,
                Ok(n) => match classify(&buf[..n]) {
                    Some(found) => return found,
                    // A partial first segment: the rest is on its way.
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                },
            }
        }
    };
    tokio::time::timeout(wait, sniffing)
        .await
        .unwrap_or(Detected::Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"CONNECT a:1 HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Opaque)); // TLS
        assert_eq!(classify(b"EHLO x\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
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
