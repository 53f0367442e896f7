//! `nodemesh explain --gateway`: what this node's ingress would do with a
//! request from outside the mesh. Each step asks the data path's own
//! functions: the port's servers, the TLS step's server choice by SNI
//! ([`tls::sni_index`]), the HTTP route choice ([`gateway::select`]) or the
//! relayed connection's rule, then the same destination facts as a
//! workload's `explain`, for the ingress's identity.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::gateway;
use super::inspect::{self, Call, ExplainRequest, Facts, Weighted};
use crate::identity::{self, SpiffeId};
use crate::ingress::tls::{self, TlsMode};
use crate::routing::ingress::{Gateway, Server, ServerRef};
use crate::routing::RequestInfo;
use crate::security::authorization::HttpRequest;

/// Explains `ask` arriving at `at` (`[ADDRESS:]PORT`) of node `node`.
pub(super) fn explain(
    facts: &Facts<'_>,
    node: &str,
    at: &str,
    ask: &ExplainRequest,
) -> Result<Value, String> {
    let config = facts.config;
    let (address, port) = parse_at(at)?;
    let node_name = node;
    let node = config.node(node);
    let addresses = node.map(|n| n.addresses.clone()).unwrap_or_default();
    if let Some(address) = address.filter(|a| !addresses.is_empty() && !addresses.contains(a)) {
        return Ok(json!({
            "summary": format!(
                "this node's ingress does not listen on {address} (it listens on {})",
                join(&addresses)
            ),
        }));
    }
    let no_labels = Default::default();
    let labels = node.map_or(&no_labels, |n| &n.labels);
    let ingress = config.routing().ingress();
    let servers: Vec<_> = ingress.servers_on(labels, port).collect();
    if servers.is_empty() {
        let ports: Vec<String> = ingress.ports(labels).keys().map(u16::to_string).collect();
        return Ok(json!({
            "summary": format!(
                "no Gateway server of this node is on port {port}: the connection is refused \
                 (ports served: {})",
                if ports.is_empty() { "none".to_owned() } else { ports.join(", ") }
            ),
        }));
    }
    let (uri, host) = inspect::url(ask)?;
    let https = uri.scheme_str() == Some("https");
    let request = Request {
        facts,
        ask,
        uri: &uri,
        port,
        node: node_name,
        labels,
        identity: identity::ingress_id(config, facts.trust_domain),
        source_ip: addresses.first().copied(),
    };
    let mut out = json!({
        "port": port,
        "identity": request.identity.to_string(),
    });
    if !https && ask.sni.is_none() {
        // As the listener: a port's TCP server relays what is not TLS.
        if ingress.select_l4(labels, port, None, None).is_some() {
            return Ok(request.relayed(&mut out, None, None));
        }
        return request.http(&mut out, None);
    }
    let sni = ask.sni.as_deref().unwrap_or(&host);
    let Some(chosen) = tls::sni_index(&servers).select(Some(sni)) else {
        let summary = if servers.iter().all(|(_, s)| tls::mode(s).is_none()) {
            format!("no server on port {port} speaks TLS: the handshake fails")
        } else {
            format!("no TLS server on port {port} takes SNI {sni}: the handshake is refused")
        };
        out["summary"] = json!(summary);
        return Ok(out);
    };
    let (gateway, server) = servers[chosen];
    let at = ServerRef {
        gateway: gateway.key.clone(),
        server: server.field.clone(),
    };
    out["tls"] = tls_facts(server, sni, &request.identity);
    // A TLS server relays bytes: passed through, or what it decrypted.
    if server.protocol.is_http() {
        describe_server(&mut out, gateway, server);
        request.http(&mut out, Some(&at))
    } else {
        Ok(request.relayed(&mut out, Some(&at), Some(sni)))
    }
}

/// One request being explained.
struct Request<'a> {
    facts: &'a Facts<'a>,
    ask: &'a ExplainRequest,
    uri: &'a http::Uri,
    /// The gateway port it arrives on.
    port: u16,
    /// This node, and its labels (which Gateways it serves).
    node: &'a str,
    labels: &'a crate::config::Labels,
    /// The ingress, as destinations see it: its identity over mutual TLS,
    /// else the node's address.
    identity: SpiffeId,
    source_ip: Option<IpAddr>,
}

impl Request<'_> {
    /// The ingress calling with `http` (`None`: bytes relayed).
    fn call<'r>(&'r self, http: Option<HttpRequest<'r>>) -> Call<'r> {
        Call {
            identity: self.identity.clone(),
            source_ip: self.source_ip,
            node: self.node,
            http,
        }
    }

    /// An HTTP request, after the TLS step at server `at` if any.
    fn http(&self, out: &mut Value, at: Option<&ServerRef>) -> Result<Value, String> {
        let config = self.facts.config;
        let headers = inspect::headers(self.ask)?;
        let authority = self
            .uri
            .authority()
            .map_or(String::new(), |a| a.to_string());
        let no_labels = Default::default();
        let info = RequestInfo {
            method: &self.ask.method,
            path: self.uri.path(),
            query: self.uri.query(),
            scheme: if at.is_some() { "https" } else { "http" },
            authority: &authority,
            headers: &headers,
            port: self.port,
            source_namespace: "",
            source_labels: &no_labels,
        };
        let (selected, (route, matched)) = match gateway::select(config, self.node, &info, at) {
            Ok(found) => found,
            Err(no_route) => {
                // Which server took it, when one did (the same choice).
                let ingress = config.routing().ingress();
                if let Some(s) = ingress.select_at(self.labels, self.port, at, &authority) {
                    describe_server(out, s.gateway, s.server);
                    if let Some(routes) = s.routes {
                        out["origin"] = json!(routes.routes.origin);
                    }
                }
                out["summary"] = json!(match no_route.redirect {
                    Some(location) =>
                        format!("the ingress answers 301 to {location} (httpsRedirect)"),
                    None => format!("the ingress answers 404: {}", no_route.message),
                });
                return Ok(out.take());
            }
        };
        describe_server(out, selected.gateway, selected.server);
        if let Some(routes) = selected.routes {
            out["host"] = json!(routes.domain);
            out["origin"] = json!(routes.routes.origin);
        }
        let Some(destinations) = inspect::route_taken(out, config, route, matched) else {
            return Ok(out.take());
        };
        let call = self.call(Some(HttpRequest {
            method: &self.ask.method,
            path: self.uri.path(),
            host: &authority,
            headers: &headers,
        }));
        let picks = inspect::destinations_of(self.facts, &call, self.port, &destinations);
        out["destinations"] = json!(picks);
        out["summary"] = json!(inspect::route_summary_line(config, route));
        Ok(out.take())
    }

    /// A connection relayed as bytes: TLS passed through at server `at` by
    /// its `sni`, or the port's TCP server.
    fn relayed(&self, out: &mut Value, at: Option<&ServerRef>, sni: Option<&str>) -> Value {
        let ingress = self.facts.config.routing().ingress();
        let Some(selected) = ingress.select_l4(self.labels, self.port, at, sni) else {
            out["summary"] = json!(format!("no TCP or TLS server on port {}", self.port));
            return out.take();
        };
        describe_server(out, selected.gateway, selected.server);
        let Some(rule) = selected.routes else {
            out["summary"] = json!(format!(
                "no tls or tcp rule at Gateway {} ({}) matches SNI {}: the connection is closed",
                selected.gateway.key,
                selected.server.field,
                sni.unwrap_or("(none)")
            ));
            return out.take();
        };
        out["origin"] = json!(rule.origin);
        out["route"] = json!(rule.field());
        let destinations: Vec<Weighted> = rule
            .destinations()
            .iter()
            .map(|d| (d.destination.clone(), d.weight))
            .collect();
        let picks =
            inspect::destinations_of(self.facts, &self.call(None), self.port, &destinations);
        out["destinations"] = json!(picks);
        out["summary"] = json!(format!(
            "relayed as bytes by {} {} (no HTTP routing)",
            rule.origin,
            rule.field()
        ));
        out.take()
    }
}

/// `PORT` or `ADDRESS:PORT` (`[v6]:PORT`).
fn parse_at(at: &str) -> Result<(Option<IpAddr>, u16), String> {
    let bad = |e: &dyn std::fmt::Display| format!("--gateway {at}: {e} (expected [ADDRESS:]PORT)");
    let (address, port) = match at.rsplit_once(':') {
        Some((address, port)) => {
            let address = address.trim_start_matches('[').trim_end_matches(']');
            (Some(address.parse::<IpAddr>().map_err(|e| bad(&e))?), port)
        }
        None => (None, at),
    };
    Ok((address, port.parse().map_err(|e| bad(&e))?))
}

/// The Gateway and server a connection takes.
fn describe_server(out: &mut Value, gateway: &Gateway, server: &Server) {
    out["gateway"] = json!(gateway.key);
    out["gatewayOrigin"] = json!(gateway.origin);
    out["server"] = json!(match &server.name {
        Some(name) => format!("{} ({name})", server.field),
        None => server.field.clone(),
    });
    out["protocol"] = json!(server.protocol);
    out["hosts"] = json!(server
        .hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>());
}

/// The TLS step's outcome at the server `sni` chose; ISTIO_MUTUAL presents
/// the certificate of `ingress`.
fn tls_facts(server: &Server, sni: &str, ingress: &SpiffeId) -> Value {
    let mode = tls::mode(server);
    let termination = match mode {
        Some(TlsMode::Terminate(t)) => Some(t),
        _ => None,
    };
    json!({
        "sni": sni,
        "mode": mode.map(TlsMode::name),
        "certificate": termination.map(|t| match &t.credential_name {
            Some(name) => format!("Secret {name}"),
            None => format!(
                "the ingress's workload certificate, {ingress} (ISTIO_MUTUAL)"
            ),
        }),
        "certificateExpiry": mode.and_then(TlsMode::expiry),
    })
}

fn join(addresses: &[IpAddr]) -> String {
    let all: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
    all.join(", ")
}

#[cfg(test)]
#[path = "inspect_gateway_tests.rs"]
mod tests;
