//! Writes nodemesh's local-mode configuration (Kubernetes-style YAML) into a
//! config directory watched by the agent (`--config-dir`).
//!
//! ```no_run
//! # use nodemesh_testbed::{config, Topology};
//! # fn main() -> anyhow::Result<()> {
//! # let mut topo = Topology::new()?;
//! # topo.add_node("node-a")?;
//! let web = topo.add_pod("node-a", "web")?;
//! let dir = topo.work_dir().join("config");
//! config::write(&dir, "shop.yaml", &[
//!     config::namespace("shop", true),
//!     config::workload(&web, "shop", &[("app", "web")]),
//!     config::service("web", "shop", &[("app", "web")], 80, 8080, Some("10.96.0.20")),
//! ])?;
//! # Ok(()) }
//! ```
//!
//! Strings are written plain when that is unambiguous and double-quoted
//! otherwise (addresses, `"true"`, `"8080"`, …), so every value stays a string.

use crate::topology::{NodeInfo, PodInfo};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

/// The label that opts a namespace into the mesh.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

/// One port of a Service.
#[derive(Clone, Copy, Debug)]
pub struct ServicePort<'a> {
    /// Port name (`http`, `grpc`, `tcp`, …).
    pub name: &'a str,
    /// The service port (what clients connect to on the cluster IP).
    pub port: u16,
    /// The port the workloads listen on.
    pub target_port: u16,
}

/// A YAML scalar for `s`: plain when safe, else double-quoted (JSON string
/// syntax is valid YAML).
fn scalar(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::Value::String(s.to_string()).to_string()
    }
}

/// Writes `key:` followed by an indented map (or `key: {}` when empty).
fn map(out: &mut String, indent: usize, key: &str, entries: &[(&str, &str)]) {
    let pad = " ".repeat(indent);
    if entries.is_empty() {
        let _ = writeln!(out, "{pad}{key}: {{}}");
        return;
    }
    let _ = writeln!(out, "{pad}{key}:");
    for (k, v) in entries {
        let _ = writeln!(out, "{pad}  {}: {}", scalar(k), scalar(v));
    }
}

/// A `v1/Namespace`; `mesh_enabled` adds the label `nodemesh.io/mesh: enabled`
/// (otherwise the namespace has no labels).
pub fn namespace(name: &str, mesh_enabled: bool) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n");
    let _ = writeln!(out, "  name: {}", scalar(name));
    let labels: &[(&str, &str)] = if mesh_enabled {
        &[(MESH_LABEL, "enabled")]
    } else {
        &[]
    };
    map(&mut out, 2, "labels", labels);
    out
}

/// A `v1/Node` for `node`: its name and its address on the inter-node
/// fabric, which other agents reach it on.
pub fn node(node: &NodeInfo) -> String {
    node_labelled(node, &[])
}

/// [`node`] with `labels` (e.g. its topology zone).
pub fn node_labelled(node: &NodeInfo, labels: &[(&str, &str)]) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Node\nmetadata:\n");
    let _ = writeln!(out, "  name: {}", scalar(&node.node_name));
    if !labels.is_empty() {
        map(&mut out, 2, "labels", labels);
    }
    let _ = write!(
        out,
        "status:\n  addresses:\n  - type: InternalIP\n    address: {}\n",
        node.address
    );
    out
}

/// A `nodemesh.io/v1alpha1/Workload` for `pod` with service account
/// `default`: its netns path, its address and the node that serves it.
pub fn workload(pod: &PodInfo, namespace: &str, labels: &[(&str, &str)]) -> String {
    workload_with_account(pod, namespace, labels, "default")
}

/// Like [`workload`] with an explicit service account (the workload's
/// identity).
pub fn workload_with_account(
    pod: &PodInfo,
    namespace: &str,
    labels: &[(&str, &str)],
    service_account: &str,
) -> String {
    let mut out = String::from("apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata:\n");
    let _ = writeln!(out, "  name: {}", scalar(&pod.name));
    let _ = writeln!(out, "  namespace: {}", scalar(namespace));
    map(&mut out, 2, "labels", labels);
    out.push_str("spec:\n");
    let _ = writeln!(out, "  serviceAccount: {}", scalar(service_account));
    let _ = writeln!(
        out,
        "  netns: {}",
        scalar(&pod.netns_path.display().to_string())
    );
    out.push_str("  addresses:\n");
    let _ = writeln!(out, "    - {}", scalar(&pod.address.to_string()));
    let _ = writeln!(out, "  node: {}", scalar(&pod.node_name));
    out
}

/// A `v1/Service` with one port named `http`.
pub fn service(
    name: &str,
    namespace: &str,
    selector: &[(&str, &str)],
    port: u16,
    target_port: u16,
    cluster_ip: Option<&str>,
) -> String {
    service_with_ports(
        name,
        namespace,
        selector,
        &[ServicePort {
            name: "http",
            port,
            target_port,
        }],
        cluster_ip,
    )
}

/// A `v1/Service` with any ports; without `cluster_ip` the agent allocates
/// one.
pub fn service_with_ports(
    name: &str,
    namespace: &str,
    selector: &[(&str, &str)],
    ports: &[ServicePort<'_>],
    cluster_ip: Option<&str>,
) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Service\nmetadata:\n");
    let _ = writeln!(out, "  name: {}", scalar(name));
    let _ = writeln!(out, "  namespace: {}", scalar(namespace));
    out.push_str("spec:\n");
    map(&mut out, 2, "selector", selector);
    if ports.is_empty() {
        out.push_str("  ports: []\n");
    } else {
        out.push_str("  ports:\n");
        for p in ports {
            let _ = writeln!(
                out,
                "    - name: {}\n      port: {}\n      targetPort: {}",
                scalar(p.name),
                p.port,
                p.target_port
            );
        }
    }
    if let Some(ip) = cluster_ip {
        let _ = writeln!(out, "  clusterIP: {}", scalar(ip));
    }
    out
}

/// Joins YAML documents with `---` lines.
pub fn join(docs: &[String]) -> String {
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// Atomically writes `docs` (joined with `---`) to `dir/file`: the text goes
/// to a hidden temporary file `.<file>.tmp-…` beside `dir` (in its parent,
/// the test's work directory), which is then renamed over `dir/file`. A
/// watching agent never reads half a file, and sees one event per write:
/// a temporary file inside `dir` would start a reload of the old content
/// whenever writing it outlasts the agent's 20 ms debounce, and a test
/// waiting for "a newer generation" would take that stale one. Creates
/// `dir` if needed.
pub fn write(dir: &Path, file: &str, docs: &[String]) -> Result<()> {
    write_raw(dir, file, &join(docs))
}

/// Atomically writes arbitrary text (e.g. deliberately invalid YAML) to
/// `dir/file`, like [`write`].
pub fn write_raw(dir: &Path, file: &str, text: &str) -> Result<()> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(file);
    let tmp = dir.parent().unwrap_or(dir).join(format!(
        ".{file}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &target)
            .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes `dir/file` (no error if it does not exist).
pub fn remove(dir: &Path, file: &str) -> Result<()> {
    let path = dir.join(file);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    #[test]
    fn scalars_are_quoted_when_ambiguous() {
        assert_eq!(scalar("web"), "web");
        assert_eq!(scalar("nodemesh.io/mesh"), "nodemesh.io/mesh");
        assert_eq!(scalar("/var/run/netns/x"), "/var/run/netns/x");
        assert_eq!(scalar("10.1.1.10"), "\"10.1.1.10\"");
        assert_eq!(scalar("true"), "\"true\"");
        assert_eq!(scalar("a b"), "\"a b\"");
        assert_eq!(scalar(""), "\"\"");
    }

    #[test]
    fn documents_render() {
        let pod = PodInfo {
            name: "web".into(),
            node: "node-a".into(),
            node_name: "nm000000-node-a".into(),
            netns: "nm000000-web".into(),
            netns_path: PathBuf::from("/var/run/netns/nm000000-web"),
            address: Ipv4Addr::new(10, 1, 1, 11),
        };
        let text = join(&[
            namespace("shop", true),
            workload(&pod, "shop", &[("app", "web"), ("version", "v1")]),
            service(
                "web",
                "shop",
                &[("app", "web")],
                80,
                8080,
                Some("10.96.0.20"),
            ),
        ]);
        let expected = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    nodemesh.io/mesh: enabled
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata:
  name: web
  namespace: shop
  labels:
    app: web
    version: v1
spec:
  serviceAccount: default
  netns: /var/run/netns/nm000000-web
  addresses:
    - \"10.1.1.11\"
  node: nm000000-node-a
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector:
    app: web
  ports:
    - name: http
      port: 80
      targetPort: 8080
  clusterIP: \"10.96.0.20\"
";
        assert_eq!(text, expected);
        assert_eq!(
            namespace("plain", false),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n  labels: {}\n"
        );
    }

    #[test]
    fn write_is_atomic_and_leaves_no_temp_files() {
        let dir = std::env::temp_dir().join(format!("nodemesh-config-test-{}", std::process::id()));
        let result = std::panic::catch_unwind(|| {
            write(&dir, "a.yaml", &[namespace("x", true)]).unwrap();
            write(&dir, "a.yaml", &[namespace("second", true)]).unwrap();
            let names: Vec<_> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names, vec!["a.yaml".to_string()]);
            let text = fs::read_to_string(dir.join("a.yaml")).unwrap();
            assert!(text.contains("name: second"), "{text}");
            remove(&dir, "a.yaml").unwrap();
            remove(&dir, "a.yaml").unwrap();
        });
        let _ = fs::remove_dir_all(&dir);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}
