//! The server name a client asks for in its TLS ClientHello, read from the
//! connection's first bytes without consuming them: what an
//! AuthorizationPolicy's `connection.sni` is matched against.

use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::net::TcpStream;

use super::detect::{self, SNIFF_LIMIT};
use super::peer::Prefixed;

/// The server name of the ClientHello `client` opens with, peeked within
/// `wait`.
pub async fn peek(client: &TcpStream, wait: Duration) -> Option<String> {
    let rule = |bytes: &[u8], last: bool| match server_name(bytes) {
        Some(name) => Some(Some(name)),
        None if last || !partial_hello(bytes) => Some(None),
        None => None,
    };
    detect::sniff(client, wait, rule).await.flatten()
}

/// [`peek`] on a stream whose first bytes are kept in its head.
pub async fn read<S: AsyncRead + Unpin>(
    client: &mut Prefixed<S>,
    wait: Duration,
) -> Option<String> {
    let reading = async {
        loop {
            if let Some(name) = server_name(client.head()) {
                return Some(name);
            }
            if !partial_hello(client.head()) || client.read_more(SNIFF_LIMIT).await.ok()? == 0 {
                return None;
            }
        }
    };
    tokio::time::timeout(wait, reading).await.ok().flatten()
}

/// Whether `head` may be the start of a TLS handshake record still on its
/// way.
fn partial_hello(head: &[u8]) -> bool {
    match head {
        [] => true,
        [22, rest @ ..] if rest.len() < 4 => true,
        [22, _, _, high, low, record @ ..] => {
            record.len() < usize::from(u16::from_be_bytes([*high, *low]))
                && head.len() < SNIFF_LIMIT
        }
        _ => false,
    }
}

/// The `server_name` extension of the ClientHello that `head` starts with
/// (RFC 8446 §4.1.2, RFC 6066 §3); `None` if it is not one, is cut short,
/// or names no host.
pub fn server_name(head: &[u8]) -> Option<String> {
    let mut r = Reader(head);
    // TLS record: handshake (22), version, length.
    if r.u8()? != 22 {
        return None;
    }
    r.skip(4)?;
    // Handshake: client_hello (1), 24-bit length.
    if r.u8()? != 1 {
        return None;
    }
    r.skip(3)?;
    r.skip(2 + 32)?; // legacy_version, random
    let session_id = r.u8()? as usize;
    r.skip(session_id)?;
    let suites = r.u16()? as usize;
    r.skip(suites)?;
    let compression = r.u8()? as usize;
    r.skip(compression)?;
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = Reader(extensions.vec16()?);
        if kind != 0 {
            continue;
        }
        let mut names = Reader(data.vec16()?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, &self.0[n..]);
        self.0 = rest;
        Some(head)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 16-bit length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::server_name;

    /// A real ClientHello, written by rustls.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_server_name_of_a_client_hello() {
        let hello = client_hello("DB.shop.svc.cluster.local");
        assert_eq!(
            server_name(&hello).as_deref(),
            Some("db.shop.svc.cluster.local")
        );
        // Cut short, or not TLS at all.
        assert_eq!(server_name(&hello[..hello.len() / 2]), None);
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(server_name(b""), None);
    }
}
