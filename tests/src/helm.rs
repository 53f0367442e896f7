//! The Helm chart rendered by `tests/helm-render` (Helm's engine: Go's text/template and
//! sprig; Helm itself is in no package registry), built by `cargo xtask setup`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// `$CARGO_TARGET_DIR/helm-render`, else `target/helm-render` of the workspace.
fn binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), |d| root.join(d));
    target.join("helm-render")
}

/// The objects `chart` renders to with `args` (as `helm template CHART ARGS`).
pub fn render(chart: &Path, args: &[&str]) -> Result<Vec<Value>> {
    let bin = binary();
    if !bin.is_file() {
        bail!("{} is missing: run `cargo xtask setup`", bin.display());
    }
    let out = Command::new(&bin)
        .arg(chart)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "rendering {} failed: {}",
            chart.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let docs = serde_saphyr::from_multiple::<Value>(&text).context("parsing the rendered chart")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}
