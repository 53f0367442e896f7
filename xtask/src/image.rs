//! `cargo xtask image`: the container image that the Kubernetes manifests and
//! the Helm chart run (`ghcr.io/nodemesh/nodemesh:<version>`), as one archive.
//!
//! No base image (nothing can be pulled on a machine that builds offline, and
//! a distribution's userland would be most of the image): one layer holds the
//! agent, `ip` (reply routing runs it in pods' namespaces), the shared
//! libraries both load, as the build machine's `ldd` resolves them, and
//! `/etc/passwd` and `/etc/group` naming root and `nonroot` (65532, the CA's
//! user). The archive is what `docker save` writes since Docker 25: a Docker
//! archive (`manifest.json`) that is also an OCI image layout (`index.json`),
//! so `docker load`, `podman load`, `ctr images import`, `kind load
//! image-archive` and `skopeo copy docker-archive:…` all take it. The layer
//! is gzip-compressed, as registries store and serve layers (a third of its
//! size). Every timestamp is zero and entries are sorted: the same binary
//! gives the same image digest.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Where the manifests and the chart's `image.repository` expect the image.
pub const REPOSITORY: &str = "ghcr.io/nodemesh/nodemesh";
/// The agent's path in the image, its entrypoint: the manifests give only
/// `args` (`agent …`, `ca …`).
const ENTRYPOINT: &str = "/usr/bin/nodemesh";
/// `ip`, found by PATH in the image as on a host.
const IP: &str = "/usr/bin/ip";
/// The unprivileged user of `03-ca.yaml` (`runAsUser`), distroless's `nonroot`.
const NONROOT: u32 = 65532;

/// `REPOSITORY:<workspace version>`.
pub fn reference() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// Writes the image of `agent` to `out` and returns its image id (the
/// digest of its configuration, as `docker images` shows it).
pub fn write(agent: &Path, out: &Path) -> Result<String> {
    let ip = host_ip()?;
    let mut layer = TarFiles::default();
    for dir in ["etc", "run", "tmp", "usr/bin"] {
        layer.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 });
    }
    // As on Debian: paths under /var/run (a pod's `netns`) reach /run.
    layer.symlink("var/run", "../run");
    layer.file(ENTRYPOINT, 0o755, read(agent)?);
    layer.file(IP, 0o755, read(&ip)?);
    for library in shared_libraries(&[agent, &ip])? {
        let mode = fs::metadata(&library)
            .with_context(|| format!("reading {}", library.display()))?
            .permissions()
            .mode();
        layer.file(&library.to_string_lossy(), mode & 0o7777, read(&library)?);
    }
    layer.file(
        "/etc/passwd",
        0o644,
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\n\
             nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
        )
        .into_bytes(),
    );
    layer.file(
        "/etc/group",
        0o644,
        format!("root:x:0:\nnonroot:x:{NONROOT}:\n").into_bytes(),
    );
    let layer = layer.into_tar()?;
    // The config names the layer by its content (`diff_ids`); the manifest
    // and the archive by its blob, compressed.
    let diff_id = sha256(&layer);
    let layer = gzip(&layer)?;
    let layer_digest = sha256(&layer);

    let reference = reference();
    let config = serde_json::to_vec(&json!({
        "architecture": oci_architecture()?,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Env": ["PATH=/usr/bin"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "nodemesh",
                "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
                "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    }))?;
    let config_digest = sha256(&config);
    let config_descriptor = descriptor(
        "application/vnd.oci.image.config.v1+json",
        &config_digest,
        config.len(),
    );
    let layer_descriptor = descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &layer_digest,
        layer.len(),
    );
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": [layer_descriptor],
    }))?;
    let manifest_digest = sha256(&manifest);
    let mut manifest_descriptor = descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        &manifest_digest,
        manifest.len(),
    );
    manifest_descriptor["annotations"] = json!({
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": env!("CARGO_PKG_VERSION"),
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }))?;
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": blob_path(&config_digest),
        "RepoTags": [reference],
        "Layers": [blob_path(&layer_digest)],
    }]))?;

    let mut archive = TarFiles::default();
    archive.file(
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    archive.file("index.json", 0o644, index);
    archive.file("manifest.json", 0o644, docker_manifest);
    archive.file(&blob_path(&layer_digest), 0o644, layer);
    archive.file(&blob_path(&config_digest), 0o644, config);
    archive.file(&blob_path(&manifest_digest), 0o644, manifest);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut file = BufWriter::new(file);
    file.write_all(&archive.into_tar()?)
        .and_then(|()| file.flush())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(config_digest)
}

/// The files of a tar (the image's layer, or the archive), by path without
/// the leading `/`; parents are added as directories. A `BTreeMap`, so a
/// directory comes before what it holds and the order is always the same.
#[derive(Default)]
struct TarFiles(BTreeMap<String, Entry>);

enum Entry {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(String),
}

impl TarFiles {
    fn dir(&mut self, path: &str, mode: u32) {
        self.add(path, Entry::Dir(mode));
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.add(path, Entry::File(mode, data));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Entry::Symlink(target.to_owned()));
    }

    fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            self.0
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Entry::Dir(0o755));
            parent = dir.parent();
        }
        self.0.insert(path.to_owned(), entry);
    }

    fn into_tar(self) -> Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in self.0 {
            let mut header = tar::Header::new_ustar();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            let data: &[u8] = match &entry {
                Entry::Dir(mode) => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    &[]
                }
                Entry::File(mode, data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    data
                }
                Entry::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_link_name(target)?;
                    &[]
                }
            };
            header.set_size(data.len() as u64);
            let name = match entry {
                Entry::Dir(_) => format!("{path}/"),
                _ => path,
            };
            tar.append_data(&mut header, &name, data)
                .with_context(|| format!("adding {name} to the image"))?;
        }
        Ok(tar.into_inner()?)
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// gzip at the best compression, with no name and a zero timestamp in its
/// header, so the same layer always compresses to the same bytes.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

fn descriptor(media_type: &str, digest: &str, size: usize) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": digest, "size": size})
}

fn oci_architecture() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no OCI architecture name for {other}"),
    })
}

/// iproute2's `ip` on this machine (`cargo xtask setup` installs it).
fn host_ip() -> Result<PathBuf> {
    ["/usr/bin/ip", "/usr/sbin/ip", "/bin/ip", "/sbin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("`ip` (iproute2) not found: run `cargo xtask setup`")
}

/// The shared libraries `binaries` load, and the dynamic loader, as paths
/// (the ones their ELF headers name: the loader looks there in the image).
fn shared_libraries(binaries: &[&Path]) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for binary in binaries {
        let out = Command::new("ldd")
            .arg(binary)
            .output()
            .context("cannot run ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "`ldd {}` failed: {}{}",
            binary.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no path.
        for line in text.lines() {
            ensure!(
                !line.contains("not found"),
                "{} needs a library this machine does not have: {}",
                binary.display(),
                line.trim()
            );
            let path = line.split("=>").last().unwrap_or_default().trim();
            let path = path.split(" (").next().unwrap_or_default();
            if path.starts_with('/') && !libraries.iter().any(|l: &PathBuf| l == Path::new(path)) {
                libraries.push(PathBuf::from(path));
            }
        }
    }
    ensure!(
        !libraries.is_empty(),
        "ldd found no shared libraries: the image would have no C library"
    );
    Ok(libraries)
}
