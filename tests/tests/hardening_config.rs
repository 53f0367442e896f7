//! Hostile config directories (issue 8, point 7): while the victim tenant keeps calling a
//! Service through both agents, a 100 000-level deep YAML file and a file of more Services
//! than `--service-cidr` holds are each rejected with a clear error in `nodemesh status`;
//! the admin socket answers while loads run; the victim sees no error; the previous config
//! keeps serving; the agents' memory and descriptors return to their level; and SIGTERM
//! stops an agent while a long load is still running. A malformed PeerAuthentication
//! (issue 9, point 6) is refused the same way, and a valid one reaches `nodemesh explain`.

use std::fmt::Write as _;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nodemesh_testbed::config;
use nodemesh_testbed::tenants::{Lab, ECHO_HOST, ECHO_PORT, WEB_URL};
use nodemesh_testbed::topology::pid_alive;
use nodemesh_testbed::Agent;
use serde_json::Value;

/// Small, so that a modest file of Services overflows it.
const SERVICE_CIDR: &str = "10.96.0.0/24";
/// Loads, and the rejections they end in, are waited for this long at most.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
/// How long a stopping agent may take: the test bed's own grace before SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
const NODES: [&str; 2] = ["node-a", "node-b"];

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

fn lab() -> Lab {
    Lab::new(app_bin(), &["--service-cidr", SERVICE_CIDR]).unwrap()
}

fn agent<'a>(lab: &'a Lab, node: &str) -> &'a Agent {
    lab.mesh().agent(node)
}

fn status(lab: &Lab, node: &str) -> Value {
    agent(lab, node)
        .status_json()
        .unwrap_or_else(|e| panic!("the admin socket of {node} must keep answering: {e:#}"))
}

fn generation(lab: &Lab, node: &str) -> u64 {
    status(lab, node)["config"]["generation"].as_u64().unwrap()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + LOAD_DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

/// Puts `file` into the config directory in one step (written outside it, then moved in),
/// so that it is the only change the agents see, however long writing it takes.
fn place(lab: &Lab, file: &str, text: &str) {
    let outside = lab.mesh().topo().work_dir().join(file);
    std::fs::write(&outside, text).unwrap();
    std::fs::rename(&outside, lab.mesh().config_dir().join(file)).unwrap();
}

/// Places `file`, then waits until both agents rejected it and kept their generation;
/// returns node-a's error.
fn rejected(lab: &Lab, file: &str, text: &str) -> String {
    let before = NODES.map(|node| generation(lab, node));
    place(lab, file, text);
    let mut errors = Vec::new();
    for (node, generation) in NODES.into_iter().zip(before) {
        wait_for(&format!("{node} to reject {file}"), || {
            let status = status(lab, node);
            let config = &status["config"];
            assert_eq!(config["generation"], generation, "{node} accepted {file}");
            let error = config["last_error"].as_str().unwrap_or_default();
            let done = error.contains(file);
            if done {
                errors.push(error.to_owned());
            }
            done
        });
    }
    errors.swap_remove(0)
}

/// Removes `file` and waits for both agents to load the directory without it, cleanly.
fn remove(lab: &Lab, file: &str) {
    let before = NODES.map(|node| generation(lab, node));
    config::remove(lab.mesh().config_dir(), file).unwrap();
    for (node, generation) in NODES.into_iter().zip(before) {
        wait_for(&format!("{node} to load the config without {file}"), || {
            let status = status(lab, node);
            status["config"]["generation"].as_u64() > Some(generation)
                && status["config"]["last_error"].is_null()
        });
    }
}

/// `count` Services without a clusterIP.
fn services(count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: flood-{i}, namespace: flood}}\n\
             spec: {{selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}\n"
        );
    }
    out
}

/// A valid file of `count` Namespaces, slow to load only by its size.
fn namespaces(count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: tenant-{i}\n  \
             labels: {{team: team-{i}, tier: standard}}\n"
        );
    }
    out
}

#[test]
fn hostile_config_files_are_rejected_without_disturbing_traffic_or_the_admin_socket() {
    let lab = lab();
    let before = NODES.map(|node| lab.usage(node).unwrap());
    let victim = lab.victim_traffic().unwrap();

    // 100 000 levels of nesting in 200 KB (it took serde_yaml ~40 s of CPU).
    let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let error = rejected(&lab, "deep.yaml", &deep);
    assert!(
        error.contains("deep.yaml: document nested deeper than the limit of 64 levels"),
        "{error}"
    );
    remove(&lab, "deep.yaml");

    // 20 000 Services without clusterIP for the 254 addresses of a /24.
    let error = rejected(&lab, "services.yaml", &services(20_000));
    let expected =
        format!("no free cluster IP left in service CIDR {SERVICE_CIDR} (254 addresses) for ");
    assert!(error.contains(&expected), "{error}");
    assert!(
        error.contains("Service(s) without clusterIP: flood/flood-"),
        "{error}"
    );
    remove(&lab, "services.yaml");

    // A valid but large file: the admin socket answers while it loads.
    let generation_a = generation(&lab, "node-a");
    place(&lab, "tenants.yaml", &namespaces(150_000));
    let mut answered_while_loading = false;
    wait_for("the large config", || {
        let status = status(&lab, "node-a");
        answered_while_loading |= status["config"]["loading"] == true;
        status["config"]["generation"].as_u64() > Some(generation_a)
    });
    assert!(
        answered_while_loading,
        "no status answer while the load ran"
    );
    assert!(status(&lab, "node-a")["config"]["namespaces"].as_u64() > Some(150_000));
    remove(&lab, "tenants.yaml");

    let report = victim.stop().unwrap();
    report.assert_clean();
    eprintln!("the victim made {} requests without error", report.sent);
    // The previous config still serves, and the agents gave back what the loads took.
    let reply = lab.mesh().get_one("victim", WEB_URL, &[]).unwrap();
    assert_eq!(reply.status, 200);
    for (node, before) in NODES.into_iter().zip(before) {
        let after = lab.assert_usage_returns(node, &before).unwrap();
        eprintln!("{node}: agent usage before {before:?}, after {after:?}");
    }
}

#[test]
fn sigterm_stops_an_agent_while_a_long_load_runs() {
    let lab = lab();
    let node = agent(&lab, "node-a");
    assert_eq!(status(&lab, "node-a")["config"]["loading"], false);
    let generation = generation(&lab, "node-a");
    // The only change, so the load it starts is the one SIGTERM lands in.
    place(&lab, "tenants.yaml", &namespaces(300_000));
    wait_for("the load to start", || {
        status(&lab, "node-a")["config"]["loading"] == true
    });
    let pid = node.pid().expect("the agent runs");
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + STOP_DEADLINE;
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "SIGTERM did not stop the agent");
        sleep(Duration::from_millis(20));
    }
    let log = node.log();
    assert!(
        log.contains("stopped; eBPF programs stay attached"),
        "the agent did not stop cleanly:\n{log}"
    );
    assert!(
        !log.contains(&format!("loaded config generation {}", generation + 1)),
        "the agent waited for the load to finish:\n{log}"
    );
    config::remove(lab.mesh().config_dir(), "tenants.yaml").unwrap();
}

/// `nodemesh explain -o json` asked on node-a for the victim, parsed.
fn explain(lab: &Lab, url: &str) -> Value {
    let out = agent(lab, "node-a")
        .cli(&["explain", "--from", "default/victim", url, "-o", "json"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A malformed PeerAuthentication is refused like any hostile config file, with file,
/// object and field named in `nodemesh status` and in the log, while the victim keeps
/// working; a valid one, mesh-wide in the root namespace given by `--root-namespace`, is
/// what `nodemesh explain` then shows.
#[test]
fn a_malformed_peer_authentication_is_rejected_and_a_valid_one_is_explained() {
    let lab = Lab::new(app_bin(), &["--root-namespace", "mesh-root"]).unwrap();
    let before = NODES.map(|node| lab.usage(node).unwrap());
    let victim = lab.victim_traffic().unwrap();

    let port_level_without_selector = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: default}
spec:
  mtls: {mode: STRICT}
  portLevelMtls: {9080: {mode: DISABLE}}
";
    let unknown_mode = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: default}
spec: {mtls: {mode: STRICTER}}
";
    let port_out_of_range = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {70000: {mode: DISABLE}}
";
    for (text, why) in [
        (
            port_level_without_selector,
            "pa.yaml: PeerAuthentication default/web: spec.portLevelMtls: requires \
             spec.selector.matchLabels",
        ),
        (
            unknown_mode,
            "pa.yaml: PeerAuthentication default/web: spec.mtls.mode: unknown variant `STRICTER`",
        ),
        (
            port_out_of_range,
            "pa.yaml: PeerAuthentication default/web: spec.portLevelMtls.70000: must be between \
             1 and 65535",
        ),
    ] {
        let error = rejected(&lab, "pa.yaml", text);
        assert!(error.contains(why), "{error}");
        for node in NODES {
            let log = agent(&lab, node).log();
            assert!(
                log.contains("rejected config in") && log.contains(why),
                "{log}"
            );
        }
        remove(&lab, "pa.yaml");
    }

    let policies = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh-root}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {9080: {mode: DISABLE}}
";
    let generation = generation(&lab, "node-a");
    place(&lab, "pa.yaml", policies);
    wait_for("node-a to load the policies", || {
        let config = &status(&lab, "node-a")["config"];
        config["generation"].as_u64() > Some(generation) && config["last_error"].is_null()
    });
    let web = explain(&lab, WEB_URL);
    assert_eq!(
        web["destinations"][0]["mtls"],
        serde_json::json!(["DISABLE (PeerAuthentication default/web) at default/web"]),
        "{web:#}"
    );
    assert_eq!(
        web["destinations"][0]["upstreamTls"],
        "auto (no DestinationRule sets tls)"
    );
    let echo = explain(&lab, &format!("http://{ECHO_HOST}:{ECHO_PORT}/"));
    assert_eq!(
        echo["mtls"],
        serde_json::json!(["STRICT (PeerAuthentication mesh-root/default) at default/echo"]),
        "{echo:#}"
    );
    let table = agent(&lab, "node-a")
        .cli(&["explain", "--from", "default/victim", WEB_URL])
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("  mtls       DISABLE (PeerAuthentication default/web) at default/web"),
        "{table}"
    );
    // The victim's traffic runs on under the new policies for a while (about 20 of its
    // requests), not only across the reloads.
    sleep(Duration::from_secs(1));
    remove(&lab, "pa.yaml");

    victim.stop().unwrap().assert_clean();
    for (node, before) in NODES.into_iter().zip(before) {
        lab.assert_usage_returns(node, &before).unwrap();
    }
}
