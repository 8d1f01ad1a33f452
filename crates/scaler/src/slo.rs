//! SLO attainment of a workload over minutes and hours, from latency
//! histograms.
//!
//! The SLO itself (objectives, a request's outcome, a window's status) is
//! defined once, in [`gpuscale_core::slo`]; each decision carries the
//! workload's [`gpuscale_core::SloAssessment`], which the API, the custom
//! resource and the `slo_status` metric publish. Here:
//!
//! * [`objectives_of`]: a configured workload's objectives;
//! * [`good_and_total`] and [`AttainmentWindows`]: the fraction of
//!   observations that met the threshold over the last 5 minutes and the
//!   last hour, from the observations counted since the previous call
//!   (per-bucket sums in a ring of [`ATTAINMENT_BUCKET_MS`] buckets: bounded
//!   memory, no double counting).
//!
//! Pure: every function takes the time as an argument.

use std::collections::VecDeque;

use gpuscale_core::slo::{LatencyObjective, SloObjectives};
use gpuscale_core::{Histogram, Timestamp};

use crate::config::{DeciderConfig, WorkloadDef};

/// Width of one attainment bucket.
pub const ATTAINMENT_BUCKET_MS: i64 = 10_000;

/// The windows attainment is reported over, with their metric label.
pub(crate) const ATTAINMENT_WINDOWS: [(&str, i64); 2] = [("5m", 300_000), ("1h", 3_600_000)];

/// The latency objectives of a workload decided by the full policy; `None`
/// for a proportional workload (it has no latency objective).
pub fn objectives_of(def: &WorkloadDef) -> Option<SloObjectives> {
    match &def.decider {
        DeciderConfig::Policy { config, .. } => Some(config.slo_objectives()),
        DeciderConfig::Proportional(_) => None,
    }
}

/// Which latency objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum SloKind {
    Ttft,
    /// Time per output token of each request.
    Tpot,
}

impl SloKind {
    pub const ALL: [SloKind; 2] = [SloKind::Ttft, SloKind::Tpot];

    pub fn as_str(self) -> &'static str {
        match self {
            SloKind::Ttft => "ttft",
            SloKind::Tpot => "tpot",
        }
    }

    pub fn objective(self, o: &SloObjectives) -> LatencyObjective {
        match self {
            SloKind::Ttft => o.ttft,
            SloKind::Tpot => o.tpot,
        }
    }
}

/// Observations of a histogram (of new observations) that met `threshold_s`:
/// `(good, total)`, interpolating inside the bucket that holds the threshold
/// (as `histogram_quantile` does).
pub fn good_and_total(new: &Histogram, threshold_s: f64) -> (f64, f64) {
    let total = new.count() as f64;
    let good = new
        .fraction_at_or_below(threshold_s)
        .map_or(0.0, |f| f * total);
    (good, total)
}

/// Good and total observations per time bucket, over the longest window.
#[derive(Debug, Clone, Default)]
pub struct AttainmentWindows {
    /// `(bucket start ms, good, total)`, oldest first.
    buckets: VecDeque<(i64, f64, f64)>,
}

impl AttainmentWindows {
    /// Counts `good` of `total` observations at `now`.
    pub fn record(&mut self, now: Timestamp, good: f64, total: f64) {
        if !(good.is_finite() && total.is_finite() && total > 0.0) {
            self.prune(now);
            return;
        }
        let start = now.as_millis().div_euclid(ATTAINMENT_BUCKET_MS) * ATTAINMENT_BUCKET_MS;
        match self.buckets.back_mut() {
            Some((s, g, t)) if *s == start => {
                *g += good.clamp(0.0, total);
                *t += total;
            }
            _ => self
                .buckets
                .push_back((start, good.clamp(0.0, total), total)),
        }
        self.prune(now);
    }

    fn prune(&mut self, now: Timestamp) {
        let longest = ATTAINMENT_WINDOWS
            .iter()
            .map(|(_, ms)| *ms)
            .max()
            .unwrap_or(0);
        let oldest = now.as_millis() - longest;
        while self
            .buckets
            .front()
            .is_some_and(|(s, _, _)| *s + ATTAINMENT_BUCKET_MS <= oldest)
        {
            self.buckets.pop_front();
        }
    }

    /// Fraction of observations in the last `window_ms` (whole buckets) that
    /// met the threshold; `None` without observations.
    pub fn attainment(&self, now: Timestamp, window_ms: i64) -> Option<f64> {
        let oldest = now.as_millis() - window_ms;
        let (good, total) = self
            .buckets
            .iter()
            .filter(|(s, _, _)| *s + ATTAINMENT_BUCKET_MS > oldest)
            .fold((0.0, 0.0), |(g, t), (_, bg, bt)| (g + bg, t + bt));
        (total > 0.0).then(|| (good / total).clamp(0.0, 1.0))
    }

    /// Buckets held (bounded by the longest window over the bucket width).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttft_with(values: &[(f64, u64)]) -> Histogram {
        let mut h = Histogram::ttft();
        for (v, n) in values {
            h.observe_n(*v, *n);
        }
        h
    }

    #[test]
    fn good_observations_interpolate_inside_the_threshold_bucket() {
        // 100 observations in the bucket (0.25, 0.5]: a 0.375 s threshold sits halfway.
        let h = ttft_with(&[(0.45, 100)]);
        let (good, total) = good_and_total(&h, 0.375);
        assert_eq!(total, 100.0);
        assert!((good - 50.0).abs() < 1e-9, "{good}");
        assert_eq!(good_and_total(&h, 10.0), (100.0, 100.0));
    }

    #[test]
    fn attainment_counts_each_observation_once_per_window() {
        let mut w = AttainmentWindows::default();
        let t = |s: i64| Timestamp::from_millis(s * 1000);
        // Ten minutes ago: all bad; now: all good.
        w.record(t(1000), 0.0, 100.0);
        w.record(t(1595), 90.0, 100.0);
        w.record(t(1600), 10.0, 100.0);
        let five = w.attainment(t(1600), 300_000).expect("data");
        assert!((five - 0.5).abs() < 1e-9, "{five}");
        let hour = w.attainment(t(1600), 3_600_000).expect("data");
        assert!((hour - 100.0 / 300.0).abs() < 1e-9, "{hour}");
        // Two hours later nothing is left, and the ring stays bounded.
        w.record(t(8800), 0.0, 0.0);
        assert_eq!(w.attainment(t(8800), 3_600_000), None);
        assert!(w.is_empty());
        for s in 0..100_000 {
            w.record(t(s), 1.0, 1.0);
        }
        assert!(w.len() <= 361, "{}", w.len());
    }
}
