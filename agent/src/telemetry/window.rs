//! Windowed stats for `nodemesh stat`, `top` and `graph`: every
//! [`INTERVAL`] each label set's ("edge's") totals are copied into a ring
//! of [`SLOTS`] snapshots, so that "the last minute" is the live totals
//! minus the snapshot taken a minute ago (or at the agent's start, when it
//! is younger). Nothing is added to the request path.
//!
//! Memory is bounded by the label-set cap of the standard metrics: a
//! snapshot holds at most [`super::standard::MAX_EDGES`] edges of
//! [`EdgeTotals`] (26 counters, about 260 bytes with its map entry; the
//! label text is shared with the metrics), so the ring holds at most
//! 13 × 2 048 × 260 B ≈ 7 MB at the cap, and about 170 KB for a node with
//! 50 edges.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::histogram::DURATION_MS;

/// How often totals are snapshot.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Snapshots kept: the longest window is `(SLOTS - 1) × INTERVAL`.
pub const SLOTS: usize = 13;
/// The longest window that can be asked for (2 minutes).
pub const MAX_WINDOW: Duration = Duration::from_secs(INTERVAL.as_secs() * (SLOTS as u64 - 1));

/// Buckets of `istio_request_duration_milliseconds`, `+Inf` included.
const BUCKETS: usize = DURATION_MS.len() + 1;

/// One edge's counts, cumulative in a snapshot, a difference in a window.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeTotals {
    pub requests: u64,
    /// Requests by response class, indexed by `code / 100`; index 0 holds
    /// requests without a valid code.
    pub classes: [u64; 6],
    /// Requests per duration bucket (not cumulative), the `+Inf` one last.
    pub duration_ms: [u64; BUCKETS],
    pub tcp_opened: u64,
    pub tcp_closed: u64,
    pub tcp_sent: u64,
    pub tcp_received: u64,
}

impl EdgeTotals {
    /// Adds `n` requests answered with `code`, with their duration buckets.
    pub fn add_requests(&mut self, code: u16, n: u64, durations: impl Iterator<Item = u64>) {
        self.requests += n;
        let class = if (100..600).contains(&code) {
            usize::from(code / 100)
        } else {
            0
        };
        self.classes[class] += n;
        for (bucket, count) in self.duration_ms.iter_mut().zip(durations) {
            *bucket += count;
        }
    }

    /// What was counted after `earlier` (counters only grow).
    fn since(&self, earlier: &EdgeTotals) -> EdgeTotals {
        let mut d = EdgeTotals {
            requests: self.requests.saturating_sub(earlier.requests),
            tcp_opened: self.tcp_opened.saturating_sub(earlier.tcp_opened),
            tcp_closed: self.tcp_closed.saturating_sub(earlier.tcp_closed),
            tcp_sent: self.tcp_sent.saturating_sub(earlier.tcp_sent),
            tcp_received: self.tcp_received.saturating_sub(earlier.tcp_received),
            ..EdgeTotals::default()
        };
        for (i, c) in d.classes.iter_mut().enumerate() {
            *c = self.classes[i].saturating_sub(earlier.classes[i]);
        }
        for (i, c) in d.duration_ms.iter_mut().enumerate() {
            *c = self.duration_ms[i].saturating_sub(earlier.duration_ms[i]);
        }
        d
    }

    fn is_idle(&self) -> bool {
        self.requests == 0 && self.tcp_opened == 0 && self.tcp_closed == 0
    }
}

/// Totals by rendered label set.
pub type Totals = HashMap<Arc<str>, EdgeTotals>;

struct Snapshot {
    at: Instant,
    totals: Totals,
}

/// One edge's counts over a window, with the labels that name it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeStats {
    pub reporter: String,
    pub source_workload: String,
    pub source_namespace: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub service: String,
    pub service_namespace: String,
    #[serde(flatten)]
    pub totals: EdgeTotals,
}

/// The admin socket's answer to [`crate::admin::Query::Stats`].
#[derive(Debug, Serialize)]
pub struct Stats {
    /// The window actually covered (shorter when the agent is younger).
    pub window_seconds: f64,
    pub max_window_seconds: u64,
    /// Upper bounds of the finite duration buckets, in milliseconds.
    pub duration_ms_bounds: &'static [f64],
    /// Edges with traffic in the window.
    pub edges: Vec<EdgeStats>,
}

#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error(
        "a window of {asked}s is longer than the {max}s the agent keeps; ask for --window {max}s \
         or less, or query Prometheus for longer ranges"
    )]
    TooLong { asked: u64, max: u64 },
}

/// The ring of snapshots (see the module documentation).
pub struct Window {
    ring: Mutex<VecDeque<Snapshot>>,
}

impl Window {
    /// Starts with an empty snapshot: the agent's start.
    pub fn new(now: Instant) -> Window {
        let mut ring = VecDeque::with_capacity(SLOTS);
        ring.push_back(Snapshot {
            at: now,
            totals: Totals::new(),
        });
        Window {
            ring: Mutex::new(ring),
        }
    }

    /// Keeps `totals`, taken at `now`, dropping the oldest snapshot when full.
    pub fn record(&self, now: Instant, totals: Totals) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.len() == SLOTS {
            ring.pop_front();
        }
        ring.push_back(Snapshot { at: now, totals });
    }

    /// `live` minus the newest snapshot at least `window` old (or the
    /// oldest one kept).
    pub fn stats(
        &self,
        live: &Totals,
        window: Duration,
        now: Instant,
    ) -> Result<Stats, WindowError> {
        if window > MAX_WINDOW {
            return Err(WindowError::TooLong {
                asked: window.as_secs(),
                max: MAX_WINDOW.as_secs(),
            });
        }
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let base = ring
            .iter()
            .rev()
            .find(|s| now.saturating_duration_since(s.at) >= window)
            .or(ring.front())
            .expect("the ring is never empty");
        let empty = EdgeTotals::default();
        let mut edges: Vec<EdgeStats> = live
            .iter()
            .filter_map(|(labels, totals)| {
                let delta = totals.since(base.totals.get(labels).unwrap_or(&empty));
                (!delta.is_idle()).then(|| named(labels, delta))
            })
            .collect();
        edges.sort_by_key(|e| std::cmp::Reverse(e.totals.requests));
        Ok(Stats {
            window_seconds: now.saturating_duration_since(base.at).as_secs_f64(),
            max_window_seconds: MAX_WINDOW.as_secs(),
            duration_ms_bounds: DURATION_MS,
            edges,
        })
    }
}

/// Names an edge by the labels of its rendered label set.
fn named(rendered: &str, totals: EdgeTotals) -> EdgeStats {
    let mut labels = parse_labels(rendered);
    let mut take = |name: &str| labels.remove(name).unwrap_or_default();
    EdgeStats {
        reporter: take("reporter"),
        source_workload: take("source_workload"),
        source_namespace: take("source_workload_namespace"),
        destination_workload: take("destination_workload"),
        destination_namespace: take("destination_workload_namespace"),
        service: take("destination_service_name"),
        service_namespace: take("destination_service_namespace"),
        totals,
    }
}

/// Parses `a="x",b="y\"z"` (the text format's label syntax) into a map.
fn parse_labels(rendered: &str) -> HashMap<&str, String> {
    let mut labels = HashMap::new();
    let mut rest = rendered;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(name.trim_start_matches(','), value);
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: &str = "reporter=\"destination\",source_workload=\"a\\\"b\",\
        source_workload_namespace=\"ns\",destination_workload=\"reviews-v2\",\
        destination_workload_namespace=\"default\",destination_service_name=\"reviews\"";

    fn totals(requests: u64, errors: u64) -> Totals {
        let mut t = EdgeTotals::default();
        t.add_requests(200, requests - errors, [requests - errors].into_iter());
        t.add_requests(503, errors, [0, errors].into_iter());
        [(Arc::from(EDGE), t)].into()
    }

    #[test]
    fn a_window_is_the_difference_with_the_snapshot_that_old() {
        let start = Instant::now();
        let window = Window::new(start);
        let at = |s| start + Duration::from_secs(s);
        window.record(at(10), totals(10, 1));
        window.record(at(20), totals(30, 2));
        window.record(at(30), totals(60, 5));
        let stats = window
            .stats(&totals(100, 10), Duration::from_secs(15), at(35))
            .unwrap();
        // The newest snapshot at least 15 s old is the one at 20 s.
        assert_eq!(stats.window_seconds, 15.0);
        let edge = &stats.edges[0];
        assert_eq!(edge.totals.requests, 70);
        assert_eq!(edge.totals.classes[5], 8);
        assert_eq!(edge.totals.classes[2], 62);
        assert_eq!(edge.totals.duration_ms[..2], [62, 8]);
        assert_eq!(edge.source_workload, "a\"b");
        assert_eq!(edge.destination_workload, "reviews-v2");
        assert_eq!(edge.service, "reviews");
        // Younger than the window: since the start.
        let all = window
            .stats(&totals(100, 10), Duration::from_secs(60), at(35))
            .unwrap();
        assert_eq!(all.window_seconds, 35.0);
        assert_eq!(all.edges[0].totals.requests, 100);
        // No traffic since the base: no edge.
        let idle = window
            .stats(&totals(60, 5), Duration::from_secs(1), at(31))
            .unwrap();
        assert!(idle.edges.is_empty());
    }

    #[test]
    fn the_ring_is_bounded_and_longer_windows_are_refused() {
        let start = Instant::now();
        let window = Window::new(start);
        for i in 1..=100 {
            window.record(start + INTERVAL * i, totals(i as u64 + 1, 0));
        }
        assert_eq!(window.ring.lock().unwrap().len(), SLOTS);
        let now = start + INTERVAL * 100;
        let stats = window.stats(&totals(101, 0), MAX_WINDOW, now).unwrap();
        assert_eq!(stats.window_seconds, MAX_WINDOW.as_secs_f64());
        assert_eq!(stats.edges[0].totals.requests, 12);
        let refused = window.stats(&totals(101, 0), MAX_WINDOW + INTERVAL, now);
        assert!(matches!(refused, Err(WindowError::TooLong { .. })));
    }
}
