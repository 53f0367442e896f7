//! The container image (`cargo xtask image`), loaded and run by a real
//! container runtime (podman with runc) as the Kubernetes manifests run it:
//! the mesh CA as `deploy/kubernetes/03-ca.yaml` does (its unprivileged user,
//! a read-only root, no capability, the operator's CA in the plug-in layout
//! mounted read-only as the kubelet writes a Secret), and both agents as the
//! DaemonSet of `04-agent.yaml` does (its capabilities instead of
//! privileged, read-only root, host PID, the node's network, its host
//! mounts), serving a request over mutual TLS between two nodes; then the
//! same agents in Kubernetes mode, against a real API server, meshing the
//! pods of a labelled namespace found by their processes.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nodemesh_testbed::config;
use nodemesh_testbed::container::{image_archive, Podman, CA_USER};
use nodemesh_testbed::kube_mesh::KubeMesh;
use nodemesh_testbed::mesh::{Mesh, CLIENT, NAMESPACE};
use nodemesh_testbed::topology::{netns_path, run_checked};
use nodemesh_testbed::workload_apps::curl_many;
use nodemesh_testbed::{nodemesh_bin, Topology};

const CA_ADDRESS: &str = "10.0.0.200:15012";
/// The DaemonSet's `--node-credential`, a hostPath mount.
const NODE_CREDENTIAL: &str = "/etc/nodemesh/node-credential";

fn app_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh-app"))
}

fn deploy_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of every `key: value` line of `yaml`.
fn values<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .collect()
}

/// `nodemesh ARGS` with the binary under test; panics unless it succeeds.
fn nodemesh(args: &[&str]) -> String {
    let out = Command::new(nodemesh_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nodemesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The operator's CA in Istio's plug-in layout, as the kubelet writes the
/// `cacerts` Secret with `defaultMode: 0400` and the CA's `fsGroup`: owned
/// by root, readable by the group only. The root is one `nodemesh ca`
/// makes for itself, plugged in as its own signer.
fn plugin_certs(work: &Path) -> PathBuf {
    let state = work.join("operator-root");
    nodemesh(&[
        "ca",
        "issue-node",
        "bootstrap",
        "--state-dir",
        &state.display().to_string(),
        "--out",
        &work.join("bootstrap").display().to_string(),
    ]);
    let dir = work.join("cacerts");
    fs::create_dir_all(&dir).unwrap();
    for (plugin, own) in [
        ("ca-cert.pem", "root-cert.pem"),
        ("ca-key.pem", "root-key.pem"),
        ("root-cert.pem", "root-cert.pem"),
        ("cert-chain.pem", "root-cert.pem"),
    ] {
        let file = dir.join(plugin);
        fs::copy(state.join(own), &file).unwrap();
        chown(&file, Some(0), Some(CA_USER)).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o440)).unwrap();
    }
    dir
}

#[test]
fn the_image_runs_the_ca_and_the_agents_as_the_manifests_do() {
    // Declared first, so it drops last: after the agents ran `uninstall`
    // through it, it removes whatever container is left.
    let podman = Podman::new().unwrap();
    let image = podman.load(&image_archive()).unwrap();

    // It is the image the manifests and the chart name.
    for manifest in ["kubernetes/03-ca.yaml", "kubernetes/04-agent.yaml"] {
        assert_eq!(values(&deploy_file(manifest), "image"), [image.as_str()]);
    }
    let chart = deploy_file("helm/nodemesh/values.yaml");
    let chart_image = format!(
        "{}:{}",
        values(&chart, "repository")[0],
        values(&chart, "tag")[0]
    );
    assert_eq!(chart_image, image);
    // The manifests give only `args`: the entrypoint is the agent, the one
    // under test.
    let run = podman.container(&["--network=none".to_owned()], &image, &["--version"]);
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let version = run_checked(&run).unwrap().stdout;
    assert_eq!(String::from_utf8_lossy(&version), nodemesh(&["--version"]));

    let mut mesh = Mesh::new(app_bin()).unwrap();
    mesh.app("node-b", "web", &[("app", "web")], &[]).unwrap();
    mesh.http_service("web");
    let work = mesh.topo().work_dir().to_owned();
    let config_dir = mesh.config_dir().to_owned();
    fs::create_dir_all(&config_dir).unwrap();

    // The CA, on a host of the nodes' network, as 03-ca.yaml runs it.
    let cacerts = plugin_certs(&work);
    let ca_host = mesh.topo_mut().add_host("ca", 200).unwrap();
    let config = config_dir.display().to_string();
    let ca_options = [
        format!("--network=ns:{}", netns_path(&ca_host).display()),
        format!("--user={CA_USER}:{CA_USER}"),
        "--read-only".to_owned(),
        "--cap-drop=ALL".to_owned(),
        "--security-opt=no-new-privileges".to_owned(),
        format!("--volume={}:/etc/cacerts:ro", cacerts.display()),
        format!("--volume={config}:{config}:ro"),
    ];
    let ca_args = [
        "ca",
        &format!("--listen={CA_ADDRESS}"),
        "--plugin-certs=/etc/cacerts",
        "--config-dir",
        &config,
    ];
    let ca = podman.container(&ca_options, &image, &ca_args);
    let ca: Vec<&str> = ca.iter().map(String::as_str).collect();
    // Started from the fabric's namespace: `ip netns exec`, which enters a
    // host's, hides the machine's cgroups from podman.
    let fabric = mesh.topo().fabric_netns().to_owned();
    mesh.topo_mut().spawn_in(&fabric, &ca, "mesh-ca").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mesh.topo().read_log("mesh-ca").contains("listening on") {
        assert!(
            Instant::now() < deadline,
            "the CA did not start from the image:\n{}",
            mesh.topo().read_log("mesh-ca")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Each node: its Node, its credential (the operator's step, on the
    // host), and the agent from the image as the DaemonSet runs it.
    let mut scripts = Vec::new();
    for node in ["node-a", "node-b"] {
        let info = mesh.topo().node(node).clone();
        let doc = [config::node(&info)];
        config::write(&config_dir, &format!("node-{node}.yaml"), &doc).unwrap();
        let credential = work.join(format!("credential-{node}"));
        nodemesh(&[
            "ca",
            "issue-node",
            &info.node_name,
            "--plugin-certs",
            &cacerts.display().to_string(),
            "--out",
            &credential.display().to_string(),
        ]);
        let script = work.join(format!("nodemesh-{node}.sh"));
        podman
            .daemonset_script(&script, &image, Some(&credential), &work)
            .unwrap();
        scripts.push((node, script));
    }
    let script_of = |node: &str| {
        let (_, script) = scripts.iter().find(|(n, _)| *n == node).unwrap();
        script.clone()
    };
    mesh.start_from(
        script_of,
        &[
            "--ca-address",
            CA_ADDRESS,
            "--node-credential",
            NODE_CREDENTIAL,
        ],
    )
    .unwrap();
    assert_eq!(podman.running().unwrap().len(), 3, "the CA and two agents");

    // A request between the nodes, over mutual TLS with certificates from
    // the CA in the image: the application sees the caller's identity and
    // its address (set up by `ip` in the image).
    let id = |account: &str| format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{account}");
    let replies = curl_many(mesh.topo(), CLIENT, &["http://web:9080/"], &[]).unwrap();
    assert_eq!(replies[0].status, 200, "{replies:?}");
    let doc = replies[0].json().unwrap();
    assert_eq!(
        doc["headers"]["x-forwarded-client-cert"],
        format!("By={};URI={}", id("default"), id(CLIENT))
    );
    assert_eq!(doc["client"], mesh.topo().pod(CLIENT).address.to_string());
    let certs = mesh.agent("node-a").cli(&["certs", "-o", "json"]).unwrap();
    let certs = String::from_utf8_lossy(&certs.stdout);
    assert!(certs.contains(&id(CLIENT)), "{certs}");
}

#[test]
fn the_daemonset_from_the_image_meshes_the_pods_of_a_labelled_namespace() {
    let podman = Podman::new().unwrap();
    let image = podman.load(&image_archive()).unwrap();
    let script = |topo: &Topology, node: &str| {
        let script = topo.work_dir().join(format!("nodemesh-{node}.sh"));
        podman.daemonset_script(&script, &image, None, topo.work_dir())
    };
    let mut cluster = KubeMesh::new_from(app_bin(), true, script).unwrap();
    cluster.client("node-a").unwrap();
    cluster
        .app("node-b", "web", &[("app", "web")], &[])
        .unwrap();
    cluster.service("web", 40).unwrap();
    cluster.wait_enrolled("node-a", 1).unwrap();
    cluster.wait_enrolled("node-b", 1).unwrap();
    assert_eq!(podman.running().unwrap().len(), 2, "an agent per node");

    let namespace = cluster.namespace().to_owned();
    let id = |account: &str| format!("spiffe://cluster.local/ns/{namespace}/sa/{account}");
    let url = cluster.url("web", "/");
    let replies = curl_many(cluster.topo(), "client", &[url.as_str()], &[]).unwrap();
    assert_eq!(replies[0].status, 200, "{replies:?}");
    let doc = replies[0].json().unwrap();
    assert_eq!(
        doc["headers"]["x-forwarded-client-cert"],
        format!("By={};URI={}", id("bookinfo"), id("client"))
    );
    assert_eq!(
        doc["client"],
        cluster.topo().pod("client").address.to_string()
    );
}
