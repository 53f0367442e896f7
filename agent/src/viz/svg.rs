//! `nodemesh graph -o svg`: the call graph drawn by our own code, so that
//! no Graphviz is needed where the CLI runs. A layered layout: callers on
//! the left, callees to their right (each node one column right of its
//! furthest caller), nodes ordered in a column by their callers' rows to
//! keep lines apart; boxes, curved arrows and a label on each edge.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::graph::Call;

const MARGIN: f64 = 24.0;
/// Horizontal room between columns, for the edge labels.
const GAP: f64 = 240.0;
const ROW: f64 = 84.0;
const BOX_HEIGHT: f64 = 46.0;
/// Rough advance of one character at the fonts used.
const CHAR: f64 = 7.4;
const LABEL_CHAR: f64 = 6.0;
/// Edges failing more than this are drawn red.
const FAILING: f64 = 0.05;

struct Node {
    name: String,
    column: usize,
    row: f64,
    x: f64,
    y: f64,
    width: f64,
}

impl Node {
    fn right(&self) -> (f64, f64) {
        (self.x + self.width, self.y + BOX_HEIGHT / 2.0)
    }

    fn left(&self) -> (f64, f64) {
        (self.x, self.y + BOX_HEIGHT / 2.0)
    }

    fn bottom(&self) -> (f64, f64) {
        (self.x + self.width / 2.0, self.y + BOX_HEIGHT)
    }
}

/// Escapes text for XML content and attribute values.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Places every node of `calls` (see the module documentation).
fn layout(calls: &[Call]) -> Vec<Node> {
    let names: BTreeSet<&str> = calls
        .iter()
        .flat_map(|c| [c.from.as_str(), c.to.as_str()])
        .collect();
    let mut nodes: Vec<Node> = names
        .iter()
        .map(|name| Node {
            name: (*name).to_owned(),
            column: 0,
            row: 0.0,
            x: 0.0,
            y: 0.0,
            width: 0.0,
        })
        .collect();
    let pos: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let pairs: Vec<(usize, usize)> = calls
        .iter()
        .map(|c| (pos[c.from.as_str()], pos[c.to.as_str()]))
        .filter(|(a, b)| a != b)
        .collect();
    // Longest path from the callers; a cycle stops growing at the node count.
    let limit = nodes.len().saturating_sub(1);
    for _ in 0..nodes.len() {
        let mut moved = false;
        for &(a, b) in &pairs {
            let column = nodes[a].column + 1;
            if nodes[b].column < column && column <= limit {
                nodes[b].column = column;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let columns = nodes.iter().map(|n| n.column).max().map_or(0, |c| c + 1);
    let mut by_column: Vec<Vec<usize>> = vec![Vec::new(); columns];
    for (i, n) in nodes.iter().enumerate() {
        by_column[n.column].push(i);
    }
    // Rows: by name in the first column, then by the mean row of callers.
    for column in &mut by_column {
        let mut keyed: Vec<(f64, usize)> = column
            .iter()
            .map(|&i| {
                let callers: Vec<f64> = pairs
                    .iter()
                    .filter(|(a, b)| *b == i && nodes[*a].column < nodes[i].column)
                    .map(|(a, _)| nodes[*a].row)
                    .collect();
                let mean = if callers.is_empty() {
                    f64::MAX
                } else {
                    callers.iter().sum::<f64>() / callers.len() as f64
                };
                (mean, i)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        *column = keyed.into_iter().map(|(_, i)| i).collect();
        for (row, &i) in column.iter().enumerate() {
            nodes[i].row = row as f64;
        }
    }
    let tallest = by_column.iter().map(Vec::len).max().unwrap_or(0) as f64;
    let mut x = MARGIN;
    for column in &by_column {
        let width = column
            .iter()
            .map(|&i| nodes[i].name.chars().count() as f64 * CHAR + 24.0)
            .fold(120.0, f64::max);
        let offset = (tallest - column.len() as f64) * ROW / 2.0;
        for &i in column {
            let n = &mut nodes[i];
            n.x = x;
            n.y = MARGIN + offset + n.row * ROW;
            n.width = width;
        }
        x += width + GAP;
    }
    nodes
}

/// The point at `t` of a cubic Bézier curve.
fn cubic(t: f64, [p0, p1, p2, p3]: [(f64, f64); 4]) -> (f64, f64) {
    let u = 1.0 - t;
    let at = |a: f64, b: f64, c: f64, d: f64| {
        u * u * u * a + 3.0 * u * u * t * b + 3.0 * u * t * t * c + t * t * t * d
    };
    (at(p0.0, p1.0, p2.0, p3.0), at(p0.1, p1.1, p2.1, p3.1))
}

/// The picture of `calls`, a standalone SVG document.
pub fn render(calls: &[Call]) -> String {
    let nodes = layout(calls);
    let by_name: BTreeMap<&str, &Node> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let width = nodes.iter().map(|n| n.x + n.width).fold(0.0, f64::max) + MARGIN;
    let backwards = calls
        .iter()
        .any(|c| by_name[c.to.as_str()].column <= by_name[c.from.as_str()].column);
    let below = if backwards { ROW } else { 0.0 };
    let height = nodes.iter().map(|n| n.y).fold(0.0, f64::max) + BOX_HEIGHT + below + MARGIN;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\">\n\
         <title>nodemesh graph</title>\n\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" \
         markerHeight=\"8\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" \
         fill=\"#555\"/></marker></defs>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    if calls.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{MARGIN}\" y=\"{MARGIN}\" font-size=\"14\">no calls in the window</text>"
        );
    }
    for c in calls {
        let (from, to) = (by_name[c.from.as_str()], by_name[c.to.as_str()]);
        let (path, (lx, ly)) = if to.column > from.column {
            let ((sx, sy), (ex, ey)) = (from.right(), to.left());
            let bend = (ex - sx) / 2.0;
            // The label sits in the gap before the callee, so that an edge
            // that skips columns is not labelled over a box.
            let t = 1.0 - 0.5 * GAP / (ex - sx);
            let (x, y) = cubic(t, [(sx, sy), (sx + bend, sy), (ex - bend, ey), (ex, ey)]);
            (
                format!(
                    "M {sx:.1} {sy:.1} C {:.1} {sy:.1}, {:.1} {ey:.1}, {ex:.1} {ey:.1}",
                    sx + bend,
                    ex - bend
                ),
                (x, y),
            )
        } else {
            // Back to a column on the left (or itself): below the boxes.
            let ((sx, sy), (ex, ey)) = (from.bottom(), to.bottom());
            let dip = sy.max(ey) + ROW * 0.6;
            (
                format!("M {sx:.1} {sy:.1} C {sx:.1} {dip:.1}, {ex:.1} {dip:.1}, {ex:.1} {ey:.1}"),
                ((sx + ex) / 2.0, dip - 8.0),
            )
        };
        let failing = c.error_rate().is_some_and(|e| e > FAILING);
        let color = if failing { "#c62828" } else { "#555" };
        let label = c.label();
        let label_width = label.chars().count() as f64 * LABEL_CHAR + 8.0;
        let _ = writeln!(
            out,
            "<g class=\"edge\"><title>{} -&gt; {}</title>\
             <path d=\"{path}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" \
             marker-end=\"url(#arrow)\"/>\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{label_width:.1}\" height=\"16\" rx=\"3\" \
             fill=\"white\" fill-opacity=\"0.9\"/>\
             <text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" \
             fill=\"{color}\">{}</text></g>",
            xml(&c.from),
            xml(&c.to),
            lx - label_width / 2.0,
            ly - 11.0,
            ly + 1.0,
            xml(&label)
        );
    }
    for n in &nodes {
        let (namespace, name) = n.name.split_once('/').unwrap_or(("", &n.name));
        let _ = writeln!(
            out,
            "<g class=\"node\"><title>{}</title>\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{BOX_HEIGHT}\" rx=\"6\" \
             fill=\"#e3f2fd\" stroke=\"#1565c0\" stroke-width=\"1.5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"13\" font-weight=\"bold\" \
             text-anchor=\"middle\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#555\" \
             text-anchor=\"middle\">{}</text></g>",
            xml(&n.name),
            n.x,
            n.y,
            n.width,
            n.x + n.width / 2.0,
            n.y + 20.0,
            xml(name),
            n.x + n.width / 2.0,
            n.y + 36.0,
            xml(namespace)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viz::Figures;

    fn call(from: &str, to: &str) -> Call {
        Call {
            from: from.into(),
            to: to.into(),
            figures: Figures {
                requests: 1,
                failures: 0,
                success_rate: Some(1.0),
                rps: 1.0,
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
                tcp_connections: 0,
            },
        }
    }

    #[test]
    fn callees_are_right_of_their_furthest_caller_even_in_a_cycle() {
        let mut calls = vec![
            call("ns/a", "ns/b"),
            call("ns/b", "ns/c"),
            call("ns/a", "ns/c"),
            call("ns/<x&y>", "ns/b"),
        ];
        let nodes = layout(&calls);
        let column = |name: &str| nodes.iter().find(|n| n.name == name).unwrap().column;
        assert_eq!(column("ns/a"), 0);
        assert_eq!(column("ns/b"), 1);
        assert_eq!(column("ns/c"), 2);
        // A cycle stops growing within the node count.
        calls.push(call("ns/c", "ns/a"));
        let nodes = layout(&calls);
        assert!(nodes.iter().all(|n| n.column < nodes.len()));
        let svg = render(&calls);
        assert!(svg.contains("<title>ns/&lt;x&amp;y&gt;</title>"), "{svg}");
        assert_eq!(svg.matches("<g class=\"edge\">").count(), calls.len());
        assert_eq!(svg.matches("<g class=\"node\">").count(), 4);
    }
}
