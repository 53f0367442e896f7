//! A handle on a `nodemesh` agent running in a node of a [`Topology`].
//!
//! The agent's process is owned by the [`Agent`] (not by the topology), so
//! that dropping the agent can stop it and then run `nodemesh uninstall`
//! before the topology deletes the node's namespace. Declare the topology
//! first so it drops last:
//!
//! ```no_run
//! # use nodemesh_testbed::{Agent, Topology};
//! # fn main() -> anyhow::Result<()> {
//! let mut topo = Topology::new()?;
//! topo.add_node("node-a")?;
//! let config = topo.work_dir().join("config-a");
//! let agent = Agent::start(&mut topo, "node-a", &config)?;
//! println!("{}", agent.status_json()?);
//! # Ok(()) }
//! ```

use crate::topology::{pid_alive, Topology};
use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long [`Agent::start`] waits for `nodemesh status` to succeed.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
const READY_POLL: Duration = Duration::from_millis(50);
/// How long [`Agent::stop`] waits after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `RssFile`, ...).
pub fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status_kb(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A `kB` field of a `/proc/PID/status` text already read, so that several
/// fields can come from one reading.
pub fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The `nodemesh` binary under test: `$NODEMESH_BIN`, else
/// `$CARGO_TARGET_DIR/release/nodemesh`, else
/// `<workspace>/target/release/nodemesh`. Panics with a hint when missing.
pub fn nodemesh_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEMESH_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!(
                "NODEMESH_BIN={} does not exist: run `cargo xtask test` (it builds the agent)",
                p.display()
            );
        }
        return p;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory");
    let mut candidates = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(workspace.join(t).join("release/nodemesh"));
    }
    candidates.push(workspace.join("target/release/nodemesh"));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "the nodemesh binary was not found at {} and NODEMESH_BIN is not set: \
         run `cargo xtask test` (it builds the agent in release mode and runs the tests)",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    );
}

/// A running (or stopped) agent; see the module documentation.
pub struct Agent {
    node: String,
    node_name: String,
    netns: String,
    netns_path: PathBuf,
    config_dir: PathBuf,
    /// `--config-dir DIR`, or `--kubernetes --kubeconfig FILE`.
    source_args: Vec<String>,
    socket: PathBuf,
    log_path: PathBuf,
    bin: PathBuf,
    extra_args: Vec<String>,
    open_file_limit: Option<u64>,
    /// How long a start may take before it counts as failed.
    ready_timeout: Duration,
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
    starts: u32,
    /// Started while another agent owned the node: ready once it stands by.
    may_stand_by: bool,
    uninstall_on_drop: bool,
}

impl Agent {
    /// Starts `nodemesh agent --config-dir DIR --node-name NODE_NAME
    /// --admin-socket SOCK` in the node's namespace (`nsenter --net=`, so
    /// bpffs and cgroup2 stay visible), logging to
    /// `work_dir/agent-<node>.log`, and waits (≤ 20 s) until `nodemesh status
    /// -o json --socket SOCK` reports it ready (its first config load done).
    /// Creates `config_dir` if needed.
    pub fn start(topo: &mut Topology, node: &str, config_dir: &Path) -> Result<Agent> {
        Agent::start_with(topo, node, config_dir, &nodemesh_bin(), &[])
    }

    /// Like [`start`](Self::start) with an explicit binary and extra
    /// arguments appended to `nodemesh agent …` (kept for restarts).
    ///
    /// Unless they name a CA (`--ca-address`), the agent gets the
    /// topology's mesh CA (started on first use) and its node's credential,
    /// and a `Node` document with the node's fabric address is written into
    /// `config_dir`, so that agents reach each other over mutual TLS.
    pub fn start_with(
        topo: &mut Topology,
        node: &str,
        config_dir: &Path,
        bin: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        Agent::start_labelled(topo, node, config_dir, bin, extra_args, None)
    }

    /// Another agent for a node whose agent runs: admin socket
    /// `work_dir/<node>-<label>.sock`, log `agent-<node>-<label>.log`.
    /// Returns once it answers as a standby or as the ready owner; dropping
    /// it does not uninstall the node (see
    /// [`set_uninstall_on_drop`](Self::set_uninstall_on_drop)).
    pub fn start_another(
        topo: &mut Topology,
        node: &str,
        config_dir: &Path,
        label: &str,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let bin = nodemesh_bin();
        Agent::start_labelled(topo, node, config_dir, &bin, extra_args, Some(label))
    }

    fn start_labelled(
        topo: &mut Topology,
        node: &str,
        config_dir: &Path,
        bin: &Path,
        extra_args: &[&str],
        label: Option<&str>,
    ) -> Result<Agent> {
        let info = topo.node(node).clone();
        fs::create_dir_all(config_dir)
            .with_context(|| format!("creating {}", config_dir.display()))?;
        let config_dir = fs::canonicalize(config_dir)?;
        let mut extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        if !extra_args.iter().any(|a| a == "--ca-address") {
            let node_doc = format!("node-{}.yaml", info.node_name);
            crate::config::write(&config_dir, &node_doc, &[crate::config::node(&info)])?;
            let ca = topo.mesh_ca(&config_dir, bin)?;
            let credential = ca.issue_node(topo, &info.node_name)?;
            extra_args.extend([
                "--ca-address".to_owned(),
                ca.address().to_owned(),
                "--node-credential".to_owned(),
                credential.display().to_string(),
            ]);
        }
        let source_args = vec!["--config-dir".to_owned(), config_dir.display().to_string()];
        Agent::launch_new(topo, node, config_dir, source_args, bin, extra_args, label)
    }

    /// Starts `nodemesh agent --kubernetes --kubeconfig KUBECONFIG` on
    /// `node`, with the topology's mesh CA (started on first use, reading
    /// the API server too) and the node's credential, and waits until it is
    /// ready (its first snapshot from the API server applied). The node's
    /// `Node` object is the test's to create.
    pub fn start_kubernetes(topo: &mut Topology, node: &str, kubeconfig: &Path) -> Result<Agent> {
        Agent::start_kubernetes_from(topo, node, kubeconfig, &nodemesh_bin())
    }

    /// [`Agent::start_kubernetes`] with the agent run by `bin` (e.g. from
    /// the container image); the CA and the node's credential as there.
    pub fn start_kubernetes_from(
        topo: &mut Topology,
        node: &str,
        kubeconfig: &Path,
        bin: &Path,
    ) -> Result<Agent> {
        let info = topo.node(node).clone();
        let source_args = vec![
            "--kubernetes".to_owned(),
            "--kubeconfig".to_owned(),
            kubeconfig.display().to_string(),
        ];
        // `bin` may be a script that runs the agent from the container
        // image; the CA, a Deployment of its own in a cluster, runs from
        // the build.
        let ca = topo.mesh_ca_from(&source_args, &nodemesh_bin())?;
        let credential = ca.issue_node(topo, &info.node_name)?;
        let extra_args = vec![
            "--ca-address".to_owned(),
            ca.address().to_owned(),
            "--node-credential".to_owned(),
            credential.display().to_string(),
        ];
        let dir = kubeconfig.parent().unwrap_or(topo.work_dir()).to_owned();
        Agent::launch_new(topo, node, dir, source_args, bin, extra_args, None)
    }

    fn launch_new(
        topo: &mut Topology,
        node: &str,
        config_dir: PathBuf,
        source_args: Vec<String>,
        bin: &Path,
        extra_args: Vec<String>,
        label: Option<&str>,
    ) -> Result<Agent> {
        let info = topo.node(node).clone();
        let mut agent = Agent {
            node: info.name.clone(),
            node_name: info.node_name.clone(),
            netns: info.netns.clone(),
            netns_path: info.netns_path.clone(),
            config_dir,
            source_args,
            socket: topo.work_dir().join(match label {
                Some(label) => format!("{node}-{label}.sock"),
                None => format!("{node}.sock"),
            }),
            log_path: topo.work_dir().join(match label {
                Some(label) => format!("agent-{node}-{label}.log"),
                None => format!("agent-{node}.log"),
            }),
            bin: bin.to_path_buf(),
            extra_args,
            open_file_limit: None,
            ready_timeout: READY_TIMEOUT,
            child: None,
            last_exit: None,
            starts: 0,
            may_stand_by: label.is_some(),
            uninstall_on_drop: label.is_none(),
        };
        // On error `agent` drops here: stopped and uninstalled.
        agent.launch(topo)?;
        Ok(agent)
    }

    fn launch(&mut self, topo: &Topology) -> Result<()> {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        writeln!(
            log,
            "==== nodemesh-testbed: starting agent on {} (start #{}) ====",
            self.node_name, self.starts
        )?;
        let err = log.try_clone()?;
        let bin = self.bin.to_string_lossy().into_owned();
        let socket = self.socket.to_string_lossy().into_owned();
        let nofile = self
            .open_file_limit
            .map(|n| format!("--nofile={n}:{n}"))
            .unwrap_or_default();
        let mut args = if nofile.is_empty() {
            vec![]
        } else {
            // `prlimit` execs the agent: its pid stays the agent's.
            vec!["prlimit", nofile.as_str(), "--"]
        };
        args.extend([
            bin.as_str(),
            "agent",
            "--node-name",
            &self.node_name,
            "--admin-socket",
            &socket,
        ]);
        args.extend(self.source_args.iter().map(String::as_str));
        args.extend(self.extra_args.iter().map(String::as_str));
        let mut cmd = topo.command_in(&self.netns, &args)?;
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.stdout(log).stderr(err).process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", args.join(" ")))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    self.last_exit = Some(status);
                    bail!(
                        "agent on {} exited during startup ({status}); log:\n{}",
                        self.node,
                        self.log_tail(80)
                    );
                }
            }
            let out = self.cli(&["status", "-o", "json"])?;
            // The admin socket answers while the first config load runs; the agent is
            // ready (workloads enrolled per the config) once it says so.
            let ready = out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|status| {
                    status["ready"] != false || (self.may_stand_by && status["role"] == "standby")
                });
            if ready {
                return Ok(());
            }
            let last = format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
            if Instant::now() >= deadline {
                bail!(
                    "agent on {} not ready after {:?} (last `nodemesh status`: {last}); log:\n{}",
                    self.node,
                    self.ready_timeout,
                    self.log_tail(80)
                );
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// Runs the agent, from its next (re)start, with `RLIMIT_NOFILE` soft
    /// and hard set to `limit` (`None`: inherited), as on a host whose
    /// limit is that low.
    pub fn set_open_file_limit(&mut self, limit: Option<u64>) {
        self.open_file_limit = limit;
    }

    /// Gives the agent's next starts `timeout` to be ready (a large
    /// cluster takes longer to list than [`READY_TIMEOUT`]).
    pub fn set_ready_timeout(&mut self, timeout: Duration) {
        self.ready_timeout = timeout;
    }

    /// Whether dropping this agent runs `nodemesh uninstall` (by default,
    /// only for the node's first agent): give it to whichever agent owns
    /// the node last.
    pub fn set_uninstall_on_drop(&mut self, uninstall: bool) {
        self.uninstall_on_drop = uninstall;
    }

    /// Waits up to `timeout` for the agent to exit by itself (after a
    /// hand-over); true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    self.last_exit = Some(status);
                    return true;
                }
            } else {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The test's name of the node (`NodeInfo::name`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The agent's `--node-name`.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The config directory the agent watches.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// The admin socket, `work_dir/<node>.sock`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's log file, `work_dir/agent-<node>.log`.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Pid of the running agent, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the agent process runs.
    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(pid_alive)
    }

    /// How the agent process last exited (after [`kill`](Self::kill),
    /// [`stop`](Self::stop) or a failed start).
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }

    /// Runs `nodemesh <args> --socket SOCK` and returns its output, whatever
    /// its exit status.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("cannot run `nodemesh {}`", args.join(" ")))
    }

    /// `nodemesh status -o json`, parsed.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        self.cli_json("status")
    }

    /// `nodemesh connections -o json`: the recently finished connections.
    pub fn connections(&self) -> Result<Vec<serde_json::Value>> {
        let all = self.cli_json("connections")?;
        Ok(all.as_array().cloned().unwrap_or_default())
    }

    /// `nodemesh COMMAND -o json`, parsed.
    fn cli_json(&self, command: &str) -> Result<serde_json::Value> {
        let out = self.cli(&[command, "-o", "json"])?;
        if !out.status.success() {
            bail!(
                "`nodemesh {command} -o json` on {} failed ({}): {}",
                self.node,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`nodemesh {command} -o json` printed invalid JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn signal_and_wait(&mut self, sig: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Not reaped yet, so the pid (= process group id) is still ours.
        let pgid = Pid::from_raw(child.id() as i32);
        let _ = killpg(pgid, sig);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && pid_alive(child.id()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_alive(child.id()) {
            eprintln!(
                "agent on {} still running {grace:?} after {sig}: sending SIGKILL",
                self.node
            );
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        self.last_exit = child.wait().ok();
    }

    /// Crashes the agent: SIGKILL, then waits for it to exit.
    pub fn kill(&mut self) {
        self.signal_and_wait(Signal::SIGKILL, Duration::ZERO);
    }

    /// Stops the agent gracefully: SIGTERM, then waits (SIGKILL after 15 s).
    pub fn stop(&mut self) {
        self.signal_and_wait(Signal::SIGTERM, STOP_TIMEOUT);
    }

    /// Starts the agent again with the same arguments (stopping it first if
    /// it still runs) and waits until it is ready.
    pub fn restart(&mut self, topo: &mut Topology) -> Result<()> {
        if self.child.is_some() {
            self.stop();
        }
        self.launch(topo)
    }

    /// The agent's log so far (all starts).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs `nodemesh uninstall --node-name NODE_NAME` in the node's
    /// namespace (or the machine's, if that is gone).
    pub fn uninstall(&self) -> Result<()> {
        let mut cmd = if self.netns_path.exists() {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", self.netns_path.display()))
                .arg(&self.bin);
            c
        } else {
            Command::new(&self.bin)
        };
        cmd.args(["uninstall", "--node-name", &self.node_name])
            .stdin(Stdio::null());
        let out = cmd.output().context("cannot run `nodemesh uninstall`")?;
        if !out.status.success() {
            bail!(
                "`nodemesh uninstall --node-name {}` failed ({}): {} {}",
                self.node_name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- agent log of {} ({}) ----\n{}",
                self.node,
                self.log_path.display(),
                self.log_tail(200)
            );
        }
        if !self.uninstall_on_drop {
            return;
        }
        if let Err(e) = self.uninstall() {
            eprintln!("agent on {}: {e:#}", self.node);
        }
    }
}
