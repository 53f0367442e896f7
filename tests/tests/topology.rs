//! Self-test of the test bed: two nodes with two pods each, cross-node and
//! same-node HTTP, and a clean teardown, also after a panic and after a
//! signal killed the test process (with an agent running).

use nodemesh_testbed::topology::pid_alive;
use nodemesh_testbed::workload_apps::{curl, curl_raw, python3, start_http_echo, start_tcp_echo};
use nodemesh_testbed::{config, netns_with_prefix, Agent, Topology};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn two_nodes_route_between_pods_and_clean_up() {
    let prefix;
    let work_dir: PathBuf;
    let etc_dir: PathBuf;
    {
        let mut topo = Topology::new().expect("topology");
        prefix = topo.prefix().to_string();
        work_dir = topo.work_dir().to_path_buf();

        let a = topo.add_node("node-a").unwrap();
        let b = topo.add_node("node-b").unwrap();
        assert_eq!((a.index, b.index), (1, 2));
        assert_eq!(a.address.to_string(), "10.0.0.1");
        assert_eq!(b.node_name, format!("{prefix}-node-b"));

        let client = topo.add_pod("node-a", "client").unwrap();
        let other = topo.add_pod("node-a", "other").unwrap();
        let server = topo.add_pod("node-b", "server").unwrap();
        let server2 = topo.add_pod("node-b", "server2").unwrap();
        assert_eq!(client.address.to_string(), "10.1.1.11");
        assert_eq!(other.address.to_string(), "10.1.1.12");
        assert_eq!(server.address.to_string(), "10.1.2.11");
        assert_eq!(server2.address.to_string(), "10.1.2.12");
        assert_eq!(server.node_name, b.node_name);
        etc_dir = PathBuf::from("/etc/netns").join(&client.netns);
        let resolv = std::fs::read_to_string(etc_dir.join("resolv.conf")).unwrap();
        assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");

        // Pods see the resolv.conf, nodes keep the machine's /sys.
        let seen = topo
            .run_in_ok(&client.netns, &["cat", "/etc/resolv.conf"])
            .unwrap();
        assert_eq!(seen, resolv);
        let addrs = topo
            .run_in_ok(&a.netns, &["ip", "-4", "-o", "addr", "show"])
            .unwrap();
        assert!(
            addrs.contains("10.0.0.1/24") && addrs.contains("10.1.1.1/24"),
            "{addrs}"
        );

        // Cross-node HTTP: client (node-a) -> server (node-b).
        start_http_echo(&mut topo, "server", 8080, "server").unwrap();
        let (status, body) = curl(
            &topo,
            &client,
            &format!("http://{}:8080/hello", server.address),
            &[],
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["server"], "server");
        let peer = json["client"].as_str().unwrap();
        assert!(
            peer.starts_with(&format!("{}:", client.address)),
            "echo saw client {peer}, expected {}",
            client.address
        );

        // Status passthrough and keep-alive (two requests, one connection).
        let url = format!("http://{}:8080/status/503", server.address);
        let (status, _) = curl(&topo, "client", &url, &[]).unwrap();
        assert_eq!(status, 503);
        let url = format!("http://{}:8080/", server.address);
        let out = curl_raw(&topo, "other", &url, &["-v", &url]).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(
            stdout.matches("\"server\": \"server\"").count(),
            2,
            "{stdout}"
        );
        assert!(
            stderr.to_lowercase().contains("existing connection"),
            "second request did not reuse the connection:\n{stderr}"
        );

        // Same-node traffic and the TCP echo.
        start_tcp_echo(&mut topo, &server2, 9000).unwrap();
        let out = topo
            .run_in_ok(
                &server.netns,
                &[
                    python3(),
                    "-c",
                    "import socket,sys; s=socket.create_connection((sys.argv[1],9000),5); \
                     s.sendall(b'ping'); print(s.recv(4).decode())",
                    &server2.address.to_string(),
                ],
            )
            .unwrap();
        assert_eq!(out.trim(), "ping");

        // Fabric, two nodes, four pods.
        assert_eq!(topo.leftovers().len(), 7, "{:?}", topo.leftovers());
    }
    assert!(
        netns_with_prefix(&prefix).is_empty(),
        "leftover namespaces: {:?}",
        netns_with_prefix(&prefix)
    );
    assert!(!work_dir.exists() || std::env::var_os("NODEMESH_KEEP_TEST_DIR").is_some());
    assert!(!etc_dir.exists(), "{} left behind", etc_dir.display());
}

#[test]
fn cleans_up_when_a_test_panics() {
    let mut prefix = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut topo = Topology::new().unwrap();
        prefix = topo.prefix().to_string();
        topo.add_node("n1").unwrap();
        topo.add_pod("n1", "p1").unwrap();
        let ns = topo.pod("p1").netns.clone();
        topo.spawn_in(&ns, &["sleep", "300"], "sleeper").unwrap();
        panic!("deliberate");
    }));
    assert!(result.is_err());
    assert!(!prefix.is_empty());
    assert!(
        netns_with_prefix(&prefix).is_empty(),
        "leftover namespaces: {:?}",
        netns_with_prefix(&prefix)
    );
}

#[test]
fn ip_errors_carry_the_command_and_stderr() {
    let mut topo = Topology::new().unwrap();
    topo.add_node("n1").unwrap();
    let err = topo.add_node("n1").unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    let err = topo.add_pod("nope", "p").unwrap_err().to_string();
    assert!(err.contains("no node nope"), "{err}");
    let err = topo
        .run_in_ok(&topo.node("n1").netns, &["ip", "link", "del", "nosuchdev"])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("ip link del nosuchdev"), "{msg}");
    assert!(msg.to_lowercase().contains("cannot find device"), "{msg}");
}

/// Builds a topology with an agent that enrolls a pod, says so on stdout and
/// waits to be killed. Run in a process of its own by
/// `a_killed_test_process_leaves_nothing_behind`.
#[test]
#[ignore = "run, and killed, by a_killed_test_process_leaves_nothing_behind"]
fn victim_waits_to_be_killed() {
    let mut topo = Topology::new().unwrap();
    topo.add_node("node-a").unwrap();
    let web = topo.add_pod("node-a", "web").unwrap();
    start_http_echo(&mut topo, "web", 8080, "web").unwrap();
    let config_dir = topo.work_dir().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    config::write(
        &config_dir,
        "mesh.yaml",
        &[
            config::namespace("shop", true),
            config::workload(&web, "shop", &[("app", "web")]),
        ],
    )
    .unwrap();
    let agent = Agent::start(&mut topo, "node-a", &config_dir).unwrap();
    println!(
        "victim ready: {} {} {}",
        topo.prefix(),
        agent.pid().unwrap(),
        topo.work_dir().display()
    );
    std::thread::sleep(Duration::from_secs(600));
    panic!("the victim was not killed");
}

/// A test process killed by a signal runs no `Drop`: its exit-cleanup
/// watchdog removes the topology instead (processes, the agent's pinned eBPF
/// links and so its programs, namespaces, directories), and touches nothing
/// of another topology.
#[test]
fn a_killed_test_process_leaves_nothing_behind() {
    let mut bystander = Topology::new().unwrap();
    bystander.add_node("n1").unwrap();
    let pod = bystander.add_pod("n1", "p1").unwrap();
    let sleeper = bystander
        .spawn_in(&pod.netns, &["sleep", "600"], "sleeper")
        .unwrap();

    let stderr_path = bystander.work_dir().join("victim.stderr");
    let mut victim = Victim(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "victim_waits_to_be_killed",
                "--ignored",
                "--nocapture",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let ready = BufReader::new(victim.0.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("victim ready: ").map(str::to_owned));
    let Some(ready) = ready else {
        drop(victim);
        panic!(
            "the victim did not get ready:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
    };
    let mut fields = ready.split(' ');
    let (prefix, agent_pid, work_dir) = match (fields.next(), fields.next(), fields.next()) {
        (Some(p), Some(pid), Some(dir)) => (
            p.to_owned(),
            pid.parse::<u32>().unwrap(),
            PathBuf::from(dir),
        ),
        _ => panic!("unexpected ready line {ready:?}"),
    };
    let pins = PathBuf::from("/sys/fs/bpf/nodemesh").join(format!("{prefix}-node-a"));
    let link_ids = pinned_link_ids(&pins.join("links"));
    assert!(
        !link_ids.is_empty(),
        "no links pinned under {}",
        pins.display()
    );
    let namespaces = netns_with_prefix(&prefix);
    assert!(
        namespaces.contains(&format!("{prefix}-web")),
        "{namespaces:?}"
    );
    assert!(pid_alive(agent_pid) && work_dir.is_dir());

    drop(victim);

    let deadline = Instant::now() + Duration::from_secs(30);
    let left = || {
        let mut left: Vec<String> = netns_with_prefix(&prefix);
        left.extend(pid_alive(agent_pid).then(|| format!("agent {agent_pid}")));
        left.extend(
            [&pins, &work_dir]
                .into_iter()
                .filter(|p| p.exists())
                .map(|p| p.display().to_string()),
        );
        left
    };
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(
        left(),
        Vec::<String>::new(),
        "left behind; victim's stderr:\n{stderr}"
    );
    for id in link_ids {
        let out = Command::new("bpftool")
            .args(["link", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "link {id} is still attached: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        stderr.contains(&format!(
            "topology {prefix} outlived the process that built it"
        )),
        "{stderr}"
    );

    // The other topology of this process is untouched.
    assert_eq!(
        bystander.leftovers().len(),
        3,
        "{:?}",
        bystander.leftovers()
    );
    assert!(bystander.is_running(sleeper));
}

/// The victim's test process, killed (SIGKILL) and reaped when dropped.
struct Victim(Child);

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ids of the eBPF links pinned in `dir`.
fn pinned_link_ids(dir: &Path) -> Vec<u64> {
    let entries = std::fs::read_dir(dir).map(|d| d.flatten().collect::<Vec<_>>());
    entries
        .unwrap_or_default()
        .iter()
        .map(|entry| {
            let out = Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(entry.path())
                .output()
                .unwrap();
            let link: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("bpftool on {}: {e}", entry.path().display()));
            link["id"].as_u64().expect("a link id")
        })
        .collect()
}
