//! Real rustls handshakes against the acceptor over in-memory streams.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::config::{Config, Issues, LoadOptions};

use super::*;

const WAIT: Duration = Duration::from_secs(5);

/// A CA issuing leaf certificates, as an operator's would.
struct TestCa {
    cert: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap().pem();
        TestCa {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "leaf");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.cert.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }
}

use rustls::pki_types::pem::PemObject as _;

/// A Secret in `istio-system`: of type kubernetes.io/tls when it holds a
/// certificate, else Opaque (as `kubectl create secret generic` writes
/// Istio's `-cacert` secrets).
fn secret(name: &str, pairs: &[(&str, &str)]) -> (PathBuf, String) {
    let tls = pairs.iter().any(|(k, _)| *k == "tls.crt");
    let data: serde_json::Map<_, _> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "istio-system"},
        "type": if tls { "kubernetes.io/tls" } else { "Opaque" },
        "stringData": data,
    });
    (PathBuf::from(format!("{name}.yaml")), doc.to_string())
}

fn secrets(docs: Vec<(PathBuf, String)>) -> Config {
    Config::load_documents(&docs, &LoadOptions::default()).unwrap()
}

/// Compiles a `tls` block (JSON) against `config`'s Secrets.
fn compile_tls(
    config: &Config,
    port: PortKind,
    tls: serde_json::Value,
) -> Result<ServerTls, Vec<String>> {
    let spec: ServerTlsSpec = serde_json::from_value(tls).unwrap();
    let ctx = TlsContext {
        namespaces: ["web", "istio-system"],
        secrets: config.secrets(),
    };
    let mut issues = Issues::default();
    let compiled = compile(Some(&spec), port, "spec.servers[0].tls", &ctx, &mut issues);
    compiled.ok_or_else(|| issues.iter().map(|(f, m)| format!("{f}: {m}")).collect())
}

fn acceptor(servers: &[(&[&str], &ServerTls)]) -> TlsAcceptor {
    let hosts: Vec<Vec<String>> = servers
        .iter()
        .map(|(hosts, _)| hosts.iter().map(|h| h.to_string()).collect())
        .collect();
    let list = hosts
        .iter()
        .zip(servers)
        .map(|(hosts, (_, tls))| (hosts.iter().map(String::as_str), tls.mode.as_ref()));
    TlsAcceptor::new(list, None).unwrap()
}

fn client(
    roots: RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(crate::identity::x509::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

type ClientStream = tokio_rustls::client::TlsStream<DuplexStream>;

/// Runs one handshake of `config` asking for `sni` against `acceptor`.
async fn handshake(
    acceptor: &TlsAcceptor,
    config: ClientConfig,
    sni: &str,
) -> (
    Result<Accepted<DuplexStream>, AcceptError>,
    std::io::Result<ClientStream>,
) {
    let (near, far) = tokio::io::duplex(1 << 16);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let client = async move {
        let mut stream = connector.connect(name, near).await?;
        // TLS 1.3 client certificates are checked after the client's side
        // is done: a round trip shows whether the server kept the connection.
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        Ok(stream)
    };
    let server = async {
        let accepted = acceptor.accept(far, WAIT).await;
        if let Ok(Accepted::Terminated(t)) = accepted {
            let mut t = t;
            let mut buf = [0u8; 4];
            t.stream.read_exact(&mut buf).await.unwrap();
            t.stream.write_all(b"pong").await.unwrap();
            return Ok(Accepted::Terminated(t));
        }
        accepted
    };
    tokio::join!(server, client)
}

fn terminated(accepted: Result<Accepted<DuplexStream>, AcceptError>) -> Terminated<DuplexStream> {
    match accepted {
        Ok(Accepted::Terminated(t)) => *t,
        Ok(Accepted::Passthrough { .. }) => panic!("passed through"),
        Err(e) => panic!("refused: {e}"),
    }
}

fn leaf_of(stream: &ClientStream) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn simple(credential: &str) -> serde_json::Value {
    json!({"mode": "SIMPLE", "credentialName": credential})
}

#[tokio::test]
async fn sni_picks_the_certificate_of_each_host() {
    let ca = TestCa::new("operator");
    let (a_cert, a_key) = ca.leaf(&["a.example.com"]);
    let (b_cert, b_key) = ca.leaf(&["b.example.com"]);
    let config = secrets(vec![
        secret("a-cred", &[("tls.crt", &a_cert), ("tls.key", &a_key)]),
        secret("b-cred", &[("tls.crt", &b_cert), ("tls.key", &b_key)]),
    ]);
    let a = compile_tls(&config, PortKind::Http, simple("a-cred")).unwrap();
    let b = compile_tls(&config, PortKind::Http, simple("b-cred")).unwrap();
    let port = acceptor(&[(&["web/a.example.com"], &a), (&["b.example.com"], &b)]);
    let versions = rustls::DEFAULT_VERSIONS;

    let (server, client_side) =
        handshake(&port, client(ca.roots(), versions), "a.example.com").await;
    let server = terminated(server);
    assert_eq!(
        (server.server, server.sni.as_deref()),
        (0, Some("a.example.com"))
    );
    assert_eq!(server.alpn, Some(Alpn::H2));
    assert_eq!(server.client, None);
    let a_der = CertificateDer::from_pem_slice(a_cert.as_bytes()).unwrap();
    assert_eq!(leaf_of(&client_side.unwrap()), a_der.to_vec());

    let (server, client_side) =
        handshake(&port, client(ca.roots(), versions), "B.example.com").await;
    assert_eq!(terminated(server).server, 1);
    let b_der = CertificateDer::from_pem_slice(b_cert.as_bytes()).unwrap();
    assert_eq!(leaf_of(&client_side.unwrap()), b_der.to_vec());

    // A host no server claims is refused, as Envoy does without a `*` server.
    let (server, client_side) =
        handshake(&port, client(ca.roots(), versions), "c.example.com").await;
    assert!(matches!(server, Err(AcceptError::NoServer(Some(ref n))) if n == "c.example.com"));
    assert!(client_side.is_err());
    // Each server's certificate expiry is known.
    assert_eq!(port.expiries().map(|(i, _)| i).collect::<Vec<_>>(), [0, 1]);
}

#[tokio::test]
async fn exact_beats_wildcard_beats_catch_all() {
    let ca = TestCa::new("operator");
    let (cert, key) = ca.leaf(&["*.example.com", "shop.example.com", "example.org"]);
    let config = secrets(vec![secret(
        "cred",
        &[("tls.crt", &cert), ("tls.key", &key)],
    )]);
    let tls = compile_tls(&config, PortKind::Http, simple("cred")).unwrap();
    let port = acceptor(&[
        (&["*.example.com"], &tls),
        (&["*.shop.example.com"], &tls),
        (&["shop.example.com"], &tls),
    ]);
    assert_eq!(port.select(Some("shop.example.com")), Some(2));
    assert_eq!(port.select(Some("a.shop.example.com")), Some(1));
    assert_eq!(port.select(Some("a.b.example.com")), Some(0));
    assert_eq!(port.select(Some("example.com")), None);
    assert_eq!(port.select(None), None);
    let with_all = acceptor(&[(&["shop.example.com"], &tls), (&["*"], &tls)]);
    assert_eq!(with_all.select(Some("example.org")), Some(1));
    assert_eq!(with_all.select(None), Some(1));

    // A real handshake reaches the wildcard server.
    let versions = rustls::DEFAULT_VERSIONS;
    let (server, client_side) =
        handshake(&port, client(ca.roots(), versions), "x.example.com").await;
    assert_eq!(terminated(server).server, 0);
    client_side.unwrap();
}

#[tokio::test]
async fn mutual_requires_a_client_certificate_signed_by_the_ca() {
    let ca = TestCa::new("operator");
    let clients = TestCa::new("client issuer");
    let (cert, key) = ca.leaf(&["mtls.example.com"]);
    let config = secrets(vec![
        secret("cred", &[("tls.crt", &cert), ("tls.key", &key)]),
        // Istio's separate CA secret.
        secret("cred-cacert", &[("ca.crt", &clients.cert)]),
    ]);
    let mutual = json!({"mode": "MUTUAL", "credentialName": "cred"});
    let tls = compile_tls(&config, PortKind::Http, mutual).unwrap();
    let port = acceptor(&[(&["mtls.example.com"], &tls)]);
    let versions = rustls::DEFAULT_VERSIONS;

    let (server, client_side) =
        handshake(&port, client(ca.roots(), versions), "mtls.example.com").await;
    assert!(
        matches!(server, Err(AcceptError::Handshake(_))),
        "{:?}",
        server.err()
    );
    assert!(client_side.is_err());

    let with_cert = |issuer: &TestCa, name: &str| {
        let (cert, key) = issuer.leaf(&[name]);
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = ClientConfig::builder_with_provider(crate::identity::x509::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    };
    let (server, client_side) = handshake(
        &port,
        with_cert(&clients, "alice.example.com"),
        "mtls.example.com",
    )
    .await;
    let server = terminated(server);
    client_side.unwrap();
    assert_eq!(server.alpn, Some(Alpn::Http1));
    let identity = server.client.unwrap();
    assert_eq!(identity.subject_alt_names, ["alice.example.com"]);
    assert_eq!(identity.subject, "CN=leaf");

    // Signed by another CA: refused.
    let (server, _) = handshake(
        &port,
        with_cert(&ca, "mallory.example.com"),
        "mtls.example.com",
    )
    .await;
    assert!(matches!(server, Err(AcceptError::Handshake(_))));

    // subjectAltNames narrows who may connect.
    let narrow = json!({"mode": "MUTUAL", "credentialName": "cred",
                        "subjectAltNames": ["bob.example.com"]});
    let tls = compile_tls(&config, PortKind::Http, narrow).unwrap();
    let port = acceptor(&[(&["mtls.example.com"], &tls)]);
    let (server, _) = handshake(
        &port,
        with_cert(&clients, "alice.example.com"),
        "mtls.example.com",
    )
    .await;
    assert!(matches!(server, Err(AcceptError::SubjectAltName(_))));
    let (server, _) = handshake(
        &port,
        with_cert(&clients, "bob.example.com"),
        "mtls.example.com",
    )
    .await;
    terminated(server);
}

#[tokio::test]
async fn passthrough_replays_the_exact_bytes() {
    let config = secrets(vec![]);
    let tls = compile_tls(&config, PortKind::Tls, json!({"mode": "PASSTHROUGH"})).unwrap();
    let port = acceptor(&[(&["db.example.com"], &tls)]);
    // A real ClientHello followed by more bytes, written in pieces.
    let name = ServerName::try_from("db.example.com").unwrap();
    let hello_config = Arc::new(client(RootCertStore::empty(), rustls::DEFAULT_VERSIONS));
    let mut hello = Vec::new();
    rustls::ClientConnection::new(hello_config, name)
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    let mut sent = hello.clone();
    sent.extend_from_slice(b"and then some application bytes");
    let (mut near, far) = tokio::io::duplex(1 << 16);
    let writer = async {
        for piece in sent.chunks(100) {
            near.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        near.shutdown().await.unwrap();
        near
    };
    let (accepted, _near) = tokio::join!(port.accept(far, WAIT), writer);
    let Ok(Accepted::Passthrough {
        mut stream,
        server,
        sni,
    }) = accepted
    else {
        panic!("not passed through");
    };
    assert_eq!((server, sni.as_deref()), (0, Some("db.example.com")));
    let mut relayed = Vec::new();
    stream.read_to_end(&mut relayed).await.unwrap();
    assert_eq!(relayed, sent);

    // Not TLS at all.
    let (mut near, far) = tokio::io::duplex(1 << 10);
    near.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(matches!(
        port.accept(far, WAIT).await,
        Err(AcceptError::NotTls)
    ));
}

#[tokio::test]
async fn protocol_versions_and_cipher_suites() {
    let ca = TestCa::new("operator");
    let (cert, key) = ca.leaf(&["v.example.com"]);
    let config = secrets(vec![secret(
        "cred",
        &[("tls.crt", &cert), ("tls.key", &key)],
    )]);
    let only_13 =
        json!({"mode": "SIMPLE", "credentialName": "cred", "minProtocolVersion": "TLSV1_3"});
    let tls = compile_tls(&config, PortKind::Http, only_13).unwrap();
    let port = acceptor(&[(&["v.example.com"], &tls)]);
    let tls12_only = &[&rustls::version::TLS12];
    let (server, client_side) =
        handshake(&port, client(ca.roots(), tls12_only), "v.example.com").await;
    assert!(matches!(server, Err(AcceptError::Handshake(_))));
    assert!(client_side.is_err());

    // TLSV1_0 as a minimum means 1.2; one TLS 1.2 suite by its Envoy name.
    let chosen = json!({"mode": "SIMPLE", "credentialName": "cred",
                        "minProtocolVersion": "TLSV1_0", "maxProtocolVersion": "TLSV1_2",
                        "cipherSuites": ["[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-RSA-AES128-GCM-SHA256]"]});
    let tls = compile_tls(&config, PortKind::Http, chosen).unwrap();
    let port = acceptor(&[(&["v.example.com"], &tls)]);
    let (server, client_side) = handshake(
        &port,
        client(ca.roots(), rustls::ALL_VERSIONS),
        "v.example.com",
    )
    .await;
    terminated(server);
    let client_side = client_side.unwrap();
    let connection = client_side.get_ref().1;
    assert_eq!(
        connection.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        connection.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    );

    let bad = json!({"mode": "SIMPLE", "credentialName": "cred",
                     "maxProtocolVersion": "TLSV1_1", "cipherSuites": ["AES128-SHA", "ECDHE-RSA-AES128-GCM-SHA256"]});
    let issues = compile_tls(&config, PortKind::Http, bad).unwrap_err();
    assert_eq!(issues.len(), 2, "{issues:?}");
    assert!(issues[0]
        .starts_with("spec.servers[0].tls.maxProtocolVersion: TLS 1.0 and 1.1 are not supported"));
    assert!(issues[1].starts_with("spec.servers[0].tls.cipherSuites: \"AES128-SHA\" not supported"));
}

#[test]
fn reports_unusable_settings_by_field() {
    let ca = TestCa::new("operator");
    let (cert, _) = ca.leaf(&["x.example.com"]);
    let (_, other_key) = ca.leaf(&["x.example.com"]);
    let config = secrets(vec![secret(
        "broken",
        &[("tls.crt", &cert), ("tls.key", &other_key)],
    )]);
    let warnings = &config.secrets().warnings;
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].starts_with(
            "Secret istio-system/broken (broken.yaml): stringData[tls.key]: the key does not match"
        ),
        "{warnings:?}"
    );
    let cases = [
        (PortKind::Http, simple("broken"), "spec.servers[0].tls.credentialName: Secret istio-system/broken is invalid: stringData[tls.key]: the key does not match"),
        (PortKind::Http, simple("missing"), "spec.servers[0].tls.credentialName: Secret missing not found (looked in web, istio-system)"),
        (PortKind::Http, json!({"mode": "MUTUAL", "credentialName": "missing"}), "spec.servers[0].tls.credentialName: Secret missing not found"),
        (PortKind::Http, json!({"mode": "SIMPLE"}), "spec.servers[0].tls.credentialName: SIMPLE and MUTUAL need credentialName"),
        (PortKind::Http, json!({"credentialName": "broken"}), "spec.servers[0].tls.mode: PASSTHROUGH (the default when mode is not set) needs port protocol TLS"),
        (PortKind::Tls, json!({"mode": "AUTO_PASSTHROUGH"}), "spec.servers[0].tls.mode: AUTO_PASSTHROUGH"),
        (PortKind::Http, json!({"mode": "SIMPLE", "serverCertificate": "/etc/certs/c.pem", "privateKey": "/etc/certs/k.pem"}), "spec.servers[0].tls.serverCertificate: not supported: name a Secret with credentialName"),
        (PortKind::Plain, json!({"mode": "SIMPLE", "credentialName": "broken"}), "spec.servers[0].tls: on an HTTP server only httpsRedirect applies"),
        (PortKind::Http, json!({"mode": "SIMPLE", "credentialName": "x", "minProtocolVersion": "TLSV1_3", "maxProtocolVersion": "TLSV1_2"}), "spec.servers[0].tls.minProtocolVersion: TLSV1_3 is above maxProtocolVersion TLSV1_2"),
    ];
    for (port, tls, expected) in cases {
        let issues = compile_tls(&config, port, tls.clone()).unwrap_err();
        assert!(issues[0].starts_with(expected), "{tls}: {issues:?}");
    }
    // An HTTP server redirecting to HTTPS.
    let redirect = compile_tls(&config, PortKind::Plain, json!({"httpsRedirect": true})).unwrap();
    assert!(redirect.https_redirect && redirect.mode.is_none());
    // Mutual without any CA for client certificates.
    let (cert, key) = ca.leaf(&["x.example.com"]);
    let config = secrets(vec![secret(
        "cred",
        &[("tls.crt", &cert), ("tls.key", &key)],
    )]);
    let issues = compile_tls(
        &config,
        PortKind::Http,
        json!({"mode": "MUTUAL", "credentialName": "cred"}),
    )
    .unwrap_err();
    assert_eq!(issues, ["spec.servers[0].tls.credentialName: Secret cred-cacert not found (looked in web, istio-system)"]);
}

/// A Gateway with an ISTIO_MUTUAL server: the node serving it holds the
/// ingress's identity.
const ISTIO_MUTUAL_GATEWAY: &str = r#"{"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
 "metadata": {"name": "mesh-edge", "namespace": "web"},
 "spec": {"servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
   "hosts": ["*"], "tls": {"mode": "ISTIO_MUTUAL"}}]}}"#;

#[tokio::test]
async fn istio_mutual_presents_the_ingress_identity_and_requires_a_mesh_client() {
    use crate::ca::{self, Authority, CaServer, Source};
    use crate::config::test_support::TestDir;
    use crate::config::ConfigStore;
    use crate::identity::{self, Identities, IdentitiesSettings, NodeCredential, SpiffeId};

    let dir = TestDir::new();
    let source = Source::StateDir(dir.path().join("state"));
    let credential = dir.path().join("node-a");
    let lifetime = Duration::from_secs(3600);
    ca::issue_node(&source, "cluster.local", "node-a", lifetime, &credential).unwrap();
    let gateway = (
        PathBuf::from("gateway.json"),
        ISTIO_MUTUAL_GATEWAY.to_owned(),
    );
    let config = secrets(vec![gateway]);
    // A real mesh CA, which signs the ingress's identity for a node serving
    // a Gateway.
    let store = Arc::new(ConfigStore::unloaded());
    store.replace(secrets(vec![(
        PathBuf::from("gateway.json"),
        ISTIO_MUTUAL_GATEWAY.to_owned(),
    )]));
    let authority = Authority::load(&source, "cluster.local").unwrap();
    let server = CaServer::new(authority, store, lifetime).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ca_address = listener.local_addr().unwrap().to_string();
    let serving = tokio::spawn(server.serve(listener));
    let settings = |ca_address: Option<String>| IdentitiesSettings {
        trust_domain: "cluster.local".into(),
        cert_lifetime: lifetime,
        ca_address,
        node_credential: Some(
            NodeCredential::load(&credential, "node-a", "cluster.local").unwrap(),
        ),
    };
    let identities = Identities::new(settings(Some(ca_address)));
    let ingress = identity::ingress_id(&config, "cluster.local");
    identities.set_wanted(identity::on_node(&config, "node-a", "cluster.local"));
    let issued = identities.wait_for(&ingress, Duration::from_secs(20)).await;
    let issued = issued.expect("the ingress's certificate is issued");

    let tls = compile_tls(&config, PortKind::Http, json!({"mode": "ISTIO_MUTUAL"})).unwrap();
    let hosts = ["*"];
    // Without a mesh CA there is no workload certificate to present.
    let no_ca = MeshIdentity {
        identities: Identities::new(settings(None)),
        id: ingress.clone(),
    };
    assert!(matches!(
        TlsAcceptor::new([(hosts, tls.mode.as_ref())], Some(&no_ca)),
        Err(TlsError::NoMeshCredential)
    ));
    let mesh = MeshIdentity {
        identities: identities.clone(),
        id: ingress.clone(),
    };
    let port = TlsAcceptor::new([(hosts, tls.mode.as_ref())], Some(&mesh)).unwrap();
    // A mesh member's certificate (another node's, from the same CA).
    let authority = Authority::load(&source, "cluster.local").unwrap();
    let member = authority.issue_node("node-b", lifetime).unwrap();
    let versions = rustls::DEFAULT_VERSIONS;
    let mesh_client = |auth: Option<&ca::Credential>| {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            identities.trust_anchors(),
            x509::provider(),
        )
        .build()
        .unwrap();
        let builder = ClientConfig::builder_with_provider(x509::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName(verifier)));
        match auth {
            Some(member) => {
                let chain = x509::certs_from_pem(&member.chain_pem).unwrap();
                let key = PrivateKeyDer::from_pem_slice(member.key_pem.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        }
    };
    let (server, client_side) = handshake(&port, mesh_client(Some(&member)), "edge").await;
    let server = terminated(server);
    // The ingress's workload certificate, not the node credential.
    let presented = leaf_of(&client_side.unwrap());
    assert_eq!(presented, issued.cert[0].to_vec());
    assert_eq!(SpiffeId::from_cert(&presented).unwrap(), ingress);
    let node_leaf = identities.node_certified_key().unwrap().cert[0].to_vec();
    assert_ne!(presented, node_leaf);
    let member_id = crate::identity::NodeId::new("cluster.local", "node-b").to_string();
    assert_eq!(server.client.unwrap().subject_alt_names, [member_id]);

    let (server, _) = handshake(&port, mesh_client(None), "edge").await;
    assert!(matches!(server, Err(AcceptError::Handshake(_))));
    serving.abort();
}

/// Chains to the mesh roots, whatever the name: node credentials carry a
/// SPIFFE URI, not a DNS name.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
