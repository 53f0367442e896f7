//! An L7 mesh on the test bed: two nodes with one agent each, `mesh-app`
//! pods in the namespace `default` (where the pods' DNS search path makes
//! short names like `reviews` resolve, as in Istio's samples), and Istio's
//! Bookinfo built on it. Shared by the L7 tests and `cargo xtask demo`.
//!
//! ```no_run
//! # use nodemesh_testbed::mesh::Mesh;
//! # fn main() -> anyhow::Result<()> {
//! let mut mesh = Mesh::new("target/release/mesh-app".as_ref())?;
//! mesh.bookinfo()?;
//! mesh.start(&[])?;
//! mesh.apply("reviews.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\n…")?;
//! let replies = mesh.get_many("client", "http://reviews:9080/", 100, &[])?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::{self, ServicePort};
use crate::topology::{PodInfo, Topology};
use crate::workload_apps::{curl_many, python3, wait_listening, write_script, Reply};
use crate::Agent;

/// Every pod of the mesh lives here, like Istio's samples.
pub const NAMESPACE: &str = "default";
/// The port every `mesh-app` listens on (Bookinfo's).
pub const APP_PORT: u16 = 9080;
/// The caller: a pod with curl and Python but no server, on node-a.
pub const CLIENT: &str = "client";
/// How long [`Mesh::apply`] and [`Mesh::reject`] wait for both agents.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// The base config: the namespace, every workload, every Service.
const BASE_FILE: &str = "mesh.yaml";
/// Istio's `samples/bookinfo/networking/destination-rule-all.yaml`.
pub const DESTINATION_RULE_ALL: &str =
    include_str!("../../deploy/examples/bookinfo/destination-rule-all.yaml");

/// See the module documentation.
pub struct Mesh {
    // Field order is drop order: agents uninstall before the namespaces go.
    agents: Vec<Agent>,
    topo: Topology,
    config_dir: PathBuf,
    app_bin: PathBuf,
    base: Vec<String>,
    workloads_per_node: BTreeMap<String, u64>,
}

impl Mesh {
    /// Two nodes (`node-a`, `node-b`) and the [`CLIENT`] pod; no agents yet.
    pub fn new(app_bin: &Path) -> Result<Mesh> {
        let mut mesh = Mesh {
            agents: Vec::new(),
            topo: Topology::new()?,
            config_dir: PathBuf::new(),
            app_bin: app_bin.to_path_buf(),
            base: vec![config::namespace(NAMESPACE, true)],
            workloads_per_node: BTreeMap::new(),
        };
        mesh.config_dir = mesh.topo.work_dir().join("config");
        mesh.topo.add_node("node-a")?;
        mesh.topo.add_node("node-b")?;
        mesh.pod_as("node-a", CLIENT, &[("app", CLIENT)], CLIENT)?;
        Ok(mesh)
    }

    /// Adds a pod with its Workload (labels as given) on `node`.
    pub fn pod(&mut self, node: &str, name: &str, labels: &[(&str, &str)]) -> Result<PodInfo> {
        self.pod_as(node, name, labels, "default")
    }

    /// [`Mesh::pod`] running as `service_account` (its SPIFFE identity).
    pub fn pod_as(
        &mut self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
        service_account: &str,
    ) -> Result<PodInfo> {
        let pod = self.topo.add_pod(node, name)?;
        self.base.push(config::workload_with_account(
            &pod,
            NAMESPACE,
            labels,
            service_account,
        ));
        *self.workloads_per_node.entry(node.to_owned()).or_default() += 1;
        Ok(pod)
    }

    /// Adds a pod running `mesh-app --port 9080 --name NAME --version
    /// <labels' version or v1> ARGS` and waits until it listens.
    pub fn app(
        &mut self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
        args: &[&str],
    ) -> Result<PodInfo> {
        self.app_as(node, name, labels, "default", args)
    }

    /// [`Mesh::app`] running as `service_account`.
    pub fn app_as(
        &mut self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
        service_account: &str,
        args: &[&str],
    ) -> Result<PodInfo> {
        let pod = self.pod_as(node, name, labels, service_account)?;
        let cmd = app_command(&self.app_bin, name, labels, args);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        self.topo
            .spawn_in(&pod.netns, &cmd, &format!("app-{name}"))?;
        wait_listening(&self.topo, &pod.netns, APP_PORT)?;
        Ok(pod)
    }

    /// Adds a Service selecting `app: NAME`, port 9080 named `http`.
    pub fn http_service(&mut self, name: &str) {
        self.service(
            name,
            &[ServicePort {
                name: "http",
                port: APP_PORT,
                target_port: APP_PORT,
            }],
        );
    }

    /// Adds a pod `NAME` (label `app: NAME`, and `labels`) on `node` running
    /// the TCP echo server on `port`, and its Service `NAME` declaring the
    /// port opaque (`tcp-echo`).
    pub fn tcp_echo(
        &mut self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
        port: u16,
    ) -> Result<PodInfo> {
        let labels: Vec<_> = [("app", name)].iter().chain(labels).copied().collect();
        let pod = self.pod(node, name, &labels)?;
        self.service(
            name,
            &[ServicePort {
                name: "tcp-echo",
                port,
                target_port: port,
            }],
        );
        crate::workload_apps::start_tcp_echo(&mut self.topo, &pod, port)?;
        Ok(pod)
    }

    /// Adds a Service selecting `app: NAME` with any ports.
    pub fn service(&mut self, name: &str, ports: &[ServicePort<'_>]) {
        self.service_selecting(name, &[("app", name)], ports);
    }

    /// Adds a Service with any selector and ports.
    pub fn service_selecting(
        &mut self,
        name: &str,
        selector: &[(&str, &str)],
        ports: &[ServicePort<'_>],
    ) {
        self.base.push(config::service_with_ports(
            name, NAMESPACE, selector, ports, None,
        ));
    }

    /// Istio's Bookinfo: `productpage` calls `details` and `reviews`;
    /// `reviews` v1 (node-a), v2 and v3 (node-b); v2 and v3 call `ratings`
    /// (node-b) with a 2.5 s timeout, shorter than the 7 s delay of Istio's
    /// fault-injection task, as Bookinfo's reviews has one. Plus Istio's
    /// `destination-rule-all.yaml`, unchanged.
    pub fn bookinfo(&mut self) -> Result<()> {
        let ratings_call = [
            "--call",
            "http://ratings:9080/ratings/0",
            "--call-timeout-ms",
            "2500",
        ];
        self.app(
            "node-a",
            "productpage-v1",
            &[("app", "productpage"), ("version", "v1")],
            &[
                "--call",
                "http://details:9080/details/0",
                "--call",
                "http://reviews:9080/reviews/0",
            ],
        )?;
        self.app(
            "node-a",
            "details-v1",
            &[("app", "details"), ("version", "v1")],
            &[],
        )?;
        self.app(
            "node-a",
            "reviews-v1",
            &[("app", "reviews"), ("version", "v1")],
            &[],
        )?;
        self.app(
            "node-b",
            "reviews-v2",
            &[("app", "reviews"), ("version", "v2")],
            &ratings_call,
        )?;
        self.app(
            "node-b",
            "reviews-v3",
            &[("app", "reviews"), ("version", "v3")],
            &ratings_call,
        )?;
        self.app(
            "node-b",
            "ratings-v1",
            &[("app", "ratings"), ("version", "v1")],
            &[],
        )?;
        for service in ["productpage", "details", "reviews", "ratings"] {
            self.http_service(service);
        }
        config::write_raw(
            &self.config_dir,
            "destination-rule-all.yaml",
            DESTINATION_RULE_ALL,
        )
    }

    /// Writes the base config and starts one agent per node with `flags`;
    /// returns once both enrolled their workloads.
    pub fn start(&mut self, flags: &[&str]) -> Result<()> {
        self.start_from(|_| crate::nodemesh_bin(), flags)
    }

    /// [`Mesh::start`] with each node's agent run by `bin_of(node)` (e.g.
    /// from the container image).
    pub fn start_from(&mut self, bin_of: impl Fn(&str) -> PathBuf, flags: &[&str]) -> Result<()> {
        config::write(&self.config_dir, BASE_FILE, &self.base)?;
        for node in ["node-a", "node-b"] {
            let bin = bin_of(node);
            let agent = Agent::start_with(&mut self.topo, node, &self.config_dir, &bin, flags)?;
            self.agents.push(agent);
        }
        for agent in &self.agents {
            wait_enrolled(agent, self.workloads_per_node.get(agent.node()).copied())?;
        }
        Ok(())
    }

    /// Restarts the agent of `node` after `configure` changed how it runs
    /// (e.g. [`Agent::set_open_file_limit`]); returns once it enrolled its
    /// workloads again.
    pub fn restart_agent(&mut self, node: &str, configure: impl FnOnce(&mut Agent)) -> Result<()> {
        let agent = self
            .agents
            .iter_mut()
            .find(|a| a.node() == node)
            .with_context(|| format!("no agent on {node}"))?;
        configure(agent);
        agent.restart(&mut self.topo)?;
        wait_enrolled(agent, self.workloads_per_node.get(node).copied())
    }

    /// The test topology.
    pub fn topo(&self) -> &Topology {
        &self.topo
    }

    /// The test topology, to start other servers in its pods.
    pub fn topo_mut(&mut self) -> &mut Topology {
        &mut self.topo
    }

    /// The agent of `node`.
    pub fn agent(&self, node: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.node() == node)
            .unwrap_or_else(|| panic!("no agent on {node}"))
    }

    /// The directory both agents load.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Writes `file` into the config directory and waits until both agents
    /// run a new generation without error.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        self.write_and_wait(file, yaml, |status, before| {
            let error = &status["config"]["last_error"];
            if error.is_string() && *error != before["config"]["last_error"] {
                bail!("the agent rejected {file}: {error}");
            }
            Ok(status["config"]["generation"].as_u64() > before["config"]["generation"].as_u64())
        })
    }

    /// Applies Istio's `virtual-service-all-v1.yaml` (as that file) with its
    /// `reviews` object replaced by the Bookinfo sample `reviews_sample`
    /// (e.g. `virtual-service-reviews-v3`), as Istio's tasks do.
    pub fn apply_all_v1_with_reviews(&self, reviews_sample: &str) -> Result<()> {
        let all_v1 = bookinfo_example("virtual-service-all-v1");
        let reviews = bookinfo_example(reviews_sample);
        let yaml = replace_object(&all_v1, "reviews", &reviews);
        self.apply("virtual-service-all-v1.yaml", &yaml)
    }

    /// Removes `file` from the config directory and waits until both agents
    /// run a new generation without error.
    pub fn delete(&self, file: &str) -> Result<()> {
        let remove = || config::remove(&self.config_dir, file);
        self.change_and_wait(&format!("removing {file}"), remove, |status, before| {
            Ok(status["config"]["last_error"].is_null()
                && status["config"]["generation"].as_u64()
                    > before["config"]["generation"].as_u64())
        })
    }

    /// Writes `file` into the config directory, expecting both agents to
    /// reject it and keep their generation; returns the error they report.
    pub fn reject(&self, file: &str, yaml: &str) -> Result<String> {
        self.write_and_wait(file, yaml, |status, before| {
            if status["config"]["generation"] != before["config"]["generation"] {
                bail!("the agent accepted {file}");
            }
            Ok(status["config"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(file)))
        })?;
        let status = self.agents[0].status_json()?;
        Ok(status["config"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn write_and_wait(
        &self,
        file: &str,
        yaml: &str,
        done: impl Fn(&Value, &Value) -> Result<bool>,
    ) -> Result<()> {
        let write = || config::write_raw(&self.config_dir, file, yaml);
        self.change_and_wait(&format!("loading {file}"), write, done)
    }

    /// Makes `change` to the config directory, then waits until `done`
    /// (given each agent's status now and before) holds on both agents.
    fn change_and_wait(
        &self,
        what: &str,
        change: impl FnOnce() -> Result<()>,
        done: impl Fn(&Value, &Value) -> Result<bool>,
    ) -> Result<()> {
        let before: Vec<Value> = self
            .agents
            .iter()
            .map(Agent::status_json)
            .collect::<Result<_>>()?;
        change()?;
        for (agent, before) in self.agents.iter().zip(before) {
            wait_agent(agent, what, |s| done(s, &before))?;
        }
        Ok(())
    }

    /// `n` GETs of `url` from `pod` by one curl process (keep-alive), with
    /// extra curl arguments (`-H`, `--http2-prior-knowledge`, …).
    pub fn get_many(&self, pod: &str, url: &str, n: usize, args: &[&str]) -> Result<Vec<Reply>> {
        let urls = vec![url; n];
        curl_many(&self.topo, pod, &urls, args)
    }

    /// One GET of `url` from `pod`, whatever the answer.
    pub fn get_one(&self, pod: &str, url: &str, args: &[&str]) -> Result<Reply> {
        Ok(curl_many(&self.topo, pod, &[url], args)?.remove(0))
    }

    /// One GET of `url` from `pod`; its JSON body, failing on anything but
    /// a 200 with JSON.
    pub fn get_json(&self, pod: &str, url: &str, args: &[&str]) -> Result<Value> {
        let reply = self.get_one(pod, url, args)?;
        match reply.json() {
            Some(doc) if reply.status == 200 => Ok(doc),
            _ => bail!("GET {url} from {pod}: {reply:?}"),
        }
    }

    /// Requests the `mesh-app` of `pod` served, asked inside the pod itself
    /// (not through the mesh).
    pub fn served(&self, pod: &str) -> Result<u64> {
        let url = format!("http://127.0.0.1:{APP_PORT}/_stats");
        let doc = self.get_json(pod, &url, &[])?;
        doc["requests"]
            .as_u64()
            .with_context(|| format!("{pod}: /_stats answered {doc}"))
    }

    /// `n` unary gRPC calls of `method` on `target` (`host:port`) from
    /// `pod`, with Python's grpcio and `metadata` (`name=value`); the
    /// number of calls per answering `version`, or per gRPC status code
    /// name for failed calls.
    pub fn grpc_many(
        &self,
        pod: &str,
        target: &str,
        method: &str,
        n: usize,
        metadata: &[&str],
    ) -> Result<BTreeMap<String, u64>> {
        let netns = self.topo.pod(pod).netns.clone();
        self.grpc_many_in(&netns, target, method, n, metadata)
    }

    /// [`Mesh::grpc_many`] from any network namespace (a host outside the
    /// mesh); `metadata` may start with `--authority=HOST` (`:authority`,
    /// which a Gateway's hostnames match).
    pub fn grpc_many_in(
        &self,
        netns: &str,
        target: &str,
        method: &str,
        n: usize,
        metadata: &[&str],
    ) -> Result<BTreeMap<String, u64>> {
        let script = write_script(&self.topo, "grpc_client.py", GRPC_CLIENT_PY)?;
        let script = script.to_string_lossy().into_owned();
        let n = n.to_string();
        let mut cmd = vec![python3(), &script, target, method, &n];
        cmd.extend_from_slice(metadata);
        let out = self.topo.run_in(netns, &cmd)?;
        // Why calls failed, for the test's output.
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!(
                "gRPC client in {netns} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "gRPC client printed {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// A unary gRPC client (Debian's python3-grpcio) sending raw bytes, so no
/// generated stubs are needed; prints `{version or status: count}`.
const GRPC_CLIENT_PY: &str = r#"
import json, os, sys
# getaddrinfo, like every other client in the pod (not c-ares).
os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
import grpc

target, method, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
args, options = sys.argv[4:], []
if args and args[0].startswith("--authority="):
    options.append(("grpc.default_authority", args.pop(0).split("=", 1)[1]))
metadata = [tuple(kv.split("=", 1)) for kv in args]
call = grpc.insecure_channel(target, options=options).unary_unary(method)
counts = {}
for _ in range(n):
    try:
        key = json.loads(call(b"ping", metadata=metadata, timeout=5))["version"]
    except grpc.RpcError as e:
        key = e.code().name
        print("%s: %s" % (key, e.details()), file=sys.stderr)
    counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts))
"#;

/// Istio's Bookinfo sample `deploy/examples/bookinfo/<name>.yaml`, as is.
pub fn bookinfo_example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/bookinfo")
        .join(format!("{name}.yaml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Waits until `agent` has enrolled `expected` workloads.
fn wait_enrolled(agent: &Agent, expected: Option<u64>) -> Result<()> {
    wait_agent(agent, "enrolling its workloads", |s| {
        Ok(s["workloads"]["enrolled"].as_u64() == expected)
    })
}

/// `mesh-app --port 9080 --name NAME --version <labels' version or v1> ARGS`.
pub(crate) fn app_command(
    bin: &Path,
    name: &str,
    labels: &[(&str, &str)],
    args: &[&str],
) -> Vec<String> {
    let version = labels
        .iter()
        .find(|(k, _)| *k == "version")
        .map_or("v1", |(_, v)| v);
    let port = APP_PORT.to_string();
    let head = [
        &*bin.to_string_lossy(),
        "--port",
        &port,
        "--name",
        name,
        "--version",
        version,
    ]
    .map(str::to_owned);
    head.into_iter()
        .chain(args.iter().map(|a| a.to_string()))
        .collect()
}

/// Polls `agent`'s status until `done` says so, for [`RELOAD_TIMEOUT`].
fn wait_agent(agent: &Agent, what: &str, done: impl Fn(&Value) -> Result<bool>) -> Result<()> {
    wait_agent_for(agent, what, RELOAD_TIMEOUT, done)
}

/// Polls `agent`'s status until `done` says so, for `timeout`.
pub(crate) fn wait_agent_for(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = agent.status_json()?;
        if done(&status)? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not finish {what} in {timeout:?}: {status:#}\n{}",
                agent.node(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The version of `reviews` that served each productpage request.
pub fn reviews_versions(replies: &[Reply]) -> BTreeMap<String, u64> {
    count_by(replies, |r| match r.json() {
        Some(doc) => doc["calls"][1]["body"]["version"]
            .as_str()
            .unwrap_or("no reviews")
            .to_owned(),
        None => format!("status {}", r.status),
    })
}

/// Counts in which every one of `n` replies had `key`.
pub fn only(key: &str, n: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([(key.to_owned(), n)])
}

/// Counts `key(reply)` over replies.
pub fn count_by(replies: &[Reply], key: impl Fn(&Reply) -> String) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(key(reply)).or_default() += 1;
    }
    counts
}

/// `yaml` (documents separated by `---`) with the object named `name`
/// replaced by `replacement`, as `kubectl apply` of the replacement would
/// leave it. Panics if there is no such object.
pub fn replace_object(yaml: &str, name: &str, replacement: &str) -> String {
    let marker = format!("\n  name: {name}\n");
    let docs: Vec<&str> = yaml
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .collect();
    assert!(
        docs.iter().any(|d| d.contains(&marker)),
        "no object named {name} in {yaml}"
    );
    docs.iter()
        .map(|doc| {
            if doc.contains(&marker) {
                replacement
            } else {
                doc
            }
        })
        .map(|doc| doc.trim_end().to_owned() + "\n")
        .collect::<Vec<_>>()
        .join("---\n")
}
