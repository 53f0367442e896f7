//! Small real servers and clients run inside pods: an HTTP/1.1 echo server
//! and a TCP echo server (Python's standard library only) and curl.
//!
//! Functions that take a pod accept its name (`"web"`) or its [`PodInfo`].
//!
//! The HTTP echo server answers every request with `200` and the JSON body
//! `{"server": NAME, "client": "<peer ip>:<peer port>"}`, with
//! `Content-Length` and keep-alive. Extras for later tests:
//! * `GET /status/<code>` answers with that status code (same body);
//! * `GET /delay/<ms>` waits that long before answering;
//! * `--echo-headers` adds `method`, `path` and `headers` (lower-cased names)
//!   to the body;
//! * `--body-size N` pads the body with a `"pad"` field to N bytes;
//! * `--verbose` logs every request to stderr (off by default: it is slow).

use crate::topology::{PodInfo, Topology};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// How long [`wait_listening`] waits.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP echo server (see the module documentation).
pub const HTTP_ECHO_PY: &str = r#"
import argparse, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser(description="nodemesh test HTTP echo server")
p.add_argument("--port", type=int, default=8080)
p.add_argument("--name", default="echo")
p.add_argument("--bind", default="0.0.0.0")
p.add_argument("--body-size", type=int, default=0)
p.add_argument("--echo-headers", action="store_true")
p.add_argument("--verbose", action="store_true")
p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
p.add_argument("--tls-key", help="and this key (PEM)")
args = p.parse_args()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nodemesh-echo"
    sys_version = ""

    def reply(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)
        status = 200
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) >= 2 and parts[1].isdigit():
            if parts[0] == "status" and 100 <= int(parts[1]) <= 599:
                status = int(parts[1])
            elif parts[0] == "delay":
                time.sleep(int(parts[1]) / 1000.0)
        doc = {"server": args.name, "client": "%s:%d" % tuple(self.client_address[:2])}
        if args.echo_headers:
            doc["method"] = self.command
            doc["path"] = self.path
            doc["headers"] = {k.lower(): v for k, v in self.headers.items()}
        body = json.dumps(doc).encode()
        if args.body_size > len(body):
            pad = args.body_size - len(body) - len(', "pad": ""')
            if pad >= 0:
                doc["pad"] = "x" * pad
                body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        else:
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = reply

    def log_message(self, fmt, *a):
        if args.verbose:
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % a))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


server = Server((args.bind, args.port), Handler)
if args.tls_cert:
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.tls_cert, args.tls_key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
print("http echo %s listening on %s:%d" % (args.name, args.bind, args.port), flush=True)
server.serve_forever()
"#;

/// The TCP echo server: echoes every byte back, one thread per connection.
/// Argument: the port.
pub const TCP_ECHO_PY: &str = r#"
import socketserver, sys
class H(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65536)
            if not d:
                break
            self.request.sendall(d)
class S(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
s = S(("0.0.0.0", int(sys.argv[1])), H)
print("tcp echo listening on port %s" % sys.argv[1], flush=True)
s.serve_forever()
"#;

/// Something that names a pod: its name or its [`PodInfo`].
pub trait PodRef {
    /// The pod's name in the topology.
    fn pod_name(&self) -> &str;
}

impl PodRef for str {
    fn pod_name(&self) -> &str {
        self
    }
}

impl PodRef for String {
    fn pod_name(&self) -> &str {
        self
    }
}

impl PodRef for PodInfo {
    fn pod_name(&self) -> &str {
        &self.name
    }
}

/// The Python interpreter: Debian's `/usr/bin/python3` when present (no
/// version-manager shims), else `python3` from PATH.
pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Writes a script into the work dir (once) and returns its path.
pub fn write_script(topo: &Topology, file: &str, text: &str) -> Result<PathBuf> {
    let path = topo.work_dir().join(file);
    if !path.exists() {
        crate::config::write_raw(topo.work_dir(), file, text)?;
    }
    Ok(path)
}

/// Writes the TCP echo script into the work dir (once) and returns its path.
pub fn tcp_echo_script(topo: &Topology) -> Result<PathBuf> {
    write_script(topo, "tcp_echo.py", TCP_ECHO_PY)
}

/// Writes the HTTP echo script into the work dir (once) and returns its path.
pub fn http_echo_script(topo: &Topology) -> Result<PathBuf> {
    write_script(topo, "http_echo.py", HTTP_ECHO_PY)
}

/// Starts the HTTP echo server named `name` in `pod` on `port` and waits
/// until it listens; returns its pid (stopped when the topology drops, or
/// earlier with [`Topology::stop_process`]).
pub fn start_http_echo<P: PodRef + ?Sized>(
    topo: &mut Topology,
    pod: &P,
    port: u16,
    name: &str,
) -> Result<u32> {
    start_http_echo_with(topo, pod, port, name, &[])
}

/// Like [`start_http_echo`] with extra script arguments, e.g.
/// `["--echo-headers"]` or `["--body-size", "1024"]`.
pub fn start_http_echo_with<P: PodRef + ?Sized>(
    topo: &mut Topology,
    pod: &P,
    port: u16,
    name: &str,
    extra_args: &[&str],
) -> Result<u32> {
    let netns = topo.pod(pod.pod_name()).netns.clone();
    let script = http_echo_script(topo)?;
    let script = script.to_string_lossy().into_owned();
    let port_s = port.to_string();
    let mut cmd = vec![python3(), &script, "--port", &port_s, "--name", name];
    cmd.extend_from_slice(extra_args);
    let log = format!("http-echo-{}-{port}", pod.pod_name());
    let pid = topo.spawn_in(&netns, &cmd, &log)?;
    wait_listening_pid(topo, &netns, port, Some(pid))?;
    Ok(pid)
}

/// Starts the TCP echo server in `pod` on `port` and waits until it listens;
/// returns its pid.
pub fn start_tcp_echo<P: PodRef + ?Sized>(topo: &mut Topology, pod: &P, port: u16) -> Result<u32> {
    let netns = topo.pod(pod.pod_name()).netns.clone();
    let port_s = port.to_string();
    let log = format!("tcp-echo-{}-{port}", pod.pod_name());
    let script = tcp_echo_script(topo)?;
    let script = script.to_string_lossy().into_owned();
    let pid = topo.spawn_in(&netns, &[python3(), &script, &port_s], &log)?;
    wait_listening_pid(topo, &netns, port, Some(pid))?;
    Ok(pid)
}

/// True if a TCP socket listens on `port` inside `netns` (`ss -Hltn`).
pub fn is_listening(topo: &Topology, netns: &str, port: u16) -> Result<bool> {
    let out = topo.run_in_ok(netns, &["ss", "-Hltn"])?;
    let suffix = format!(":{port}");
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .any(|local| local.ends_with(&suffix)))
}

/// Polls until a TCP socket listens on `port` inside `netns` (a full
/// namespace name), for at most 10 s.
pub fn wait_listening(topo: &Topology, netns: &str, port: u16) -> Result<()> {
    wait_listening_pid(topo, netns, port, None)
}

fn wait_listening_pid(topo: &Topology, netns: &str, port: u16, pid: Option<u32>) -> Result<()> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        if is_listening(topo, netns, port)? {
            return Ok(());
        }
        let exited = pid.is_some_and(|pid| !topo.is_running(pid));
        if exited || Instant::now() >= deadline {
            bail!(
                "nothing listens on port {port} in {netns}{}{}",
                if exited {
                    ": the server exited"
                } else {
                    " after 10 s"
                },
                topo.exited_in(netns)
                    .map(|m| format!("\n{m}"))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `curl --max-time 5 -sS -w '\n%{http_code}' <extra_args> <url>`
/// inside `pod` (through `ip netns exec`, so the pod's resolv.conf applies)
/// and returns its raw output, whatever the exit status.
pub fn curl_raw<P: PodRef + ?Sized>(
    topo: &Topology,
    pod: &P,
    url: &str,
    extra_args: &[&str],
) -> Result<Output> {
    let netns = &topo.pod(pod.pod_name()).netns;
    let mut cmd = vec!["curl", "--max-time", "5", "-sS", "-w", "\n%{http_code}"];
    cmd.extend_from_slice(extra_args);
    cmd.push(url);
    topo.run_in(netns, &cmd)
}

/// Like [`curl_raw`], returning `(status, body)`; a curl failure
/// (connection refused, timeout, …) is an error carrying curl's message.
pub fn curl<P: PodRef + ?Sized>(
    topo: &Topology,
    pod: &P,
    url: &str,
    extra_args: &[&str],
) -> Result<(u16, String)> {
    let out = curl_raw(topo, pod, url, extra_args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "curl {url} from pod {} failed ({}): {}",
            pod.pod_name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status = code
        .trim()
        .parse::<u16>()
        .with_context(|| format!("curl {url}: cannot parse status from {stdout:?}"))?;
    Ok((status, body.to_string()))
}

/// One answer of [`curl_many`]: status `0` when the transfer failed
/// (refused, reset, timed out).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// curl's `time_total`.
    pub seconds: f64,
    /// The answer says `x-envoy-overloaded: true`: the mesh shed it.
    pub overloaded: bool,
    pub body: String,
}

impl Reply {
    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// The `version` of the `mesh-app` that answered, else `status <code>`.
    pub fn version(&self) -> String {
        match self.json() {
            Some(doc) if doc["version"].is_string() => doc["version"].as_str().unwrap().into(),
            _ => format!("status {}", self.status),
        }
    }
}

/// Marks the end of each transfer in curl's output.
const REPLY_END: &str = "\n@@%{http_code} %{time_total} %header{x-envoy-overloaded}@@\n";

/// Requests every URL in `urls` with one curl process inside `pod`
/// (`--max-time 10` per transfer, keep-alive between them). With `-Z`
/// (parallel transfers) pass `-o /dev/null` once per URL too: curl may
/// write several bodies before their ends.
pub fn curl_many<P: PodRef + ?Sized, S: AsRef<str>>(
    topo: &Topology,
    pod: &P,
    urls: &[S],
    extra_args: &[&str],
) -> Result<Vec<Reply>> {
    let netns = &topo.pod(pod.pod_name()).netns;
    curl_many_in(topo, netns, urls, extra_args)
}

/// [`curl_many`] from any network namespace of the topology (a host
/// outside the mesh, for instance).
pub fn curl_many_in<S: AsRef<str>>(
    topo: &Topology,
    netns: &str,
    urls: &[S],
    extra_args: &[&str],
) -> Result<Vec<Reply>> {
    let mut cmd = vec!["curl", "--max-time", "10", "-sS", "-w", REPLY_END];
    cmd.extend_from_slice(extra_args);
    cmd.extend(urls.iter().map(AsRef::as_ref));
    let out = topo.run_in(netns, &cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<Reply> = stdout
        .split_terminator("@@\n")
        .map(|chunk| {
            let (body, end) = chunk.rsplit_once("\n@@").unwrap_or(("", chunk));
            let mut fields = end.split(' ');
            Reply {
                status: fields.next().and_then(|f| f.parse().ok()).unwrap_or(0),
                seconds: fields.next().and_then(|f| f.parse().ok()).unwrap_or(0.0),
                overloaded: fields.next() == Some("true"),
                body: body.trim_end().to_owned(),
            }
        })
        .collect();
    if replies.len() != urls.len() {
        bail!(
            "curl in {netns} printed {} replies for {} URLs ({}): {}",
            replies.len(),
            urls.len(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(replies)
}
