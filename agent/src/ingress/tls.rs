//! TLS at the ingress gateway: an Istio Gateway server's `tls` block, read
//! with Istio's field names and compiled into settings ([`compile`]), and
//! the per-port acceptor that picks a server by SNI and terminates or
//! passes the connection through ([`TlsAcceptor`]).
//!
//! rustls implements TLS 1.2 and 1.3 only: a minimum of `TLSV1_0` or
//! `TLSV1_1` means 1.2 (the oldest the agent can speak), a maximum below 1.2
//! is an error.

mod accept;
mod by_sni;
mod ciphers;
#[cfg(test)]
mod tests;
mod xfcc;

use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SupportedProtocolVersion};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::config::secret::Secrets;
use crate::config::{Config, Issues, Labels};
use crate::identity::{self, x509, Identities};
use crate::routing::ingress::{Gateway, Server, ServerRef};

pub use accept::{
    AcceptError, Accepted, Alpn, ClientIdentity, MeshIdentity, Terminated, TlsAcceptor, TlsError,
};
pub use by_sni::SniIndex;

/// `servers[].tls` of an Istio Gateway (`ServerTLSSettings`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerTlsSpec {
    #[serde(default)]
    https_redirect: bool,
    mode: Option<ModeSpec>,
    credential_name: Option<String>,
    credential_names: Option<IgnoredAny>,
    tls_certificates: Option<IgnoredAny>,
    server_certificate: Option<String>,
    private_key: Option<String>,
    ca_certificates: Option<String>,
    ca_crl: Option<IgnoredAny>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    verify_certificate_spki: Option<IgnoredAny>,
    verify_certificate_hash: Option<IgnoredAny>,
    min_protocol_version: Option<VersionSpec>,
    max_protocol_version: Option<VersionSpec>,
    #[serde(default)]
    cipher_suites: Vec<String>,
}

impl ServerTlsSpec {
    /// Terminating with the certificate of Secret `credential_name`, as a
    /// Gateway API listener's `certificateRefs` asks.
    pub(crate) fn terminate(credential_name: String) -> ServerTlsSpec {
        ServerTlsSpec {
            mode: Some(ModeSpec::Simple),
            credential_name: Some(credential_name),
            ..ServerTlsSpec::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ModeSpec {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
enum VersionSpec {
    #[serde(rename = "TLS_AUTO")]
    Auto,
    #[serde(rename = "TLSV1_0")]
    V1_0,
    #[serde(rename = "TLSV1_1")]
    V1_1,
    #[serde(rename = "TLSV1_2")]
    V1_2,
    #[serde(rename = "TLSV1_3")]
    V1_3,
}

/// A server's TLS, compiled.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Answer plaintext HTTP requests with a 301 to the https URL.
    pub https_redirect: bool,
    /// `None` on a plaintext server (only `httpsRedirect` applies there).
    pub mode: Option<TlsMode>,
}

/// What a TLS server does with a connection.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// Relays the TLS bytes untouched, routed by SNI (VirtualService `tls:`).
    Passthrough,
    Terminate(Arc<Termination>),
}

/// Who must present a client certificate, checked against what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// SIMPLE.
    None,
    /// MUTUAL: required, chained to the credential's CA.
    Required,
    /// OPTIONAL_MUTUAL: verified when presented.
    Optional,
    /// ISTIO_MUTUAL: the ingress's workload certificate as server
    /// certificate, client certificates chained to the mesh roots.
    Mesh,
}

/// The settings of a terminating server.
pub struct Termination {
    pub client_auth: ClientAuth,
    /// `None` for [`ClientAuth::Mesh`], which presents the ingress's
    /// workload certificate.
    credential: Option<Arc<CertifiedKey>>,
    /// For [`ClientAuth::Required`] and [`ClientAuth::Optional`].
    client_roots: Option<Arc<RootCertStore>>,
    versions: &'static [&'static SupportedProtocolVersion],
    /// The provider with the configured cipher suites only.
    provider: Arc<CryptoProvider>,
    /// Client certificates must carry one of them (none: any).
    subject_alt_names: Vec<String>,
    /// Offer `h2` and `http/1.1` (HTTP servers), or nothing (TLS servers).
    http: bool,
    /// Of the server certificate: for `nodemesh gateways`.
    pub not_after: Option<SystemTime>,
    /// The Secret it came from (`credentialName`, `certificateRefs`) as
    /// `namespace/name`, for `nodemesh explain`; `None` for ISTIO_MUTUAL.
    pub credential_name: Option<String>,
}

impl std::fmt::Debug for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Termination")
            .field("client_auth", &self.client_auth)
            .field("versions", &self.versions)
            .field("subject_alt_names", &self.subject_alt_names)
            .field("not_after", &self.not_after)
            .field("credential_name", &self.credential_name)
            .finish_non_exhaustive()
    }
}

/// What a compile needs besides the spec.
pub struct TlsContext<'a> {
    /// Where `credentialName` is looked up, in order: the Gateway's own
    /// namespace, then Istio's root namespace (where Istio's gateway
    /// deployments read them, so its tutorials work unchanged).
    pub namespaces: [&'a str; 2],
    pub secrets: &'a Secrets,
}

/// The server's port protocol, as far as TLS cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// HTTP: plaintext, only `httpsRedirect` applies.
    Plain,
    /// HTTPS, HTTP2, GRPC: terminated, then served as HTTP.
    Http,
    /// TLS: terminated into TCP routes, or passed through.
    Tls,
    /// TCP: no TLS settings at all.
    Tcp,
}

/// Compiles `spec` (at `field`, e.g. `spec.servers[0].tls`) for a server of
/// `port`; every problem is recorded with its field in `issues`.
pub(crate) fn compile(
    spec: Option<&ServerTlsSpec>,
    port: PortKind,
    field: &str,
    ctx: &TlsContext,
    issues: &mut Issues,
) -> Option<ServerTls> {
    let at = |name: &str| format!("{field}.{name}");
    let Some(spec) = spec else {
        return match port {
            PortKind::Http | PortKind::Tls => {
                issues.add(field, "an HTTPS or TLS server needs tls settings");
                None
            }
            PortKind::Plain | PortKind::Tcp => Some(ServerTls {
                https_redirect: false,
                mode: None,
            }),
        };
    };
    let before = issues.len();
    reject_unsupported(spec, &at, issues);
    let mode = spec.mode.unwrap_or(ModeSpec::Passthrough);
    let mode = match port {
        PortKind::Tcp => {
            issues.add(
                field,
                "a TCP server takes no tls settings (use protocol TLS)",
            );
            None
        }
        PortKind::Plain => {
            if spec.mode.is_some() || spec.credential_name.is_some() {
                issues.add(
                    field,
                    "on an HTTP server only httpsRedirect applies (use protocol HTTPS to \
                     terminate TLS)",
                );
            }
            None
        }
        PortKind::Http | PortKind::Tls => match mode {
            ModeSpec::AutoPassthrough => {
                issues.add(
                    at("mode"),
                    "AUTO_PASSTHROUGH (multi-network east-west gateways) is not supported; use \
                     PASSTHROUGH with VirtualService tls routes",
                );
                None
            }
            ModeSpec::Passthrough if port == PortKind::Http => {
                issues.add(
                    at("mode"),
                    "PASSTHROUGH (the default when mode is not set) needs port protocol TLS; \
                     set mode SIMPLE to terminate HTTPS",
                );
                None
            }
            ModeSpec::Passthrough => Some(TlsMode::Passthrough),
            ModeSpec::Simple
            | ModeSpec::Mutual
            | ModeSpec::OptionalMutual
            | ModeSpec::IstioMutual => {
                termination(spec, mode, port == PortKind::Http, &at, ctx, issues)
                    .map(|t| TlsMode::Terminate(Arc::new(t)))
            }
        },
    };
    (issues.len() == before).then_some(ServerTls {
        https_redirect: spec.https_redirect,
        mode,
    })
}

/// Fields Istio has that the agent does not read: refused, never ignored.
fn reject_unsupported(spec: &ServerTlsSpec, at: &dyn Fn(&str) -> String, issues: &mut Issues) {
    let secret = "not supported: name a Secret with credentialName";
    let files = [
        ("serverCertificate", spec.server_certificate.is_some()),
        ("privateKey", spec.private_key.is_some()),
        ("caCertificates", spec.ca_certificates.is_some()),
        ("credentialNames", spec.credential_names.is_some()),
        ("tlsCertificates", spec.tls_certificates.is_some()),
    ];
    for (name, set) in files {
        if set {
            issues.add(at(name), secret);
        }
    }
    let others = [
        ("caCrl", spec.ca_crl.is_some()),
        (
            "verifyCertificateSpki",
            spec.verify_certificate_spki.is_some(),
        ),
        (
            "verifyCertificateHash",
            spec.verify_certificate_hash.is_some(),
        ),
    ];
    for (name, set) in others {
        if set {
            issues.add(at(name), "not supported");
        }
    }
}

fn termination(
    spec: &ServerTlsSpec,
    mode: ModeSpec,
    http: bool,
    at: &dyn Fn(&str) -> String,
    ctx: &TlsContext,
    issues: &mut Issues,
) -> Option<Termination> {
    let client_auth = match mode {
        ModeSpec::Mutual => ClientAuth::Required,
        ModeSpec::OptionalMutual => ClientAuth::Optional,
        ModeSpec::IstioMutual => ClientAuth::Mesh,
        _ => ClientAuth::None,
    };
    let versions = versions(spec, at, issues);
    let provider = match ciphers::provider(&spec.cipher_suites) {
        Ok(provider) => Some(provider),
        Err(message) => {
            issues.add(at("cipherSuites"), message);
            None
        }
    };
    let (credential, client_roots, not_after, found_as) = match (client_auth, &spec.credential_name)
    {
        (ClientAuth::Mesh, Some(_)) => {
            issues.add(
                at("credentialName"),
                "ISTIO_MUTUAL uses the mesh credential; remove credentialName",
            );
            return None;
        }
        (ClientAuth::Mesh, None) => (None, None, None, None),
        (_, None) => {
            issues.add(
                at("credentialName"),
                "SIMPLE and MUTUAL need credentialName (a kubernetes.io/tls Secret)",
            );
            return None;
        }
        (_, Some(name)) => {
            let want_ca = client_auth != ClientAuth::None;
            let found = ctx.secrets.credential(&ctx.namespaces, name, want_ca);
            let (secret, ca) = match found {
                Ok(found) => found,
                Err(e) => {
                    issues.add(at("credentialName"), e.to_string());
                    return None;
                }
            };
            let credential = secret.credential.as_ref()?;
            let roots = ca.as_ref().and_then(|ca| ca.ca.as_ref()).map(|certs| {
                let mut roots = RootCertStore::empty();
                // Checked when the Secret was read.
                roots.add_parsable_certificates(certs.iter().cloned());
                Arc::new(roots)
            });
            // The namespace of the lookup that found it, for explain.
            let namespace = ctx
                .namespaces
                .iter()
                .find(|ns| ctx.secrets.find(&[ns], name).is_ok());
            let found_as = namespace.map_or_else(|| name.clone(), |ns| format!("{ns}/{name}"));
            (
                Some(credential.key.clone()),
                roots,
                Some(credential.not_after),
                Some(found_as),
            )
        }
    };
    Some(Termination {
        client_auth,
        credential,
        client_roots,
        versions: versions?,
        provider: provider?,
        subject_alt_names: spec.subject_alt_names.clone(),
        http,
        not_after,
        credential_name: found_as,
    })
}

static TLS12_UP: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
static TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The protocol versions between `minProtocolVersion` and
/// `maxProtocolVersion`, TLS 1.0 and 1.1 read as 1.2 for a minimum.
fn versions(
    spec: &ServerTlsSpec,
    at: &dyn Fn(&str) -> String,
    issues: &mut Issues,
) -> Option<&'static [&'static SupportedProtocolVersion]> {
    let min = spec.min_protocol_version.unwrap_or(VersionSpec::Auto);
    let max = spec.max_protocol_version.unwrap_or(VersionSpec::Auto);
    let max_13 = match max {
        VersionSpec::Auto | VersionSpec::V1_3 => true,
        VersionSpec::V1_2 => false,
        VersionSpec::V1_0 | VersionSpec::V1_1 => {
            issues.add(
                at("maxProtocolVersion"),
                "TLS 1.0 and 1.1 are not supported (rustls implements TLS 1.2 and 1.3)",
            );
            return None;
        }
    };
    match (min == VersionSpec::V1_3, max_13) {
        (false, true) => Some(TLS12_UP),
        (false, false) => Some(TLS12),
        (true, true) => Some(TLS13),
        (true, false) => {
            issues.add(
                at("minProtocolVersion"),
                "TLSV1_3 is above maxProtocolVersion TLSV1_2",
            );
            None
        }
    }
}

/// The TLS step of one port: its acceptor, and the servers it chooses
/// between by the acceptor's index.
pub struct PortTls {
    pub acceptor: TlsAcceptor,
    pub servers: Vec<Arc<ServerRef>>,
}

impl PortTls {
    /// For `port` of an agent whose Node carries `labels`; `None` when no
    /// server there has TLS.
    pub fn build(
        cfg: &Config,
        labels: &Labels,
        port: u16,
        identities: &Arc<Identities>,
    ) -> Result<Option<PortTls>, TlsError> {
        let servers: Vec<_> = cfg.routing().ingress().servers_on(labels, port).collect();
        if servers.iter().all(|(_, s)| mode(s).is_none()) {
            return Ok(None);
        }
        let modes = servers.iter().map(|(_, s)| mode(s));
        let mesh = MeshIdentity {
            identities: identities.clone(),
            id: identity::ingress_id(cfg, identities.trust_domain()),
        };
        let acceptor = TlsAcceptor::new(hosts(&servers).zip(modes), Some(&mesh))?;
        let servers = servers
            .iter()
            .map(|(gateway, server)| {
                Arc::new(ServerRef {
                    gateway: gateway.key.clone(),
                    server: server.field.clone(),
                })
            })
            .collect();
        Ok(Some(PortTls { acceptor, servers }))
    }
}

/// The TLS mode of a Gateway server; `None`: plaintext (or TCP).
pub fn mode(server: &Server) -> Option<&TlsMode> {
    server.tls.as_ref().and_then(|t| t.mode.as_ref())
}

/// The hosts of each of a port's servers, as the TLS step claims them.
fn hosts<'a>(
    servers: &'a [(&'a Gateway, &'a Server)],
) -> impl Iterator<Item = impl Iterator<Item = &'a str>> + 'a {
    servers
        .iter()
        .map(|(_, s)| s.hosts.iter().map(|h| h.dns.as_str()))
}

/// Which of `servers` (a port's, as [`IngressTable::servers_on`] lists
/// them) a ClientHello's SNI picks, exactly as that port's acceptor does.
///
/// [`IngressTable::servers_on`]: crate::routing::ingress::IngressTable::servers_on
pub fn sni_index(servers: &[(&Gateway, &Server)]) -> SniIndex {
    let has_tls = servers.iter().map(|(_, s)| mode(s).is_some());
    SniIndex::new(hosts(servers).zip(has_tls))
}

impl TlsMode {
    /// Istio's name of the mode.
    pub fn name(&self) -> &'static str {
        match self {
            TlsMode::Passthrough => "PASSTHROUGH",
            TlsMode::Terminate(t) => match t.client_auth {
                ClientAuth::None => "SIMPLE",
                ClientAuth::Required => "MUTUAL",
                ClientAuth::Optional => "OPTIONAL_MUTUAL",
                ClientAuth::Mesh => "ISTIO_MUTUAL",
            },
        }
    }

    /// The server certificate's expiry, for `nodemesh gateways`.
    pub fn expiry(&self) -> Option<String> {
        match self {
            TlsMode::Terminate(termination) => termination.expiry(),
            TlsMode::Passthrough => None,
        }
    }
}

impl Termination {
    /// The leaf certificate expiry, as `nodemesh gateways` shows it.
    pub fn expiry(&self) -> Option<String> {
        self.not_after.map(x509::rfc3339)
    }
}
