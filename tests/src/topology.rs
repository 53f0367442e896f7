//! A test cluster built entirely out of network namespaces.
//!
//! ```text
//!                       netns {prefix}-fabric
//!                  ┌──────────── br0 (no address) ────────────┐
//!                  │ n1                                    n2 │
//!   netns {prefix}-node-a                       netns {prefix}-node-b
//!     fabric0 10.0.0.1/24                         fabric0 10.0.0.2/24
//!     br0     10.1.1.1/24, ip_forward=1           br0     10.1.2.1/24, ip_forward=1
//!     route 10.1.2.0/24 via 10.0.0.2              route 10.1.1.0/24 via 10.0.0.1
//!      │vp1          │vp2                          │vp1
//!   netns {prefix}-web   netns {prefix}-db       netns {prefix}-api
//!     eth0 10.1.1.11/24   eth0 10.1.1.12/24        eth0 10.1.2.11/24
//!     default via 10.1.1.1                         default via 10.1.2.1
//! ```
//!
//! Node `i` (1, 2, …) owns the pod subnet `10.1.<i>.0/24` and the address
//! `10.0.0.<i>` on the inter-node fabric; the `j`-th pod of a node gets
//! `10.1.<i>.<j+10>`. Every veth is created with its two ends directly inside
//! the namespaces (`ip -n A link add … peer name … netns B`), so nothing is
//! ever placed in the machine's own network namespace.
//!
//! Processes run in pods through `ip netns exec` (so that
//! `/etc/netns/<netns>/resolv.conf` applies); processes run in nodes (and in
//! the fabric) through `nsenter --net=`, because `ip netns exec` remounts
//! `/sys`, which hides bpffs and the cgroup2 mount from the agent.
//!
//! Dropping a [`Topology`] stops every process it spawned, deletes every
//! namespace it made (the veths go with them), removes the `/etc/netns`
//! directories and the work directory — also when the test panics. When a
//! signal ends the test process instead, `LEFTOVER_CLEANUP` does the same
//! from the process's [`ExitCleanup`] watchdog, and also removes what the
//! topology's agents had pinned.

use crate::ca::MeshCa;
use crate::exit_cleanup::ExitCleanup;
use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::hash_map::RandomState;
use std::fs::{self, OpenOptions};
use std::hash::BuildHasher;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Bridge in every node (pods attach to it) and in the fabric namespace.
pub const BRIDGE: &str = "br0";
/// A node's interface on the inter-node fabric.
pub const NODE_UPLINK: &str = "fabric0";
/// A pod's only interface (besides `lo`).
pub const POD_IFACE: &str = "eth0";
/// The cluster DNS address written into every pod's resolv.conf.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The DNS search path written into every pod's resolv.conf.
pub const DNS_SEARCH: &str = "default.svc.cluster.local svc.cluster.local cluster.local";
/// Set this variable to keep the work directory (logs, sockets, scripts)
/// after the topology is dropped.
pub const KEEP_DIR_ENV: &str = "NODEMESH_KEEP_TEST_DIR";

/// How long a process gets after SIGTERM before SIGKILL, on drop.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// `bash -c LEFTOVER_CLEANUP - PREFIX [WORK_DIR]` removes what a topology
/// whose test process died without dropping it left: the processes in its
/// namespaces and in its pod cgroups (the Kubernetes tests'), its agents'
/// pinned eBPF links (unpinning the last reference detaches a program), the
/// namespaces, their `/etc/netns` directories and the work directory.
const LEFTOVER_CLEANUP: &str = r#"p=$1 work=$2 found=() killed=()
cgroup=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)/$p.slice
for _ in 1 2 3 4 5 6 7 8 9 10; do
  pids=()
  for ns in /var/run/netns/"$p"-*; do
    [ -e "$ns" ] && pids+=($(ip netns pids "${ns##*/}"))
  done
  [ ${#pids[@]} -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null
  populated=
  if [ -f "$cgroup/cgroup.events" ] && grep -q 'populated 1' "$cgroup/cgroup.events"; then
    echo 1 >"$cgroup/cgroup.kill"
    populated=1
  fi
  [ ${#pids[@]} -eq 0 ] && [ -z "$populated" ] && break
  killed+=("${pids[@]}")
  sleep 0.2
done
[ ${#killed[@]} -gt 0 ] && found+=("processes: ${killed[*]}")
[ -d "$cgroup" ] && find "$cgroup" -depth -type d -exec rmdir {} + && found+=("$cgroup")
for pin in /sys/fs/bpf/nodemesh/"$p"-*; do
  [ -e "$pin" ] && rm -rf "$pin" && found+=("$pin")
done
rmdir /sys/fs/bpf/nodemesh 2>/dev/null
deleted=()
for ns in /var/run/netns/"$p"-*; do
  [ -e "$ns" ] && ip netns del "${ns##*/}" && deleted+=("${ns##*/}")
done
[ ${#deleted[@]} -gt 0 ] && found+=("network namespaces: ${deleted[*]}")
deleted=()
for dir in /etc/netns/"$p"-* "$work"; do
  [ -n "$dir" ] && [ -e "$dir" ] && rm -rf "$dir" && deleted+=("$dir")
done
[ ${#deleted[@]} -gt 0 ] && found+=("directories: ${deleted[*]}")
if [ ${#found[@]} -gt 0 ]; then
  printf 'nodemesh-testbed: topology %s outlived the process that built it (a test or the bench); removed:\n' "$p" >&2
  printf '  %s\n' "${found[@]}" >&2
fi"#;

/// Proxy variables that must never leak into processes in the topology: a
/// test's traffic goes to test addresses only, never through a proxy.
const PROXY_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

/// A simulated node: a network namespace that runs one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The name the test gave, e.g. `node-a`.
    pub name: String,
    /// Unique across concurrent tests, `{prefix}-node-a`; the agent's
    /// `--node-name` and the `node` of its workloads.
    pub node_name: String,
    /// Name of the network namespace (same as `node_name`).
    pub netns: String,
    /// `/var/run/netns/<netns>`.
    pub netns_path: PathBuf,
    /// 1 for the first node, 2 for the second, …
    pub index: u8,
    /// Address on the inter-node fabric, `10.0.0.<index>`.
    pub address: Ipv4Addr,
    /// The node's address on its pod bridge, `10.1.<index>.1` (the pods'
    /// default gateway).
    pub gateway: Ipv4Addr,
}

/// A simulated pod: a network namespace with a veth to its node's bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The name the test gave, e.g. `web`.
    pub name: String,
    /// The test's name of the node it runs on (`NodeInfo::name`).
    pub node: String,
    /// The unique node name (`NodeInfo::node_name`), as used in config.
    pub node_name: String,
    /// Name of the network namespace, `{prefix}-<name>`.
    pub netns: String,
    /// `/var/run/netns/<netns>`.
    pub netns_path: PathBuf,
    /// `10.1.<node index>.<j + 10>` for the node's `j`-th pod.
    pub address: Ipv4Addr,
}

struct Spawned {
    child: Child,
    log_name: String,
    cmd: String,
    reaped: bool,
}

/// A cluster of nodes and pods made of network namespaces; see the module
/// documentation for the layout.
pub struct Topology {
    prefix: String,
    work_dir: PathBuf,
    fabric: String,
    nodes: Vec<NodeInfo>,
    pods: Vec<PodInfo>,
    /// Every namespace this topology created, in creation order.
    namespaces: Vec<String>,
    /// `/etc/netns/<netns>` directories this topology created.
    etc_dirs: Vec<PathBuf>,
    procs: Vec<Spawned>,
    /// The mesh CA its agents get their certificates from, once started.
    mesh_ca: Option<MeshCa>,
    /// [`LEFTOVER_CLEANUP`], withdrawn once `Drop` has cleaned up.
    leftover_cleanup: Option<ExitCleanup>,
}

/// Names of existing network namespaces that start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = match fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// `/var/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs a command to completion; a non-zero exit becomes an error carrying
/// the command line, the exit status and stderr.
pub fn run_checked(cmd: &[&str]) -> Result<Output> {
    let (prog, args) = cmd.split_first().context("empty command")?;
    let mut c = Command::new(prog);
    c.args(args).stdin(Stdio::null());
    for v in PROXY_ENV {
        c.env_remove(v);
    }
    let out = c
        .output()
        .with_context(|| format!("cannot run `{}`", cmd.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Connects namespace `ns` (interface `iface`, `address`/24, up) to the
/// bridge in `bridge_ns` through a veth pair whose other end is `peer`.
fn plug(ns: &str, iface: &str, bridge_ns: &str, peer: &str, address: Ipv4Addr) -> Result<()> {
    ip(&[
        "-n", ns, "link", "add", iface, "type", "veth", "peer", "name", peer, "netns", bridge_ns,
    ])?;
    ip(&["-n", bridge_ns, "link", "set", peer, "master", BRIDGE, "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{address}/24"),
        "dev",
        iface,
    ])?;
    ip(&["-n", ns, "link", "set", iface, "up"])
}

fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = vec!["ip"];
    cmd.extend_from_slice(args);
    run_checked(&cmd).map(|_| ())
}

fn new_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let h = RandomState::new().hash_one((std::process::id(), t, n));
    format!("nm{:06x}", h & 0xff_ffff)
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !ok {
        bail!("invalid {what} name {name:?}: use 1-40 characters of [a-z0-9-]");
    }
    if name == "fabric" {
        bail!("{what} name \"fabric\" is reserved");
    }
    Ok(())
}

/// True while `pid` exists and has not exited (a zombie counts as exited).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the last ')' (the command name may contain one).
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => false,
        },
        Err(_) => false,
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Topology {
    /// Makes an empty topology: a unique prefix, a work directory and the
    /// fabric namespace that will join the nodes.
    pub fn new() -> Result<Topology> {
        let mut attempt = 0;
        let (prefix, work_dir) = loop {
            attempt += 1;
            let prefix = new_prefix();
            let work_dir = std::env::temp_dir().join(format!("nodemesh-test-{prefix}"));
            if netns_with_prefix(&prefix).is_empty() && fs::create_dir(&work_dir).is_ok() {
                break (prefix, work_dir);
            }
            if attempt >= 100 {
                bail!("cannot find an unused topology prefix (last tried {prefix})");
            }
        };
        let fabric = format!("{prefix}-fabric");
        let work = work_dir
            .to_str()
            .context("the temporary directory's path is not UTF-8")?;
        let mut cleanup = vec!["bash", "-c", LEFTOVER_CLEANUP, "-", &prefix];
        if std::env::var_os(KEEP_DIR_ENV).is_none() {
            cleanup.push(work);
        }
        let leftover_cleanup = match ExitCleanup::register(&cleanup) {
            Ok(registered) => Some(registered),
            Err(e) => {
                let _ = fs::remove_dir(&work_dir);
                return Err(e);
            }
        };
        // From here on `Drop` cleans up whatever the setup below made.
        let mut topo = Topology {
            prefix,
            work_dir,
            fabric: fabric.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            etc_dirs: Vec::new(),
            procs: Vec::new(),
            mesh_ca: None,
            leftover_cleanup,
        };
        topo.add_netns(&fabric)?;
        ip(&["-n", &fabric, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", BRIDGE, "up"])?;
        Ok(topo)
    }

    /// The unique prefix of every namespace name, e.g. `nm3fa9c1`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Unique temporary directory for logs, sockets and scripts; removed on
    /// drop unless `NODEMESH_KEEP_TEST_DIR` is set.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Name of the namespace that holds the bridge joining all nodes.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        if self.namespaces.iter().any(|n| n == name) {
            bail!("network namespace {name} already exists in this topology");
        }
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// Adds a node: a namespace with IP forwarding, a pod bridge
    /// `10.1.<i>.1/24`, an uplink `10.0.0.<i>/24` on the fabric and routes to
    /// every other node's pod subnet (and theirs to this one).
    pub fn add_node(&mut self, name: &str) -> Result<NodeInfo> {
        validate_name("node", name)?;
        if self.nodes.iter().any(|n| n.name == name) {
            bail!("node {name} already exists");
        }
        if self.nodes.len() >= 250 {
            bail!("too many nodes");
        }
        let index = self.nodes.len() as u8 + 1;
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)
            .with_context(|| format!("adding node {name}"))?;
        let node = NodeInfo {
            name: name.to_string(),
            node_name: netns.clone(),
            netns: netns.clone(),
            netns_path: netns_path(&netns),
            index,
            address: Ipv4Addr::new(10, 0, 0, index),
            gateway: Ipv4Addr::new(10, 1, index, 1),
        };
        self.setup_node(&node)
            .with_context(|| format!("setting up node {name} (netns {netns})"))?;
        self.nodes.push(node.clone());
        Ok(node)
    }

    fn setup_node(&self, node: &NodeInfo) -> Result<()> {
        let ns = node.netns.as_str();
        let i = node.index;
        run_checked(&[
            "nsenter",
            &format!("--net={}", node.netns_path.display()),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        // Pod bridge.
        ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", node.gateway),
            "dev",
            BRIDGE,
        ])?;
        ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
        // Uplink to the fabric.
        let fabric = self.fabric.clone();
        plug(ns, NODE_UPLINK, &fabric, &format!("n{i}"), node.address)?;
        // Routes between this node's pod subnet and every other node's.
        for other in &self.nodes {
            let k = other.index;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &format!("10.1.{k}.0/24"),
                "via",
                &other.address.to_string(),
            ])?;
            ip(&[
                "-n",
                &other.netns,
                "route",
                "add",
                &format!("10.1.{i}.0/24"),
                "via",
                &node.address.to_string(),
            ])?;
        }
        Ok(())
    }

    /// The topology's mesh CA, reading `config_dir`: started from `bin` on
    /// first use (the agent binary that first needs it: a bench or a
    /// training run of another build has no `target/release/nodemesh`),
    /// stopped with the other processes.
    pub fn mesh_ca(&mut self, config_dir: &Path, bin: &Path) -> Result<MeshCa> {
        std::fs::create_dir_all(config_dir)?;
        let source = ["--config-dir".to_owned(), config_dir.display().to_string()];
        self.mesh_ca_from(&source, bin)
    }

    /// The topology's mesh CA, with its config source given as its
    /// arguments (e.g. `--kubernetes --kubeconfig FILE`).
    pub fn mesh_ca_from(&mut self, source: &[String], bin: &Path) -> Result<MeshCa> {
        if let Some(ca) = &self.mesh_ca {
            return Ok(ca.clone());
        }
        let ca = MeshCa::start(self, source, bin)?;
        self.mesh_ca = Some(ca.clone());
        Ok(ca)
    }

    /// Adds a namespace `<prefix>-<name>` plugged onto the inter-node fabric
    /// at `10.0.0.<index>/24`, a separate "machine" (e.g. the mesh CA); use an
    /// index above the nodes' (they count up from 1). Returns its netns name.
    pub fn add_host(&mut self, name: &str, index: u8) -> Result<String> {
        validate_name("host", name)?;
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)
            .with_context(|| format!("adding host {name}"))?;
        let fabric = self.fabric.clone();
        plug(
            &netns,
            NODE_UPLINK,
            &fabric,
            &format!("h{index}"),
            Ipv4Addr::new(10, 0, 0, index),
        )?;
        Ok(netns)
    }

    /// Adds a pod on `node`: a namespace with `lo` up, `eth0` (a veth into
    /// the node's bridge) with `10.1.<i>.<j+10>/24`, a default route via the
    /// node, and `/etc/netns/<netns>/resolv.conf` pointing at the cluster DNS.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<PodInfo> {
        validate_name("pod", name)?;
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("add_pod({name}): no node {node}"))?
            .clone();
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod {name} already exists");
        }
        let j = self.pods.iter().filter(|p| p.node == node.name).count() + 1;
        if j + 10 > 254 {
            bail!("too many pods on node {}", node.name);
        }
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)
            .with_context(|| format!("adding pod {name}"))?;
        let pod = PodInfo {
            name: name.to_string(),
            node: node.name.clone(),
            node_name: node.node_name.clone(),
            netns: netns.clone(),
            netns_path: netns_path(&netns),
            address: Ipv4Addr::new(10, 1, node.index, j as u8 + 10),
        };
        self.setup_pod(&node, &pod, j)
            .with_context(|| format!("setting up pod {name} (netns {netns})"))?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    fn setup_pod(&mut self, node: &NodeInfo, pod: &PodInfo, j: usize) -> Result<()> {
        let ns = pod.netns.as_str();
        plug(ns, POD_IFACE, &node.netns, &format!("vp{j}"), pod.address)?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &node.gateway.to_string(),
        ])?;

        let etc = Path::new("/etc/netns").join(ns);
        fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        self.etc_dirs.push(etc.clone());
        let resolv = etc.join("resolv.conf");
        fs::write(
            &resolv,
            format!("nameserver {CLUSTER_DNS}\nsearch {DNS_SEARCH}\n"),
        )
        .with_context(|| format!("writing {}", resolv.display()))?;
        Ok(())
    }

    /// The node named `name` (as given to [`add_node`](Self::add_node)).
    /// Panics if there is none.
    pub fn node(&self, name: &str) -> &NodeInfo {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("topology {} has no node {name:?}", self.prefix))
    }

    /// The pod named `name` (as given to [`add_pod`](Self::add_pod)).
    /// Panics if there is none.
    pub fn pod(&self, name: &str) -> &PodInfo {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("topology {} has no pod {name:?}", self.prefix))
    }

    /// All nodes, in the order they were added.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// All pods, in the order they were added.
    pub fn pods(&self) -> &[PodInfo] {
        &self.pods
    }

    /// Namespaces of this topology that still exist (empty after drop).
    pub fn leftovers(&self) -> Vec<String> {
        netns_with_prefix(&self.prefix)
    }

    /// Builds the command that runs `cmd` inside the namespace `netns` (a full
    /// namespace name): `nsenter --net=` for nodes and the fabric (keeps the
    /// machine's /sys, so bpffs and cgroup2 stay visible), `ip netns exec`
    /// for everything else (applies `/etc/netns/<netns>/`). Both exec the
    /// program, so the child's pid is the program's pid. Proxy variables are
    /// removed from the environment.
    pub fn command_in(&self, netns: &str, cmd: &[&str]) -> Result<Command> {
        if cmd.is_empty() {
            bail!("empty command for netns {netns}");
        }
        let path = netns_path(netns);
        if !path.exists() {
            bail!("network namespace {netns} does not exist");
        }
        let is_node = netns == self.fabric || self.nodes.iter().any(|n| n.netns == netns);
        let mut c = if is_node {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", path.display()));
            c
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns]);
            c
        };
        c.args(cmd).stdin(Stdio::null());
        for v in PROXY_ENV {
            c.env_remove(v);
        }
        Ok(c)
    }

    /// Path of the log file for `log_name` in the work directory (`.log` is
    /// appended when the name has no extension).
    pub fn log_path(&self, log_name: &str) -> PathBuf {
        if Path::new(log_name).extension().is_some() {
            self.work_dir.join(log_name)
        } else {
            self.work_dir.join(format!("{log_name}.log"))
        }
    }

    /// The log written so far under `log_name` (empty if none).
    pub fn read_log(&self, log_name: &str) -> String {
        fs::read(self.log_path(log_name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Starts `cmd` in the background inside `netns` (see
    /// [`command_in`](Self::command_in)), in its own process group, with
    /// stdout and stderr appended to [`log_path(log_name)`](Self::log_path).
    /// The process (group) is stopped when the topology is dropped.
    pub fn spawn_in(&mut self, netns: &str, cmd: &[&str], log_name: &str) -> Result<u32> {
        let mut c = self.command_in(netns, cmd)?;
        self.spawn_logged(&mut c, format!("{netns}: {}", cmd.join(" ")), log_name)
    }

    /// Spawns `c` in a process group of its own, logging to `log_name`, and
    /// tracks it; `what` describes it in errors.
    fn spawn_logged(&mut self, c: &mut Command, what: String, log_name: &str) -> Result<u32> {
        let log_path = self.log_path(log_name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let err = log.try_clone()?;
        c.stdout(log).stderr(err).process_group(0);
        for v in PROXY_ENV {
            c.env_remove(v);
        }
        let child = c
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        let pid = child.id();
        self.procs.push(Spawned {
            child,
            log_name: log_name.to_string(),
            cmd: what,
            reaped: false,
        });
        Ok(pid)
    }

    /// Like [`spawn_in`](Self::spawn_in), with the process moved into the
    /// cgroup directory `cgroup` first (before `ip netns exec` hides the
    /// cgroup filesystem), as a kubelet starts a pod's containers.
    pub fn spawn_in_cgroup(
        &mut self,
        netns: &str,
        cgroup: &Path,
        cmd: &[&str],
        log_name: &str,
    ) -> Result<u32> {
        let procs = cgroup.join("cgroup.procs").display().to_string();
        let mut wrapped = vec![
            "sh",
            "-c",
            r#"echo $$ > "$0" && exec "$@""#,
            procs.as_str(),
            "ip",
            "netns",
            "exec",
            netns,
        ];
        wrapped.extend_from_slice(cmd);
        let mut c = Command::new(wrapped[0]);
        c.args(&wrapped[1..]).stdin(Stdio::null());
        self.spawn_logged(&mut c, format!("{netns}: {}", cmd.join(" ")), log_name)
    }

    /// Runs `cmd` inside `netns` in the foreground and returns its output,
    /// whatever its exit status.
    pub fn run_in(&self, netns: &str, cmd: &[&str]) -> Result<Output> {
        self.command_in(netns, cmd)?
            .output()
            .with_context(|| format!("cannot run `{}` in {netns}", cmd.join(" ")))
    }

    /// Like [`run_in`](Self::run_in), but a non-zero exit is an error that
    /// carries the command line and stderr; returns stdout.
    pub fn run_in_ok(&self, netns: &str, cmd: &[&str]) -> Result<String> {
        let out = self.run_in(netns, cmd)?;
        if !out.status.success() {
            bail!(
                "`{}` in {netns} failed ({}): {} {}",
                cmd.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// True while a process started by [`spawn_in`](Self::spawn_in) runs.
    pub fn is_running(&self, pid: u32) -> bool {
        self.procs
            .iter()
            .any(|p| p.child.id() == pid && !p.reaped && pid_alive(pid))
    }

    /// Describes spawned processes in `netns` that have already exited, with
    /// the tail of their logs (for error messages).
    pub fn exited_in(&self, netns: &str) -> Option<String> {
        let mut msg = String::new();
        for p in &self.procs {
            if p.cmd.starts_with(&format!("{netns}: ")) && (p.reaped || !pid_alive(p.child.id())) {
                msg.push_str(&format!(
                    "process {} (`{}`) has exited; log:\n{}\n",
                    p.child.id(),
                    p.cmd,
                    tail(&self.read_log(&p.log_name), 30)
                ));
            }
        }
        (!msg.is_empty()).then_some(msg)
    }

    /// Stops one spawned process: SIGTERM to its process group, SIGKILL after
    /// a grace period, then reaps it.
    pub fn stop_process(&mut self, pid: u32) -> Result<ExitStatus> {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.child.id() == pid && !p.reaped)
            .with_context(|| format!("no running process {pid} in this topology"))?;
        stop_spawned(p, Signal::SIGTERM, TERM_GRACE).with_context(|| format!("reaping {pid}"))
    }

    /// Kills one spawned process (SIGKILL to its process group) and reaps it.
    pub fn kill_process(&mut self, pid: u32) -> Result<ExitStatus> {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.child.id() == pid && !p.reaped)
            .with_context(|| format!("no running process {pid} in this topology"))?;
        stop_spawned(p, Signal::SIGKILL, Duration::ZERO).with_context(|| format!("reaping {pid}"))
    }

    fn stop_all(&mut self) {
        let pending: Vec<&mut Spawned> = self.procs.iter_mut().filter(|p| !p.reaped).collect();
        // The leaders are not reaped yet, so their pids (= process group ids)
        // cannot have been reused: signalling the groups is safe.
        for p in &pending {
            let _ = killpg(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline && pending.iter().any(|p| pid_alive(p.child.id())) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in pending {
            // Also catches stragglers in the group whose leader has exited.
            let _ = killpg(Pid::from_raw(p.child.id() as i32), Signal::SIGKILL);
            let _ = p.child.wait();
            p.reaped = true;
        }
    }
}

/// Sends `sig` to the process group, waits up to `grace` for the leader to
/// exit, then SIGKILLs the group and reaps the leader.
fn stop_spawned(p: &mut Spawned, sig: Signal, grace: Duration) -> std::io::Result<ExitStatus> {
    let pgid = Pid::from_raw(p.child.id() as i32);
    let _ = killpg(pgid, sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pid_alive(p.child.id()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    let status = p.child.wait();
    p.reaped = true;
    status
}

impl Drop for Topology {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        self.stop_all();
        if panicking {
            // The work dir (and so the logs) is about to go: show them.
            let mut err = std::io::stderr().lock();
            for p in &self.procs {
                let log = self.read_log(&p.log_name);
                let _ = writeln!(
                    err,
                    "---- log of `{}` ({}) ----\n{}",
                    p.cmd,
                    self.log_path(&p.log_name).display(),
                    tail(&log, 60)
                );
            }
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("topology {}: {e:#}", self.prefix);
            }
        }
        for dir in &self.etc_dirs {
            if let Err(e) = fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("topology {}: removing {}: {e}", self.prefix, dir.display());
                }
            }
        }
        if std::env::var_os(KEEP_DIR_ENV).is_some() {
            eprintln!(
                "topology {}: keeping work dir {} ({KEEP_DIR_ENV} is set)",
                self.prefix,
                self.work_dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.work_dir) {
            eprintln!(
                "topology {}: removing {}: {e}",
                self.prefix,
                self.work_dir.display()
            );
        }
        if let Some(cleanup) = self.leftover_cleanup.take() {
            cleanup.withdraw();
        }
    }
}
