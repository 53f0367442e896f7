//! The agent's life on a node: a second agent for the same node stands by
//! and never touches the owner's data path; a new agent takes the node over
//! (`--take-over`, or SIGTERM to the owner while it stands by) under load
//! without failing a request; hand-overs leave nothing behind.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nodemesh_testbed::agent::Agent;
use nodemesh_testbed::config;
use nodemesh_testbed::workload_apps::{curl, start_http_echo, start_tcp_echo, wait_listening};
use nodemesh_testbed::Topology;

const ECHO_IP: &str = "10.96.0.31";
const REMOTE_IP: &str = "10.96.0.32";
/// Long enough for the load to see two hand-overs, with load before and after.
const LOAD_SECONDS: &str = "24";

/// node-a with an enrolled namespace `shop` (client, web: HTTP echo on 8080
/// and TCP echo on 9000 behind Service `echo`) and a plain namespace
/// (outsider, plainweb); node-b with `remote` (`mesh-app` on 9080 behind
/// Service `remote`, port 80).
struct Shop {
    topo: Topology,
    config_dir: PathBuf,
}

impl Shop {
    fn new() -> Shop {
        let mut topo = Topology::new().unwrap();
        topo.add_node("node-a").unwrap();
        topo.add_node("node-b").unwrap();
        for pod in ["client", "web", "outsider", "plainweb"] {
            topo.add_pod("node-a", pod).unwrap();
        }
        let remote = topo.add_pod("node-b", "remote").unwrap();
        let app = env!("CARGO_BIN_EXE_mesh-app");
        let cmd = [app, "--port", "9080", "--name", "remote", "--version", "v1"];
        topo.spawn_in(&remote.netns, &cmd, "app-remote").unwrap();
        wait_listening(&topo, &remote.netns, 9080).unwrap();
        start_http_echo(&mut topo, "web", 8080, "web").unwrap();
        start_tcp_echo(&mut topo, "web", 9000).unwrap();
        start_http_echo(&mut topo, "plainweb", 8080, "plainweb").unwrap();
        let config_dir = topo.work_dir().join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        let t = &topo;
        let echo = config::ServicePort {
            name: "tcp-echo",
            port: 9000,
            target_port: 9000,
        };
        config::write(
            &config_dir,
            "mesh.yaml",
            &[
                config::namespace("shop", true),
                config::namespace("plain", false),
                config::workload(t.pod("client"), "shop", &[("app", "client")]),
                config::workload(t.pod("web"), "shop", &[("app", "web")]),
                config::workload(t.pod("outsider"), "plain", &[("app", "outsider")]),
                config::workload(t.pod("plainweb"), "plain", &[("app", "plainweb")]),
                config::workload(t.pod("remote"), "shop", &[("app", "remote")]),
                config::service(
                    "remote",
                    "shop",
                    &[("app", "remote")],
                    80,
                    9080,
                    Some(REMOTE_IP),
                ),
                config::service_with_ports(
                    "echo",
                    "shop",
                    &[("app", "web")],
                    &[echo],
                    Some(ECHO_IP),
                ),
            ],
        )
        .unwrap();
        Shop { topo, config_dir }
    }

    fn agent(&mut self) -> Agent {
        let dir = self.config_dir.clone();
        Agent::start(&mut self.topo, "node-a", &dir).unwrap()
    }

    fn another(&mut self, label: &str, flags: &[&str]) -> Agent {
        self.another_on("node-a", label, flags)
    }

    fn another_on(&mut self, node: &str, label: &str, flags: &[&str]) -> Agent {
        let dir = self.config_dir.clone();
        Agent::start_another(&mut self.topo, node, &dir, label, flags).unwrap()
    }

    fn get(&self, pod: &str, url: &str) {
        let (status, body) = curl(&self.topo, pod, url, &["--max-time", "5"]).unwrap();
        assert_eq!(status, 200, "GET {url} from {pod}: {body}");
    }

    /// Calls that must each pass through the agent: from an enrolled pod to
    /// an enrolled one and to a plain one (a non-mesh address), and from a
    /// plain pod to an enrolled one. Returns how many outbound and inbound
    /// connections `owner` counted for them.
    fn calls_through(&self, owner: &Agent) -> (u64, u64) {
        let web = format!("http://{}:8080/", self.topo.pod("web").address);
        let plainweb = format!("http://{}:8080/", self.topo.pod("plainweb").address);
        let before = totals(owner);
        for _ in 0..3 {
            self.get("client", &web);
            self.get("outsider", &web);
            self.get("client", &plainweb);
        }
        let after = totals(owner);
        (after.0 - before.0, after.1 - before.1)
    }
}

fn totals(agent: &Agent) -> (u64, u64) {
    let status = agent.status_json().unwrap();
    let total = |direction: &str| {
        status["connections"][direction]["total"]
            .as_u64()
            .unwrap_or_else(|| panic!("no {direction} total in {status}"))
    };
    (total("outbound"), total("inbound"))
}

/// Entries of the data path's maps, from the owner's status.
fn map_entries(agent: &Agent) -> Vec<(String, u64)> {
    let status = agent.status_json().unwrap();
    status["ebpf"]["maps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] != "COOKIE_ORIG")
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["entries"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn pinned_links(node_name: &str) -> Vec<String> {
    let dir = Path::new("/sys/fs/bpf/nodemesh")
        .join(node_name)
        .join("links");
    let mut links: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    links.sort();
    links
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Agent processes (`nodemesh agent … --node-name NODE …`) alive for a node.
fn agent_processes(node_name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.iter().any(|a| *a == b"agent")
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--node-name" && w[1] == node_name.as_bytes())
        })
        .collect()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

fn is_owner_and_ready(agent: &Agent) -> bool {
    agent
        .status_json()
        .is_ok_and(|s| s["role"] == "owner" && s["ready"] == true)
}

/// Makes `next` the node's owner after `old` handed over and exited.
fn handed_over(old: &mut Agent, next: &mut Agent) {
    wait_for("the new agent to own the node", || is_owner_and_ready(next));
    assert!(
        old.wait_exit(Duration::from_secs(20)),
        "the old agent did not exit after the hand-over:\n{}",
        old.log()
    );
    old.set_uninstall_on_drop(false);
    next.set_uninstall_on_drop(true);
}

#[test]
fn a_second_agent_for_the_node_stands_by_and_never_touches_its_data_path() {
    let mut shop = Shop::new();
    let first = shop.agent();
    let maps = map_entries(&first);
    let links = pinned_links(first.node_name());
    let healthy = shop.calls_through(&first);
    assert!(healthy.0 >= 6 && healthy.1 >= 3, "{healthy:?}");

    // Every call still passes through the first agent, and its data path is
    // as it was.
    let untouched = |shop: &Shop, first: &Agent| {
        let calls = shop.calls_through(first);
        assert_eq!(calls, healthy, "calls bypassed the mesh");
        assert_eq!(map_entries(first), maps);
        assert_eq!(pinned_links(first.node_name()), links);
    };
    let mut second = shop.another("second", &[]);
    untouched(&shop, &first);
    let status = second.status_json().unwrap();
    assert_eq!(status["role"], "standby", "{status}");
    assert_eq!(status["owner"]["pid"], first.pid().unwrap(), "{status}");
    let owner = first.status_json().unwrap();
    assert_eq!(owner["role"], "owner");
    assert_eq!(owner["owner"]["pid"], first.pid().unwrap());
    assert!(owner["owner"]["since_unix_ms"].as_u64().unwrap() > 0);
    let shown = String::from_utf8_lossy(&second.cli(&["status"]).unwrap().stdout).into_owned();
    let owner_line = format!("owner:       pid {} ", first.pid().unwrap());
    assert!(
        shown.contains("standby") && shown.contains(&owner_line),
        "{shown}"
    );
    let shown = String::from_utf8_lossy(&first.cli(&["status"]).unwrap().stdout).into_owned();
    assert!(shown.contains(&owner_line), "{shown}");
    let asked = second.cli(&["workloads"]).unwrap();
    assert!(
        String::from_utf8_lossy(&asked.stderr).contains("standby"),
        "{asked:?}"
    );
    // `nodemesh uninstall` refuses a node an agent owns.
    let refused = first.uninstall().unwrap_err().to_string();
    assert!(refused.contains("owns node"), "{refused}");

    second.stop();
    untouched(&shop, &first);
    assert!(is_owner_and_ready(&first));
}

#[test]
fn a_standby_takes_the_node_over_when_its_owner_crashes() {
    let mut shop = Shop::new();
    let mut first = shop.agent();
    let healthy = shop.calls_through(&first);
    let mut second = shop.another("second", &[]);
    first.kill();
    let crashed = Instant::now();
    wait_for("the standby to own the node", || {
        is_owner_and_ready(&second)
    });
    println!(
        "the standby served the node {} ms after its owner crashed",
        crashed.elapsed().as_millis()
    );
    first.set_uninstall_on_drop(false);
    second.set_uninstall_on_drop(true);
    wait_for("re-enrollment", || {
        second
            .status_json()
            .is_ok_and(|s| s["workloads"]["enrolled"] == 2)
    });
    assert_eq!(shop.calls_through(&second), healthy);
}

/// A load from `client` (node-a) on `remote` (node-b) for LOAD_SECONDS.
/// HTTP/1.1 keep-alive with wrk (2 connections, as fast as they go: a
/// connection never idles, so each one the old agent ends, ends after a
/// response with `Connection: close`, and wrk reconnects); h2c with
/// `mesh-load` at 500 requests/s (hyper-util's pooled client: a request a
/// `GOAWAY` left unsent goes on a new connection, as production clients
/// do; oha gives up on it instead, and h2load stops a client whose
/// connection the server closes, so both measure themselves, not the
/// hand-over).
fn start_load(topo: &Topology, h1: bool) -> std::process::Child {
    let netns = topo.pod("client").netns.clone();
    let url = format!("http://{REMOTE_IP}/");
    let duration = format!("{LOAD_SECONDS}s");
    let args: Vec<&str> = if h1 {
        vec!["wrk", "-t", "1", "-c", "2", "-d", &duration, &url]
    } else {
        let load = env!("CARGO_BIN_EXE_mesh-load");
        vec![load, "--rate", "500", "--duration", LOAD_SECONDS, &url]
    };
    let mut cmd = topo.command_in(&netns, &args).unwrap();
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

/// What a load saw: requests answered, requests that failed (errors or
/// non-2xx answers), and the longest request in ms.
#[derive(Debug)]
struct LoadSummary {
    answered: u64,
    failed: u64,
    longest_ms: f64,
}

fn ms(value: &str) -> f64 {
    let number = |suffix: &str| value.strip_suffix(suffix)?.parse::<f64>().ok();
    number("us")
        .map(|us| us / 1000.0)
        .or_else(|| number("ms"))
        .or_else(|| number("s").map(|s| s * 1000.0))
        .unwrap_or_else(|| panic!("not a duration: {value}"))
}

fn wrk_summary(report: &str) -> LoadSummary {
    let after = |label: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(label).map(str::to_owned))
    };
    let answered = report
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's report:\n{report}"));
    let socket_errors: u64 = after("Socket errors:").map_or(0, |errors| {
        errors
            .split(',')
            .filter_map(|e| e.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    });
    let non_2xx: u64 = after("Non-2xx or 3xx responses:").map_or(0, |n| n.trim().parse().unwrap());
    let latency = after("Latency").unwrap_or_else(|| panic!("{report}"));
    LoadSummary {
        answered,
        failed: socket_errors + non_2xx,
        longest_ms: ms(latency.split_whitespace().nth(2).unwrap()),
    }
}

/// `mesh-load`'s report (see `tests/src/bin/mesh-load.rs`).
fn mesh_load_summary(report: &str) -> LoadSummary {
    let doc: serde_json::Value = serde_json::from_str(report)
        .unwrap_or_else(|e| panic!("mesh-load's report is not JSON ({e}):\n{report}"));
    let count = |field: &str| {
        doc[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} in mesh-load's report:\n{report}"))
    };
    LoadSummary {
        answered: count("answered"),
        failed: count("failed"),
        longest_ms: doc["longest_ms"].as_f64().unwrap_or(0.0),
    }
}

#[test]
fn upgrades_under_http1_and_h2c_load_fail_no_request() {
    let mut shop = Shop::new();
    let mut first = shop.agent();
    let dir = shop.config_dir.clone();
    let _node_b = Agent::start(&mut shop.topo, "node-b", &dir).unwrap();
    shop.get("client", &format!("http://{REMOTE_IP}/"));
    let loads = [start_load(&shop.topo, true), start_load(&shop.topo, false)];
    sleep(Duration::from_secs(4));
    // An upgrade in place: the new agent asks for the node at once.
    let began = Instant::now();
    let mut second = shop.another("second", &["--take-over"]);
    handed_over(&mut first, &mut second);
    let take_over = began.elapsed();
    sleep(Duration::from_secs(4));
    // The DaemonSet surge pattern: the new agent stands by, the old one is
    // told to stop.
    let mut third = shop.another("third", &[]);
    let began = Instant::now();
    second.stop();
    wait_for("the standby to own the node", || is_owner_and_ready(&third));
    let surge = began.elapsed();
    second.set_uninstall_on_drop(false);
    third.set_uninstall_on_drop(true);
    println!(
        "hand-over: --take-over {} ms from its start to the new owner serving; \
         SIGTERM to the owner with a standby {} ms",
        take_over.as_millis(),
        surge.as_millis()
    );
    for (load, h1) in loads.into_iter().zip([true, false]) {
        let out = load.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let summary = if h1 {
            wrk_summary(&report)
        } else {
            println!("mesh-load: {report}");
            mesh_load_summary(&report)
        };
        let protocol = if h1 {
            "HTTP/1.1 (wrk)"
        } else {
            "h2c (mesh-load)"
        };
        println!(
            "{protocol}: {} requests answered, {} failed, longest request {:.1} ms",
            summary.answered, summary.failed, summary.longest_ms
        );
        assert!(
            summary.answered >= 5_000,
            "{protocol}: {summary:?}\n{report}"
        );
        assert_eq!(summary.failed, 0, "{protocol}: {report}");
    }
    assert!(is_owner_and_ready(&third));
    let handed = first.log();
    let line = handed
        .lines()
        .find(|l| l.contains("handed the node over in"))
        .unwrap_or_else(|| panic!("no hand-over in the first agent's log:\n{handed}"));
    println!("first agent: {line}");
}

#[test]
fn ten_hand_overs_in_a_row_leave_nothing_behind() {
    let mut shop = Shop::new();
    let mut owner = shop.agent();
    let node_name = owner.node_name().to_owned();
    let links = pinned_links(&node_name);
    let maps = map_entries(&owner);
    let healthy = shop.calls_through(&owner);
    // An opaque session carried through every hand-over.
    let web = shop.topo.pod("web").address.to_string();
    let session = CounterStream::start(&shop, "outsider", &web);
    let mut descriptors = None;
    for generation in 1..=10 {
        let label = format!("gen{generation}");
        let mut next = shop.another(&label, &["--take-over"]);
        handed_over(&mut owner, &mut next);
        let old = std::mem::replace(&mut owner, next);
        drop(old);
        assert_eq!(
            pinned_links(&node_name),
            links,
            "after hand-over {generation}"
        );
        assert_eq!(map_entries(&owner), maps, "after hand-over {generation}");
        assert_eq!(
            agent_processes(&node_name),
            vec![owner.pid().unwrap()],
            "after hand-over {generation}"
        );
        assert_eq!(
            shop.calls_through(&owner),
            healthy,
            "after hand-over {generation}"
        );
        let held = open_descriptors(owner.pid().unwrap());
        let first = *descriptors.get_or_insert(held);
        assert!(
            held <= first + 2,
            "hand-over {generation}: the agent holds {held} descriptors, the first new one {first}"
        );
    }
    assert_whole("a session through ten hand-overs", &session.finish());
}

/// In the client pod: opens a TCP echo session and an HTTP/1.1 keep-alive
/// connection, then after each line on stdin reports how they fare.
const SESSIONS_PY: &str = r#"
import http.client, socket, sys
echo_ip, web_ip = sys.argv[1], sys.argv[2]
echo = socket.create_connection((echo_ip, 9000), timeout=5)
def echoed(word):
    try:
        echo.sendall(word)
        got = b""
        while len(got) < len(word):
            chunk = echo.recv(len(word) - len(got))
            if not chunk:
                return "closed"
            got += chunk
        return "ok" if got == word else "garbled"
    except OSError as e:
        return "closed (%s)" % type(e).__name__
def get(conn):
    conn.request("GET", "/")
    reply = conn.getresponse()
    reply.read()
    return reply.status
web = http.client.HTTPConnection(web_ip, 80, timeout=5)
print("echo", echoed(b"before\n"), "http", get(web), flush=True)
sys.stdin.readline()
print("echo", echoed(b"draining\n"), flush=True)
try:
    outcome = "reused %d" % get(web)
except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
    web.close()
    outcome = "closed at a request boundary (%s), retried: %d" % (type(e).__name__, get(web))
print("http", outcome, flush=True)
sys.stdin.readline()
print("echo", echoed(b"after\n"), flush=True)
"#;

#[test]
fn sessions_open_across_an_upgrade_end_as_the_readme_promises() {
    use std::io::{BufRead, BufReader, Write};

    let mut shop = Shop::new();
    let dir = shop.config_dir.clone();
    let mut first = Agent::start_with(
        &mut shop.topo,
        "node-a",
        &dir,
        &nodemesh_testbed::nodemesh_bin(),
        &["--drain-timeout", "3s"],
    )
    .unwrap();
    let _node_b = Agent::start(&mut shop.topo, "node-b", &dir).unwrap();
    let script = shop.topo.work_dir().join("sessions.py");
    std::fs::write(&script, SESSIONS_PY).unwrap();
    let netns = shop.topo.pod("client").netns.clone();
    let python = nodemesh_testbed::workload_apps::python3();
    let script = script.display().to_string();
    let mut cmd = shop
        .topo
        .command_in(&netns, &[python, &script, ECHO_IP, REMOTE_IP])
        .unwrap();
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut sessions = cmd.spawn().unwrap();
    let mut to = sessions.stdin.take().unwrap();
    let mut from = BufReader::new(sessions.stdout.take().unwrap());
    let mut line = || {
        let mut l = String::new();
        from.read_line(&mut l).unwrap();
        l.trim().to_owned()
    };
    assert_eq!(line(), "echo ok http 200");

    let mut second = shop.another("second", &["--take-over"]);
    wait_for("the new agent to own the node", || {
        is_owner_and_ready(&second)
    });
    writeln!(to).unwrap();
    // The old agent still relays the session while it drains; the idle
    // keep-alive connection was closed at a request boundary, or still works.
    assert_eq!(line(), "echo ok");
    let http = line();
    assert!(
        http == "http reused 200" || http.starts_with("http closed at a request boundary"),
        "{http}"
    );
    println!("idle HTTP/1.1 keep-alive: {http}");
    handed_over(&mut first, &mut second);
    // Past the drain deadline, the opaque session between two workloads of
    // the node still works: the new agent relays it (README).
    writeln!(to).unwrap();
    assert_eq!(line(), "echo ok");
    let _ = sessions.wait();
}

/// In a pod: streams a counter (one line per millisecond) through a TCP
/// echo at ARGV[1]:ARGV[2] and checks every line comes back once and in
/// order. After a line on stdin it stops writing, waits for the echoes of
/// all it wrote and reports them and the longest wait between two echoes.
/// With ARGV[3] (`upgrade`), the connection first switches protocols with
/// an HTTP/1.1 `Upgrade` request, as a WebSocket does.
const COUNTER_PY: &str = r#"
import select, socket, sys, threading, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
rest = b""
if len(sys.argv) > 3:
    conn.sendall(b"GET /counter HTTP/1.1\r\nHost: ws\r\nUpgrade: counter\r\nConnection: Upgrade\r\n\r\n")
    while b"\r\n\r\n" not in rest:
        chunk = conn.recv(4096)
        if not chunk:
            sys.exit("closed before switching protocols: %r" % rest)
        rest += chunk
    head, rest = rest.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101 "):
        sys.exit("not switched: %r" % head)
stop, written = threading.Event(), [0]
def write():
    n = 0
    while not stop.is_set():
        conn.sendall(b"%08d\n" % n)
        n += 1
        written[0] = n
        time.sleep(0.001)
writer = threading.Thread(target=write)
writer.start()
print("streaming", flush=True)
echoed, pending, longest, last, verdict = 0, rest, 0.0, time.monotonic(), "ok"
reader_done = threading.Event()
def read():
    global echoed, pending, longest, last, verdict
    try:
        while not (stop.is_set() and not writer.is_alive() and echoed >= written[0]):
            # Waits in short steps: the last echo may arrive before the
            # writer has stopped, and nothing would wake a blocking recv.
            if not select.select([conn], [], [], 0.1)[0]:
                if time.monotonic() - last > 15:
                    verdict = "stalled"
                    break
                continue
            chunk = conn.recv(65536)
            if not chunk:
                verdict = "closed"
                break
            now = time.monotonic()
            longest, last = max(longest, now - last), now
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line != b"%08d" % echoed:
                    verdict = "line %d came back as %r" % (echoed, line)
                    return
                echoed += 1
    except OSError as e:
        verdict = "closed (%s)" % type(e).__name__
    finally:
        reader_done.set()
reader = threading.Thread(target=read)
reader.start()
sys.stdin.readline()
stop.set()
writer.join()
reader_done.wait(15)
print("%s %d of %d, longest wait %.0f ms" % (verdict, echoed, written[0], longest * 1000), flush=True)
"#;

/// A counter stream through a TCP echo, from `pod` to `ip`:9000, or through
/// an upgraded HTTP connection ([`CounterStream::upgraded`]).
struct CounterStream {
    process: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
}

impl CounterStream {
    fn start(shop: &Shop, pod: &str, ip: &str) -> CounterStream {
        CounterStream::run(shop, pod, &[ip, "9000"])
    }

    /// Through an HTTP/1.1 `Upgrade` to `ip`:`port` once switched.
    fn upgraded(shop: &Shop, pod: &str, ip: &str, port: &str) -> CounterStream {
        CounterStream::run(shop, pod, &[ip, port, "upgrade"])
    }

    fn run(shop: &Shop, pod: &str, args: &[&str]) -> CounterStream {
        use std::io::BufRead;
        let script = shop.topo.work_dir().join("counter.py");
        std::fs::write(&script, COUNTER_PY).unwrap();
        let netns = shop.topo.pod(pod).netns.clone();
        let python = nodemesh_testbed::workload_apps::python3();
        let script = script.display().to_string();
        let command: Vec<&str> = [python, &script]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let mut cmd = shop.topo.command_in(&netns, &command).unwrap();
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut process = cmd.spawn().unwrap();
        let to = process.stdin.take().unwrap();
        let mut from = std::io::BufReader::new(process.stdout.take().unwrap());
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "streaming", "the counter stream did not start");
        CounterStream { process, to, from }
    }

    /// Stops the stream; its verdict: `ok N of N, longest wait M ms` when
    /// every line came back once and in order.
    fn finish(mut self) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.to).unwrap();
        let mut line = String::new();
        self.from.read_line(&mut line).unwrap();
        let _ = self.process.wait();
        line.trim().to_owned()
    }
}

/// Every line of the stream came back, once and in order.
fn assert_whole(what: &str, verdict: &str) {
    let words: Vec<&str> = verdict
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    assert!(
        words.len() > 3 && words[0] == "ok" && words[1] == words[3] && words[1] != "0",
        "{what}: {verdict}"
    );
    println!("{what}: {verdict}");
}

/// Two hand-overs of `node`: from `first` to a new agent (`--take-over`),
/// then from that one to a standby once it is stopped; `after` runs after
/// each. Returns the second and third agents.
fn hand_over_twice(
    shop: &mut Shop,
    node: &str,
    first: &mut Agent,
    after: impl Fn(&Shop),
) -> (Agent, Agent) {
    let mut second = shop.another_on(node, "second", &["--take-over"]);
    handed_over(first, &mut second);
    after(shop);
    sleep(Duration::from_secs(1));
    let mut third = shop.another_on(node, "third", &[]);
    second.stop();
    wait_for("the standby to own the node", || is_owner_and_ready(&third));
    second.set_uninstall_on_drop(false);
    third.set_uninstall_on_drop(true);
    after(shop);
    sleep(Duration::from_secs(1));
    (second, third)
}

/// Each of the old agents carried `count` relays to the next.
fn assert_carried(old_agents: &[(&str, &Agent)], count: usize) {
    for (what, old) in old_agents {
        let log = old.log();
        let carried = log
            .lines()
            .find(|l| l.contains("relay(s) to the new agent"))
            .unwrap_or_else(|| panic!("the {what} agent carried no relay:\n{log}"));
        let expected = format!("carried {count} relay(s)");
        assert!(carried.contains(&expected), "{carried}");
        println!("{what} agent: {carried}");
    }
}

#[test]
fn opaque_relays_are_carried_across_two_hand_overs_without_losing_a_byte() {
    let mut shop = Shop::new();
    start_tcp_echo(&mut shop.topo, "plainweb", 9000).unwrap();
    let mut first = shop.agent();
    let web = shop.topo.pod("web").address.to_string();
    let plainweb = shop.topo.pod("plainweb").address.to_string();
    // Plaintext inbound (a caller outside the mesh to an enrolled pod),
    // plaintext outbound (an enrolled pod to an address outside the mesh),
    // and between two enrolled pods of the node (through Service `echo`).
    let inbound = CounterStream::start(&shop, "outsider", &web);
    let outbound = CounterStream::start(&shop, "client", &plainweb);
    let local = CounterStream::start(&shop, "client", ECHO_IP);
    sleep(Duration::from_secs(1));
    let (second, third) = hand_over_twice(&mut shop, "node-a", &mut first, |_| {});
    assert_carried(&[("first", &first), ("second", &second)], 3);
    assert_whole("plaintext inbound", &inbound.finish());
    assert_whole("plaintext outbound", &outbound.finish());
    assert_whole("between two workloads of the node", &local.finish());
    // The third agent relays them, and counts them as its own: the
    // same-node one on both sides, still with the caller's identity.
    let status = third.status_json().unwrap();
    assert_eq!(status["connections"]["inbound"]["total"], 2, "{status}");
    assert_eq!(status["connections"]["outbound"]["total"], 2, "{status}");
    let web_ip = shop.topo.pod("web").address;
    let client_ip = shop.topo.pod("client").address;
    wait_for("the carried connections to be reported", || {
        third.connections().unwrap().len() >= 4
    });
    let finished = third.connections().unwrap();
    let local_in = finished
        .iter()
        .find(|c| c["direction"] == "inbound" && c["transport"] == "local")
        .unwrap_or_else(|| panic!("no same-node inbound record: {finished:?}"));
    let source = local_in["source"].as_str().unwrap();
    assert!(source.starts_with(&format!("{client_ip}:")), "{local_in}");
    assert_eq!(local_in["upstream"], format!("{web_ip}:9000"), "{local_in}");
    assert!(
        local_in["source_identity"]
            .as_str()
            .is_some_and(|id| id.contains("/ns/shop/sa/")),
        "{local_in}"
    );
    assert!(local_in["bytes_sent"].as_u64().unwrap() > 0, "{local_in}");
    assert!(
        finished
            .iter()
            .any(|c| c["direction"] == "outbound" && c["transport"] == "local"),
        "{finished:?}"
    );
}

/// The README's promise for an opaque connection to a workload on another
/// node: it survives hand-overs of the caller's agent (the HBONE stream is
/// quiesced with node-b's agent and resumed by the next agent), while
/// another tenant's requests go on.
#[test]
fn opaque_relays_to_another_node_survive_two_hand_overs_of_the_callers_agent() {
    let mut shop = Shop::new();
    start_tcp_echo(&mut shop.topo, "remote", 9000).unwrap();
    let dir = shop.config_dir.clone();
    let node_b = Agent::start(&mut shop.topo, "node-b", &dir).unwrap();
    let mut first = shop.agent();
    let remote = shop.topo.pod("remote").address.to_string();
    let web = format!("http://{}:8080/", shop.topo.pod("web").address);
    let across = CounterStream::start(&shop, "client", &remote);
    sleep(Duration::from_secs(1));
    // Another tenant's requests go on meanwhile.
    let (second, third) = hand_over_twice(&mut shop, "node-a", &mut first, |shop| {
        shop.get("outsider", &web)
    });
    assert_carried(&[("first", &first), ("second", &second)], 1);
    assert_whole("to a workload on another node", &across.finish());
    // node-b's agent resumed the stream twice and kept it as one connection.
    let resumed = node_b.log().matches("resumed").count();
    assert_eq!(resumed, 2, "{}", node_b.log());
    assert_reported_once(&third, "outbound", &remote);
    assert_reported_once(&node_b, "inbound", &remote);
}

/// `agent` reports the counter stream from `shop/client` to `remote`:9000
/// as one connection in `direction`, whole (every line echoed, counted
/// once over all its streams) and with the caller's identity.
fn assert_reported_once(agent: &Agent, direction: &str, remote: &str) {
    let is_across = |c: &serde_json::Value| {
        c["direction"] == direction
            && c["transport"] == "hbone"
            && c["source_workload"] == "shop/client"
            && c["upstream"] == format!("{remote}:9000")
    };
    let record = the_whole_record(agent, is_across);
    println!("{direction} record: {record}");
}

/// The one record of `agent` that `is_it` matches, once reported: bytes
/// moved and all echoed, ended ok, with the caller's identity.
fn the_whole_record(
    agent: &Agent,
    is_it: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for("the connection to be reported", || {
        agent.connections().unwrap().iter().any(&is_it)
    });
    let mut records: Vec<_> = agent
        .connections()
        .unwrap()
        .into_iter()
        .filter(&is_it)
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = records.remove(0);
    assert!(record["bytes_sent"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(record["bytes_sent"], record["bytes_received"], "{record}");
    assert_eq!(record["outcome"], "ok", "{record}");
    assert!(
        record["source_identity"]
            .as_str()
            .is_some_and(|id| id.contains("/ns/shop/sa/")),
        "{record}"
    );
    record
}

/// The same connection across two hand-overs of the *destination's* agent
/// (node-b): the old agent quiesces the stream with node-a's agent and
/// carries the server's socket to the next one, where node-a's agent
/// resumes the stream; another tenant's requests through node-b go on.
#[test]
fn opaque_relays_from_another_node_survive_two_hand_overs_of_the_destinations_agent() {
    let mut shop = Shop::new();
    start_tcp_echo(&mut shop.topo, "remote", 9000).unwrap();
    let dir = shop.config_dir.clone();
    let mut first = Agent::start(&mut shop.topo, "node-b", &dir).unwrap();
    let node_a = shop.agent();
    let remote = shop.topo.pod("remote").address.to_string();
    let across = CounterStream::start(&shop, "client", &remote);
    sleep(Duration::from_secs(1));
    requests_through_node_b(&shop);
    let (second, third) = hand_over_twice(&mut shop, "node-b", &mut first, requests_through_node_b);
    assert_carried(&[("first", &first), ("second", &second)], 1);
    assert_whole("from a workload on another node", &across.finish());
    for (what, agent) in [("second", &second), ("third", &third)] {
        let log = agent.log();
        let took = log.lines().find(|l| l.contains("took node "));
        println!("{what} agent: {}", took.unwrap_or("(no take-over line)"));
    }
    // node-a's agent resumed the stream with each new agent of node-b.
    let moved = node_a
        .log()
        .matches("moved by its destination's agent")
        .count();
    assert_eq!(moved, 2, "{}", node_a.log());
    assert_reported_once(&node_a, "outbound", &remote);
    assert_reported_once(&third, "inbound", &remote);
}

/// Another tenant's requests through node-b's agent: from a plain pod to
/// node-b's app, and from `web` to Service `remote`.
fn requests_through_node_b(shop: &Shop) {
    let remote_app = format!("http://{}:9080/", shop.topo.pod("remote").address);
    shop.get("outsider", &remote_app);
    shop.get("web", &format!("http://{REMOTE_IP}/"));
}

/// Answers any request `101 Switching Protocols`, then echoes what comes:
/// a WebSocket server without the framing. Argument: the port.
const UPGRADE_ECHO_PY: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Switch(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(101)
        self.send_header("Upgrade", self.headers.get("Upgrade", "echo"))
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        while True:
            data = self.rfile.read1(65536)
            if not data:
                break
            self.wfile.write(data)
        self.close_connection = True
    def log_message(self, *args):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Switch).serve_forever()
"#;

const WS_IP: &str = "10.96.0.33";

impl Shop {
    /// [`UPGRADE_ECHO_PY`] in `pod` on port 8090, behind Service `ws` of
    /// `namespace` (`WS_IP`, port 80, an HTTP port) selecting `label`.
    fn upgrade_echo(&mut self, pod: &str, namespace: &str, label: (&str, &str)) {
        let script = self.topo.work_dir().join("upgrade_echo.py");
        std::fs::write(&script, UPGRADE_ECHO_PY).unwrap();
        let script = script.display().to_string();
        let netns = self.topo.pod(pod).netns.clone();
        let python = nodemesh_testbed::workload_apps::python3();
        let cmd = [python, script.as_str(), "8090"];
        self.topo.spawn_in(&netns, &cmd, "upgrade-echo").unwrap();
        wait_listening(&self.topo, &netns, 8090).unwrap();
        let ws = config::ServicePort {
            name: "http-ws",
            port: 80,
            target_port: 8090,
        };
        let service = config::service_with_ports("ws", namespace, &[label], &[ws], Some(WS_IP));
        config::write(&self.config_dir, "ws.yaml", &[service]).unwrap();
    }
}

/// The README's promise for an upgraded HTTP connection (a WebSocket) from
/// an enrolled pod to a plaintext endpoint behind a Service: once switched,
/// it is carried across hand-overs of the caller's agent like an opaque
/// relay, every message once and in order, and reported once, as the HTTP
/// connection it is, while another tenant's requests go on.
#[test]
fn upgraded_connections_to_a_plaintext_endpoint_survive_two_hand_overs() {
    let mut shop = Shop::new();
    shop.upgrade_echo("plainweb", "plain", ("app", "plainweb"));
    let mut first = shop.agent();
    let web = format!("http://{}:8080/", shop.topo.pod("web").address);
    let upgraded = CounterStream::upgraded(&shop, "client", WS_IP, "80");
    sleep(Duration::from_secs(1));
    let (second, third) = hand_over_twice(&mut shop, "node-a", &mut first, |shop| {
        shop.get("outsider", &web)
    });
    assert_carried(&[("first", &first), ("second", &second)], 1);
    assert_whole("an upgraded connection", &upgraded.finish());
    // One record, the third agent's: the HTTP connection, with every byte
    // since the switch (all echoed) and the caller's identity.
    let is_ws = |c: &serde_json::Value| c["direction"] == "outbound" && c["service"] == "plain/ws";
    let record = the_whole_record(&third, is_ws);
    assert_eq!(record["protocol"], "http/1.1", "{record}");
    assert_eq!(record["transport"], "plaintext", "{record}");
    println!("record: {record}");
}

/// The README's promise for an upgraded HTTP connection (a WebSocket) from
/// an enrolled pod to a workload on another node: its HBONE stream is
/// resumable, so once switched it survives hand-overs of the caller's agent
/// as an opaque relay to another node does (node-b's agent parks the
/// application's socket and the next agent resumes the stream), every
/// message once and in order, while another tenant's requests go on. Each
/// agent reports it once, as the HTTP connection it is.
#[test]
fn upgraded_connections_to_another_node_survive_two_hand_overs_of_the_callers_agent() {
    // node-b's agent resumed the stream with each new agent of node-a.
    upgraded_stream_across_two_hand_overs_of("node-a", requests_through_node_a, "resumed");
}

/// The same upgraded connection across two hand-overs of the
/// *destination's* agent (node-b): the old agent quiesces the stream with
/// node-a's agent and carries the application's socket to the next one,
/// where node-a's agent resumes the stream; another tenant's requests
/// through node-b go on.
#[test]
fn upgraded_connections_from_another_node_survive_two_hand_overs_of_the_destinations_agent() {
    let moved = "moved by its destination's agent";
    upgraded_stream_across_two_hand_overs_of("node-b", requests_through_node_b, moved);
}

/// Another tenant's requests through node-a's agent: from a plain pod to
/// `web`.
fn requests_through_node_a(shop: &Shop) {
    shop.get(
        "outsider",
        &format!("http://{}:8080/", shop.topo.pod("web").address),
    );
}

/// An upgraded counter stream from node-a's `client` to node-b's app
/// (through Service `shop/ws`) across two hand-overs of `node`'s agent,
/// while `other_tenant`'s requests go on: every message comes back once
/// and in order, the other node's agent logs `moved` once per hand-over,
/// and the last agents of both ends report the connection once.
fn upgraded_stream_across_two_hand_overs_of(node: &str, other_tenant: fn(&Shop), moved: &str) {
    let mut shop = Shop::new();
    shop.upgrade_echo("remote", "shop", ("app", "remote"));
    let dir = shop.config_dir.clone();
    let node_b = Agent::start(&mut shop.topo, "node-b", &dir).unwrap();
    let node_a = shop.agent();
    let (mut first, steady) = match node {
        "node-a" => (node_a, node_b),
        _ => (node_b, node_a),
    };
    let upgraded = CounterStream::upgraded(&shop, "client", WS_IP, "80");
    sleep(Duration::from_secs(1));
    other_tenant(&shop);
    let (second, third) = hand_over_twice(&mut shop, node, &mut first, other_tenant);
    assert_carried(&[("first", &first), ("second", &second)], 1);
    let what = format!("an upgraded connection across hand-overs of {node}");
    assert_whole(&what, &upgraded.finish());
    let seen = steady.log().matches(moved).count();
    assert_eq!(seen, 2, "{}", steady.log());
    let (caller, destination) = match node {
        "node-a" => (&third, &steady),
        _ => (&steady, &third),
    };
    assert_upgraded_reported_once(caller, destination);
}

/// The caller's agent `caller` and the destination's `destination` each
/// report the upgraded counter stream from `shop/client` once, whole, as
/// the HTTP/1.1 connection it is (over HBONE, to Service `shop/ws`).
fn assert_upgraded_reported_once(caller: &Agent, destination: &Agent) {
    let is_ws = |direction: &'static str| {
        move |c: &serde_json::Value| {
            c["direction"] == direction
                && c["transport"] == "hbone"
                && c["protocol"] == "http/1.1"
                && c["source_workload"] == "shop/client"
        }
    };
    let outbound = the_whole_record(caller, is_ws("outbound"));
    assert_eq!(outbound["service"], "shop/ws", "{outbound}");
    println!("outbound record: {outbound}");
    let inbound = the_whole_record(destination, is_ws("inbound"));
    assert_eq!(inbound["bytes_sent"], outbound["bytes_sent"], "{inbound}");
    println!("inbound record: {inbound}");
}
