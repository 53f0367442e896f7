//! VirtualService `tls:` and `tcp:` routes at a Gateway's TLS and TCP
//! servers: read from the spec, bound per server, and chosen per
//! connection (by SNI for `tls:`). The first matching rule wins, as in
//! Istio. A TLS server that terminates TLS relays the decrypted bytes by
//! `tcp:` rules, then `tls:` ones (Istio's order for such servers); a
//! PASSTHROUGH one by `tls:` rules only. On the mesh they stay accepted and
//! not enforced.

use serde::{Deserialize, Serialize};

use crate::config::{port_number, Issues, Origin};

use super::compile::{RouteDraft, Scope, VirtualServiceDraft, Warnings};
use super::ingress::{host_matches, IngressTable, Selected, Server, ServerProtocol, ServerRef};
use super::istio::{weighted, RouteDestinationSpec};
use super::{HttpRoute, RouteAction, WeightedDestination};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct L4RouteSpec {
    #[serde(rename = "match")]
    matches: Option<Vec<L4MatchSpec>>,
    route: Option<Vec<L4DestinationSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct L4MatchSpec {
    sni_hosts: Option<Vec<String>>,
    destination_subnets: Option<Vec<String>>,
    port: Option<i64>,
    source_subnet: Option<String>,
    source_labels: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    gateways: Vec<String>,
    source_namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct L4DestinationSpec {
    destination: super::istio::DestinationSpec,
    weight: Option<i64>,
}

/// Which list of a VirtualService a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum L4Kind {
    #[serde(rename = "tls")]
    Tls,
    #[serde(rename = "tcp")]
    Tcp,
}

impl L4Kind {
    /// Whether its rules bind to `server`.
    fn serves(self, server: &Server) -> bool {
        match (self, server.protocol) {
            (L4Kind::Tls, ServerProtocol::Tls) | (L4Kind::Tcp, ServerProtocol::Tcp) => true,
            (L4Kind::Tcp, ServerProtocol::Tls) => server.terminates_tls(),
            _ => false,
        }
    }
}

/// One `match` of a rule; every condition present must hold.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    /// Lowercase; empty: any SNI (tcp rules).
    pub sni_hosts: Vec<String>,
    pub port: Option<u16>,
}

/// A rule checked on its own; destinations resolve with the http ones.
pub(super) struct L4RouteDraft {
    pub kind: L4Kind,
    pub matches: Vec<L4Match>,
    /// Per match, as for http rules (empty: the object's list).
    pub match_gateways: Vec<Vec<String>>,
    /// `spec.tls[i]` or `spec.tcp[i]` as its name, forwarding only.
    pub route: RouteDraft,
}

/// A rule bound to one server.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Route {
    /// `VirtualService namespace/name (file)`.
    pub origin: String,
    /// The matches kept at this server; empty: every connection.
    pub matches: Vec<L4Match>,
    /// `spec.tls[i]` as its name; its action forwards.
    pub route: HttpRoute,
}

impl L4Route {
    pub fn field(&self) -> &str {
        &self.route.name
    }

    pub fn destinations(&self) -> &[WeightedDestination] {
        match &self.route.action {
            RouteAction::Forward(destinations) => destinations,
            _ => &[],
        }
    }

    fn admits(&self, sni: Option<&str>) -> bool {
        self.matches.is_empty()
            || self.matches.iter().any(|m| {
                m.sni_hosts.is_empty()
                    || sni.is_some_and(|sni| m.sni_hosts.iter().any(|h| host_matches(h, sni)))
            })
    }
}

impl Server {
    /// The first rule bound here that a connection with `sni` matches.
    pub fn l4_route(&self, sni: Option<&str>) -> Option<&L4Route> {
        let sni = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        self.l4_routes.iter().find(|r| r.admits(sni.as_deref()))
    }
}

impl IngressTable {
    /// The server and rule of a connection to `port`: over TLS the server
    /// its SNI chose (`only`), else the port's first TCP server.
    pub fn select_l4<'a>(
        &'a self,
        labels: &'a crate::config::Labels,
        port: u16,
        only: Option<&ServerRef>,
        sni: Option<&str>,
    ) -> Option<Selected<'a, L4Route>> {
        let mut servers = self.servers_on(labels, port);
        let (gateway, server) = servers.find(|(gateway, server)| match only {
            Some(o) => o.gateway == gateway.key && o.server == server.field,
            None => server.protocol == ServerProtocol::Tcp,
        })?;
        Some(Selected {
            gateway,
            server,
            routes: server.l4_route(sni),
        })
    }
}

/// Reads `spec.tls` and `spec.tcp`; `mesh`: the object applies to the mesh,
/// where these rules are not enforced (said once per list).
pub(super) fn drafts(
    tls: Vec<L4RouteSpec>,
    tcp: Vec<L4RouteSpec>,
    mesh: bool,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Vec<L4RouteDraft> {
    let mut out = Vec::new();
    for (kind, list, name) in [(L4Kind::Tls, tls, "tls"), (L4Kind::Tcp, tcp, "tcp")] {
        if mesh && !list.is_empty() {
            warnings.add(
                format!("spec.{name}"),
                "accepted, not enforced on the mesh (served at Gateways only)",
            );
        }
        for (i, spec) in list.into_iter().enumerate() {
            let at = format!("spec.{name}[{i}]");
            out.extend(draft(kind, spec, at, warnings, issues));
        }
    }
    out
}

fn draft(
    kind: L4Kind,
    spec: L4RouteSpec,
    at: String,
    warnings: &mut Warnings,
    issues: &mut Issues,
) -> Option<L4RouteDraft> {
    let specs = spec.matches.unwrap_or_default();
    if kind == L4Kind::Tls && specs.is_empty() {
        issues.add(
            format!("{at}.match"),
            "a tls rule needs a match with sniHosts",
        );
    }
    let mut matches = Vec::new();
    let mut match_gateways = Vec::new();
    for (j, m) in specs.into_iter().enumerate() {
        let field = format!("{at}.match[{j}]");
        let ignored = [
            ("destinationSubnets", m.destination_subnets.is_some()),
            ("sourceSubnet", m.source_subnet.is_some()),
            ("sourceLabels", m.source_labels.is_some()),
            ("sourceNamespace", m.source_namespace.is_some()),
        ];
        for (name, set) in ignored {
            if set {
                warnings.not_enforced(format!("{field}.{name}"));
            }
        }
        let sni_hosts = m.sni_hosts.unwrap_or_default();
        if kind == L4Kind::Tls && sni_hosts.is_empty() {
            issues.add(format!("{field}.sniHosts"), "required for a tls rule");
        }
        for (k, host) in sni_hosts.iter().enumerate() {
            super::compile::check_host(host, format!("{field}.sniHosts[{k}]"), issues);
        }
        let port = m
            .port
            .and_then(|p| port_number(p, format!("{field}.port"), issues));
        matches.push(L4Match {
            sni_hosts: sni_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            port,
        });
        match_gateways.push(m.gateways);
    }
    let Some(route) = spec.route.filter(|r| !r.is_empty()) else {
        issues.add(
            format!("{at}.route"),
            "at least one destination is required",
        );
        return None;
    };
    let route: Vec<_> = route
        .into_iter()
        .map(|r| RouteDestinationSpec::plain(r.destination, r.weight))
        .collect();
    let mut destination_fields = Vec::new();
    let destinations = weighted(route, &at, &mut destination_fields, issues);
    Some(L4RouteDraft {
        kind,
        matches,
        match_gateways,
        route: RouteDraft {
            route: HttpRoute::forward(at, destinations),
            destination_fields,
            redirect_port: None,
            match_gateways: Vec::new(),
        },
    })
}

/// Binds `vs`'s rules that apply at Gateway `gateway` to `server` (a TLS or
/// TCP one), keeping the matches for its port; a tls rule's sniHosts must
/// lie within the server's hosts.
pub(super) fn bind(
    origin: &Origin,
    vs: &VirtualServiceDraft,
    gateway: &str,
    server: &mut Server,
    warnings: &mut Vec<String>,
) {
    let scope = Scope::Gateway(gateway);
    // tcp rules first: a terminating server takes both lists, tcp first.
    let tcp = vs.l4.iter().filter(|d| d.kind == L4Kind::Tcp);
    let tls = vs.l4.iter().filter(|d| d.kind == L4Kind::Tls);
    let bound: Vec<_> = tcp.chain(tls).filter(|d| d.kind.serves(server)).collect();
    for draft in bound {
        let field = &draft.route.route.name;
        let kept: Vec<_> = draft
            .matches
            .iter()
            .zip(&draft.match_gateways)
            .filter(|(m, list)| vs.listed(list, scope) && m.port.is_none_or(|p| p == server.port))
            .map(|(m, _)| m.clone())
            .collect();
        let everywhere = draft.matches.is_empty() && vs.listed(&[], scope);
        if kept.is_empty() && !everywhere {
            continue;
        }
        let mut matches = Vec::new();
        for mut m in kept {
            let (within, outside): (Vec<_>, Vec<_>) = m
                .sni_hosts
                .into_iter()
                .partition(|sni| server.hosts.iter().any(|h| host_matches(&h.dns, sni)));
            for sni in outside {
                warnings.push(format!(
                    "{origin}: {field}: sniHost {sni} is not among the hosts of Gateway \
                     {gateway} {}; not served there",
                    server.field
                ));
            }
            if within.is_empty() && draft.kind == L4Kind::Tls {
                continue;
            }
            m.sni_hosts = within;
            matches.push(m);
        }
        if matches.is_empty() && !everywhere {
            continue;
        }
        server.l4_routes.push(L4Route {
            origin: origin.to_string(),
            matches,
            route: draft.route.route.clone(),
        });
    }
}

/// The Gateway names of `vs`'s tls and tcp matches, with their fields.
pub(super) fn named_gateways(vs: &VirtualServiceDraft) -> impl Iterator<Item = (String, &String)> {
    vs.l4.iter().flat_map(|draft| {
        let rule = &draft.route.route.name;
        draft
            .match_gateways
            .iter()
            .enumerate()
            .flat_map(move |(m, list)| {
                let named = list.iter().enumerate();
                named.map(move |(k, name)| (format!("{rule}.match[{m}].gateways[{k}]"), name))
            })
    })
}
