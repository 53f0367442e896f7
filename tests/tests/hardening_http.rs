//! Attacks on the shared proxy's HTTP path from a tenant's pod, each while
//! another tenant keeps calling a Service through the same agents: requests
//! crafted to skip L7 policy, connections that never finish their request,
//! HTTP/2 streams held open by a zero window, and uploads cut short. Each
//! test checks that the attack is refused or bounded, that the victim saw no
//! error, and that the agents' memory and descriptors come back.

use std::path::Path;
use std::time::Duration;

use nodemesh_testbed::tenants::{Lab, Usage, RECORDER_PORT, RECORDER_UNDECLARED_PORT};
use serde_json::Value;

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

/// `/admin` is closed by a VirtualService; everything else is routed with a
/// response header that shows the route ran.
const RECORDER_ROUTES: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: recorder
  namespace: default
spec:
  hosts: [recorder]
  http:
  - match:
    - uri: {prefix: /admin}
    directResponse:
      status: 403
      body: {string: admin is closed}
  - route:
    - destination: {host: recorder}
    headers:
      response:
        set: {x-mesh-route: checked}
";

/// Python used by every attack: connect to a Service by name through the
/// mesh and read whatever comes back.
const ATTACK_LIB: &str = r#"
import json, socket, sys, time

def connect(host, port):
    s = socket.create_connection((host, port), timeout=10)
    return s

def read_all(s, limit=10.0):
    """Everything the proxy sends until it closes, or until `limit`."""
    s.settimeout(limit)
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except socket.timeout:
        out += b"<timeout>"
    except OSError as e:
        out += ("<%s>" % type(e).__name__).encode()
    return out.decode("latin1")

def reset(s):
    """Close with a TCP reset (SO_LINGER 0)."""
    import struct
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
"#;

fn script(body: &str) -> String {
    format!("{ATTACK_LIB}\n{body}")
}

fn attack_json(lab: &Lab, body: &str, args: &[&str]) -> Value {
    let out = lab.attack(&script(body), args).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("attack printed {out:?}: {e}"))
}

/// Settled usage of both agents, with the victim's traffic running.
fn usage(lab: &Lab) -> [Usage; 2] {
    std::thread::sleep(Duration::from_millis(500));
    [lab.usage("node-a").unwrap(), lab.usage("node-b").unwrap()]
}

fn assert_usage_returns(lab: &Lab, before: &[Usage; 2]) {
    lab.assert_usage_returns("node-a", &before[0]).unwrap();
    lab.assert_usage_returns("node-b", &before[1]).unwrap();
}

/// Recorded connections that contain `needle`.
fn recorded_with(lab: &Lab, needle: &[u8]) -> Vec<Vec<u8>> {
    lab.recorded()
        .unwrap()
        .into_iter()
        .filter(|c| c.windows(needle.len()).any(|w| w == needle))
        .collect()
}

#[test]
fn requests_that_do_not_parse_never_skip_l7_policy() {
    let lab = Lab::new(app_bin(), &[]).unwrap();
    lab.mesh()
        .apply("recorder-routes.yaml", RECORDER_ROUTES)
        .unwrap();
    let before = usage(&lab);
    let victim = lab.victim_traffic().unwrap();
    let attacks = r#"
HOST = "Host: recorder\r\nConnection: close\r\n\r\n"
attacks = {
    "leading_empty_line": [b"\r\nGET /admin HTTP/1.1\r\n" + HOST.encode()],
    "lowercase_method": [b"get /admin HTTP/1.1\r\n" + HOST.encode()],
    "nul_in_method": [b"G\x00ET /admin HTTP/1.1\r\n" + HOST.encode()],
    "method_sent_slowly": [b"ge", 1.5, b"t /admin HTTP/1.1\r\n" + HOST.encode()],
    "tls_on_http": [b"\x16\x03\x01\x00\x05hello"],
    "control": [b"GET /ok HTTP/1.1\r\n" + HOST.encode()],
}
results = {}
for port in sys.argv[1:]:
    for name, parts in attacks.items():
        s = connect("recorder", int(port))
        for part in parts:
            if isinstance(part, float):
                time.sleep(part)
            else:
                s.sendall(part)
        results["%s/%s" % (port, name)] = read_all(s)
        s.close()
print(json.dumps(results))
"#;
    let declared = RECORDER_PORT.to_string();
    let undeclared = RECORDER_UNDECLARED_PORT.to_string();
    let results = attack_json(&lab, attacks, &[&declared, &undeclared]);
    victim.stop().unwrap().assert_clean();

    for port in [&declared, &undeclared] {
        let answer = |name: &str| {
            results[format!("{port}/{name}")]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let closed = answer("leading_empty_line");
        assert!(
            closed.starts_with("HTTP/1.1 403") && closed.contains("admin is closed"),
            "port {port}: a leading empty line must not skip the route: {closed:?}"
        );
        for name in ["lowercase_method", "nul_in_method", "method_sent_slowly"] {
            let reply = answer(name);
            assert!(
                reply.starts_with("HTTP/1.1 400"),
                "port {port}: {name} must get 400: {reply:?}"
            );
        }
        let control = answer("control");
        assert!(
            control.starts_with("HTTP/1.1 200")
                && control
                    .to_ascii_lowercase()
                    .contains("x-mesh-route: checked"),
            "port {port}: a well-formed request is routed: {control:?}"
        );
    }
    // TLS on a declared HTTP port is refused by the HTTP parser; on an
    // undeclared port it is opaque TCP, as Istio treats it.
    let tls = results[format!("{declared}/tls_on_http")].as_str().unwrap();
    assert!(tls.starts_with("HTTP/1.1 400"), "{tls:?}");

    assert!(
        recorded_with(&lab, b"/admin").is_empty(),
        "an /admin request reached the server"
    );
    let routed: usize = recorded_with(&lab, b"GET /ok")
        .iter()
        .map(|c| c.windows(7).filter(|w| w == b"GET /ok").count())
        .sum();
    assert_eq!(
        routed, 2,
        "one well-formed request per port reaches the server"
    );
    assert_usage_returns(&lab, &before);
}

/// The outcome node-a recorded for each of the client connections from
/// `addresses`, once it has recorded all of them.
fn outcomes_of(lab: &Lab, addresses: &Value) -> Vec<String> {
    let addresses: Vec<&str> = addresses
        .as_array()
        .unwrap()
        .iter()
        .flat_map(Value::as_str)
        .collect();
    let agent = lab.mesh().agent("node-a");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let records = agent.connections().unwrap();
        let mut outcomes = Vec::new();
        for address in &addresses {
            let of: Vec<&Value> = records.iter().filter(|c| c["source"] == *address).collect();
            // One source address, one connection: another record of the
            // same address would make its outcome ambiguous.
            assert!(of.len() <= 1, "several records of {address}: {of:#?}");
            outcomes.extend(
                of.first()
                    .map(|c| c["outcome"].as_str().unwrap_or_default().to_owned()),
            );
        }
        if outcomes.len() == addresses.len() || std::time::Instant::now() > deadline {
            assert_eq!(outcomes.len(), addresses.len(), "records of {addresses:?}");
            return outcomes;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn connections_that_never_finish_a_request_are_closed() {
    let lab = Lab::new(
        app_bin(),
        &[
            "--http-header-read-timeout",
            "2s",
            "--http-idle-timeout",
            "3s",
        ],
    )
    .unwrap();
    let before = usage(&lab);
    let victim = lab.victim_traffic().unwrap();
    let attack = r#"
import select
port = int(sys.argv[1])
H2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# GET / for recorder, in HPACK: :method GET, :scheme http, :path /, then
# :authority as a literal.
GET = b"\x82\x86\x84\x41\x08recorder"
H2_GET = len(GET).to_bytes(3, "big") + b"\x01\x05" + (1).to_bytes(4, "big") + GET
kinds = {"silent": [], "slowloris": [], "stalled_upload": [], "idle_h2": [], "idle_upgrade": [],
         "idle_keepalive": [], "idle_h2_answered": []}
for _ in range(10):
    s = connect("recorder", port)
    s.sendall(b"GET /ok HTTP/1.1\r\nHost: recorder\r\n\r\n")
    kinds["idle_keepalive"].append(s)
    s = connect("recorder", port)
    s.sendall(H2 + H2_GET)
    kinds["idle_h2_answered"].append(s)
for _ in range(30):
    kinds["silent"].append(connect("recorder", port))
    s = connect("recorder", port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: recorder\r\n")
    kinds["slowloris"].append(s)
for _ in range(20):
    s = connect("recorder", port)
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: recorder\r\nContent-Length: 1000\r\n\r\n0123456789")
    kinds["stalled_upload"].append(s)
    s = connect("recorder", port)
    s.sendall(H2)
    kinds["idle_h2"].append(s)
    s = connect("recorder", port)
    s.sendall(b"GET /chat HTTP/1.1\r\nHost: recorder\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
    reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 101"), reply
    s.sendall(b"ping\n")
    assert s.recv(64) == b"ping\n", "the upgraded connection is not spliced"
    kinds["idle_upgrade"].append(s)
addresses = {kind: ["%s:%d" % s.getsockname()[:2] for s in socks] for kind, socks in kinds.items()}
open_socks = {s: kind for kind, socks in kinds.items() for s in socks}
closed = {kind: 0 for kind in kinds}
deadline = time.time() + 60
last_trickle = 0
while open_socks and time.time() < deadline:
    if time.time() - last_trickle > 0.5:
        last_trickle = time.time()
        for s, kind in list(open_socks.items()):
            if kind == "slowloris":
                try:
                    s.send(b"X-Trickle: 1\r\n")
                except OSError:
                    pass
    ready, _, _ = select.select(list(open_socks), [], [], 0.2)
    for s in ready:
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            closed[open_socks.pop(s)] += 1
            s.close()
print(json.dumps({"closed": closed, "still_open": len(open_socks), "addresses": addresses}))
"#;
    let result = attack_json(&lab, attack, &[&RECORDER_PORT.to_string()]);
    victim.stop().unwrap().assert_clean();
    assert_eq!(result["still_open"], 0, "{result}");
    assert_eq!(result["closed"]["silent"], 30, "{result}");
    assert_eq!(result["closed"]["slowloris"], 30, "{result}");
    assert_eq!(result["closed"]["stalled_upload"], 20, "{result}");
    assert_eq!(result["closed"]["idle_h2"], 20, "{result}");
    assert_eq!(result["closed"]["idle_upgrade"], 20, "{result}");
    assert_eq!(result["closed"]["idle_keepalive"], 10, "{result}");
    assert_eq!(result["closed"]["idle_h2_answered"], 10, "{result}");
    // Closing a keep-alive connection idle between requests, or an HTTP/2
    // connection with no request open, lost nothing: the agent records it
    // as ended cleanly. An HTTP/1 connection that never sent a request, a
    // request head cut off, or an upload stalled is a failure.
    let outcomes = |kind: &str| outcomes_of(&lab, &result["addresses"][kind]);
    for kind in ["idle_keepalive", "idle_h2", "idle_h2_answered"] {
        let idle = outcomes(kind);
        assert!(idle.iter().all(|o| o == "ok"), "{kind}: {idle:?}");
    }
    let stalled = outcomes("stalled_upload");
    assert!(stalled.iter().all(|o| o != "ok"), "{stalled:?}");
    let silent = outcomes("silent");
    assert!(
        silent.iter().all(|o| o.starts_with("no request within")),
        "{silent:?}"
    );
    let slowloris = outcomes("slowloris");
    assert!(
        slowloris.iter().all(|o| o.contains("timeout")),
        "{slowloris:?}"
    );
    // The cut-short upload never reached the server as complete (on a
    // pooled connection, after other requests).
    let upload_head = b"POST /upload";
    for recorded in recorded_with(&lab, upload_head) {
        let at = recorded
            .windows(upload_head.len())
            .position(|w| w == upload_head);
        let upload = &recorded[at.unwrap_or_default()..];
        assert!(upload.len() < 1000, "{}", String::from_utf8_lossy(upload));
    }
    assert_usage_returns(&lab, &before);
}

#[test]
fn http2_streams_held_by_a_zero_window_are_bounded() {
    let lab = Lab::new(
        app_bin(),
        &[
            "--http2-max-concurrent-streams",
            "50",
            "--max-requests-per-workload",
            "300",
        ],
    )
    .unwrap();
    let before = usage(&lab);
    let victim = lab.victim_traffic().unwrap();
    let attack = r#"
port, conns, streams, hold = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

def get(stream, path):
    # :method GET, :scheme http, :path and :authority as literals.
    block = b"\x82\x86" + b"\x44" + bytes([len(path)]) + path + b"\x41" + bytes([8]) + b"recorder"
    return frame(1, 0x5, stream, block)

# SETTINGS_INITIAL_WINDOW_SIZE = 0: no response body can ever be sent.
settings = frame(4, 0, 0, (4).to_bytes(2, "big") + (0).to_bytes(4, "big"))
socks = []
for c in range(conns):
    s = connect("recorder", port)
    out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + frame(4, 1, 0)
    for i in range(streams):
        out += get(1 + 2 * i, b"/stall/%d/%d" % (c, i))
    s.sendall(out)
    socks.append(s)
time.sleep(hold)
for s in socks:
    reset(s)
print(json.dumps({"connections": len(socks)}))
"#;
    let (peak, most_in_flight) = std::thread::scope(|scope| {
        let attacker = scope.spawn(|| {
            attack_json(
                &lab,
                attack,
                &[&RECORDER_PORT.to_string(), "80", "100", "8"],
            )
        });
        let mut peak = before;
        let mut most_in_flight = 0;
        while !attacker.is_finished() {
            for (i, node) in ["node-a", "node-b"].iter().enumerate() {
                if let Ok(now) = lab.usage(node) {
                    peak[i].rss_kb = peak[i].rss_kb.max(now.rss_kb);
                    peak[i].fds = peak[i].fds.max(now.fds);
                }
            }
            if let Ok(status) = lab.mesh().agent("node-a").status_json() {
                let attacker = &status["limits"]["per_workload"]["default/attacker"];
                let in_flight = attacker["http_requests_in_flight"].as_u64().unwrap_or(0);
                most_in_flight = most_in_flight.max(in_flight);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        attacker.join().unwrap();
        (peak, most_in_flight)
    });
    // `nodemesh status` accounts the tenant's requests, up to its limit.
    assert!(
        (1..=300).contains(&most_in_flight),
        "the attacker had {most_in_flight} requests in flight by `nodemesh status`"
    );
    victim.stop().unwrap().assert_clean();
    eprintln!(
        "node-a before the attack {:?}, at its peak {:?}",
        before[0], peak[0]
    );
    // 8000 streams asked for (unbounded, about 9 kB each: 70 MB); at most
    // 300 are in flight for the tenant, so the agent's growth is bounded by
    // what 300 requests may hold.
    let grown_kb = peak[0].rss_kb.saturating_sub(before[0].rss_kb);
    assert!(
        grown_kb < 64 * 1024,
        "node-a grew by {grown_kb} kB under 8000 stalled streams (before {:?}, peak {:?})",
        before[0],
        peak[0]
    );
    let stalled = recorded_with(&lab, b"/stall/").len();
    assert!(
        stalled <= 300,
        "{stalled} stalled requests reached the server"
    );
    assert_usage_returns(&lab, &before);
}

#[test]
fn uploads_cut_short_never_reach_the_server_as_complete_or_twice() {
    let lab = Lab::new(app_bin(), &[]).unwrap();
    let before = usage(&lab);
    let victim = lab.victim_traffic().unwrap();
    let attack = r#"
port = int(sys.argv[1])
def head(path, extra):
    return ("POST %s HTTP/1.1\r\nHost: recorder\r\n%s\r\n" % (path, extra)).encode()
CHUNKED = "Transfer-Encoding: chunked\r\n"
results = {}

s = connect("recorder", port)
s.sendall(head("/chunked-reset", CHUNKED) + b"5\r\nhello\r\n")
time.sleep(0.5)
reset(s)

s = connect("recorder", port)
s.sendall(head("/chunked-half-close", CHUNKED) + b"5\r\nhello\r\n")
time.sleep(0.5)
s.shutdown(socket.SHUT_WR)
results["chunked-half-close"] = read_all(s)

s = connect("recorder", port)
s.sendall(head("/length-reset", "Content-Length: 100\r\n") + b"0123456789")
time.sleep(0.5)
reset(s)

for name, size in [("overflow", b"ffffffffffffffffffffffff"), ("negative", b"-5")]:
    s = connect("recorder", port)
    s.sendall(head("/chunk-" + name, CHUNKED) + size + b"\r\nhello\r\n0\r\n\r\n")
    results["chunk-" + name] = read_all(s)
    s.close()
time.sleep(1)
print(json.dumps(results))
"#;
    let results = attack_json(&lab, attack, &[&RECORDER_PORT.to_string()]);
    victim.stop().unwrap().assert_clean();

    let half_closed = results["chunked-half-close"].as_str().unwrap();
    assert!(
        !half_closed.starts_with("HTTP/1.1 200"),
        "a body cut short by a half-close got 200: {half_closed:?}"
    );
    for name in ["chunk-overflow", "chunk-negative"] {
        let reply = results[name].as_str().unwrap();
        assert!(reply.starts_with("HTTP/1.1 400"), "{name}: {reply:?}");
    }
    for path in [
        "/chunked-reset",
        "/chunked-half-close",
        "/length-reset",
        "/chunk-overflow",
        "/chunk-negative",
    ] {
        let seen = recorded_with(&lab, path.as_bytes());
        assert!(
            seen.len() <= 1,
            "{path} reached the server {} times (retried as if complete)",
            seen.len()
        );
        for bytes in &seen {
            assert!(
                !bytes.ends_with(b"0\r\n\r\n"),
                "{path} reached the server with a terminating chunk: {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
    assert_usage_returns(&lab, &before);
}
