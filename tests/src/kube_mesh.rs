//! Istio's Bookinfo (or any `mesh-app` pods) on two nodes whose agents run
//! in Kubernetes mode, against the real API server of [`crate::kube`]: the
//! pods are Pod objects run as a kubelet would, the Services and Istio's
//! YAML are applied through the API. Shared by the Kubernetes tests and
//! `cargo xtask demo --kubernetes`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::kube::{ApiForwarder, ApiServer, Kube, PodSpec, RunningPod};
use crate::kube_endpoints::PORT_NAME;
use crate::mesh::count_by;
use crate::workload_apps::{curl_many, wait_listening};
use crate::{Agent, Topology};

/// The CRDs of `deploy/kubernetes/`.
pub const CRDS: &str = include_str!("../../deploy/kubernetes/01-crds.yaml");
/// The label that puts a namespace in the mesh.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";
/// The port every `mesh-app` listens on (Bookinfo's).
pub const APP_PORT: u16 = 9080;
/// Generous: the machine running the tests may be busy.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Two nodes with agents in Kubernetes mode, and the test's pods in one
/// Kubernetes namespace. Field order is drop order.
pub struct KubeMesh {
    agents: Vec<Agent>,
    mesh_bin: PathBuf,
    _forwarder: ApiForwarder,
    topo: Topology,
    /// After the topology: their cgroups go once their processes are gone.
    pods: BTreeMap<String, RunningPod>,
    kube: Kube,
    namespace: String,
    api: &'static ApiServer,
    /// The API server is this test's until dropped.
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl KubeMesh {
    /// Nodes `node-a` and `node-b` registered as Node objects, the CRDs of
    /// `deploy/kubernetes/`, a namespace (labelled for the mesh or not), and
    /// an agent on each node.
    pub fn new(mesh_bin: &Path, mesh_enabled: bool) -> Result<KubeMesh> {
        KubeMesh::new_from(mesh_bin, mesh_enabled, |_, _| Ok(crate::nodemesh_bin()))
    }

    /// [`KubeMesh::new`] with each node's agent run by `bin_of(topology,
    /// node)` (e.g. from the container image).
    pub fn new_from(
        mesh_bin: &Path,
        mesh_enabled: bool,
        bin_of: impl Fn(&Topology, &str) -> Result<PathBuf>,
    ) -> Result<KubeMesh> {
        let (api, turn) = ApiServer::shared()?;
        let mut topo = Topology::new()?;
        let forwarder = ApiForwarder::start(&mut topo, api)?;
        let kube = Kube::new(api.kubeconfig())?;
        kube.apply(CRDS, "default", false)?;
        let namespace = format!("t-{}", topo.prefix().to_ascii_lowercase());
        let label = if mesh_enabled {
            format!("\n  labels: {{{MESH_LABEL}: enabled}}")
        } else {
            String::new()
        };
        let ns =
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}{label}\n");
        kube.apply(&ns, "default", false)?;
        for node in ["node-a", "node-b"] {
            let info = topo.add_node(node)?;
            kube.register_node(&info.node_name, info.address)?;
        }
        let mut agents = Vec::new();
        for node in ["node-a", "node-b"] {
            let bin = bin_of(&topo, node)?;
            agents.push(Agent::start_kubernetes_from(
                &mut topo,
                node,
                forwarder.kubeconfig(),
                &bin,
            )?);
        }
        Ok(KubeMesh {
            agents,
            mesh_bin: mesh_bin.to_owned(),
            _forwarder: forwarder,
            topo,
            pods: BTreeMap::new(),
            kube,
            namespace,
            api,
            _turn: turn,
        })
    }

    /// The agent of `node`; panics if there is none.
    pub fn agent(&self, node: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.node() == node)
            .unwrap_or_else(|| panic!("no agent on {node}"))
    }

    pub fn agent_mut(&mut self, node: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.node() == node)
            .unwrap_or_else(|| panic!("no agent on {node}"))
    }

    /// Stops the agent of `node`, starts it again and waits until it is
    /// ready; returns how long the start took (not the stop).
    pub fn restart_agent(&mut self, node: &str) -> Result<Duration> {
        let agent = self
            .agents
            .iter_mut()
            .find(|a| a.node() == node)
            .with_context(|| format!("no agent on {node}"))?;
        agent.stop();
        let start = Instant::now();
        agent.restart(&mut self.topo)?;
        Ok(start.elapsed())
    }

    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    pub fn topo(&self) -> &Topology {
        &self.topo
    }

    pub fn topo_mut(&mut self) -> &mut Topology {
        &mut self.topo
    }

    /// An admin client of the API server.
    pub fn kube(&self) -> &Kube {
        &self.kube
    }

    pub fn api(&self) -> &'static ApiServer {
        self.api
    }

    /// The Kubernetes namespace of the pods.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `http://SERVICE.NAMESPACE:9080PATH`.
    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://{service}.{}:{APP_PORT}{path}", self.namespace)
    }

    /// A `mesh-app` pod (`--version` from its `version` label), in a
    /// kubelet-named cgroup; waits until it listens.
    pub fn app(
        &mut self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
        args: &[&str],
    ) -> Result<()> {
        self.app_in(node, name, labels, args, true)
    }

    /// [`Self::app`], in a kubelet-named cgroup or not (then the agent can
    /// find its network namespace only by its address).
    pub fn app_in(
        &mut self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
        args: &[&str],
        kubelet_cgroup: bool,
    ) -> Result<()> {
        let pod = self.topo.add_pod(node, name)?;
        let cmd = crate::mesh::app_command(&self.mesh_bin, name, labels, args);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let spec = PodSpec {
            namespace: &self.namespace.clone(),
            name,
            labels,
            service_account: "bookinfo",
            kubelet_cgroup,
            host_network: false,
        };
        let running = self.kube.run_pod(&mut self.topo, &pod, &spec, &cmd)?;
        wait_listening(&self.topo, &pod.netns, APP_PORT)?;
        self.pods.insert(name.to_owned(), running);
        Ok(())
    }

    /// The caller: a pod whose only process is `sleep` (as a pause
    /// container).
    pub fn client(&mut self, node: &str) -> Result<()> {
        let pod = self.topo.add_pod(node, "client")?;
        let spec = PodSpec {
            namespace: &self.namespace.clone(),
            name: "client",
            labels: &[("app", "client")],
            service_account: "client",
            kubelet_cgroup: true,
            host_network: false,
        };
        let running = self
            .kube
            .run_pod(&mut self.topo, &pod, &spec, &["sleep", "infinity"])?;
        self.pods.insert("client".to_owned(), running);
        Ok(())
    }

    /// A Service selecting `app: NAME` on port 9080 (by the pods' port name,
    /// as charts write it), with a fixed cluster IP (clear of the test bed's
    /// DNS address), and its EndpointSlice listing the pods running now.
    pub fn service(&self, name: &str, ip_suffix: u8) -> Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  \
             clusterIP: 10.96.100.{ip_suffix}\n  selector: {{app: {name}}}\n  \
             ports: [{{name: http, port: {APP_PORT}, targetPort: {PORT_NAME}}}]\n"
        );
        self.kube.apply(&yaml, &self.namespace, false)?;
        self.publish_endpoints(name, &[])
    }

    /// Rewrites Service `name`'s EndpointSlice with its pods but `left_out`
    /// (as the endpoint controller does when pods go or stop being ready).
    pub fn publish_endpoints(&self, name: &str, left_out: &[&str]) -> Result<()> {
        let selector = format!("app={name}");
        self.kube
            .publish_endpoint_slice(&self.namespace, name, &selector, APP_PORT, left_out)
    }

    /// Istio's Bookinfo as in [`crate::mesh::Mesh::bookinfo`]:
    /// `productpage` calls `details` and `reviews`; `reviews` v1 on node-a,
    /// v2 and v3 on node-b call `ratings`; and the client on node-a.
    pub fn bookinfo(&mut self) -> Result<()> {
        self.client("node-a")?;
        let (details, reviews) = (
            self.url("details", "/details/0"),
            self.url("reviews", "/reviews/0"),
        );
        let ratings = self.url("ratings", "/ratings/0");
        let calls_ratings = ["--call", &ratings, "--call-timeout-ms", "2500"];
        let apps: [(&str, &str, &str, &[&str]); 6] = [
            (
                "node-a",
                "productpage-v1",
                "productpage",
                &["--call", &details, "--call", &reviews],
            ),
            ("node-a", "details-v1", "details", &[]),
            ("node-a", "reviews-v1", "reviews", &[]),
            ("node-b", "reviews-v2", "reviews", &calls_ratings),
            ("node-b", "reviews-v3", "reviews", &calls_ratings),
            ("node-b", "ratings-v1", "ratings", &[]),
        ];
        for (node, name, app, args) in apps {
            let version = name.rsplit('-').next().unwrap_or("v1");
            self.app(node, name, &[("app", app), ("version", version)], args)?;
        }
        for (i, service) in ["productpage", "details", "reviews", "ratings"]
            .iter()
            .enumerate()
        {
            self.service(service, 10 + i as u8)?;
        }
        Ok(())
    }

    /// Waits until the agent on `node` has `n` pods enrolled.
    pub fn wait_enrolled(&self, node: &str, n: u64) -> Result<()> {
        wait_status(self.agent(node), &format!("{n} enrolled"), |s| {
            s["workloads"]["enrolled"].as_u64() == Some(n)
        })
    }

    /// `n` requests from the client to `url`, counted by the version that answered.
    pub fn versions(&self, url: &str, n: usize) -> Result<BTreeMap<String, u64>> {
        let urls = vec![url; n];
        let replies = curl_many(&self.topo, "client", &urls, &[])?;
        Ok(count_by(&replies, |r| r.version()))
    }

    /// Polls until every one of 10 requests to `url` is answered by
    /// `version`; returns how long it took.
    pub fn wait_only(&self, url: &str, version: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let versions = self.versions(url, 10)?;
            if versions.get(version) == Some(&10) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("{url} never answered only {version}: last {versions:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until 30 requests to `url` are answered by exactly `versions`
    /// (each at least once, no other).
    ///
    /// Waits longer than [`TIMEOUT`]: requests one at a time are balanced
    /// by each endpoint's peak latency, decaying over 10 s, so an endpoint
    /// whose first answer was slow (a cold start on a loaded machine: 20 ms
    /// against the others' 1 ms) gets its next request some 30 s later.
    pub fn wait_versions(&self, url: &str, versions: &[&str]) -> Result<()> {
        let deadline = Instant::now() + 3 * TIMEOUT;
        loop {
            let seen = self.versions(url, 30)?;
            let answered: Vec<&str> = seen.keys().map(String::as_str).collect();
            if answered == versions {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{url} never answered from exactly {versions:?}: last {seen:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a pod of the test's own making (see [`Kube::run_pod`]); it goes
    /// with the mesh.
    pub fn run_pod(&mut self, node: &str, spec: &PodSpec<'_>, cmd: &[&str]) -> Result<()> {
        let pod = self.topo.add_pod(node, spec.name)?;
        let running = self.kube.run_pod(&mut self.topo, &pod, spec, cmd)?;
        self.pods.insert(spec.name.to_owned(), running);
        Ok(())
    }

    /// Deletes pod `name` and stops its process, as a kubelet would.
    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        let gone = self
            .pods
            .remove(name)
            .with_context(|| format!("no pod {name}"))?;
        self.kube.delete_pod(&self.namespace, name)?;
        self.topo.stop_process(gone.pid)?;
        Ok(())
    }

    /// Applies YAML documents in the pods' namespace.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.kube.apply(yaml, &self.namespace, false).map(drop)
    }
}

impl Drop for KubeMesh {
    fn drop(&mut self) {
        // Pod addresses repeat between topologies: the next test must not
        // see these pods.
        for name in self.pods.keys() {
            if let Err(e) = self.kube.delete_pod(&self.namespace, name) {
                eprintln!("deleting pod {name}: {e:#}");
            }
        }
    }
}

/// Polls `agent`'s status until `done`, for [`TIMEOUT`].
pub fn wait_status(agent: &Agent, what: &str, done: impl Fn(&Value) -> bool) -> Result<()> {
    crate::mesh::wait_agent_for(agent, what, TIMEOUT, |status| Ok(done(status)))
}

/// The entry of workload `name` in the output of `nodemesh workloads -o json`.
pub fn workload<'a>(workloads: &'a Value, name: &str) -> Option<&'a Value> {
    workloads
        .as_array()?
        .iter()
        .find(|w| w["name"].as_str() == Some(name))
}

/// `nodemesh workloads -o json` of `agent`.
pub fn workloads(agent: &Agent) -> Result<Value> {
    let out = agent.cli(&["workloads", "-o", "json"])?;
    serde_json::from_slice(&out.stdout).context("nodemesh workloads -o json")
}
