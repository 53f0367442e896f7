//! `cargo xtask <command>`: setup, build, test, demo and bench automation.
//!
//! Arguments are parsed by hand to keep this binary's build lean.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup            install what building and testing need (idempotent, quick
                   when everything is present; must run as root)
  build [--pgo]    setup, then build the agent and the test application
                   (`mesh-app`) in release mode; with --pgo the agent alone,
                   profile-guided: built instrumented, trained on a quick
                   bench (root, as the bench), built again with the counts,
                   then laid out by BOLT from a second training
                   (target/pgo/bolt/nodemesh; about 20 min)
  test [ARGS]      build, then `cargo test --release --workspace ARGS` with
                   NODEMESH_BIN set (e.g. `cargo xtask test -- topology`);
                   without ARGS also `cargo fmt --check`, clippy with
                   `-D warnings` and every fuzz target for 45 s
  image [--pgo] [--output FILE]
                   build, then write the container image the Kubernetes
                   manifests run (ghcr.io/nodemesh/nodemesh:VERSION) as an
                   archive for `docker load`, `podman load`, `ctr images
                   import` or `skopeo copy` (default
                   target/image/nodemesh-VERSION.tar); with --pgo of the
                   profile-guided build, the one to ship
  demo [--kubernetes]
                   build, then run Istio's Bookinfo on a two-node mesh and
                   show routing by header, a weighted split and a fault
                   (with --kubernetes: agents watching a real API server,
                   Istio's YAML applied through it)
  fuzz [--seconds N] [TARGET...]
                   run the fuzz targets of fuzz/ (cargo-fuzz, nightly) for
                   N seconds each (default 60); all targets when none named
  bench [--pgo] [--duration 10s | --quick] [--rounds N]
                   build, then measure direct, an HAProxy pair with mutual
                   TLS and the mesh (oha, nginx, iperf3) on two nodes;
                   results in target/bench/results.json; with --pgo the
                   profile-guided build (`build --pgo`); with NODEMESH_BIN
                   set, that agent binary, not built
";

/// Debian packages the build and the tests need.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    // `build --pgo`: BOLT lays out the profile-guided agent (bolt.rs).
    "bolt-22",
    "libzstd-dev",
    "zlib1g-dev",
    // jemalloc, the agent's allocator, is built from its sources.
    "make",
    "iproute2",
    "curl",
    "bpftool",
    "nghttp2-client",
    "wrk",
    "python3",
    // The L7 tests' gRPC client.
    "python3-grpcio",
    "procps",
    // The mTLS tests look at the wire between nodes.
    "tcpdump",
    // The mTLS refusal tests' HBONE client (HTTP/2 CONNECT over TLS).
    "python3-h2",
    // `cargo xtask bench`: the HTTP backend, the bulk-TCP tool, the peer it
    // compares the mesh with, and the CLI that makes that peer's certificates.
    "nginx",
    "iperf3",
    "haproxy",
    "openssl",
    // Where the agents' CPU goes (README, "Performance"): profiles,
    // context switches and syscalls per request.
    "linux-perf",
    "strace",
    // The telemetry tests' real Prometheus, and `promtool check metrics`.
    "prometheus",
    // The virtualenv of the tracing tests' OTLP receiver.
    "python3-venv",
    // The Helm chart's test renders it with tests/helm-render (Go text/template and
    // sprig, as Helm's engine), built from these.
    "golang-go",
    "golang-github-masterminds-sprig-dev",
    "golang-gopkg-yaml.v3-dev",
    // The image test loads the image and runs the agent from it as the
    // DaemonSet does; runc, as crun refuses hosts with cgroup v1 and v2 mixed.
    "podman",
    "runc",
];

/// The tracing tests' OTLP receiver decodes with OTLP's official protobuf
/// classes (PyPI), kept in a virtualenv of their own so Debian's Python
/// packages stay as they are (the test bed's `otlp::VENV`).
const OTLP_VENV: &str = "/opt/nodemesh-testbed/otlp-venv";
const OTLP_PYPI: &[&str] = &["opentelemetry-proto==1.45.2", "protobuf==7.36.2"];

/// LLVM whose major matches the nightly toolchain's (see DESIGN.md).
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPFFS: &str = "/sys/fs/bpf";
/// Netns names made by the test bed start with this.
const TEST_NETNS_PREFIX: &str = "nm";
/// Where the agent pins its programs, maps and links.
const PIN_DIR: &str = "/sys/fs/bpf/nodemesh";

mod bench;
mod bolt;
mod demo;
mod demo_kube;
mod fuzz;
mod helm_render;
mod image;
mod pgo;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        bail!("no command given");
    };
    let no_args = |name: &str| -> Result<()> {
        if rest.is_empty() {
            Ok(())
        } else {
            bail!("`{name}` takes no arguments, got {rest:?}")
        }
    };
    match cmd.as_str() {
        "setup" => {
            no_args("setup")?;
            setup()
        }
        "build" => match rest {
            [] => {
                setup()?;
                build()
            }
            [flag] if flag == "--pgo" => {
                setup()?;
                pgo::build(&root(), &target_dir()).map(drop)
            }
            _ => bail!("build takes no arguments but --pgo, got {rest:?}"),
        },
        "test" => {
            setup()?;
            if rest.is_empty() {
                lint()?;
            }
            build()?;
            test(rest)?;
            if rest.is_empty() {
                fuzz::run(&root(), &[], fuzz::SECONDS_IN_TEST)?;
            }
            Ok(())
        }
        "image" => {
            let (pgo, output) = match rest {
                [] => (false, None),
                [flag] if flag == "--pgo" => (true, None),
                [flag, file] if flag == "--output" => (false, Some(file)),
                [pgo, flag, file] | [flag, file, pgo] if pgo == "--pgo" && flag == "--output" => {
                    (true, Some(file))
                }
                _ => bail!("image takes --pgo and --output FILE, got {rest:?}"),
            };
            setup()?;
            let agent = if pgo {
                pgo::build(&root(), &target_dir())?
            } else {
                build()?;
                target_dir().join("release/nodemesh")
            };
            let output = output.map(PathBuf::from).unwrap_or_else(|| {
                target_dir().join(format!("image/nodemesh-{}.tar", env!("CARGO_PKG_VERSION")))
            });
            let id = image::write(&agent, &output)?;
            println!(
                "image: {} ({id}) of {} written to {}",
                image::reference(),
                agent.display(),
                output.display()
            );
            Ok(())
        }
        "fuzz" => {
            setup()?;
            let (seconds, targets) = match rest {
                [flag, n, targets @ ..] if flag == "--seconds" => (
                    n.parse()
                        .with_context(|| format!("--seconds takes a number, got `{n}`"))?,
                    targets,
                ),
                targets => (60, targets),
            };
            fuzz::run(&root(), targets, seconds)
        }
        "demo" => {
            let kubernetes = match rest {
                [] => false,
                [flag] if flag == "--kubernetes" => true,
                _ => bail!("demo takes no arguments but --kubernetes"),
            };
            setup()?;
            build()?;
            let release = target_dir().join("release");
            let run = if kubernetes {
                demo_kube::run
            } else {
                demo::run
            };
            run(
                &release.join("nodemesh"),
                &release.join("mesh-app"),
                &root(),
            )
        }
        "bench" => {
            setup()?;
            let pgo = rest.iter().any(|a| a == "--pgo");
            let rest: Vec<String> = rest.iter().filter(|a| *a != "--pgo").cloned().collect();
            // An agent binary given by NODEMESH_BIN is benched as it is.
            let bin = match std::env::var_os("NODEMESH_BIN") {
                Some(_) if pgo => bail!("bench takes --pgo or NODEMESH_BIN, not both"),
                Some(bin) => PathBuf::from(bin),
                None if pgo => pgo::build(&root(), &target_dir())?,
                None => {
                    build()?;
                    target_dir().join("release/nodemesh")
                }
            };
            bench::run(&bin, &rest)
        }
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("{USAGE}");
            bail!("unknown command `{other}`")
        }
    }
}

/// The workspace root (xtask lives in `<root>/xtask`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
        .join("bin")
}

/// PATH with `extra` directories in front (skipping ones already on it).
fn path_with(extra: &[&Path]) -> OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    for dir in extra.iter().rev() {
        if !dirs.iter().any(|d| d == dir) {
            dirs.insert(0, dir.to_path_buf());
        }
    }
    std::env::join_paths(dirs).unwrap_or(current)
}

/// Finds a program on PATH or in the cargo bin directory.
fn find_tool(name: &str) -> Option<PathBuf> {
    let cargo_bin = cargo_bin_dir();
    std::env::split_paths(&path_with(&[&cargo_bin]))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The cargo that runs us (`$CARGO`), else `cargo` from PATH.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.env("PATH", path_with(&[&cargo_bin_dir()]));
    c
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio; a failure names the command.
fn status(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    let st = cmd
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !st.success() {
        bail!("`{line}` failed ({st})");
    }
    Ok(())
}

/// The tool is on PATH or in the cargo bin directory, and `args` succeed.
fn tool_runs(name: &str, args: &[&str]) -> bool {
    find_tool(name)
        .and_then(|p| output_ok(Command::new(p).args(args)))
        .is_some()
}

/// Runs a command quietly; returns stdout if it succeeded.
fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn effective_uid() -> Result<u32> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .context("no Uid line in /proc/self/status")
}

fn setup() -> Result<()> {
    if effective_uid()? != 0 {
        bail!(
            "`cargo xtask setup` must run as root: it installs Debian packages, \
             mounts bpffs, and the tests create network namespaces and load eBPF programs"
        );
    }
    let mut installed_something = false;

    // Debian packages: one dpkg-query for all of them.
    let query = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\\n")
        .args(DEBIAN_PACKAGES)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run dpkg-query (is this a Debian machine?)")?;
    let present: Vec<String> = String::from_utf8_lossy(&query.stdout)
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|p| p.split(':').next().unwrap_or(p).to_string())
        .collect();
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !present.iter().any(|q| q == p))
        .collect();
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        status(Command::new("apt-get").arg("update"))?;
        status(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
        )?;
        installed_something = true;
    }

    // rust-src for the nightly that builds the eBPF programs.
    let rustup = find_tool("rustup").context("rustup not found on PATH or in ~/.cargo/bin")?;
    let components = output_ok(Command::new(&rustup).args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: installing rust-src for the nightly toolchain");
        status(Command::new(&rustup).args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        installed_something = true;
    }

    // bpf-linker, built against the same LLVM major as the nightly.
    if !tool_runs("bpf-linker", &["--version"]) {
        println!("setup: installing bpf-linker with LLVM 22 (about 90 s)");
        status(
            cargo()
                .env("PATH", path_with(&[Path::new(LLVM_BIN), &cargo_bin_dir()]))
                .args([
                    "install",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
        )?;
        installed_something = true;
    }

    // cargo-fuzz, which builds and runs the fuzz targets of fuzz/.
    if !tool_runs("cargo-fuzz", &["fuzz", "--version"]) {
        println!("setup: installing cargo-fuzz (about a minute)");
        status(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
        installed_something = true;
    }

    // The OTLP receiver of the tracing tests: the official protobuf classes.
    let venv_python = format!("{OTLP_VENV}/bin/python3");
    let import = "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2";
    if output_ok(Command::new(&venv_python).args(["-c", import])).is_none() {
        println!("setup: installing {} into {OTLP_VENV}", OTLP_PYPI.join(" "));
        status(Command::new("/usr/bin/python3").args(["-m", "venv", OTLP_VENV]))?;
        status(
            Command::new(&venv_python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(OTLP_PYPI),
        )?;
        installed_something = true;
    }

    // bpffs, where the agent pins its programs and maps.
    if !bpffs_mounted()? {
        println!("setup: mounting bpffs at {BPFFS}");
        status(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        installed_something = true;
    }

    if helm_render::build(&root(), &target_dir())? {
        installed_something = true;
    }

    if !installed_something {
        println!("setup: everything is present");
    }
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _source = f.next();
        f.next() == Some(BPFFS) && f.next() == Some("bpf")
    }))
}

/// `$CARGO_TARGET_DIR` (relative to the root) or `<root>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

/// The agent, and `mesh-app`, the application the demo runs in its pods.
fn build() -> Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "nodemesh",
        "-p",
        "nodemesh-testbed",
        "--bin",
        "nodemesh",
        "--bin",
        "mesh-app",
    ]);
    println!("build: {}", display(&cmd));
    status(&mut cmd)
}

/// `cargo fmt --check` and clippy with `-D warnings` on every target.
fn lint() -> Result<()> {
    status(
        cargo()
            .current_dir(root())
            .args(["fmt", "--all", "--check"]),
    )
    .context("code is not formatted: run `cargo fmt`")?;
    status(cargo().current_dir(root()).args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "nodemesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// Reports (never fails on) what earlier runs may have left behind.
fn report_leftovers(when: &str) {
    let netns = nodemesh_testbed::netns_with_prefix(TEST_NETNS_PREFIX);
    if !netns.is_empty() {
        println!(
            "test: warning: {} network namespace(s) named {TEST_NETNS_PREFIX}* left {when}: {}",
            netns.len(),
            netns.join(" ")
        );
    }
    if let Ok(dir) = std::fs::read_dir(PIN_DIR) {
        let pins: Vec<String> = dir
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !pins.is_empty() {
            println!(
                "test: warning: {} entr{} left in {PIN_DIR} {when}: {}",
                pins.len(),
                if pins.len() == 1 { "y" } else { "ies" },
                pins.join(" ")
            );
        }
    }
}

fn test(extra: &[String]) -> Result<()> {
    let bin = target_dir().join("release/nodemesh");
    if !bin.is_file() {
        bail!("the build did not produce {}", bin.display());
    }
    report_leftovers("before the tests");
    // The image test runs the agent from the image of the binary under test.
    let image = target_dir().join("image/nodemesh-test.tar");
    image::write(&bin, &image)?;

    let mut cmd = cargo();
    cmd.current_dir(root())
        // Every test binary runs even when one fails, so one red file does not
        // hide the results of the others.
        .args(["test", "--release", "--no-fail-fast"])
        .env("NODEMESH_BIN", &bin)
        .env("NODEMESH_IMAGE", &image)
        .env("RUST_TEST_THREADS", "2");
    // `--workspace` unless packages were chosen explicitly (before `--`).
    let cargo_args = extra.split(|a| a == "--").next().unwrap_or_default();
    let chose_packages = cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package") || a.starts_with("-p"));
    if !chose_packages {
        cmd.arg("--workspace");
        // The eBPF crate targets bpfel-unknown-none; agent/build.rs builds it.
        cmd.args(["--exclude", "nodemesh-ebpf"]);
    }
    cmd.args(extra);
    println!("test: {} (NODEMESH_BIN={})", display(&cmd), bin.display());
    let result = status(&mut cmd);

    report_leftovers("after the tests");
    result
}
