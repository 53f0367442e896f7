//! How the CLI prints the agent's answers: aligned tables for people, the raw
//! JSON (`-o json`) for scripts.

use serde_json::Value;

use crate::admin::Query;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn print(query: &Query, answer: &Value, output: Output) {
    if let Output::Json = output {
        println!(
            "{}",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        );
        return;
    }
    let rows = |v: &Value| v.as_array().cloned().unwrap_or_default();
    match query {
        Query::Status => print_status(answer),
        Query::Routes => print_routes(answer),
        Query::Gateways => {
            table(
                &[
                    "GATEWAY",
                    "SERVER",
                    "ADDRESSES",
                    "PORT",
                    "PROTOCOL",
                    "TLS",
                    "HOSTS",
                    "ROUTES",
                    "STATE",
                ],
                rows(&answer["servers"]).iter().map(|s| {
                    let routes = rows(&s["routes"])
                        .iter()
                        .map(|r| format!("{} -> {}", text(&r["host"]), text(&r["virtualService"])))
                        .collect::<Vec<_>>()
                        .join(", ");
                    vec![
                        text(&s["gateway"]),
                        text(&s["server"]),
                        list(&s["addresses"]),
                        s["port"].to_string(),
                        text(&s["protocol"]),
                        gateway_tls(&s["tls"]),
                        list(&s["hosts"]),
                        routes,
                        text(&s["state"]),
                    ]
                }),
            );
            println!("identity: {}", text(&answer["identity"]));
        }
        Query::Explain(_) => print_explain(answer),
        Query::Policies(_) => print_policies(answer),
        // `nodemesh stat`, `top` and `graph` render these (`crate::viz`).
        Query::Stats(_) => print(query, answer, Output::Json),
        Query::Workloads => table(
            &["NAMESPACE", "NAME", "NODE", "ADDRESSES", "STATE"],
            rows(answer).iter().map(|w| {
                vec![
                    text(&w["namespace"]),
                    text(&w["name"]),
                    text(&w["node"]),
                    list(&w["addresses"]),
                    text(&w["state"]),
                ]
            }),
        ),
        Query::Services => table(
            &["NAMESPACE", "NAME", "CLUSTER-IP", "PORTS", "ENDPOINTS"],
            rows(answer).iter().map(|s| {
                let ports = rows(&s["ports"])
                    .iter()
                    .map(|p| {
                        format!(
                            "{}->{}/{}",
                            p["port"],
                            p["targetPort"],
                            text(&p["protocol"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                let endpoints = rows(&s["endpoints"])
                    .iter()
                    .map(|e| text(&e["workload"]))
                    .collect::<Vec<_>>()
                    .join(",");
                let ip = if s["cluster_ip"].is_null() {
                    "None".to_owned()
                } else {
                    text(&s["cluster_ip"])
                };
                vec![
                    text(&s["namespace"]),
                    text(&s["name"]),
                    ip,
                    ports,
                    endpoints,
                ]
            }),
        ),
        Query::Certs => table(
            &[
                "IDENTITY",
                "SERIAL",
                "NOT-BEFORE",
                "NOT-AFTER",
                "ISSUER",
                "STATE",
            ],
            rows(answer).iter().map(|c| {
                let state = match c["reason"].as_str() {
                    Some(reason) => format!("{} ({reason})", text(&c["state"])),
                    None => text(&c["state"]),
                };
                vec![
                    text(&c["identity"]),
                    text(&c["serial"]),
                    text(&c["not_before"]),
                    text(&c["not_after"]),
                    text(&c["issuer"]),
                    state,
                ]
            }),
        ),
        Query::Connections => table(
            &[
                "DIRECTION",
                "PROTOCOL",
                "TRANSPORT",
                "SOURCE",
                "SOURCE-IDENTITY",
                "ORIGINAL-DESTINATION",
                "SERVICE",
                "DESTINATION",
                "DESTINATION-IDENTITY",
                "UPSTREAM",
                "SENT",
                "RECEIVED",
                "OUTCOME",
            ],
            rows(answer).iter().map(|c| {
                let source = match c["source_workload"].as_str() {
                    Some(w) => format!("{w} ({})", text(&c["source"])),
                    None => text(&c["source"]),
                };
                vec![
                    text(&c["direction"]),
                    text(&c["protocol"]),
                    text(&c["transport"]),
                    source,
                    text(&c["source_identity"]),
                    text(&c["original_destination"]),
                    text(&c["service"]),
                    text(&c["destination_workload"]),
                    text(&c["destination_identity"]),
                    text(&c["upstream"]),
                    text(&c["bytes_sent"]),
                    text(&c["bytes_received"]),
                    text(&c["outcome"]),
                ]
            }),
        ),
    }
}

/// Last sync, failing watches and skipped objects of the Kubernetes source.
fn print_kubernetes_source(source: &Value) {
    println!(
        "last sync:   {} ({} watch error(s) since start)",
        source["last_sync"].as_str().unwrap_or("never"),
        source["watch_errors"]
    );
    for (kind, watch) in source["watches"].as_object().into_iter().flatten() {
        if watch["healthy"] != true {
            let error = watch["last_error"].as_str().unwrap_or("not listed yet");
            println!("             watch of {kind} failing: {error}");
        }
    }
    for invalid in source["invalid_objects"].as_array().into_iter().flatten() {
        println!("skipped:     {}", text(invalid));
    }
}

fn print_status(s: &Value) {
    let c = &s["config"];
    let o = &s["owner"];
    let owner = format!(
        "pid {} (nodemesh {}) since {}",
        o["pid"],
        text(&o["version"]),
        o["since_unix_ms"]
            .as_u64()
            .map_or("?".into(), |ms| crate::identity::x509::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
            ))
    );
    if s["role"] == "standby" {
        println!(
            "node:        {} (standby agent {} pid {})",
            text(&s["node"]),
            text(&s["version"]),
            s["pid"]
        );
        if o.is_null() {
            println!("owner:       another agent (not answering on its hand-over socket)");
        } else {
            println!(
                "owner:       {owner}, admin socket {}",
                text(&o["admin_socket"])
            );
        }
        return;
    }
    println!(
        "node:        {} (agent {} pid {}, up {}s)",
        text(&s["node"]),
        text(&s["version"]),
        s["pid"],
        s["uptime_seconds"]
    );
    println!("owner:       {owner}");
    let loading = if s["ready"] == false {
        " (starting: first load running)"
    } else if c["loading"] == true {
        " (a newer load is running)"
    } else {
        ""
    };
    let source = &c["source"];
    let from = match source["kind"].as_str() {
        Some("kubernetes") => format!("Kubernetes API server {}", text(&source["api_server"])),
        _ => text(&source["dir"]),
    };
    println!(
        "config:      {from} generation {}: {} namespace(s), {} workload(s), {} service(s){loading}",
        c["generation"],
        c["namespaces"],
        c["workloads"],
        c["services"]
    );
    match c["last_error"].as_str() {
        Some(e) => println!("last error:  {}", e.replace('\n', "\n             ")),
        None => println!("last error:  none"),
    }
    if source["kind"] == "kubernetes" {
        print_kubernetes_source(source);
    }
    let w = &s["workloads"];
    println!(
        "workloads:   {} enrolled of {} on this node",
        w["enrolled"], w["on_node"]
    );
    if let Some(failures) = w["failures"].as_object() {
        for (key, e) in failures {
            println!("             {key}: {}", text(e));
        }
    }
    let conns = &s["connections"];
    for dir in ["outbound", "inbound"] {
        let d = &conns[dir];
        println!(
            "{:<12} {} open, {} total, {} failed, {} rejected at the per-workload limit",
            format!("{dir}:"),
            d["open"],
            d["total"],
            d["failed"],
            d["rejected"]
        );
    }
    let hbone = &conns["hbone"];
    println!(
        "HBONE:       {} connection(s) to other nodes open, {} opened since start",
        hbone["open"], hbone["opened"]
    );
    print_identity(&s["identity"]);
    print_limits(&s["limits"]);
    let e = &s["ebpf"];
    println!("eBPF pins:   {}", text(&e["pin_dir"]));
    println!("programs:");
    for p in e["programs"].as_array().into_iter().flatten() {
        println!("  {:<14} {}", text(&p["name"]), text(&p["attach"]));
    }
    println!("maps:");
    for m in e["maps"].as_array().into_iter().flatten() {
        println!("  {:<14} {} entries", text(&m["name"]), m["entries"]);
    }
}

/// The CA connection and the next certificate renewal.
fn print_identity(i: &Value) {
    let Some(address) = i["address"].as_str() else {
        println!("mesh CA:     none (no --ca-address): workloads have no identity");
        return;
    };
    let contact = match i["last_error"].as_str() {
        Some(e) => format!("last error: {e}"),
        None if i["connected"] == true => "connected".to_owned(),
        None => "not contacted yet".to_owned(),
    };
    println!("mesh CA:     {address} ({contact})");
    println!(
        "identities:  {} in trust domain {}, next renewal {}; node {} (credential valid until {})",
        i["identities"],
        text(&i["trust_domain"]),
        text(&i["next_renewal"]),
        text(&i["node_identity"]),
        text(&i["node_credential_expires"])
    );
}

/// The descriptor budget and each workload's use of it.
fn print_limits(limits: &Value) {
    let d = &limits["descriptors"];
    println!(
        "descriptors: limit {} (hard {}): {} kept for the agent, {} per workload for its \
         listeners, {} for connections; {} in use",
        d["nofile"]["soft"],
        d["nofile"]["hard"],
        d["reserved_for_agent"],
        d["reserved_per_workload"],
        d["connection_descriptors"],
        d["descriptors_in_use"]
    );
    println!(
        "per workload: {} connections at most ({}, {} workload(s) enrolled); inbound, one \
         caller at most half of what is free",
        d["max_connections_per_workload"],
        text(&d["max_connections_from"]),
        d["workloads"]
    );
    for (key, u) in limits["per_workload"].as_object().into_iter().flatten() {
        println!(
            "  {key}: {} descriptors, {} inbound caller(s), rejected {} outbound / {} inbound, \
             {} HTTP requests in flight",
            u["descriptors"],
            u["inbound_callers"],
            u["rejected_outbound"],
            u["rejected_inbound"],
            u["http_requests_in_flight"]
        );
    }
}

pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

pub(crate) fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A Gateway server's TLS: `SIMPLE (expires 2027-01-01T00:00:00Z)`,
/// `httpsRedirect`, or `-`.
fn gateway_tls(tls: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(mode) = tls["mode"].as_str() {
        parts.push(mode.to_owned());
    }
    if let Some(expiry) = tls["certificateExpiry"].as_str() {
        parts.push(format!("(expires {expiry})"));
    }
    if tls["httpsRedirect"] == true {
        parts.push("httpsRedirect".to_owned());
    }
    if parts.is_empty() {
        return "-".to_owned();
    }
    parts.join(" ")
}

fn print_routes(answer: &Value) {
    let services = answer["services"].as_array().cloned().unwrap_or_default();
    let rows = services.iter().flat_map(|s| {
        let routes = s["routes"].as_array().cloned().unwrap_or_default();
        routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let service = if i == 0 {
                    text(&s["service"])
                } else {
                    String::new()
                };
                vec![
                    service,
                    text(&r["name"]),
                    text(&r["match"]),
                    text(&r["action"]),
                    text(&r["policy"]),
                ]
            })
            .collect::<Vec<_>>()
    });
    table(
        &["SERVICE", "ROUTE", "MATCH", "DESTINATIONS", "POLICY"],
        rows,
    );
    if let Some(ejected) = answer["ejected"].as_object().filter(|e| !e.is_empty()) {
        println!("\nEjected endpoints (outlier detection):");
        for (cluster, addrs) in ejected {
            println!("  {cluster}: {}", list(addrs));
        }
    }
    for warning in answer["warnings"].as_array().into_iter().flatten() {
        println!("warning: {}", text(warning));
    }
}

/// The upstream TLS towards a destination and the mTLS mode at its
/// endpoints, under `indent`.
fn print_security(destination: &Value, indent: &str) {
    if !destination["upstreamTls"].is_null() {
        println!(
            "{indent}{:<10} {}",
            "tls",
            text(&destination["upstreamTls"])
        );
    }
    for mode in destination["mtls"].as_array().into_iter().flatten() {
        println!("{indent}{:<10} {}", "mtls", text(mode));
    }
    for decision in destination["authorization"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!("{indent}{:<10} {}", "authz", text(decision));
    }
}

fn print_policies(answer: &Value) {
    for workload in answer["workloads"].as_array().into_iter().flatten() {
        let http = match workload["inspectsHttp"].as_bool() {
            Some(true) => " (HTTP requests judged one by one)",
            _ => "",
        };
        println!("{}{http}", text(&workload["workload"]));
        let policies = workload["policies"].as_array().cloned().unwrap_or_default();
        if policies.is_empty() {
            println!("  no AuthorizationPolicy: every caller is allowed");
        }
        for policy in policies {
            println!(
                "  {:<6} {} ({})",
                text(&policy["action"]),
                text(&policy["name"]),
                text(&policy["scope"])
            );
            let rules = policy["rules"].as_array().cloned().unwrap_or_default();
            if rules.is_empty() {
                println!("         no rules: matches nothing");
            }
            for (i, rule) in rules.iter().enumerate() {
                println!("         rule {i}: {}", text(rule));
            }
        }
    }
    let denials = &answer["denials"];
    println!("\ndenied since start: {}", denials["total"]);
    if let Some(by_policy) = denials["by_policy"].as_object() {
        for (policy, count) in by_policy {
            println!("  {count:>8}  {policy}");
        }
    }
    for warning in answer["warnings"].as_array().into_iter().flatten() {
        println!("warning: {}", text(warning));
    }
}

fn print_explain(answer: &Value) {
    for key in [
        "summary",
        "gateway",
        "server",
        "port",
        "protocol",
        "hosts",
        "tls",
        "identity",
        "service",
        "host",
        "origin",
        "route",
        "matchedBy",
        "policy",
        "retries",
    ] {
        let value = &answer[key];
        let shown = match key {
            "hosts" => list(value),
            "port" if !value.is_null() => value.to_string(),
            "tls" if !value.is_null() => explain_tls(value),
            _ => text(value),
        };
        if !value.is_null() {
            println!("{key:<10} {shown}");
        }
    }
    print_security(answer, "");
    for d in answer["destinations"].as_array().into_iter().flatten() {
        let subset = d["subset"]
            .as_str()
            .map(|s| format!(" subset {s}"))
            .unwrap_or_default();
        println!(
            "\n→ {}{subset} ({})",
            text(&d["service"]),
            text(&d["chance"])
        );
        if !d["trafficPolicy"].is_null() {
            println!("  policy    {}", text(&d["trafficPolicy"]));
        }
        print_security(d, "  ");
        for e in d["endpoints"].as_array().into_iter().flatten() {
            println!("  endpoint  {}", text(e));
        }
    }
}

/// `SIMPLE, SNI a.example.com, certificate Secret default/a-cred (expires …)`.
fn explain_tls(tls: &Value) -> String {
    let mut parts = vec![text(&tls["mode"]), format!("SNI {}", text(&tls["sni"]))];
    if !tls["certificate"].is_null() {
        parts.push(format!("certificate {}", text(&tls["certificate"])));
    }
    if !tls["certificateExpiry"].is_null() {
        parts.push(format!("expires {}", text(&tls["certificateExpiry"])));
    }
    parts.join(", ")
}
