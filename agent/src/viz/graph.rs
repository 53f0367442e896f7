//! `nodemesh graph`: who calls whom, workload → workload (or → Service
//! when no destination workload is known, e.g. an aborted call), with
//! rate, error rate and p99 per edge, as a table, Graphviz DOT or SVG.
//!
//! A call reported by both agents is taken from the caller's report (it
//! includes failures injected at the caller); calls from outside the
//! agents asked are taken from the destination's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::{millis, percent, qualified, rate, Edges, Figures, Summary};
use crate::cli::table;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Dot,
    Svg,
}

/// One caller → callee edge.
#[derive(Debug, Serialize)]
pub struct Call {
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub figures: Figures,
}

impl Call {
    pub fn error_rate(&self) -> Option<f64> {
        self.figures.success_rate.map(|s| 1.0 - s)
    }

    /// `1.7rps 0.00% err p99 12ms`.
    pub fn label(&self) -> String {
        format!(
            "{} {} err p99 {}",
            rate(self.figures.rps),
            percent(self.error_rate()),
            millis(self.figures.p99_ms)
        )
    }
}

/// The calls among `edges`, busiest first.
pub fn calls(edges: &Edges) -> Vec<Call> {
    let mut by_pair: BTreeMap<(String, String), [Summary; 2]> = BTreeMap::new();
    for e in &edges.edges {
        let from = qualified(&e.source_namespace, &e.source_workload);
        let to = match qualified(&e.destination_namespace, &e.destination_workload).as_str() {
            "unknown" if e.service != "unknown" => {
                format!("{}/{} (service)", e.service_namespace, e.service)
            }
            known => known.to_owned(),
        };
        let reports = by_pair.entry((from, to)).or_default();
        reports[usize::from(e.by_source())].add(e);
    }
    let mut calls: Vec<Call> = by_pair
        .into_iter()
        .map(|((from, to), [destination, source])| {
            let chosen = if source.requests + source.tcp_connections > 0 {
                source
            } else {
                destination
            };
            Call {
                from,
                to,
                figures: chosen.figures(&edges.bounds),
            }
        })
        .collect();
    calls.sort_by(|a, b| b.figures.rps.total_cmp(&a.figures.rps));
    calls
}

pub fn print_table(calls: &[Call]) {
    table(
        &["FROM", "TO", "RPS", "ERRORS", "LATENCY_P99", "TCP_CONN"],
        calls.iter().map(|c| {
            vec![
                c.from.clone(),
                c.to.clone(),
                rate(c.figures.rps),
                percent(c.error_rate()),
                millis(c.figures.p99_ms),
                c.figures.tcp_connections.to_string(),
            ]
        }),
    );
}

/// Graphviz DOT, left to right.
pub fn dot(calls: &[Call]) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::from(
        "digraph mesh {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"sans-serif\"];\n  \
         edge [fontname=\"sans-serif\", fontsize=10];\n",
    );
    for c in calls {
        let _ = writeln!(
            out,
            "  {} -> {} [label={}];",
            quote(&c.from),
            quote(&c.to),
            quote(&c.label())
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::window::{EdgeStats, EdgeTotals};
    use crate::viz::Edge;

    fn edge(reporter: &str, from: &str, to: &str, requests: u64, failures: u64) -> Edge {
        let mut totals = EdgeTotals::default();
        totals.add_requests(200, requests - failures, [requests - failures].into_iter());
        totals.add_requests(503, failures, [failures].into_iter());
        Edge {
            stats: EdgeStats {
                reporter: reporter.into(),
                source_workload: from.into(),
                source_namespace: "default".into(),
                destination_workload: to.into(),
                destination_namespace: if to == "unknown" {
                    "unknown"
                } else {
                    "default"
                }
                .into(),
                service: "ratings".into(),
                service_namespace: "default".into(),
                totals,
            },
            seconds: 10.0,
        }
    }

    #[test]
    fn the_callers_report_wins_and_unknown_destinations_are_services() {
        let edges = Edges {
            edges: vec![
                edge("destination", "a", "b", 10, 0),
                edge("source", "a", "b", 12, 2),
                edge("destination", "c", "b", 5, 0),
                edge("source", "a", "unknown", 4, 4),
            ],
            bounds: vec![1.0],
            seconds: 10.0,
        };
        let calls = calls(&edges);
        let pairs: Vec<_> = calls
            .iter()
            .map(|c| (c.from.as_str(), c.to.as_str(), c.figures.requests))
            .collect();
        assert_eq!(
            pairs,
            [
                ("default/a", "default/b", 12),
                ("default/c", "default/b", 5),
                ("default/a", "default/ratings (service)", 4),
            ]
        );
        assert_eq!(calls[2].error_rate(), Some(1.0));
        let dot = dot(&calls);
        assert!(
            dot.contains("\"default/a\" -> \"default/b\" [label=\"1.2rps 16.67% err p99 1.0ms\"];"),
            "{dot}"
        );
    }
}
