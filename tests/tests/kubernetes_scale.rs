//! Many pods in the real API server (see `nodemesh_testbed::kube_scale`): an
//! agent keeps its node's pods apart from the others', and its memory with
//! the issue's 10 000 Services, 50 000 endpoints and 10 000 routes. Those take
//! minutes to create, so that measurement runs on demand (`--ignored`;
//! `NODEMESH_SCALE_SERVICES` scales it down).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nodemesh_testbed::kube_mesh::{KubeMesh, TIMEOUT};
use nodemesh_testbed::kube_scale::Scale;
use nodemesh_testbed::tenants::Usage;
use nodemesh_testbed::Agent;
use serde_json::Value;

/// The agent DaemonSet's memory limit (`deploy/kubernetes/04-agent.yaml`).
const MEMORY_LIMIT_KB: u64 = 1024 * 1024;
/// Time for a large cluster to reach an agent.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// RSS has settled once it has not dropped by more than [`SETTLE_STEP_KB`]
/// for this long: the allocator hands freed pages back over seconds, more
/// after tens of thousands of deletions.
const SETTLE_QUIET: Duration = Duration::from_secs(10);
const SETTLE_STEP_KB: u64 = 512;
/// The longest wait for RSS to settle.
const SETTLE_MAX: Duration = Duration::from_secs(120);

fn mesh() -> Result<KubeMesh> {
    KubeMesh::new(Path::new(env!("CARGO_BIN_EXE_mesh-app")), true)
}

/// Waits until `agent` serves at least `scale`'s Services, pods and routes.
fn wait_synced(agent: &Agent, scale: Scale) -> Result<Value> {
    wait_config(agent, &format!("{scale:?}"), |config| {
        let at_least = |field: &str, n: u32| config[field].as_u64() >= Some(u64::from(n));
        at_least("services", scale.services)
            && at_least("workloads", scale.pods())
            && at_least("http_routes", scale.services)
    })
}

/// Waits until `agent` serves `scale`'s Services and nothing else.
fn wait_shrunk(agent: &Agent, scale: Scale) -> Result<Value> {
    wait_config(agent, "the Services alone", |config| {
        config["services"].as_u64() >= Some(u64::from(scale.services))
            && config["workloads"].as_u64() == Some(0)
            && config["http_routes"].as_u64() == Some(0)
    })
}

/// Waits until the configuration `agent` serves is `wanted`. An agent busy
/// with a large list may not answer at once (at 10 000 Services its admin
/// socket once refused a connection with EAGAIN): asked again until the
/// deadline.
fn wait_config(agent: &Agent, what: &str, wanted: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let status = agent.status_json();
        if let Ok(status) = &status {
            if wanted(&status["config"]) {
                return Ok(status.clone());
            }
        }
        if Instant::now() > deadline {
            let last = status.map(|s| s["config"].to_string());
            bail!("{} never served {what}: {last:?}", agent.node());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn rss_kb(agent: &Agent) -> Result<u64> {
    let pid = agent.pid().unwrap_or_default();
    Ok(Usage::of(pid)?.rss_kb)
}

/// `agent`'s RSS once it stops falling (see [`SETTLE_QUIET`]).
fn settled_rss_kb(agent: &Agent) -> Result<u64> {
    let started = Instant::now();
    let mut lowest = rss_kb(agent)?;
    let mut since = Instant::now();
    while since.elapsed() < SETTLE_QUIET && started.elapsed() < SETTLE_MAX {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss_kb(agent)?;
        if now + SETTLE_STEP_KB < lowest {
            since = Instant::now();
        }
        lowest = lowest.min(now);
    }
    Ok(lowest)
}

/// Pods of this node and of the others, as `node`'s agent holds them.
fn pods_held(cluster: &KubeMesh, node: &str) -> Result<(u64, u64)> {
    let status = cluster.agent(node).status_json()?;
    let watches = &status["config"]["source"]["watches"];
    let held = |watch: &str| watches[watch]["objects"].as_u64().unwrap_or_default();
    Ok((held("Pod (this node)"), held("Pod (other nodes)")))
}

#[test]
fn an_agent_holds_its_own_pods_apart_and_routes_to_the_others() -> Result<()> {
    let mut cluster = mesh()?;
    cluster.client("node-a")?;
    cluster.app("node-b", "web-1", &[("app", "web"), ("version", "v1")], &[])?;
    cluster.service("web", 20)?;
    let scale = Scale {
        services: 20,
        pods_per_service: 5,
    };
    let namespace = cluster.namespace().to_owned();
    cluster.kube().create_at_scale(&namespace, scale)?;
    for node in ["node-a", "node-b"] {
        wait_synced(cluster.agent(node), scale)?;
    }
    // node-b knows the client, a pod of another node, well enough to accept
    // its calls (its address, node and identity).
    cluster.wait_only(&cluster.url("web", "/"), "v1", TIMEOUT)?;
    let others = u64::from(scale.pods()) + 1;
    assert_eq!(pods_held(&cluster, "node-a")?, (1, others));
    assert_eq!(pods_held(&cluster, "node-b")?, (1, others));
    Ok(())
}

#[test]
#[ignore = "creates 10 000 Services, 50 000 pods and 10 000 routes: minutes"]
fn agent_memory_with_10000_services_50000_endpoints_and_10000_routes() -> Result<()> {
    let services = match std::env::var("NODEMESH_SCALE_SERVICES") {
        Ok(n) => n.parse()?,
        Err(_) => Scale::ISSUE.services,
    };
    let scale = Scale {
        services,
        ..Scale::ISSUE
    };
    let mut cluster = mesh()?;
    let idle = settled_rss_kb(cluster.agent("node-a"))?;
    let namespace = cluster.namespace().to_owned();
    cluster.kube().create_at_scale(&namespace, scale)?;
    wait_synced(cluster.agent("node-a"), scale)?;
    let watched = settled_rss_kb(cluster.agent("node-a"))?;
    eprintln!("agent RSS with {scale:?}: {idle} KB idle, {watched} KB after watching them created");
    cluster.agent_mut("node-a").set_ready_timeout(SYNC_TIMEOUT);

    let restarted = Instant::now();
    cluster.restart_agent("node-a")?;
    wait_synced(cluster.agent("node-a"), scale)?;
    let serving = restarted.elapsed();
    let relisted = settled_rss_kb(cluster.agent("node-a"))?;
    eprintln!(
        "agent RSS with {scale:?}: {relisted} KB after a restart (a full list; serving \
         them {serving:.1?} after the restart, polled)"
    );
    for rss in [watched, relisted] {
        assert!(rss < MEMORY_LIMIT_KB, "{rss} KB");
    }

    // The tables shrink to the Services alone: the memory they held comes
    // back, to about what an agent started with only the Services holds.
    cluster.kube().shrink_to_services(&namespace, scale)?;
    wait_shrunk(cluster.agent("node-a"), scale)?;
    let shrunk = settled_rss_kb(cluster.agent("node-a"))?;
    cluster.restart_agent("node-a")?;
    wait_shrunk(cluster.agent("node-a"), scale)?;
    let fresh = settled_rss_kb(cluster.agent("node-a"))?;
    eprintln!(
        "agent RSS with the {} Services alone: {shrunk} KB after the rest was deleted, \
         {fresh} KB after a restart",
        scale.services
    );
    assert!(
        shrunk < fresh * 5 / 4 + 4096,
        "{shrunk} KB kept, {fresh} KB needed"
    );
    Ok(())
}
