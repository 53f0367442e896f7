//! `tests/helm-render`, the Helm-compatible renderer the chart's test uses (Helm itself is
//! in no package registry): Go's text/template with sprig, built offline in GOPATH mode
//! from Debian's Go packages.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

/// Where Debian installs Go sources (`golang-*-dev`).
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// Where the tests find it (`target/helm-render`).
pub fn binary(target: &Path) -> PathBuf {
    target.join("helm-render")
}

/// Builds it if it is missing or older than its source; true if it did.
pub fn build(root: &Path, target: &Path) -> Result<bool> {
    let source = root.join("tests/helm-render/main.go");
    let binary = binary(target);
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    if modified(&binary).is_some_and(|built| Some(built) >= modified(&source)) {
        return Ok(false);
    }
    println!("setup: building {} (Go, GOPATH mode)", binary.display());
    super::status(
        Command::new("go")
            .current_dir(root)
            .env("GO111MODULE", "off")
            .env("GOPATH", DEBIAN_GOPATH)
            .env("GOCACHE", target.join("go-cache"))
            .env("GOFLAGS", "")
            .args(["build", "-o"])
            .arg(&binary)
            .arg("./tests/helm-render/"),
    )?;
    Ok(true)
}
