//! One request with curl, to check what a path answers before it is
//! measured.

use anyhow::Result;
use nodemesh_testbed::Topology;

/// curl for one check: at most 5 s, errors shown, the body dropped.
pub(super) const CURL: [&str; 6] = ["curl", "--max-time", "5", "-sS", "-o", "/dev/null"];

/// What one request got.
pub(super) struct Probe {
    /// `STATUS BODY_BYTES`, e.g. `200 1024`.
    pub(super) summary: String,
    /// The response's header block.
    pub(super) headers: String,
}

impl Probe {
    /// A GET of `url` from `netns`; fails when curl does (no answer).
    pub(super) fn get(topo: &Topology, netns: &str, url: &str) -> Result<Probe> {
        Probe::get_with(topo, netns, url, &[])
    }

    /// [`get`](Self::get) with more curl options, e.g.
    /// `--http2-prior-knowledge`.
    pub(super) fn get_with(
        topo: &Topology,
        netns: &str,
        url: &str,
        options: &[&str],
    ) -> Result<Probe> {
        let mut cmd = CURL.to_vec();
        cmd.extend(["-D", "-", "-w", "%{http_code} %{size_download}"]);
        cmd.extend_from_slice(options);
        cmd.push(url);
        let text = topo.run_in_ok(netns, &cmd)?;
        let (headers, summary) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok(Probe {
            summary: summary.trim().to_string(),
            headers: headers.to_string(),
        })
    }

    /// The value of the response header `name`.
    pub(super) fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, value) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}
