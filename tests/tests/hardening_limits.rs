//! Descriptors shared by the tenants of a node: one tenant holding as many
//! connections as it can must not take descriptors from the others (nor make
//! the agent hit its open-file limit), and one caller must not lock other
//! callers out of a destination. Each attack runs from the `attacker` pod
//! while the `victim` keeps calling `web`; afterwards the agents' descriptors
//! and memory are back where they were.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::mesh::{APP_PORT, NAMESPACE};
use nodemesh_testbed::tenants::{Lab, ECHO_HOST, ECHO_PORT};
use nodemesh_testbed::workload_apps::python3;
use nodemesh_testbed::Topology;
use serde_json::Value;

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

fn key(pod: &str) -> String {
    format!("{NAMESPACE}/{pod}")
}

/// Opens COUNT connections to HOST:PORT one after the other, proves each one
/// reached the server (`echo`: a byte echoed back; `http`: a `200` to a GET)
/// and holds those that did; prints how many were held, reset or neither as
/// JSON, then sleeps until killed.
const HOLD_PY: &str = r#"
import json, resource, socket, sys, time
host, port, count, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
host = socket.gethostbyname(host)
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
send, want = {"echo": (b"x", b"x"),
              "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200")}[mode]
held, counts = [], {"held": 0, "reset": 0, "other": 0, "errors": []}
for _ in range(count):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, port))
        s.sendall(send)
        got = b""
        while len(got) < len(want):
            chunk = s.recv(len(want) - len(got))
            if not chunk:
                break
            got += chunk
        if got == want:
            held.append(s)
            counts["held"] += 1
            continue
        counts["reset" if not got else "other"] += 1
    except (ConnectionResetError, BrokenPipeError):
        counts["reset"] += 1
    except OSError as e:
        counts["other"] += 1
        counts["errors"] = (counts["errors"] + [str(e)])[-5:]
    s.close()
print(json.dumps(counts), flush=True)
time.sleep(3600)
"#;

/// What [`HOLD_PY`] reported.
#[derive(Debug)]
struct Held {
    held: u64,
    reset: u64,
    other: u64,
    report: Value,
}

fn number(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// [`HOLD_PY`] running in a pod, holding its connections until dropped
/// (killed: its sockets close with it).
struct Holder {
    child: Child,
    log: PathBuf,
}

impl Holder {
    /// Opens `count` connections from `pod` to `host:port` (`mode`: `echo`
    /// or `http`).
    fn start(
        topo: &Topology,
        pod: &str,
        host: &str,
        port: u16,
        count: usize,
        mode: &str,
    ) -> Result<Holder> {
        let script = topo.work_dir().join("hold.py");
        std::fs::write(&script, HOLD_PY)?;
        let log = topo
            .work_dir()
            .join(format!("hold-{pod}-{host}-{port}.log"));
        let out = std::fs::File::create(&log)?;
        let (port, count) = (port.to_string(), count.to_string());
        let args = [
            python3(),
            &*script.to_string_lossy(),
            host,
            &port,
            &count,
            mode,
        ];
        let child = topo
            .command_in(&topo.pod(pod).netns, &args)?
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the holding script")?;
        Ok(Holder { child, log })
    }

    /// Waits until every connection was tried and returns the outcome.
    fn report(&mut self) -> Result<Held> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(report) = text
                .lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
            {
                return Ok(Held {
                    held: number(&report["held"]),
                    reset: number(&report["reset"]),
                    other: number(&report["other"]),
                    report,
                });
            }
            if self.child.try_wait()?.is_some() {
                bail!("the holding script exited: {text}");
            }
            if Instant::now() > deadline {
                bail!("the holding script did not report within 180 s: {text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_tenant_opening_more_connections_than_the_open_file_limit_takes_no_descriptor_from_others() {
    const LIMIT: u64 = 1024;
    let mut lab = Lab::new(app_bin(), &[]).unwrap();
    lab.mesh_mut()
        .restart_agent("node-a", |agent| agent.set_open_file_limit(Some(LIMIT)))
        .unwrap();
    let agent = lab.mesh().agent("node-a");
    assert!(
        agent.log().contains("RLIMIT_NOFILE: soft limit 1024"),
        "{}",
        agent.log()
    );
    let status = agent.status_json().unwrap();
    let limits = &status["limits"]["descriptors"];
    assert_eq!(limits["nofile"]["soft"], LIMIT, "{limits:#}");
    assert_eq!(limits["nofile"]["hard"], LIMIT, "{limits:#}");
    assert_eq!(limits["max_connections_from"], "derived", "{limits:#}");
    let workloads = number(&limits["workloads"]);
    // The split follows enrollment.
    assert_eq!(
        workloads,
        number(&status["workloads"]["enrolled"]),
        "{status:#}"
    );
    let share = number(&limits["max_connections_per_workload"]);
    // Each workload's two descriptors per connection fit in the limit.
    assert!(share > 0 && share * 2 * workloads < LIMIT, "{limits:#}");

    let victim = lab.victim_traffic().unwrap();
    let before = lab.usage("node-a").unwrap();
    let attempts = LIMIT as usize + 200;
    let topo = lab.mesh().topo();
    let mut attack =
        Holder::start(topo, "attacker", ECHO_HOST, ECHO_PORT, attempts, "echo").unwrap();
    let report = attack.report().unwrap();
    eprintln!("node-a limits: {limits}\nattacker: {}", report.report);
    // The attacker holds exactly its share; every other connection was reset
    // at once, none left hanging.
    assert_eq!(report.held, share, "{:#}", report.report);
    assert_eq!(report.other, 0, "{:#}", report.report);
    assert_eq!(
        report.held + report.reset,
        attempts as u64,
        "{:#}",
        report.report
    );
    // While it holds them, the victim goes on opening new connections.
    std::thread::sleep(Duration::from_secs(2));
    let status = agent.status_json().unwrap();
    let tenants = &status["limits"]["per_workload"];
    let attacker = &tenants[key("attacker")];
    assert_eq!(
        number(&attacker["rejected_outbound"]),
        report.reset,
        "{tenants:#}"
    );
    assert_eq!(number(&attacker["descriptors"]), share * 2, "{tenants:#}");
    assert_eq!(
        tenants[key("victim")]["rejected_outbound"],
        0,
        "{tenants:#}"
    );
    let table = agent.cli(&["status"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    eprintln!("{table}");
    assert!(
        table.contains("descriptors: limit 1024 (hard 1024)"),
        "{table}"
    );
    let line = format!("per workload: {share} connections at most (derived");
    assert!(table.contains(&line), "{table}");
    let during = lab.usage("node-a").unwrap();
    victim.stop().unwrap().assert_clean();

    drop(attack);
    let after = lab.assert_usage_returns("node-a", &before).unwrap();
    eprintln!("node-a: {before:?} before, {during:?} during, {after:?} after");
    for node in ["node-a", "node-b"] {
        let log = lab.mesh().agent(node).log();
        assert!(!log.contains("Too many open files"), "{node}:\n{log}");
    }
}

#[test]
fn one_caller_cannot_lock_other_callers_out_of_a_destination() {
    // 100 connections (200 descriptors) per workload on both nodes.
    let lab = Lab::new(app_bin(), &["--max-connections-per-workload", "100"]).unwrap();
    let topo = lab.mesh().topo();
    let web = topo.pod("web").address.to_string();
    let victim = lab.victim_traffic().unwrap();
    let before = lab.usage("node-b").unwrap();

    // The attacker calls web's address directly (relayed as L4 by node-a, so
    // every connection reaches node-b) with more than web's whole share.
    let mut attack = Holder::start(topo, "attacker", &web, APP_PORT, 150, "http").unwrap();
    let report = attack.report().unwrap();
    eprintln!("attacker: {}", report.report);
    // Alone, it gets at most half of web's share (less what the victim holds).
    assert!((40..=50).contains(&report.held), "{:#}", report.report);
    assert_eq!(report.other, 0, "{:#}", report.report);
    assert_eq!(report.held + report.reset, 150, "{:#}", report.report);
    // Another caller still opens new connections to web while it holds them.
    let mut other = Holder::start(topo, "client", &web, APP_PORT, 10, "http").unwrap();
    let second = other.report().unwrap();
    assert_eq!(second.held, 10, "{:#}", second.report);

    let status = lab.mesh().agent("node-b").status_json().unwrap();
    let web_usage = &status["limits"]["per_workload"][key("web")];
    assert_eq!(
        number(&web_usage["rejected_inbound"]),
        report.reset,
        "{web_usage:#}"
    );
    assert!(number(&web_usage["inbound_callers"]) >= 3, "{web_usage:#}");
    let during = lab.usage("node-b").unwrap();
    victim.stop().unwrap().assert_clean();

    drop((attack, other));
    let after = lab.assert_usage_returns("node-b", &before).unwrap();
    eprintln!("node-b: {before:?} before, {during:?} during, {after:?} after; web: {web_usage}");
}
