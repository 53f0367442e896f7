//! Hostile config directories (issue 8, point 7): while a victim tenant keeps sending
//! requests, a 100 000-level deep YAML file and a file of more Services than
//! `--service-cidr` holds are each rejected with a clear error in `nodemesh status`; the
//! admin socket answers while loads run; the victim sees no error; the previous config keeps
//! serving; the agent's memory and descriptors return to their level; and SIGTERM stops the
//! agent while a long load is still running.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::agent::Agent;
use nodemesh_testbed::config;
use nodemesh_testbed::workload_apps::{curl, start_http_echo};
use nodemesh_testbed::Topology;
use serde_json::Value;

/// Small, so that a file of a few hundred Services overflows it.
const SERVICE_CIDR: &str = "10.96.0.0/24";
/// Loads, and the rejections they end in, are waited for this long at most.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);

/// One node: the victim tenant `victim` calling Service `web` (an HTTP echo) in namespace
/// `shop`, both enrolled; the agent runs with a /24 service range.
struct Lab {
    topo: Topology,
    config_dir: PathBuf,
    agent: Agent,
}

impl Lab {
    fn new() -> Result<Lab> {
        let mut topo = Topology::new()?;
        topo.add_node("node-a")?;
        for pod in ["victim", "web"] {
            topo.add_pod("node-a", pod)?;
        }
        start_http_echo(&mut topo, "web", 8080, "web")?;
        let config_dir = topo.work_dir().join("config");
        config::write(
            &config_dir,
            "mesh.yaml",
            &[
                config::namespace("shop", true),
                config::workload(topo.pod("victim"), "shop", &[("app", "victim")]),
                config::workload(topo.pod("web"), "shop", &[("app", "web")]),
                config::service("web", "shop", &[("app", "web")], 80, 8080, None),
            ],
        )?;
        let agent = Agent::start_with(
            &mut topo,
            "node-a",
            &config_dir,
            &nodemesh_testbed::nodemesh_bin(),
            &["--service-cidr", SERVICE_CIDR],
        )?;
        let lab = Lab {
            topo,
            config_dir,
            agent,
        };
        wait_for("the victim to reach web", || {
            curl(
                &lab.topo,
                "victim",
                "http://web.shop/",
                &["--max-time", "5"],
            )
            .is_ok_and(|(status, _)| status == 200)
        });
        Ok(lab)
    }

    fn status(&self) -> Value {
        self.agent
            .status_json()
            .unwrap_or_else(|e| panic!("the admin socket must keep answering: {e:#}"))
    }

    /// The agent's resident memory (kB) and open descriptors.
    fn usage(&self) -> Usage {
        let pid = self.status()["pid"].as_u64().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        Usage { rss_kb, fds }
    }

    /// Waits until memory and descriptors are back near `before`: a few MB of RSS for the
    /// allocator's caches and the connections in flight, a few descriptors for the latter.
    fn assert_usage_returns(&self, before: &Usage) -> Usage {
        let mut now = self.usage();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(now.rss_kb <= before.rss_kb + 16 * 1024 && now.fds <= before.fds + 8) {
            assert!(
                Instant::now() < deadline,
                "agent usage did not return: before {before:?}, now {now:?}"
            );
            sleep(Duration::from_millis(500));
            now = self.usage();
        }
        now
    }

    /// Puts `file` in the config directory in one step (written outside it, then moved in),
    /// so that it is the only change the agent sees.
    fn place(&self, file: &str, text: &str) {
        let outside = self.topo.work_dir().join(file);
        std::fs::write(&outside, text).unwrap();
        std::fs::rename(&outside, self.config_dir.join(file)).unwrap();
    }

    /// Places `file`, then polls `nodemesh status` until the load it causes is rejected;
    /// returns that error.
    fn rejected(&self, file: &str, text: &str) -> String {
        let generation = self.status()["config"]["generation"].clone();
        self.place(file, text);
        let deadline = Instant::now() + LOAD_DEADLINE;
        loop {
            let status = self.status();
            let config = &status["config"];
            if let Some(error) = config["last_error"].as_str() {
                if error.contains(file) {
                    assert_eq!(config["generation"], generation, "the old config serves");
                    return error.to_owned();
                }
            }
            assert!(Instant::now() < deadline, "{file} was not rejected");
            sleep(Duration::from_millis(20));
        }
    }

    /// Removes `file` and waits for the directory without it to load cleanly.
    fn remove(&self, file: &str) {
        let generation = self.status()["config"]["generation"].as_u64().unwrap();
        config::remove(&self.config_dir, file).unwrap();
        wait_for("the config without the bad file", || {
            let status = self.status();
            status["config"]["generation"].as_u64() > Some(generation)
                && status["config"]["last_error"].is_null()
        });
    }
}

#[derive(Debug)]
struct Usage {
    rss_kb: u64,
    fds: usize,
}

/// The victim tenant: a fresh connection to `web` every 50 ms, each answer's status logged.
struct VictimTraffic {
    pid: u32,
    log: String,
}

impl VictimTraffic {
    fn start(lab: &mut Lab) -> Result<VictimTraffic> {
        let log = "victim-traffic".to_owned();
        let script = "while :; do \
                      curl -s -o /dev/null --max-time 5 -w '%{http_code}\\n' http://web.shop/; \
                      sleep 0.05; done";
        let netns = lab.topo.pod("victim").netns.clone();
        let pid = lab.topo.spawn_in(&netns, &["sh", "-c", script], &log)?;
        Ok(VictimTraffic { pid, log })
    }

    /// Stops the traffic; fails unless every request got a 200 (and there were some).
    fn stop(self, lab: &mut Lab) -> Result<usize> {
        lab.topo.stop_process(self.pid)?;
        let log = lab.topo.read_log(&self.log);
        // The last line may have been cut short by the stop.
        let lines: Vec<_> = log.lines().collect();
        let complete = &lines[..lines.len().saturating_sub(1)];
        let failed: Vec<_> = complete.iter().filter(|l| **l != "200").collect();
        if complete.len() < 10 || !failed.is_empty() {
            bail!(
                "the victim saw {} failure(s) in {} requests: {failed:?}",
                failed.len(),
                complete.len()
            );
        }
        Ok(complete.len())
    }
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + LOAD_DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

/// `count` Services in namespace `shop` without a clusterIP.
fn services(count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: shop}}\n\
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
    let mut lab = Lab::new().unwrap();
    let before = lab.usage();
    let victim = VictimTraffic::start(&mut lab).unwrap();

    // 100 000 levels of nesting in 200 KB.
    let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let error = lab.rejected("deep.yaml", &deep);
    assert!(
        error.contains("deep.yaml: document nested deeper than the limit of 64 levels"),
        "{error}"
    );
    lab.remove("deep.yaml");

    // 20 000 Services without clusterIP, and web, for the 254 addresses of a /24.
    let error = lab.rejected("services.yaml", &services(20_000));
    assert!(
        error.contains("services.yaml: Service shop/svc-")
            && error.contains(&format!(
                "no free cluster IP left in service CIDR {SERVICE_CIDR} (254 addresses) for \
             19747 Service(s) without clusterIP: shop/svc-"
            )),
        "{error}"
    );
    lab.remove("services.yaml");

    // A valid but large file: the admin socket answers while it loads.
    let generation = lab.status()["config"]["generation"].as_u64().unwrap();
    lab.place("tenants.yaml", &namespaces(150_000));
    let mut answered_while_loading = false;
    wait_for("the large config", || {
        let status = lab.status();
        answered_while_loading |= status["config"]["loading"] == true;
        status["config"]["generation"].as_u64() > Some(generation)
    });
    assert!(
        answered_while_loading,
        "no status answer while the load ran"
    );
    assert_eq!(lab.status()["config"]["namespaces"], 150_001);
    lab.remove("tenants.yaml");

    let requests = victim
        .stop(&mut lab)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.agent.log()));
    eprintln!("the victim made {requests} requests without error");
    // The previous config still serves, and the agent gave back what the loads took.
    let (status, _) = curl(
        &lab.topo,
        "victim",
        "http://web.shop/",
        &["--max-time", "5"],
    )
    .unwrap();
    assert_eq!(status, 200);
    let after = lab.assert_usage_returns(&before);
    eprintln!("agent usage before {before:?}, after {after:?}");
}

#[test]
fn sigterm_stops_the_agent_while_a_long_load_runs() {
    let mut lab = Lab::new().unwrap();
    // The only change, so the load it starts is the one SIGTERM lands in.
    assert_eq!(lab.status()["config"]["loading"], false);
    lab.place("tenants.yaml", &namespaces(300_000));
    wait_for("the load to start", || {
        lab.status()["config"]["loading"] == true
    });
    lab.agent.stop();
    let exit = lab.agent.last_exit().context("no exit status").unwrap();
    assert!(
        exit.success(),
        "SIGTERM did not stop the agent cleanly: {exit}"
    );
    let log = lab.agent.log();
    assert!(
        !log.contains("loaded config generation 2"),
        "the agent waited for the load to finish:\n{log}"
    );
    assert!(
        log.contains("stopped; eBPF programs stay attached"),
        "{log}"
    );
    config::remove(&lab.config_dir, "tenants.yaml").unwrap();
}
