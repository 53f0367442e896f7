//! `nodemesh stat`: per workload or per Service, like `linkerd viz stat`.
//!
//! The inbound view (what destinations served, `reporter="destination"`)
//! by default; `--from W` is the outbound view of W's calls (reported by
//! W's agent, so faults injected at the caller count), by destination;
//! `--to W` is who called W, by caller.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Edge, Edges, Figures, Summary, FIGURE_HEADERS};
use crate::cli::{table, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resource {
    Workload,
    Service,
}

/// Which edges to show, grouped how.
pub struct Filter {
    pub resource: Resource,
    pub namespace: Option<String>,
    /// A calling workload (`name` or `namespace/name`).
    pub from: Option<String>,
    /// A called workload.
    pub to: Option<String>,
}

#[derive(Serialize)]
struct Row {
    namespace: String,
    name: String,
    #[serde(flatten)]
    figures: Figures,
}

#[derive(Serialize)]
struct Answer {
    window_seconds: f64,
    rows: Vec<Row>,
}

/// Whether `name` (`name` or `namespace/name`) names this workload.
pub fn names(wanted: &str, namespace: &str, workload: &str) -> bool {
    match wanted.split_once('/') {
        Some((ns, name)) => ns == namespace && name == workload,
        None => wanted == workload,
    }
}

impl Filter {
    /// The row an edge counts in, if it does.
    fn row_of(&self, e: &Edge) -> Option<(String, String)> {
        let destination = || match self.resource {
            Resource::Workload => (
                e.destination_namespace.clone(),
                e.destination_workload.clone(),
            ),
            Resource::Service => (e.service_namespace.clone(), e.service.clone()),
        };
        let key = match (&self.from, &self.to) {
            (Some(from), _) => {
                if !e.by_source() || !names(from, &e.source_namespace, &e.source_workload) {
                    return None;
                }
                destination()
            }
            (None, Some(to)) => {
                if e.by_source() || !names(to, &e.destination_namespace, &e.destination_workload) {
                    return None;
                }
                (e.source_namespace.clone(), e.source_workload.clone())
            }
            (None, None) => {
                if e.by_source() {
                    return None;
                }
                destination()
            }
        };
        match &self.namespace {
            Some(ns) if ns != &key.0 => None,
            _ => Some(key),
        }
    }
}

/// Prints the stat table (or JSON) of `edges`.
pub fn print(edges: &Edges, filter: &Filter, output: Output) {
    let mut rows: BTreeMap<(String, String), Summary> = BTreeMap::new();
    for e in &edges.edges {
        if let Some(key) = filter.row_of(e) {
            rows.entry(key).or_default().add(e);
        }
    }
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|((namespace, name), s)| Row {
            namespace,
            name,
            figures: s.figures(&edges.bounds),
        })
        .collect();
    if let Output::Json = output {
        let answer = Answer {
            window_seconds: edges.seconds,
            rows,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
        return;
    }
    let headers: Vec<&str> = ["NAMESPACE", "NAME"]
        .into_iter()
        .chain(FIGURE_HEADERS)
        .collect();
    table(
        &headers,
        rows.iter().map(|r| {
            let mut cells = vec![r.namespace.clone(), r.name.clone()];
            cells.extend(r.figures.cells());
            cells
        }),
    );
}
