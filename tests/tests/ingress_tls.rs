//! TLS at the ingress gateway, from a host outside the mesh with curl:
//! certificates from Secrets chosen by SNI, `httpsRedirect`, and MUTUAL
//! servers requiring a client certificate; PASSTHROUGH to apps that
//! terminate TLS themselves, TLS servers terminating into TCP routes, and
//! TCP servers; client certificates forwarded in `X-Forwarded-Client-Cert`,
//! and ISTIO_MUTUAL presenting the ingress's own certificate.

use std::path::Path;
use std::time::{Duration, Instant};

use nodemesh_testbed::mesh::Mesh;
use nodemesh_testbed::workload_apps;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{json, Value};

/// The outside client's address on the fabric, `10.0.0.210` (the mesh CA
/// is at `.200`).
const OUTSIDE_INDEX: u8 = 210;

/// An operator's CA and the leaf certificates it signs.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate, key) in PEM for `name`.
    fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        (
            params.signed_by(&key, &self.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }
}

/// A `kubernetes.io/tls` Secret in `default`, as YAML (JSON is YAML).
fn secret(name: &str, data: &[(&str, &str)]) -> String {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "type": "kubernetes.io/tls",
        "stringData": data,
    })
    .to_string()
}

const GATEWAY: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure}
spec:
  servers:
  - port: {number: 443, name: https-a, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: a-cred}
  - port: {number: 443, name: https-b, protocol: HTTPS}
    hosts: [b.example.com]
    tls: {mode: SIMPLE, credentialName: b-cred, minProtocolVersion: TLSV1_2}
  - port: {number: 8443, name: https-mtls, protocol: HTTPS}
    hosts: [m.example.com]
    tls: {mode: MUTUAL, credentialName: m-cred}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [a.example.com]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [a.example.com, b.example.com, m.example.com]
  gateways: [secure]
  http:
  - route:
    - destination:
        host: web
";

/// curl from `netns` with `args`: (HTTP status or 0, redirect URL, body).
fn curl(mesh: &Mesh, netns: &str, args: &[&str]) -> (u16, String, String) {
    let mut cmd = vec![
        "curl",
        "--max-time",
        "10",
        "-sS",
        "-w",
        "\n%{http_code} %{redirect_url}",
    ];
    cmd.extend_from_slice(args);
    let out = mesh.topo().run_in(netns, &cmd).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, end) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let (status, location) = end.split_once(' ').unwrap_or((end, ""));
    (
        status.parse().unwrap_or(0),
        location.to_owned(),
        body.to_owned(),
    )
}

/// `nodemesh gateways -o json` of node-a.
fn gateways(mesh: &Mesh) -> Value {
    let out = mesh
        .agent("node-a")
        .cli(&["gateways", "-o", "json"])
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Writes `text` to `name` in the test's work dir; returns the path.
fn work_file(mesh: &Mesh, name: &str, text: &str) -> String {
    let path = mesh.topo().work_dir().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// The files of [`abm_secrets`]: each host's CA, and a client certificate
/// signed by the CA of `m-cred`'s `ca.crt`.
struct AbmFiles {
    ca_a: String,
    ca_b: String,
    ca_m: String,
    client_cert: String,
    client_key: String,
}

/// Secrets `a-cred`, `b-cred` and `m-cred` (with `ca.crt` for MUTUAL) for
/// a, b and m.example.com, each from its own CA, so that the CA a client
/// trusts tells which certificate the SNI chose; applied to the mesh.
fn abm_secrets(mesh: &Mesh) -> AbmFiles {
    let (ca_a, ca_b, ca_m, clients) =
        (Ca::new("a"), Ca::new("b"), Ca::new("m"), Ca::new("clients"));
    let (a_cert, a_key) = ca_a.leaf("a.example.com");
    let (b_cert, b_key) = ca_b.leaf("b.example.com");
    let (m_cert, m_key) = ca_m.leaf("m.example.com");
    let (client_cert, client_key) = clients.leaf("client.example.com");
    let secrets = [
        secret("a-cred", &[("tls.crt", &a_cert), ("tls.key", &a_key)]),
        secret("b-cred", &[("tls.crt", &b_cert), ("tls.key", &b_key)]),
        secret(
            "m-cred",
            &[
                ("tls.crt", &m_cert),
                ("tls.key", &m_key),
                ("ca.crt", &clients.pem),
            ],
        ),
    ];
    mesh.apply("secrets.yaml", &secrets.join("\n---\n"))
        .unwrap();
    AbmFiles {
        ca_a: work_file(mesh, "ca-a.pem", &ca_a.pem),
        ca_b: work_file(mesh, "ca-b.pem", &ca_b.pem),
        ca_m: work_file(mesh, "ca-m.pem", &ca_m.pem),
        client_cert: work_file(mesh, "client.pem", &client_cert),
        client_key: work_file(mesh, "client-key.pem", &client_key),
    }
}

/// Service `web` (one pod, on node-b), the agents started, a host outside
/// the mesh; returns the mesh, the host's netns and node-a's address (where
/// the tests reach the ingress, which crosses nodes into the mesh).
fn web_mesh() -> (Mesh, String, String) {
    web_mesh_with(|_| ())
}

/// [`web_mesh`] with what `more` adds before the agents start.
fn web_mesh_with(more: impl FnOnce(&mut Mesh)) -> (Mesh, String, String) {
    let mut mesh = Mesh::new(Path::new(env!("CARGO_BIN_EXE_mesh-app"))).unwrap();
    mesh.app("node-b", "web-1", &[("app", "web")], &[]).unwrap();
    mesh.http_service("web");
    more(&mut mesh);
    mesh.start(&[]).unwrap();
    let outside = mesh.topo_mut().add_host("outside", OUTSIDE_INDEX).unwrap();
    let node = mesh.topo().node("node-a").address.to_string();
    (mesh, outside, node)
}

#[test]
fn https_by_sni_from_secrets_redirect_and_mutual() {
    let (mesh, outside, node) = web_mesh();
    let AbmFiles {
        ca_a,
        ca_b,
        ca_m,
        client_cert,
        client_key,
    } = abm_secrets(&mesh);
    mesh.apply("gateway.yaml", GATEWAY).unwrap();
    let resolve = |host: &str, port: u16| format!("{host}:{port}:{node}");
    let https = |host: &str, port: u16, ca: &str, extra: &[&str]| {
        let (resolve, url) = (
            resolve(host, port),
            format!("https://{host}:{port}/hello?x=1"),
        );
        let mut args = vec!["--resolve", &resolve, "--cacert", ca];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&mesh, &outside, &args)
    };

    // The listener follows the config once the agent reconciles.
    let deadline = Instant::now() + Duration::from_secs(15);
    while https("a.example.com", 443, &ca_a, &[]).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            https("a.example.com", 443, &ca_a, &[])
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SNI picks each host's certificate: the other CA's is not trusted.
    let (status, _, body) = https("a.example.com", 443, &ca_a, &[]);
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["name"], "web-1", "{doc:#}");
    assert_eq!(doc["headers"]["x-forwarded-proto"], "https", "{doc:#}");
    assert_eq!(https("b.example.com", 443, &ca_b, &[]).0, 200);
    assert_eq!(https("b.example.com", 443, &ca_a, &[]).0, 0);
    assert_eq!(https("a.example.com", 443, &ca_b, &[]).0, 0);
    // Over HTTP/2 (ALPN h2) as well.
    assert_eq!(https("a.example.com", 443, &ca_a, &["--http2"]).0, 200);
    // A host no server on the port claims: refused in the handshake.
    let (resolve_c, url_c) = (
        resolve("c.example.com", 443),
        "https://c.example.com/".to_owned(),
    );
    let other = curl(&mesh, &outside, &["--resolve", &resolve_c, "-k", &url_c]);
    assert_eq!(other.0, 0, "{other:?}");
    // The SNI of a SIMPLE server does not reach another server's routes.
    let (status, _, body) = https("a.example.com", 443, &ca_a, &["-H", "Host: m.example.com"]);
    assert_eq!(status, 404, "{body}");

    // httpsRedirect: 301 to the same URL over https.
    let (resolve_80, url_80) = (
        resolve("a.example.com", 80),
        "http://a.example.com/hello?x=1",
    );
    let (status, location, _) = curl(&mesh, &outside, &["--resolve", &resolve_80, url_80]);
    assert_eq!(
        (status, location.as_str()),
        (301, "https://a.example.com/hello?x=1")
    );

    // MUTUAL: refused without a client certificate, served with one signed
    // by the Secret's ca.crt.
    assert_eq!(https("m.example.com", 8443, &ca_m, &[]).0, 0);
    let with_cert = ["--cert", client_cert.as_str(), "--key", client_key.as_str()];
    let (status, _, body) = https("m.example.com", 8443, &ca_m, &with_cert);
    assert_eq!(status, 200, "{body}");

    // `nodemesh gateways` shows each server's mode and certificate expiry.
    let gateways = gateways(&mesh);
    let servers = gateways["servers"].as_array().unwrap();
    let tls: Vec<_> = servers.iter().map(|s| s["tls"]["mode"].clone()).collect();
    assert_eq!(
        tls,
        [
            json!("SIMPLE"),
            json!("SIMPLE"),
            json!("MUTUAL"),
            Value::Null
        ],
        "{gateways:#}"
    );
    assert!(
        servers[0]["tls"]["certificateExpiry"]
            .as_str()
            .is_some_and(|e| e.ends_with('Z')),
        "{gateways:#}"
    );
}

#[test]
fn a_bad_secret_skips_only_its_servers() {
    let (mesh, outside, node) = web_mesh();
    let ca = Ca::new("a");
    let (cert, key) = ca.leaf("a.example.com");
    let (_, other_key) = ca.leaf("b.example.com");
    let secrets = [
        secret("a-cred", &[("tls.crt", &cert), ("tls.key", &key)]),
        // The key of another certificate.
        secret("b-cred", &[("tls.crt", &cert), ("tls.key", &other_key)]),
    ];
    mesh.apply("secrets.yaml", &secrets.join("\n---\n"))
        .unwrap();
    mesh.apply("gateway.yaml", GATEWAY).unwrap();

    let status = mesh.agent("node-a").status_json().unwrap();
    let warnings = status["config"]["secret_warnings"].to_string();
    for part in [
        "Secret default/b-cred (",
        "secrets.yaml): stringData[tls.key]: the key does not match",
    ] {
        assert!(warnings.contains(part), "{part:?} not in {warnings}");
    }
    assert!(!warnings.contains("PRIVATE KEY"), "{warnings}");
    let routing = status["config"]["routing_warnings"].to_string();
    for part in [
        "Gateway default/secure (",
        "gateway.yaml): spec.servers[1]",
        "Secret default/b-cred is invalid",
        "spec.servers[2].tls.credentialName: Secret m-cred not found",
    ] {
        assert!(routing.contains(part), "{part:?} not in {routing}");
    }
    // The server with a good Secret is served.
    let ca_path = mesh.topo().work_dir().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let (resolve, ca_path) = (
        format!("a.example.com:443:{node}"),
        ca_path.to_string_lossy().into_owned(),
    );
    let args = [
        "--resolve",
        &resolve,
        "--cacert",
        &ca_path,
        "https://a.example.com/",
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    while curl(&mesh, &outside, &args).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            curl(&mesh, &outside, &args)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const PASSTHROUGH: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [a.example.com, '*.b.example.com', c.example.com]
    tls: {mode: PASSTHROUGH}
  - port: {number: 7000, name: tcp, protocol: TCP}
    hosts: ['*']
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [web.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: apps}
spec:
  hosts: [a.example.com, '*.b.example.com']
  gateways: [edge]
  tls:
  - match: [{sniHosts: [a.example.com]}]
    route: [{destination: {host: tls-a, port: {number: 8443}}}]
  - match: [{port: 443, sniHosts: ['*.b.example.com']}]
    route: [{destination: {host: tls-b}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: ['*']
  gateways: [edge]
  tcp:
  - match: [{port: 7000}]
    route: [{destination: {host: echo, port: {number: 7000}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.example.com]
  gateways: [edge]
  http:
  - route: [{destination: {host: web}}]
";

/// Adds a pod `name` on `node` whose app terminates TLS itself with a
/// certificate for `host` from its own CA, and its Service (port 8443,
/// named `tls`); returns the CA's file.
fn tls_app(mesh: &mut Mesh, node: &str, name: &str, host: &str) -> String {
    let dir = mesh.topo().work_dir().to_owned();
    let ca = Ca::new(name);
    let (cert, key) = ca.leaf(host);
    let path = |file: &str, text: &str| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (cert, key, ca) = (
        path("cert.pem", &cert),
        path("key.pem", &key),
        path("ca.pem", &ca.pem),
    );
    let pod = mesh.pod(node, name, &[("app", name)]).unwrap();
    let port = nodemesh_testbed::config::ServicePort {
        name: "tls",
        port: 8443,
        target_port: 8443,
    };
    mesh.service(name, &[port]);
    let args = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    workload_apps::start_http_echo_with(mesh.topo_mut(), &pod, 8443, name, &args).unwrap();
    ca
}

#[test]
fn passthrough_by_sni_and_tcp_servers() {
    let mut mesh = Mesh::new(Path::new(env!("CARGO_BIN_EXE_mesh-app"))).unwrap();
    mesh.app("node-b", "web-1", &[("app", "web")], &[]).unwrap();
    mesh.http_service("web");
    // One app behind another node (HBONE), one on the ingress's own.
    let ca_a = tls_app(&mut mesh, "node-b", "tls-a", "a.example.com");
    let ca_b = tls_app(&mut mesh, "node-a", "tls-b", "x.b.example.com");
    mesh.tcp_echo("node-b", "echo", &[], 7000).unwrap();
    mesh.start(&[]).unwrap();
    let outside = mesh.topo_mut().add_host("outside", OUTSIDE_INDEX).unwrap();
    let node = mesh.topo().node("node-a").address.to_string();
    mesh.apply("gateway.yaml", PASSTHROUGH).unwrap();

    let https = |host: &str, ca: &str| {
        let resolve = format!("{host}:443:{node}");
        let url = format!("https://{host}/hello");
        curl(
            &mesh,
            &outside,
            &["--resolve", &resolve, "--cacert", ca, &url],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while https("a.example.com", &ca_a).0 != 200 {
        let last = https("a.example.com", &ca_a);
        assert!(Instant::now() < deadline, "{last:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The app's own certificate, from its own CA: each SNI reaches its app.
    let (status, _, body) = https("a.example.com", &ca_a);
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["server"], "tls-a", "{doc:#}");
    let (status, _, body) = https("x.b.example.com", &ca_b);
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["server"], "tls-b", "{doc:#}");
    assert_eq!(https("x.b.example.com", &ca_a).0, 0);
    // A host of the server that no rule routes, and one of no server:
    // closed, even for a client that trusts any certificate.
    for host in ["c.example.com", "d.example.com"] {
        let resolve = format!("{host}:443:{node}");
        let url = format!("https://{host}/");
        let refused = curl(&mesh, &outside, &["--resolve", &resolve, "-k", &url]);
        assert_eq!(refused.0, 0, "{host}: {refused:?}");
    }

    // TCP: the echo server answers through the gateway.
    let echo = format!(
        "import socket; s = socket.create_connection(('{node}', 7000), timeout=10); \
         s.sendall(b'ping'); s.shutdown(socket.SHUT_WR); print(s.makefile().read())"
    );
    let out = mesh
        .topo()
        .run_in(&outside, &["python3", "-c", &echo])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ping",
        "{out:?}"
    );

    // The rest of the gateway keeps serving.
    let resolve = format!("web.example.com:80:{node}");
    let (status, _, body) = curl(
        &mesh,
        &outside,
        &["--resolve", &resolve, "http://web.example.com/"],
    );
    assert_eq!(status, 200, "{body}");

    // Telemetry reports the relayed connections from the ingress.
    let metrics = format!("http://{node}:15020/metrics");
    let (_, _, metrics) = curl(&mesh, &outside, &[&metrics]);
    let from_ingress = |service: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("source_workload=\"nodemesh-ingress\"")
                && l.contains(&format!("destination_service_name=\"{service}\""))
        })
    };
    for service in ["tls-a", "tls-b", "echo"] {
        assert!(from_ingress(service), "{service}: {metrics}");
    }

    // `nodemesh gateways` shows the bound tls and tcp rules.
    let gateways = gateways(&mesh);
    let servers = gateways["servers"].as_array().unwrap();
    let rules = |i: usize| servers[i]["routes"].to_string();
    assert!(rules(0).contains("spec.tls[1]"), "{gateways:#}");
    assert!(rules(0).contains("*.b.example.com"), "{gateways:#}");
    assert!(rules(1).contains("spec.tcp[0]"), "{gateways:#}");
    assert_eq!(servers[0]["state"], "listening", "{gateways:#}");
}

/// Istio TLS servers that terminate TLS themselves on port 9443 and relay
/// the decrypted bytes: `a` (SIMPLE) by a `tcp:` rule to an echo server on
/// node-b, `b` (SIMPLE) by a `tls:` rule's `sniHosts` to one on the
/// ingress's own node, `m` (MUTUAL) by a `tcp:` rule to the HTTP app.
const TERMINATED_TLS: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tls-edge}
spec:
  servers:
  - port: {number: 9443, name: tls-a, protocol: TLS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: a-cred}
  - port: {number: 9443, name: tls-b, protocol: TLS}
    hosts: [b.example.com]
    tls: {mode: SIMPLE, credentialName: b-cred}
  - port: {number: 9443, name: tls-m, protocol: TLS}
    hosts: [m.example.com]
    tls: {mode: MUTUAL, credentialName: m-cred}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: to-echo}
spec:
  hosts: [a.example.com]
  gateways: [tls-edge]
  tcp:
  - route: [{destination: {host: echo, port: {number: 7000}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: to-echo-local}
spec:
  hosts: [b.example.com]
  gateways: [tls-edge]
  tls:
  - match: [{sniHosts: [b.example.com]}]
    route: [{destination: {host: echo-local, port: {number: 7001}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: to-web}
spec:
  hosts: [m.example.com]
  gateways: [tls-edge]
  tcp:
  - route: [{destination: {host: web}}]
";

/// A TLS client (Python `ssl`) that sends 64 KiB of every byte value and
/// prints `exact` when the same bytes come back.
const TLS_ECHO_CLIENT: &str = r#"
import socket, ssl, sys
host, ca, address = sys.argv[1], sys.argv[2], sys.argv[3]
context = ssl.create_default_context(cafile=ca)
raw = socket.create_connection((address, 9443), timeout=10)
s = context.wrap_socket(raw, server_hostname=host)
data = bytes(range(256)) * 256
s.sendall(data)
got = b""
while len(got) < len(data):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print("exact" if got == data else "differs after %d bytes" % len(got))
"#;

#[test]
fn terminated_tls_servers_relay_by_tcp_and_tls_rules() {
    // One echo behind another node (HBONE), one on the ingress's own.
    let (mesh, outside, node) = web_mesh_with(|mesh| {
        mesh.tcp_echo("node-b", "echo", &[], 7000).unwrap();
        mesh.tcp_echo("node-a", "echo-local", &[], 7001).unwrap();
    });
    let AbmFiles {
        ca_a,
        ca_b,
        ca_m,
        client_cert,
        client_key,
    } = abm_secrets(&mesh);
    mesh.apply("gateway.yaml", TERMINATED_TLS).unwrap();
    let client = work_file(&mesh, "tls_echo_client.py", TLS_ECHO_CLIENT);
    let echo = |host: &str, ca: &str| {
        let out = mesh
            .topo()
            .run_in(&outside, &["python3", &client, host, ca, &node]);
        let out = out.unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (said, String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let deadline = Instant::now() + Duration::from_secs(15);
    while echo("a.example.com", &ca_a).0 != "exact" {
        let last = echo("a.example.com", &ca_a);
        assert!(Instant::now() < deadline, "{last:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each SNI gets its server's certificate and its rule's echo server,
    // byte-exact; the other server's CA is not trusted.
    assert_eq!(echo("b.example.com", &ca_b).0, "exact");
    assert_ne!(echo("b.example.com", &ca_a).0, "exact");
    assert_ne!(echo("a.example.com", &ca_b).0, "exact");

    // MUTUAL: refused without a client certificate; with one, the decrypted
    // bytes (an HTTP request) reach the HTTP app as TCP.
    let resolve = format!("m.example.com:9443:{node}");
    let url = "https://m.example.com:9443/hello";
    let plain = ["--resolve", resolve.as_str(), "--cacert", ca_m.as_str()];
    let refused = curl(&mesh, &outside, &[&plain[..], &[url]].concat());
    assert_eq!(refused.0, 0, "{refused:?}");
    let with_cert = [
        "--cert",
        client_cert.as_str(),
        "--key",
        client_key.as_str(),
        url,
    ];
    let (status, _, body) = curl(&mesh, &outside, &[&plain[..], &with_cert].concat());
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["name"], "web-1", "{doc:#}");

    // Telemetry reports each relayed connection from the ingress.
    let metrics = format!("http://{node}:15020/metrics");
    let (_, _, metrics) = curl(&mesh, &outside, &[&metrics]);
    for service in ["echo", "echo-local", "web"] {
        let from_ingress = metrics.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("source_workload=\"nodemesh-ingress\"")
                && l.contains(&format!("destination_service_name=\"{service}\""))
        });
        assert!(from_ingress, "{service}: {metrics}");
    }

    // `nodemesh gateways`: the servers are served, with mode and rules.
    let gateways = gateways(&mesh);
    let servers = gateways["servers"].as_array().unwrap();
    let modes: Vec<_> = servers.iter().map(|s| s["tls"]["mode"].clone()).collect();
    assert_eq!(modes, [json!("SIMPLE"), json!("SIMPLE"), json!("MUTUAL")]);
    for server in servers {
        assert_eq!(server["state"], "listening", "{gateways:#}");
    }
    assert!(servers[0]["routes"].to_string().contains("spec.tcp[0]"));
    assert!(servers[1]["routes"].to_string().contains("spec.tls[0]"));

    // `explain --gateway`: the server the SNI picks, its certificate and
    // the rule that relays the decrypted bytes.
    let out = mesh
        .agent("node-a")
        .cli(&[
            "explain",
            "--gateway",
            "9443",
            "https://b.example.com/",
            "-o",
            "json",
        ])
        .unwrap();
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["server"], "spec.servers[1]", "{b:#}");
    assert_eq!(b["tls"]["mode"], "SIMPLE", "{b:#}");
    assert_eq!(b["tls"]["certificate"], "Secret default/b-cred", "{b:#}");
    assert_eq!(b["route"], "spec.tls[0]", "{b:#}");
    assert_eq!(
        b["destinations"][0]["service"], "default/echo-local",
        "{b:#}"
    );
}

/// MUTUAL and ISTIO_MUTUAL servers in front of `web` (node-b) and `near`
/// (the ingress's own node, under `/near`), and a plaintext server.
const CLIENT_CERTS: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: certs}
spec:
  servers:
  - port: {number: 8443, name: https-mutual, protocol: HTTPS}
    hosts: [m.example.com]
    tls: {mode: MUTUAL, credentialName: m-cred}
  - port: {number: 9443, name: https-mesh, protocol: HTTPS}
    hosts: [m.example.com]
    tls: {mode: ISTIO_MUTUAL}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [m.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [m.example.com]
  gateways: [certs]
  http:
  - match: [{uri: {prefix: /near}}]
    route: [{destination: {host: near}}]
  - route: [{destination: {host: web}}]
";

/// An HTTP/1.1 request over TLS (Python `ssl`, the server's certificate
/// checked against a CA file, not its name) with a forged XFCC; prints the
/// server certificate's URI SANs and the response body as JSON.
const CERT_CLIENT: &str = r#"
import json, socket, ssl, sys
address, port, host, path, ca, cert, key = sys.argv[1:8]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.load_verify_locations(ca)
if cert != "-":
    context.load_cert_chain(cert, key)
raw = socket.create_connection((address, int(port)), timeout=10)
s = context.wrap_socket(raw, server_hostname=host)
uris = [v for k, v in s.getpeercert().get("subjectAltName", ()) if k == "URI"]
request = "GET %s HTTP/1.1\r\nHost: %s\r\nx-forwarded-client-cert: Hash=forged\r\n" \
    "Connection: close\r\n\r\n" % (path, host)
s.sendall(request.encode())
reply = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
body = reply[reply.index(b"{"):reply.rindex(b"}") + 1]
print(json.dumps({"server": uris, "body": json.loads(body)}))
"#;

#[test]
fn client_certificates_at_the_gateway_reach_the_app_in_xfcc() {
    let (mesh, outside, node) = web_mesh_with(|mesh| {
        mesh.app("node-a", "near-1", &[("app", "near")], &[])
            .unwrap();
        mesh.http_service("near");
    });
    let AbmFiles {
        ca_m,
        client_cert,
        client_key,
        ..
    } = abm_secrets(&mesh);
    mesh.apply("gateway.yaml", CLIENT_CERTS).unwrap();
    let client = work_file(&mesh, "cert_client.py", CERT_CLIENT);
    let ingress = gateways(&mesh)["identity"].as_str().unwrap().to_owned();
    let own = |app_account: &str| {
        format!("By=spiffe://cluster.local/ns/default/sa/{app_account};URI={ingress}")
    };
    // (server URI SANs, the app's JSON), or the client's error.
    let call = |port: u16, path: &str, ca: &str, cert: &str, key: &str| {
        let port = port.to_string();
        let args = [
            "python3",
            &client,
            &node,
            &port,
            "m.example.com",
            path,
            ca,
            cert,
            key,
        ];
        let out = mesh.topo().run_in(&outside, &args).unwrap();
        serde_json::from_slice::<Value>(&out.stdout)
            .map_err(|_| String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let xfcc = |doc: &Value| doc["body"]["headers"]["x-forwarded-client-cert"].clone();

    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = call(8443, "/", &ca_m, &client_cert, &client_key) {
        assert!(Instant::now() < deadline, "{e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // MUTUAL: the gateway's element for the client certificate (Envoy's
    // Hash, Subject, URI, DNS), the forged one gone, then the destination's
    // own for the ingress, on another node and on the ingress's own.
    let fingerprint = mesh
        .topo()
        .run_in(
            &outside,
            &[
                "openssl",
                "x509",
                "-in",
                &client_cert,
                "-noout",
                "-fingerprint",
                "-sha256",
            ],
        )
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&fingerprint.stdout);
    let hash = fingerprint
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert_eq!(hash.len(), 64, "{fingerprint}");
    let gateway_element =
        format!("Hash={hash};Subject=\"CN=rcgen self signed cert\";URI=;DNS=client.example.com");
    let far = call(8443, "/hello", &ca_m, &client_cert, &client_key).unwrap();
    assert_eq!(far["body"]["name"], "web-1", "{far:#}");
    assert_eq!(
        xfcc(&far),
        format!("{gateway_element},{}", own("default")),
        "{far:#}"
    );
    let near = call(8443, "/near", &ca_m, &client_cert, &client_key).unwrap();
    assert_eq!(near["body"]["name"], "near-1", "{near:#}");
    assert_eq!(
        xfcc(&near),
        format!("{gateway_element},{}", own("default")),
        "{near:#}"
    );
    // Without a client certificate: refused.
    assert!(call(8443, "/hello", &ca_m, "-", "-").is_err());
    // Plaintext: the forged element is removed at the gateway; the app
    // sees the destination's own only.
    let resolve = format!("m.example.com:80:{node}");
    let forged = "x-forwarded-client-cert: Hash=forged";
    let (status, _, body) = curl(
        &mesh,
        &outside,
        &[
            "--resolve",
            &resolve,
            "-H",
            forged,
            "http://m.example.com/hello",
        ],
    );
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc["headers"]["x-forwarded-client-cert"],
        own("default"),
        "{doc:#}"
    );

    // ISTIO_MUTUAL presents the ingress's own workload certificate and takes
    // a client certificate of the mesh (here node-b's credential).
    let node_b = &mesh.topo().node("node-b").node_name;
    let credential = mesh.topo().work_dir().join(format!("credential-{node_b}"));
    let path = |name: &str| credential.join(name).to_string_lossy().into_owned();
    let (roots, cert, key) = (
        path("root-cert.pem"),
        path("node-cert.pem"),
        path("node-key.pem"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mesh_call = loop {
        match call(9443, "/hello", &roots, &cert, &key) {
            Ok(doc) => break doc,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(mesh_call["server"], json!([ingress]), "{mesh_call:#}");
    let element = xfcc(&mesh_call);
    let element = element.as_str().unwrap();
    assert!(
        element.starts_with(&format!("By={ingress};Hash=")),
        "{element}"
    );
    assert!(
        element.ends_with(&format!(",{}", own("default"))),
        "{element}"
    );
    assert!(call(9443, "/hello", &roots, "-", "-").is_err());
    // A client certificate from another CA is refused.
    assert!(call(9443, "/hello", &roots, &client_cert, &client_key).is_err());

    // explain names the certificate ISTIO_MUTUAL presents.
    let out = mesh
        .agent("node-a")
        .cli(&[
            "explain",
            "--gateway",
            "9443",
            "https://m.example.com/",
            "-o",
            "json",
        ])
        .unwrap();
    let explained: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        explained["tls"]["certificate"],
        format!("the ingress's workload certificate, {ingress} (ISTIO_MUTUAL)"),
        "{explained:#}"
    );
}

/// Gateway API over HTTPS: two HTTPS listeners on port 443, each with its
/// own host and Secret, and a route attached to each by `sectionName`. The
/// first route's hostnames cover both hosts, so only `sectionName` keeps it
/// off listener `b`, whose own route serves `/b` only.
const GATEWAY_API_HTTPS: &str = concat!(
    include_str!("../../deploy/kubernetes/05-gatewayclass.yaml"),
    "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: secure-api}
spec:
  gatewayClassName: nodemesh
  listeners:
  - name: a
    port: 443
    protocol: HTTPS
    hostname: a.example.com
    tls: {mode: Terminate, certificateRefs: [{kind: Secret, name: a-cred}]}
  - name: b
    port: 443
    protocol: HTTPS
    hostname: b.example.com
    tls: {certificateRefs: [{name: b-cred}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: only-a}
spec:
  parentRefs: [{name: secure-api, sectionName: a}]
  hostnames: [\"*.example.com\"]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-listener, value: a}]}
    backendRefs: [{name: web, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-b}
spec:
  parentRefs: [{name: secure-api, sectionName: b}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /b}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-listener, value: b}]}
    backendRefs: [{name: web, port: 9080}]
",
);

#[test]
fn gateway_api_https_listeners_by_sni_with_routes_by_section_name() {
    let (mesh, outside, node) = web_mesh();
    let dir = mesh.topo().work_dir().to_owned();
    let (ca_a, ca_b) = (Ca::new("a"), Ca::new("b"));
    let (a_cert, a_key) = ca_a.leaf("a.example.com");
    let (b_cert, b_key) = ca_b.leaf("b.example.com");
    let secrets = [
        secret("a-cred", &[("tls.crt", &a_cert), ("tls.key", &a_key)]),
        secret("b-cred", &[("tls.crt", &b_cert), ("tls.key", &b_key)]),
    ];
    mesh.apply("secrets.yaml", &secrets.join("\n---\n"))
        .unwrap();
    mesh.apply("gateway-api.yaml", GATEWAY_API_HTTPS).unwrap();
    let ca_path = |name: &str, ca: &Ca| {
        let path = dir.join(name);
        std::fs::write(&path, &ca.pem).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (ca_a, ca_b) = (ca_path("ca-a.pem", &ca_a), ca_path("ca-b.pem", &ca_b));
    let https = |host: &str, path: &str, ca: &str, extra: &[&str]| {
        let resolve = format!("{host}:443:{node}");
        let url = format!("https://{host}{path}");
        let mut args = vec!["--resolve", &resolve, "--cacert", ca];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&mesh, &outside, &args)
    };
    let listener = |(status, _, body): (u16, String, String)| {
        assert_eq!(status, 200, "{body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["headers"]["x-forwarded-proto"], "https", "{doc:#}");
        doc["headers"]["x-listener"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };

    let deadline = Instant::now() + Duration::from_secs(15);
    while https("a.example.com", "/", &ca_a, &[]).0 != 200 {
        let last = https("a.example.com", "/", &ca_a, &[]);
        assert!(Instant::now() < deadline, "{last:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SNI picks each listener's certificate (the other CA's is not trusted)
    // and its routes.
    assert_eq!(listener(https("a.example.com", "/", &ca_a, &[])), "a");
    assert_eq!(listener(https("a.example.com", "/b", &ca_a, &[])), "a");
    assert_eq!(listener(https("b.example.com", "/b", &ca_b, &[])), "b");
    assert_eq!(
        listener(https("b.example.com", "/b", &ca_b, &["--http2"])),
        "b"
    );
    assert_eq!(https("b.example.com", "/b", &ca_a, &[]).0, 0);
    assert_eq!(https("a.example.com", "/", &ca_b, &[]).0, 0);
    // `only-a` covers b.example.com by hostname, but its sectionName keeps
    // it on listener a: at b, only `to-b`'s /b is routed.
    let (status, _, body) = https("b.example.com", "/", &ca_b, &[]);
    assert_eq!(status, 404, "{body}");
    // A's SNI does not reach listener b's routes.
    let (status, _, body) = https("a.example.com", "/b", &ca_a, &["-H", "Host: b.example.com"]);
    assert_eq!(status, 404, "{body}");

    // `explain --gateway` tells the same: listener, certificate, route.
    let explain = |url: &str| {
        let out = mesh
            .agent("node-a")
            .cli(&["explain", "--gateway", "443", url, "-o", "json"])
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let b = explain("https://b.example.com/b/1");
    assert_eq!(b["gateway"], "default/secure-api", "{b:#}");
    assert_eq!(b["server"], "spec.listeners[1] (b)");
    assert_eq!(b["tls"]["mode"], "SIMPLE");
    assert_eq!(b["tls"]["certificate"], "Secret default/b-cred");
    assert!(b["origin"]
        .as_str()
        .unwrap()
        .starts_with("HTTPRoute default/to-b ("));
    assert_eq!(b["destinations"][0]["service"], "default/web");
    let root = explain("https://b.example.com/");
    assert!(
        root["summary"]
            .as_str()
            .unwrap()
            .starts_with("the ingress answers 404: no route of HTTPRoute default/to-b ("),
        "{root:#}"
    );
    let a = explain("https://a.example.com/");
    assert_eq!(a["tls"]["certificate"], "Secret default/a-cred", "{a:#}");
    assert!(a["origin"]
        .as_str()
        .unwrap()
        .starts_with("HTTPRoute default/only-a ("));
}

/// A Gateway in `infra` whose HTTPS listener takes its certificate from a
/// Secret in `certs`, and a route in `infra` to Service `web` of `default`:
/// both references cross namespaces.
const CROSS_NAMESPACE: &str = concat!(
    include_str!("../../deploy/kubernetes/05-gatewayclass.yaml"),
    "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shop, namespace: infra}
spec:
  gatewayClassName: nodemesh
  listeners:
  - name: https
    port: 443
    protocol: HTTPS
    hostname: shop.example.com
    tls: {certificateRefs: [{kind: Secret, name: shop-cred, namespace: certs}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: infra}
spec:
  parentRefs: [{name: shop}]
  rules:
  - backendRefs: [{name: web, namespace: default, port: 9080}]
",
);

/// Lets Gateways of `infra` use the Secrets of `certs`.
const GRANT_SECRET: &str = "\
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: gateways-of-infra, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}]
  to: [{group: \"\", kind: Secret}]
";

/// Lets HTTPRoutes of `infra` send to Service `web` of `default`.
const GRANT_SERVICE: &str = "\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: ReferenceGrant
metadata: {name: routes-of-infra, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}]
  to: [{group: \"\", kind: Service, name: web}]
";

#[test]
fn reference_grants_allow_a_certificate_and_a_backend_of_other_namespaces() {
    let (mesh, outside, node) = web_mesh();
    let dir = mesh.topo().work_dir().to_owned();
    let ca = Ca::new("shop");
    let (cert, key) = ca.leaf("shop.example.com");
    let in_certs = secret("shop-cred", &[("tls.crt", &cert), ("tls.key", &key)])
        .replace("\"namespace\":\"default\"", "\"namespace\":\"certs\"");
    assert!(in_certs.contains("\"certs\""), "{in_certs}");
    mesh.apply("secret.yaml", &in_certs).unwrap();
    mesh.apply("service-grant.yaml", GRANT_SERVICE).unwrap();
    mesh.apply("gateway.yaml", CROSS_NAMESPACE).unwrap();
    let ca_path = dir.join("ca-shop.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let ca_path = ca_path.to_string_lossy().into_owned();
    let resolve = format!("shop.example.com:443:{node}");
    let https = || {
        let args = ["--resolve", &resolve, "--cacert", &ca_path];
        curl(
            &mesh,
            &outside,
            &[&args[..], &["https://shop.example.com/"]].concat(),
        )
    };
    let until = |wanted: u16| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = https();
            if got.0 == wanted {
                return got;
            }
            assert!(Instant::now() < deadline, "wanted {wanted}, got {got:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let warnings = || {
        let status = mesh.agent("node-a").status_json().unwrap();
        status["config"]["routing_warnings"].to_string()
    };
    let refused = "Secret certs/shop-cred is in another namespace and no ReferenceGrant";

    // Without a grant in `certs`, the listener is not served, once the
    // Gateway is loaded (a generation `apply` counts may be an earlier file's).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !warnings().contains(refused) {
        assert!(Instant::now() < deadline, "{}", warnings());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(https().0, 0);
    // The grant there lets the listener serve the Secret of `certs`, and the
    // route reach `web` in `default`.
    mesh.apply("secret-grant.yaml", GRANT_SECRET).unwrap();
    let (_, _, body) = until(200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["headers"]["x-forwarded-proto"], "https", "{doc:#}");
    assert!(!warnings().contains(refused));
    // Removing the backend's grant revokes it: the rule answers 500.
    mesh.delete("service-grant.yaml").unwrap();
    let (_, _, body) = until(500);
    assert_eq!(body, "");
    // Removing the Secret's grant takes the listener down.
    mesh.delete("secret-grant.yaml").unwrap();
    until(0);
}
