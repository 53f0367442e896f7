//! Builds the eBPF programs with the nightly toolchain so `cargo build` is all a user runs.
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "nodemesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
