//! A real Prometheus (Debian's `prometheus`) in a node's namespace,
//! scraping agents' `/metrics` every second, and PromQL queries against it.
//!
//! ```no_run
//! # use nodemesh_testbed::{prometheus::Prometheus, Topology};
//! # fn main() -> anyhow::Result<()> {
//! # let mut topo = Topology::new()?;
//! let netns = topo.node("node-a").netns.clone();
//! let prometheus = Prometheus::start(&mut topo, &netns, &["10.0.0.1:15020".into()])?;
//! let up = prometheus.query(&topo, "sum(up)")?;
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::mesh::Mesh;
use crate::topology::Topology;
use crate::workload_apps::wait_listening;

/// Prometheus' HTTP API, on the loopback of the namespace it runs in.
const LISTEN: &str = "127.0.0.1:9090";
const PORT: u16 = 9090;
/// How long [`Prometheus::wait_for`] waits for a query to reach a value, and
/// [`Prometheus::start`] for Prometheus to be ready.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Prometheus {
    netns: String,
}

impl Prometheus {
    /// Starts Prometheus in `netns` scraping `targets` (`host:port`) every
    /// second, and waits until it is ready to answer queries. It stops with the topology.
    pub fn start(topo: &mut Topology, netns: &str, targets: &[String]) -> Result<Prometheus> {
        let dir = topo.work_dir().join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: nodemesh\n  static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let args = [
            "prometheus".to_owned(),
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={LISTEN}"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        topo.spawn_in(netns, &args, "prometheus")
            .context("starting prometheus (`cargo xtask setup` installs it)")?;
        wait_listening(topo, netns, PORT)?;
        let prometheus = Prometheus {
            netns: netns.to_owned(),
        };
        prometheus.wait_ready(topo)?;
        Ok(prometheus)
    }

    /// Prometheus listens before its storage is open, and answers every
    /// query "Service Unavailable" until then (seconds on a busy machine).
    fn wait_ready(&self, topo: &Topology) -> Result<()> {
        let url = format!("http://{LISTEN}/-/ready");
        let deadline = Instant::now() + QUERY_TIMEOUT;
        loop {
            let probe = ["curl", "-sf", "--max-time", "5", &url];
            if topo.run_in(&self.netns, &probe)?.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("prometheus is not ready after {QUERY_TIMEOUT:?} ({url})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts Prometheus in node-a's namespace scraping both agents of a
    /// started `mesh` (on `:15020`), and waits until it scraped both.
    pub fn scrape_mesh(mesh: &mut Mesh) -> Result<Prometheus> {
        let targets: Vec<String> = ["node-a", "node-b"]
            .iter()
            .map(|n| format!("{}:15020", mesh.topo().node(n).address))
            .collect();
        let netns = mesh.topo().node("node-a").netns.clone();
        let prometheus = Prometheus::start(mesh.topo_mut(), &netns, &targets)?;
        let up = prometheus.wait_for(mesh.topo(), r#"sum(up{job="nodemesh"})"#, 2.0)?;
        if up != Some(2.0) {
            bail!("Prometheus does not scrape both agents: sum(up) is {up:?}");
        }
        Ok(prometheus)
    }

    /// The value of an instant PromQL query: the sum over the series it
    /// returns, `None` when it returns none.
    pub fn query(&self, topo: &Topology, promql: &str) -> Result<Option<f64>> {
        let result = self.query_series(topo, promql)?;
        let values: Vec<f64> = result
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse().ok())
            .collect();
        Ok((!values.is_empty()).then(|| values.iter().sum()))
    }

    /// The series an instant PromQL query returns (`data.result`).
    pub fn query_series(&self, topo: &Topology, promql: &str) -> Result<Vec<Value>> {
        let url = format!("http://{LISTEN}/api/v1/query");
        let query = format!("query={promql}");
        let out = topo.run_in_ok(
            &self.netns,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                &url,
                "--data-urlencode",
                &query,
            ],
        )?;
        let doc: Value =
            serde_json::from_str(&out).with_context(|| format!("prometheus answered {out}"))?;
        if doc["status"] != "success" {
            bail!("prometheus refused `{promql}`: {doc}");
        }
        Ok(doc["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Polls `promql` until it equals `expected` (for [`QUERY_TIMEOUT`]);
    /// returns the last value either way, so the caller asserts on it.
    pub fn wait_for(&self, topo: &Topology, promql: &str, expected: f64) -> Result<Option<f64>> {
        let deadline = Instant::now() + QUERY_TIMEOUT;
        loop {
            let value = self.query(topo, promql)?;
            if value == Some(expected) || Instant::now() > deadline {
                return Ok(value);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
