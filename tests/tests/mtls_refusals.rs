//! What node-b's HBONE port (15008) refuses, attacked from node-a's network
//! namespace while the victim tenant keeps calling `web` on node-b over
//! HBONE: a client certificate from another CA, an expired (or not yet
//! valid) one from the real mesh CA, a real one with a wrong or missing
//! SPIFFE SAN, a real workload certificate whose `CONNECT` claims another
//! workload's address or asks for something that is not a workload on
//! node-b, and plaintext. Each refusal must say why in node-b's log, leave the
//! victim untouched and node-b's memory and descriptors where they were.
//!
//! Every test first opens one genuine stream (the real CA's certificate for
//! the attacker pod's service account, claiming the attacker pod's address)
//! to the `recorder` pod and sees its request arrive, so a refusal that
//! follows is due to the one thing the attack changes, not to a broken lab.
//!
//! Attacker certificates are minted with rcgen: with the real CA's root key
//! from its state directory (the test runs as root, as an attacker who stole
//! or misused a node's access would need to be), or with a CA of its own.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nodemesh_testbed::mesh::NAMESPACE;
use nodemesh_testbed::nodemesh_bin;
use nodemesh_testbed::tenants::{Lab, RECORDER_PORT};
use nodemesh_testbed::workload_apps::python3;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;

const HBONE_PORT: u16 = 15008;
/// Each round of an attack makes this many attempts: a leak per attempt
/// would show in node-b's descriptors or memory.
const ATTEMPTS: usize = 40;
/// Rounds go on for at least this long, so that the attack overlaps the
/// victim's traffic (a request every 50 ms) rather than racing past it.
const ATTACK_FOR: Duration = Duration::from_secs(3);

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

/// The identity every pod of the tenants lab runs as (service account
/// `default`), the attacker's included.
fn attacker_id() -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/default")
}

/// An HBONE client as an attacker on node-a would write it: TLS 1.3 with
/// ALPN h2 and the given client certificate (it does not care who answers),
/// then one HTTP/2 `CONNECT TARGET` with `Forwarded: FORWARDED`; on a 200 it
/// sends PAYLOAD through the tunnel and keeps the first bytes that come
/// back. Repeats this COUNT times, each on a new connection, and prints one
/// JSON object per attempt:
///
/// - `stage`: `handshake` (the TLS handshake failed), `closed` (the server
///   ended the connection before any HTTP/2, e.g. with a TLS alert sent
///   after it checked the client certificate) or `answered`;
/// - `error`: what ended the connection, if it ended early;
/// - `status`, `body` (a refusal's reason), `reply` (bytes from the tunnel).
///
/// It reads before it writes anything: the server speaks first (its TLS
/// alert, or HTTP/2 SETTINGS), so a refusal is read rather than lost to a
/// reset.
const HBONE_CLIENT_PY: &str = r#"
import json, socket, ssl, sys
import h2.config, h2.connection, h2.events
host, port, cert, key, target, forwarded, payload, count = sys.argv[1:9]
payload = payload.encode("latin1")

def attempt():
    out = {"stage": "handshake", "error": None, "status": None, "body": "", "reply": ""}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, int(port)), timeout=10)
    try:
        s = ctx.wrap_socket(raw)
    except (ssl.SSLError, OSError) as e:
        out["error"] = str(e)
        raw.close()
        return out
    out["stage"] = "closed"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False))
    conn.initiate_connection()
    stream = None
    try:
        while True:
            data = s.recv(65536)
            if not data:
                out["error"] = "end of stream"
                break
            events = conn.receive_data(data)
            if stream is None:
                out["stage"] = "answered"
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, [(":method", "CONNECT"), (":authority", target),
                                           ("forwarded", forwarded)])
            done = False
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived):
                    out["status"] = int(dict(ev.headers)[":status"])
                    if out["status"] == 200:
                        conn.send_data(stream, payload)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    text = ev.data.decode("latin1")
                    if out["status"] == 200:
                        out["reply"] += text
                        done = True
                    else:
                        out["body"] += text
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset,
                                     h2.events.ConnectionTerminated)):
                    done = True
            s.sendall(conn.data_to_send())
            if done:
                break
    except (ssl.SSLError, OSError) as e:
        out["error"] = str(e)
    s.close()
    return out

for _ in range(int(count)):
    print(json.dumps(attempt()), flush=True)
"#;

/// Plaintext to the HBONE port, as a client that hopes for a fallback would
/// send it: MODE `http1` (an HTTP/1.1 `CONNECT`) or `h2c` (the HTTP/2
/// preface and a `CONNECT` with prior knowledge), each followed at once by a
/// GET of /MARKER for the tunnel. Repeats COUNT times and prints one JSON
/// object per attempt: what came back (`received`, hex) and how the
/// connection `ended` (`eof`, `reset` or `timeout`).
const PLAINTEXT_PY: &str = r#"
import json, socket, sys
import h2.config, h2.connection
host, port, mode, target, forwarded, marker, count = sys.argv[1:8]
tunneled = ("GET /%s HTTP/1.1\r\nHost: recorder\r\n\r\n" % marker).encode()

def request():
    if mode == "http1":
        head = "CONNECT %s HTTP/1.1\r\nHost: %s\r\nForwarded: %s\r\n\r\n" % (target, target, forwarded)
        return head.encode() + tunneled
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "CONNECT"), (":authority", target), ("forwarded", forwarded)])
    conn.send_data(stream, tunneled)
    return conn.data_to_send()

for _ in range(int(count)):
    s = socket.create_connection((host, int(port)), timeout=10)
    received, ended = b"", "eof"
    try:
        s.sendall(request())
        while True:
            data = s.recv(65536)
            if not data:
                break
            received += data
    except socket.timeout:
        ended = "timeout"
    except (ConnectionResetError, BrokenPipeError):
        ended = "reset"
    s.close()
    print(json.dumps({"received": received.hex(), "ended": ended}), flush=True)
"#;

/// One attempt of [`HBONE_CLIENT_PY`].
#[derive(Debug)]
struct Attempt {
    stage: String,
    error: String,
    status: Option<u64>,
    body: String,
    reply: String,
}

impl Attempt {
    fn parse(doc: &Value) -> Attempt {
        let text = |key: &str| doc[key].as_str().unwrap_or_default().to_owned();
        Attempt {
            stage: text("stage"),
            error: text("error"),
            status: doc["status"].as_u64(),
            body: text("body"),
            reply: text("reply"),
        }
    }

    /// Refused by TLS: no HTTP/2 ever spoken, and the TLS alert the client
    /// got names `alert` (as OpenSSL spells it, e.g. `unknown ca`).
    fn assert_refused_by_tls(&self, alert: &str) {
        assert!(
            self.stage != "answered" && self.status.is_none(),
            "the server spoke HTTP/2: {self:?}"
        );
        assert!(
            self.error.to_lowercase().contains(alert),
            "expected the TLS alert `{alert}`: {self:?}"
        );
    }
}

/// A certificate and its key, as PEM files on disk.
struct Credential {
    cert: PathBuf,
    key: PathBuf,
}

/// When a minted certificate is valid.
#[derive(Clone, Copy)]
enum Validity {
    /// From 1975 to 4096 (rcgen's default): valid now.
    Current,
    /// During 2020 only.
    Expired,
    /// From 2999 on.
    NotYetValid,
}

/// Signs certificates with a CA's key.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Signer {
    /// The topology's real mesh CA: its root certificate and key, read from
    /// its state directory.
    fn mesh_ca(lab: &mut Lab, dir: &Path) -> Result<Signer> {
        let config_dir = lab.mesh().config_dir().to_path_buf();
        let ca = lab
            .mesh_mut()
            .topo_mut()
            .mesh_ca(&config_dir, &nodemesh_bin())?;
        let read = |file: &str| {
            let path = ca.state_dir().join(file);
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let key = KeyPair::from_pem(&read("root-key.pem")?)?;
        let issuer = Issuer::from_ca_cert_pem(&read("root-cert.pem")?, key)?;
        Ok(Signer {
            issuer,
            dir: dir.to_path_buf(),
        })
    }

    /// A CA of the attacker's own, which the mesh has never heard of.
    fn foreign(dir: &Path) -> Result<Signer> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "nodemesh root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Signer {
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
        })
    }

    /// A leaf certificate shaped like the mesh CA's (no subject, TLS client
    /// and server usages) with `sans`, written as `NAME-cert.pem` and
    /// `NAME-key.pem`.
    fn issue(&self, name: &str, sans: &[&str], validity: Validity) -> Result<Credential> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.strip_prefix("dns:") {
                Some(dns) => Ok(SanType::DnsName(dns.try_into()?)),
                None => Ok(SanType::URI((*san).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        match validity {
            Validity::Current => {}
            Validity::Expired => {
                params.not_before = date_time_ymd(2020, 1, 1);
                params.not_after = date_time_ymd(2021, 1, 1);
            }
            Validity::NotYetValid => {
                params.not_before = date_time_ymd(2999, 1, 1);
                params.not_after = date_time_ymd(3000, 1, 1);
            }
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let credential = Credential {
            cert: self.dir.join(format!("{name}-cert.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        fs::write(&credential.cert, cert.pem())?;
        fs::write(&credential.key, key.serialize_pem())?;
        Ok(credential)
    }
}

/// The tenants lab, and the attacker's tools in node-a's namespace.
struct Attack {
    lab: Lab,
    dir: PathBuf,
    mesh_ca: Signer,
    node_a: IpAddr,
    node_b: IpAddr,
}

impl Attack {
    fn new() -> Result<Attack> {
        let mut lab = Lab::new(app_bin(), &[])?;
        let dir = lab.mesh().topo().work_dir().join("attacker");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("hbone_client.py"), HBONE_CLIENT_PY)?;
        fs::write(dir.join("plaintext.py"), PLAINTEXT_PY)?;
        let mesh_ca = Signer::mesh_ca(&mut lab, &dir)?;
        let topo = lab.mesh().topo();
        let (node_a, node_b) = (topo.node("node-a").address, topo.node("node-b").address);
        Ok(Attack {
            dir,
            mesh_ca,
            node_a: node_a.into(),
            node_b: node_b.into(),
            lab,
        })
    }

    fn pod_address(&self, pod: &str) -> IpAddr {
        self.lab.mesh().topo().pod(pod).address.into()
    }

    /// The recorder pod's `ip:port`, where attacks ask to go.
    fn recorder(&self) -> String {
        format!("{}:{RECORDER_PORT}", self.pod_address("recorder"))
    }

    /// `for=` the attacker pod's address, which its certificate may claim.
    fn for_attacker(&self) -> String {
        format!("for={}", self.pod_address("attacker"))
    }

    /// Runs a script of the attacker's in node-a's namespace and parses the
    /// JSON object it prints per attempt.
    fn run(&self, script: &str, args: &[&str]) -> Result<Vec<Value>> {
        let topo = self.lab.mesh().topo();
        let script = self.dir.join(script).display().to_string();
        let mut cmd = vec![python3(), script.as_str()];
        cmd.extend_from_slice(args);
        let out = topo.run_in_ok(&topo.node("node-a").netns, &cmd)?;
        out.lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
            .collect()
    }

    /// `count` HBONE attempts to node-b presenting `credential`.
    fn hbone(
        &self,
        credential: &Credential,
        target: &str,
        forwarded: &str,
        payload: &str,
        count: usize,
    ) -> Result<Vec<Attempt>> {
        let (host, port, count) = (
            self.node_b.to_string(),
            HBONE_PORT.to_string(),
            count.to_string(),
        );
        let (cert, key) = (
            credential.cert.display().to_string(),
            credential.key.display().to_string(),
        );
        let args = [
            host.as_str(),
            &port,
            &cert,
            &key,
            target,
            forwarded,
            payload,
            &count,
        ];
        let docs = self.run("hbone_client.py", &args)?;
        Ok(docs.iter().map(Attempt::parse).collect())
    }

    /// The genuine stream every test starts with: the real CA's certificate
    /// for the attacker's own identity, claiming the attacker pod's address,
    /// reaches the recorder.
    fn assert_genuine_stream_works(&self) -> Result<()> {
        let genuine =
            self.mesh_ca
                .issue("genuine", &[attacker_id().as_str()], Validity::Current)?;
        let marker = "genuine-stream-4411";
        let payload = format!("GET /{marker} HTTP/1.1\r\nHost: recorder\r\n\r\n");
        let attempt = self
            .hbone(
                &genuine,
                &self.recorder(),
                &self.for_attacker(),
                &payload,
                1,
            )?
            .remove(0);
        assert_eq!(attempt.status, Some(200), "{attempt:?}");
        assert!(
            attempt.reply.starts_with("HTTP/1.1 200"),
            "the recorder did not answer through the tunnel: {attempt:?}"
        );
        assert!(
            self.recorder_saw(marker)?,
            "the recorder never got {marker}"
        );
        Ok(())
    }

    /// Whether any connection to the recorder brought `marker`.
    fn recorder_saw(&self, marker: &str) -> Result<bool> {
        let marker = marker.as_bytes();
        Ok(self
            .lab
            .recorded()?
            .iter()
            .any(|bytes| bytes.windows(marker.len()).any(|w| w == marker)))
    }

    /// Runs rounds of `attack` for [`ATTACK_FOR`] while the victim calls
    /// `web` on node-b, then checks the victim saw no error and node-b's
    /// agent is back to its level. Returns how many rounds ran.
    fn while_the_victim_works(&self, mut attack: impl FnMut() -> Result<()>) -> Result<usize> {
        let victim = self.lab.victim_traffic()?;
        let before = self.lab.usage("node-b")?;
        let (started, mut rounds) = (Instant::now(), 0);
        while rounds == 0 || started.elapsed() < ATTACK_FOR {
            attack()?;
            rounds += 1;
        }
        let during = self.lab.usage("node-b")?;
        victim.stop()?.assert_clean();
        let after = self.lab.assert_usage_returns("node-b", &before)?;
        eprintln!(
            "node-b's agent: {before:?} before, {during:?} after {rounds} round(s), {after:?} at rest"
        );
        Ok(rounds)
    }

    /// node-b's refusals `HBONE {what}ADDR:PORT... refused: ...` of node-a's
    /// address, shown as IPv4 or IPv4-mapped IPv6 (the listener is
    /// dual-stack).
    fn refusals(&self, what: &str) -> Vec<String> {
        let from = [
            format!("HBONE {what}{}:", self.node_a),
            format!("HBONE {what}[::ffff:{}]:", self.node_a),
        ];
        self.lab
            .mesh()
            .agent("node-b")
            .log()
            .lines()
            .filter(|l| from.iter().any(|f| l.contains(f.as_str())) && l.contains(" refused: "))
            .map(str::to_owned)
            .collect()
    }

    /// Asserts node-b logged `times` refused connections from node-a whose
    /// reason contains every one of `why`: each attempt refused, none
    /// without saying why.
    fn assert_connections_refused_because(&self, why: &[&str], times: usize) {
        let refusals = self.refusals("connection from ");
        let saying = refusals
            .iter()
            .filter(|l| why.iter().all(|w| l.contains(w)))
            .count();
        assert_eq!(
            saying,
            times,
            "refusals saying {why:?} in node-b's log; all refusals:\n{}",
            refusals.join("\n")
        );
    }

    /// Asserts node-b logged a refused stream of `peer` from node-a to `to`
    /// whose reason contains `why`.
    fn assert_stream_refused_because(&self, peer: &str, to: &str, why: &str) {
        let refusals = self.refusals(&format!("stream from {peer} ("));
        let to = format!(") to {to} refused: ");
        assert!(
            refusals.iter().any(|l| l.contains(&to) && l.contains(why)),
            "no refusal of a stream to {to} saying {why:?} in node-b's log; refusals:\n{}",
            refusals.join("\n")
        );
    }
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_in_the_handshake() {
    let attack = Attack::new().unwrap();
    attack.assert_genuine_stream_works().unwrap();
    // The same identity, even the same issuer name, but not the mesh's key.
    let foreign = Signer::foreign(&attack.dir)
        .unwrap()
        .issue("foreign", &[attacker_id().as_str()], Validity::Current)
        .unwrap();
    let marker = "from-another-ca-5123";
    let payload = format!("GET /{marker} HTTP/1.1\r\nHost: recorder\r\n\r\n");
    let rounds = attack
        .while_the_victim_works(|| {
            let attempts = attack.hbone(
                &foreign,
                &attack.recorder(),
                &attack.for_attacker(),
                &payload,
                ATTEMPTS,
            )?;
            assert_eq!(attempts.len(), ATTEMPTS);
            for attempt in &attempts {
                attempt.assert_refused_by_tls("unknown ca");
            }
            Ok(())
        })
        .unwrap();
    assert!(!attack.recorder_saw(marker).unwrap());
    attack
        .assert_connections_refused_because(&["TLS handshake", "UnknownIssuer"], rounds * ATTEMPTS);
}

#[test]
fn an_expired_or_not_yet_valid_certificate_from_the_mesh_ca_is_refused_in_the_handshake() {
    let attack = Attack::new().unwrap();
    attack.assert_genuine_stream_works().unwrap();
    let id = attacker_id();
    let expired = attack
        .mesh_ca
        .issue("expired", &[id.as_str()], Validity::Expired)
        .unwrap();
    let early = attack
        .mesh_ca
        .issue("not-yet-valid", &[id.as_str()], Validity::NotYetValid)
        .unwrap();
    let marker = "expired-certificate-6271";
    let payload = format!("GET /{marker} HTTP/1.1\r\nHost: recorder\r\n\r\n");
    let rounds = attack
        .while_the_victim_works(|| {
            for credential in [&expired, &early] {
                let attempts = attack.hbone(
                    credential,
                    &attack.recorder(),
                    &attack.for_attacker(),
                    &payload,
                    ATTEMPTS / 2,
                )?;
                assert_eq!(attempts.len(), ATTEMPTS / 2);
                for attempt in &attempts {
                    attempt.assert_refused_by_tls("certificate expired");
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(!attack.recorder_saw(marker).unwrap());
    for why in ["certificate expired", "certificate not valid yet"] {
        attack.assert_connections_refused_because(&["TLS handshake", why], rounds * ATTEMPTS / 2);
    }
}

#[test]
fn a_mesh_ca_certificate_without_exactly_one_workload_id_of_the_trust_domain_is_refused_in_the_handshake(
) {
    let attack = Attack::new().unwrap();
    attack.assert_genuine_stream_works().unwrap();
    let node_a = attack.lab.mesh().topo().node("node-a").node_name.clone();
    let node_id = format!("spiffe://cluster.local/nodemesh/node/{node_a}");
    let other_domain = format!("spiffe://evil.example/ns/{NAMESPACE}/sa/default");
    let client_id = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/client");
    // (file name, SANs, what node-b's log must say)
    let cases: [(&str, Vec<&str>, String); 5] = [
        (
            "dns-name",
            vec!["dns:web.default.svc.cluster.local"],
            "client certificate: the certificate's alternative name is not a URI".to_owned(),
        ),
        (
            "node-id",
            vec![node_id.as_str()],
            format!("client certificate: `{node_id}` is not a workload id"),
        ),
        (
            "other-trust-domain",
            vec![other_domain.as_str()],
            format!("{other_domain} is not in trust domain cluster.local"),
        ),
        (
            "no-san",
            vec![],
            "client certificate: the certificate has no subject alternative name".to_owned(),
        ),
        (
            "two-ids",
            vec![client_id.as_str(), other_domain.as_str()],
            "client certificate: the certificate has 2 subject alternative names".to_owned(),
        ),
    ];
    let marker = "wrong-san-7040";
    let payload = format!("GET /{marker} HTTP/1.1\r\nHost: recorder\r\n\r\n");
    let rounds = attack
        .while_the_victim_works(|| {
            for (name, sans, _) in &cases {
                let credential = attack.mesh_ca.issue(name, sans, Validity::Current)?;
                let attempts = attack.hbone(
                    &credential,
                    &attack.recorder(),
                    &attack.for_attacker(),
                    &payload,
                    ATTEMPTS / cases.len(),
                )?;
                assert_eq!(attempts.len(), ATTEMPTS / cases.len(), "{name}");
                for attempt in &attempts {
                    attempt.assert_refused_by_tls("access denied");
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(!attack.recorder_saw(marker).unwrap());
    for (_, _, why) in &cases {
        attack.assert_connections_refused_because(&[why], rounds * (ATTEMPTS / cases.len()));
    }
}

#[test]
fn a_stream_claiming_another_workloads_address_is_forbidden_and_one_to_no_workload_not_found() {
    let attack = Attack::new().unwrap();
    attack.assert_genuine_stream_works().unwrap();
    // A genuine certificate for the attacker's identity (`default`); `client`
    // on node-a runs as `client`, `victim` on node-a is no workload of
    // node-b, nor is node-b itself.
    let id = attacker_id();
    let credential = attack
        .mesh_ca
        .issue("attacker", &[id.as_str()], Validity::Current)
        .unwrap();
    let client = attack.pod_address("client");
    let victim = attack.pod_address("victim");
    let web = attack.pod_address("web");
    let marker = "forged-forwarded-8352";
    let payload = format!("GET /{marker} HTTP/1.1\r\nHost: recorder\r\n\r\n");
    let recorder = attack.recorder();
    let elsewhere = [
        format!("{victim}:{RECORDER_PORT}"),
        format!("{}:22", attack.node_b),
    ];
    attack
        .while_the_victim_works(|| {
            let forged = format!("for={client}");
            let attempts = attack.hbone(&credential, &recorder, &forged, &payload, ATTEMPTS / 2)?;
            for attempt in &attempts {
                assert_eq!(attempt.status, Some(403), "{attempt:?}");
                assert!(
                    attempt.body.contains(&format!(
                        "{client} is not an address of a workload with identity {id}"
                    )),
                    "{attempt:?}"
                );
            }
            // The same identity's address on another node (here node-b's
            // own `web`): an identity does not lend its addresses across
            // nodes.
            let borrowed = format!("for={web}");
            let attempts =
                attack.hbone(&credential, &recorder, &borrowed, &payload, ATTEMPTS / 4)?;
            for attempt in &attempts {
                assert_eq!(attempt.status, Some(403), "{attempt:?}");
                assert!(
                    attempt
                        .body
                        .contains("not on the node that opened this connection"),
                    "{attempt:?}"
                );
            }
            for to in &elsewhere {
                let attempts = attack.hbone(
                    &credential,
                    to,
                    &attack.for_attacker(),
                    &payload,
                    ATTEMPTS / 4,
                )?;
                for attempt in &attempts {
                    assert_eq!(attempt.status, Some(404), "{to}: {attempt:?}");
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(!attack.recorder_saw(marker).unwrap());
    attack.assert_stream_refused_because(
        &id,
        &recorder,
        &format!("{client} is not an address of a workload with identity {id}"),
    );
    let node_b = attack.lab.mesh().topo().node("node-b").node_name.clone();
    for to in &elsewhere {
        let ip = to.rsplit_once(':').unwrap().0;
        attack.assert_stream_refused_because(
            &id,
            to,
            &format!("no enrolled workload at {ip} on node {node_b}"),
        );
    }
}

#[test]
fn plaintext_to_the_hbone_port_is_refused_and_nothing_is_served() {
    let attack = Attack::new().unwrap();
    attack.assert_genuine_stream_works().unwrap();
    let marker = "plaintext-9164";
    let (host, port) = (attack.node_b.to_string(), HBONE_PORT.to_string());
    let (recorder, forwarded) = (attack.recorder(), attack.for_attacker());
    let count = (ATTEMPTS / 2).to_string();
    let rounds = attack
        .while_the_victim_works(|| {
            for mode in ["http1", "h2c"] {
                let args = [
                    host.as_str(),
                    &port,
                    mode,
                    &recorder,
                    &forwarded,
                    marker,
                    &count,
                ];
                for doc in attack.run("plaintext.py", &args)? {
                    let received = doc["received"].as_str().unwrap_or_default();
                    // Nothing but (at most) one TLS alert record: content
                    // type 21, TLS 1.x, two bytes of alert.
                    let alert = received.starts_with("1503") && received.len() == 14;
                    assert!(received.is_empty() || alert, "{mode}: {doc}");
                    assert_ne!(doc["ended"], "timeout", "{mode}: {doc}");
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(!attack.recorder_saw(marker).unwrap());
    attack.assert_connections_refused_because(&["TLS handshake"], rounds * (ATTEMPTS / 2) * 2);
}
