//! Gateway API `ReferenceGrant` (`gateway.networking.k8s.io/v1beta1`,
//! `v1alpha2`): the owner of a namespace lets objects of another namespace
//! refer to its objects. A Gateway's `certificateRefs` Secret and an
//! HTTPRoute's or GRPCRoute's `backendRefs` Service in another namespace are used only when
//! a grant in the *target's* namespace lists the referrer (`from`) and the
//! target (`to`). Grants are read at every load, so removing one revokes the
//! reference at the next reload. Istio's `credentialName` does not use them.

use serde::Deserialize;

use crate::config::{check_dns_label, check_metadata, Issues, Object};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReferenceGrantSpec {
    from: Vec<FromSpec>,
    to: Vec<ToSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    group: String,
    kind: String,
    namespace: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    group: String,
    kind: String,
    name: Option<String>,
}

/// One grant, checked.
pub(crate) struct ReferenceGrantDraft {
    namespace: String,
    from: Vec<FromSpec>,
    to: Vec<ToSpec>,
}

pub(crate) fn reference_grant(
    doc: Object<ReferenceGrantSpec>,
    issues: &mut Issues,
) -> ReferenceGrantDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    for (field, empty) in [
        ("spec.from", spec.from.is_empty()),
        ("spec.to", spec.to.is_empty()),
    ] {
        if empty {
            issues.add(field, "at least one entry is required");
        }
    }
    for (i, from) in spec.from.iter().enumerate() {
        if from.kind.is_empty() {
            issues.add(format!("spec.from[{i}].kind"), "must not be empty");
        }
        check_dns_label(
            &from.namespace,
            &format!("spec.from[{i}].namespace"),
            issues,
        );
    }
    for (i, to) in spec.to.iter().enumerate() {
        if to.kind.is_empty() {
            issues.add(format!("spec.to[{i}].kind"), "must not be empty");
        }
    }
    ReferenceGrantDraft {
        namespace: doc.metadata.namespace,
        from: spec.from,
        to: spec.to,
    }
}

/// An object by API group (`""` for the core group), kind and namespace.
#[derive(Clone, Copy)]
pub(crate) struct Kind<'a> {
    pub group: &'a str,
    pub kind: &'a str,
}

impl Kind<'static> {
    pub const GATEWAY: Self = Kind {
        group: super::gateway_api::GROUP,
        kind: "Gateway",
    };
    pub const HTTP_ROUTE: Self = Kind {
        group: super::gateway_api::GROUP,
        kind: "HTTPRoute",
    };
    pub const GRPC_ROUTE: Self = Kind {
        group: super::gateway_api::GROUP,
        kind: "GRPCRoute",
    };
    pub const SECRET: Self = Kind {
        group: "",
        kind: "Secret",
    };
    pub const SERVICE: Self = Kind {
        group: "",
        kind: "Service",
    };
}

/// The core group is written `""`; `core` is accepted as its other name.
fn same_group(a: &str, b: &str) -> bool {
    fn core(g: &str) -> &str {
        if g == "core" {
            ""
        } else {
            g
        }
    }
    core(a) == core(b)
}

/// Every grant of the configuration.
#[derive(Default)]
pub(crate) struct ReferenceGrants(Vec<ReferenceGrantDraft>);

impl ReferenceGrants {
    pub fn new(grants: impl IntoIterator<Item = ReferenceGrantDraft>) -> Self {
        ReferenceGrants(grants.into_iter().collect())
    }

    /// Whether an object of kind `from` in `from_namespace` may refer to the
    /// object `name` of kind `to` in `to_namespace`. A reference within one
    /// namespace needs no grant.
    pub fn permits(
        &self,
        from: Kind,
        from_namespace: &str,
        to: Kind,
        to_namespace: &str,
        name: &str,
    ) -> bool {
        from_namespace == to_namespace
            || self.0.iter().any(|grant| {
                grant.namespace == to_namespace
                    && grant.from.iter().any(|f| {
                        same_group(&f.group, from.group)
                            && f.kind == from.kind
                            && f.namespace == from_namespace
                    })
                    && grant.to.iter().any(|t| {
                        same_group(&t.group, to.group)
                            && t.kind == to.kind
                            && t.name.as_deref().is_none_or(|n| n == name)
                    })
            })
    }
}
