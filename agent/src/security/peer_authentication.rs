//! Istio `PeerAuthentication`: which mutual TLS mode a workload's port
//! accepts from its callers.
//!
//! Resolution follows Istio (pilot's `ComposePeerAuthentication`): the
//! oldest policy with a selector in the workload's namespace, else the
//! oldest namespace-wide one, else the oldest mesh-wide one (no selector, in
//! the root namespace), else PERMISSIVE. `UNSET` hands over to the next
//! level, and `portLevelMtls` of the workload's policy overrides it per
//! port. Policies with a selector in the root namespace apply to nothing, as
//! in Istio; loading one says so.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::WorkloadSelectorSpec;
use crate::config::{check_metadata, port_number, Issues, Meta, Object, Origin, Workload};

/// `spec` of a PeerAuthentication, read strictly so that typos are errors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PeerAuthenticationSpec {
    selector: Option<WorkloadSelectorSpec>,
    mtls: Option<MutualTlsSpec>,
    /// Keys are port numbers, read as text so that a bad one is reported
    /// on its own field.
    port_level_mtls: Option<BTreeMap<String, MutualTlsSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MutualTlsSpec {
    #[serde(default)]
    mode: ModeSpec,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ModeSpec {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl ModeSpec {
    /// `None` for `UNSET`: the next level decides.
    fn mode(self) -> Option<MtlsMode> {
        match self {
            ModeSpec::Unset => None,
            ModeSpec::Disable => Some(MtlsMode::Disable),
            ModeSpec::Permissive => Some(MtlsMode::Permissive),
            ModeSpec::Strict => Some(MtlsMode::Strict),
        }
    }
}

/// What a workload's port accepts from its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mutual TLS only: plaintext is refused, whoever sends it.
    Strict,
    /// Mutual TLS from mesh workloads, plaintext from anyone else (Istio's
    /// default).
    Permissive,
    /// No mutual TLS: callers in the mesh reach it in plaintext, as
    /// Istio's automatic mTLS does for such a destination.
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// The mode that applies to one port of one workload, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsDecision {
    pub mode: MtlsMode,
    /// `namespace/name` of the PeerAuthentication that set the mode; `None`
    /// when none does and the mesh default (PERMISSIVE) applies.
    pub policy: Option<Arc<str>>,
}

impl MtlsDecision {
    const MESH_DEFAULT: MtlsDecision = MtlsDecision {
        mode: MtlsMode::Permissive,
        policy: None,
    };
}

impl fmt::Display for MtlsDecision {
    /// `STRICT (PeerAuthentication shop/default)`, `PERMISSIVE (default: no PeerAuthentication)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some(policy) => write!(f, "{} (PeerAuthentication {policy})", self.mode),
            None => write!(f, "{} (default: no PeerAuthentication)", self.mode),
        }
    }
}

/// One policy's mode at one level.
#[derive(Debug, Clone)]
struct Setting {
    /// `namespace/name`.
    policy: Arc<str>,
    /// `None`: UNSET, the next level decides.
    mode: Option<MtlsMode>,
}

#[derive(Debug, Clone)]
struct SelectorPolicy {
    /// Never empty: a policy with an empty selector is namespace-wide.
    match_labels: BTreeMap<String, String>,
    setting: Setting,
    /// `portLevelMtls`, by the workload's (target) port.
    ports: Vec<(u16, Setting)>,
}

impl SelectorPolicy {
    fn selects(&self, workload: &Workload) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| workload.labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, Default)]
struct NamespacePolicies {
    /// The oldest policy without a selector.
    namespace_wide: Option<Setting>,
    /// Oldest first: the first one that selects a workload is its policy.
    selected: Vec<SelectorPolicy>,
}

/// Every PeerAuthentication of the config, compiled for lookups by workload.
#[derive(Debug, Clone, Default)]
pub struct PeerAuthentications {
    /// The oldest policy without a selector in the root namespace.
    mesh: Option<Setting>,
    /// Namespace → its policies (the root namespace has none here).
    namespaces: HashMap<String, NamespacePolicies>,
    /// Policies that lose to an older one or apply to nothing; logged at
    /// each load and shown by `nodemesh status`.
    pub warnings: Vec<String>,
}

impl PeerAuthentications {
    /// The mode `workload` accepts on `port`, its own (target) port: the
    /// most specific level that sets one wins.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsDecision {
        let namespace = self.namespaces.get(&workload.namespace);
        let selected = namespace.and_then(|n| n.selected.iter().find(|p| p.selects(workload)));
        let port_level = selected.and_then(|p| p.ports.iter().find(|(n, _)| *n == port));
        let levels = [
            port_level.map(|(_, setting)| setting),
            selected.map(|p| &p.setting),
            namespace.and_then(|n| n.namespace_wide.as_ref()),
            self.mesh.as_ref(),
        ];
        levels
            .into_iter()
            .flatten()
            .find_map(|setting| {
                Some(MtlsDecision {
                    mode: setting.mode?,
                    policy: Some(setting.policy.clone()),
                })
            })
            .unwrap_or(MtlsDecision::MESH_DEFAULT)
    }

    /// Sorts the policies into their levels; `root_namespace` holds the
    /// mesh-wide one.
    pub(crate) fn compile(
        mut drafts: Vec<(Origin, PeerAuthenticationDraft)>,
        root_namespace: &str,
    ) -> PeerAuthentications {
        drafts.sort_by(|(_, a), (_, b)| a.meta.rank().cmp(&b.meta.rank()));
        let mut out = PeerAuthentications::default();
        // Namespace → origin of its namespace-wide (or mesh-wide) policy.
        let mut wide = HashMap::<&str, &Origin>::new();
        for (origin, draft) in &drafts {
            let namespace = draft.meta.namespace.as_str();
            let setting = Setting {
                policy: format!("{namespace}/{}", draft.meta.name).into(),
                mode: draft.mode,
            };
            let in_root = namespace == root_namespace;
            match &draft.selector {
                None => {
                    if let Some(winner) = wide.get(namespace) {
                        let scope = if in_root {
                            "mesh-wide".to_owned()
                        } else {
                            format!("namespace-wide in {namespace}")
                        };
                        out.warnings.push(format!(
                            "{origin}: ignored; {winner} is older and is the {scope} policy \
                             (Istio applies the oldest)"
                        ));
                        continue;
                    }
                    wide.insert(namespace, origin);
                    let slot = if in_root {
                        &mut out.mesh
                    } else {
                        &mut out
                            .namespaces
                            .entry(namespace.to_owned())
                            .or_default()
                            .namespace_wide
                    };
                    *slot = Some(setting);
                }
                Some(_) if in_root => out.warnings.push(format!(
                    "{origin}: spec.selector: ignored, as in Istio: a policy with a selector in \
                     the root namespace {root_namespace} applies to no workload; remove the \
                     selector for a mesh-wide policy, or move it to the workloads' namespace"
                )),
                Some(match_labels) => {
                    let ports = draft.ports.iter().map(|&(port, mode)| {
                        let setting = Setting {
                            policy: setting.policy.clone(),
                            mode,
                        };
                        (port, setting)
                    });
                    let policy = SelectorPolicy {
                        match_labels: match_labels.clone(),
                        ports: ports.collect(),
                        setting,
                    };
                    let namespace = out.namespaces.entry(namespace.to_owned()).or_default();
                    namespace.selected.push(policy);
                }
            }
        }
        out
    }
}

/// A checked PeerAuthentication, waiting for the others to be sorted into
/// levels.
pub(crate) struct PeerAuthenticationDraft {
    meta: Meta,
    /// `None`: no selector, or one without labels (Istio reads both as
    /// namespace-wide).
    selector: Option<BTreeMap<String, String>>,
    mode: Option<MtlsMode>,
    ports: Vec<(u16, Option<MtlsMode>)>,
}

pub(crate) fn peer_authentication(
    doc: Object<PeerAuthenticationSpec>,
    issues: &mut Issues,
) -> PeerAuthenticationDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    let selector = super::selector_labels(spec.selector, issues);
    let mut ports = Vec::new();
    if let Some(port_level) = spec.port_level_mtls {
        if port_level.is_empty() {
            issues.add("spec.portLevelMtls", "must list at least one port when set");
        } else if selector.is_none() {
            issues.add(
                "spec.portLevelMtls",
                "requires spec.selector.matchLabels: Istio refuses port-level modes in mesh-wide \
                 and namespace-wide policies",
            );
        }
        for (key, mtls) in port_level {
            let field = format!("spec.portLevelMtls.{key}");
            let Ok(number) = key.parse::<i64>() else {
                issues.add(field, format!("{key:?} is not a port number"));
                continue;
            };
            let Some(port) = port_number(number, field.clone(), issues) else {
                continue;
            };
            if ports.iter().any(|&(p, _)| p == port) {
                issues.add(field, format!("duplicate port {port}"));
                continue;
            }
            ports.push((port, mtls.mode.mode()));
        }
    }
    PeerAuthenticationDraft {
        meta: Meta::new(&doc.metadata),
        selector,
        mode: spec.mtls.and_then(|m| m.mode.mode()),
        ports,
    }
}
