//! Whether a request is traced: the caller's decision when it made one
//! (W3C sampled flag, B3 sampled or debug), so a trace is whole or absent;
//! otherwise at random, at the workload's percentage (Istio's `Telemetry`
//! `randomSamplingPercentage`) or the agent's (`--trace-sampling`).

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    /// Percent of requests, 0 to 100, when nothing else decides.
    default_percent: f64,
}

impl Sampler {
    pub fn new(default_percent: f64) -> Sampler {
        Sampler {
            default_percent: default_percent.clamp(0.0, 100.0),
        }
    }

    /// `caller`: the decision the request carries; `workload_percent`: the
    /// percentage resolved for the workload the proxy serves, if any.
    pub fn sample(&self, caller: Option<bool>, workload_percent: Option<f64>) -> bool {
        if let Some(decided) = caller {
            return decided;
        }
        let percent = workload_percent.unwrap_or(self.default_percent);
        // `<` so that 0 % never samples and 100 % always does.
        percent > 0.0 && fastrand::f64() * 100.0 < percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_decision_wins() {
        let always = Sampler::new(100.0);
        assert!(!always.sample(Some(false), Some(100.0)));
        let never = Sampler::new(0.0);
        assert!(never.sample(Some(true), Some(0.0)));
    }

    #[test]
    fn the_workloads_percentage_overrides_the_agents() {
        let never = Sampler::new(0.0);
        assert!((0..1000).all(|_| never.sample(None, Some(100.0))));
        assert!((0..1000).all(|_| !never.sample(None, None)));
        let always = Sampler::new(100.0);
        assert!((0..1000).all(|_| !always.sample(None, Some(0.0))));
        assert!((0..1000).all(|_| always.sample(None, None)));
    }

    #[test]
    fn random_sampling_follows_the_percentage() {
        let half = Sampler::new(50.0);
        let sampled = (0..10_000).filter(|_| half.sample(None, None)).count();
        // Far outside any plausible binomial spread if the rate were wrong.
        assert!((4_000..6_000).contains(&sampled), "{sampled}");
    }
}
