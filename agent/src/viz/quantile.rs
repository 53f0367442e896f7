//! Quantiles from fixed-bucket histograms, interpolated as Prometheus'
//! `histogram_quantile` does, so that `nodemesh stat` and the dashboards
//! agree.

/// The `q` quantile (0 ≤ q ≤ 1) of observations counted per bucket
/// (`counts`, not cumulative, the `+Inf` bucket last) whose finite upper
/// bounds are `bounds`; `None` without observations.
///
/// As Prometheus: linear interpolation inside the bucket holding the rank
/// (the first bucket starting at 0), and the highest finite bound when the
/// rank falls in the `+Inf` bucket.
pub fn histogram_quantile(q: f64, bounds: &[f64], counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || bounds.is_empty() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        let cumulative = below + count;
        if cumulative as f64 >= rank && count > 0 {
            let Some(&end) = bounds.get(i) else {
                return bounds.last().copied();
            };
            if i == 0 && end <= 0.0 {
                return Some(end);
            }
            let start = if i == 0 { 0.0 } else { bounds[i - 1] };
            let inside = (rank - below as f64) / count as f64;
            return Some(start + (end - start) * inside);
        }
        below = cumulative;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[1.0, 5.0, 10.0, 50.0];

    #[test]
    fn interpolates_inside_the_bucket_like_prometheus() {
        // 10 observations ≤ 1, 10 in (1, 5], 80 in (5, 10].
        let counts = [10, 10, 80, 0, 0];
        // Rank 50 is 30 into the 80 of (5, 10]: 5 + 5 × 30/80.
        assert_eq!(histogram_quantile(0.5, BOUNDS, &counts), Some(6.875));
        // Rank 5 is halfway through the first bucket, which starts at 0.
        assert_eq!(histogram_quantile(0.05, BOUNDS, &counts), Some(0.5));
        // Rank 99: 5 + 5 × 79/80.
        assert_eq!(histogram_quantile(0.99, BOUNDS, &counts), Some(9.9375));
        // Rank 20 ends the second bucket exactly.
        assert_eq!(histogram_quantile(0.2, BOUNDS, &counts), Some(5.0));
    }

    #[test]
    fn the_inf_bucket_gives_the_highest_finite_bound_and_empty_gives_none() {
        assert_eq!(
            histogram_quantile(0.99, BOUNDS, &[0, 0, 0, 1, 9]),
            Some(50.0)
        );
        assert_eq!(histogram_quantile(0.5, BOUNDS, &[0; 5]), None);
        // Empty buckets below the rank are skipped, not interpolated into.
        assert_eq!(
            histogram_quantile(0.5, BOUNDS, &[0, 0, 0, 4, 0]),
            Some(30.0)
        );
    }
}
