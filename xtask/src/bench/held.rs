//! The memory an open connection costs each proxy: the client opens
//! [`HELD`] keep-alive connections, sends one request on each and reads its
//! response, then holds them all while the proxies' anonymous memory is
//! read, against the same reading just before. That is what a node's
//! thousands of idle keep-alive and pooled connections cost (design: 10 000
//! open connections per node).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::results::{Held, Memory};
use super::{Bench, Mode, PhaseLog};

/// Connections held at once.
pub(super) const HELD: usize = 1000;

/// A proxy's memory has settled once it fell by at most this much over
/// [`SETTLE_STEP`].
const SETTLE_KIB: u64 = 128;
const SETTLE_STEP: Duration = Duration::from_secs(1);
/// Past this, the reading is taken as it is.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// `python3 -c HOLD URL N`: N connections to URL, one GET each with its
/// response read, then `held N` on stdout; closes them all when stdin ends.
const HOLD: &str = r#"
import resource, socket, sys, urllib.parse
url, n = urllib.parse.urlsplit(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 64)), hard))
request = ("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (url.path or "/", url.netloc)).encode()
held = []
for _ in range(n):
    s = socket.create_connection((url.hostname, url.port or 80), timeout=10)
    s.sendall(request)
    got = b""
    while b"\r\n\r\n" not in got:
        more = s.recv(65536)
        if not more:
            sys.exit("closed before a response")
        got += more
    head, body = got.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit("answered %r" % head[:60])
    length = [l.split(b":", 1)[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
    while len(body) < int(length[0]):
        more = s.recv(65536)
        if not more:
            sys.exit("closed in a response")
        body += more
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.read()
"#;

impl Bench<'_> {
    /// Holds [`HELD`] connections from `from` to `url` (see the module
    /// documentation); what each cost the mode's two proxies.
    pub(super) fn held_phase(
        &self,
        log: &mut PhaseLog,
        from: &str,
        url: &str,
        path: &str,
    ) -> Result<Held> {
        log.step(&format!(
            "{HELD} open connections ({path}), one request each"
        ));
        self.check_processes()?;
        let before = self.settled_memory(log.mode)?;
        let n = HELD.to_string();
        let mut client = self
            .topo
            .command_in(from, &["python3", "-c", HOLD, url, &n])?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the client that holds connections")?;
        let mut line = String::new();
        let stdout = client.stdout.take().expect("piped");
        BufReader::new(stdout).read_line(&mut line)?;
        let holding = self.proxy_memory(log.mode);
        // Its stdin closed, the client closes every connection and exits.
        drop(client.stdin.take());
        let out = client.wait_with_output()?;
        if line.trim() != format!("held {HELD}") || !out.status.success() {
            bail!(
                "holding {HELD} connections to {url} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let holding = holding?;
        let kib = [0, 1].map(|i| {
            let grown = holding[i].anon_kib as f64 - before[i].anon_kib as f64;
            grown / HELD as f64
        });
        log.memory_trace
            .push((format!("{HELD} held ({path})"), holding));
        println!(
            "        {:.1} / {:.1} KiB of anonymous memory per open connection, node-a / node-b",
            kib[0], kib[1]
        );
        self.check_processes()?;
        Ok(Held {
            connections: HELD,
            kib,
        })
    }

    /// The proxies' memory once it stopped falling: what the phase before
    /// freed goes back to the system over a second or two (the agents'
    /// allocator returns it gradually), and must not be counted against
    /// the connections held next (1000 of them had just closed).
    fn settled_memory(&self, mode: Mode) -> Result<[Memory; 2]> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut last = self.proxy_memory(mode)?;
        loop {
            std::thread::sleep(SETTLE_STEP);
            let now = self.proxy_memory(mode)?;
            let fell = (0..2).any(|i| last[i].anon_kib > now[i].anon_kib + SETTLE_KIB);
            if !fell || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }
}
