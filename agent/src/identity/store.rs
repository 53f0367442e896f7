//! [`Identities`]: the agent's workload certificates, issued and renewed by the
//! mesh CA, read lock-free by the transport.
//!
//! One task per identity keeps its certificate fresh: it asks for one (a new
//! ECDSA P-256 key each time, made here; only its CSR leaves the process),
//! sleeps until half the lifetime, and asks again, backing off while the CA
//! fails. A renewed certificate replaces the old one atomically: connections
//! that hold the old one keep it, new ones get the new one.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::client::{CaClient, CaError};
use super::x509::{self, provider, rfc3339, CertFacts};
use super::{NodeId, SpiffeId};
use crate::ca::protocol::SignRequest;

/// First wait after a failed request; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Files of a node credential directory (written by `nodemesh ca issue-node`).
const NODE_CERT: &str = crate::ca::NODE_CERT;
const NODE_KEY: &str = crate::ca::NODE_KEY;
const ROOT_CERT: &str = crate::ca::ROOT_CERT;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("node credential {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error(
        "the node credential in {} is for {id}, but this agent is node `{node}` in trust \
         domain `{trust_domain}`: issue one with `nodemesh ca issue-node {node}`",
        dir.display()
    )]
    WrongNode {
        dir: PathBuf,
        id: NodeId,
        node: String,
        trust_domain: String,
    },
}

/// This node's credential: its certificate (to the CA, and as the HBONE
/// server's identity) and the mesh roots it was issued with.
pub struct NodeCredential {
    key: Arc<CertifiedKey>,
    roots: Vec<CertificateDer<'static>>,
    facts: CertFacts,
    id: NodeId,
}

impl NodeCredential {
    /// Reads `node-cert.pem`, `node-key.pem` and `root-cert.pem` from `dir`
    /// and checks they are `node`'s in `trust_domain`.
    pub fn load(dir: &Path, node: &str, trust_domain: &str) -> Result<Self, CredentialError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| CredentialError::File {
                path,
                reason: e.to_string(),
            })
        };
        let bad = |name: &str, reason: String| CredentialError::File {
            path: dir.join(name),
            reason,
        };
        let chain = x509::certs_from_pem(&read(NODE_CERT)?).map_err(|e| bad(NODE_CERT, e))?;
        let roots = x509::certs_from_pem(&read(ROOT_CERT)?).map_err(|e| bad(ROOT_CERT, e))?;
        let key = PrivateKeyDer::from_pem_slice(read(NODE_KEY)?.as_bytes())
            .map_err(|e| bad(NODE_KEY, e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad(NODE_CERT, "holds no certificate".into()))?;
        let id = NodeId::from_cert(leaf).map_err(|e| bad(NODE_CERT, e.to_string()))?;
        if id.node != node || id.trust_domain != trust_domain {
            return Err(CredentialError::WrongNode {
                dir: dir.to_owned(),
                id,
                node: node.to_owned(),
                trust_domain: trust_domain.to_owned(),
            });
        }
        let facts = CertFacts::of(leaf).map_err(|e| bad(NODE_CERT, e))?;
        if roots.is_empty() {
            return Err(bad(ROOT_CERT, "holds no certificate".into()));
        }
        let key = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| bad(NODE_KEY, e.to_string()))?;
        Ok(Self {
            key: Arc::new(key),
            roots,
            facts,
            id,
        })
    }
}

pub struct IdentitiesSettings {
    pub trust_domain: String,
    /// Asked of the CA for every certificate (it may give less).
    pub cert_lifetime: Duration,
    /// `HOST:PORT` of `nodemesh ca`; without it the agent holds no identities.
    pub ca_address: Option<String>,
    pub node_credential: Option<NodeCredential>,
}

/// The agent's workload certificates; see the module documentation.
pub struct Identities {
    trust_domain: String,
    cert_lifetime: Duration,
    ca: Option<CaClient>,
    node: Option<NodeCredential>,
    /// The mesh roots, as the CA last served them (at first, the node credential's).
    roots: ArcSwap<RootCertStore>,
    entries: ArcSwap<HashMap<SpiffeId, Arc<Entry>>>,
    /// Serializes [`Identities::set_wanted`] calls.
    writer: Mutex<()>,
    /// Bumped at every issuance, for [`Identities::wait_for`].
    issued: watch::Sender<u64>,
    contact: Mutex<CaContact>,
}

#[derive(Default)]
struct CaContact {
    last_success: Option<SystemTime>,
    last_error: Option<String>,
}

/// One identity: its current certificate and what its task is doing.
struct Entry {
    current: ArcSwapOption<Issued>,
    progress: Mutex<Progress>,
    task: OnceLock<AbortHandle>,
}

struct Issued {
    key: Arc<CertifiedKey>,
    facts: CertFacts,
}

#[derive(Default)]
struct Progress {
    /// A request is in flight.
    requesting: bool,
    /// Why the last request failed, until one succeeds.
    failure: Option<String>,
    /// When the task asks next (renewal or retry).
    next_attempt: Option<SystemTime>,
}

/// Where a certificate stands, for `nodemesh certs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// None issued yet; the first request is under way.
    Requesting,
    Valid,
    /// Valid, and a renewal is under way or being retried.
    Renewing,
    /// The last one expired and no new one was issued; it is not used.
    Expired,
    /// None issued: the CA failed or refused (see `reason`).
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub state: CertState,
    pub reason: Option<String>,
    pub serial: Option<String>,
    pub issuer: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub next_attempt: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaStatus {
    pub address: Option<String>,
    pub trust_domain: String,
    /// The last request to the CA got an answer (a certificate or a refusal).
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_success: Option<String>,
    /// The earliest next renewal or retry over all identities.
    pub next_renewal: Option<String>,
    pub identities: usize,
    pub node_identity: Option<String>,
    pub node_credential_expires: Option<String>,
}

impl Identities {
    pub fn new(settings: IdentitiesSettings) -> Arc<Self> {
        let roots = root_store(
            settings
                .node_credential
                .as_ref()
                .map_or(&[][..], |n| &n.roots[..]),
        );
        let ca = settings.ca_address.and_then(|address| {
            let node = settings.node_credential.as_ref()?.key.clone();
            Some(CaClient::new(address, node))
        });
        Arc::new(Self {
            trust_domain: settings.trust_domain,
            cert_lifetime: settings.cert_lifetime,
            ca,
            node: settings.node_credential,
            roots: ArcSwap::from_pointee(roots),
            entries: ArcSwap::default(),
            writer: Mutex::new(()),
            issued: watch::Sender::new(0),
            contact: Mutex::default(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether a CA was configured (else no workload certificate is ever issued).
    pub fn has_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// Keeps certificates for exactly `wanted`: requests the new ones, drops
    /// those of identities that left the node. Call on every config change.
    pub fn set_wanted(self: &Arc<Self>, wanted: BTreeSet<SpiffeId>) {
        if self.ca.is_none() {
            return;
        }
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.entries.load_full();
        if current.len() == wanted.len() && wanted.iter().all(|id| current.contains_key(id)) {
            return;
        }
        let mut next = HashMap::with_capacity(wanted.len());
        for id in wanted {
            let entry = match current.get(&id) {
                Some(entry) => entry.clone(),
                None => {
                    log::info!("requesting a certificate for {id}");
                    let entry = Arc::new(Entry {
                        current: ArcSwapOption::empty(),
                        progress: Mutex::default(),
                        task: OnceLock::new(),
                    });
                    let task = tokio::spawn(self.clone().maintain(id.clone(), entry.clone()));
                    let _ = entry.task.set(task.abort_handle());
                    entry
                }
            };
            next.insert(id, entry);
        }
        for (id, entry) in current.iter() {
            if !next.contains_key(id) {
                if let Some(task) = entry.task.get() {
                    task.abort();
                }
                log::info!(
                    "dropped the certificate of {id}: no workload with it is on this node now"
                );
            }
        }
        self.entries.store(Arc::new(next));
    }

    /// The identity's current certificate and key; `None` if none was issued
    /// yet or the last one expired. Lock-free.
    pub fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.load();
        let issued = entries.get(id)?.current.load();
        let issued = issued.as_ref()?;
        (!issued.facts.expired(SystemTime::now())).then(|| issued.key.clone())
    }

    /// Yields the count of certificates issued so far after every issuance.
    pub fn subscribe_issued(&self) -> watch::Receiver<u64> {
        self.issued.subscribe()
    }

    /// Like [`certified_key`](Self::certified_key), waiting up to `timeout`
    /// for a first issuance.
    pub async fn wait_for(&self, id: &SpiffeId, timeout: Duration) -> Option<Arc<CertifiedKey>> {
        let mut issued = self.subscribe_issued();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(key) = self.certified_key(id) {
                    return key;
                }
                // The sender lives as long as `self`: this only ends with an issuance.
                let _ = issued.changed().await;
            }
        })
        .await
        .ok()
    }

    /// The mesh roots (several during a root rotation), as the CA serves them.
    pub fn trust_anchors(&self) -> Arc<RootCertStore> {
        self.roots.load_full()
    }

    /// The node credential, which is also the node's TLS server identity on
    /// the HBONE port; `None` without `--node-credential`.
    pub fn node_certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.node.as_ref().map(|n| n.key.clone())
    }

    /// Every identity's certificate, sorted by identity.
    pub fn certs(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        let mut certs: Vec<CertStatus> = self
            .entries
            .load()
            .iter()
            .map(|(id, entry)| entry.status(id, now))
            .collect();
        certs.sort_by(|a, b| a.identity.cmp(&b.identity));
        certs
    }

    /// When each workload certificate held expires.
    pub fn expiries(&self) -> Vec<(String, SystemTime)> {
        self.entries
            .load()
            .iter()
            .filter_map(|(id, entry)| {
                let issued = entry.current.load_full()?;
                Some((id.to_string(), issued.facts.not_after))
            })
            .collect()
    }

    pub fn status(&self) -> CaStatus {
        let contact = self.contact.lock().unwrap_or_else(|e| e.into_inner());
        let entries = self.entries.load();
        let next_renewal = entries
            .values()
            .filter_map(|e| lock(&e.progress).next_attempt)
            .min();
        CaStatus {
            address: self.ca.as_ref().map(|ca| ca.address().to_owned()),
            trust_domain: self.trust_domain.clone(),
            connected: contact.last_error.is_none() && contact.last_success.is_some(),
            last_error: contact.last_error.clone(),
            last_success: contact.last_success.map(rfc3339),
            next_renewal: next_renewal.map(rfc3339),
            identities: entries.len(),
            node_identity: self.node.as_ref().map(|n| n.id.to_string()),
            node_credential_expires: self.node.as_ref().map(|n| rfc3339(n.facts.not_after)),
        }
    }

    /// The task behind one identity: issue, sleep to half-life, renew; back
    /// off while the CA fails. Ends when aborted by [`Identities::set_wanted`].
    async fn maintain(self: Arc<Self>, id: SpiffeId, entry: Arc<Entry>) {
        let mut backoff = BACKOFF_START;
        loop {
            lock(&entry.progress).requesting = true;
            let wait = match self.request(&id).await {
                Ok(issued) => {
                    let renew_at = issued.facts.renew_at();
                    log::info!(
                        "certificate for {id} issued: serial {}, valid until {}, renewal at {}",
                        issued.facts.serial,
                        rfc3339(issued.facts.not_after),
                        rfc3339(renew_at)
                    );
                    entry.current.store(Some(Arc::new(issued)));
                    self.issued.send_modify(|n| *n += 1);
                    backoff = BACKOFF_START;
                    let mut progress = lock(&entry.progress);
                    progress.failure = None;
                    progress.next_attempt = Some(renew_at);
                    renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                }
                Err(e) => {
                    log::warn!("certificate for {id}: {e}; retrying in {backoff:?}");
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    let mut progress = lock(&entry.progress);
                    progress.failure = Some(e.to_string());
                    progress.next_attempt = Some(SystemTime::now() + wait);
                    wait
                }
            };
            lock(&entry.progress).requesting = false;
            tokio::time::sleep(wait).await;
        }
    }

    /// One CSR to the CA and its answer, checked and turned into a key for rustls.
    async fn request(&self, id: &SpiffeId) -> Result<Issued, CaError> {
        let ca = self.ca.as_ref().expect("tasks run only with a CA");
        let bad = |e: &dyn std::fmt::Display| CaError::BadAnswer(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::BadAnswer(format!("cannot make a key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string().try_into().map_err(|e| bad(&e))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| bad(&e))?;
        let request = SignRequest {
            csr,
            lifetime_seconds: self.cert_lifetime.as_secs(),
        };
        let answer = ca.sign(self.roots_for_ca(), &request).await;
        self.record_contact(&answer);
        let answer = answer?;
        let chain = x509::certs_from_pems(&answer.chain).map_err(|e| bad(&e))?;
        let leaf = chain.first().ok_or_else(|| bad(&"an empty chain"))?;
        let issued_id = SpiffeId::from_cert(leaf).map_err(|e| bad(&e))?;
        if &issued_id != id {
            return Err(bad(&format_args!("asked for {id}, got {issued_id}")));
        }
        let facts = CertFacts::of(leaf).map_err(|e| bad(&e))?;
        let roots = x509::certs_from_pems(&answer.roots).map_err(|e| bad(&e))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let key = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| bad(&e))?;
        if !roots.is_empty() {
            self.roots.store(Arc::new(root_store(&roots)));
        }
        Ok(Issued {
            key: Arc::new(key),
            facts,
        })
    }

    /// What the CA's server certificate may chain to: the roots it served
    /// last, and those the node credential came with.
    fn roots_for_ca(&self) -> RootCertStore {
        let mut roots = (*self.roots.load_full()).clone();
        if let Some(node) = &self.node {
            roots.add_parsable_certificates(node.roots.iter().cloned());
        }
        roots
    }

    fn record_contact<T>(&self, answer: &Result<T, CaError>) {
        let mut contact = lock(&self.contact);
        match answer {
            Ok(_) | Err(CaError::Refused(_)) => {
                contact.last_success = Some(SystemTime::now());
                contact.last_error = answer.as_ref().err().map(ToString::to_string);
            }
            Err(e) => contact.last_error = Some(e.to_string()),
        }
    }
}

impl Entry {
    fn status(&self, id: &SpiffeId, now: SystemTime) -> CertStatus {
        let issued = self.current.load_full();
        let progress = lock(&self.progress);
        let facts = issued.as_ref().map(|i| &i.facts);
        let state = match (facts, &progress.failure) {
            (Some(f), _) if f.expired(now) => CertState::Expired,
            (Some(_), Some(_)) => CertState::Renewing,
            (Some(_), None) if progress.requesting => CertState::Renewing,
            (Some(_), None) => CertState::Valid,
            (None, Some(_)) => CertState::Failed,
            (None, None) => CertState::Requesting,
        };
        CertStatus {
            identity: id.to_string(),
            state,
            reason: progress.failure.clone(),
            serial: facts.map(|f| f.serial.clone()),
            issuer: facts.map(|f| f.issuer.clone()),
            not_before: facts.map(|f| rfc3339(f.not_before)),
            not_after: facts.map(|f| rfc3339(f.not_after)),
            next_attempt: progress.next_attempt.map(rfc3339),
        }
    }
}

fn root_store(roots: &[CertificateDer<'static>]) -> RootCertStore {
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(roots.iter().cloned());
    store
}

/// A poisoned lock only means a panic elsewhere; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
