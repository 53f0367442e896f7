//! `cargo xtask demo`: Istio's Bookinfo on a two-node mesh built from
//! network namespaces, routed by Istio's own sample YAML: everything to v1,
//! `end-user: jason` to reviews v2, a 50/50 split, and an injected fault,
//! each shown with the counts curl observed. Everything is removed at the
//! end, also on failure.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nodemesh_testbed::mesh::{count_by, replace_object, Mesh, CLIENT};
use nodemesh_testbed::workload_apps::Reply;

const PRODUCTPAGE: &str = "http://productpage:9080/productpage";
const REQUESTS: usize = 200;
const SPLIT_REQUESTS: usize = 1000;
const EXAMPLES: &str = "deploy/examples/bookinfo";
/// The config file with the VirtualServices applied so far.
const APPLIED: &str = "virtual-services.yaml";
const JASON: &[&str] = &["-H", "end-user: jason"];

pub fn run(nodemesh: &Path, mesh_app: &Path, root: &Path) -> Result<()> {
    // The test bed finds the agent binary through this variable.
    std::env::set_var("NODEMESH_BIN", nodemesh);
    let examples = root.join(EXAMPLES);
    let example = |name: &str| -> Result<String> {
        let path = examples.join(format!("{name}.yaml"));
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };

    step("Bookinfo on two nodes (network namespaces), one mesh-app process per pod");
    let mut mesh = Mesh::new(mesh_app)?;
    mesh.bookinfo()?;
    for pod in mesh.topo().pods() {
        println!("  pod {:<15} on {}  {}", pod.name, pod.node, pod.address);
    }
    println!(
        "\n  productpage calls details and reviews; reviews v2 and v3 call ratings.\n  \
         Config: {EXAMPLES}/destination-rule-all.yaml (Istio's sample, unchanged)."
    );

    step("Starting one agent per node");
    mesh.start(&[])?;
    show(&mesh, &["services"])?;

    // One file holds the VirtualServices applied so far; replacing an
    // object in it is what `kubectl apply` of Istio's next sample does.
    let mut applied = example("virtual-service-all-v1")?;
    step(&format!(
        "Istio's virtual-service-all-v1.yaml: {REQUESTS} requests to productpage"
    ));
    mesh.apply(APPLIED, &applied)?;
    let pages = mesh.get_many(CLIENT, PRODUCTPAGE, REQUESTS, &[])?;
    report(
        "reviews version seen by productpage",
        &reviews_versions(&pages),
    );

    step("Header-based route: virtual-service-reviews-test-v2.yaml (end-user: jason → v2)");
    let test_v2 = example("virtual-service-reviews-test-v2")?;
    applied = replace_object(&applied, "reviews", &test_v2);
    mesh.apply(APPLIED, &applied)?;
    let jason = mesh.get_many(CLIENT, PRODUCTPAGE, REQUESTS, JASON)?;
    let others = mesh.get_many(CLIENT, PRODUCTPAGE, REQUESTS, &[])?;
    report("end-user: jason", &reviews_versions(&jason));
    report("anyone else    ", &reviews_versions(&others));
    show(&mesh, &["routes"])?;
    show(
        &mesh,
        &[
            "explain",
            "--from",
            "default/client",
            "http://reviews:9080/reviews/0",
            "-H",
            "end-user: jason",
        ],
    )?;

    step(&format!(
        "Weighted split: virtual-service-reviews-50-v3.yaml, {SPLIT_REQUESTS} requests"
    ));
    let split = example("virtual-service-reviews-50-v3")?;
    mesh.apply(APPLIED, &replace_object(&applied, "reviews", &split))?;
    let pages = mesh.get_many(CLIENT, PRODUCTPAGE, SPLIT_REQUESTS, &[])?;
    report("reviews version", &reviews_versions(&pages));

    step("Fault: virtual-service-ratings-test-abort.yaml (HTTP 500 from ratings for jason)");
    let abort = example("virtual-service-ratings-test-abort")?;
    applied = replace_object(&applied, "ratings", &abort);
    mesh.apply(APPLIED, &applied)?;
    let jason = mesh.get_many(CLIENT, PRODUCTPAGE, REQUESTS, JASON)?;
    let others = mesh.get_many(CLIENT, PRODUCTPAGE, REQUESTS, &[])?;
    report("end-user: jason", &ratings_statuses(&jason));
    report("anyone else    ", &ratings_statuses(&others));

    step("What the agent on node-a saw");
    show(&mesh, &["status"])?;

    step("Cleaning up");
    drop(mesh);
    println!("  agents stopped and uninstalled, namespaces removed");
    Ok(())
}

/// Which reviews version productpage got, per request.
pub(crate) fn reviews_versions(pages: &[Reply]) -> BTreeMap<String, u64> {
    count_by(pages, |page| match page.json() {
        Some(doc) => doc["calls"][1]["body"]["version"]
            .as_str()
            .map_or("reviews unavailable".into(), |v| format!("reviews {v}")),
        None => format!("productpage answered {}", page.status),
    })
}

/// What ratings answered the reviews that called it, per request.
pub(crate) fn ratings_statuses(pages: &[Reply]) -> BTreeMap<String, u64> {
    count_by(pages, |page| {
        let doc = page.json().unwrap_or_default();
        let reviews = &doc["calls"][1]["body"];
        match &reviews["calls"][0]["status"] {
            serde_json::Value::Null => format!(
                "reviews {} (calls no ratings)",
                reviews["version"].as_str().unwrap_or("?")
            ),
            status => format!("ratings answered {status} to reviews"),
        }
    })
}

pub(crate) fn report(what: &str, counts: &BTreeMap<String, u64>) {
    let total: u64 = counts.values().sum();
    let parts: Vec<String> = counts
        .iter()
        .map(|(k, n)| format!("{k}: {n} ({:.1}%)", *n as f64 * 100.0 / total as f64))
        .collect();
    println!("  {what}: {}", parts.join(", "));
}

pub(crate) fn step(title: &str) {
    println!("\n== {title}");
}

fn show(mesh: &Mesh, args: &[&str]) -> Result<()> {
    let out = mesh.agent("node-a").cli(args)?;
    if !out.status.success() {
        bail!(
            "nodemesh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let quoted: Vec<String> = args
        .iter()
        .map(|a| match a.contains(' ') {
            true => format!("'{a}'"),
            false => a.to_string(),
        })
        .collect();
    println!("\n$ nodemesh {}", quoted.join(" "));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
