//! `cargo xtask build --pgo`: the agent built with profile-guided
//! optimization, trained on the bench's own traffic.
//!
//! A build instrumented with LLVM's counters serves every path of a short
//! bench (L7 and L4 over mutual TLS, the plaintext hop, the ingress, new
//! connections, large route tables and allow-lists, tracing); the counts are
//! merged with the `llvm-profdata` of the LLVM that rustc is built on, and
//! the agent is built again with them. LLVM then inlines and lays out the
//! data path for the branches it really takes, optimizes for size what never
//! ran, and places the code that ran next to each other, so fewer pages of
//! the binary are mapped under load. BOLT then lays out the linked binary
//! from a second training run (`bolt.rs`). Each build is trained afresh: a
//! profile of older code would be partly ignored, partly misleading.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{bench, bolt, cargo, display, output_ok, status, LLVM_BIN};

/// Where the two builds, the raw counts and the merged profile go.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn instrumented_target(&self) -> PathBuf {
        self.dir.join("instrumented")
    }
    fn optimized_target(&self) -> PathBuf {
        self.dir.join("optimized")
    }
    fn raw_profiles(&self) -> PathBuf {
        self.dir.join("profiles")
    }
    fn profile(&self) -> PathBuf {
        self.dir.join("nodemesh.profdata")
    }
    /// BOLT's instrumented copy, its counts and the agent it lays out.
    fn bolt(&self) -> PathBuf {
        self.dir.join("bolt")
    }
}

/// Builds, trains and rebuilds the agent; returns the optimized binary.
pub fn build(root: &Path, target_dir: &Path) -> Result<PathBuf> {
    for overriding in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        ensure!(
            std::env::var_os(overriding).is_none(),
            "{overriding} is set: cargo would use it instead of the profile flags of \
             the PGO build; unset it"
        );
    }
    let rustc = RustcInfo::query()?;
    let profdata = Path::new(LLVM_BIN).join("llvm-profdata");
    rustc.check_llvm_matches(&profdata)?;
    let layout = Layout {
        dir: target_dir.join("pgo"),
    };

    let raw = layout.raw_profiles();
    let instrumented = build_agent(
        root,
        &rustc.host,
        &layout.instrumented_target(),
        &format!("-Cprofile-generate={}", raw.display()),
    )?;
    // What the build scripts of that build counted is not the agent's.
    empty_dir(&raw)?;
    println!(
        "pgo: training {} on the bench's traffic",
        instrumented.display()
    );
    train(&instrumented, &layout.dir.join("training.json"))
        .context("the training run of the instrumented agent failed")?;

    status(
        Command::new(&profdata)
            .arg("merge")
            .arg("-o")
            .arg(layout.profile())
            .arg(&raw),
    )
    .context("merging the training's counts")?;
    // BOLT moves functions only in a binary that keeps its relocations.
    let optimized = build_agent(
        root,
        &rustc.host,
        &layout.optimized_target(),
        &format!(
            "-Cprofile-use={} -Clink-arg=-Wl,--emit-relocs",
            layout.profile().display()
        ),
    )?;
    let bolt = layout.bolt();
    let laid_out = bolt::optimize(&optimized, &bolt, |binary| {
        train(binary, &bolt.join("training.json"))
    })?;
    println!("pgo: the optimized agent is {}", laid_out.display());
    Ok(laid_out)
}

/// Makes `dir` an empty directory: what a training leaves there is read as
/// the counts of that training alone.
pub fn empty_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// A quick bench of `agent`: the traffic every training run serves.
fn train(agent: &Path, results: &Path) -> Result<()> {
    let args = [
        "--quick".to_string(),
        "--results".to_string(),
        results.display().to_string(),
    ];
    bench::run(agent, &args)
}

/// `cargo build --release` of the agent in its own target directory, with
/// `rustflags` for the host only: the eBPF programs, built for their own
/// target by the agent's build script, are left as they are.
fn build_agent(root: &Path, host: &str, target_dir: &Path, rustflags: &str) -> Result<PathBuf> {
    let variable = format!(
        "CARGO_TARGET_{}_RUSTFLAGS",
        host.to_uppercase().replace('-', "_")
    );
    let mut cmd = cargo();
    cmd.current_dir(root)
        .env(&variable, rustflags)
        .args(["build", "--release", "-p", "nodemesh", "--bin", "nodemesh"])
        .arg("--target-dir")
        .arg(target_dir);
    println!("pgo: {variable}={rustflags} {}", display(&cmd));
    status(&mut cmd)?;
    Ok(target_dir.join("release/nodemesh"))
}

/// What `rustc -vV` says about the compiler the build uses.
struct RustcInfo {
    host: String,
    llvm_major: String,
}

impl RustcInfo {
    /// The rustc cargo builds with: `$RUSTC` if set, as cargo reads it.
    fn query() -> Result<RustcInfo> {
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let out = output_ok(Command::new(rustc).arg("-vV"))
            .context("`rustc -vV` failed: is the Rust toolchain installed?")?;
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("`rustc -vV` printed no `{name}`"))
        };
        Ok(RustcInfo {
            host: field("host:")?.to_string(),
            llvm_major: major(field("LLVM version:")?).to_string(),
        })
    }

    /// A profile is read by the LLVM inside rustc: one written by another
    /// major version is refused or misread.
    fn check_llvm_matches(&self, profdata: &Path) -> Result<()> {
        let out = output_ok(Command::new(profdata).arg("--version")).with_context(|| {
            format!(
                "cannot run {}: `cargo xtask setup` installs it",
                profdata.display()
            )
        })?;
        let version = out
            .lines()
            .find_map(|l| l.split_once("LLVM version ").map(|(_, v)| v.trim()))
            .with_context(|| format!("{} printed no LLVM version", profdata.display()))?;
        if major(version) != self.llvm_major {
            bail!(
                "rustc is built on LLVM {} but {} is LLVM {version}: a PGO build needs the \
                 same major version",
                self.llvm_major,
                profdata.display()
            );
        }
        Ok(())
    }
}

fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or(version)
}

#[cfg(test)]
mod tests {
    use super::major;

    #[test]
    fn llvm_versions_compare_by_major() {
        assert_eq!(major("22.1.2"), "22");
        assert_eq!(major("22"), "22");
    }
}
