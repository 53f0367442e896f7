//! `nodemesh routes` and `nodemesh explain`: the routing the proxy would
//! apply, read from the same snapshot and code paths as real requests, so
//! what is printed is what happens.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Value};

use super::forward::{self, Target};
use super::path;
use crate::config::{Config, Protocol, Service, Workload};
use crate::identity::SpiffeId;
use crate::proxy::detect::{self, Declared};
use crate::proxy::inbound::Caller;
use crate::proxy::{hop, Proxy};
use crate::routing::{
    duration, HttpRoute, RequestInfo, RetryPolicy, RouteAction, TrafficPolicy, UpstreamTlsDecision,
};
use crate::security::authorization::{HttpRequest, HttpView};

/// What `nodemesh explain` asks about.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct ExplainRequest {
    /// `namespace/workload` making the request; `None` with `gateway`.
    #[serde(default)]
    pub from: Option<String>,
    /// `[ADDRESS:]PORT` of this node's ingress the request arrives at, from
    /// outside the mesh.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The TLS ClientHello's server name (at a gateway; an `https` URL
    /// sends its host).
    #[serde(default)]
    pub sni: Option<String>,
    pub url: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default = "get")]
    pub method: String,
}

fn get() -> String {
    "GET".into()
}

/// The effective routing table of every Service.
pub fn routes(proxy: &Proxy, config: &Config) -> Value {
    let ejected: BTreeMap<String, Vec<String>> = proxy
        .clusters
        .ejections()
        .into_iter()
        .map(|(key, addrs)| {
            let subset = key
                .subset
                .map(|s| format!(" subset {s}"))
                .unwrap_or_default();
            (
                format!("{}:{}{subset}", key.service, key.port),
                addrs.iter().map(SocketAddr::to_string).collect(),
            )
        })
        .collect();
    let services: Vec<Value> = config
        .services()
        .iter()
        .map(|service| {
            let key = service.key();
            let host = config.routing().host(&key);
            let routes: Vec<Value> = match host {
                Some(host) => host.routes().iter().map(|r| route_summary(config, r)).collect(),
                None => vec![json!({
                    "name": "default",
                    "match": "any request",
                    "action": format!("{key} (all endpoints)"),
                    "policy": RetryPolicy::istio_default().to_string(),
                })],
            };
            json!({
                "service": key,
                "ports": service.ports.iter().map(|p| json!({"port": p.port, "protocol": protocol_of(service, p.port)})).collect::<Vec<_>>(),
                "origin": host.map_or("default: no VirtualService or HTTPRoute", |h| h.origin.as_str()),
                "routes": routes,
                "destinationRule": config.routing().policy(&key),
                "virtualHost": host,
            })
        })
        .collect();
    json!({
        "services": services,
        "ejected": ejected,
        "warnings": config.routing().warnings,
    })
}

fn protocol_of(service: &Service, port: u16) -> &'static str {
    match service.port(port, Protocol::Tcp).map(detect::declared) {
        Some(Declared::Http) => "http",
        Some(Declared::Opaque) => "tcp (opaque)",
        Some(Declared::Unknown) => "detected",
        None => "udp",
    }
}

fn route_summary(config: &Config, route: &HttpRoute) -> Value {
    let matched = if route.matches.is_empty() {
        "any request".to_owned()
    } else {
        let alternatives: Vec<String> = route.matches.iter().map(|m| m.to_string()).collect();
        alternatives.join(" | ")
    };
    json!({
        "name": route.name,
        "match": matched,
        "action": action_summary(config, &route.action),
        "policy": policy_summary(route),
    })
}

fn action_summary(_config: &Config, action: &RouteAction) -> String {
    match action {
        RouteAction::Forward(destinations) => {
            let total: u32 = destinations.iter().map(|d| d.weight).sum::<u32>().max(1);
            destinations
                .iter()
                .map(|d| {
                    let subset = d
                        .destination
                        .subset
                        .as_deref()
                        .map(|s| format!(" subset {s}"))
                        .unwrap_or_default();
                    let port = d
                        .destination
                        .port
                        .map(|p| format!(":{p}"))
                        .unwrap_or_default();
                    format!(
                        "{}{port}{subset} {}%",
                        d.destination.service,
                        (d.weight as f64 * 100.0 / total as f64).round()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        RouteAction::Redirect(r) => format!("redirect {}", r.status),
        RouteAction::DirectResponse { status, .. } => format!("direct response {status}"),
    }
}

fn policy_summary(route: &HttpRoute) -> String {
    let mut parts = Vec::new();
    if let Some(fault) = &route.fault {
        if let Some(d) = &fault.delay {
            parts.push(format!(
                "delay {} for {}%",
                duration::format(d.fixed_delay),
                d.percentage
            ));
        }
        if let Some(a) = &fault.abort {
            let status = match a.status {
                crate::routing::AbortStatus::Http(s) => format!("HTTP {s}"),
                crate::routing::AbortStatus::Grpc(c) => format!("gRPC status {c}"),
            };
            parts.push(format!("abort {status} for {}%", a.percentage));
        }
        parts.push("no retries or timeout (fault injected)".into());
    } else {
        if let Some(t) = route.timeout {
            parts.push(format!("timeout {}", duration::format(t)));
        }
        match &route.retries {
            Some(r) => parts.push(r.to_string()),
            None => parts.push(format!("{} (Istio default)", RetryPolicy::istio_default())),
        }
    }
    for m in &route.mirrors {
        let subset = m
            .destination
            .subset
            .as_deref()
            .map(|s| format!(" subset {s}"))
            .unwrap_or_default();
        parts.push(format!(
            "mirror {}% to {}{subset}",
            m.percentage, m.destination.service
        ));
    }
    if route.headers.as_ref().is_some_and(|h| !h.is_empty()) {
        parts.push("header edits".into());
    }
    if route.rewrite.is_some() {
        parts.push("rewrite".into());
    }
    parts.join("; ")
}

/// What the proxy would do with one request, without sending anything.
pub fn explain(proxy: &Proxy, config: &Config, ask: &ExplainRequest) -> Result<Value, String> {
    let trust_domain = proxy.identities.trust_domain();
    let ejected = proxy.clusters.ejections();
    match &ask.gateway {
        Some(at) => {
            let facts = Facts {
                config,
                trust_domain,
                ejected: &ejected,
            };
            super::inspect_gateway::explain(&facts, &proxy.node, at, ask)
        }
        None => explain_with(config, trust_domain, &ejected, ask),
    }
}

/// What every explanation reads besides the request.
pub(super) struct Facts<'a> {
    pub config: &'a Config,
    pub trust_domain: &'a str,
    pub ejected: &'a [Ejected],
}

/// [`explain`] with the endpoints that outlier detection has ejected now.
fn explain_with(
    config: &Config,
    trust_domain: &str,
    ejected: &[Ejected],
    ask: &ExplainRequest,
) -> Result<Value, String> {
    let from = ask
        .from
        .as_deref()
        .ok_or("say who calls (--from namespace/name) or where the request arrives (--gateway)")?;
    let source = config
        .workload_by_key(from)
        .ok_or_else(|| format!("no workload {from} (expected namespace/name)"))?;
    let (uri, host) = url(ask)?;
    let host = host.as_str();
    let port = uri.port_u16().unwrap_or(80);
    let service = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => config.service_by_cluster_ip(ip),
        Err(_) => config.resolve_service_name(host, &source.namespace),
    };
    let Some(service) = service else {
        return Ok(json!({
            "summary": format!("{host} is not a mesh Service: the connection is relayed as is (L4), no routes apply"),
        }));
    };
    let key = service.key();
    if service.port(port, Protocol::Tcp).is_none() {
        return Ok(
            json!({"summary": format!("Service {key} has no port {port}: the connection would be refused")}),
        );
    }
    let protocol = protocol_of(service, port);
    let headers = headers(ask)?;
    let authority = uri.authority().map_or(host.to_owned(), |a| a.to_string());
    let info = RequestInfo {
        method: &ask.method,
        path: uri.path(),
        query: uri.query(),
        scheme: "http",
        authority: &authority,
        headers: &headers,
        port,
        source_namespace: &source.namespace,
        source_labels: &source.labels,
    };
    let mut out = json!({
        "service": key,
        "protocol": protocol,
    });
    let call = Call {
        identity: SpiffeId::new(trust_domain, &source.namespace, &source.service_account),
        source_ip: source.addresses.first().copied(),
        node: &source.node,
        http: (protocol != "tcp (opaque)").then_some(HttpRequest {
            method: &ask.method,
            path: uri.path(),
            host: &authority,
            headers: &headers,
        }),
    };
    if protocol == "tcp (opaque)" {
        out["summary"] = json!("the port is declared opaque: the connection is relayed to one endpoint, no routes apply");
        let own = crate::routing::Destination {
            service: key.as_str().into(),
            subset: None,
            port: None,
        };
        if let Some(target) = forward::resolve(config, &own, port, true) {
            out["upstreamTls"] = json!(upstream_tls(config, &target).to_string());
            out["mtls"] = json!(mtls_modes(config, &target));
            out["authorization"] = json!(authorization(config, &target, &call));
        }
        return Ok(out);
    }
    let host = config.routing().host(&key);
    let (route, destinations) = match host {
        None => {
            out["origin"] = json!("default: no VirtualService or HTTPRoute binds this Service");
            out["route"] = json!("default");
            out["retries"] = json!(format!("{} (Istio default)", RetryPolicy::istio_default()));
            (
                None,
                vec![(
                    crate::routing::Destination {
                        service: key.as_str().into(),
                        subset: None,
                        port: None,
                    },
                    100,
                )],
            )
        }
        Some(host) => {
            out["origin"] = json!(host.origin);
            let Some((route, matched)) = host.select(&info) else {
                out["summary"] = json!("no route matches: the proxy answers 404");
                return Ok(out);
            };
            let Some(destinations) = route_taken(&mut out, config, route, matched) else {
                return Ok(out);
            };
            (Some(route), destinations)
        }
    };
    let facts = Facts {
        config,
        trust_domain,
        ejected,
    };
    out["destinations"] = json!(destinations_of(&facts, &call, port, &destinations));
    out["summary"] = json!(match route {
        Some(route) => route_summary_line(config, route),
        None => format!("default route → {key}"),
    });
    Ok(out)
}

/// Where a route sends requests, with its weight.
pub(super) type Weighted = (crate::routing::Destination, u32);

/// Records in `out` the route taken and why; its destinations, or `None`
/// when it answers itself (a redirect, a direct response: then `summary`
/// says so).
pub(super) fn route_taken(
    out: &mut Value,
    config: &Config,
    route: &HttpRoute,
    matched: Option<usize>,
) -> Option<Vec<Weighted>> {
    out["route"] = json!(route.name);
    out["matchedBy"] =
        json!(matched.map_or("any request".to_owned(), |i| route.matches[i].to_string()));
    out["policy"] = json!(policy_summary(route));
    match &route.action {
        RouteAction::Forward(ds) => Some(
            ds.iter()
                .map(|d| (d.destination.clone(), d.weight))
                .collect(),
        ),
        other => {
            out["summary"] = json!(action_summary(config, other));
            None
        }
    }
}

/// `route NAME → destinations`.
pub(super) fn route_summary_line(config: &Config, route: &HttpRoute) -> String {
    format!(
        "route {} → {}",
        route.name,
        action_summary(config, &route.action)
    )
}

/// Each destination's chance, endpoints, policies and the security
/// decisions on the way to it, for a request to `port`.
pub(super) fn destinations_of(
    facts: &Facts<'_>,
    call: &Call<'_>,
    port: u16,
    destinations: &[Weighted],
) -> Vec<Value> {
    let config = facts.config;
    let total: u32 = destinations.iter().map(|(_, w)| *w).sum::<u32>().max(1);
    destinations
        .iter()
        .map(|(dest, weight)| {
            let target = forward::resolve(config, dest, port, true);
            json!({
                "service": dest.service,
                "subset": dest.subset,
                "port": dest.port,
                "chance": format!("{}%", (*weight as f64 * 100.0 / total as f64).round()),
                "endpoints": target.as_ref().map(|t| endpoints(config, t, facts.ejected)).unwrap_or_default(),
                "locality": target.as_ref().map(|t| locality(config, call.node, t, facts.ejected)),
                "trafficPolicy": target.as_ref().map(|t| traffic_policy(&t.policy)),
                "upstreamTls": target.as_ref().map(|t| upstream_tls(config, t).to_string()),
                "mtls": target.as_ref().map(|t| mtls_modes(config, t)),
                "authorization": target.as_ref().map(|t| authorization(config, t, call)),
            })
        })
        .collect()
}

/// The request's URL, and its host.
pub(super) fn url(ask: &ExplainRequest) -> Result<(http::Uri, String), String> {
    let uri: http::Uri = ask
        .url
        .parse()
        .map_err(|e| format!("bad URL {}: {e}", ask.url))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("URL {} has no host", ask.url))?
        .to_owned();
    Ok((uri, host))
}

/// The request headers `-H` gave.
pub(super) fn headers(ask: &ExplainRequest) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in &ask.headers {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|e| format!("header {name}: {e}"))?;
        let value =
            HeaderValue::from_str(value.trim()).map_err(|e| format!("header {name}: {e}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Endpoints of a destination that outlier detection has ejected.
pub(super) type Ejected = (super::balance::ClusterKey, Vec<SocketAddr>);

/// The endpoints of `target` ejected now.
fn ejected_from(target: &Target, ejected: &[Ejected]) -> Vec<SocketAddr> {
    ejected
        .iter()
        .filter(|(k, _)| *k == target.key)
        .flat_map(|(_, a)| a.iter().copied())
        .collect()
}

fn endpoints(config: &Config, target: &Target, ejected: &[Ejected]) -> Vec<String> {
    let out_now = ejected_from(target, ejected);
    target
        .endpoints
        .iter()
        .map(|addr| {
            let name = config
                .workload_by_address(addr.ip())
                .map(|w| w.key())
                .unwrap_or_default();
            let state = if out_now.contains(addr) {
                " (ejected)"
            } else {
                ""
            };
            format!("{name} {addr}{state}")
        })
        .collect()
}

/// How the caller's locality groups `target`'s endpoints, and which group
/// requests go to now.
fn locality(config: &Config, node: &str, target: &Target, ejected: &[Ejected]) -> String {
    let groups =
        crate::routing::locality::of_endpoints(config, node, &target.policy, &target.endpoints);
    let out_now = ejected_from(target, ejected);
    crate::routing::locality::describe(groups.as_ref(), &out_now)
}

/// The DestinationRule `tls` setting the proxy applies towards `target`.
fn upstream_tls<'c>(config: &'c Config, target: &Target) -> UpstreamTlsDecision<'c> {
    let key = &target.key;
    config
        .routing()
        .upstream_tls(&key.service, key.subset.as_deref(), key.port)
}

/// The PeerAuthentication mode at each endpoint of `target` (on its target
/// port), one line per distinct decision: `STRICT (PeerAuthentication
/// shop/default) at shop/web-a, shop/web-b`.
fn mtls_modes(config: &Config, target: &Target) -> Vec<String> {
    per_endpoint(config, target, |workload, addr| {
        let decision = config.peer_authentications();
        decision.mtls_mode(workload, addr.port()).to_string()
    })
}

/// `decide` for each endpoint of `target` that is a workload, one line per
/// distinct answer with the workloads that get it.
fn per_endpoint(
    config: &Config,
    target: &Target,
    decide: impl Fn(&Workload, &SocketAddr) -> String,
) -> Vec<String> {
    let mut by_decision = BTreeMap::<String, Vec<String>>::new();
    for addr in &target.endpoints {
        let Some(workload) = config.workload_by_address(addr.ip()) else {
            continue;
        };
        by_decision
            .entry(decide(workload, addr))
            .or_default()
            .push(workload.key());
    }
    by_decision
        .into_iter()
        .map(|(decision, workloads)| format!("{decision} at {}", workloads.join(", ")))
        .collect()
}

/// Who calls, and with what request (none on an opaque port).
pub(super) struct Call<'a> {
    /// The caller's identity when the hop is mutual TLS.
    pub identity: SpiffeId,
    /// The address its connections come from.
    pub source_ip: Option<IpAddr>,
    /// Its node, whose locality ranks endpoints.
    pub node: &'a str,
    pub http: Option<HttpRequest<'a>>,
}

/// The AuthorizationPolicy decision at each endpoint of `target`, one line
/// per distinct decision, as the destination's agent would take it: the
/// caller is known by its identity when the hop is mutual TLS, by its
/// address only in plaintext.
fn authorization(config: &Config, target: &Target, call: &Call<'_>) -> Vec<String> {
    let tls = upstream_tls(config, target).tls;
    let (identity, source_ip) = (&call.identity, call.source_ip);
    let normalized = call.http.as_ref().and_then(|h| path::normalize(h.path));
    per_endpoint(config, target, |workload, addr| {
        let Some(source_ip) = source_ip else {
            return "the caller has no address".to_owned();
        };
        let mutual = hop::is_mutual(config, workload, addr.port(), tls);
        let caller = Caller::new(mutual.then(|| identity.clone()), source_ip);
        let view = match &call.http {
            Some(h) => HttpView::Request(HttpRequest {
                path: normalized.as_deref().unwrap_or(h.path),
                ..h.clone()
            }),
            None => HttpView::Tcp,
        };
        let decision = config.authorizations();
        decision
            .check(workload, &caller.attributes(*addr, view))
            .to_string()
    })
}

fn traffic_policy(policy: &TrafficPolicy) -> String {
    let lb = match &policy.load_balancer {
        None => "peak-EWMA, two random choices (default)".to_owned(),
        Some(lb) => format!("{lb:?}"),
    };
    let mut parts = vec![format!("load balancing {lb}")];
    if let Some(pool) = &policy.connection_pool {
        parts.push(format!(
            "connection pool {}",
            serde_json::to_string(pool).unwrap_or_default()
        ));
    }
    if let Some(od) = &policy.outlier_detection {
        parts.push(format!(
            "outlier detection after {} consecutive 5xx / {} gateway errors, ejected {}+",
            od.consecutive_5xx_errors,
            od.consecutive_gateway_errors,
            duration::format(od.base_ejection_time)
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::LoadOptions;

    /// `web` in `shop`: v1 and v2, HTTP on 80 and opaque TCP on 5432, both
    /// to the workloads' port 8080 and 5432.
    pub(in crate::proxy::l7) const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-db, port: 5432}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-v1, namespace: shop, labels: {app: web, version: v1}}
spec: {netns: /run/netns/web-v1, addresses: [10.0.0.1], node: n1}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-v2, namespace: shop, labels: {app: web, version: v2}}
spec: {netns: /run/netns/web-v2, addresses: [10.0.0.2], node: n2}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {netns: /run/netns/client, addresses: [10.0.0.3], node: n1}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-v2, namespace: shop}
spec:
  selector: {matchLabels: {version: v2}}
  portLevelMtls: {8080: {mode: DISABLE}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {tls: {mode: DISABLE}}
";

    const TO_V2: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web, subset: v2}}]
  - route: [{destination: {host: web, subset: v1}}]
";

    pub(in crate::proxy::l7) fn config(files: &[(&str, &str)]) -> Config {
        let files: Vec<_> = files
            .iter()
            .map(|(name, text)| (PathBuf::from(name), text.to_string()))
            .collect();
        Config::load_documents(&files, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A GET of `url` with `headers`, from `shop/client`.
    pub(in crate::proxy::l7) fn ask(url: &str, headers: &[(&str, &str)]) -> ExplainRequest {
        ExplainRequest {
            from: Some("shop/client".into()),
            gateway: None,
            sni: None,
            url: url.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            method: "GET".into(),
        }
    }

    fn explain(config: &Config, url: &str, headers: &[(&str, &str)]) -> Value {
        explain_with(config, "cluster.local", &[], &ask(url, headers)).unwrap()
    }

    #[test]
    fn explain_shows_upstream_tls_and_the_mtls_mode_of_each_endpoint() {
        let config = config(&[("mesh.yaml", MESH)]);
        let out = explain(&config, "http://web/", &[]);
        let web = &out["destinations"][0];
        assert_eq!(
            web["upstreamTls"], "ISTIO_MUTUAL (DestinationRule shop/web (mesh.yaml))",
            "{out:#}"
        );
        assert_eq!(
            web["mtls"],
            json!([
                "DISABLE (PeerAuthentication shop/web-v2) at shop/web-v2",
                "STRICT (PeerAuthentication shop/default) at shop/web-v1",
            ]),
            "on the workloads' port 8080: {out:#}"
        );

        // The opaque port is relayed at L4: the same questions, no subset,
        // and the workloads' port 5432 where web-v2 inherits STRICT.
        let out = explain(&config, "http://web:5432/", &[]);
        assert_eq!(
            out["upstreamTls"],
            "ISTIO_MUTUAL (DestinationRule shop/web (mesh.yaml))"
        );
        assert_eq!(
            out["mtls"],
            json!(["STRICT (PeerAuthentication shop/default) at shop/web-v1, shop/web-v2"]),
            "{out:#}"
        );
    }

    #[test]
    fn explain_follows_the_subset_a_route_picks() {
        let config = config(&[("mesh.yaml", MESH), ("vs.yaml", TO_V2)]);
        let jason = explain(&config, "http://web/", &[("end-user", "jason")]);
        let v2 = &jason["destinations"][0];
        assert_eq!(v2["subset"], "v2");
        assert_eq!(
            v2["upstreamTls"],
            "DISABLE (DestinationRule shop/web (mesh.yaml))"
        );
        assert_eq!(
            v2["mtls"],
            json!(["DISABLE (PeerAuthentication shop/web-v2) at shop/web-v2"])
        );
        let other = explain(&config, "http://web/", &[]);
        assert_eq!(
            other["destinations"][0]["upstreamTls"],
            "ISTIO_MUTUAL (DestinationRule shop/web (mesh.yaml))"
        );

        let plain = config_without_rules();
        let out = explain(&plain, "http://web/", &[]);
        assert_eq!(
            out["destinations"][0]["upstreamTls"],
            "auto (no DestinationRule sets tls)"
        );
        assert_eq!(
            out["destinations"][0]["mtls"],
            json!(["PERMISSIVE (default: no PeerAuthentication) at shop/web-v1, shop/web-v2"])
        );
    }

    /// `MESH` without its PeerAuthentications and DestinationRule.
    fn config_without_rules() -> Config {
        let mesh: String = MESH
            .split("---")
            .filter(|doc| !doc.contains("PeerAuthentication") && !doc.contains("DestinationRule"))
            .collect::<Vec<_>>()
            .join("---");
        config(&[("mesh.yaml", &mesh)])
    }
}
