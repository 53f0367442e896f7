//! `X-Forwarded-Client-Cert` for the certificate a client presented at a
//! gateway server, as Istio's gateway sets it (Envoy's
//! `forward_client_cert_details: SANITIZE_SET` with the details Hash,
//! Subject, URI and DNS): `By=` the server certificate's URI SANs, `Hash=`
//! the hex SHA-256 of the client certificate's DER, `Subject=` its subject
//! in RFC 2253 form (always quoted), `URI=` its first URI SAN (empty if
//! none), and one `DNS=` per DNS SAN. A value holding `,` `;` or `=` is
//! quoted, and `"` in a quoted value is escaped, as Envoy's format says.

use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

/// The XFCC element for the client certificate `leaf` at a server whose
/// own certificate carries the URI SANs `by`; `None` if `leaf` does not
/// parse.
pub fn element(leaf: &[u8], by: &[String]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let mut parts: Vec<String> = by.iter().map(|uri| format!("By={}", value(uri))).collect();
    parts.push(format!("Hash={}", sha256_hex(leaf)?));
    parts.push(format!("Subject=\"{}\"", escape(&rfc2253(cert.subject()))));
    let (uris, dns) = sans(&cert);
    parts.push(format!("URI={}", uris.first().map_or("", |u| u)));
    parts.extend(dns.iter().map(|name| format!("DNS={}", value(name))));
    Some(parts.join(";"))
}

/// The URI SANs of the certificate `der` (a server's, for `By=`).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| sans(&cert).0)
        .unwrap_or_default()
}

/// (URI SANs, DNS SANs), in certificate order.
fn sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    let names = cert.subject_alternative_name().ok().flatten();
    for name in names.iter().flat_map(|san| &san.value.general_names) {
        match name {
            GeneralName::URI(uri) => uris.push((*uri).to_owned()),
            GeneralName::DNSName(name) => dns.push((*name).to_owned()),
            _ => {}
        }
    }
    (uris, dns)
}

fn sha256_hex(data: &[u8]) -> Option<String> {
    let suite = TLS13_AES_128_GCM_SHA256.tls13()?;
    let digest = suite.common.hash_provider.hash(data);
    Some(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// A value as XFCC carries it: quoted when it holds a separator.
fn value(raw: &str) -> String {
    if raw.contains([',', ';', '=', '"']) {
        format!("\"{}\"", escape(raw))
    } else {
        raw.to_owned()
    }
}

fn escape(raw: &str) -> String {
    raw.replace('"', "\\\"")
}

/// The name as OpenSSL's `XN_FLAG_RFC2253` prints it (Envoy's subject):
/// the last RDN first, `,` between RDNs, `+` within one, special
/// characters escaped.
fn rfc2253(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            let attributes: Vec<String> = rdn
                .iter()
                .map(|attribute| {
                    let oid = attribute.attr_type();
                    let key = oid2abbrev(oid, oid_registry())
                        .map_or_else(|_| oid.to_id_string(), str::to_owned);
                    let text = attribute.as_str().unwrap_or_default();
                    format!("{key}={}", rfc2253_value(text))
                })
                .collect();
            attributes.join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn rfc2253_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        let edge_space = c == ' ' && (i == 0 || i == last);
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || edge_space
            || (i == 0 && c == '#')
        {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    use super::*;

    #[test]
    fn envoys_format_for_a_client_certificate() {
        let mut params = CertificateParams::new(vec!["client.example.com".into()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::DnsName("b.example.com".try_into().unwrap()));
        params
            .subject_alt_names
            .push(SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap()));
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme, Inc.");
        params.distinguished_name.push(DnType::CommonName, "client");
        let key = KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let by = ["spiffe://td/ns/istio-system/sa/nodemesh-ingress".to_owned()];
        let xfcc = element(&der, &by).unwrap();
        let parts: Vec<&str> = xfcc.split(';').collect();
        assert_eq!(parts[0], by.map(|b| format!("By={b}"))[0]);
        let hash = parts[1].strip_prefix("Hash=").unwrap();
        assert_eq!(hash.len(), 64);
        assert!(hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(
            &parts[2..],
            [
                r#"Subject="CN=client,O=Acme\, Inc.""#,
                "URI=spiffe://td/ns/a/sa/b",
                "DNS=client.example.com",
                "DNS=b.example.com",
            ]
        );
        // No URI SAN: the key stays, empty; no server URI: no `By`.
        let plain = CertificateParams::new(vec!["x.example.com".into()]).unwrap();
        let der = plain.self_signed(&key).unwrap().der().to_vec();
        let xfcc = element(&der, &[]).unwrap();
        assert!(xfcc.starts_with("Hash="), "{xfcc}");
        assert!(xfcc.ends_with(";URI=;DNS=x.example.com"), "{xfcc}");
        assert_eq!(value("a=b"), "\"a=b\"");
        assert_eq!(value("say \"hi\""), "\"say \\\"hi\\\"\"");
    }
}
