//! The mesh CA end to end: a real `nodemesh ca` on a host of its own, a node
//! credential from the real `issue-node`, and a real agent that gets its
//! workload's certificate over the fabric.

use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use nodemesh_testbed::ca::MeshCa;
use nodemesh_testbed::{config, nodemesh_bin, Agent, Topology};
use serde_json::Value;

/// Generous, since the machine running the tests may be busy.
const DEADLINE: Duration = Duration::from_secs(30);

/// node-a (plus `other_nodes`) with one workload, `shop/web` running as
/// service account `web`, and a mesh CA reading that configuration.
fn shop_on_node_a(other_nodes: &[&str]) -> (Topology, std::path::PathBuf, MeshCa) {
    let mut topo = Topology::new().expect("topology");
    topo.add_node("node-a").unwrap();
    for node in other_nodes {
        topo.add_node(node).unwrap();
    }
    let web = topo.add_pod("node-a", "web").unwrap();
    let config_dir = topo.work_dir().join("config");
    config::write(
        &config_dir,
        "mesh.yaml",
        &[
            config::namespace("shop", true),
            config::workload_with_account(&web, "shop", &[("app", "web")], "web"),
        ],
    )
    .unwrap();
    let ca = topo.mesh_ca(&config_dir, &nodemesh_bin()).unwrap();
    (topo, config_dir, ca)
}

#[test]
fn an_agent_gets_its_workloads_certificate_and_never_sees_the_ca_key() {
    let (mut topo, config_dir, ca) = shop_on_node_a(&[]);
    let node_name = topo.node("node-a").node_name.clone();
    let credential = ca.issue_node(&topo, &node_name).unwrap();
    let credential = credential.display().to_string();
    let agent = Agent::start_with(
        &mut topo,
        "node-a",
        &config_dir,
        &nodemesh_bin(),
        &[
            "--ca-address",
            ca.address(),
            "--node-credential",
            &credential,
            "--cert-lifetime",
            "1h",
        ],
    )
    .unwrap();

    let identity = "spiffe://cluster.local/ns/shop/sa/web";
    let deadline = Instant::now() + DEADLINE;
    let certs = loop {
        let out = agent.cli(&["certs", "-o", "json"]).unwrap();
        let certs: Value = serde_json::from_slice(&out.stdout).unwrap();
        if certs[0]["state"] == "valid" {
            break certs;
        }
        assert!(
            Instant::now() < deadline,
            "no valid certificate: {certs}\nCA log:\n{}",
            ca.log(&topo)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(certs.as_array().unwrap().len(), 1, "{certs}");
    assert_eq!(certs[0]["identity"], identity);
    assert!(certs[0]["issuer"]
        .as_str()
        .unwrap()
        .contains("nodemesh root CA"));
    let table = agent.cli(&["certs"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table.lines().find(|l| l.contains(identity)).expect(&table);
    assert!(row.contains("valid"), "{table}");
    assert!(
        row.contains(certs[0]["serial"].as_str().unwrap()),
        "{table}"
    );

    let status = agent.status_json().unwrap();
    assert_eq!(status["identity"]["connected"], true, "{status}");
    assert_eq!(status["identity"]["address"], ca.address());
    assert!(status["identity"]["next_renewal"].is_string(), "{status}");
    assert!(ca
        .log(&topo)
        .contains(&format!("signed {identity} for node {node_name}")));

    // The CA key stays the CA's: root-owned, 0600, and nothing the agent
    // runs with names the CA's state directory.
    let key = std::fs::metadata(ca.state_dir().join("root-key.pem")).unwrap();
    assert_eq!(key.mode() & 0o777, 0o600);
    assert_eq!(key.uid(), 0);
    let state_dir = ca.state_dir().display().to_string();
    let pid = agent.pid().expect("the agent runs");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--node-credential"), "{cmdline}");
    assert!(!cmdline.contains(&state_dir), "{cmdline}");
    for entry in std::fs::read_dir(&config_dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        assert!(!text.contains(&state_dir), "{text}");
    }
}

/// A compromised node (its credential in an attacker's hands, OpenSSL and
/// curl instead of an agent) asks the real CA for a workload identity that
/// runs on another node: refused, with the reason in the answer and the log.
/// The same CSR from the right node is signed, and a client without a node
/// credential does not get past TLS.
#[test]
fn a_node_cannot_get_another_nodes_identity() {
    let (topo, _, ca) = shop_on_node_a(&["node-b"]);
    let node_b = topo.node("node-b").clone();
    let node_a_name = topo.node("node-a").node_name.clone();
    let credential_a = ca.issue_node(&topo, &node_a_name).unwrap();
    let credential_b = ca.issue_node(&topo, &node_b.node_name).unwrap();

    let identity = "spiffe://cluster.local/ns/shop/sa/web";
    let work = topo.work_dir().to_owned();
    let csr = work.join("csr.pem");
    let openssl = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=attacker", "-keyout"])
        .arg(work.join("attacker-key.pem"))
        .args(["-addext", &format!("subjectAltName=URI:{identity}"), "-out"])
        .arg(&csr)
        .output()
        .unwrap();
    assert!(openssl.status.success(), "{openssl:?}");
    let request = serde_json::json!({
        "csr": std::fs::read_to_string(&csr).unwrap(),
        "lifetime_seconds": 3600,
    });
    std::fs::write(work.join("request.json"), request.to_string()).unwrap();

    let ask = |credential: Option<&std::path::Path>| {
        let mut args: Vec<String> = ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"]
            .map(String::from)
            .into();
        let resolve = format!(
            "nodemesh-ca.invalid:15012:{}",
            ca.address().split(':').next().unwrap()
        );
        args.extend(["--resolve".into(), resolve]);
        if let Some(credential) = credential {
            let file = |name: &str| credential.join(name).display().to_string();
            args.extend(["--cacert".into(), file("root-cert.pem")]);
            args.extend(["--cert".into(), file("node-cert.pem")]);
            args.extend(["--key".into(), file("node-key.pem")]);
        } else {
            args.push("--insecure".into());
        }
        args.extend([
            "-H".into(),
            "content-type: application/json".into(),
            "--data-binary".into(),
            format!("@{}", work.join("request.json").display()),
            "https://nodemesh-ca.invalid:15012/v1/sign".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        topo.run_in(&node_b.netns, &args).unwrap()
    };

    let stolen = ask(Some(&credential_b));
    let answer = String::from_utf8_lossy(&stolen.stdout);
    let (body, status) = answer.rsplit_once('\n').expect(&answer);
    assert_eq!(status, "403", "{answer}");
    let reason = format!(
        "no workload with identity {identity} runs on node `{}`",
        node_b.node_name
    );
    assert!(body.contains(&reason), "{body}");
    let log = ca.log(&topo);
    assert!(
        log.contains(&format!("refused to sign for node {}", node_b.node_name))
            && log.contains(&reason),
        "{log}"
    );

    // The control: the node that runs the workload gets it signed.
    let rightful = ask(Some(&credential_a));
    let answer = String::from_utf8_lossy(&rightful.stdout);
    assert!(answer.ends_with("\n200"), "{answer}");
    assert!(answer.contains("BEGIN CERTIFICATE"), "{answer}");

    // Without a node credential there is no TLS session at all.
    let anonymous = ask(None);
    assert!(!anonymous.status.success(), "{anonymous:?}");
    let deadline = Instant::now() + DEADLINE;
    while !ca.log(&topo).contains("TLS handshake failed") {
        assert!(Instant::now() < deadline, "{}", ca.log(&topo));
        std::thread::sleep(Duration::from_millis(50));
    }
}
