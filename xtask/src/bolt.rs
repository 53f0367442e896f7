//! The last step of `cargo xtask build --pgo`: BOLT, LLVM's post-link
//! optimizer, lays the profile-guided agent's machine code out again from
//! what its own machine code did in a second training run.
//!
//! The profile-guided build decides inlining and the order of blocks inside
//! each function before code generation; BOLT works on the linked binary: it
//! counts every branch the final code takes (`llvm-bolt -instrument`), then
//! puts the blocks that run in a straight line, moves the parts of functions
//! that never ran out of the way, and places the functions that call each
//! other next to each other. The binary must keep its relocations
//! (`--emit-relocs`) for BOLT to move functions.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::{pgo, status, LLVM_BIN};

/// Instruments `binary`, runs `train` on the instrumented copy, and returns
/// the optimized copy; all of it in `dir`.
pub fn optimize(
    binary: &Path,
    dir: &Path,
    train: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    pgo::empty_dir(dir)?;
    let bolt = Path::new(LLVM_BIN).join("llvm-bolt");
    let instrumented = dir.join("nodemesh.instrumented");
    // Every process of the training (both agents, each CLI call) writes its
    // counts to a file of its own when it exits.
    status(
        Command::new(&bolt)
            .arg(binary)
            .arg("-instrument")
            .arg(format!(
                "-instrumentation-file={}",
                dir.join("counts").display()
            ))
            .arg("-instrumentation-file-append-pid")
            .arg("-o")
            .arg(&instrumented),
    )
    .context("instrumenting the agent with BOLT")?;
    println!("bolt: training {}", instrumented.display());
    train(&instrumented).context("the training run of the BOLT-instrumented agent failed")?;

    let counts: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "fdata"))
        .collect();
    ensure!(
        !counts.is_empty(),
        "the training left no BOLT counts in {}: did the agents exit cleanly?",
        dir.display()
    );
    let merged = dir.join("nodemesh.fdata");
    status(
        Command::new(Path::new(LLVM_BIN).join("merge-fdata"))
            .arg("-q")
            .args(&counts)
            .arg("-o")
            .arg(&merged),
    )
    .context("merging the BOLT counts")?;
    let optimized = dir.join("nodemesh");
    status(
        Command::new(&bolt)
            .arg(binary)
            .arg(format!("-data={}", merged.display()))
            .args([
                "-reorder-blocks=ext-tsp",
                "-reorder-functions=cdsort",
                "-split-functions",
                "-split-all-cold",
                "-split-eh",
                "-icf=1",
                "-use-gnu-stack",
            ])
            .arg("-o")
            .arg(&optimized),
    )
    .context("laying out the agent with BOLT's counts")?;
    Ok(optimized)
}
