//! Reading an AuthorizationPolicy: the spec exactly as Istio writes it,
//! checked field by field into rules, so that a typo or a feature nodemesh
//! lacks is an error that names the field rather than a policy that
//! silently matches something else.

use std::collections::BTreeMap;

use http::HeaderName;
use serde::Deserialize;

use super::rule::{Check, Clause, IpBlock, Pattern, Rule};
use super::Action;
use crate::config::{check_metadata, Issues, Meta, Object};
use crate::security::target::{self, TargetRefSpec};
use crate::security::WorkloadSelectorSpec;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct AuthorizationPolicySpec {
    selector: Option<WorkloadSelectorSpec>,
    target_ref: Option<TargetRefSpec>,
    #[serde(default)]
    target_refs: Vec<TargetRefSpec>,
    #[serde(default)]
    action: ActionSpec,
    provider: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ActionSpec {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Vec<FromSpec>,
    #[serde(default)]
    to: Vec<ToSpec>,
    #[serde(default)]
    when: Vec<ConditionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSpec {
    source: Option<SourceSpec>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct SourceSpec {
    principals: Vec<String>,
    not_principals: Vec<String>,
    request_principals: Vec<String>,
    not_request_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<String>,
    not_ip_blocks: Vec<String>,
    remote_ip_blocks: Vec<String>,
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    operation: Option<OperationSpec>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct OperationSpec {
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    ports: Vec<String>,
    not_ports: Vec<String>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionSpec {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// A checked policy whose `targetRefs` still have to be resolved to the
/// Services' selectors.
pub(crate) struct AuthorizationPolicyDraft {
    pub(super) meta: Meta,
    pub(super) action: Action,
    /// Non-empty labels, or `None` (namespace-wide, or mesh-wide in the
    /// root namespace).
    pub(super) selector: Option<BTreeMap<String, String>>,
    /// Names of Services in the policy's namespace.
    pub(super) targets: Vec<String>,
    pub(super) rules: Vec<Rule>,
}

pub(crate) fn authorization_policy(
    doc: Object<AuthorizationPolicySpec>,
    issues: &mut Issues,
) -> AuthorizationPolicyDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    let action = match spec.action {
        ActionSpec::Allow => Action::Allow,
        ActionSpec::Deny => Action::Deny,
        ActionSpec::Audit => Action::Audit,
        ActionSpec::Custom => {
            issues.add(
                "spec.action",
                "CUSTOM (an external authorizer) is not supported by nodemesh; the policy is \
                 rejected rather than ignored, so that nothing is let through that it meant to \
                 stop",
            );
            Action::Deny
        }
    };
    if spec.provider.is_some() && spec.action != ActionSpec::Custom {
        issues.add(
            "spec.provider",
            "is only for action CUSTOM, which is not supported",
        );
    }
    let (selector, targets) = target::scope(
        spec.selector,
        spec.target_ref,
        spec.target_refs,
        &doc.metadata.namespace,
        issues,
    );
    let rules = spec
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| self::rule(rule, &format!("spec.rules[{i}]"), issues))
        .collect();
    AuthorizationPolicyDraft {
        meta: Meta::new(&doc.metadata),
        action,
        selector,
        targets,
        rules,
    }
}

fn rule(spec: RuleSpec, field: &str, issues: &mut Issues) -> Rule {
    let from = spec
        .from
        .into_iter()
        .enumerate()
        .filter_map(|(i, from)| {
            let field = format!("{field}.from[{i}].source");
            match from.source {
                Some(source) => Some(source_clauses(source, &field, issues)),
                None => {
                    issues.add(field, "is required");
                    None
                }
            }
        })
        .collect();
    let to = spec
        .to
        .into_iter()
        .enumerate()
        .filter_map(|(i, to)| {
            let field = format!("{field}.to[{i}].operation");
            match to.operation {
                Some(operation) => Some(operation_clauses(operation, &field, issues)),
                None => {
                    issues.add(field, "is required");
                    None
                }
            }
        })
        .collect();
    let when = spec
        .when
        .into_iter()
        .enumerate()
        .flat_map(|(i, condition)| {
            condition_clauses(condition, &format!("{field}.when[{i}]"), issues)
        })
        .collect();
    Rule::new(from, to, when)
}

/// Adds the clause for `values` (and `not` for the `not…` form) when the
/// list is set.
struct Clauses<'a> {
    field: &'a str,
    issues: &'a mut Issues,
    out: Vec<Clause>,
}

impl Clauses<'_> {
    fn add<T>(
        &mut self,
        name: &str,
        values: Vec<String>,
        negated: bool,
        parse: impl Fn(&str) -> Result<T, String>,
        check: impl FnOnce(Box<[T]>) -> Check,
    ) {
        if values.is_empty() {
            return;
        }
        let mut parsed = Vec::with_capacity(values.len());
        for (i, value) in values.iter().enumerate() {
            match parse(value) {
                Ok(v) => parsed.push(v),
                Err(e) => self.issues.add(format!("{}.{name}[{i}]", self.field), e),
            }
        }
        self.out.push(Clause {
            check: check(parsed.into()),
            negated,
        });
    }

    /// Every field of a source or operation is optional, but one must be set.
    fn finish(self) -> Vec<Clause> {
        if self.out.is_empty() {
            self.issues.add(
                self.field,
                "must set at least one field (Istio rejects it empty)",
            );
        }
        self.out
    }
}

fn principal(value: &str) -> Result<Pattern, String> {
    if value.starts_with("spiffe://") {
        return Err(format!(
            "{value:?}: write principals without spiffe://, as Istio does: \
             <trust-domain>/ns/<namespace>/sa/<service-account>"
        ));
    }
    Pattern::parse(value)
}

fn port(value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{value:?} is not a port number (1 to 65535)"))
}

fn path(value: &str) -> Result<Pattern, String> {
    if value.contains('{') {
        return Err(format!(
            "{value:?}: path templates ({{*}}, {{**}}) are not supported; use exact, `prefix*` \
             or `*suffix`"
        ));
    }
    Pattern::parse(value)
}

fn source_clauses(spec: SourceSpec, field: &str, issues: &mut Issues) -> Vec<Clause> {
    for (name, values) in [
        ("requestPrincipals", &spec.request_principals),
        ("notRequestPrincipals", &spec.not_request_principals),
    ] {
        if !values.is_empty() {
            issues.add(
                format!("{field}.{name}"),
                "request principals come from JWTs (RequestAuthentication), which nodemesh does \
                 not validate yet",
            );
        }
    }
    let jwt_only = spec.request_principals.len() + spec.not_request_principals.len() > 0;
    let mut c = Clauses {
        field,
        issues,
        out: Vec::new(),
    };
    c.add(
        "principals",
        spec.principals,
        false,
        principal,
        Check::Principal,
    );
    c.add(
        "notPrincipals",
        spec.not_principals,
        true,
        principal,
        Check::Principal,
    );
    c.add(
        "namespaces",
        spec.namespaces,
        false,
        Pattern::parse,
        Check::Namespace,
    );
    c.add(
        "notNamespaces",
        spec.not_namespaces,
        true,
        Pattern::parse,
        Check::Namespace,
    );
    c.add(
        "ipBlocks",
        spec.ip_blocks,
        false,
        IpBlock::parse,
        Check::SourceIp,
    );
    c.add(
        "notIpBlocks",
        spec.not_ip_blocks,
        true,
        IpBlock::parse,
        Check::SourceIp,
    );
    // The caller's address: nodemesh trusts no X-Forwarded-For (Istio's
    // default, numTrustedProxies 0), so the remote address is the peer's.
    let (remote, not_remote) = (spec.remote_ip_blocks, spec.not_remote_ip_blocks);
    c.add(
        "remoteIpBlocks",
        remote,
        false,
        IpBlock::parse,
        Check::SourceIp,
    );
    c.add(
        "notRemoteIpBlocks",
        not_remote,
        true,
        IpBlock::parse,
        Check::SourceIp,
    );
    if jwt_only && c.out.is_empty() {
        return c.out;
    }
    c.finish()
}

fn operation_clauses(spec: OperationSpec, field: &str, issues: &mut Issues) -> Vec<Clause> {
    let mut c = Clauses {
        field,
        issues,
        out: Vec::new(),
    };
    c.add("hosts", spec.hosts, false, Pattern::parse, Check::Host);
    c.add(
        "notHosts",
        spec.not_hosts,
        true,
        Pattern::parse,
        Check::Host,
    );
    c.add("ports", spec.ports, false, port, Check::Port);
    c.add("notPorts", spec.not_ports, true, port, Check::Port);
    c.add(
        "methods",
        spec.methods,
        false,
        Pattern::parse,
        Check::Method,
    );
    c.add(
        "notMethods",
        spec.not_methods,
        true,
        Pattern::parse,
        Check::Method,
    );
    c.add("paths", spec.paths, false, path, Check::Path);
    c.add("notPaths", spec.not_paths, true, path, Check::Path);
    c.finish()
}

/// The `when` keys nodemesh evaluates.
const SUPPORTED_KEYS: &str = "request.headers[<name>], source.ip, remote.ip, source.namespace, \
                              source.principal, destination.ip, destination.port, connection.sni";

fn condition_clauses(mut spec: ConditionSpec, field: &str, issues: &mut Issues) -> Vec<Clause> {
    let key_field = format!("{field}.key");
    let key = std::mem::take(&mut spec.key);
    let key = key.as_str();
    if spec.values.is_empty() && spec.not_values.is_empty() {
        issues.add(
            format!("{field}.values"),
            "values or notValues must list at least one value",
        );
    }
    type Make = fn(&str, Vec<String>, bool, &mut Clauses<'_>);
    let make: Make = match key {
        "source.ip" | "remote.ip" => {
            |n, v, neg, c| c.add(n, v, neg, IpBlock::parse, Check::SourceIp)
        }
        "destination.ip" => |n, v, neg, c| c.add(n, v, neg, IpBlock::parse, Check::DestinationIp),
        "destination.port" => |n, v, neg, c| c.add(n, v, neg, port, Check::Port),
        "source.namespace" => |n, v, neg, c| c.add(n, v, neg, Pattern::parse, Check::Namespace),
        "source.principal" => |n, v, neg, c| c.add(n, v, neg, principal, Check::Principal),
        "connection.sni" => |n, v, neg, c| c.add(n, v, neg, Pattern::parse, Check::Sni),
        _ => {
            if let Some(name) = key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
            {
                return header_clauses(name, spec, field, issues);
            }
            let message = if key.starts_with("request.auth.") {
                format!("{key:?}: JWT claims need RequestAuthentication, which nodemesh does not validate yet")
            } else {
                format!("{key:?} is not supported (supported: {SUPPORTED_KEYS})")
            };
            issues.add(key_field, message);
            return Vec::new();
        }
    };
    let mut c = Clauses {
        field,
        issues,
        out: Vec::new(),
    };
    make("values", spec.values, false, &mut c);
    make("notValues", spec.not_values, true, &mut c);
    c.out
}

fn header_clauses(
    name: &str,
    spec: ConditionSpec,
    field: &str,
    issues: &mut Issues,
) -> Vec<Clause> {
    let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
        issues.add(
            format!("{field}.key"),
            format!("{name:?} is not a valid header name"),
        );
        return Vec::new();
    };
    let mut c = Clauses {
        field,
        issues,
        out: Vec::new(),
    };
    let h = header.clone();
    c.add("values", spec.values, false, Pattern::parse, |p| {
        Check::Header(h, p)
    });
    c.add("notValues", spec.not_values, true, Pattern::parse, |p| {
        Check::Header(header, p)
    });
    c.out
}
