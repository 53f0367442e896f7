//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (libFuzzer on
//! the nightly toolchain) for a bounded time each, starting from the seeds
//! in `fuzz/seeds/<target>` and keeping what they find in
//! `target/fuzz-corpus/<target>`, so later runs go on from there.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo_bin_dir, display, path_with, status, target_dir};

/// Seconds per target when the whole test suite runs them.
pub const SECONDS_IN_TEST: u64 = 45;

/// `cargo +nightly fuzz …` in `root`, whatever cargo runs xtask.
fn cargo_fuzz(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root)
        .env("PATH", path_with(&[&cargo_bin_dir()]))
        .env("RUSTUP_TOOLCHAIN", "nightly")
        // cargo-fuzz would otherwise call the stable cargo that runs us.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .arg("fuzz");
    c
}

/// Every target of `fuzz/`, as cargo-fuzz lists them.
fn targets(root: &Path) -> Result<Vec<String>> {
    let out = cargo_fuzz(root)
        .arg("list")
        .output()
        .context("cannot run `cargo fuzz list`")?;
    if !out.status.success() {
        bail!(
            "`cargo fuzz list` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Runs `wanted` (all when empty) for `seconds` each; fails on the first
/// crash, with libFuzzer's report and the input saved in `fuzz/artifacts`.
pub fn run(root: &Path, wanted: &[String], seconds: u64) -> Result<()> {
    let all = targets(root)?;
    let chosen: Vec<&String> = match wanted {
        [] => all.iter().collect(),
        some => {
            if let Some(unknown) = some.iter().find(|t| !all.contains(t)) {
                bail!("no fuzz target `{unknown}` (targets: {})", all.join(", "));
            }
            some.iter().collect()
        }
    };
    for target in chosen {
        let corpus = target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz/seeds").join(target);
        let mut cmd = cargo_fuzz(root);
        // No sanitizer: the agent's parsers are safe Rust; what is looked
        // for is panics, hangs and runaway memory, and uninstrumented runs
        // are several times faster.
        cmd.args(["run", "--sanitizer", "none", target])
            .arg(&corpus)
            .args(seeds.is_dir().then_some(&seeds))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"]);
        println!("fuzz: {}", display(&cmd));
        status(&mut cmd).with_context(|| format!("fuzz target {target} found a failure"))?;
    }
    Ok(())
}
