//! A real OTLP/HTTP trace receiver in a node's namespace: `POST /v1/traces`
//! bodies are decoded with the official `opentelemetry-proto` classes
//! (`ExportTraceServiceRequest.FromString`, from PyPI, installed by `cargo
//! xtask setup` into [`VENV`]) and every span is written as one JSON line
//! for the test to read. A body that does not decode is answered 400 and
//! logged, so an encoding mistake fails the test.
//!
//! ```no_run
//! # use nodemesh_testbed::{otlp::Receiver, Topology};
//! # fn main() -> anyhow::Result<()> {
//! # let mut topo = Topology::new()?;
//! let netns = topo.node("node-a").netns.clone();
//! let receiver = Receiver::start(&mut topo, &netns)?;
//! let spans = receiver.spans()?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::topology::Topology;
use crate::workload_apps::{wait_listening, write_script};

/// The virtualenv `cargo xtask setup` makes, with `opentelemetry-proto`.
pub const VENV: &str = "/opt/nodemesh-testbed/otlp-venv";
/// OTLP/HTTP's port.
pub const PORT: u16 = 4318;
/// How long [`Receiver::wait_for`] waits.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

const RECEIVER_PY: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

port, out = int(sys.argv[1]), sys.argv[2]
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}

def value(any_value):
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body=b"", kind="application/x-protobuf"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            sys.stderr.write("refused %s %s\n" % (self.path, self.headers.get("Content-Type")))
            return self.answer(415, b"want application/x-protobuf on /v1/traces", "text/plain")
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except Exception as e:
            sys.stderr.write("undecodable body (%s): %s\n" % (e, body.hex()))
            return self.answer(400, str(e).encode(), "text/plain")
        lines = []
        for rs in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({
                        "resource": resource,
                        "scope": ss.scope.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "trace_state": s.trace_state,
                        "name": s.name,
                        "kind": KINDS.get(s.kind, str(s.kind)),
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status": s.status.code,
                        "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                    }))
        with open(out, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        self.answer(200, ExportTraceServiceResponse().SerializeToString())

    def log_message(self, fmt, *a):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

Server(("0.0.0.0", port), Handler).serve_forever()
"#;

/// See the module documentation.
pub struct Receiver {
    pid: u32,
    spans: PathBuf,
}

impl Receiver {
    /// Starts the receiver on `0.0.0.0:`[`PORT`] in `netns` and waits until
    /// it listens. It stops with the topology.
    pub fn start(topo: &mut Topology, netns: &str) -> Result<Receiver> {
        let python = format!("{VENV}/bin/python3");
        if !std::path::Path::new(&python).exists() {
            anyhow::bail!("{python} is missing: run `cargo xtask setup`");
        }
        let script = write_script(topo, "otlp_receiver.py", RECEIVER_PY)?;
        let spans = topo.work_dir().join("spans.jsonl");
        std::fs::write(&spans, "")?;
        let args = [
            python,
            script.display().to_string(),
            PORT.to_string(),
            spans.display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = topo
            .spawn_in(netns, &args, "otlp-receiver")
            .context("starting the OTLP receiver")?;
        wait_listening(topo, netns, PORT)?;
        Ok(Receiver { pid, spans })
    }

    /// Stops the receiver: exports then fail (connection refused).
    pub fn stop(&self, topo: &mut Topology) -> Result<()> {
        topo.stop_process(self.pid)?;
        Ok(())
    }

    /// Every span received so far.
    pub fn spans(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.spans)?;
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("span line {l}")))
            .collect()
    }

    /// Polls until `done` holds for the spans received (for
    /// [`WAIT_TIMEOUT`]); returns them either way, for the test to assert.
    pub fn wait_for(&self, done: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let spans = self.spans()?;
            if done(&spans) || Instant::now() > deadline {
                return Ok(spans);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
