//! `cargo xtask demo --kubernetes`: the demo's Bookinfo story with both
//! agents (and the mesh CA) in Kubernetes mode. A real API server (from
//! `../shared/k8s`) holds the Pods, Services and Istio's sample YAML, applied
//! through the API as `kubectl apply` would; the test bed runs the pods'
//! processes as a kubelet would. Everything is removed at the end, also on
//! failure.

use std::path::Path;

use anyhow::{Context, Result};
use nodemesh_testbed::kube_mesh::KubeMesh;
use nodemesh_testbed::workload_apps::curl_many;

use crate::demo::{ratings_statuses, report, reviews_versions, step};

const REQUESTS: usize = 200;
const EXAMPLES: &str = "deploy/examples/bookinfo";
const JASON: &[&str] = &["-H", "end-user: jason"];

pub fn run(nodemesh: &Path, mesh_app: &Path, root: &Path) -> Result<()> {
    std::env::set_var("NODEMESH_BIN", nodemesh);
    let example = |name: &str| -> Result<String> {
        let path = root.join(EXAMPLES).join(format!("{name}.yaml"));
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };

    step("A Kubernetes API server, two nodes whose agents watch it, and the mesh CA");
    let mut mesh = KubeMesh::new(mesh_app, true)?;
    println!(
        "  namespace {} (label nodemesh.io/mesh=enabled), API server seen by the agents at \
         https://10.0.0.201:6443",
        mesh.namespace()
    );

    step("Bookinfo as Pods and Services created through the API");
    mesh.bookinfo()?;
    mesh.wait_enrolled("node-a", 4)?;
    mesh.wait_enrolled("node-b", 3)?;
    show(&mesh, &["workloads"])?;

    let productpage = mesh.url("productpage", "/productpage");
    let pages = |args: &[&str]| {
        let urls = vec![productpage.as_str(); REQUESTS];
        curl_many(mesh.topo(), "client", &urls, args)
    };
    for (sample, what) in [
        ("destination-rule-all", None),
        ("virtual-service-all-v1", Some("everything to v1")),
        (
            "virtual-service-reviews-test-v2",
            Some("end-user: jason → v2"),
        ),
        (
            "virtual-service-reviews-50-v3",
            Some("50/50 between v1 and v3"),
        ),
    ] {
        mesh.apply(&example(sample)?)?;
        let Some(what) = what else { continue };
        step(&format!("kubectl apply of Istio's {sample}.yaml ({what})"));
        // Let both agents pick it up (a snapshot follows an event within ~50 ms).
        std::thread::sleep(std::time::Duration::from_secs(1));
        report("anyone          ", &reviews_versions(&pages(&[])?));
        report("end-user: jason ", &reviews_versions(&pages(JASON)?));
    }

    step("kubectl apply of Istio's virtual-service-ratings-test-abort.yaml");
    mesh.apply(&example("virtual-service-ratings-test-abort")?)?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    report("end-user: jason", &ratings_statuses(&pages(JASON)?));

    step("What the agent on node-a saw");
    show(&mesh, &["status"])?;

    step("Cleaning up");
    drop(mesh);
    println!("  agents stopped and uninstalled, pods deleted, namespaces removed");
    Ok(())
}

fn show(mesh: &KubeMesh, args: &[&str]) -> Result<()> {
    let out = mesh.agent("node-a").cli(args)?;
    println!("\n$ nodemesh {}", args.join(" "));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
