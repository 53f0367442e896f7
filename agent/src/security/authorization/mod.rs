//! Istio `AuthorizationPolicy`: who may call a workload, decided by the
//! agent of the destination's node from the caller's mutual-TLS identity.
//!
//! Istio's semantics: DENY policies first (any matching rule denies), then
//! ALLOW (if any ALLOW policy selects the workload, some rule must match),
//! AUDIT only logs. The decision is a pure function of the snapshot and of
//! the request's [`Attributes`], shared by the data path and `nodemesh
//! explain`. Rules limited to exact principals are indexed by principal,
//! so an allow-list of a thousand callers costs one lookup, not a thousand
//! comparisons.

mod rule;
mod spec;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::config::{Labels, Origin, Service, Workload};
use crate::security::target;
use rule::Rule;
pub(crate) use spec::{authorization_policy, AuthorizationPolicyDraft};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        })
    }
}

/// What a connection or request is judged on.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// The caller's principal (`td/ns/N/sa/S`, Istio's form: the SPIFFE id
    /// without `spiffe://`); none in plaintext.
    pub principal: Option<&'a str>,
    /// The namespace of the caller's identity; none in plaintext.
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    /// The workload's own address and port.
    pub destination: SocketAddr,
    /// Server name of a TLS connection the caller opened to the workload
    /// (from its ClientHello); `None` for anything else.
    pub sni: Option<&'a str>,
    pub http: HttpView<'a>,
}

/// The HTTP side of what is judged.
#[derive(Debug, Clone)]
pub enum HttpView<'a> {
    Request(HttpRequest<'a>),
    /// A connection that is not HTTP: Istio's TCP semantics.
    Tcp,
    /// Not known yet (a connection before its first bytes): decides only
    /// what holds whatever the requests turn out to be.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// Normalized, without the query.
    pub path: &'a str,
    /// `:authority` or `Host`.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// A policy and the index of its rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub policy: Arc<str>,
    pub rule: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum Verdict {
    /// No ALLOW or DENY policy selects the workload.
    NoPolicy,
    AllowedBy(Matched),
    DeniedBy(Matched),
    /// ALLOW policies select the workload and no rule of theirs matches.
    NoAllowMatch {
        policies: Vec<Arc<str>>,
    },
}

/// The answer for one connection or request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub verdict: Verdict,
    /// An AUDIT policy whose rule matched.
    pub audit: Option<Matched>,
}

impl fmt::Display for Decision {
    /// `denied by DENY policy foo/deny-admin, rule 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::NoPolicy => {
                f.write_str("allowed: no ALLOW or DENY AuthorizationPolicy applies")
            }
            Verdict::AllowedBy(m) => {
                write!(f, "allowed by ALLOW policy {}, rule {}", m.policy, m.rule)
            }
            Verdict::DeniedBy(m) => {
                write!(f, "denied by DENY policy {}, rule {}", m.policy, m.rule)
            }
            Verdict::NoAllowMatch { policies } => {
                let names: Vec<&str> = policies.iter().map(|p| &**p).collect();
                write!(
                    f,
                    "denied: no rule of ALLOW policy {} matches",
                    names.join(", ")
                )
            }
        }?;
        if let Some(audit) = &self.audit {
            write!(f, " (audited by {}, rule {})", audit.policy, audit.rule)?;
        }
        Ok(())
    }
}

/// Which workloads of its namespace (or, in the root namespace, of every
/// namespace) a policy applies to.
#[derive(Debug, Clone)]
enum Scope {
    All,
    Selector(Labels),
    /// `targetRefs`: the selectors of the Services named.
    Services(Vec<Labels>),
}

/// One compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `namespace/name`.
    pub name: Arc<str>,
    pub action: Action,
    scope: Scope,
    rules: Box<[Rule]>,
    /// Rules limited to exact principals, by principal; ascending.
    by_principal: HashMap<Box<str>, Vec<u32>>,
    /// Every other rule; ascending.
    scanned: Box<[u32]>,
}

impl Policy {
    fn new(name: Arc<str>, action: Action, scope: Scope, rules: Vec<Rule>) -> Policy {
        let mut by_principal = HashMap::<Box<str>, Vec<u32>>::new();
        let mut scanned = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let i = i as u32;
            match rule.exact_principals() {
                Some(principals) => {
                    for principal in principals {
                        let rules = by_principal.entry(principal.into()).or_default();
                        if rules.last() != Some(&i) {
                            rules.push(i);
                        }
                    }
                }
                None => scanned.push(i),
            }
        }
        Policy {
            name,
            action,
            scope,
            rules: rules.into(),
            by_principal,
            scanned: scanned.into(),
        }
    }

    fn selects(&self, workload: &Workload) -> bool {
        let within = |labels: &Labels| workload.labels.contains_all(labels.iter());
        match &self.scope {
            Scope::All => true,
            Scope::Selector(labels) => within(labels),
            Scope::Services(selectors) => selectors.iter().any(within),
        }
    }

    /// Whether any rule looks at HTTP fields.
    pub fn uses_http(&self) -> bool {
        self.rules.iter().any(|r| r.uses_http)
    }

    /// The first rule that matches, in the order written.
    fn matching_rule(&self, a: &Attributes<'_>) -> Option<usize> {
        let deny = self.action == Action::Deny;
        let indexed: &[u32] = a
            .principal
            .and_then(|p| self.by_principal.get(p))
            .map_or(&[], Vec::as_slice);
        let (mut i, mut j) = (0, 0);
        loop {
            let next = match (indexed.get(i), self.scanned.get(j)) {
                (Some(&x), Some(&y)) if x < y => {
                    i += 1;
                    x
                }
                (_, Some(&y)) => {
                    j += 1;
                    y
                }
                (Some(&x), None) => {
                    i += 1;
                    x
                }
                (None, None) => return None,
            };
            if self.rules[next as usize].matches(a, deny) {
                return Some(next as usize);
            }
        }
    }

    /// The rules, as `nodemesh policies` shows them.
    pub fn rules(&self) -> Vec<String> {
        self.rules.iter().map(Rule::to_string).collect()
    }

    pub fn scope(&self) -> String {
        let labels = |l: &Labels| {
            let pairs: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            pairs.join(",")
        };
        match &self.scope {
            Scope::All => "all workloads".into(),
            Scope::Selector(l) => format!("workloads with {}", labels(l)),
            Scope::Services(ls) => {
                let ls: Vec<String> = ls.iter().map(labels).collect();
                format!("workloads of the target Services ({})", ls.join(" | "))
            }
        }
    }
}

/// Every AuthorizationPolicy of the config, by where it applies.
#[derive(Debug, Clone, Default)]
pub struct Authorizations {
    /// The root namespace's policies: they apply in every namespace.
    mesh: Vec<Policy>,
    namespaces: HashMap<String, Vec<Policy>>,
    /// Policies that apply to nothing; logged at each load and shown by
    /// `nodemesh status`.
    pub warnings: Vec<String>,
}

impl Authorizations {
    /// The policies that apply to `workload`, mesh-wide first, oldest first.
    pub fn applicable<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Policy> {
        let namespace = self.namespaces.get(&workload.namespace);
        self.mesh
            .iter()
            .chain(namespace.into_iter().flatten())
            .filter(move |p| p.selects(workload))
    }

    /// Whether judging `workload`'s connections needs their HTTP requests.
    pub fn needs_http(&self, workload: &Workload) -> bool {
        self.applicable(workload)
            .any(|p| p.action != Action::Audit && p.uses_http())
    }

    /// Whether judging `workload`'s connections needs the server name of
    /// their TLS ClientHello (`connection.sni`).
    pub fn needs_sni(&self, workload: &Workload) -> bool {
        self.applicable(workload)
            .any(|p| p.rules.iter().any(|r| r.uses_sni))
    }

    /// Istio's order: a matching DENY rule denies; else, when ALLOW
    /// policies apply, one of their rules must match.
    pub fn check(&self, workload: &Workload, a: &Attributes<'_>) -> Decision {
        let mut allow_policies = false;
        let mut allowed = None;
        let mut audit = None;
        for policy in self.applicable(workload) {
            match policy.action {
                Action::Deny => {
                    if let Some(rule) = policy.matching_rule(a) {
                        let matched = Matched {
                            policy: policy.name.clone(),
                            rule,
                        };
                        return Decision {
                            allowed: false,
                            verdict: Verdict::DeniedBy(matched),
                            audit,
                        };
                    }
                }
                Action::Allow => {
                    allow_policies = true;
                    if allowed.is_none() {
                        allowed = policy.matching_rule(a).map(|rule| Matched {
                            policy: policy.name.clone(),
                            rule,
                        });
                    }
                }
                Action::Audit => {
                    if audit.is_none() {
                        audit = policy.matching_rule(a).map(|rule| Matched {
                            policy: policy.name.clone(),
                            rule,
                        });
                    }
                }
            }
        }
        let verdict = match allowed {
            Some(matched) => Verdict::AllowedBy(matched),
            None if allow_policies => Verdict::NoAllowMatch {
                policies: self
                    .applicable(workload)
                    .filter(|p| p.action == Action::Allow)
                    .map(|p| p.name.clone())
                    .collect(),
            },
            None => Verdict::NoPolicy,
        };
        Decision {
            allowed: !matches!(verdict, Verdict::NoAllowMatch { .. }),
            verdict,
            audit,
        }
    }

    /// Sorts the policies by scope; `targetRefs` are resolved against
    /// `services`.
    pub(crate) fn compile(
        mut drafts: Vec<(Origin, AuthorizationPolicyDraft)>,
        root_namespace: &str,
        services: &[Service],
    ) -> Authorizations {
        drafts.sort_by(|(_, a), (_, b)| a.meta.rank().cmp(&b.meta.rank()));
        let mut out = Authorizations::default();
        for (origin, draft) in drafts {
            let namespace = draft.meta.namespace.clone();
            let name: Arc<str> = format!("{namespace}/{}", draft.meta.name).into();
            let scope = if !draft.targets.is_empty() {
                let selectors = target::selectors(
                    &origin,
                    &namespace,
                    &draft.targets,
                    services,
                    &mut out.warnings,
                );
                Scope::Services(selectors)
            } else {
                match draft.selector {
                    Some(labels) => Scope::Selector(labels.into()),
                    None => Scope::All,
                }
            };
            let policy = Policy::new(name, draft.action, scope, draft.rules);
            let mesh_wide = namespace == root_namespace && draft.targets.is_empty();
            match mesh_wide {
                true => out.mesh.push(policy),
                false => out.namespaces.entry(namespace).or_default().push(policy),
            }
        }
        out
    }
}
