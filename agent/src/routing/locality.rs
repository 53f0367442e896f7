//! Locality-aware load balancing, as Istio programs Envoy: DestinationRule
//! `trafficPolicy.loadBalancer.localityLbSetting`.
//!
//! One agent serves one node, so every caller has the node's locality: the
//! endpoints of a destination are grouped once per config snapshot (see
//! [`group`]), and a request only walks the groups.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Issues};

use super::TrafficPolicy;

pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// Where a node (and the endpoints on it) runs; empty parts are unknown,
/// and compare equal to each other, as in Istio.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// From a Node's topology labels.
    pub fn from_labels(labels: &crate::config::Labels) -> Locality {
        let get = |k| labels.get(k).unwrap_or_default().to_owned();
        Locality {
            region: get(REGION_LABEL),
            zone: get(ZONE_LABEL),
            subzone: get(SUBZONE_LABEL),
        }
    }

    /// Istio's `LocalityMatch`: `region/zone/subzone`, where `*` matches
    /// anything and a missing zone or subzone matches any.
    fn matches(&self, rule: &str) -> bool {
        let mut parts = rule.splitn(3, '/');
        let (region, zone, subzone) = (parts.next(), parts.next(), parts.next());
        let part = |rule: Option<&str>, mine: &str, optional: bool| match rule {
            Some("*") => true,
            None | Some("") => optional,
            Some(r) => r == mine,
        };
        part(region, &self.region, false)
            && part(zone, &self.zone, true)
            && part(subzone, &self.subzone, true)
    }

    /// Istio's `LbPriority`: 0 same region, zone and subzone; 1 same region
    /// and zone; 2 same region; 3 elsewhere.
    fn priority(&self, endpoint: &Locality) -> u8 {
        match (
            self.region == endpoint.region,
            self.zone == endpoint.zone,
            self.subzone == endpoint.subzone,
        ) {
            (true, true, true) => 0,
            (true, true, false) => 1,
            (true, false, _) => 2,
            (false, _, _) => 3,
        }
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

/// `localityLbSetting`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LocalityLb {
    /// `enabled: false`: every endpoint alike.
    Disabled,
    /// Priorities by locality (Istio's default). `(from, to)` regions: from
    /// a node in region `from`, other regions than `to` come last.
    Failover(Vec<(String, String)>),
    /// Per `from` locality pattern, weights per `to` locality pattern.
    Distribute(Vec<(String, BTreeMap<String, u32>)>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LocalityLbSpec {
    #[serde(default)]
    distribute: Vec<DistributeSpec>,
    #[serde(default)]
    failover: Vec<FailoverSpec>,
    #[serde(default)]
    failover_priority: Vec<String>,
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DistributeSpec {
    from: Option<String>,
    #[serde(default)]
    to: BTreeMap<String, u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverSpec {
    from: Option<String>,
    to: Option<String>,
}

/// Validates as Istio does (`validateLocalityLbSetting`); `at` names the field.
pub(super) fn locality_lb(spec: LocalityLbSpec, at: &str, issues: &mut Issues) -> LocalityLb {
    if !spec.failover_priority.is_empty() {
        issues.add(
            format!("{at}.failoverPriority"),
            "not supported by nodemesh: use failover (by region) or distribute",
        );
    }
    if !spec.distribute.is_empty() && !spec.failover.is_empty() {
        issues.add(at, "can not simultaneously set 'distribute' and 'failover'");
    }
    for (i, rule) in spec.failover.iter().enumerate() {
        let field = format!("{at}.failover[{i}]");
        match (rule.from.as_deref(), rule.to.as_deref()) {
            (Some(from), Some(to)) if from == to => issues.add(
                field,
                "locality lb failover settings must specify different regions",
            ),
            (Some(from), Some(to)) if from.contains(['/', '*']) || to.contains(['/', '*']) => {
                issues.add(field, "locality lb failover only specifies regions")
            }
            (Some(_), Some(_)) => {}
            _ => issues.add(field, "needs both from and to"),
        }
    }
    for (i, rule) in spec.distribute.iter().enumerate() {
        let field = format!("{at}.distribute[{i}]");
        match &rule.from {
            Some(from) => check_pattern(from, &format!("{field}.from"), issues),
            None => issues.add(format!("{field}.from"), "must be set"),
        }
        for (to, &weight) in &rule.to {
            check_pattern(to, &format!("{field}.to"), issues);
            if !(1..=100).contains(&weight) {
                issues.add(
                    format!("{field}.to[{to}]"),
                    "locality weight must be in range [1, 100]",
                );
            }
        }
        let total: u32 = rule.to.values().sum();
        if total != 100 {
            issues.add(
                format!("{field}.to"),
                format!("total locality weight {total} != 100"),
            );
        }
    }
    if spec.enabled == Some(false) {
        LocalityLb::Disabled
    } else if !spec.distribute.is_empty() {
        LocalityLb::Distribute(
            spec.distribute
                .into_iter()
                .map(|d| (d.from.unwrap_or_default(), d.to))
                .collect(),
        )
    } else {
        LocalityLb::Failover(
            spec.failover
                .into_iter()
                .filter_map(|f| Some((f.from?, f.to?)))
                .collect(),
        )
    }
}

/// Istio's `validateLocality`: a wildcard only as a whole last part.
fn check_pattern(pattern: &str, field: &str, issues: &mut Issues) {
    let parts: Vec<&str> = pattern.split('/').collect();
    let bad_wildcard = parts
        .iter()
        .enumerate()
        .any(|(i, p)| p.contains('*') && (*p != "*" || i + 1 != parts.len()));
    if pattern.is_empty() || parts.len() > 3 || bad_wildcard {
        issues.add(
            field,
            format!("{pattern:?} is not a locality (region/zone/subzone, `*` only as a last part)"),
        );
    }
}

/// Endpoints of one destination in the order and shares the node's
/// locality gives them.
#[derive(Debug, Clone, PartialEq)]
pub enum Groups {
    /// Failover: best priority first; a request goes to the first group
    /// with an endpoint not ejected.
    Priorities(Vec<Vec<SocketAddr>>),
    /// Distribute: a group is chosen by weight among those with an
    /// endpoint not ejected. Endpoints in no `to` locality get nothing.
    Weighted(Vec<(u32, Vec<SocketAddr>)>),
}

/// Groups `endpoints` for a caller at `node`, or `None` when locality does
/// not apply: Istio fails over only with `outlierDetection` set (without
/// it Envoy would never see a locality as unhealthy), and distributes only
/// from a `from` locality matching the node.
pub fn group(
    setting: Option<&LocalityLb>,
    outlier_detection: bool,
    node: &Locality,
    endpoints: &[(SocketAddr, Locality)],
) -> Option<Groups> {
    let default = LocalityLb::Failover(Vec::new());
    match setting.unwrap_or(&default) {
        LocalityLb::Disabled => None,
        LocalityLb::Distribute(rules) => {
            let (_, to) = rules.iter().find(|(from, _)| node.matches(from))?;
            Some(Groups::Weighted(distribute(to, endpoints)))
        }
        LocalityLb::Failover(_) if !outlier_detection => None,
        LocalityLb::Failover(failover) => {
            let mut by_priority = BTreeMap::<u8, Vec<SocketAddr>>::new();
            for (addr, locality) in endpoints {
                let mut priority = node.priority(locality);
                // Istio: a failover rule for the node's region sends other
                // regions than its `to` after it.
                if priority == 3 {
                    if let Some((_, to)) = failover.iter().find(|(from, _)| *from == node.region) {
                        if locality.region != *to {
                            priority = 4;
                        }
                    }
                }
                by_priority.entry(priority).or_default().push(*addr);
            }
            Some(Groups::Priorities(by_priority.into_values().collect()))
        }
    }
}

/// [`group`] for the endpoints of a destination with `policy`, called
/// from `node`; an endpoint's locality is its node's.
pub fn of_endpoints(
    config: &Config,
    node: &str,
    policy: &TrafficPolicy,
    endpoints: &[SocketAddr],
) -> Option<Groups> {
    let applies = match &policy.locality {
        Some(LocalityLb::Disabled) => false,
        Some(LocalityLb::Distribute(_)) => true,
        _ => policy.outlier_detection.is_some(),
    };
    if !applies {
        return None; // no lookups for the common case
    }
    let locality_of = |node: &str| {
        config
            .node(node)
            .map(|n| Locality::from_labels(&n.labels))
            .unwrap_or_default()
    };
    let endpoints: Vec<(SocketAddr, Locality)> = endpoints
        .iter()
        .map(|&addr| {
            let node = config.workload_by_address(addr.ip()).map(|w| &*w.node);
            (addr, node.map(locality_of).unwrap_or_default())
        })
        .collect();
    group(
        policy.locality.as_ref(),
        policy.outlier_detection.is_some(),
        &locality_of(node),
        &endpoints,
    )
}

/// For `nodemesh explain`: the groups, and the one a request goes to with
/// `ejected` out.
pub fn describe(groups: Option<&Groups>, ejected: &[SocketAddr]) -> String {
    let list = |addrs: &[SocketAddr]| {
        let addrs: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        addrs.join(", ")
    };
    let live = |addrs: &[SocketAddr]| addrs.iter().any(|a| !ejected.contains(a));
    match groups {
        None => "none: every endpoint alike (failover needs outlierDetection; \
                 distribute a `from` matching this node)"
            .into(),
        Some(Groups::Priorities(tiers)) => {
            let now = tiers.iter().position(|t| live(t)).unwrap_or(0);
            let tiers: Vec<String> = tiers
                .iter()
                .enumerate()
                .map(|(i, t)| format!("priority {i}: {}", list(t)))
                .collect();
            format!(
                "failover, requests go to priority {now}; {}",
                tiers.join("; ")
            )
        }
        Some(Groups::Weighted(groups)) => {
            let groups: Vec<String> = groups
                .iter()
                .map(|(w, a)| format!("weight {w}: {}", list(a)))
                .collect();
            format!("distribute; {}", groups.join("; "))
        }
    }
}

/// Istio's `applyLocalityWeights`: each `to` pattern (in name order) takes
/// the endpoints' localities it matches and not taken yet, and splits its
/// weight over them, rounding up.
fn distribute(
    to: &BTreeMap<String, u32>,
    endpoints: &[(SocketAddr, Locality)],
) -> Vec<(u32, Vec<SocketAddr>)> {
    let mut localities = BTreeMap::<&Locality, Vec<SocketAddr>>::new();
    for (addr, locality) in endpoints {
        localities.entry(locality).or_default().push(*addr);
    }
    let mut groups = Vec::new();
    for (pattern, &weight) in to {
        let matched: Vec<&Locality> = localities
            .keys()
            .filter(|l| l.matches(pattern))
            .copied()
            .collect();
        let share = weight.div_ceil(matched.len().max(1) as u32);
        for locality in matched {
            if let Some(addrs) = localities.remove(locality) {
                groups.push((share, addrs));
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(region: &str, zone: &str, subzone: &str) -> Locality {
        Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: subzone.into(),
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[test]
    fn patterns_match_as_istio() {
        let l = at("r1", "z1", "s1");
        for yes in ["r1", "r1/*", "r1/z1", "r1/z1/s1", "r1/z1/*", "*"] {
            assert!(l.matches(yes), "{yes}");
        }
        for no in ["r2", "r1/z2", "r1/z1/s2", "r2/*"] {
            assert!(!l.matches(no), "{no}");
        }
    }

    #[test]
    fn failover_tiers_same_zone_then_region_then_failover_region_then_rest() {
        let node = at("r1", "z1", "");
        let endpoints = [
            (addr(1), at("r3", "z9", "")),
            (addr(2), at("r1", "z2", "")),
            (addr(3), at("r2", "z5", "")),
            (addr(4), at("r1", "z1", "")),
            (addr(5), at("r1", "z1", "other")),
        ];
        let setting = LocalityLb::Failover(vec![("r1".into(), "r2".into())]);
        let groups = group(Some(&setting), true, &node, &endpoints);
        let expected = vec![
            vec![addr(4)],
            vec![addr(5)],
            vec![addr(2)],
            vec![addr(3)],
            vec![addr(1)],
        ];
        assert_eq!(groups, Some(Groups::Priorities(expected)));
        // Without a failover rule, the other regions share one tier.
        let groups = group(None, true, &node, &endpoints);
        let Some(Groups::Priorities(tiers)) = groups else {
            panic!("{groups:?}")
        };
        assert_eq!(tiers.last(), Some(&vec![addr(1), addr(3)]));
    }

    #[test]
    fn failover_needs_outlier_detection_and_can_be_disabled() {
        let node = at("r1", "z1", "");
        let endpoints = [(addr(1), at("r1", "z1", "")), (addr(2), at("r2", "z", ""))];
        assert_eq!(group(None, false, &node, &endpoints), None);
        assert_eq!(
            group(Some(&LocalityLb::Disabled), true, &node, &endpoints),
            None
        );
    }

    #[test]
    fn distribute_splits_wildcards_and_drops_unlisted_localities() {
        let node = at("r1", "z1", "");
        let endpoints = [
            (addr(1), at("r1", "z1", "")),
            (addr(2), at("r1", "z2", "")),
            (addr(3), at("r1", "z3", "")),
            (addr(4), at("r2", "z1", "")),
            (addr(5), at("r1", "z1", "")),
        ];
        let to = BTreeMap::from([("r1/z1/*".to_owned(), 75), ("r1/*".to_owned(), 25)]);
        let setting = LocalityLb::Distribute(vec![
            ("r9/*".into(), BTreeMap::from([("r9".to_owned(), 100)])),
            ("r1/z1".into(), to),
        ]);
        let groups = group(Some(&setting), false, &node, &endpoints);
        // `r1/*` comes first by name and takes every r1 zone: 25 over 3.
        let expected = vec![
            (9, vec![addr(1), addr(5)]),
            (9, vec![addr(2)]),
            (9, vec![addr(3)]),
        ];
        assert_eq!(groups, Some(Groups::Weighted(expected)));
        // A node no `from` matches: every endpoint alike.
        assert_eq!(
            group(Some(&setting), false, &at("r5", "", ""), &endpoints),
            None
        );
    }

    #[test]
    fn explain_names_the_priority_requests_go_to() {
        let groups = Groups::Priorities(vec![vec![addr(1)], vec![addr(2)]]);
        assert_eq!(
            describe(Some(&groups), &[addr(1)]),
            "failover, requests go to priority 1; priority 0: 10.0.0.1:80; priority 1: 10.0.0.2:80"
        );
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let spec: LocalityLbSpec = serde_json::from_value(serde_json::json!({
            "failover": [{"from": "r1", "to": "r1"}],
            "distribute": [{"from": "r1/*/z", "to": {"r2": 50}}],
            "failoverPriority": ["topology.kubernetes.io/zone"],
        }))
        .unwrap();
        let mut issues = Issues::default();
        locality_lb(spec, "lb.localityLbSetting", &mut issues);
        let fields: Vec<&str> = issues.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "lb.localityLbSetting.failoverPriority",
                "lb.localityLbSetting",
                "lb.localityLbSetting.failover[0]",
                "lb.localityLbSetting.distribute[0].from",
                "lb.localityLbSetting.distribute[0].to",
            ]
        );
    }
}
