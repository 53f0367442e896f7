//! Zero trust between agents, on real namespaces with real agents, a real
//! `nodemesh ca`, curl, h2load and tcpdump: what crosses the wire between
//! nodes, what the destination application sees, how connections are
//! pooled, PeerAuthentication and DestinationRule `tls`, and certificates
//! renewed under load.
//!
//! Layout: node-a runs `client` (service account `client`) and
//! `outsider-a`; node-b runs `web` (`mesh-app` on 9080, Service `web` port
//! `http`, service account `default`), `neighbour` (service account
//! `neighbour`) and `outsider-b`. The outsiders have no Workload: they are
//! outside the mesh, as un-enrolled pods are.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nodemesh_testbed::mesh::{Mesh, CLIENT, NAMESPACE};
use nodemesh_testbed::workload_apps::{curl_many, start_http_echo, start_tcp_echo, Reply};
use nodemesh_testbed::PodInfo;
use serde_json::Value;

const WEB: &str = "http://web:9080/";
/// A second port of the `web` pod, on no Service (so not declared).
const SECOND_PORT: u16 = 9081;

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

fn id(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{service_account}")
}

struct Lab {
    mesh: Mesh,
    web: PodInfo,
}

fn lab(agent_flags: &[&str]) -> Lab {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    let web = mesh.app("node-b", "web", &[("app", "web")], &[]).unwrap();
    mesh.http_service("web");
    mesh.pod_as("node-b", "neighbour", &[("app", "neighbour")], "neighbour")
        .unwrap();
    for (node, name) in [("node-a", "outsider-a"), ("node-b", "outsider-b")] {
        mesh.topo_mut().add_pod(node, name).unwrap();
    }
    start_http_echo(mesh.topo_mut(), &web.name, SECOND_PORT, "web-second").unwrap();
    mesh.start(agent_flags).unwrap();
    Lab { mesh, web }
}

impl Lab {
    /// One GET from `pod` (a pod or a node name) to `url`; status 0 when
    /// the connection failed.
    fn get(&self, from: &str, url: &str, args: &[&str]) -> Reply {
        let topo = self.mesh.topo();
        if topo.nodes().iter().any(|n| n.name == from) {
            let netns = &topo.node(from).netns;
            let mut cmd = vec!["curl", "--max-time", "5", "-sS", "-w", "\n%{http_code}"];
            cmd.extend_from_slice(args);
            cmd.push(url);
            let out = topo.run_in(netns, &cmd).unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
            return Reply {
                status: code.trim().parse().unwrap_or(0),
                seconds: 0.0,
                overloaded: false,
                body: body.to_owned(),
            };
        }
        curl_many(topo, from, &[url], args).unwrap().remove(0)
    }

    fn web_url(&self, port: u16) -> String {
        format!("http://{}:{port}/", self.web.address)
    }

    fn connections(&self, node: &str) -> Vec<Value> {
        let out = self
            .mesh
            .agent(node)
            .cli(&["connections", "-o", "json"])
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

fn json(reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
        .json()
        .unwrap_or_else(|| panic!("not JSON: {reply:?}"))
}

#[test]
fn only_tls_crosses_the_wire_between_nodes_and_streams_share_few_connections() {
    let mut lab = lab(&[]);
    let node_a = lab.mesh.topo().node("node-a").clone();
    let pcap = lab.mesh.topo().work_dir().join("fabric.pcap");
    let pcap_arg = pcap.display().to_string();
    let tcpdump = lab
        .mesh
        .topo_mut()
        .spawn_in(
            &node_a.netns,
            &["tcpdump", "-i", "any", "-n", "-U", "-w", &pcap_arg, "tcp"],
            "tcpdump",
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.mesh.topo().read_log("tcpdump").contains("listening on") {
        assert!(Instant::now() < deadline, "tcpdump did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Requests with a secret in the path, a header and the body.
    let secret = [
        "-H",
        "x-canary: zebra-header-7731",
        "--data",
        "zebra-body-7731",
    ];
    for _ in 0..5 {
        let reply = lab.get(CLIENT, "http://web:9080/zebra-path-7731", &secret);
        let doc = json(&reply);
        assert_eq!(doc["headers"]["x-canary"], "zebra-header-7731");
    }

    // 1000 requests, each on a new client connection.
    let script = r#"
import socket, sys
ok = 0
for i in range(1000):
    s = socket.create_connection(("web", 9080), timeout=5)
    s.sendall(b"GET /zebra-loop HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    ok += data.startswith(b"HTTP/1.1 200")
print(ok)
"#;
    let client = lab.mesh.topo().pod(CLIENT).netns.clone();
    let out = lab
        .mesh
        .topo()
        .run_in(&client, &["python3", "-c", script])
        .unwrap();
    let ok = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(ok, "1000", "{}", String::from_utf8_lossy(&out.stderr));
    lab.mesh.topo_mut().stop_process(tcpdump).unwrap();

    let captured = std::fs::read(&pcap).unwrap();
    assert!(captured.len() > 10_000, "nothing captured");
    let plaintext = captured.windows(5).any(|w| w == b"zebra");
    assert!(!plaintext, "a request crossed node-a's links in plaintext");

    let node_b = lab.mesh.topo().node("node-b").address;
    let count = |filter: &str| -> usize {
        let out = std::process::Command::new("tcpdump")
            .args(["-r", &pcap_arg, "-n", filter])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let syn = "tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0";
    let to_agent = count(&format!("{syn} and dst host {node_b} and dst port 15008"));
    assert!(
        (1..=3).contains(&to_agent),
        "{to_agent} TLS connections from node-a's agent to node-b's for 1005 client connections"
    );
    let direct = count(&format!(
        "{syn} and dst host {} and dst port 9080",
        lab.web.address
    ));
    assert_eq!(
        direct, 0,
        "connections went straight to the pod, not over HBONE"
    );
    let opened = hbone_opened(&lab);
    assert!(
        (1..=3).contains(&opened),
        "{opened} HBONE connections opened"
    );
}

/// HBONE opened by node-a's agent since it started.
fn hbone_opened(lab: &Lab) -> u64 {
    let status = lab.mesh.agent("node-a").status_json().unwrap();
    status["connections"]["hbone"]["opened"]
        .as_u64()
        .unwrap_or_else(|| panic!("no connections.hbone.opened in {status}"))
}

/// A JSON report a test load printed; `failed` must be 0.
fn load_report(what: &str, out: &std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "{what}'s report is not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(doc["failed"], 0, "{what} lost requests: {doc}");
    doc
}

/// Tens of thousands of short connections whose server closes first (each
/// an HBONE stream the destination ends before the caller does) while the
/// same workload keeps a long-lived connection on the same pooled HBONE
/// connection. Before, the destination reset each such stream, the
/// caller's end of stream often arrived after h2 had forgotten it, and
/// h2's lifetime limit of 1 024 such errors closed the whole connection
/// (GOAWAY `ENHANCE_YOUR_CALM`), failing every stream on it.
#[test]
fn connection_churn_never_tears_down_the_shared_hbone_connection() {
    // One worker: one pooled connection takes every stream.
    let lab = lab(&["--workers", "1"]);
    let web = format!("{}:9080", lab.web.address);
    let url = format!("http://{web}/");
    let topo = lab.mesh.topo();
    let client = topo.pod(CLIENT).netns.clone();
    let churn = env!("CARGO_BIN_EXE_mesh-churn");
    // Opens the pooled connection, so that any new one counts.
    let warm_up = [churn, "--count", "200", &web];
    load_report("mesh-churn", &topo.run_in(&client, &warm_up).unwrap());
    let opened = hbone_opened(&lab);
    let load = env!("CARGO_BIN_EXE_mesh-load");
    let long_lived = topo
        .command_in(&client, &[load, "--rate", "50", "--duration", "25", &url])
        .unwrap()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let args = [churn, "--count", "40000", "--concurrency", "64", &web];
    let churned = load_report("mesh-churn", &topo.run_in(&client, &args).unwrap());
    assert_eq!(churned["answered"], 40_000, "{churned}");
    let kept = load_report("mesh-load", &long_lived.wait_with_output().unwrap());
    assert_eq!(kept["connections_opened"], 1, "{kept}");
    assert_eq!(
        hbone_opened(&lab),
        opened,
        "node-a had to open new HBONE connections"
    );
    let log = lab.mesh.agent("node-b").log();
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reached limit"))
        .collect();
    assert!(
        closed.is_empty(),
        "node-b's h2 closed HBONE connections: {closed:?}"
    );
}

/// More connections open at once from one workload to one node than one
/// HTTP/2 connection may carry streams (1 024): each is answered at once,
/// the pool spreading them over more HBONE connections.
#[test]
fn more_open_connections_than_one_hbone_connection_carries_are_all_served() {
    const OPEN: usize = 1_500;
    const ECHO_PORT: u16 = 9090;
    let mut lab = lab(&["--workers", "1"]);
    let web = lab.web.clone();
    start_tcp_echo(lab.mesh.topo_mut(), &web, ECHO_PORT).unwrap();
    let script = format!(
        r#"
import resource, selectors, socket, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = [socket.create_connection(("{ip}", {ECHO_PORT}), timeout=5) for _ in range({OPEN})]
def echoed(byte):
    """Sends `byte` on every connection; how many echo it within 20 s."""
    waiting = selectors.DefaultSelector()
    for s in socks:
        try:
            s.sendall(byte)
            waiting.register(s, selectors.EVENT_READ)
        except OSError:
            pass
    ok, deadline = 0, time.time() + 20
    while waiting.get_map() and time.time() < deadline:
        for key, _ in waiting.select(timeout=1):
            waiting.unregister(key.fileobj)
            try:
                ok += key.fileobj.recv(1) == byte
            except OSError:
                pass
    return ok
# Every connection open before any is used, then each used twice.
print(echoed(b"a"), echoed(b"b"))
"#,
        ip = web.address
    );
    let client = lab.mesh.topo().pod(CLIENT).netns.clone();
    let out = lab
        .mesh
        .topo()
        .run_in(&client, &["python3", "-c", &script])
        .unwrap();
    let echoed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        echoed,
        format!("{OPEN} {OPEN}"),
        "connections echoed, first and second round: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opened = hbone_opened(&lab);
    assert_eq!(opened, 2, "{opened} HBONE connections for {OPEN} streams");
}

#[test]
fn the_destination_sees_the_callers_identity_and_address_and_no_forged_header() {
    let lab = lab(&[]);
    let forged = [
        "-H",
        "x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/mesh/sa/admin",
    ];
    let address = |pod: &str| lab.mesh.topo().pod(pod).address.to_string();

    // From another node, over HBONE: to the Service (routed at L7 on the
    // caller's node) and to the pod's address (relayed there, so the
    // connection ends with curl's and shows in `nodemesh connections`).
    for url in [WEB.to_owned(), lab.web_url(9080)] {
        let doc = json(&lab.get(CLIENT, &url, &forged));
        assert_eq!(
            doc["headers"]["x-forwarded-client-cert"],
            format!("By={};URI={}", id("default"), id(CLIENT))
        );
        assert_eq!(doc["client"], address(CLIENT));
    }

    // From the same node: no wire, the same outcome.
    let doc = json(&lab.get("neighbour", WEB, &forged));
    assert_eq!(
        doc["headers"]["x-forwarded-client-cert"],
        format!("By={};URI={}", id("default"), id("neighbour"))
    );
    assert_eq!(doc["client"], address("neighbour"));

    // From outside the mesh (PERMISSIVE by default): accepted, and the
    // forged header is gone.
    for outsider in ["outsider-a", "outsider-b"] {
        let doc = json(&lab.get(outsider, &lab.web_url(9080), &forged));
        assert!(
            doc["headers"].get("x-forwarded-client-cert").is_none(),
            "{doc}"
        );
        assert_eq!(doc["client"], address(outsider));
    }

    // Both ends named on both nodes.
    let outbound = lab.connections("node-a");
    assert!(
        outbound.iter().any(|c| c["direction"] == "outbound"
            && c["transport"] == "hbone"
            && c["source_identity"] == id(CLIENT)
            && c["destination_identity"] == id("default")),
        "{outbound:#?}"
    );
    let inbound = lab.connections("node-b");
    let over_hbone = inbound.iter().find(|c| {
        c["direction"] == "inbound"
            && c["transport"] == "hbone"
            && c["source_identity"] == id(CLIENT)
    });
    let over_hbone = over_hbone.unwrap_or_else(|| panic!("{inbound:#?}"));
    assert_eq!(over_hbone["destination_identity"], id("default"));
    assert_eq!(
        over_hbone["source_workload"],
        format!("{NAMESPACE}/{CLIENT}")
    );
    let plaintext = inbound.iter().find(|c| {
        c["transport"] == "plaintext"
            && c["source"]
                .as_str()
                .unwrap_or("")
                .starts_with(&address("outsider-a"))
    });
    let plaintext = plaintext.unwrap_or_else(|| panic!("{inbound:#?}"));
    assert!(plaintext["source_identity"].is_null());

    // A server that closes after its answer (`Connection: close`) ends the
    // HBONE stream before the caller closes: no failure on either side.
    let url = lab.web_url(9080);
    let urls = vec![url.as_str(); 20];
    let replies = curl_many(lab.mesh.topo(), CLIENT, &urls, &["-H", "connection: close"]).unwrap();
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    for node in ["node-a", "node-b"] {
        let failed: Vec<Value> = lab
            .connections(node)
            .into_iter()
            .filter(|c| c["outcome"] != "ok")
            .collect();
        assert!(failed.is_empty(), "{node}: {failed:#?}");
    }
}

const ROOT_NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n";

fn peer_authentication(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  \
         name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

#[test]
fn strict_refuses_plaintext_from_outside_the_mesh_and_permissive_accepts_it() {
    let lab = lab(&[]);
    let outside = ["outsider-a", "outsider-b", "node-b"];
    let (port_http, port_second) = (lab.web_url(9080), lab.web_url(SECOND_PORT));
    let reaches = |from: &str, url: &str| lab.get(from, url, &[]).status == 200;
    for from in outside {
        assert!(reaches(from, &port_http), "{from} (PERMISSIVE by default)");
    }

    // Mesh-wide STRICT, in the root namespace.
    let strict = format!(
        "{ROOT_NAMESPACE}---\n{}",
        peer_authentication("istio-system", "default", "  mtls:\n    mode: STRICT\n")
    );
    lab.mesh.apply("mesh-strict.yaml", &strict).unwrap();
    for from in outside {
        for url in [&port_http, &port_second] {
            assert_eq!(
                lab.get(from, url, &[]).status,
                0,
                "{from} reached {url} under STRICT"
            );
        }
    }
    let log = lab.mesh.agent("node-b").log();
    let outsider = lab.mesh.topo().pod("outsider-a").address;
    assert!(
        log.contains(&format!("plaintext connection from {outsider}"))
            && log.contains("mTLS mode STRICT"),
        "no refusal in the log:\n{log}"
    );
    // Mesh callers still get through, from both nodes.
    for from in [CLIENT, "neighbour"] {
        assert_eq!(json(&lab.get(from, WEB, &[]))["name"], "web");
    }

    // A workload policy opens one port again.
    let port_level = peer_authentication(
        NAMESPACE,
        "web",
        "  selector:\n    matchLabels:\n      app: web\n  mtls:\n    mode: STRICT\n  \
         portLevelMtls:\n    9080:\n      mode: PERMISSIVE\n",
    );
    lab.mesh.apply("web-port.yaml", &port_level).unwrap();
    for from in outside {
        assert!(reaches(from, &port_http), "{from} on the PERMISSIVE port");
        assert_eq!(
            lab.get(from, &port_second, &[]).status,
            0,
            "{from} on a STRICT port"
        );
    }

    // A DestinationRule that disables mTLS sends plaintext: refused by
    // the STRICT port, accepted by the PERMISSIVE one.
    let no_tls = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  \
                  name: web\nspec:\n  host: web\n  trafficPolicy:\n    tls:\n      mode: DISABLE\n";
    lab.mesh.apply("web-no-tls.yaml", no_tls).unwrap();
    let doc = json(&lab.get(CLIENT, WEB, &[]));
    assert!(
        doc["headers"].get("x-forwarded-client-cert").is_none(),
        "{doc}"
    );
    lab.mesh.delete("web-port.yaml").unwrap();
    let refused = lab.get(CLIENT, WEB, &[]);
    assert_eq!(
        refused.status, 503,
        "plaintext to a STRICT port: {refused:?}"
    );
    lab.mesh.delete("web-no-tls.yaml").unwrap();

    // Removing the policy restores the default at runtime.
    lab.mesh.delete("mesh-strict.yaml").unwrap();
    for from in outside {
        for url in [&port_http, &port_second] {
            assert!(
                reaches(from, url),
                "{from} to {url} after STRICT was removed"
            );
        }
    }
}

#[test]
fn certificates_renewed_every_30s_fail_no_request_of_a_two_minute_load() {
    let lab = lab(&["--cert-lifetime", "1m"]);
    let serials = |node: &str| -> BTreeSet<String> {
        let out = lab.mesh.agent(node).cli(&["certs", "-o", "json"]).unwrap();
        let certs: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        certs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["serial"].as_str().map(str::to_owned))
            .collect()
    };
    let client = lab.mesh.topo().pod(CLIENT).netns.clone();
    let load = std::thread::scope(|s| {
        let load = s.spawn(|| {
            lab.mesh.topo().run_in(
                &client,
                &[
                    "h2load", "--h1", "-c", "4", "--rps", "125", "-D", "120", WEB,
                ],
            )
        });
        let mut seen = [BTreeSet::new(), BTreeSet::new()];
        while !load.is_finished() {
            for (node, seen) in ["node-a", "node-b"].into_iter().zip(&mut seen) {
                seen.extend(serials(node));
            }
            std::thread::sleep(Duration::from_secs(5));
        }
        (load.join().unwrap().unwrap(), seen)
    });
    let (out, seen) = load;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = report
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no h2load report:\n{report}"));
    let field = |name: &str| -> u64 {
        let at = line
            .find(&format!(" {name}"))
            .unwrap_or_else(|| panic!("{line}"));
        line[..at]
            .rsplit([',', ' '])
            .find(|w| !w.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    let (done, succeeded) = (field("done"), field("succeeded"));
    assert!(done >= 50_000, "{report}");
    assert_eq!(succeeded, done, "{report}");
    assert_eq!(
        (field("failed"), field("errored"), field("timeout")),
        (0, 0, 0),
        "{report}"
    );
    assert!(report.contains(&format!("{done} 2xx")), "{report}");
    // node-a holds `client`'s certificate, node-b `web`'s and `neighbour`'s:
    // each renewed at least twice (three serials or more per identity).
    assert!(seen[0].len() >= 3, "node-a's serials: {:?}", seen[0]);
    assert!(seen[1].len() >= 6, "node-b's serials: {:?}", seen[1]);
}
