//! `nodemesh routes` and `nodemesh explain`: the routing the proxy would
//! apply, read from the same snapshot and code paths as real requests, so
//! what is printed is what happens.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Value};

use super::forward::{self, Target};
use crate::config::{Config, Protocol, Service};
use crate::proxy::detect::{self, Declared};
use crate::proxy::Proxy;
use crate::routing::{duration, HttpRoute, RequestInfo, RetryPolicy, RouteAction, TrafficPolicy};

/// What `nodemesh explain` asks about.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct ExplainRequest {
    /// `namespace/workload` making the request.
    pub from: String,
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
    if !route.headers.is_empty() {
        parts.push("header edits".into());
    }
    if route.rewrite.is_some() {
        parts.push("rewrite".into());
    }
    parts.join("; ")
}

/// What the proxy would do with one request, without sending anything.
pub fn explain(proxy: &Proxy, config: &Config, ask: &ExplainRequest) -> Result<Value, String> {
    let source = config
        .workload_by_key(&ask.from)
        .ok_or_else(|| format!("no workload {} (expected namespace/name)", ask.from))?;
    let uri: http::Uri = ask
        .url
        .parse()
        .map_err(|e| format!("bad URL {}: {e}", ask.url))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("URL {} has no host", ask.url))?;
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
    let mut headers = HeaderMap::new();
    for (name, value) in &ask.headers {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|e| format!("header {name}: {e}"))?;
        let value =
            HeaderValue::from_str(value.trim()).map_err(|e| format!("header {name}: {e}"))?;
        headers.append(name, value);
    }
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
    if protocol == "tcp (opaque)" {
        out["summary"] = json!("the port is declared opaque: the connection is relayed to one endpoint, no routes apply");
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
                        service: key.clone(),
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
            out["route"] = json!(route.name);
            out["matchedBy"] =
                json!(matched.map_or("any request".to_owned(), |i| route.matches[i].to_string()));
            out["policy"] = json!(policy_summary(route));
            let destinations = match &route.action {
                RouteAction::Forward(ds) => ds
                    .iter()
                    .map(|d| (d.destination.clone(), d.weight))
                    .collect(),
                other => {
                    out["summary"] = json!(action_summary(config, other));
                    return Ok(out);
                }
            };
            (Some(route), destinations)
        }
    };
    let total: u32 = destinations.iter().map(|(_, w)| *w).sum::<u32>().max(1);
    let ejected = proxy.clusters.ejections();
    let picks: Vec<Value> = destinations
        .iter()
        .map(|(dest, weight)| {
            let target = forward::resolve(config, dest, port, true);
            json!({
                "service": dest.service,
                "subset": dest.subset,
                "chance": format!("{}%", (*weight as f64 * 100.0 / total as f64).round()),
                "endpoints": target.as_ref().map(|t| endpoints(config, t, &ejected)).unwrap_or_default(),
                "trafficPolicy": target.as_ref().map(|t| traffic_policy(&t.policy)),
            })
        })
        .collect();
    out["destinations"] = json!(picks);
    if let Some(route) = route {
        out["summary"] = json!(format!(
            "route {} → {}",
            route.name,
            action_summary(config, &route.action)
        ));
    } else {
        out["summary"] = json!(format!("default route → {key}"));
    }
    Ok(out)
}

fn endpoints(
    config: &Config,
    target: &Target,
    ejected: &[(super::balance::ClusterKey, Vec<SocketAddr>)],
) -> Vec<String> {
    let out_now: Vec<SocketAddr> = ejected
        .iter()
        .filter(|(k, _)| *k == target.key)
        .flat_map(|(_, a)| a.iter().copied())
        .collect();
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
