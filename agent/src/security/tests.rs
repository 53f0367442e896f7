//! PeerAuthentication loaded through the configuration loader.
//!
//! The policies are Istio's own examples (the PeerAuthentication reference
//! and the mutual TLS migration task on istio.io, Apache-2.0), unchanged
//! apart from the creation timestamps that order conflicting ones.

use std::path::PathBuf;

use super::{MtlsDecision, MtlsMode};
use crate::config::{Config, ConfigErrors, LoadOptions};

/// `finance` and `web` in `foo`, `db` in `bar`, `gate` in the root
/// namespace.
const WORKLOADS: &str = "
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: finance, namespace: foo, labels: {app: finance}}
spec: {netns: /run/netns/finance, addresses: [10.0.0.1], node: n1}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web, namespace: foo, labels: {app: web}}
spec: {netns: /run/netns/web, addresses: [10.0.0.2], node: n1}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: db, namespace: bar, labels: {app: finance}}
spec: {netns: /run/netns/db, addresses: [10.0.0.3], node: n2}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: gate, namespace: istio-system, labels: {app: finance}}
spec: {netns: /run/netns/gate, addresses: [10.0.0.4], node: n2}
";

/// istio.io, mutual TLS migration: "Lock down mutual TLS for the entire mesh".
const MESH_STRICT: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
";

/// The reference's namespace-wide PERMISSIVE policy with a STRICT one for
/// `finance` (v1beta1, as the reference wrote it until Istio 1.22).
const NAMESPACE_PERMISSIVE_FINANCE_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  mtls:
    mode: PERMISSIVE
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
";

/// The reference: STRICT for `finance`, but port 8080 in plaintext.
const FINANCE_STRICT_8080_DISABLE: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
";

/// The reference: inherit the mode from the namespace (or mesh), override
/// port 8080.
const FINANCE_UNSET_8080_DISABLE: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: UNSET
  portLevelMtls:
    8080:
      mode: DISABLE
";

fn load_with(files: &[(&str, &str)], opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    let files: Vec<_> = files
        .iter()
        .map(|(name, text)| (PathBuf::from(name), text.to_string()))
        .collect();
    Config::load_documents(&files, opts)
}

fn load(files: &[(&str, &str)]) -> Config {
    let mut all = vec![("workloads.yaml", WORKLOADS)];
    all.extend_from_slice(files);
    load_with(&all, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// The decision for `namespace/name` on `port`, as `(mode, policy)`.
fn mode(config: &Config, workload: &str, port: u16) -> (MtlsMode, Option<String>) {
    let workload = config.workload_by_key(workload).unwrap();
    let MtlsDecision { mode, policy } = config.peer_authentications().mtls_mode(workload, port);
    (mode, policy.map(|p| p.to_string()))
}

fn by(mode: MtlsMode, policy: &str) -> (MtlsMode, Option<String>) {
    (mode, Some(policy.to_owned()))
}

use MtlsMode::{Disable, Permissive, Strict};

#[test]
fn without_policies_every_port_is_permissive_by_default() {
    let config = load(&[]);
    for workload in ["foo/finance", "bar/db", "istio-system/gate"] {
        assert_eq!(mode(&config, workload, 80), (Permissive, None));
    }
    let decision = config
        .peer_authentications()
        .mtls_mode(config.workload_by_key("foo/web").unwrap(), 80);
    assert_eq!(
        decision.to_string(),
        "PERMISSIVE (default: no PeerAuthentication)"
    );
}

#[test]
fn mesh_wide_strict_and_a_namespace_permissive_overriding_it() {
    let config = load(&[("mesh.yaml", MESH_STRICT)]);
    for workload in ["foo/finance", "bar/db", "istio-system/gate"] {
        assert_eq!(
            mode(&config, workload, 80),
            by(Strict, "istio-system/default")
        );
    }

    let config = load(&[
        ("mesh.yaml", MESH_STRICT),
        ("foo.yaml", NAMESPACE_PERMISSIVE_FINANCE_STRICT),
    ]);
    assert_eq!(mode(&config, "foo/web", 80), by(Permissive, "foo/default"));
    assert_eq!(mode(&config, "foo/finance", 80), by(Strict, "foo/finance"));
    assert_eq!(
        mode(&config, "bar/db", 80),
        by(Strict, "istio-system/default"),
        "a selector selects in its own namespace only"
    );
    let decision = config
        .peer_authentications()
        .mtls_mode(config.workload_by_key("foo/web").unwrap(), 80);
    assert_eq!(
        decision.to_string(),
        "PERMISSIVE (PeerAuthentication foo/default)"
    );
    assert!(config.peer_authentications().warnings.is_empty());
}

#[test]
fn a_workload_selector_with_port_level_disable() {
    let config = load(&[
        ("mesh.yaml", MESH_STRICT),
        ("finance.yaml", FINANCE_STRICT_8080_DISABLE),
    ]);
    assert_eq!(
        mode(&config, "foo/finance", 8080),
        by(Disable, "foo/default")
    );
    assert_eq!(mode(&config, "foo/finance", 80), by(Strict, "foo/default"));
    assert_eq!(
        mode(&config, "foo/web", 8080),
        by(Strict, "istio-system/default"),
        "not selected: the mesh-wide policy applies"
    );
}

#[test]
fn unset_inherits_from_the_next_level() {
    let namespace_strict = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: foo}
spec: {mtls: {mode: STRICT}}
";
    let config = load(&[
        ("finance.yaml", FINANCE_UNSET_8080_DISABLE),
        ("ns.yaml", namespace_strict),
    ]);
    assert_eq!(
        mode(&config, "foo/finance", 80),
        by(Strict, "foo/ns"),
        "the workload's UNSET takes the namespace's mode"
    );
    assert_eq!(
        mode(&config, "foo/finance", 8080),
        by(Disable, "foo/default")
    );

    // UNSET at every level: the namespace inherits the mesh, a port its
    // workload's policy, and an UNSET mesh policy means PERMISSIVE.
    let unset = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: foo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: UNSET}, 9090: {}}
";
    let config = load(&[("unset.yaml", unset)]);
    assert_eq!(mode(&config, "foo/web", 80), (Permissive, None));
    assert_eq!(
        mode(&config, "foo/finance", 8080),
        by(Strict, "foo/finance")
    );
    assert_eq!(
        mode(&config, "foo/finance", 9090),
        by(Strict, "foo/finance")
    );

    // Without creationTimestamps the name orders the two mesh-wide
    // policies: `default` (UNSET) wins over `strict`, and UNSET is not
    // skipped in favour of the loser.
    let strict = MESH_STRICT.replace("name: default", "name: strict");
    let config = load(&[("unset.yaml", unset), ("mesh.yaml", &strict)]);
    assert_eq!(mode(&config, "foo/web", 80), (Permissive, None));
    let warnings = &config.peer_authentications().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].starts_with(
            "PeerAuthentication istio-system/strict (mesh.yaml): ignored; PeerAuthentication \
             istio-system/default (unset.yaml) is older and is the mesh-wide policy"
        ),
        "{}",
        warnings[0]
    );
}

#[test]
fn the_oldest_of_conflicting_policies_wins() {
    let policy = |name: &str, created: &str, spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: {name}, namespace: foo, creationTimestamp: {created}}}\nspec: {spec}\n"
        )
    };
    // Written newest first, so that file order cannot be what decides.
    let namespace_wide = policy("newer", "2024-06-01T00:00:00Z", "{mtls: {mode: STRICT}}")
        + &policy("older", "2024-01-01T00:00:00Z", "{mtls: {mode: DISABLE}}");
    let selected = policy(
        "finance-new",
        "2024-06-01T00:00:00Z",
        "{selector: {matchLabels: {app: finance}}, mtls: {mode: PERMISSIVE}}",
    ) + &policy(
        "finance-old",
        "2024-01-01T00:00:00Z",
        "{selector: {matchLabels: {app: finance}}, mtls: {mode: STRICT}}",
    );
    let config = load(&[("a.yaml", &namespace_wide), ("b.yaml", &selected)]);
    assert_eq!(mode(&config, "foo/web", 80), by(Disable, "foo/older"));
    assert_eq!(
        mode(&config, "foo/finance", 80),
        by(Strict, "foo/finance-old")
    );
    let warnings = &config.peer_authentications().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].starts_with("PeerAuthentication foo/newer (a.yaml): ignored; PeerAuthentication foo/older (a.yaml) is older and is the namespace-wide in foo policy"),
        "{}",
        warnings[0]
    );
}

#[test]
fn a_selector_in_the_root_namespace_applies_to_nothing() {
    let root_selector = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: finance, namespace: istio-system}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: STRICT}
";
    let config = load(&[("root.yaml", root_selector)]);
    for workload in ["foo/finance", "bar/db", "istio-system/gate"] {
        assert_eq!(
            mode(&config, workload, 80),
            (Permissive, None),
            "{workload}: Istio ignores selector policies in the root namespace"
        );
    }
    let warnings = &config.peer_authentications().warnings;
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].starts_with(
            "PeerAuthentication istio-system/finance (root.yaml): spec.selector: ignored, as in \
             Istio: a policy with a selector in the root namespace istio-system applies to no \
             workload"
        ),
        "{}",
        warnings[0]
    );

    // Another root namespace: its policy is mesh-wide, istio-system's is
    // an ordinary namespace's and its selector applies there.
    let opts = LoadOptions {
        root_namespace: "mesh-root".to_owned(),
        ..LoadOptions::default()
    };
    let mesh_root = MESH_STRICT.replace("istio-system", "mesh-root");
    let config = load_with(
        &[
            ("w.yaml", WORKLOADS),
            ("mesh.yaml", &mesh_root),
            ("root.yaml", root_selector),
        ],
        &opts,
    )
    .unwrap();
    let gate = config.workload_by_key("istio-system/gate").unwrap();
    let decision = config.peer_authentications().mtls_mode(gate, 80);
    assert_eq!(decision.policy.as_deref(), Some("istio-system/finance"));
    let db = config.workload_by_key("bar/db").unwrap();
    let decision = config.peer_authentications().mtls_mode(db, 80);
    assert_eq!(
        (decision.mode, decision.policy.as_deref()),
        (Strict, Some("mesh-root/default"))
    );
    assert!(config.peer_authentications().warnings.is_empty());
}

#[test]
fn an_empty_selector_is_namespace_wide() {
    let empty = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: all, namespace: foo}
spec: {selector: {matchLabels: {}}, mtls: {mode: STRICT}}
";
    let config = load(&[("empty.yaml", empty)]);
    assert_eq!(mode(&config, "foo/web", 80), by(Strict, "foo/all"));
}

#[test]
fn rejects_malformed_policies_naming_file_object_and_field() {
    let policy = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: p, namespace: foo}}\nspec: {spec}\n"
        )
    };
    let finance = "selector: {matchLabels: {app: finance}}";
    let cases = [
        (
            policy("{mtls: {mdoe: STRICT}}"),
            "pa.yaml: PeerAuthentication foo/p: spec.mtls.mdoe: unknown field `mdoe`",
        ),
        (
            policy("{mtls: {mode: STRICTER}}"),
            "pa.yaml: PeerAuthentication foo/p: spec.mtls.mode: unknown variant `STRICTER`, \
             expected one of `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`",
        ),
        (
            policy("{mtls: {mode: STRICT}, portLevelMtlss: {}}"),
            "pa.yaml: PeerAuthentication foo/p: spec.portLevelMtlss: unknown field `portLevelMtlss`",
        ),
        (
            policy(&format!("{{{finance}, portLevelMtls: {{70000: {{mode: DISABLE}}}}}}")),
            "pa.yaml: PeerAuthentication foo/p: spec.portLevelMtls.70000: must be between 1 and \
             65535",
        ),
        (
            policy(&format!("{{{finance}, portLevelMtls: {{0: {{mode: DISABLE}}}}}}")),
            "pa.yaml: PeerAuthentication foo/p: spec.portLevelMtls.0: must be between 1 and 65535",
        ),
        (
            policy(&format!("{{{finance}, portLevelMtls: {{http: {{mode: DISABLE}}}}}}")),
            "pa.yaml: PeerAuthentication foo/p: spec.portLevelMtls.http: \"http\" is not a port \
             number",
        ),
        (
            policy(&format!("{{{finance}, portLevelMtls: {{8080: {{mode: OFF}}}}}}")),
            "pa.yaml: PeerAuthentication foo/p: spec.portLevelMtls.8080.mode: unknown variant \
             `OFF`",
        ),
        (
            policy("{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}"),
            "pa.yaml: PeerAuthentication foo/p: spec.portLevelMtls: requires \
             spec.selector.matchLabels: Istio refuses port-level modes in mesh-wide and \
             namespace-wide policies",
        ),
        (
            policy(&format!("{{{finance}, portLevelMtls: {{}}}}")),
            "pa.yaml: PeerAuthentication foo/p: spec.portLevelMtls: must list at least one port",
        ),
        (
            policy("{selector: {matchLabels: {app: '*'}}}"),
            "pa.yaml: PeerAuthentication foo/p: spec.selector.matchLabels.app: invalid label \
             value \"*\"",
        ),
        (
            policy("{selector: {labels: {app: finance}}}"),
            "pa.yaml: PeerAuthentication foo/p: spec.selector.labels: unknown field `labels`",
        ),
        (
            "apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {name: p}\nspec: {}\n"
                .to_owned(),
            "pa.yaml: document 1: unsupported apiVersion \"security.istio.io/v1alpha1\" with kind \
             \"PeerAuthentication\"",
        ),
    ];
    for (doc, expected) in cases {
        let errors = load_with(&[("pa.yaml", &doc)], &LoadOptions::default())
            .map(|_| ())
            .unwrap_err();
        let shown = errors.to_string();
        assert!(
            shown.starts_with(expected),
            "{doc}\n{shown}\nlacks\n{expected}"
        );
    }
}
