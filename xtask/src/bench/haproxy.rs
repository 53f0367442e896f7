//! The bench's real peer: a pair of HAProxies (Debian's `haproxy`) doing
//! what the meshed L7 and L4 paths do, with mutual TLS between them.
//!
//! ```text
//! client pod ──HTTP/1.1──▶ HAProxy A ══TLS 1.3, client cert══▶ HAProxy B ──HTTP/1.1──▶ nginx
//!                          node-a netns                        node-b netns          server pod
//!                          10.1.1.1:10080                      10.0.0.2:10443
//!            ──TCP───────▶ 10.1.1.1:10081 ═════════════════▶ 10.0.0.2:10444 ──TCP──▶ iperf3
//! ```
//!
//! Both run with `nbthread 2`, the agents' default worker count
//! (`--workers 2`), so both peers get the same number of threads that do
//! the proxying. The HTTP pair runs `mode http`: A keeps its connections to
//! B open and shares them between client connections (`http-reuse
//! always`), as the agents pool theirs, so a new client connection costs no
//! TLS handshake on either peer. The bulk pair runs `mode tcp`, a TLS
//! connection per client connection, on the same certificates.
//!
//! The certificates come from Debian's `openssl` CLI: one ECDSA P-256 CA,
//! B's server certificate (DNS SAN [`B_NAME`], which A verifies) and A's
//! client certificate, which B requires (`verify required`). [`HaproxyPair::check`]
//! proves that before anything is measured: a request through A gets
//! nginx's answer with B's report of TLS 1.3 and A's certificate, and B
//! refuses the same TLS request without a client certificate.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::workload_apps::wait_listening;
use nodemesh_testbed::Topology;

use super::probe::{Probe, CURL};

/// Threads per HAProxy: the agents' default `--workers`.
pub(super) const THREADS: u32 = 2;
/// A's plain-HTTP front, on node-a's pod gateway.
const FRONT_PORT: u16 = 10080;
/// B's TLS port, on node-b's fabric address.
const TLS_PORT: u16 = 10443;
/// A's plain-TCP front for bulk TCP, and B's TLS port behind it.
const BULK_FRONT_PORT: u16 = 10081;
const BULK_TLS_PORT: u16 = 10444;
/// B's name in its certificate, which A verifies.
const B_NAME: &str = "haproxy-b.bench";
/// A's certificate subject, which B reports back.
const A_NAME: &str = "haproxy-a.bench";
/// Set by B on every response: the TLS version and the client
/// certificate's CN of the connection from A.
const MTLS_HEADER: &str = "x-bench-mtls";
/// B's stats socket, in the pair's directory.
const B_STATS_SOCKET: &str = "b.sock";
/// A certificate's lifetime; the bench is long gone by then.
const CERT_DAYS: &str = "2";

/// The openssl config of the three certificates: one extension section
/// each.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:haproxy-b.bench
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
";

/// Two running HAProxies, A on node-a and B on node-b.
pub(super) struct HaproxyPair {
    /// A's and B's pids.
    pub(super) pids: [u32; 2],
    /// What the client pod requests: A's front, the bench path.
    pub(super) url: String,
    /// Where the client pod sends bulk TCP: A's TCP front.
    pub(super) bulk_front: (Ipv4Addr, u16),
    dir: PathBuf,
    /// B's address on the fabric.
    b_ip: Ipv4Addr,
    /// node-a's netns, from which [`check`](Self::check) talks TLS to B.
    a_netns: String,
}

impl HaproxyPair {
    /// Writes the certificates and configs under the work directory and
    /// starts B then A; `backend` is nginx, `bulk_backend` the iperf3
    /// server.
    pub(super) fn start(
        topo: &mut Topology,
        haproxy: &Path,
        backend: (Ipv4Addr, u16),
        bulk_backend: (Ipv4Addr, u16),
        path: &str,
    ) -> Result<HaproxyPair> {
        let dir = topo.work_dir().join("haproxy");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_certificates(&dir)?;
        let (a, b) = (topo.node("node-a").clone(), topo.node("node-b").clone());
        let front = format!("{}:{FRONT_PORT}", a.gateway);
        let b_address = format!("{}:{TLS_PORT}", b.address);
        let b_bulk_address = format!("{}:{BULK_TLS_PORT}", b.address);
        let d = dir.display();
        // What B requires of A, and what A presents and checks of B: one
        // line each, for both pairs of ports.
        let b_tls =
            format!("ssl crt {d}/b.pem ca-file {d}/ca.crt verify required ssl-min-ver TLSv1.3");
        let a_tls = format!(
            "ssl verify required ca-file {d}/ca.crt verifyhost {B_NAME} sni str({B_NAME}) \
             crt {d}/a.pem ssl-min-ver TLSv1.3"
        );
        let global = format!("global\n    nbthread {THREADS}\n    maxconn 4096\n");
        let defaults = "defaults\n    mode http\n    timeout connect 5s\n    \
                        timeout client 30s\n    timeout server 30s\n";
        // B's stats socket tells how many TLS connections A opened.
        let b_conf = format!(
            "{global}    stats socket {d}/{B_STATS_SOCKET} mode 600 level user\n{defaults}\
             frontend mtls\n    \
             bind {b_address} {b_tls}\n    \
             http-response set-header {MTLS_HEADER} \"%[ssl_fc_protocol] %[ssl_c_s_dn(CN)]\"\n    \
             default_backend nginx\n\
             backend nginx\n    http-reuse always\n    server nginx {}:{}\n\
             frontend bulk\n    mode tcp\n    bind {b_bulk_address} {b_tls}\n    \
             default_backend iperf3\n\
             backend iperf3\n    mode tcp\n    server iperf3 {}:{}\n",
            backend.0, backend.1, bulk_backend.0, bulk_backend.1
        );
        let a_conf = format!(
            "{global}{defaults}frontend front\n    bind {front}\n    default_backend b\n\
             backend b\n    http-reuse always\n    server b {b_address} {a_tls}\n\
             frontend bulk\n    mode tcp\n    bind {}:{BULK_FRONT_PORT}\n    \
             default_backend b_bulk\n\
             backend b_bulk\n    mode tcp\n    server b {b_bulk_address} {a_tls}\n",
            a.gateway
        );
        let b_pid = spawn(topo, haproxy, &b.netns, &dir, "b", &b_conf)?;
        wait_listening(topo, &b.netns, TLS_PORT).context("HAProxy B did not start")?;
        let a_pid = spawn(topo, haproxy, &a.netns, &dir, "a", &a_conf)?;
        wait_listening(topo, &a.netns, FRONT_PORT).context("HAProxy A did not start")?;
        Ok(HaproxyPair {
            pids: [a_pid, b_pid],
            url: format!("http://{front}{path}"),
            bulk_front: (a.gateway, BULK_FRONT_PORT),
            dir,
            b_ip: b.address,
            a_netns: a.netns,
        })
    }

    /// A request from `client_netns` through the pair gets nginx's 200 and
    /// `body_size` bytes, carried over TLS 1.3 with A's certificate; and B
    /// refuses a TLS client without a certificate.
    pub(super) fn check(
        &self,
        topo: &Topology,
        client_netns: &str,
        body_size: usize,
    ) -> Result<()> {
        let probe = Probe::get(topo, client_netns, &self.url)?;
        let want_summary = format!("200 {body_size}");
        let want_mtls = format!("TLSv1.3 {A_NAME}");
        if probe.summary != want_summary
            || probe.header(MTLS_HEADER).as_deref() != Some(&*want_mtls)
        {
            bail!(
                "{} did not reach nginx over mutual TLS (want {want_summary:?} and \
                 `{MTLS_HEADER}: {want_mtls}`); got {:?}, headers:\n{}\nHAProxy logs:\n{}",
                self.url,
                probe.summary,
                probe.headers,
                self.logs(topo)
            );
        }

        // The same TLS request to B without and with A's certificate: only
        // the missing certificate can make the first fail.
        let d = self.dir.display();
        let resolve = format!("{B_NAME}:{TLS_PORT}:{}", self.b_ip);
        let url = format!("https://{B_NAME}:{TLS_PORT}/");
        let ca = format!("{d}/ca.crt");
        let tls_curl = |extra: &[&str]| {
            let mut cmd = CURL.to_vec();
            cmd.extend(["--cacert", &ca, "--resolve", &resolve]);
            cmd.extend_from_slice(extra);
            cmd.push(&url);
            topo.run_in(&self.a_netns, &cmd)
        };
        let without = tls_curl(&[])?;
        if without.status.success() {
            bail!("HAProxy B answered a TLS client without a certificate: `verify required` is not in force");
        }
        let (cert, key) = (format!("{d}/a.crt"), format!("{d}/a.key"));
        let with = tls_curl(&["--cert", &cert, "--key", &key])?;
        if !with.status.success() {
            bail!(
                "HAProxy B refused A's certificate: {}",
                String::from_utf8_lossy(&with.stderr).trim()
            );
        }
        Ok(())
    }

    /// TLS connections B has accepted so far (`CumSslConns` of its `show
    /// info`): how well A pools its connections to B.
    pub(super) fn b_tls_connections(&self) -> Result<u64> {
        let path = self.dir.join(B_STATS_SOCKET);
        let ask = || -> std::io::Result<String> {
            let mut socket = UnixStream::connect(&path)?;
            socket.write_all(b"show info\n")?;
            let mut info = String::new();
            socket.read_to_string(&mut info)?;
            Ok(info)
        };
        let info = ask().with_context(|| format!("asking HAProxy B ({})", path.display()))?;
        info.lines()
            .find_map(|l| l.strip_prefix("CumSslConns:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no CumSslConns in HAProxy B's `show info`:\n{info}"))
    }

    /// Both HAProxies' output, for error messages.
    pub(super) fn logs(&self, topo: &Topology) -> String {
        ["a", "b"]
            .map(|p| {
                let log = topo.read_log(&log_name(p));
                format!("---- HAProxy {p} ----\n{}", super::tail(&log, 30))
            })
            .join("\n")
    }
}

fn log_name(peer: &str) -> String {
    format!("haproxy-{peer}")
}

/// Checks `conf` with `haproxy -c` (its message names the faulty line),
/// then runs HAProxy in the foreground in `netns`.
fn spawn(
    topo: &mut Topology,
    haproxy: &Path,
    netns: &str,
    dir: &Path,
    peer: &str,
    conf: &str,
) -> Result<u32> {
    let path = dir.join(format!("{peer}.cfg"));
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    let (haproxy, path) = (haproxy.to_string_lossy(), path.to_string_lossy());
    topo.run_in_ok(netns, &[&haproxy, "-c", "-q", "-f", &path])
        .with_context(|| format!("HAProxy {peer}'s config is invalid:\n{conf}"))?;
    topo.spawn_in(netns, &[&haproxy, "-db", "-f", &path], &log_name(peer))
}

/// The CA, B's server certificate and A's client certificate, ECDSA
/// P-256; `a.pem` and `b.pem` hold certificate and key, as HAProxy's
/// `crt` wants them.
fn write_certificates(dir: &Path) -> Result<()> {
    let cnf = dir.join("openssl.cnf");
    std::fs::write(&cnf, OPENSSL_CNF).with_context(|| format!("writing {}", cnf.display()))?;
    let openssl = super::find_program("openssl", &["/usr/bin/openssl"])?;
    for (name, subject, section, signed) in [
        ("ca", "bench-ca", "ca", false),
        ("b", B_NAME, "server", true),
        ("a", A_NAME, "client", true),
    ] {
        let mut cmd = std::process::Command::new(&openssl);
        cmd.current_dir(dir).args([
            "req",
            "-x509",
            "-config",
            "openssl.cnf",
            "-extensions",
            section,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            CERT_DAYS,
        ]);
        cmd.arg("-subj").arg(format!("/CN={subject}"));
        cmd.arg("-keyout").arg(format!("{name}.key"));
        cmd.arg("-out").arg(format!("{name}.crt"));
        if signed {
            cmd.args(["-CA", "ca.crt", "-CAkey", "ca.key"]);
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", openssl.display()))?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                crate::display(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if signed {
            let pem = [format!("{name}.crt"), format!("{name}.key")]
                .iter()
                .map(|f| std::fs::read_to_string(dir.join(f)))
                .collect::<std::io::Result<Vec<_>>>()
                .with_context(|| format!("reading {name}'s certificate and key"))?
                .concat();
            let path = dir.join(format!("{name}.pem"));
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
