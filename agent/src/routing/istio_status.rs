//! The status of the Istio `Gateway`s and `VirtualService`s of the config, in
//! Istio's own schema (`istio.meta.v1alpha1.IstioStatus`: `conditions`,
//! `validationMessages`), computed from what compiling them found. Kubernetes
//! mode writes it (see `sources/kube/gateway_status.rs`); nothing here knows
//! about Kubernetes.
//!
//! Conditions: `Accepted` on both kinds (False when something the object names
//! is not served: the message names each field), and on a Gateway
//! `Programmed` (whether the agents of the nodes it selects listen on its
//! ports; Kubernetes mode marks it False per node). Istio's own `Reconciled`
//! means "pushed to every proxy", which nodemesh does not track.

use serde::Serialize;

use super::gateway_api::{Condition, ObjectStatus, StatusKind};

/// The API group of the objects.
pub const GROUP: &str = "networking.istio.io";

/// The Istio analyzer messages nodemesh reports, by Istio's codes (see
/// <https://istio.io/latest/docs/reference/config/analysis/>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Analysis {
    /// IST0101: a VirtualService names a Gateway that does not exist.
    ReferencedResourceNotFound,
    /// IST0104: a Gateway's port is not served on a node it selects (another
    /// process holds it there).
    GatewayPortNotOnWorkload,
    /// IST0106: the object is invalid and skipped.
    SchemaValidationError,
    /// IST0145: a host on a port another, older Gateway claims.
    ConflictingGateways,
    /// IST0161: a server's `credentialName` Secret is missing or invalid.
    InvalidGatewayCredential,
}

impl Analysis {
    pub fn code(self) -> &'static str {
        match self {
            Analysis::ReferencedResourceNotFound => "IST0101",
            Analysis::GatewayPortNotOnWorkload => "IST0104",
            Analysis::SchemaValidationError => "IST0106",
            Analysis::ConflictingGateways => "IST0145",
            Analysis::InvalidGatewayCredential => "IST0161",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Analysis::ReferencedResourceNotFound => "ReferencedResourceNotFound",
            Analysis::GatewayPortNotOnWorkload => "GatewayPortNotOnWorkload",
            Analysis::SchemaValidationError => "SchemaValidationError",
            Analysis::ConflictingGateways => "ConflictingGateways",
            Analysis::InvalidGatewayCredential => "InvalidGatewayCredential",
        }
    }

    /// As Istio rates the message (`AnalysisMessageBase.Level`).
    pub fn level(self) -> &'static str {
        match self {
            Analysis::GatewayPortNotOnWorkload => "WARNING",
            _ => "ERROR",
        }
    }

    pub fn documentation_url(self) -> String {
        format!(
            "https://istio.io/latest/docs/reference/config/analysis/{}/",
            self.code().to_ascii_lowercase()
        )
    }
}

/// An Istio object: kind (`Gateway` or `VirtualService`), namespace, name.
pub type IstioObject = (&'static str, String, String);

/// A problem compiling found in one Istio object: the object is applied
/// without the part `field` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub object: IstioObject,
    pub field: String,
    pub analysis: Analysis,
    pub message: String,
}

/// The status of every object of `objects`, from the `findings` about them.
pub(super) fn statuses(objects: &[IstioObject], findings: &[Finding]) -> Vec<ObjectStatus> {
    objects
        .iter()
        .map(|object| {
            let found = findings.iter().filter(|f| &f.object == object);
            let problems: Vec<_> = found
                .map(|f| (f.analysis, format!("{}: {}", f.field, f.message)))
                .collect();
            status(object, &problems)
        })
        .collect()
}

/// The status of an object skipped as invalid: its problems, as
/// `field: message`.
pub fn invalid(object: &IstioObject, problems: &[String]) -> ObjectStatus {
    let problems: Vec<_> = problems
        .iter()
        .map(|p| (Analysis::SchemaValidationError, p.clone()))
        .collect();
    status(object, &problems)
}

fn status(object: &IstioObject, problems: &[(Analysis, String)]) -> ObjectStatus {
    let (kind, namespace, name) = object.clone();
    let accepted = match problems.first() {
        None => Condition::new(
            "Accepted",
            true,
            "Accepted",
            "served by every nodemesh agent",
        ),
        Some((first, _)) if *first == Analysis::SchemaValidationError => Condition::new(
            "Accepted",
            false,
            first.name(),
            format!(
                "invalid, not served (a last valid version keeps serving): {}",
                messages(problems)
            ),
        ),
        Some((first, _)) => Condition::new(
            "Accepted",
            false,
            first.name(),
            format!("served without: {}", messages(problems)),
        ),
    };
    let mut conditions = vec![accepted];
    if kind == "Gateway" {
        conditions.push(Condition::new(
            "Programmed",
            true,
            "Programmed",
            "the agents of the nodes it selects listen on its ports",
        ));
    }
    let mut validation_messages: Vec<_> = problems.iter().map(|(a, _)| *a).collect();
    validation_messages.sort();
    validation_messages.dedup();
    ObjectStatus {
        group: GROUP,
        kind,
        namespace: Some(namespace),
        name,
        status: StatusKind::Istio {
            conditions,
            validation_messages,
        },
    }
}

fn messages(problems: &[(Analysis, String)]) -> String {
    let all: Vec<_> = problems
        .iter()
        .map(|(a, m)| format!("{m} [{}]", a.code()))
        .collect();
    all.join("; ")
}

/// `(type, status, reason)` of each condition of an Istio status, and its
/// codes.
#[cfg(test)]
pub(crate) fn summary(
    status: &ObjectStatus,
) -> (Vec<(&'static str, bool, &'static str)>, Vec<&'static str>) {
    let StatusKind::Istio {
        conditions,
        validation_messages,
    } = &status.status
    else {
        panic!("not an Istio status: {status:?}");
    };
    let conditions = conditions.iter().map(|c| (c.kind, c.status, c.reason));
    let codes = validation_messages.iter().map(|a| a.code());
    (conditions.collect(), codes.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &'static str, name: &str) -> IstioObject {
        (kind, "shop".into(), name.into())
    }

    #[test]
    fn findings_make_their_object_not_accepted_and_name_the_field() {
        let objects = [
            object("Gateway", "public"),
            object("Gateway", "newer"),
            object("VirtualService", "stray"),
        ];
        let findings = [
            Finding {
                object: object("Gateway", "newer"),
                field: "spec.servers[0].hosts[0]".into(),
                analysis: Analysis::ConflictingGateways,
                message: "host a.com on port 80 is already claimed".into(),
            },
            Finding {
                object: object("Gateway", "newer"),
                field: "spec.servers[1].tls.credentialName".into(),
                analysis: Analysis::InvalidGatewayCredential,
                message: "Secret shop/cred not found".into(),
            },
            Finding {
                object: object("VirtualService", "stray"),
                field: "spec.gateways[0]".into(),
                analysis: Analysis::ReferencedResourceNotFound,
                message: "Gateway shop/nowhere does not exist".into(),
            },
        ];
        let statuses = statuses(&objects, &findings);
        assert_eq!(
            summary(&statuses[0]),
            (
                vec![
                    ("Accepted", true, "Accepted"),
                    ("Programmed", true, "Programmed")
                ],
                vec![]
            )
        );
        assert_eq!(
            summary(&statuses[1]),
            (
                vec![
                    ("Accepted", false, "ConflictingGateways"),
                    ("Programmed", true, "Programmed")
                ],
                vec!["IST0145", "IST0161"]
            )
        );
        let StatusKind::Istio { conditions, .. } = &statuses[1].status else {
            unreachable!()
        };
        assert!(
            conditions[0].message.contains(
                "spec.servers[1].tls.credentialName: Secret shop/cred not found [IST0161]"
            ),
            "{conditions:?}"
        );
        assert_eq!(
            summary(&statuses[2]),
            (
                vec![("Accepted", false, "ReferencedResourceNotFound")],
                vec!["IST0101"]
            )
        );
        assert_eq!(statuses[2].group, GROUP);
    }

    #[test]
    fn an_invalid_object_gets_a_schema_validation_error() {
        let status = invalid(
            &object("VirtualService", "bad"),
            &["spec.http[0].route[0].weight: must be at most 100".into()],
        );
        assert_eq!(
            summary(&status),
            (
                vec![("Accepted", false, "SchemaValidationError")],
                vec!["IST0106"]
            )
        );
        assert_eq!(
            Analysis::SchemaValidationError.documentation_url(),
            "https://istio.io/latest/docs/reference/config/analysis/ist0106/"
        );
    }
}
