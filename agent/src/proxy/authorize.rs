//! Where the data path asks AuthorizationPolicy: the caller and the
//! destination as the policy sees them, the log line and the counters of
//! every denial.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::Pod;
use crate::config::Config;
use crate::identity::SpiffeId;
use crate::security::authorization::{Action, Attributes, Decision, HttpView, Verdict};

/// Who is calling a workload.
#[derive(Debug, Clone)]
pub struct Caller {
    /// From its certificate (or, on this node, its own); `None` in plaintext.
    pub identity: Option<SpiffeId>,
    pub address: IpAddr,
    /// Istio's principal: the identity without `spiffe://`.
    principal: Option<String>,
    /// The server name of the TLS ClientHello the caller opened with, when
    /// a policy needs it.
    pub sni: Option<String>,
}

impl Caller {
    pub fn new(identity: Option<SpiffeId>, address: IpAddr) -> Caller {
        let principal = identity.as_ref().map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        });
        Caller {
            identity,
            address,
            principal,
            sni: None,
        }
    }

    /// What a policy sees of a call from this caller to `app`.
    pub fn attributes<'a>(&'a self, app: SocketAddr, http: HttpView<'a>) -> Attributes<'a> {
        Attributes {
            principal: self.principal.as_deref(),
            namespace: self.identity.as_ref().map(|id| id.namespace.as_str()),
            source_ip: self.address,
            destination: app,
            sni: self.sni.as_deref(),
            http,
        }
    }
}

/// Judges a call to `pod` with the policies of `cfg`; logs and counts a
/// denial, and logs what an AUDIT policy matched. `what` says what was
/// judged (`GET /path`, `connection`).
pub fn judge(
    cfg: &Config,
    pod: &Pod,
    denials: &Denials,
    attributes: &Attributes<'_>,
    what: impl FnOnce() -> String,
) -> Decision {
    let Some(workload) = cfg.workload_by_key(&pod.key) else {
        let decision = Decision {
            allowed: false,
            verdict: Verdict::NoAllowMatch {
                policies: Vec::new(),
            },
            audit: None,
        };
        log::warn!(
            "{}: {} refused: the workload left the configuration",
            pod.key,
            what()
        );
        return decision;
    };
    let decision = cfg.authorizations().check(workload, attributes);
    if !decision.allowed || decision.audit.is_some() {
        let caller = attributes.principal.unwrap_or("plaintext");
        let line = format!(
            "{}: {} from {} ({caller}) to port {}: {decision}",
            pod.key,
            what(),
            attributes.source_ip,
            attributes.destination.port()
        );
        if decision.allowed {
            log::info!("AUDIT {line}");
        } else {
            log::warn!("RBAC {line}");
            denials.count(&decision.verdict);
        }
    }
    decision
}

/// Denials since the agent started, in all and by the policy that decided
/// them (the ALLOW policies together when none of theirs matched).
#[derive(Default)]
pub struct Denials {
    total: AtomicU64,
    by_policy: Mutex<HashMap<String, u64>>,
}

#[derive(Debug, Serialize)]
pub struct DenialCounts {
    pub total: u64,
    pub by_policy: HashMap<String, u64>,
}

impl Denials {
    fn count(&self, verdict: &Verdict) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let decided_by = match verdict {
            Verdict::DeniedBy(matched) => matched.policy.to_string(),
            Verdict::NoAllowMatch { policies } if !policies.is_empty() => {
                let names: Vec<&str> = policies.iter().map(|p| &**p).collect();
                names.join(" + ")
            }
            _ => "workload not in the configuration".to_owned(),
        };
        let mut by_policy = self.by_policy.lock().unwrap_or_else(|e| e.into_inner());
        *by_policy.entry(decided_by).or_default() += 1;
    }

    pub fn snapshot(&self) -> DenialCounts {
        let by_policy = self.by_policy.lock().unwrap_or_else(|e| e.into_inner());
        DenialCounts {
            total: self.total.load(Ordering::Relaxed),
            by_policy: by_policy.clone(),
        }
    }
}

/// `nodemesh policies`: the policies that apply to `workload` (or to every
/// workload of `node`), in evaluation order (DENY, ALLOW, AUDIT), with
/// the denials counted since the agent started.
pub fn policies(
    cfg: &Config,
    node: &str,
    denials: &Denials,
    workload: Option<&str>,
) -> Result<serde_json::Value, String> {
    let workloads: Vec<&crate::config::Workload> = match workload {
        Some(key) => vec![cfg
            .workload_by_key(key)
            .ok_or_else(|| format!("no workload {key} (expected namespace/name)"))?],
        None => cfg.workloads().iter().filter(|w| w.node == node).collect(),
    };
    let authorizations = cfg.authorizations();
    let order = |a: Action| match a {
        Action::Deny => 0,
        Action::Allow => 1,
        Action::Audit => 2,
    };
    let rows: Vec<serde_json::Value> = workloads
        .into_iter()
        .map(|w| {
            let mut applicable: Vec<_> = authorizations.applicable(w).collect();
            applicable.sort_by_key(|p| order(p.action));
            let policies: Vec<serde_json::Value> = applicable
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name,
                        "action": p.action,
                        "scope": p.scope(),
                        "rules": p.rules(),
                    })
                })
                .collect();
            serde_json::json!({
                "workload": w.key(),
                "inspectsHttp": authorizations.needs_http(w),
                "policies": policies,
            })
        })
        .collect();
    Ok(serde_json::json!({
        "workloads": rows,
        "denials": denials.snapshot(),
        "warnings": authorizations.warnings,
    }))
}
