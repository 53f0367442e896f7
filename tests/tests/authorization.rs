//! AuthorizationPolicy on real namespaces with real agents over mutual TLS:
//! a three-tier application locked down with Istio's deny-all and
//! allow-lists, every allowed call served and every other one denied with
//! Envoy's answers, policies changed at runtime, and `nodemesh explain`
//! checked against what the data path did.
//!
//! Layout (namespace `default`, one service account per tier, the tiers
//! spread so that every hop crosses between the nodes):
//! - node-a: `client` (anywhere in the mesh), `api` (mesh-app, Service
//!   `api`), `outsider` (no Workload: a plaintext caller);
//! - node-b: `web` (mesh-app, Service `web`), `db` (a server that records
//!   every byte it gets, Service `db` port 5432 named `tcp-postgres`, so
//!   opaque TCP; it also listens on 5433, on no Service).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nodemesh_testbed::config::ServicePort;
use nodemesh_testbed::mesh::{Mesh, CLIENT};
use nodemesh_testbed::tenants::{recorded_at, RECORDER_PY};
use nodemesh_testbed::workload_apps::{python3, wait_listening, write_script, Reply};
use serde_json::Value;

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

const DB_PORT: u16 = 5432;
const DB_OTHER_PORT: u16 = 5433;

/// Istio's "allow-nothing" for the namespace, then one allow-list per tier.
const LOCKDOWN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: default
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["*"]
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: api-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: api
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/web"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/api/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: db-from-api
  namespace: default
spec:
  selector:
    matchLabels:
      app: db
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/api"]
    to:
    - operation:
        ports: ["5432"]
"#;

struct Lab {
    mesh: Mesh,
    db_log: PathBuf,
}

fn lab() -> Lab {
    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.app_as("node-b", "web", &[("app", "web")], "web", &[])
        .unwrap();
    mesh.app_as("node-a", "api", &[("app", "api")], "api", &[])
        .unwrap();
    mesh.http_service("web");
    mesh.http_service("api");
    let db = mesh.pod_as("node-b", "db", &[("app", "db")], "db").unwrap();
    let db_log = mesh.topo().work_dir().join("db.jsonl");
    let script = write_script(mesh.topo(), "recorder.py", RECORDER_PY).unwrap();
    for port in [DB_PORT, DB_OTHER_PORT] {
        let port = port.to_string();
        let cmd = [
            python3(),
            &*script.to_string_lossy(),
            &port,
            &*db_log.to_string_lossy(),
        ];
        mesh.topo_mut()
            .spawn_in(&db.netns, &cmd, &format!("db-{port}"))
            .unwrap();
    }
    for port in [DB_PORT, DB_OTHER_PORT] {
        wait_listening(mesh.topo(), &db.netns, port).unwrap();
    }
    mesh.service(
        "db",
        &[ServicePort {
            name: "tcp-postgres",
            port: DB_PORT,
            target_port: DB_PORT,
        }],
    );
    mesh.topo_mut().add_pod("node-a", "outsider").unwrap();
    mesh.start(&[]).unwrap();
    Lab { mesh, db_log }
}

/// A TCP client: connects, sends its line, prints what came back until
/// the server closes or `wait` seconds (default 2) pass (`closed: …` when
/// the connection died).
const TCP_CLIENT_PY: &str = r#"
import socket, sys
host, port, line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
wait = float(sys.argv[4]) if len(sys.argv) > 4 else 2
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(line.encode() + b"\r\n\r\n")
    s.settimeout(wait)
    got = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
    print("closed: %r" % got)
except socket.timeout:
    print("open")
except OSError as e:
    print("closed: %s" % e)
"#;

/// A TLS client that asks for server name `argv[3]` and gives up after 2 s
/// (the database does not speak TLS: only its ClientHello matters).
const TLS_CLIENT_PY: &str = r#"
import socket, ssl, sys
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
s = socket.create_connection((host, port), timeout=2)
tls = context.wrap_socket(s, server_hostname=name, do_handshake_on_connect=False)
try:
    tls.do_handshake()
    print("handshake done")
except (OSError, ssl.SSLError) as e:
    print("no handshake: %s" % e)
"#;

impl Lab {
    /// A TLS ClientHello for `name` from `pod` to `host:port`.
    fn tls_hello(&self, pod: &str, host: &str, port: u16, name: &str) -> String {
        let topo = self.mesh.topo();
        let script = write_script(topo, "tls_client.py", TLS_CLIENT_PY).unwrap();
        let port = port.to_string();
        let cmd = [python3(), &*script.to_string_lossy(), host, &port, name];
        topo.run_in_ok(&topo.pod(pod).netns, &cmd).unwrap()
    }

    /// One HTTP request from `pod`; the reply with its status (0: failed).
    fn http(&self, pod: &str, method: &str, url: &str, args: &[&str]) -> Reply {
        let mut all = vec!["-X", method];
        all.extend_from_slice(args);
        self.mesh.get_one(pod, url, &all).unwrap()
    }

    /// A TCP session from `pod` to `host:port` sending `line`.
    fn tcp(&self, pod: &str, host: &str, port: u16, line: &str) -> String {
        let session = self.tcp_session(pod, host, port, line, 2);
        let out = session.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// [`Lab::tcp`] left running, open for up to `wait` seconds.
    fn tcp_session(&self, pod: &str, host: &str, port: u16, line: &str, wait: u32) -> Child {
        let topo = self.mesh.topo();
        let script = write_script(topo, "tcp_client.py", TCP_CLIENT_PY).unwrap();
        let (port, wait) = (port.to_string(), wait.to_string());
        let cmd = [
            python3(),
            &*script.to_string_lossy(),
            host,
            &port,
            line,
            &wait,
        ];
        let mut command = topo.command_in(&topo.pod(pod).netns, &cmd).unwrap();
        command.stdout(Stdio::piped()).spawn().unwrap()
    }

    /// Whether the db ever got `line`.
    fn db_got(&self, line: &str) -> bool {
        let recorded = recorded_at(&self.db_log).unwrap();
        recorded
            .iter()
            .any(|bytes| String::from_utf8_lossy(bytes).contains(line))
    }

    /// `nodemesh explain` on the agent of `from`'s node: the authorization
    /// lines of the first destination (or of the opaque port).
    fn explain(&self, node: &str, from: &str, method: &str, url: &str) -> Vec<String> {
        let from = format!("default/{from}");
        let args = ["explain", "--from", &from, "-X", method, url, "-o", "json"];
        let out = self.mesh.agent(node).cli(&args).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        let lines = match answer["destinations"].get(0) {
            Some(destination) => &destination["authorization"],
            None => &answer["authorization"],
        };
        let lines: Vec<String> = lines
            .as_array()
            .unwrap_or_else(|| panic!("no authorization in {answer:#}"))
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(lines.len(), 1, "{answer:#}");
        lines
    }
}

/// What a TCP client saw of a connection closed before any answer.
fn assert_closed_unanswered(answer: &str, what: &str) {
    let closed = answer == "closed: b''" || answer.starts_with("closed: [Errno");
    assert!(closed, "{what}: {answer}");
}

/// A denied HTTP request: Envoy's status and body.
fn assert_denied(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 403, "{what}: {reply:?}");
    assert_eq!(reply.body, "RBAC: access denied", "{what}");
}

fn assert_served(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {reply:?}");
}

/// Every combination of caller, method, path and port on the three tiers,
/// each checked on the data path and against `nodemesh explain`.
#[test]
fn a_locked_down_three_tier_application_serves_exactly_its_allow_lists() {
    let lab = lab();
    lab.mesh.apply("lockdown.yaml", LOCKDOWN).unwrap();

    // (caller, its node, method, URL, allowed)
    let http_cases = [
        (CLIENT, "node-a", "GET", "http://web:9080/", true),
        ("api", "node-a", "GET", "http://web:9080/index", true),
        (CLIENT, "node-a", "POST", "http://web:9080/", false),
        (CLIENT, "node-a", "DELETE", "http://web:9080/", false),
        ("web", "node-b", "GET", "http://api:9080/api/items", true),
        ("web", "node-b", "POST", "http://api:9080/api/items", false),
        ("web", "node-b", "GET", "http://api:9080/admin", false),
        (
            "web",
            "node-b",
            "GET",
            "http://api:9080/api/../admin",
            false,
        ),
        (CLIENT, "node-a", "GET", "http://api:9080/api/items", false),
        ("db", "node-b", "GET", "http://api:9080/api/items", false),
    ];
    for (from, node, method, url, allowed) in http_cases {
        let what = format!("{method} {url} from {from}");
        let reply = lab.http(from, method, url, &["--path-as-is"]);
        let explained = lab.explain(node, from, method, url);
        if allowed {
            assert_served(&reply, &what);
            assert!(
                explained[0].starts_with("allowed by ALLOW policy"),
                "{what}: {explained:?}"
            );
        } else {
            assert_denied(&reply, &what);
            assert!(explained[0].starts_with("denied"), "{what}: {explained:?}");
        }
    }

    // gRPC callers get PERMISSION_DENIED rather than an HTTP error.
    let grpc = lab
        .mesh
        .grpc_many(CLIENT, "api:9080", "/shop.Api/List", 3, &[])
        .unwrap();
    assert_eq!(grpc.get("PERMISSION_DENIED"), Some(&3), "{grpc:?}");

    // TCP 5432 only from the API; the other port from no one. A denied
    // connection is closed before a byte reaches the database.
    let tcp_cases = [
        ("api", "node-a", "db", DB_PORT, true),
        ("web", "node-b", "db", DB_PORT, false),
        (CLIENT, "node-a", "db", DB_PORT, false),
    ];
    for (i, (from, node, host, port, allowed)) in tcp_cases.into_iter().enumerate() {
        let line = format!("SELECT {i} -- from {from}");
        let answer = lab.tcp(from, host, port, &line);
        let url = format!("http://{host}:{port}/");
        let explained = lab.explain(node, from, "GET", &url);
        if allowed {
            assert!(lab.db_got(&line), "{line}: {answer}");
            assert!(explained[0].starts_with("allowed"), "{line}: {explained:?}");
        } else {
            assert_closed_unanswered(&answer, &line);
            assert!(!lab.db_got(&line), "{line} reached the database");
            assert!(explained[0].starts_with("denied"), "{line}: {explained:?}");
        }
    }
    let db = lab.mesh.topo().pod("db").address.to_string();
    let line = "SELECT 9 -- from api, wrong port";
    let answer = lab.tcp("api", &db, DB_OTHER_PORT, line);
    assert_closed_unanswered(&answer, line);
    assert!(!lab.db_got(line));

    // Plaintext callers (PERMISSIVE lets them in) have no principal.
    let web = lab.mesh.topo().pod("web").address.to_string();
    let reply = lab.http("outsider", "GET", &format!("http://{web}:9080/"), &[]);
    assert_denied(&reply, "plaintext GET to web");
    let line = "SELECT 10 -- plaintext";
    let answer = lab.tcp("outsider", &db, DB_PORT, line);
    assert_closed_unanswered(&answer, line);
    assert!(!lab.db_got(line));

    // Every denial is logged with its policy, and counted.
    let log = lab.mesh.agent("node-b").log();
    assert!(
        log.contains("RBAC default/web: POST / from")
            && log.contains(
                "denied: no rule of ALLOW policy default/allow-nothing, default/web-viewer matches"
            ),
        "{log}"
    );
    let out = lab
        .mesh
        .agent("node-a")
        .cli(&["policies", "-o", "json"])
        .unwrap();
    let policies: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        policies["denials"]["total"].as_u64() >= Some(5),
        "{policies:#}"
    );
    let api = policies["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == "default/api")
        .unwrap();
    let names: Vec<&str> = api["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default/allow-nothing", "default/api-viewer"]);
    assert_eq!(api["inspectsHttp"], true);
}

/// DENY beats ALLOW, AUDIT decides nothing, and policies applied, removed
/// or rejected at runtime take effect for the next request.
#[test]
fn policies_change_at_runtime_deny_wins_and_bad_ones_change_nothing() {
    let lab = lab();
    let web = "http://web:9080/";
    assert_served(&lab.http(CLIENT, "GET", web, &[]), "no policy yet");

    // A database session of the web tier, open before the lockdown: the
    // lockdown lets only the API reach the database, so it is closed.
    let line = "SELECT 0 -- web, before the lockdown";
    let session = lab.tcp_session("web", "db", DB_PORT, line, 30);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.db_got(line) {
        assert!(
            Instant::now() < deadline,
            "the session never reached the database"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.mesh.apply("lockdown.yaml", LOCKDOWN).unwrap();
    let out = session.wait_with_output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("closed"),
        "still open after 30 s: {answer}"
    );
    let web_ip = lab.mesh.topo().pod("web").address;
    let closed = format!("default/db: connection from {web_ip} closed: RBAC: access denied");
    assert!(lab.mesh.agent("node-b").log().contains(&closed), "{closed}");
    assert_served(&lab.http(CLIENT, "GET", web, &[]), "GET allowed");
    let deny_private = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-private
  namespace: default
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["default"]
    to:
    - operation:
        paths: ["/private*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-web
  namespace: default
spec:
  selector:
    matchLabels:
      app: web
  action: AUDIT
  rules:
  - to:
    - operation:
        methods: ["GET"]
"#;
    lab.mesh.apply("deny.yaml", deny_private).unwrap();
    assert_denied(
        &lab.http(CLIENT, "GET", "http://web:9080/private/x", &[]),
        "DENY beats ALLOW",
    );
    assert_served(
        &lab.http(CLIENT, "GET", "http://web:9080/public", &[]),
        "AUDIT changes nothing",
    );
    let log = lab.mesh.agent("node-b").log();
    assert!(log.contains("AUDIT default/web: GET /public"), "{log}");
    assert!(
        log.contains("denied by DENY policy default/deny-private, rule 0"),
        "{log}"
    );

    // A policy that does not load changes nothing: the lockdown stays.
    let error = lab
        .mesh
        .reject(
            "bad.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: open-all, namespace: default}\nspec:\n  action: CUSTOM\n  \
             provider: {name: ext-authz}\n  rules: [{}]\n",
        )
        .unwrap();
    assert!(
        error.contains("AuthorizationPolicy default/open-all") && error.contains("spec.action"),
        "{error}"
    );
    assert_denied(
        &lab.http(CLIENT, "POST", web, &[]),
        "while a load is rejected",
    );
    lab.mesh.delete("bad.yaml").unwrap();

    // Removing the lockdown opens the namespace again at the next request.
    lab.mesh.delete("deny.yaml").unwrap();
    lab.mesh.delete("lockdown.yaml").unwrap();
    assert_served(&lab.http(CLIENT, "POST", web, &[]), "after removal");
    let line = "SELECT 1 -- open again";
    let answer = lab.tcp("web", "db", DB_PORT, line);
    assert!(lab.db_got(line), "{answer}");

    // `connection.sni`: the server name of the TLS the caller opens.
    let by_sni = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: db-by-sni
  namespace: default
spec:
  selector:
    matchLabels:
      app: db
  rules:
  - when:
    - key: connection.sni
      values: ["*.db.default.svc.cluster.local"]
"#;
    lab.mesh.apply("sni.yaml", by_sni).unwrap();
    let (good, bad) = ("primary.db.default.svc.cluster.local", "evil.example.com");
    let answer = lab.tls_hello("api", "db", DB_PORT, good);
    assert!(lab.db_got(good), "{answer}");
    let answer = lab.tls_hello("api", "db", DB_PORT, bad);
    assert!(
        !lab.db_got(bad),
        "a ClientHello for {bad} reached the database: {answer}"
    );
    let line = "SELECT 2 -- no TLS, no server name";
    let answer = lab.tcp("api", "db", DB_PORT, line);
    assert_closed_unanswered(&answer, line);
    assert!(!lab.db_got(line));
}
