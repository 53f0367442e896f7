//! A real Kubernetes API server for the agent's Kubernetes mode, and what a
//! kubelet would do for the test's pods.
//!
//! The API server and its etcd come from `../shared/k8s` (`start.sh`; the
//! binaries from `$KUBEBUILDER_ASSETS` when set), started once per test
//! process on the machine's loopback. Agents live in the topology's
//! namespaces and cannot reach that loopback: an [`ApiForwarder`] listens on
//! a host of the topology's fabric (`10.0.0.201:6443`) and relays to it, and
//! [`ApiForwarder::kubeconfig`] points agents there (with the serving
//! certificate's name, `kubernetes`).
//!
//! There is no kubelet: [`Kube::run_pod`] creates the Pod object, runs its
//! process in a network namespace of the test bed inside a cgroup named as
//! the kubelet names it (with the pod's UID), and sets the Pod's status.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::exit_cleanup::ExitCleanup;
use crate::topology::{netns_path, pid_alive, PodInfo, Topology};

/// The fabric host the API server is reached at by the topology.
const FORWARDER_INDEX: u8 = 201;
const FORWARDER_PORT: u16 = 6443;
/// A name in the API server's certificate.
const SERVER_NAME: &str = "kubernetes";
/// Field manager of the test's server-side applies.
const MANAGER: &str = "nodemesh-test";
/// How long to wait for the API server to answer again after a restart.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

/// The API server shared by the tests of one process; see the module docs.
pub struct ApiServer {
    dir: PathBuf,
    kubeconfig: PathBuf,
    port: u16,
    /// `kube-apiserver` and its arguments, to run it again after a stop.
    command: Vec<String>,
    /// The running API server: started by `start.sh` (not our child), or
    /// again by [`ApiServer::start`].
    running: Mutex<Running>,
}

struct Running {
    pid: u32,
    child: Option<Child>,
}

/// Tests that stop the API server or run pods (whose addresses repeat
/// between topologies) take turns through it.
static TURN: Mutex<()> = Mutex::new(());

impl ApiServer {
    /// The process's API server, started on first use (3-15 s); the guard
    /// gives the caller the server to itself until dropped.
    pub fn shared() -> Result<(&'static ApiServer, MutexGuard<'static, ()>)> {
        static SHARED: OnceLock<Result<ApiServer, String>> = OnceLock::new();
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let server = SHARED.get_or_init(|| ApiServer::launch().map_err(|e| format!("{e:#}")));
        let server = match server {
            Ok(server) => server,
            Err(e) => bail!("{e}"),
        };
        // A test that failed while it had stopped the server leaves it so.
        server.stop_replicas();
        let pid = server.running.lock().unwrap_or_else(|e| e.into_inner()).pid;
        if !pid_alive(pid) {
            server.start(server.port)?;
        }
        Ok((server, turn))
    }

    fn launch() -> Result<ApiServer> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("tests/ has a parent directory")?;
        let k8s = workspace.join("../shared/k8s");
        let start = k8s.join("start.sh");
        if !start.is_file() {
            bail!(
                "{} is missing: the Kubernetes tests need the API server it starts",
                start.display()
            );
        }
        let dir = std::env::temp_dir().join(format!("nodemesh-k8s-{}", std::process::id()));
        clean_up_after_exit(&k8s.join("stop.sh"), &dir)?;
        let mut cmd = Command::new(&start);
        cmd.arg(&dir).stderr(Stdio::inherit());
        match std::env::var_os("KUBEBUILDER_ASSETS") {
            Some(assets) => {
                eprintln!(
                    "kube-apiserver and etcd from KUBEBUILDER_ASSETS={}",
                    Path::new(&assets).display()
                );
                cmd.env("K8S_BIN_DIR", assets);
            }
            None => eprintln!(
                "kube-apiserver and etcd from {} (KUBEBUILDER_ASSETS is not set)",
                k8s.join("bin").display()
            ),
        }
        let out = cmd.output().context("running start.sh")?;
        if !out.status.success() {
            bail!("start.sh failed ({})", out.status);
        }
        let kubeconfig = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let pid: u32 = read_trimmed(&dir.join("kube-apiserver.pid"))?.parse()?;
        let command: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))?
            .split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let port = command
            .iter()
            .find_map(|a| a.strip_prefix("--secure-port="))
            .context("kube-apiserver runs without --secure-port=")?
            .parse()?;
        Ok(ApiServer {
            dir,
            kubeconfig,
            port,
            command,
            running: Mutex::new(Running { pid, child: None }),
        })
    }

    /// The admin kubeconfig (on the machine's loopback).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops kube-apiserver (etcd keeps the data).
    pub fn stop(&self) -> Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let pid = running.pid;
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while pid_alive(pid) && Instant::now() < deadline {
            if let Some(child) = &mut running.child {
                let _ = child.try_wait();
            }
            thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(mut child) = running.child.take() {
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts kube-apiserver again with its arguments, on `port` (its own,
    /// or another one to stand for a second replica), and waits until it
    /// answers. Only the server on its own port is stopped by `stop.sh`.
    pub fn start(&self, port: u16) -> Result<ApiReplica> {
        let args = self.command[1..].iter().map(|a| match a {
            a if a.starts_with("--secure-port=") => format!("--secure-port={port}"),
            a => a.clone(),
        });
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("kube-apiserver-{port}.log")))?;
        let child = Command::new(&self.command[0])
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("restarting kube-apiserver")?;
        let pid = child.id();
        let replica = ApiReplica {
            kubeconfig: self.dir.join(format!("admin-{port}.kubeconfig")),
        };
        fs::write(
            &replica.kubeconfig,
            read_trimmed(&self.kubeconfig)?.replace(
                &format!("https://127.0.0.1:{}", self.port),
                &format!("https://127.0.0.1:{port}"),
            ),
        )?;
        if port == self.port {
            fs::write(self.dir.join("kube-apiserver.pid"), pid.to_string())?;
            *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Running {
                pid,
                child: Some(child),
            };
        } else {
            // Dropped with the replica's handle.
            REPLICAS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(child);
        }
        let kube = Kube::new(&replica.kubeconfig)?;
        let deadline = Instant::now() + RESTART_TIMEOUT;
        while kube.block_on(kube.client().apiserver_version()).is_err() {
            if Instant::now() > deadline {
                bail!("kube-apiserver on port {port} did not come back");
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(replica)
    }

    /// Stops the replicas started on other ports than the server's own.
    pub fn stop_replicas(&self) {
        for mut child in REPLICAS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

static REPLICAS: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// A kube-apiserver started by [`ApiServer::start`].
pub struct ApiReplica {
    kubeconfig: PathBuf,
}

impl ApiReplica {
    /// An admin kubeconfig for this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
}

/// Stops the servers and removes `dir` once this test process has exited,
/// however it ends. Each run leaves 60 MB of etcd data otherwise (the
/// watchdog of `start.sh` stops the servers but keeps the directory).
fn clean_up_after_exit(stop: &Path, dir: &Path) -> Result<()> {
    const STOP_IF_THERE: &str = r#"[ -d "$2" ] && exec "$1" "$2" --rm"#;
    let path = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .with_context(|| format!("{} is not UTF-8", p.display()))
    };
    let (stop, dir) = (path(stop)?, path(dir)?);
    // Never withdrawn: the server lives as long as the process.
    ExitCleanup::register(&["sh", "-c", STOP_IF_THERE, "-", &stop, &dir])?;
    Ok(())
}

fn read_trimmed(path: &Path) -> Result<String> {
    Ok(fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// A free port on the loopback, for a second API server.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Relays `10.0.0.201:6443` on a topology's fabric to the API server on the
/// machine's loopback; stops when dropped.
pub struct ApiForwarder {
    stop: Arc<AtomicBool>,
    kubeconfig: PathBuf,
}

impl ApiForwarder {
    pub fn start(topo: &mut Topology, api: &ApiServer) -> Result<ApiForwarder> {
        let netns = topo.add_host("k8s-api", FORWARDER_INDEX)?;
        let listen = SocketAddr::from(([10, 0, 0, FORWARDER_INDEX], FORWARDER_PORT));
        let listener = listen_in(&netns_path(&netns), listen)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, api.port()));
        let stopped = stop.clone();
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        thread::spawn(move || relay(client, upstream));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let admin = fs::read_to_string(api.kubeconfig())?;
        let local = format!("server: https://127.0.0.1:{}", api.port());
        let line = admin
            .lines()
            .find(|l| l.trim() == local)
            .context("the admin kubeconfig names no loopback server")?;
        let indent = &line[..line.len() - line.trim_start().len()];
        let kubeconfig = topo.work_dir().join("kubeconfig");
        fs::write(
            &kubeconfig,
            admin.replace(
                line,
                &format!(
                    "{indent}server: https://{listen}\n{indent}tls-server-name: {SERVER_NAME}"
                ),
            ),
        )?;
        Ok(ApiForwarder { stop, kubeconfig })
    }

    /// An admin kubeconfig reaching the API server from the topology.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// This kubeconfig with `token` as the only credential, for a service
    /// account's view of the API server; written next to it as `name`.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.kubeconfig.with_file_name(name);
        kubeconfig_with_token(&self.kubeconfig, token, &path)?;
        Ok(path)
    }
}

/// Writes to `out` the kubeconfig `from` with `token` as its only credential.
pub fn kubeconfig_with_token(from: &Path, token: &str, out: &Path) -> Result<()> {
    let text = fs::read_to_string(from)?;
    let mut doc: Value = serde_saphyr::from_str(&text).context("parsing the kubeconfig")?;
    doc["users"] = json!([{ "name": "token", "user": { "token": token } }]);
    for context in doc["contexts"].as_array_mut().into_iter().flatten() {
        context["context"]["user"] = json!("token");
    }
    fs::write(out, serde_json::to_string(&doc)?)?;
    Ok(())
}

impl Drop for ApiForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A listening socket in the network namespace at `netns` (made on a thread
/// of its own, which enters it; the socket stays there).
fn listen_in(netns: &Path, addr: SocketAddr) -> Result<TcpListener> {
    let netns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    thread::spawn(move || -> Result<TcpListener> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpListener::bind(addr)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the listening thread panicked"))?
}

fn relay(client: TcpStream, upstream: SocketAddr) {
    let Ok(server) = TcpStream::connect(upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nonblocking(false);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    thread::spawn(move || copy(client2, server2));
    copy(server, client);
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// A client of the API server, with a runtime of its own for the
/// synchronous tests.
pub struct Kube {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl Kube {
    pub fn new(kubeconfig: &Path) -> Result<Kube> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
        let client = runtime.block_on(async {
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await?;
            anyhow::Ok(Client::try_from(config)?)
        })?;
        Ok(Kube { runtime, client })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Applies every document of `yaml` (server-side apply, as `kubectl
    /// apply --server-side` does), in `namespace` unless a document names
    /// its own; with `dry_run`, the API server validates and admits each
    /// without storing it.
    pub fn apply(&self, yaml: &str, namespace: &str, dry_run: bool) -> Result<Vec<DynamicObject>> {
        let mut applied = Vec::new();
        for doc in serde_saphyr::from_multiple::<Value>(yaml).context("parsing YAML")? {
            if doc.is_null() {
                continue;
            }
            applied.push(self.apply_object(doc, namespace, dry_run)?);
        }
        Ok(applied)
    }

    fn apply_object(&self, doc: Value, namespace: &str, dry_run: bool) -> Result<DynamicObject> {
        let api_version = doc["apiVersion"].as_str().context("no apiVersion")?;
        let kind = doc["kind"].as_str().context("no kind")?;
        let name = doc["metadata"]["name"]
            .as_str()
            .context("no name")?
            .to_owned();
        let namespace = doc["metadata"]["namespace"].as_str().unwrap_or(namespace);
        let api = self.api(api_version, kind, namespace)?;
        let mut params = PatchParams::apply(MANAGER).force();
        params.dry_run = dry_run;
        self.block_on(api.patch(&name, &params, &Patch::Apply(&doc)))
            .with_context(|| format!("applying {kind} {name}"))
    }

    /// Object `kind` `name` (in `namespace` if the kind is namespaced), as
    /// the API server has it now, status included; `None` if absent.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<DynamicObject>> {
        let api = self.api(api_version, kind, namespace)?;
        Ok(self.block_on(api.get_opt(name))?)
    }

    /// The API of `kind`, in `namespace` if it is namespaced.
    fn api(&self, api_version: &str, kind: &str, namespace: &str) -> Result<Api<DynamicObject>> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        // A CRD applied just before takes a moment to be served.
        let deadline = Instant::now() + Duration::from_secs(20);
        let (resource, caps) = loop {
            match self.block_on(discovery::pinned_kind(&self.client, &gvk)) {
                Ok(found) => break found,
                Err(e) if Instant::now() > deadline => {
                    bail!("the API server does not serve {api_version} {kind}: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        };
        Ok(match caps.scope {
            Scope::Cluster => Api::all_with(self.client(), &resource),
            Scope::Namespaced => Api::namespaced_with(self.client(), namespace, &resource),
        })
    }

    /// Deletes `kind` `name` in `namespace` (no-op if absent).
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, _) = self.block_on(discovery::pinned_kind(&self.client, &gvk))?;
        let api: Api<DynamicObject> = Api::namespaced_with(self.client(), namespace, &resource);
        match self.block_on(api.delete(name, &DeleteParams::default())) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets (or with `None` removes) a label of namespace `name`.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client());
        let patch = json!({ "metadata": { "labels": { key: value } } });
        self.block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))?;
        Ok(())
    }

    /// Creates (or updates) the Node object of a topology node, with its
    /// fabric address as `InternalIP`.
    pub fn register_node(&self, node_name: &str, address: Ipv4Addr) -> Result<()> {
        let api: Api<Node> = Api::all(self.client());
        let node = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": node_name } });
        let params = PatchParams::apply(MANAGER).force();
        self.block_on(api.patch(node_name, &params, &Patch::Apply(&node)))?;
        let status = json!({ "status": { "addresses": [
            { "type": "InternalIP", "address": address.to_string() }
        ] } });
        self.block_on(api.patch_status(
            node_name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        ))?;
        Ok(())
    }

    /// Deletes a Pod object at once (no kubelet confirms termination).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        match self.block_on(api.delete(name, &params)) {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The notes of the Events about `kind` `name` in `namespace`.
    pub fn event_notes(&self, namespace: &str, kind: &str, name: &str) -> Result<Vec<String>> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client(), namespace);
        let events = self.block_on(api.list(&Default::default()))?;
        Ok(events
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name)
                })
            })
            .filter_map(|e| e.note)
            .collect())
    }

    /// A token of service account `namespace/name` (TokenRequest API).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let request: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": { "audiences": [], "expirationSeconds": 3600 }
        }))?;
        let answer =
            self.block_on(api.create_token_request(name, &PostParams::default(), &request))?;
        answer
            .status
            .map(|s| s.token)
            .context("the TokenRequest has no token")
    }
}

/// A pod as the test runs it: its Pod object, its namespace of the test bed
/// and its process.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub service_account: &'a str,
    /// Run in a kubelet-named cgroup (else found by address only).
    pub kubelet_cgroup: bool,
    pub host_network: bool,
}

/// The pod's cgroup, `<cgroup2>/<topology>.slice/kubepods.slice/
/// kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _>.slice`;
/// removed when dropped (after its processes are gone).
pub struct PodCgroup {
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn create(topo: &Topology, uid: &str) -> Result<PodCgroup> {
        let root = cgroup2_root()?;
        let mut dirs = Vec::new();
        let mut path = root.join(format!("{}.slice", topo.prefix()));
        for segment in [
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
        ] {
            dirs.push(path.clone());
            path = path.join(segment);
        }
        dirs.push(path.clone());
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(PodCgroup { dirs })
    }

    pub fn path(&self) -> &Path {
        self.dirs.last().expect("a pod cgroup has directories")
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // Fails while another pod's cgroup is still inside: it goes last.
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted.
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 file system is mounted")
}

/// A running pod of the test.
pub struct RunningPod {
    pub uid: String,
    pub info: PodInfo,
    pub pid: u32,
    pub cgroup: Option<PodCgroup>,
}

impl Kube {
    /// Creates the Pod on `pod`'s node, runs `cmd` in `pod`'s network
    /// namespace (for a host-network pod, in its node's), in a kubelet-named
    /// cgroup if asked, then marks the Pod Running with the pod's address
    /// (its node's for a host-network pod).
    pub fn run_pod(
        &self,
        topo: &mut Topology,
        pod: &PodInfo,
        spec: &PodSpec<'_>,
        cmd: &[&str],
    ) -> Result<RunningPod> {
        let labels: serde_json::Map<String, Value> = spec
            .labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": spec.name, "namespace": spec.namespace, "labels": labels },
            "spec": {
                "nodeName": pod.node_name,
                "serviceAccountName": spec.service_account,
                "hostNetwork": spec.host_network,
                "containers": [{ "name": "app", "image": "nodemesh.invalid/mesh-app" }],
            },
        });
        let api: Api<Pod> = Api::namespaced(self.client(), spec.namespace);
        let created =
            self.block_on(api.create(&PostParams::default(), &serde_json::from_value(object)?))?;
        let uid = created.metadata.uid.context("the Pod has no uid")?;
        let (netns, address) = if spec.host_network {
            let node = topo.node(&pod.node).clone();
            (node.netns, node.address)
        } else {
            (pod.netns.clone(), pod.address)
        };
        let log = format!("pod-{}", spec.name);
        let (pid, cgroup) = if spec.kubelet_cgroup {
            let cgroup = PodCgroup::create(topo, &uid)?;
            let pid = topo.spawn_in_cgroup(&netns, cgroup.path(), cmd, &log)?;
            (pid, Some(cgroup))
        } else {
            (topo.spawn_in(&netns, cmd, &log)?, None)
        };
        let status = json!({ "status": {
            "phase": "Running",
            "podIP": address.to_string(),
            "podIPs": [{ "ip": address.to_string() }],
        } });
        self.block_on(api.patch_status(
            spec.name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        ))?;
        Ok(RunningPod {
            uid,
            info: pod.clone(),
            pid,
            cgroup,
        })
    }
}
