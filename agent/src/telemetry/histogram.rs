//! Fixed-bucket histograms updated with atomics only, so that recording on
//! the request path never takes a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_MS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`.
pub const BYTES: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
    1000000000.0,
];

pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), then the `+Inf` one.
    counts: Box<[AtomicU64]>,
    /// The sum, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.partition_point(|&le| le < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// Observations per bucket (not cumulative), the `+Inf` one last.
    pub fn counts(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed))
    }

    /// Appends `NAME_bucket`, `NAME_sum` and `NAME_count` lines for the
    /// series labelled `labels` (already rendered, without braces).
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let bounds = self.bounds.iter().map(|b| Some(*b)).chain([None]);
        for (count, le) in self.counts.iter().zip(bounds) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = match le {
                Some(le) => writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}"),
                None => writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}"),
            };
        }
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 3.0, 10.0, 11.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.write(&mut out, "x", "a=\"b\"");
        assert_eq!(
            out,
            "x_bucket{a=\"b\",le=\"1\"} 2\nx_bucket{a=\"b\",le=\"10\"} 4\n\
             x_bucket{a=\"b\",le=\"+Inf\"} 5\nx_sum{a=\"b\"} 25.5\nx_count{a=\"b\"} 5\n"
        );
    }
}
