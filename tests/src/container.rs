//! The container image of `cargo xtask image`, run by a real container
//! runtime (podman with runc, Debian's) the way the Kubernetes manifests run
//! it: the mesh CA as its unprivileged user on a read-only root, the agent
//! as root with the DaemonSet's capabilities, host PID namespace, its
//! node's network and the DaemonSet's host mounts.
//!
//! Each [`Podman`] keeps its images and containers in a directory of its
//! own (not the machine's podman storage), and when dropped removes every
//! container it started and that directory: declare it before the topology
//! and the agents that run through it, so that it drops after them. If a
//! signal ends the test instead, the process's [`ExitCleanup`] does the same.

use anyhow::{Context, Result};
use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::exit_cleanup::ExitCleanup;
use crate::topology::run_checked;

/// The image archive under test: `$NODEMESH_IMAGE` (set by `cargo xtask
/// test`, from the binary under test). Panics with a hint when missing.
pub fn image_archive() -> PathBuf {
    match std::env::var_os("NODEMESH_IMAGE").map(PathBuf::from) {
        Some(p) if p.is_file() => p,
        other => panic!(
            "NODEMESH_IMAGE ({other:?}) does not name the image archive: run the tests with \
             `cargo xtask test` (it writes the image of the agent under test), or write one \
             with `cargo xtask image --output FILE` and set NODEMESH_IMAGE=FILE"
        ),
    }
}

/// The capabilities `deploy/kubernetes/04-agent.yaml` adds after dropping all.
pub const AGENT_CAPABILITIES: &str = "BPF,PERFMON,NET_ADMIN,SYS_ADMIN,SYS_PTRACE,SYS_RESOURCE";
/// `runAsUser` and `runAsGroup` of `deploy/kubernetes/03-ca.yaml`.
pub const CA_USER: u32 = 65532;
/// Every container started here carries this label, so drop finds them.
const LABEL: &str = "nodemesh-testbed=1";

/// `sh -c LEFTOVER_CLEANUP - DIR PODMAN_COMMAND…`: what `Drop` does, once a
/// test process ended without it. Their processes were in the topology's
/// namespaces, so they are gone: removing the containers unmounts what
/// podman mounted for them.
const LEFTOVER_CLEANUP: &str = r#"dir=$1; shift
"$@" rm --force --all --time=1 >/dev/null 2>&1
if grep -qF " $dir/" /proc/self/mounts; then
  echo "podman: mounts left under $dir: not removing it" >&2
else
  rm -rf "$dir" && echo "nodemesh-testbed: podman's $dir outlived its test process; removed" >&2
fi"#;

/// A podman with private storage; see the module documentation.
pub struct Podman {
    dir: PathBuf,
    /// [`LEFTOVER_CLEANUP`], withdrawn once `Drop` has removed `dir`.
    leftover_cleanup: Option<ExitCleanup>,
}

impl Podman {
    /// Podman with its storage in a new directory under the system's
    /// temporary directory, removed on drop.
    pub fn new() -> Result<Podman> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nodemesh-podman-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut podman = Podman {
            dir,
            leftover_cleanup: None,
        };
        let dir = podman
            .dir
            .to_str()
            .context("the temporary directory is not UTF-8")?;
        let podman_command = podman.global_args();
        let mut cleanup = vec!["sh", "-c", LEFTOVER_CLEANUP, "-", dir];
        cleanup.extend(podman_command.iter().map(String::as_str));
        podman.leftover_cleanup = Some(ExitCleanup::register(&cleanup)?);
        Ok(podman)
    }

    /// `podman` and its global options: storage here (vfs: plain
    /// directories, nothing mounted to clean up), runc (crun refuses hosts
    /// that mix cgroup v1 and v2), cgroupfs (no systemd here).
    fn global_args(&self) -> Vec<String> {
        vec![
            "podman".to_owned(),
            format!("--root={}", self.dir.join("storage").display()),
            format!("--runroot={}", self.dir.join("run").display()),
            "--storage-driver=vfs".to_owned(),
            "--runtime=runc".to_owned(),
            "--cgroup-manager=cgroupfs".to_owned(),
            "--events-backend=file".to_owned(),
        ]
    }

    /// Runs `podman ARGS` to completion ([`run_checked`]).
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let mut argv = self.global_args();
        argv.extend(args.iter().map(|a| a.to_string()));
        run_checked(&argv.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `podman load -i ARCHIVE`; returns the reference it loaded.
    pub fn load(&self, archive: &Path) -> Result<String> {
        let out = self.run(&["load", "--quiet", "-i", &archive.display().to_string()])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("Loaded image: "))
            .map(|r| r.trim().to_owned())
            .with_context(|| format!("`podman load` named no image: {text}"))
    }

    /// The command line that runs `image` with `args`, and `options`
    /// besides the ones every container here gets: removed when it exits,
    /// labelled, the environment's `RUST_LOG`, this process's open-file
    /// limit and a process limit that needs no raising. Podman's own
    /// defaults for root (2^20 files, 2^22 processes) exceed what this
    /// machine lets even root set (it lacks `CAP_SYS_RESOURCE`).
    pub fn container(&self, options: &[String], image: &str, args: &[&str]) -> Vec<String> {
        let mut argv = self.global_args();
        argv.extend(["run", "--rm", "--label", LABEL, "--env", "RUST_LOG"].map(str::to_owned));
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let limit = |l: u64| match l {
                RLIM_INFINITY => "-1".to_owned(),
                l => l.to_string(),
            };
            argv.push(format!("--ulimit=nofile={}:{}", limit(soft), limit(hard)));
        }
        argv.push("--ulimit=nproc=4096:4096".to_owned());
        argv.extend_from_slice(options);
        argv.push(image.to_owned());
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// Writes `script`, an executable that runs `nodemesh "$@"` from
    /// `image` as the DaemonSet runs the agent (security context, host PID
    /// namespace, host network: the network namespace it is started in,
    /// and the DaemonSet's host mounts), with `node_credential` (if given)
    /// as `/etc/nodemesh/node-credential` and `shared` mounted at the same
    /// path (the test's config, credentials, kubeconfig, admin socket and
    /// logs). [`crate::Agent`] takes it as its binary, for the agent and for
    /// the CLI alike.
    pub fn daemonset_script(
        &self,
        script: &Path,
        image: &str,
        node_credential: Option<&Path>,
        shared: &Path,
    ) -> Result<PathBuf> {
        let shared = shared.display();
        let mut options = [
            "--network=host",
            "--pid=host",
            "--cgroupns=host",
            "--read-only",
            "--cap-drop=ALL",
            &format!("--cap-add={AGENT_CAPABILITIES}"),
            "--security-opt=seccomp=unconfined",
            "--security-opt=no-new-privileges",
            "--volume=/sys/fs/bpf:/sys/fs/bpf:rslave",
            "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "--volume=/run/netns:/run/netns:ro,rslave",
            "--volume=/proc/sys/net:/host/proc/sys/net",
            &format!("--volume={shared}:{shared}"),
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(credential) = node_credential {
            options.push(format!(
                "--volume={}:/etc/nodemesh/node-credential:ro",
                credential.display()
            ));
        }
        let argv = self.container(&options, image, &[]);
        let text = format!("#!/bin/sh\nexec {} \"$@\"\n", argv.join(" "));
        fs::write(script, text).with_context(|| format!("writing {}", script.display()))?;
        fs::set_permissions(script, fs::Permissions::from_mode(0o755))?;
        Ok(script.to_path_buf())
    }

    /// The ids of the containers started here that still run.
    pub fn running(&self) -> Result<Vec<String>> {
        let out = self.run(&["ps", "--quiet", "--filter", &format!("label={LABEL}")])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Ok(ids) = self.running() {
            if !ids.is_empty() {
                let mut args = vec!["rm", "--force", "--time=1"];
                args.extend(ids.iter().map(String::as_str));
                if let Err(e) = self.run(&args) {
                    eprintln!("podman: {e:#}");
                }
            }
        }
        // A container's /dev/shm is a mount under the storage until podman
        // removes it; never delete through a mount that is left.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let inside = self.dir.display().to_string();
        if mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|m| m.starts_with(&inside))
        {
            eprintln!("podman: mounts left under {inside}: not removing it");
            return;
        }
        match fs::remove_dir_all(&self.dir) {
            Err(e) => eprintln!("podman: removing {inside}: {e}"),
            Ok(()) => {
                if let Some(cleanup) = self.leftover_cleanup.take() {
                    cleanup.withdraw();
                }
            }
        }
    }
}
