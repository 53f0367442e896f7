//! Builds the eBPF programs with the nightly toolchain so `cargo build` is all a user runs.
fn main() -> anyhow::Result<()> {
    // The fuzz targets (`fuzz/`, built with `--cfg fuzzing`) exercise parsers
    // only and never load programs: an empty object keeps their build to the
    // instrumented user-space code.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
        std::fs::write(out.join("nodemesh"), [])?;
        return Ok(());
    }
    let ebpf = aya_build::Package {
        name: "nodemesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
