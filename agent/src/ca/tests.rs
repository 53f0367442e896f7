//! The CA's signing rules, with real keys, CSRs and certificates.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;

use super::*;
use crate::config::test_support::TestDir;
use crate::identity::x509::{certs_from_pem, provider, CertFacts};
use crate::identity::{NodeId, SpiffeId};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn csr(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// node-a may hold shop/web only.
fn allowed() -> BTreeSet<SpiffeId> {
    [SpiffeId::new("cluster.local", "shop", "web")].into()
}

fn sign(authority: &Authority, csr: &str) -> Result<(SpiffeId, Vec<String>), Refusal> {
    authority.sign_workload(csr, DAY, DAY, "node-a", allowed)
}

#[test]
fn signs_an_identity_of_the_node_with_its_own_certificate() {
    let dir = TestDir::new();
    let authority =
        Authority::load(&Source::StateDir(dir.path().join("ca")), "cluster.local").unwrap();
    let asked = csr(&p256(), vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
    // Longer than the maximum: capped.
    let (id, chain) = authority
        .sign_workload(&asked, 2 * DAY, Duration::from_secs(60), "node-a", allowed)
        .unwrap();
    assert_eq!(id, SpiffeId::new("cluster.local", "shop", "web"));
    assert_eq!(chain.len(), 1, "the root is not sent as an intermediate");
    let leaf = certs_from_pem(&chain[0]).unwrap().remove(0);
    assert_eq!(SpiffeId::from_cert(&leaf).unwrap(), id);
    let facts = CertFacts::of(&leaf).unwrap();
    assert_eq!(facts.subject, "", "no subject, the URI SAN only");
    let lifetime = facts.not_after.duration_since(facts.not_before).unwrap();
    assert_eq!(lifetime, Duration::from_secs(60));
    verify_chain(&leaf, &[], authority.roots());
}

#[test]
fn refuses_what_the_node_may_not_have() {
    let dir = TestDir::new();
    let authority =
        Authority::load(&Source::StateDir(dir.path().to_owned()), "cluster.local").unwrap();
    let key = p256();
    type IsExpected = fn(&Refusal) -> bool;
    let cases: Vec<(Vec<SanType>, IsExpected)> = vec![
        (
            vec![uri("spiffe://cluster.local/ns/shop/sa/db")],
            |r| matches!(r, Refusal::NotOnNode { node, .. } if node == "node-a"),
        ),
        (vec![uri("spiffe://other.domain/ns/shop/sa/web")], |r| {
            matches!(r, Refusal::TrustDomain { .. })
        }),
        (vec![uri("https://shop.example/web")], |r| {
            matches!(r, Refusal::NotWorkload(_))
        }),
        (
            vec![uri("spiffe://cluster.local/nodemesh/node/node-a")],
            |r| matches!(r, Refusal::NotWorkload(_)),
        ),
        (
            vec![
                uri("spiffe://cluster.local/ns/shop/sa/web"),
                uri("spiffe://cluster.local/ns/shop/sa/web"),
            ],
            |r| matches!(r, Refusal::SeveralSans(2)),
        ),
        (
            vec![SanType::DnsName("web.shop".try_into().unwrap())],
            |r| matches!(r, Refusal::DnsSan(name) if name == "web.shop"),
        ),
        (vec![], |r| matches!(r, Refusal::NoSan)),
    ];
    for (sans, expected) in cases {
        let refusal = sign(&authority, &csr(&key, sans.clone())).unwrap_err();
        assert!(expected(&refusal), "{sans:?}: {refusal}");
    }
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let asked = csr(&p384, vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
    assert_eq!(sign(&authority, &asked), Err(Refusal::KeyNotP256));
    assert!(matches!(
        sign(&authority, "garbage"),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn a_csr_whose_signature_does_not_verify_is_refused() {
    let dir = TestDir::new();
    let authority =
        Authority::load(&Source::StateDir(dir.path().to_owned()), "cluster.local").unwrap();
    let pem = csr(&p256(), vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
    let mut der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls::pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 1;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
    );
    assert_eq!(sign(&authority, &tampered), Err(Refusal::BadSignature));
}

#[test]
fn the_root_key_is_created_0600_in_a_0700_dir_and_reused() {
    let dir = TestDir::new();
    let state = dir.path().join("state");
    let first = Authority::load(&Source::StateDir(state.clone()), "cluster.local").unwrap();
    let key = std::fs::metadata(state.join(ROOT_KEY)).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert_eq!(key.uid(), nix::unistd::geteuid().as_raw());
    let dir_mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let again = Authority::load(&Source::StateDir(state), "cluster.local").unwrap();
    assert_eq!(first.roots(), again.roots());
}

#[test]
fn node_credentials_serve_both_ways_and_are_not_workload_ids() {
    let dir = TestDir::new();
    let source = Source::StateDir(dir.path().join("state"));
    let out = dir.path().join("node-a");
    let credential = issue_node(&source, "cluster.local", "node-a", DAY, &out).unwrap();
    let key = std::fs::metadata(out.join(NODE_KEY)).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    let leaf = certs_from_pem(&credential.chain_pem).unwrap().remove(0);
    assert_eq!(
        NodeId::from_cert(&leaf).unwrap(),
        NodeId::new("cluster.local", "node-a")
    );
    assert!(SpiffeId::from_cert(&leaf).is_err());
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let eku = parsed.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let roots = certs_from_pem(&std::fs::read_to_string(out.join(ROOT_CERT)).unwrap()).unwrap();
    verify_chain(&leaf, &[], &roots);
    let loaded = crate::identity::NodeCredential::load(&out, "node-a", "cluster.local");
    assert!(loaded.is_ok());
    let wrong = crate::identity::NodeCredential::load(&out, "node-b", "cluster.local");
    assert!(wrong.is_err());
    assert!(issue_node(&source, "cluster.local", "../x", DAY, &out).is_err());
}

/// An operator's root and intermediate, in Istio's plug-in layout.
fn write_plugin_dir(dir: &std::path::Path) -> CertificateDer<'static> {
    let ca = |cn: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    };
    let root_key = p256();
    let root_params = ca("operator root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let intermediate_key = p256();
    let intermediate = ca("operator intermediate")
        .signed_by(&intermediate_key, &root_issuer)
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write(PLUGIN_CA_CERT, intermediate.pem());
    write(PLUGIN_CA_KEY, intermediate_key.serialize_pem());
    write(PLUGIN_CERT_CHAIN, intermediate.pem() + &root.pem());
    // A second, unrelated root: trusted side by side during a rotation.
    let other = ca("next root").self_signed(&p256()).unwrap();
    write(PLUGIN_ROOT_CERT, root.pem() + &other.pem());
    root.der().clone()
}

#[test]
fn plugin_certs_sign_through_the_operators_intermediate() {
    let dir = TestDir::new();
    let plugin = dir.path().join("cacerts");
    let root = write_plugin_dir(&plugin);
    let authority = Authority::load(&Source::Plugin(plugin), "cluster.local").unwrap();
    assert_eq!(authority.roots().len(), 2);
    let asked = csr(&p256(), vec![uri("spiffe://cluster.local/ns/shop/sa/web")]);
    let (_, chain) = sign(&authority, &asked).unwrap();
    let chain: Vec<_> = chain
        .iter()
        .flat_map(|p| certs_from_pem(p).unwrap())
        .collect();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    verify_chain(&chain[0], &chain[1..], &[root]);
}

#[test]
fn plugin_certs_with_a_key_of_another_certificate_are_refused() {
    let dir = TestDir::new();
    let plugin = dir.path().join("cacerts");
    write_plugin_dir(&plugin);
    std::fs::write(plugin.join(PLUGIN_CA_KEY), p256().serialize_pem()).unwrap();
    let error = Authority::load(&Source::Plugin(plugin), "cluster.local")
        .err()
        .unwrap();
    assert!(error.to_string().contains("does not belong"), "{error}");
}

fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
) {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &ParsedCertificate::try_from(leaf).unwrap(),
        &store,
        intermediates,
        UnixTime::since_unix_epoch(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap(),
        ),
        provider().signature_verification_algorithms.all,
    )
    .unwrap();
}
