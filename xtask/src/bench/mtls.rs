//! The agent-to-agent hop of the meshed modes: mutual TLS (HBONE, port
//! 15008) by default, or plaintext under a mesh-wide PeerAuthentication
//! `DISABLE` (issue 9).
//!
//! The agents get their credentials from the test bed's mesh CA
//! (`Agent::start_with` starts one per topology). Before a meshed mode is
//! measured the bench checks which hop its requests really take: nginx
//! echoes the `X-Forwarded-Client-Cert` the destination agent sets for a
//! caller authenticated by mutual TLS, and no plaintext caller gets one.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nodemesh_testbed::workload_apps::is_listening;
use nodemesh_testbed::{config, Agent, Topology};
use serde_json::Value;

use super::probe::Probe;
use super::results::Mode;

/// Where agents accept mutual TLS from each other (HBONE).
const HBONE_PORT: u16 = 15008;
/// How long the agents get to obtain their workloads' certificates.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);
/// The root namespace (the agents' default `--root-namespace`): a policy
/// without selector there is mesh-wide.
const ROOT_NAMESPACE: &str = "istio-system";
/// The config file that holds the mesh-wide `DISABLE`, present only while
/// the plaintext mode runs.
const POLICY_FILE: &str = "peer-authentication.yaml";
/// The response header nginx copies the request's
/// `X-Forwarded-Client-Cert` into.
pub(super) const ECHO_HEADER: &str = "x-bench-client-cert";

/// Waits until every agent holds a valid certificate for each identity it
/// serves (`nodemesh certs`: the enrolled workloads'), then checks that
/// they listen for HBONE in one of `netns`.
pub(super) fn wait_ready(topo: &Topology, agents: &[Agent], netns: &[&str]) -> Result<()> {
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
                    "the agent on {} has no valid certificate after {ISSUE_TIMEOUT:?} from the \
                     test bed's mesh CA: `nodemesh certs`: {}{}",
                    agent.node(),
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for ns in netns {
        if is_listening(topo, ns, HBONE_PORT)? {
            return Ok(());
        }
    }
    bail!("the agents hold their certificates, but nothing listens on the HBONE port {HBONE_PORT}")
}

/// Writes (or removes) the mesh-wide PeerAuthentication `DISABLE`.
pub(super) fn write_policy(dir: &std::path::Path, plaintext_hop: bool) -> Result<()> {
    if !plaintext_hop {
        return config::remove(dir, POLICY_FILE);
    }
    config::write_raw(
        dir,
        POLICY_FILE,
        &format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  \
             name: default\n  namespace: {ROOT_NAMESPACE}\nspec:\n  mtls: {{mode: DISABLE}}\n"
        ),
    )
}

/// Checks that a request to `url` reaches nginx over `mode`'s hop: with the
/// caller's certificate (mutual TLS) or without (plaintext).
pub(super) fn check_hop(topo: &Topology, netns: &str, url: &str, mode: Mode) -> Result<()> {
    check_caller(&Probe::get(topo, netns, url)?, url, mode)
}

/// What [`check_hop`] checks, on a request already made.
pub(super) fn check_caller(probe: &Probe, url: &str, mode: Mode) -> Result<()> {
    let seen = probe.header(ECHO_HEADER);
    let (ok, want) = match mode {
        Mode::MeshedMtls => (
            seen.as_deref().is_some_and(|v| v.contains("URI=spiffe://")),
            "the caller's SPIFFE id (mutual TLS)",
        ),
        Mode::MeshedPlaintext => (seen.is_none(), "none (plaintext)"),
        Mode::Direct | Mode::HaproxyPair => (true, ""),
    };
    if !ok {
        bail!(
            "{url} in mode {}: nginx saw X-Forwarded-Client-Cert {seen:?}, want {want}; \
             headers:\n{}",
            mode.name(),
            probe.headers
        );
    }
    Ok(())
}
