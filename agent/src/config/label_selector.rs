//! Kubernetes' `LabelSelector` (`matchLabels` and `matchExpressions`), with
//! the API server's validation, so that a selector the API server would
//! refuse is refused here too, naming the field.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Issues;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct LabelSelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<RequirementSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequirementSpec {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

/// Every label and every requirement must hold; an empty selector selects
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    labels: BTreeMap<String, String>,
    requirements: Vec<(String, Operator)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operator {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// Checks `spec` (at `field`), recording each problem in `issues`; the
    /// requirements in error are left out.
    pub fn compile(spec: LabelSelectorSpec, field: &str, issues: &mut Issues) -> LabelSelector {
        super::check_labels(&spec.match_labels, &format!("{field}.matchLabels"), issues);
        let mut requirements = Vec::new();
        for (i, r) in spec.match_expressions.into_iter().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            if r.key.is_empty() {
                issues.add(format!("{at}.key"), "must not be empty");
            }
            let with_values = matches!(r.operator.as_str(), "In" | "NotIn");
            match (with_values, r.values.is_empty()) {
                (true, true) => issues.add(
                    format!("{at}.values"),
                    format!("must be non-empty when operator is {}", r.operator),
                ),
                (false, false) if matches!(r.operator.as_str(), "Exists" | "DoesNotExist") => {
                    issues.add(
                        format!("{at}.values"),
                        format!("may not be specified when operator is {}", r.operator),
                    )
                }
                _ => {}
            }
            let operator = match r.operator.as_str() {
                "In" => Operator::In(r.values),
                "NotIn" => Operator::NotIn(r.values),
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    issues.add(
                        format!("{at}.operator"),
                        format!("must be In, NotIn, Exists or DoesNotExist, not {other:?}"),
                    );
                    continue;
                }
            };
            requirements.push((r.key, operator));
        }
        LabelSelector {
            labels: spec.match_labels,
            requirements,
        }
    }

    pub fn matches(&self, labels: &crate::config::Labels) -> bool {
        labels.contains_all(self.labels.iter().map(|(k, v)| (&**k, &**v)))
            && self.requirements.iter().all(|(key, operator)| {
                let value = labels.get(key);
                match operator {
                    Operator::In(values) => value.is_some_and(|v| values.iter().any(|x| x == v)),
                    // A missing label is not in any set, as in Kubernetes.
                    Operator::NotIn(values) => value.is_none_or(|v| !values.iter().any(|x| x == v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn compile(spec: serde_json::Value) -> Result<LabelSelector, Vec<(String, String)>> {
        let spec: LabelSelectorSpec = serde_json::from_value(spec).unwrap();
        let mut issues = Issues::default();
        let selector = LabelSelector::compile(spec, "selector", &mut issues);
        match issues.is_empty() {
            true => Ok(selector),
            false => Err(issues.iter().cloned().collect()),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> crate::config::Labels {
        pairs.iter().copied().collect()
    }

    #[test]
    fn expressions_match_as_in_kubernetes() {
        let selector = compile(json!({
            "matchLabels": {"team": "web"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "staging"]},
                {"key": "tier", "operator": "NotIn", "values": ["internal"]},
                {"key": "exposed", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }))
        .unwrap();
        let base = [("team", "web"), ("env", "prod"), ("exposed", "")];
        assert!(selector.matches(&labels(&base)));
        // NotIn holds for a missing label and another value.
        assert!(selector.matches(&labels(&[&base[..], &[("tier", "public")]].concat())));
        for (k, v) in [("tier", "internal"), ("legacy", "yes")] {
            assert!(
                !selector.matches(&labels(&[&base[..], &[(k, v)]].concat())),
                "{k}"
            );
        }
        assert!(!selector.matches(&labels(&[("team", "web"), ("env", "dev"), ("exposed", "")])));
        assert!(!selector.matches(&labels(&[("team", "web"), ("exposed", "")])));
        assert!(!selector.matches(&labels(&[("team", "web"), ("env", "prod")])));
        assert!(!selector.matches(&labels(&[("env", "prod"), ("exposed", "")])));
        assert!(compile(json!({})).unwrap().matches(&Default::default()));
    }

    #[test]
    fn values_are_required_or_forbidden_by_operator() {
        let errors = compile(json!({"matchExpressions": [
            {"key": "a", "operator": "In"},
            {"key": "b", "operator": "NotIn", "values": []},
            {"key": "c", "operator": "Exists", "values": ["x"]},
            {"key": "d", "operator": "DoesNotExist", "values": ["x"]},
            {"key": "e", "operator": "Gt", "values": ["1"]},
            {"key": "", "operator": "Exists"},
        ]}))
        .unwrap_err();
        let fields: Vec<_> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "selector.matchExpressions[0].values",
                "selector.matchExpressions[1].values",
                "selector.matchExpressions[2].values",
                "selector.matchExpressions[3].values",
                "selector.matchExpressions[4].operator",
                "selector.matchExpressions[5].key",
            ]
        );
        assert!(errors[0]
            .1
            .contains("must be non-empty when operator is In"));
        assert!(errors[2]
            .1
            .contains("may not be specified when operator is Exists"));
    }
}
