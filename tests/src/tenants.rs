//! Two tenants sharing one node's proxy: an attacker and a victim, for the
//! hardening tests. Every attack runs while the victim keeps calling a
//! Service through the same agents, and the test then checks that the
//! victim saw no error and that the agents' memory and descriptors came back
//! to where they were before the attack.
//!
//! ```no_run
//! # use nodemesh_testbed::tenants::Lab;
//! # fn main() -> anyhow::Result<()> {
//! let lab = Lab::new("target/release/mesh-app".as_ref(), &[])?;
//! let before = lab.usage("node-a")?;
//! let victim = lab.victim_traffic()?;
//! lab.attack(r#"import socket; ..."#, &[])?;
//! victim.stop()?.assert_clean();
//! lab.assert_usage_returns("node-a", &before)?;
//! # Ok(()) }
//! ```
//!
//! Layout: node-a runs the pods `victim` and `attacker`; node-b runs `web`
//! (`mesh-app`, Service `web` on 9080 with its port named `http`, so it is
//! routed at L7) and `echo` (a TCP echo, Service `echo` on 7000 with its port
//! named `tcp-echo`, so it is relayed as opaque TCP). All pods are in the
//! mesh namespace [`NAMESPACE`](crate::mesh::NAMESPACE). node-b also runs
//! `recorder`, an HTTP/1.1 server that keeps every byte each connection
//! brought it ([`Lab::recorded`]), to show what an attack let through: its
//! Service `recorder` has port 8080 named `http` (declared) and port 8081
//! named `plain` (undeclared, so detected), both to the server's 8080.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::agent::proc_status_kb;
use crate::config::ServicePort;
use crate::mesh::Mesh;
use crate::workload_apps::{python3, start_tcp_echo, wait_listening, write_script};

/// The Service the victim calls, routed at L7.
pub const WEB_URL: &str = "http://web:9080/";
/// The opaque TCP Service (a TCP echo).
pub const ECHO_HOST: &str = "echo";
pub const ECHO_PORT: u16 = 7000;
/// The recorder's port, declared `http` in its Service.
pub const RECORDER_PORT: u16 = 8080;
/// The recorder's Service port with no declared protocol.
pub const RECORDER_UNDECLARED_PORT: u16 = 8081;

/// Descriptors an agent may hold above its level before the attack once it
/// is over: the victim's connection in flight and pooled upstream
/// connections come and go.
pub const FD_SLACK: u64 = 24;
/// Memory an agent may hold above its level before the attack once it is
/// over (allocator caches, grown tables of the victim's own traffic). The
/// largest attack, a 150 000-namespace config loaded and removed, leaves
/// 3–5 MB held (12–13 MB before the agent capped malloc's arenas and fixed
/// its mmap threshold): what an attack may not do is grow it without bound.
pub const RSS_SLACK_KB: u64 = 8 * 1024;
/// How long resources get to come back after an attack.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);

/// See the module documentation.
pub struct Lab {
    mesh: Mesh,
    recorder_log: PathBuf,
}

impl Lab {
    /// Builds the two nodes and their pods, and starts both agents with
    /// `agent_flags`.
    pub fn new(app_bin: &Path, agent_flags: &[&str]) -> Result<Lab> {
        let mut mesh = Mesh::new(app_bin)?;
        mesh.pod("node-a", "victim", &[("app", "victim")])?;
        mesh.pod("node-a", "attacker", &[("app", "attacker")])?;
        mesh.app("node-b", "web", &[("app", "web")], &[])?;
        mesh.http_service("web");
        let echo = mesh.pod("node-b", "echo", &[("app", "echo")])?;
        start_tcp_echo(mesh.topo_mut(), &echo, ECHO_PORT)?;
        mesh.service(
            "echo",
            &[ServicePort {
                name: "tcp-echo",
                port: ECHO_PORT,
                target_port: ECHO_PORT,
            }],
        );
        let recorder = mesh.pod("node-b", "recorder", &[("app", "recorder")])?;
        let log = mesh.topo().work_dir().join("recorder.jsonl");
        let script = write_script(mesh.topo(), "recorder.py", RECORDER_PY)?;
        let port = RECORDER_PORT.to_string();
        let cmd = [
            python3(),
            &*script.to_string_lossy(),
            &port,
            &*log.to_string_lossy(),
        ];
        mesh.topo_mut()
            .spawn_in(&recorder.netns, &cmd, "recorder")?;
        wait_listening(mesh.topo(), &recorder.netns, RECORDER_PORT)?;
        mesh.service(
            "recorder",
            &[
                ServicePort {
                    name: "http",
                    port: RECORDER_PORT,
                    target_port: RECORDER_PORT,
                },
                ServicePort {
                    name: "plain",
                    port: RECORDER_UNDECLARED_PORT,
                    target_port: RECORDER_PORT,
                },
            ],
        );
        mesh.start(agent_flags)?;
        Ok(Lab {
            mesh,
            recorder_log: log,
        })
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn mesh_mut(&mut self) -> &mut Mesh {
        &mut self.mesh
    }

    /// Starts the victim's steady traffic: a GET of [`WEB_URL`] every
    /// 50 ms, each on a new connection (so it needs the agent to accept, to
    /// find a descriptor and an endpoint connection every time), until
    /// [`VictimTraffic::stop`] (and [`MIN_VICTIM_REQUESTS`] at least).
    pub fn victim_traffic(&self) -> Result<VictimTraffic> {
        let topo = self.mesh.topo();
        let script = write_script(topo, "victim.py", VICTIM_PY)?;
        let stop_file = topo.work_dir().join(format!("victim-stop-{}", unique()));
        let report = topo
            .work_dir()
            .join(format!("victim-report-{}.json", unique()));
        let least = MIN_VICTIM_REQUESTS.to_string();
        let args = [
            python3(),
            &*script.to_string_lossy(),
            WEB_URL,
            &*stop_file.to_string_lossy(),
            &*report.to_string_lossy(),
            &least,
        ];
        let netns = &topo.pod("victim").netns;
        let child = topo
            .command_in(netns, &args)?
            .spawn()
            .context("starting the victim's traffic")?;
        let traffic = VictimTraffic {
            child,
            stop_file,
            report,
        };
        traffic.wait_started()?;
        Ok(traffic)
    }

    /// Runs a Python attack script inside the attacker pod and waits for it;
    /// fails if it exits non-zero. Returns its stdout.
    pub fn attack(&self, script: &str, args: &[&str]) -> Result<String> {
        let topo = self.mesh.topo();
        let path = topo.work_dir().join(format!("attack-{}.py", unique()));
        fs::write(&path, script)?;
        let path = path.to_string_lossy().into_owned();
        let mut cmd = vec![python3(), path.as_str()];
        cmd.extend_from_slice(args);
        topo.run_in_ok(&topo.pod("attacker").netns, &cmd)
            .context("the attack script failed")
    }

    /// Every connection that reached the recorder: the bytes it brought so
    /// far, in order.
    pub fn recorded(&self) -> Result<Vec<Vec<u8>>> {
        recorded_at(&self.recorder_log)
    }

    /// What `node`'s agent holds now.
    pub fn usage(&self, node: &str) -> Result<Usage> {
        let pid = self
            .mesh
            .agent(node)
            .pid()
            .with_context(|| format!("the agent of {node} is not running"))?;
        Usage::of(pid)
    }

    /// Waits until `node`'s agent is back within [`FD_SLACK`] descriptors and
    /// [`RSS_SLACK_KB`] of memory of `before`; fails with both figures if it
    /// is not within [`SETTLE_TIMEOUT`].
    pub fn assert_usage_returns(&self, node: &str, before: &Usage) -> Result<Usage> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let now = self.usage(node)?;
            if now.fds <= before.fds + FD_SLACK && now.rss_kb <= before.rss_kb + RSS_SLACK_KB {
                return Ok(now);
            }
            if Instant::now() > deadline {
                bail!(
                    "{node}'s agent did not return to its level before the attack: \
                     before {before:?}, now {now:?} (allowed +{FD_SLACK} fds, +{RSS_SLACK_KB} kB)"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// An agent's resident memory and open descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rss_kb: u64,
    pub fds: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Result<Usage> {
        let rss_kb = proc_status_kb(pid, "VmRSS")?;
        let fds = fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?
            .count() as u64;
        Ok(Usage { rss_kb, fds })
    }
}

/// The victim's traffic, running in the background.
pub struct VictimTraffic {
    child: std::process::Child,
    stop_file: PathBuf,
    report: PathBuf,
}

/// What the victim saw.
#[derive(Debug)]
pub struct VictimReport {
    pub sent: u64,
    pub ok: u64,
    /// The first failures, with what went wrong.
    pub errors: Vec<String>,
    pub failed: u64,
}

/// The victim must have sent at least this many requests for a run to
/// count: the attack has to overlap real traffic.
const MIN_VICTIM_REQUESTS: u64 = 5;

impl VictimReport {
    /// No request failed, and enough were sent to mean something.
    pub fn assert_clean(&self) {
        assert!(
            self.failed == 0,
            "the victim saw {} failure(s) out of {} requests: {:?}",
            self.failed,
            self.sent,
            self.errors
        );
        assert!(
            self.sent >= MIN_VICTIM_REQUESTS,
            "the victim sent only {} requests during the attack",
            self.sent
        );
    }
}

impl VictimTraffic {
    /// Waits for the first successful request, so a broken setup is not
    /// mistaken for an attack's effect.
    fn wait_started(&self) -> Result<()> {
        let progress = self.stop_file.with_extension("started");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !progress.exists() {
            if Instant::now() > deadline {
                bail!("the victim's first request did not succeed within 15 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the traffic and returns what the victim saw.
    pub fn stop(mut self) -> Result<VictimReport> {
        fs::write(&self.stop_file, b"")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the victim's traffic exited with {status}");
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("the victim's traffic did not stop within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = fs::read_to_string(&self.report)
            .with_context(|| format!("reading {}", self.report.display()))?;
        let doc: Value =
            serde_json::from_str(&text).with_context(|| format!("victim report {text}"))?;
        let count = |key: &str| doc[key].as_u64().unwrap_or_default();
        Ok(VictimReport {
            sent: count("sent"),
            ok: count("ok"),
            failed: count("failed"),
            errors: doc["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect(),
        })
    }
}

impl Drop for VictimTraffic {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop_file, b"");
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// GET URL every 50 ms on a new connection until STOP_FILE exists (and at
/// least MIN requests were sent, so that a quick attack still overlaps
/// them); writes `STOP_FILE.started` after the first success and the report
/// as JSON.
const VICTIM_PY: &str = r#"
import http.client, json, os, sys, time, urllib.parse
url, stop_file, report, least = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
u = urllib.parse.urlsplit(url)
sent = ok = failed = 0
errors = []
started = False
while sent < least or not os.path.exists(stop_file):
    sent += 1
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=5)
        conn.request("GET", u.path or "/")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            raise Exception("status %d: %r" % (resp.status, body[:200]))
        ok += 1
        if not started:
            open(os.path.splitext(stop_file)[0] + ".started", "w").close()
            started = True
    except Exception as e:
        failed += 1
        if len(errors) < 20:
            errors.append("%.3f %s: %s" % (time.time(), type(e).__name__, e))
    time.sleep(0.05)
with open(report, "w") as f:
    json.dump({"sent": sent, "ok": ok, "failed": failed, "errors": errors}, f)
"#;

/// An HTTP/1.1 server that answers `200 ok` to every complete request (or
/// `101` to one that asks for an upgrade, then echoes) and logs every read
/// at once (one JSON line per read: the connection's number
/// and the bytes as a Latin-1 string).
/// An HTTP/1.1 server that logs every byte each connection brings it:
/// `recorder.py PORT LOG` (read the log with [`recorded_at`]).
pub const RECORDER_PY: &str = r#"
import json, socket, sys, threading
port, log = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()

def complete(buf):
    """Length of the first complete request in buf, or None."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    head = buf[:i].decode("latin1").lower()
    body = i + 4
    if "transfer-encoding: chunked" in head:
        if buf[body:].startswith(b"0\r\n\r\n"):
            return body + 5
        j = buf.find(b"\r\n0\r\n\r\n", body)
        return None if j < 0 else j + 7
    n = 0
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            n = int(line.split(":", 1)[1])
    return body + n if len(buf) >= body + n else None

def record(conn_id, data):
    with lock, open(log, "a") as f:
        f.write(json.dumps({"conn": conn_id, "bytes": data.decode("latin1")}) + "\n")

def echo(conn, conn_id, data):
    """After an upgrade: echo every byte back, `data` first."""
    while True:
        if data:
            conn.sendall(data)
        data = conn.recv(65536)
        if not data:
            return
        record(conn_id, data)

def serve(conn, conn_id):
    pending = b""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            record(conn_id, data)
            pending += data
            while True:
                n = complete(pending)
                if n is None:
                    break
                request, pending = pending[:n], pending[n:]
                if b"\r\nupgrade:" in request.lower():
                    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
                    echo(conn, conn_id, pending)
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except OSError:
        pass
    finally:
        conn.close()

server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", port))
server.listen(1024)
print("recorder listening on %d" % port, flush=True)
conn_id = 0
while True:
    conn, _ = server.accept()
    conn_id += 1
    threading.Thread(target=serve, args=(conn, conn_id), daemon=True).start()
"#;

/// Every connection that reached a [`RECORDER_PY`] server logging to
/// `log`: the bytes it brought so far, in order.
pub fn recorded_at(log: &Path) -> Result<Vec<Vec<u8>>> {
    let text = match fs::read_to_string(log) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("reading the recorder's log"),
    };
    let mut connections: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for line in text.lines() {
        let doc: Value = serde_json::from_str(line)?;
        let (Some(id), Some(bytes)) = (doc["conn"].as_u64(), doc["bytes"].as_str()) else {
            bail!("unexpected line in the recorder's log: {line}");
        };
        // Latin-1: one char per byte.
        let connection = connections.entry(id).or_default();
        connection.extend(bytes.chars().map(|c| c as u32 as u8));
    }
    Ok(connections.into_values().collect())
}
