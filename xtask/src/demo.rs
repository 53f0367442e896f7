//! `cargo xtask demo`: a two-node mesh built from network namespaces, real
//! HTTP servers and curl, and what the agents saw. Everything is removed at
//! the end, also on failure.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodemesh_testbed::workload_apps::{curl, start_http_echo};
use nodemesh_testbed::{config, Agent, Topology};
use serde_json::Value;

pub fn run(nodemesh: &Path) -> Result<()> {
    let mut topo = Topology::new()?;
    step("Building two nodes out of network namespaces");
    topo.add_node("node-a")?;
    topo.add_node("node-b")?;
    for (node, pod) in [
        ("node-a", "client"),
        ("node-a", "web-1"),
        ("node-a", "legacy"),
        ("node-b", "web-2"),
    ] {
        let p = topo.add_pod(node, pod)?;
        println!("  pod {pod:<7} on {node}  {}", p.address);
    }
    for web in ["web-1", "web-2"] {
        start_http_echo(&mut topo, web, 8080, web)?;
    }

    let dir = topo.work_dir().join("config");
    std::fs::create_dir_all(&dir)?;
    config::write(
        &dir,
        "shop.yaml",
        &[
            config::namespace("shop", true),
            config::namespace("legacy", false),
            config::workload(topo.pod("client"), "shop", &[("app", "client")]),
            config::workload(topo.pod("web-1"), "shop", &[("app", "web")]),
            config::workload(topo.pod("web-2"), "shop", &[("app", "web")]),
            config::workload(topo.pod("legacy"), "legacy", &[("app", "legacy")]),
            config::service("web", "shop", &[("app", "web")], 80, 8080, None),
        ],
    )?;
    println!("\n  config ({}):\n", dir.join("shop.yaml").display());
    for line in std::fs::read_to_string(dir.join("shop.yaml"))?.lines() {
        println!("    {line}");
    }

    step("Starting one agent per node");
    let a = Agent::start_with(&mut topo, "node-a", &dir, nodemesh, &[])?;
    let b = Agent::start_with(&mut topo, "node-b", &dir, nodemesh, &[])?;
    wait_enrolled(&a, 2)?;
    wait_enrolled(&b, 1)?;
    show(&a, &["status"])?;
    show(&a, &["workloads"])?;
    show(&a, &["services"])?;

    step("Sending requests (curl inside the pods; applications unchanged)");
    let web1 = topo.pod("web-1").address;
    let requests = [
        ("client", "http://web/".to_owned()),
        ("client", "http://web.shop.svc.cluster.local/".to_owned()),
        ("client", "http://web.shop/".to_owned()),
        ("client", "http://web/".to_owned()),
        ("client", format!("http://{web1}:8080/")),
        ("legacy", format!("http://{web1}:8080/")),
    ];
    for (pod, url) in &requests {
        let (status, body) = curl(&topo, *pod, url, &[])?;
        let echo: Value =
            serde_json::from_str(&body).with_context(|| format!("{url} answered {body:?}"))?;
        let seen_from = echo["client"].as_str().unwrap_or("?");
        let how = if seen_from.starts_with("127.0.0.6:") {
            "via the agent"
        } else {
            "directly"
        };
        println!(
            "  {pod:<6} GET {url:<38} -> {status} from {:<5} (server saw {seen_from}, {how})",
            echo["server"].as_str().unwrap_or("?")
        );
    }

    step("What the agents saw");
    println!("node-a:");
    show(&a, &["connections"])?;
    println!("node-b:");
    show(&b, &["connections"])?;
    println!(
        "\nshop/client is in a labelled namespace: every connection it opens goes through node-a's\n\
         agent, which knows the caller by its network namespace and the original destination\n\
         from eBPF, load-balances the Service, and hands off to the destination node's agent.\n\
         legacy/legacy is not in the mesh: its connection is only captured on the way in."
    );

    step("Cleaning up");
    drop(a);
    drop(b);
    drop(topo);
    println!("  agents stopped and uninstalled, namespaces removed");
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn show(agent: &Agent, args: &[&str]) -> Result<()> {
    let out = agent.cli(args)?;
    if !out.status.success() {
        bail!(
            "nodemesh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("\n$ nodemesh {}", args.join(" "));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

fn wait_enrolled(agent: &Agent, expected: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = agent.status_json()?;
        if status["workloads"]["enrolled"].as_u64() == Some(expected) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not enroll {expected} workload(s): {status:#}\n{}",
                agent.node(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
