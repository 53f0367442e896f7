//! The L7 + mutual TLS mode ([`Mode::MeshedMtls`]): the meshed phases
//! again, with agents that hold their workloads' certificates from a mesh
//! CA and talk mutual TLS (HBONE, port 15008) to each other (issue 9).
//!
//! The CA (`nodemesh ca`) runs in the fabric's netns, given an address of
//! its own on the inter-node network: a machine apart from both nodes. Each
//! node gets its credential from `nodemesh ca issue-node`, and the mode's
//! agents run with `--ca-address` and `--node-credential`.
//!
//! The mode runs only when the agents can really do it: an agent without
//! `--ca-address` skips it from the start; agents that hold their
//! certificates but do not listen on the HBONE port skip it when first
//! started for it, rather than measure a plain hop under the mTLS label.
//!
//! [`Mode::MeshedMtls`]: super::Mode::MeshedMtls

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::workload_apps::{is_listening, wait_listening};
use nodemesh_testbed::{Agent, Topology};
use serde_json::Value;

/// The CA's address on the inter-node network (the nodes are 10.0.0.1, …).
const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 250);
const CA_PORT: u16 = 15012;
/// Where agents accept mutual TLS from each other (HBONE).
const HBONE_PORT: u16 = 15008;
/// How long the agents get to obtain their workloads' certificates.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why this agent binary cannot run the mode at all, or `None`.
pub(super) fn unsupported(nodemesh: &Path) -> Option<String> {
    let help = crate::output_ok(Command::new(nodemesh).args(["agent", "--help"]));
    match help {
        Some(help) if help.contains("--ca-address") => None,
        Some(_) => Some(format!(
            "{} has no --ca-address yet: the agents cannot talk mutual TLS",
            nodemesh.display()
        )),
        None => Some(format!("`{} agent --help` failed", nodemesh.display())),
    }
}

/// A running `nodemesh ca` and the node credentials it issued.
pub(super) struct MeshCa {
    nodemesh: PathBuf,
    state_dir: PathBuf,
    /// The credential directory of each node, by node name.
    credentials: Vec<(String, PathBuf)>,
}

impl MeshCa {
    /// Starts the CA in the fabric's netns on [`CA_IP`], reading
    /// `config_dir` as the agents do, and issues a credential for every
    /// node of the topology.
    pub(super) fn start(topo: &mut Topology, nodemesh: &Path, config_dir: &Path) -> Result<MeshCa> {
        let fabric = topo.fabric_netns().to_string();
        topo.run_in_ok(
            &fabric,
            &["ip", "addr", "add", &format!("{CA_IP}/24"), "dev", "br0"],
        )
        .context("giving the mesh CA an address on the fabric")?;
        let dir = topo.work_dir().join("mesh-ca");
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let bin = nodemesh.to_string_lossy().into_owned();
        let state = state_dir.to_string_lossy().into_owned();
        let config = config_dir.to_string_lossy().into_owned();
        let listen = format!("{CA_IP}:{CA_PORT}");
        topo.spawn_in(
            &fabric,
            &[
                &bin,
                "ca",
                "--state-dir",
                &state,
                "--listen",
                &listen,
                "--config-dir",
                &config,
            ],
            "mesh-ca",
        )?;
        wait_listening(topo, &fabric, CA_PORT).context("the mesh CA did not start")?;

        let mut credentials = Vec::new();
        for node in topo.nodes() {
            let out = dir.join(&node.node_name);
            let out_s = out.to_string_lossy().into_owned();
            crate::status(Command::new(nodemesh).args([
                "ca",
                "issue-node",
                &node.node_name,
                "--state-dir",
                &state,
                "--out",
                &out_s,
            ]))
            .with_context(|| format!("issuing the credential of {}", node.node_name))?;
            credentials.push((node.node_name.clone(), out));
        }
        Ok(MeshCa {
            nodemesh: nodemesh.to_path_buf(),
            state_dir,
            credentials,
        })
    }

    /// The extra `nodemesh agent` arguments of the agent on `node_name`.
    pub(super) fn agent_args(&self, node_name: &str) -> Result<Vec<String>> {
        let (_, credential) = self
            .credentials
            .iter()
            .find(|(n, _)| n == node_name)
            .with_context(|| format!("no credential issued for {node_name}"))?;
        Ok(vec![
            "--ca-address".into(),
            format!("{CA_IP}:{CA_PORT}"),
            "--node-credential".into(),
            credential.to_string_lossy().into_owned(),
        ])
    }

    /// For error messages: where the CA keeps its root.
    pub(super) fn describe(&self) -> String {
        format!(
            "`{} ca` at {CA_IP}:{CA_PORT}, state in {}",
            self.nodemesh.display(),
            self.state_dir.display()
        )
    }
}

/// Waits until every agent holds a valid certificate for each identity it
/// serves (`nodemesh certs`); an error when one does not within
/// [`ISSUE_TIMEOUT`], since that is the CA wiring failing.
pub(super) fn wait_certificates(agents: &[Agent], ca: &MeshCa) -> Result<()> {
    let deadline = Instant::now() + ISSUE_TIMEOUT;
    for agent in agents {
        loop {
            let out = agent.cli(&["certs", "-o", "json"])?;
            let certs: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let list = certs.as_array().cloned().unwrap_or_default();
            if !list.is_empty() && list.iter().all(|c| c["state"] == "valid") {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {} has no valid certificate after {ISSUE_TIMEOUT:?} from {}: \
                     `nodemesh certs`: {}{}",
                    agent.node(),
                    ca.describe(),
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Why agents that hold their certificates still cannot be measured over
/// mutual TLS, or `None`: nothing in `netns` (the nodes' and pods'
/// namespaces) listens on the HBONE port.
pub(super) fn transport_missing(topo: &Topology, netns: &[&str]) -> Result<Option<String>> {
    for ns in netns {
        if is_listening(topo, ns, HBONE_PORT)? {
            return Ok(None);
        }
    }
    Ok(Some(format!(
        "the agents hold their workloads' certificates, but nothing listens on the HBONE port \
         {HBONE_PORT}: the mutual TLS transport has not landed"
    )))
}
