//! The node data path on real namespaces: eBPF redirection of enrolled
//! workloads into the agent, service load balancing, DNS, enrollment at
//! runtime, several nodes, bad config, and the agent being down.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::Result;
use nodemesh_testbed::agent::{proc_status_kb, Agent};
use nodemesh_testbed::config;
use nodemesh_testbed::workload_apps::{curl, curl_raw, start_http_echo};
use nodemesh_testbed::{netns_with_prefix, Topology};
use serde_json::Value;

const WEB_IP: &str = "10.96.0.20";

/// A node with an enrolled namespace `shop` (client, web) and a plain
/// namespace `plain` (outsider, plainweb), each server an HTTP echo on 8080.
struct Shop {
    topo: Topology,
    config_dir: PathBuf,
}

impl Shop {
    fn new() -> Result<Shop> {
        let mut topo = Topology::new()?;
        topo.add_node("node-a")?;
        for pod in ["client", "web", "outsider", "plainweb"] {
            topo.add_pod("node-a", pod)?;
        }
        start_http_echo(&mut topo, "web", 8080, "web")?;
        start_http_echo(&mut topo, "plainweb", 8080, "plainweb")?;
        let config_dir = topo.work_dir().join("config");
        std::fs::create_dir_all(&config_dir)?;
        let shop = Shop { topo, config_dir };
        shop.write_config(true)?;
        Ok(shop)
    }

    fn write_config(&self, shop_in_mesh: bool) -> Result<()> {
        let t = &self.topo;
        config::write(
            &self.config_dir,
            "mesh.yaml",
            &[
                config::namespace("shop", shop_in_mesh),
                config::namespace("plain", false),
                config::workload(t.pod("client"), "shop", &[("app", "client")]),
                config::workload(t.pod("web"), "shop", &[("app", "web")]),
                config::workload(t.pod("outsider"), "plain", &[("app", "outsider")]),
                config::workload(t.pod("plainweb"), "plain", &[("app", "plainweb")]),
                l4_service("web", "shop", &[("app", "web")], Some(WEB_IP)),
                config::service("plainweb", "plain", &[("app", "plainweb")], 80, 8080, None),
            ],
        )
    }

    fn agent(&mut self) -> Result<Agent> {
        self.agent_with(&[])
    }

    /// The node's agent, started with extra `nodemesh agent` flags.
    fn agent_with(&mut self, flags: &[&str]) -> Result<Agent> {
        let dir = self.config_dir.clone();
        Agent::start_with(
            &mut self.topo,
            "node-a",
            &dir,
            &nodemesh_testbed::nodemesh_bin(),
            flags,
        )
    }

    /// GET `url` from `pod`; returns the echo's JSON (server name, client).
    fn get(&self, pod: &str, url: &str) -> Result<Value> {
        let (status, body) = curl(&self.topo, pod, url, &[])?;
        anyhow::ensure!(status == 200, "GET {url} from {pod}: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }
}

fn client_ip(echo: &Value) -> String {
    let client = echo["client"].as_str().unwrap_or_default();
    client
        .rsplit_once(':')
        .map_or(client, |(ip, _)| ip)
        .to_owned()
}

fn connections(agent: &Agent) -> Vec<Value> {
    agent.connections().expect("nodemesh connections")
}

/// A Service on 80 → 8080 whose port is declared opaque TCP (`tcp-web`), so
/// that connections are relayed and recorded one for one; the L7 path (and
/// its pooled connections) is covered by `l7.rs`.
fn l4_service(name: &str, namespace: &str, selector: &[(&str, &str)], ip: Option<&str>) -> String {
    let port = config::ServicePort {
        name: "tcp-web",
        port: 80,
        target_port: 8080,
    };
    config::service_with_ports(name, namespace, selector, &[port], ip)
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

/// Inbound connections the agent has handled so far: how a test knows a
/// connection went through the agent, now that the application sees the
/// caller's own address either way.
fn inbound_total(agent: &Agent) -> u64 {
    agent.status_json().unwrap()["connections"]["inbound"]["total"]
        .as_u64()
        .unwrap()
}

fn enrolled(agent: &Agent) -> u64 {
    agent
        .status_json()
        .map_or(0, |s| s["workloads"]["enrolled"].as_u64().unwrap_or(0))
}

fn assert_node_gone(node_name: &str) {
    let pins = Path::new("/sys/fs/bpf/nodemesh").join(node_name);
    assert!(!pins.exists(), "{} left behind", pins.display());
}

#[test]
fn enrolled_client_reaches_pod_ip_cluster_ip_and_service_names_through_the_agent() {
    let mut shop = Shop::new().unwrap();
    let agent = shop.agent().unwrap();
    let web = shop.topo.pod("web").address.to_string();
    let client = shop.topo.pod("client").address.to_string();

    let urls = [
        format!("http://{web}:8080/"),
        format!("http://{WEB_IP}/"),
        "http://web/".to_owned(),
        "http://web.shop/".to_owned(),
        "http://web.shop.svc.cluster.local/".to_owned(),
    ];
    for url in &urls {
        let echo = shop
            .get("client", url)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
        assert_eq!(echo["server"], "web", "{url}");
        assert_eq!(client_ip(&echo), client, "{url}: not the caller's address");
    }

    // Every request was seen once on the way out and once on the way in: the
    // agent never loops on its own connections.
    // A connection is recorded when both sides have closed, which may be just
    // after curl has exited.
    wait_for("every connection to be recorded", || {
        connections(&agent).len() == 2 * urls.len()
    });
    let records = connections(&agent);
    let outbound: Vec<&Value> = records
        .iter()
        .filter(|c| c["direction"] == "outbound")
        .collect();
    let inbound: Vec<&Value> = records
        .iter()
        .filter(|c| c["direction"] == "inbound")
        .collect();
    assert_eq!(outbound.len(), urls.len(), "{records:#?}");
    assert_eq!(inbound.len(), urls.len(), "{records:#?}");
    for c in &outbound {
        assert_eq!(c["source_workload"], "shop/client");
        assert_eq!(c["destination_workload"], "shop/web");
        assert_eq!(c["outcome"], "ok");
    }
    assert_eq!(outbound[0]["original_destination"], format!("{web}:8080"));
    for c in &outbound[1..] {
        assert_eq!(c["original_destination"], format!("{WEB_IP}:80"));
        assert_eq!(c["service"], "shop/web");
        assert_eq!(c["upstream"], format!("{web}:8080"));
    }
    for c in &inbound {
        assert_eq!(c["source_workload"], "shop/client");
        assert!(c["source"].as_str().unwrap().starts_with(&client), "{c}");
    }

    let status = agent.status_json().unwrap();
    assert_eq!(status["workloads"]["enrolled"], 2, "{status:#}");
    assert_eq!(
        status["connections"]["outbound"]["total"],
        urls.len() as u64
    );
    assert_eq!(status["connections"]["inbound"]["total"], urls.len() as u64);
    assert_eq!(status["ebpf"]["programs"].as_array().unwrap().len(), 8);
    let node_name = agent.node_name().to_owned();
    let prefix = shop.topo.prefix().to_owned();
    drop(agent);
    drop(shop);
    assert_node_gone(&node_name);
    assert!(netns_with_prefix(&prefix).is_empty());
}

#[test]
fn unlabelled_namespaces_are_untouched_and_labels_apply_at_runtime() {
    let mut shop = Shop::new().unwrap();
    let agent = shop.agent().unwrap();
    let outsider = shop.topo.pod("outsider").address.to_string();
    let plainweb = shop.topo.pod("plainweb").address.to_string();

    // Outside the mesh on both ends: direct, the agent sees nothing.
    let echo = shop
        .get("outsider", &format!("http://{plainweb}:8080/"))
        .unwrap();
    assert_eq!(client_ip(&echo), outsider);
    assert!(connections(&agent).is_empty());

    // Un-labelling `shop` releases its workloads for new connections.
    shop.write_config(false).unwrap();
    wait_for("shop to leave the mesh", || enrolled(&agent) == 0);
    let web = shop.topo.pod("web").address.to_string();
    let client = shop.topo.pod("client").address.to_string();
    let echo = shop.get("client", &format!("http://{web}:8080/")).unwrap();
    assert_eq!(
        client_ip(&echo),
        client,
        "traffic still captured after un-labelling"
    );

    // Labelling it again captures new connections, without a restart.
    shop.write_config(true).unwrap();
    wait_for("shop to join the mesh", || enrolled(&agent) == 2);
    let before = inbound_total(&agent);
    let echo = shop.get("client", &format!("http://{web}:8080/")).unwrap();
    assert_eq!(client_ip(&echo), client);
    assert_eq!(inbound_total(&agent), before + 1, "not through the agent");
    let pid = agent.pid();
    assert_eq!(agent.status_json().unwrap()["pid"], pid.unwrap());
}

#[test]
fn invalid_config_is_rejected_precisely_and_the_last_good_one_keeps_serving() {
    let mut shop = Shop::new().unwrap();
    let agent = shop.agent().unwrap();
    let generation = agent.status_json().unwrap()["config"]["generation"]
        .as_u64()
        .unwrap();

    config::write_raw(
        &shop.config_dir,
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: shop}\nspec:\n  ports:\n    - port: 0\n",
    )
    .unwrap();
    wait_for("the rejection", || {
        agent
            .status_json()
            .is_ok_and(|s| s["config"]["last_error"].is_string())
    });
    let status = agent.status_json().unwrap();
    let error = status["config"]["last_error"].as_str().unwrap();
    assert!(error.contains("broken.yaml"), "{error}");
    assert!(error.contains("Service shop/broken"), "{error}");
    assert!(error.contains("spec.ports[0].port"), "{error}");
    assert_eq!(status["config"]["generation"].as_u64().unwrap(), generation);
    let text = String::from_utf8(agent.cli(&["status"]).unwrap().stdout).unwrap();
    assert!(text.contains("spec.ports[0].port"), "{text}");

    // Traffic keeps flowing on the last good config.
    let echo = shop.get("client", &format!("http://{WEB_IP}/")).unwrap();
    assert_eq!(echo["server"], "web");

    // Fixing the file applies it and clears the error.
    config::remove(&shop.config_dir, "broken.yaml").unwrap();
    wait_for("the fix", || {
        agent
            .status_json()
            .is_ok_and(|s| s["config"]["last_error"].is_null())
    });
}

#[test]
fn an_agent_that_is_down_fails_closed_and_a_restart_recovers() {
    let mut shop = Shop::new().unwrap();
    let mut agent = shop.agent().unwrap();
    let web = shop.topo.pod("web").address.to_string();
    shop.get("client", &format!("http://{web}:8080/")).unwrap();

    agent.kill();
    // Outbound from an enrolled workload: refused at once, never sent direct.
    let out = curl_raw(&shop.topo, "client", &format!("http://{web}:8080/"), &[]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("onnect"),
        "{out:?}"
    );
    // Inbound to an enrolled workload: refused, never delivered unmeshed.
    let out = curl_raw(
        &shop.topo,
        "outsider",
        &format!("http://{web}:8080/"),
        &["--max-time", "2"],
    )
    .unwrap();
    assert!(
        !out.status.success(),
        "reached {web} while the agent was down: {out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Failed to connect"),
        "not refused at once: {err}"
    );
    // Workloads outside the mesh are unaffected.
    let plainweb = shop.topo.pod("plainweb").address.to_string();
    shop.get("outsider", &format!("http://{plainweb}:8080/"))
        .unwrap();

    agent.restart(&mut shop.topo).unwrap();
    wait_for("re-enrollment", || enrolled(&agent) == 2);
    let client = shop.topo.pod("client").address.to_string();
    let outsider = shop.topo.pod("outsider").address.to_string();
    let echo = shop.get("client", &format!("http://{web}:8080/")).unwrap();
    assert_eq!(client_ip(&echo), client);
    let echo = shop
        .get("outsider", &format!("http://{web}:8080/"))
        .unwrap();
    assert_eq!(client_ip(&echo), outsider);
    assert_eq!(inbound_total(&agent), 2, "not through the agent");

    // A stopped agent (SIGTERM) fails closed just the same.
    agent.stop();
    let out = curl_raw(&shop.topo, "client", &format!("http://{web}:8080/"), &[]).unwrap();
    assert!(!out.status.success(), "{out:?}");
    agent.restart(&mut shop.topo).unwrap();
    wait_for("re-enrollment", || enrolled(&agent) == 2);
    shop.get("client", &format!("http://{web}:8080/")).unwrap();

    // Leaving the mesh while no agent runs: the next agent releases what the
    // previous one pinned, and traffic flows directly again.
    agent.kill();
    shop.write_config(false).unwrap();
    agent.restart(&mut shop.topo).unwrap();
    let echo = shop.get("client", &format!("http://{web}:8080/")).unwrap();
    assert_eq!(client_ip(&echo), client);
    let echo = shop
        .get("outsider", &format!("http://{web}:8080/"))
        .unwrap();
    assert_eq!(client_ip(&echo), outsider);
    assert_eq!(inbound_total(&agent), 0, "still through the agent");
    let status = agent.status_json().unwrap();
    for map in status["ebpf"]["maps"].as_array().unwrap() {
        if map["name"] != "COOKIE_ORIG" {
            assert_eq!(
                map["entries"], 0,
                "{map} still holds the previous run's entries"
            );
        }
    }
}

#[test]
fn cross_node_traffic_goes_through_both_agents() {
    let mut topo = Topology::new().unwrap();
    topo.add_node("node-a").unwrap();
    topo.add_node("node-b").unwrap();
    topo.add_pod("node-a", "client").unwrap();
    topo.add_pod("node-b", "server").unwrap();
    start_http_echo(&mut topo, "server", 8080, "server").unwrap();
    let dir = topo.work_dir().join("config");
    std::fs::create_dir_all(&dir).unwrap();
    config::write(
        &dir,
        "mesh.yaml",
        &[
            config::namespace("shop", true),
            config::workload(topo.pod("client"), "shop", &[("app", "client")]),
            config::workload(topo.pod("server"), "shop", &[("app", "server")]),
            l4_service("server", "shop", &[("app", "server")], None),
        ],
    )
    .unwrap();
    let a = Agent::start(&mut topo, "node-a", &dir).unwrap();
    let b = Agent::start(&mut topo, "node-b", &dir).unwrap();

    let (status, body) = curl(&topo, "client", "http://server.shop/", &[]).unwrap();
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["server"], "server");
    let client = topo.pod("client").address.to_string();
    assert_eq!(client_ip(&echo), client);

    wait_for("both agents to record the connection", || {
        connections(&a).len() == 1 && connections(&b).len() == 1
    });
    let out = connections(&a);
    assert_eq!(out.len(), 1, "{out:#?}");
    assert_eq!(out[0]["direction"], "outbound");
    assert_eq!(out[0]["source_workload"], "shop/client");
    assert_eq!(out[0]["service"], "shop/server");
    let inb = connections(&b);
    assert_eq!(inb.len(), 1, "{inb:#?}");
    assert_eq!(inb[0]["direction"], "inbound");
    assert_eq!(inb[0]["source_workload"], "shop/client");
    assert_eq!(inb[0]["destination_workload"], "shop/server");
}

/// `ip rule` lines of `netns` that send TCP to the agent's reply table.
fn reply_rules(topo: &Topology, netns: &str, family: &str) -> usize {
    let out = topo.run_in_ok(netns, &["ip", family, "rule"]).unwrap();
    out.lines().filter(|l| l.contains("lookup 15006")).count()
}

/// GET http://SERVER:8080/ from `netns` (a pod or a node): the address the
/// echo saw the call come from.
fn seen_from(topo: &Topology, netns: &str, server: &str) -> String {
    let url = format!("http://{server}:8080/");
    let out = topo
        .run_in_ok(netns, &["curl", "--max-time", "5", "-sS", &url])
        .unwrap();
    client_ip(&serde_json::from_str(&out).unwrap())
}

#[test]
fn the_application_sees_each_callers_own_address() {
    let mut topo = Topology::new().unwrap();
    topo.add_node("node-a").unwrap();
    topo.add_node("node-b").unwrap();
    topo.add_pod("node-a", "remote").unwrap();
    topo.add_pod("node-b", "server").unwrap();
    topo.add_pod("node-b", "neighbour").unwrap();
    topo.add_pod("node-b", "outsider").unwrap();
    start_http_echo(&mut topo, "server", 8080, "server").unwrap();
    let dir = topo.work_dir().join("config");
    std::fs::create_dir_all(&dir).unwrap();
    let write_config = |topo: &Topology, in_mesh: bool| {
        config::write(
            &dir,
            "mesh.yaml",
            &[
                config::namespace("shop", in_mesh),
                config::namespace("plain", false),
                config::workload(topo.pod("remote"), "shop", &[("app", "remote")]),
                config::workload(topo.pod("server"), "shop", &[("app", "server")]),
                config::workload(topo.pod("neighbour"), "shop", &[("app", "neighbour")]),
                config::workload(topo.pod("outsider"), "plain", &[("app", "outsider")]),
            ],
        )
        .unwrap()
    };
    write_config(&topo, true);
    let _a = Agent::start(&mut topo, "node-a", &dir).unwrap();
    let mut b = Agent::start(&mut topo, "node-b", &dir).unwrap();
    let server = topo.pod("server").address.to_string();
    let server_ns = topo.pod("server").netns.clone();

    // A mesh pod on the other node, one on the same node, a pod outside the
    // mesh and the node itself: each is seen as itself, through the agent.
    let callers = [
        (
            topo.pod("remote").netns.clone(),
            topo.pod("remote").address,
            Some("shop/remote"),
        ),
        (
            topo.pod("neighbour").netns.clone(),
            topo.pod("neighbour").address,
            Some("shop/neighbour"),
        ),
        (
            topo.pod("outsider").netns.clone(),
            topo.pod("outsider").address,
            // Outside the mesh: seen by its address, named by nothing
            // forgeable.
            None,
        ),
        (
            topo.node("node-b").netns.clone(),
            topo.node("node-b").gateway,
            None,
        ),
    ];
    for (i, (netns, address, workload)) in callers.iter().enumerate() {
        assert_eq!(
            seen_from(&topo, netns, &server),
            address.to_string(),
            "{netns}"
        );
        let inbound = || -> Vec<Value> {
            let all = connections(&b).into_iter();
            all.filter(|c| c["direction"] == "inbound").collect()
        };
        wait_for("the inbound record", || inbound().len() == i + 1);
        let record = inbound().pop().unwrap();
        assert_eq!(record["direction"], "inbound", "{record}");
        assert_eq!(record["outcome"], "ok", "{record}");
        assert_eq!(record["destination_workload"], "shop/server", "{record}");
        let source = record["source"].as_str().unwrap();
        assert!(source.starts_with(&format!("{address}:")), "{record}");
        match workload {
            Some(w) => assert_eq!(record["source_workload"], *w, "{record}"),
            None => assert!(record["source_workload"].is_null(), "{record}"),
        }
    }
    let log = b.log();
    assert!(!log.contains("refused inbound"), "{log}");

    // The reply routing is in the workload once, also after a restart, and
    // goes when the workload leaves the mesh.
    assert_eq!(reply_rules(&topo, &server_ns, "-4"), 1);
    assert_eq!(reply_rules(&topo, &server_ns, "-6"), 1);
    b.restart(&mut topo).unwrap();
    wait_for("re-enrollment", || enrolled(&b) == 2);
    assert_eq!(reply_rules(&topo, &server_ns, "-4"), 1);
    let outsider = topo.pod("outsider");
    assert_eq!(
        seen_from(&topo, &outsider.netns, &server),
        outsider.address.to_string()
    );
    write_config(&topo, false);
    wait_for("shop to leave the mesh", || enrolled(&b) == 0);
    assert_eq!(reply_rules(&topo, &server_ns, "-4"), 0);
    assert_eq!(reply_rules(&topo, &server_ns, "-6"), 0);
    let before = inbound_total(&b);
    assert_eq!(
        seen_from(&topo, &outsider.netns, &server),
        outsider.address.to_string()
    );
    assert_eq!(inbound_total(&b), before, "still through the agent");
}

/// Sends one SYN to SERVER:PORT from the forged source address FORGED (the
/// handshake cannot complete: the answer goes to whoever owns FORGED).
const FORGED_SYN_PY: &str = r#"
import socket, sys
forged, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
IP_TRANSPARENT = 19
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
s.bind((forged, 0))
s.settimeout(1)
print(s.connect_ex((server, port)))
"#;

#[test]
fn a_remote_host_forging_the_pods_own_address_cannot_reach_the_application() {
    let mut shop = Shop::new().unwrap();
    let mut agent = shop.agent().unwrap();
    let script = shop.topo.work_dir().join("forged_syn.py");
    std::fs::write(&script, FORGED_SYN_PY).unwrap();
    // Sends a SYN to POD:8080 from POD's own address, from outside (the
    // outsider pod), after making POD's kernel accept a packet from its own
    // address on eth0: only sk_lookup stands between it and the
    // application. Returns how many half-open connections POD's kernel
    // reset meanwhile: a SYN that reached a listener made one, answered to
    // POD's own address, so it loops back and the kernel resets it.
    let forge = |topo: &Topology, pod: &str| {
        let target = topo.pod(pod).clone();
        for sysctl in [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
            "net.ipv4.conf.eth0.accept_local=1",
        ] {
            topo.run_in_ok(&target.netns, &["sysctl", "-qw", sysctl])
                .unwrap();
        }
        let attempt_fails = || {
            let snmp = topo
                .run_in_ok(&target.netns, &["cat", "/proc/net/snmp"])
                .unwrap();
            let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
            let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
            let i = names
                .split_whitespace()
                .position(|n| n == "AttemptFails")
                .unwrap();
            values
                .split_whitespace()
                .nth(i)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        let before = attempt_fails();
        let address = target.address.to_string();
        let cmd = [
            "python3",
            script.to_str().unwrap(),
            &address,
            &address,
            "8080",
        ];
        topo.run_in_ok(&topo.pod("outsider").netns, &cmd).unwrap();
        attempt_fails() - before
    };
    // The control: outside the mesh the forged SYN reaches plainweb's
    // listener.
    // (Under load the SYN may be retransmitted and counted twice.)
    assert!(forge(&shop.topo, "plainweb") >= 1, "the control saw no SYN");

    // With the agent down, web's lookup drops the SYN (fail closed) instead
    // of letting it through as one of the agent's deliveries.
    agent.kill();
    assert_eq!(
        forge(&shop.topo, "web"),
        0,
        "the forged SYN reached the application"
    );

    agent.restart(&mut shop.topo).unwrap();
    wait_for("re-enrollment", || enrolled(&agent) == 2);
    let web = shop.topo.pod("web").address.to_string();
    let echo = shop.get("client", &format!("http://{web}:8080/")).unwrap();
    assert_eq!(
        client_ip(&echo),
        shop.topo.pod("client").address.to_string()
    );
}

/// A stand-in for the node's resolver: answers every A query with 192.0.2.7.
const UPSTREAM_DNS_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(512)
    end = 12
    while q[end] != 0:
        end += q[end] + 1
    question = q[12:end + 5]
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 7])
    s.sendto(q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question + answer, peer)
"#;

#[test]
fn mesh_dns_answers_services_and_forwards_other_names_to_the_node_resolver() {
    let mut shop = Shop::new().unwrap();
    let node = shop.topo.node("node-a").clone();
    let script = shop.topo.work_dir().join("upstream_dns.py");
    std::fs::write(&script, UPSTREAM_DNS_PY).unwrap();
    let gateway = node.gateway.to_string();
    shop.topo
        .spawn_in(
            &node.netns,
            &["python3", script.to_str().unwrap(), &gateway],
            "upstream-dns",
        )
        .unwrap();
    wait_for("the upstream resolver", || {
        let out = shop
            .topo
            .run_in(&node.netns, &["ss", "-Hlun", "sport", "53"])
            .unwrap();
        !out.stdout.is_empty()
    });
    let upstream = format!("{gateway}:53");
    let _agent = shop.agent_with(&["--upstream-dns", &upstream]).unwrap();

    let lookup = |pod: &str, name: &str| {
        let netns = shop.topo.pod(pod).netns.clone();
        let out = shop
            .topo
            .run_in(&netns, &["timeout", "3", "getent", "ahostsv4", name])
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(lookup("client", "web"), WEB_IP);
    assert_eq!(lookup("client", "web.shop.svc.cluster.local"), WEB_IP);
    assert_eq!(lookup("client", "example.test"), "192.0.2.7");
    // Names under the cluster domain that do not exist are not forwarded.
    assert_eq!(lookup("client", "nosuch.shop.svc.cluster.local"), "");
    // Outside the mesh nothing is captured: the pod's resolv.conf points at
    // an address nobody serves, so the name does not resolve.
    assert_eq!(lookup("outsider", "web.shop.svc.cluster.local"), "");
}

#[test]
fn the_cli_says_clearly_when_no_agent_is_running() {
    let out = std::process::Command::new(nodemesh_testbed::nodemesh_bin())
        .args(["status", "--socket", "/run/nodemesh-test-nowhere/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no nodemesh agent is running"), "{err}");
    assert!(err.contains("nodemesh agent --config-dir"), "{err}");
}

/// The agent's resident pages of mapped files: its code and read-only data,
/// and the C libraries'.
fn mapped_file_kib(agent: &Agent) -> u64 {
    proc_status_kb(agent.pid().expect("the agent runs"), "RssFile").unwrap()
}

/// What the agent keeps mapped once it stopped changing for 3 s (longer
/// than the agent waits for a burst of control work to settle).
fn settled_mapped_file_kib(agent: &Agent) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut since) = (mapped_file_kib(agent), Instant::now());
    loop {
        sleep(Duration::from_millis(250));
        let now = mapped_file_kib(agent);
        if now.abs_diff(last) > 64 {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(3) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's mapped code never settled"
        );
    }
}

#[test]
fn code_that_the_clis_queries_ran_is_unmapped_once_they_settle() {
    let mut shop = Shop::new().unwrap();
    let agent = shop.agent().unwrap();
    let settled = settled_mapped_file_kib(&agent);

    // Queries run code the data path never does (building and printing
    // the tables they show): the agent maps it for them...
    let web = format!("http://{WEB_IP}/");
    let queries: [&[&str]; 6] = [
        &["workloads"],
        &["services", "-o", "json"],
        &["routes", "-o", "json"],
        &["policies"],
        &["certs"],
        &["explain", "--from", "shop/client", &web],
    ];
    for args in queries {
        let out = agent.cli(args).unwrap();
        assert!(out.status.success(), "nodemesh {args:?}: {out:?}");
    }
    let queried = mapped_file_kib(&agent);
    assert!(
        queried >= settled + 64,
        "the queries mapped no code: {settled} KiB before, {queried} KiB after"
    );

    // ...and lets it go once they stop, as after any burst of control work.
    let deadline = Instant::now() + Duration::from_secs(15);
    let halfway = settled + (queried - settled) / 2;
    loop {
        let now = mapped_file_kib(&agent);
        if now <= halfway {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queries' code stayed mapped: {settled} KiB before them, {queried} KiB \
             after, {now} KiB 15 s later"
        );
        sleep(Duration::from_millis(250));
    }
}

#[test]
fn an_agent_that_cannot_start_says_why() {
    let mut topo = Topology::new().unwrap();
    topo.add_node("node-a").unwrap();
    let dir = topo.work_dir().join("config");
    let err = Agent::start_with(
        &mut topo,
        "node-a",
        &dir,
        &nodemesh_testbed::nodemesh_bin(),
        &["--service-cidr", "10.96.0.0/40"],
    )
    .err()
    .expect("the agent must refuse a bad flag");
    let message = format!("{err:#}");
    assert!(message.contains("--service-cidr"), "{message}");
    assert!(
        message.contains("prefix must be between /8 and /30"),
        "{message}"
    );
}

/// A TCP client for the L4 checks: `send N` sends N bytes, half-closes and
/// reads to the end; `idle S` waits S seconds before reading. It prints the
/// bytes received and how the connection ended: EOF or RESET.
const TCP_CLIENT_PY: &str = r#"
import errno, socket, sys, time
host, port, mode, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
got = 0
try:
    s = socket.create_connection((host, port), timeout=10)
    if mode == "send":
        s.sendall(b"x" * int(arg))
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            # A reset that arrived before the half-close leaves nothing to shut.
            if e.errno != errno.ENOTCONN:
                raise
            raise ConnectionResetError from e
    else:
        time.sleep(arg)
    while True:
        chunk = s.recv(65536)
        if not chunk:
            print(got, "EOF")
            break
        got += len(chunk)
except ConnectionResetError:
    print(got, "RESET")
"#;

#[test]
fn l4_proxy_keeps_half_close_propagates_resets_and_closes_idle_connections() {
    let mut shop = Shop::new().unwrap();
    nodemesh_testbed::workload_apps::start_tcp_echo(&mut shop.topo, "web", 9000).unwrap();
    let agent = shop.agent_with(&["--idle-timeout", "1s"]).unwrap();
    let script = shop.topo.work_dir().join("tcp_client.py");
    std::fs::write(&script, TCP_CLIENT_PY).unwrap();
    let web = shop.topo.pod("web").address.to_string();
    let run = |port: &str, mode: &str, arg: &str| {
        let netns = shop.topo.pod("client").netns.clone();
        let cmd = ["python3", script.to_str().unwrap(), &web, port, mode, arg];
        let out = shop.topo.run_in(&netns, &cmd).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };

    // 1 MB out, half-close, all of it echoed back, then a clean EOF.
    assert_eq!(run("9000", "send", "1000000"), "1000000 EOF");
    // Nothing listens on 9999: the application's refusal reaches the client
    // as a reset, through both halves of the agent.
    assert_eq!(run("9999", "send", "10"), "0 RESET");
    // Silent for longer than --idle-timeout: the agent resets it.
    assert_eq!(run("9000", "idle", "2.5"), "0 RESET");
    // The agent's own ports are not a way to make it loop on itself.
    assert_eq!(run("15006", "send", "10"), "0 RESET");

    // 3 connections recorded out and in; the last one only out (its inbound
    // half is refused before it is tracked). Between two workloads of the
    // node one relay carries both halves, so both see the idle timeout.
    wait_for("the connection records", || connections(&agent).len() == 7);
    let records = connections(&agent);
    let outcomes: Vec<&str> = records
        .iter()
        .map(|c| c["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "ok").count(),
        2,
        "{records:#?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.contains("delivering to") && o.contains("refused")),
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .filter(|o| o.contains("idle timeout"))
            .count()
            == 2,
        "{outcomes:?}"
    );
}

/// Opens `n` connections to host:port and holds them for a while.
const HOLD_CONNECTIONS_PY: &str = r#"
import socket, sys, time
held = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]
print("holding", len(held), flush=True)
time.sleep(30)
"#;

#[test]
fn a_workload_at_its_connection_limit_is_refused_at_once_and_others_are_not() {
    let mut shop = Shop::new().unwrap();
    let agent = shop
        .agent_with(&["--max-connections-per-workload", "2"])
        .unwrap();
    let script = shop.topo.work_dir().join("hold.py");
    std::fs::write(&script, HOLD_CONNECTIONS_PY).unwrap();
    let plainweb = shop.topo.pod("plainweb").address.to_string();
    let client_ns = shop.topo.pod("client").netns.clone();
    shop.topo
        .spawn_in(
            &client_ns,
            &["python3", script.to_str().unwrap(), &plainweb, "8080", "2"],
            "hold",
        )
        .unwrap();
    wait_for("the client to hold two connections", || {
        agent
            .status_json()
            .is_ok_and(|s| s["connections"]["outbound"]["open"] == 2)
    });

    // The noisy client gets nothing more...
    let out = curl_raw(
        &shop.topo,
        "client",
        &format!("http://{plainweb}:8080/"),
        &[],
    )
    .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let status = agent.status_json().unwrap();
    assert_eq!(
        status["connections"]["outbound"]["rejected"], 1,
        "{status:#}"
    );
    // ...while another workload is served as usual.
    let web = shop.topo.pod("web").address.to_string();
    let echo = shop
        .get("outsider", &format!("http://{web}:8080/"))
        .unwrap();
    let outsider = shop.topo.pod("outsider").address.to_string();
    assert_eq!(client_ip(&echo), outsider);
    assert_eq!(inbound_total(&agent), 1, "not through the agent");
}
