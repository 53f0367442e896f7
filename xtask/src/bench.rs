//! `cargo xtask bench` (being written).
use std::path::Path;

pub fn run(_nodemesh: &Path, _args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("`bench` is not yet implemented")
}
