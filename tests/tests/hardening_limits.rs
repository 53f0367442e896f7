//! Issue 8, points 2 and 4: one tenant holding as many connections as it can
//! must not take descriptors from the others, nor lock other callers out of a
//! destination. Each attack runs from the `attacker` pod while the `victim`
//! keeps sending requests.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::config::{self, ServicePort};
use nodemesh_testbed::workload_apps::{python3, start_http_echo, start_tcp_echo};
use nodemesh_testbed::{Agent, Topology};
use serde_json::Value;

/// The victim's requests: through node-a's L7 proxy to `web` on node-b.
const VICTIM_URL: &str = "http://web.shop:9080/";
/// Descriptors an agent may hold above its level before an attack once it is
/// over: pooled upstream connections of the victim come and go.
const FDS_SLACK: usize = 16;

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

/// Polls `what` until it holds, for at most `within`.
fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn number(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// How many descriptors the process `pid` holds.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// The holding script running in a pod, killed when dropped (its sockets
/// close with it).
struct Holder {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Holder {
    /// Runs [`HOLD_PY`] in `pod` against `host:port`.
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
        let netns = topo.pod(pod).netns.clone();
        let (port, count) = (port.to_string(), count.to_string());
        let child = topo
            .command_in(
                &netns,
                &[
                    python3(),
                    script.to_str().unwrap(),
                    host,
                    &port,
                    &count,
                    mode,
                ],
            )?
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the holding script")?;
        Ok(Holder { child, log })
    }

    /// Waits for the script's report (all connections tried).
    fn report(&mut self) -> Result<Held> {
        let mut report = None;
        wait_for(
            "the holding script to report",
            Duration::from_secs(180),
            || {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                report = text
                    .lines()
                    .find_map(|l| serde_json::from_str::<Value>(l).ok());
                if report.is_none() && self.child.try_wait()?.is_some() {
                    bail!("the holding script exited: {text}");
                }
                Ok(report.is_some())
            },
        )?;
        let report = report.unwrap();
        Ok(Held {
            held: number(&report["held"]),
            reset: number(&report["reset"]),
            other: number(&report["other"]),
            report,
        })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes: node-a runs `victim` (namespace shop) and `attacker`
/// (namespace evil); node-b runs `web` (HTTP on 9080, Service `web`, port
/// `http`) and `echo` (TCP echo on 7000, Service `echo`, port `tcp-echo`).
struct Lab {
    // Agents first: they stop before the topology goes.
    agents: Vec<Agent>,
    topo: Topology,
}

impl Lab {
    /// Starts the lab; `node_a_nofile` runs node-a's agent under that
    /// open-file limit.
    fn new(flags: &[&str], node_a_nofile: Option<u64>) -> Result<Lab> {
        let mut topo = Topology::new()?;
        topo.add_node("node-a")?;
        topo.add_node("node-b")?;
        for (node, pod) in [
            ("node-a", "victim"),
            ("node-a", "attacker"),
            ("node-b", "web"),
            ("node-b", "echo"),
        ] {
            topo.add_pod(node, pod)?;
        }
        start_http_echo(&mut topo, "web", 9080, "web")?;
        start_tcp_echo(&mut topo, "echo", 7000)?;
        let dir = topo.work_dir().join("config");
        std::fs::create_dir_all(&dir)?;
        let port = |name, port| ServicePort {
            name,
            port,
            target_port: port,
        };
        config::write(
            &dir,
            "mesh.yaml",
            &[
                config::namespace("shop", true),
                config::namespace("evil", true),
                config::workload(topo.pod("victim"), "shop", &[("app", "victim")]),
                config::workload(topo.pod("attacker"), "evil", &[("app", "attacker")]),
                config::workload(topo.pod("web"), "shop", &[("app", "web")]),
                config::workload(topo.pod("echo"), "shop", &[("app", "echo")]),
                config::service_with_ports(
                    "web",
                    "shop",
                    &[("app", "web")],
                    &[port("http", 9080)],
                    None,
                ),
                config::service_with_ports(
                    "echo",
                    "shop",
                    &[("app", "echo")],
                    &[port("tcp-echo", 7000)],
                    None,
                ),
            ],
        )?;
        let bin = nodemesh_testbed::nodemesh_bin();
        let mut agents = Vec::new();
        for node in ["node-a", "node-b"] {
            let mut agent = Agent::start_with(&mut topo, node, &dir, &bin, flags)?;
            if node == "node-a" && node_a_nofile.is_some() {
                agent.set_open_file_limit(node_a_nofile);
                agent.restart(&mut topo)?;
            }
            agents.push(agent);
        }
        let lab = Lab { agents, topo };
        for node in ["node-a", "node-b"] {
            wait_for("both workloads enrolled", Duration::from_secs(20), || {
                Ok(lab.agent(node).status_json()?["workloads"]["enrolled"] == 2)
            })?;
        }
        Ok(lab)
    }

    fn agent(&self, node: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.node() == node)
            .expect("a node of the lab")
    }

    /// The agent's open descriptors.
    fn fds(&self, node: &str) -> Result<usize> {
        open_fds(self.agent(node).pid().context("the agent is not running")?)
    }
}

/// The victim's requests while an attack runs: a new connection each, about
/// 20 a second, to `url`.
struct VictimTraffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl VictimTraffic {
    fn start(topo: &Topology, url: &str) -> VictimTraffic {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let sent = std::sync::Arc::new(AtomicUsize::new(0));
        let netns = topo.pod("victim").netns.clone();
        let (stop2, sent2, url) = (stop.clone(), sent.clone(), url.to_owned());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &netns,
                        "curl",
                        "--noproxy",
                        "*",
                        "--max-time",
                        "5",
                        "-sS",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        &url,
                    ])
                    .output();
                sent2.fetch_add(1, Ordering::Relaxed);
                match out {
                    Ok(o) if o.status.success() && o.stdout == b"200" => {}
                    Ok(o) => failures.push(format!(
                        "{}: {} {}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            failures
        });
        VictimTraffic { stop, thread, sent }
    }

    /// Stops and asserts that every request got its `200`.
    fn assert_clean(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let failures = self.thread.join().expect("the victim's thread");
        let sent = self.sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sent > 0, "the victim sent nothing");
        assert!(
            failures.is_empty(),
            "{} of {sent} victim requests failed: {failures:#?}",
            failures.len()
        );
    }
}

/// Waits until the agent of `node` holds no more descriptors than `level`
/// (plus [`FDS_SLACK`]) and its budget has nothing charged beyond what the
/// victim's pooled connections hold.
fn assert_fds_return(lab: &Lab, node: &str, level: usize) {
    let mut last = 0;
    let back = wait_for(
        "the agent's descriptors to return",
        Duration::from_secs(60),
        || {
            last = lab.fds(node)?;
            Ok(last <= level + FDS_SLACK)
        },
    );
    assert!(
        back.is_ok(),
        "{node}: {last} descriptors open, {level} before the attack"
    );
}

#[test]
fn a_tenant_opening_more_connections_than_the_open_file_limit_takes_no_descriptor_from_others() {
    const LIMIT: u64 = 1024;
    let lab = Lab::new(&[], Some(LIMIT)).unwrap();
    let agent = lab.agent("node-a");
    let status = agent.status_json().unwrap();
    let limits = &status["limits"]["descriptors"];
    assert_eq!(limits["nofile"]["soft"], LIMIT, "{limits:#}");
    assert_eq!(limits["nofile"]["hard"], LIMIT, "{limits:#}");
    assert_eq!(limits["max_connections_from"], "derived", "{limits:#}");
    assert_eq!(limits["workloads"], 2, "{limits:#}");
    let share = number(&limits["max_connections_per_workload"]);
    // Two workloads cannot have more than half of the limit's connections.
    assert!(share > 0 && share * 2 * 2 <= LIMIT, "{limits:#}");
    assert!(
        agent.log().contains("RLIMIT_NOFILE: soft limit 1024"),
        "{}",
        agent.log()
    );

    let victim = VictimTraffic::start(&lab.topo, VICTIM_URL);
    std::thread::sleep(Duration::from_secs(2));
    let before = lab.fds("node-a").unwrap();
    let attempts = LIMIT as usize + 200;
    let mut attack =
        Holder::start(&lab.topo, "attacker", "echo.shop", 7000, attempts, "echo").unwrap();
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
    // While it holds them, the victim goes on (and opens new connections).
    std::thread::sleep(Duration::from_secs(2));
    let status = agent.status_json().unwrap();
    let tenants = &status["limits"]["per_workload"];
    assert_eq!(
        number(&tenants["evil/attacker"]["rejected_outbound"]),
        report.reset,
        "{tenants:#}"
    );
    assert_eq!(
        tenants["evil/attacker"]["descriptors"],
        share * 2,
        "{tenants:#}"
    );
    assert_eq!(
        tenants["shop/victim"]["rejected_outbound"], 0,
        "{tenants:#}"
    );
    let table = agent.cli(&["status"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    eprintln!("{table}");
    assert!(
        table.contains("descriptors: limit 1024 (hard 1024)"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "per workload: {share} connections at most (derived"
        )),
        "{table}"
    );
    victim.assert_clean();

    let during = lab.fds("node-a").unwrap();
    drop(attack);
    assert_fds_return(&lab, "node-a", before);
    eprintln!(
        "node-a descriptors: {before} before, {during} during, {} after",
        lab.fds("node-a").unwrap()
    );
    for node in ["node-a", "node-b"] {
        let log = lab.agent(node).log();
        assert!(!log.contains("Too many open files"), "{node}:\n{log}");
    }
}

#[test]
fn one_caller_cannot_lock_other_callers_out_of_a_destination() {
    // 100 connections (200 descriptors) per workload on both nodes.
    let lab = Lab::new(&["--max-connections-per-workload", "100"], None).unwrap();
    let web = lab.topo.pod("web").address.to_string();
    let victim = VictimTraffic::start(&lab.topo, VICTIM_URL);
    std::thread::sleep(Duration::from_secs(2));
    let before = lab.fds("node-b").unwrap();

    // The attacker calls web's address directly (relayed as L4 by node-a,
    // so every connection reaches node-b) with more than web's share.
    let mut attack = Holder::start(&lab.topo, "attacker", &web, 9080, 150, "http").unwrap();
    let report = attack.report().unwrap();
    eprintln!("attacker: {}", report.report);
    // Alone it gets at most half of web's share (less what the victim holds).
    assert!((40..=50).contains(&report.held), "{:#}", report.report);
    assert_eq!(report.other, 0, "{:#}", report.report);
    assert_eq!(report.held + report.reset, 150, "{:#}", report.report);
    // Another caller still opens new connections to web while it holds them.
    let mut other = Holder::start(&lab.topo, "victim", &web, 9080, 10, "http").unwrap();
    let second = other.report().unwrap();
    assert_eq!(second.held, 10, "{:#}", second.report);

    let status = lab.agent("node-b").status_json().unwrap();
    let web_usage = &status["limits"]["per_workload"]["shop/web"];
    assert_eq!(
        number(&web_usage["rejected_inbound"]),
        report.reset,
        "{web_usage:#}"
    );
    assert!(number(&web_usage["inbound_callers"]) >= 2, "{web_usage:#}");
    victim.assert_clean();

    let during = lab.fds("node-b").unwrap();
    drop((attack, other));
    assert_fds_return(&lab, "node-b", before);
    eprintln!(
        "node-b descriptors: {before} before, {during} during, {} after; web: {web_usage}",
        lab.fds("node-b").unwrap()
    );
}
