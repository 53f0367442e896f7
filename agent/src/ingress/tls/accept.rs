//! The TLS step of one gateway port: read the ClientHello's SNI without
//! consuming it, pick the port's server for it as Envoy does, then either
//! terminate TLS with that server's settings or hand back the raw
//! connection with the ClientHello replayed in front (PASSTHROUGH).
//!
//! Server choice is Envoy's filter chain match by server name
//! ([`super::by_sni`]); a ClientHello no server takes is refused.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::SingleCertAndKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{Identities, SpiffeId};
use crate::proxy::peer::Prefixed;
use crate::proxy::sni;
use crate::transport::tls::WorkloadCertificate;

use super::by_sni::SniIndex;
use super::xfcc;
use super::{ClientAuth, Termination, TlsMode};

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";
/// The first byte of a TLS handshake record.
const HANDSHAKE: u8 = 22;

/// Why a port's acceptor cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "ISTIO_MUTUAL presents the ingress's workload certificate: the agent needs the mesh CA \
         (--ca-address) and its node credential (--node-credential)"
    )]
    NoMeshCredential,
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("TLS settings: {0}")]
    Settings(#[from] rustls::Error),
}

/// Why one connection was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("the connection does not start with a TLS ClientHello")]
    NotTls,
    #[error("no server on this port for SNI {0:?}")]
    NoServer(Option<String>),
    #[error("TLS handshake: {0}")]
    Handshake(#[source] io::Error),
    #[error("client certificate ({0}) carries none of the server's subjectAltNames")]
    SubjectAltName(String),
}

/// The negotiated application protocol of a terminated HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    /// `http/1.1`, or no ALPN at all.
    Http1,
}

/// Who the verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub subject: String,
    /// DNS names, URIs, IP addresses and e-mail addresses, as written.
    pub subject_alt_names: Vec<String>,
    /// For ISTIO_MUTUAL: the caller's mesh identity.
    pub spiffe_id: Option<SpiffeId>,
}

/// A connection through the TLS step.
pub enum Accepted<S> {
    /// Boxed: a TLS stream is large.
    Terminated(Box<Terminated<S>>),
    /// The raw connection, ClientHello included.
    Passthrough {
        stream: Prefixed<S>,
        server: usize,
        sni: Option<String>,
    },
}

pub struct Terminated<S> {
    pub stream: tokio_rustls::server::TlsStream<Prefixed<S>>,
    /// Index of the server in the list the acceptor was built from.
    pub server: usize,
    pub sni: Option<String>,
    /// `None` on a TLS (not HTTP) server.
    pub alpn: Option<Alpn>,
    pub client: Option<ClientIdentity>,
    /// The `X-Forwarded-Client-Cert` element for the client's certificate,
    /// if it presented one.
    pub xfcc: Option<String>,
}

enum Action {
    Passthrough,
    Terminate {
        acceptor: tokio_rustls::TlsAcceptor,
        termination: Arc<Termination>,
        /// The URI SANs of the server's certificate (XFCC's `By`).
        by: Vec<String>,
    },
}

/// What ISTIO_MUTUAL servers present: the workload certificate of the
/// ingress's identity `id`, which `identities` keeps issued and renewed (as
/// for its hop into the mesh), and they check clients against the mesh
/// roots.
#[derive(Clone)]
pub struct MeshIdentity {
    pub identities: Arc<Identities>,
    pub id: SpiffeId,
}

/// The TLS servers of one port.
pub struct TlsAcceptor {
    /// By index in the list given to [`TlsAcceptor::new`]; `None` for
    /// servers without TLS.
    servers: Vec<Option<Action>>,
    by_sni: SniIndex,
}

impl TlsAcceptor {
    /// From the servers of one port as `(hosts, mode)`, a server's hosts in
    /// Istio's form (see [`SniIndex::new`]). When two servers claim a host,
    /// the first wins (conflicts are the config's to report). `mesh` is
    /// needed for ISTIO_MUTUAL only.
    pub fn new<'a, H: IntoIterator<Item = &'a str>>(
        servers: impl IntoIterator<Item = (H, Option<&'a TlsMode>)>,
        mesh: Option<&MeshIdentity>,
    ) -> Result<TlsAcceptor, TlsError> {
        let mut actions = Vec::new();
        let mut claims = Vec::new();
        for (hosts, mode) in servers {
            let action = match mode {
                None => None,
                Some(TlsMode::Passthrough) => Some(Action::Passthrough),
                Some(TlsMode::Terminate(termination)) => Some(Action::Terminate {
                    acceptor: server_config(termination, mesh)?.into(),
                    termination: termination.clone(),
                    by: match (&termination.credential, mesh) {
                        (Some(key), _) => xfcc::uri_sans(&key.cert[0]),
                        (None, Some(mesh)) => vec![mesh.id.to_string()],
                        (None, None) => Vec::new(),
                    },
                }),
            };
            claims.push((hosts, action.is_some()));
            actions.push(action);
        }
        Ok(TlsAcceptor {
            servers: actions,
            by_sni: SniIndex::new(claims),
        })
    }

    /// The server a ClientHello with `sni` goes to.
    pub fn select(&self, sni: Option<&str>) -> Option<usize> {
        self.by_sni.select(sni)
    }

    /// The server certificate expiry of each terminating server, by index.
    pub fn expiries(&self) -> impl Iterator<Item = (usize, String)> + '_ {
        self.servers
            .iter()
            .enumerate()
            .filter_map(|(i, action)| match action {
                Some(Action::Terminate { termination, .. }) => Some((i, termination.expiry()?)),
                _ => None,
            })
    }

    /// Takes `io` through the TLS step, all within `wait`.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        wait: Duration,
    ) -> Result<Accepted<S>, AcceptError> {
        tokio::time::timeout(wait, self.handshake(io, wait))
            .await
            .map_err(|_| AcceptError::Timeout(wait))?
    }

    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: S,
        wait: Duration,
    ) -> Result<Accepted<S>, AcceptError> {
        let mut io = Prefixed::new(io);
        let sni = sni::read(&mut io, wait).await;
        if io.head().first() != Some(&HANDSHAKE) {
            return Err(AcceptError::NotTls);
        }
        let found = self.select(sni.as_deref());
        let Some((server, Some(action))) = found.map(|i| (i, &self.servers[i])) else {
            return Err(AcceptError::NoServer(sni));
        };
        let (acceptor, termination, by) = match action {
            Action::Passthrough => {
                return Ok(Accepted::Passthrough {
                    stream: io,
                    server,
                    sni,
                })
            }
            Action::Terminate {
                acceptor,
                termination,
                by,
            } => (acceptor, termination, by),
        };
        let stream = acceptor.accept(io).await.map_err(AcceptError::Handshake)?;
        let (_, connection) = stream.get_ref();
        let alpn = termination.http.then(|| match connection.alpn_protocol() {
            Some(ALPN_H2) => Alpn::H2,
            _ => Alpn::Http1,
        });
        let leaf = connection.peer_certificates().and_then(|c| c.first());
        let client = leaf.map(ClientIdentity::of);
        let xfcc = leaf.and_then(|leaf| xfcc::element(leaf, by));
        let wanted = &termination.subject_alt_names;
        if let Some(client) = &client {
            if !wanted.is_empty() && !client.subject_alt_names.iter().any(|n| wanted.contains(n)) {
                return Err(AcceptError::SubjectAltName(client.subject.clone()));
            }
        }
        Ok(Accepted::Terminated(Box::new(Terminated {
            stream,
            server,
            sni,
            alpn,
            client,
            xfcc,
        })))
    }
}

fn server_config(
    termination: &Termination,
    mesh: Option<&MeshIdentity>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = termination.provider.clone();
    let verifier = |roots, optional: bool| {
        let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        builder
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))
    };
    let client_roots = || {
        termination
            .client_roots
            .clone()
            .ok_or(TlsError::Verifier("no CA".into()))
    };
    let (verifier, resolver): (_, Arc<dyn ResolvesServerCert>) =
        match (termination.client_auth, &termination.credential) {
            (ClientAuth::Mesh, _) => {
                let mesh = mesh
                    .filter(|m| m.identities.has_ca())
                    .ok_or(TlsError::NoMeshCredential)?;
                let presented = WorkloadCertificate {
                    identities: mesh.identities.clone(),
                    id: mesh.id.clone(),
                };
                (
                    verifier(mesh.identities.trust_anchors(), false)?,
                    Arc::new(presented),
                )
            }
            (_, None) => return Err(TlsError::Verifier("no server certificate".into())),
            (auth, Some(key)) => {
                let verifier = match auth {
                    ClientAuth::Required => verifier(client_roots()?, false)?,
                    ClientAuth::Optional => verifier(client_roots()?, true)?,
                    _ => WebPkiClientVerifier::no_client_auth(),
                };
                (verifier, Arc::new(SingleCertAndKey::from(key.clone())))
            }
        };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(termination.versions)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    if termination.http {
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    }
    Ok(Arc::new(config))
}

impl ClientIdentity {
    fn of(leaf: &CertificateDer<'_>) -> ClientIdentity {
        let parsed = X509Certificate::from_der(leaf).ok();
        let subject = parsed
            .as_ref()
            .map(|(_, cert)| cert.subject().to_string())
            .unwrap_or_default();
        let names = parsed
            .as_ref()
            .and_then(|(_, cert)| cert.subject_alternative_name().ok().flatten())
            .map(|san| san.value.general_names.iter().filter_map(name).collect())
            .unwrap_or_default();
        ClientIdentity {
            subject,
            subject_alt_names: names,
            spiffe_id: SpiffeId::from_cert(leaf).ok(),
        }
    }
}

fn name(general: &GeneralName<'_>) -> Option<String> {
    match general {
        GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
            Some((*s).to_owned())
        }
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
            _ => None,
        },
        _ => None,
    }
}
