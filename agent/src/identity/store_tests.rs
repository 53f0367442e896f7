//! [`Identities`] against a real CA server over loopback TLS.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::*;
use crate::ca::{self, Authority, CaServer, Source};
use crate::config::test_support::TestDir;
use crate::config::ConfigStore;
use crate::identity::tests::mesh_config;
use crate::identity::{on_node, CertState};

/// Generous, since the machine running the tests may be busy.
const TIMEOUT: Duration = Duration::from_secs(20);
const TD: &str = "cluster.local";

struct TestCa {
    _dir: TestDir,
    address: String,
    credential: std::path::PathBuf,
    serving: JoinHandle<()>,
}

impl TestCa {
    async fn start() -> Self {
        let dir = TestDir::new();
        let source = Source::StateDir(dir.path().join("state"));
        let credential = dir.path().join("node-a");
        ca::issue_node(
            &source,
            TD,
            "node-a",
            Duration::from_secs(3600),
            &credential,
        )
        .unwrap();
        let config = Arc::new(ConfigStore::unloaded());
        config.replace(mesh_config());
        let authority = Authority::load(&source, TD).unwrap();
        let server = CaServer::new(authority, config, Duration::from_secs(3600)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let serving = tokio::spawn(server.serve(listener));
        Self {
            _dir: dir,
            address,
            credential,
            serving,
        }
    }

    fn identities(&self, lifetime: Duration) -> Arc<Identities> {
        Identities::new(IdentitiesSettings {
            trust_domain: TD.into(),
            cert_lifetime: lifetime,
            ca_address: Some(self.address.clone()),
            node_credential: Some(NodeCredential::load(&self.credential, "node-a", TD).unwrap()),
        })
    }
}

fn web() -> SpiffeId {
    SpiffeId::new(TD, "shop", "web")
}

#[tokio::test]
async fn issues_the_node_identities_and_serves_the_roots() {
    let ca = TestCa::start().await;
    let identities = ca.identities(Duration::from_secs(3600));
    assert!(identities.certified_key(&web()).is_none());
    identities.set_wanted(on_node(&mesh_config(), "node-a", TD));
    let key = identities.wait_for(&web(), TIMEOUT).await.expect("issued");
    assert_eq!(SpiffeId::from_cert(&key.cert[0]).unwrap(), web());
    assert!(key.keys_match().is_ok());
    assert_eq!(identities.trust_anchors().len(), 1);
    let certs = identities.certs();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].identity, web().to_string());
    assert_eq!(certs[0].state, CertState::Valid);
    assert!(certs[0]
        .issuer
        .as_deref()
        .unwrap()
        .contains("nodemesh root CA"));
    let status = identities.status();
    assert!(status.connected, "{status:?}");
    assert!(status.next_renewal.is_some());
    // The node credential is the HBONE server identity, never a workload's.
    let node = identities.node_certified_key().unwrap();
    assert!(SpiffeId::from_cert(&node.cert[0]).is_err());

    identities.set_wanted(Default::default());
    assert!(identities.certified_key(&web()).is_none());
    assert!(identities.certs().is_empty());
    ca.serving.abort();
}

#[tokio::test]
async fn renews_at_half_life_with_a_new_key() {
    let ca = TestCa::start().await;
    let identities = ca.identities(Duration::from_secs(4));
    identities.set_wanted([web()].into());
    let first = identities.wait_for(&web(), TIMEOUT).await.expect("issued");
    let first_serial = identities.certs()[0].serial.clone();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let renewed = loop {
        let now = identities.certified_key(&web()).expect("never a gap");
        if !Arc::ptr_eq(&now, &first) {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(identities.certs()[0].serial, first_serial);
    assert_ne!(
        renewed.key.public_key(),
        first.key.public_key(),
        "a renewal makes a new key"
    );
    assert!(renewed.keys_match().is_ok());
    ca.serving.abort();
}

#[tokio::test]
async fn an_expired_certificate_is_never_returned() {
    let ca = TestCa::start().await;
    let identities = ca.identities(Duration::from_secs(2));
    identities.set_wanted([web()].into());
    identities.wait_for(&web(), TIMEOUT).await.expect("issued");
    // Without the CA, nothing renews it.
    ca.serving.abort();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while identities.certified_key(&web()).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "still served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let certs = identities.certs();
    assert_eq!(certs[0].state, CertState::Expired);
    assert!(certs[0].reason.is_some());
    assert!(identities.status().last_error.is_some());
    assert!(identities
        .wait_for(&web(), Duration::from_millis(200))
        .await
        .is_none());
}

#[tokio::test]
async fn a_refusal_is_a_failed_state_with_the_reason() {
    let ca = TestCa::start().await;
    let identities = ca.identities(Duration::from_secs(3600));
    // shop/db runs on node-b: node-a may not have it.
    let db = SpiffeId::new(TD, "shop", "db");
    identities.set_wanted([db.clone()].into());
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let certs = loop {
        let certs = identities.certs();
        if certs[0].state == CertState::Failed {
            break certs;
        }
        assert!(tokio::time::Instant::now() < deadline, "{certs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = certs[0].reason.as_deref().unwrap();
    assert!(
        reason.contains(
            "no workload with identity spiffe://cluster.local/ns/shop/sa/db runs on node `node-a`"
        ),
        "{reason}"
    );
    assert!(identities.certified_key(&db).is_none());
    ca.serving.abort();
}

#[tokio::test]
async fn without_a_ca_nothing_is_requested() {
    let identities = Identities::new(IdentitiesSettings {
        trust_domain: TD.into(),
        cert_lifetime: Duration::from_secs(60),
        ca_address: None,
        node_credential: None,
    });
    identities.set_wanted([web()].into());
    assert!(identities.certs().is_empty());
    assert!(identities.status().address.is_none());
    assert!(identities.node_certified_key().is_none());
}
