//! A real `nodemesh ca` process on a host of its own on the inter-node
//! fabric, and node credentials issued with the real `issue-node`.

use crate::topology::Topology;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The CA host's index on the fabric: it listens on `10.0.0.200`.
const HOST_INDEX: u8 = 200;
pub const CA_PORT: u16 = 15012;
/// How long the CA gets to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const LOG: &str = "mesh-ca";

/// A running CA; the topology stops it when dropped.
#[derive(Clone)]
pub struct MeshCa {
    /// The `nodemesh` binary the CA runs from, which also issues the node
    /// credentials.
    bin: PathBuf,
    state_dir: PathBuf,
    address: String,
    pid: u32,
}

impl MeshCa {
    /// Starts `bin ca` on host `ca` (10.0.0.200) with its state dir under
    /// the topology's work dir and its config source given as its arguments
    /// (`--config-dir DIR`, or `--kubernetes --kubeconfig FILE`), and waits
    /// until it listens. Through [`Topology::mesh_ca`], which keeps it.
    pub(crate) fn start(topo: &mut Topology, source: &[String], bin: &Path) -> Result<MeshCa> {
        let netns = topo.add_host("ca", HOST_INDEX)?;
        let state_dir = topo.work_dir().join("ca-state");
        let address = format!("10.0.0.{HOST_INDEX}:{CA_PORT}");
        let program = bin.display().to_string();
        let state = state_dir.display().to_string();
        let mut cmd = vec![
            program.as_str(),
            "ca",
            "--state-dir",
            &state,
            "--listen",
            &address,
        ];
        cmd.extend(source.iter().map(String::as_str));
        let pid = topo.spawn_in(&netns, &cmd, LOG)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !topo.read_log(LOG).contains("listening on") {
            if !topo.is_running(pid) || Instant::now() > deadline {
                bail!("the mesh CA did not start:\n{}", topo.read_log(LOG));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(MeshCa {
            bin: bin.to_path_buf(),
            state_dir,
            address,
            pid,
        })
    }

    /// `HOST:PORT` for the agents' `--ca-address`.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs the real `nodemesh ca issue-node NODE_NAME` and returns the
    /// directory holding the credential (for the agent's `--node-credential`).
    pub fn issue_node(&self, topo: &Topology, node_name: &str) -> Result<PathBuf> {
        let out = topo.work_dir().join(format!("credential-{node_name}"));
        let output = Command::new(&self.bin)
            .args(["ca", "issue-node", node_name, "--state-dir"])
            .arg(&self.state_dir)
            .arg("--out")
            .arg(&out)
            .output()
            .context("running nodemesh ca issue-node")?;
        if !output.status.success() {
            bail!(
                "issue-node {node_name} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(out)
    }

    /// The CA's log so far.
    pub fn log(&self, topo: &Topology) -> String {
        topo.read_log(LOG)
    }
}
