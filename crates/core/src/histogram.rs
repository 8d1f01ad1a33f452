//! Cumulative histograms in Prometheus form.
//!
//! Latencies travel as histograms, never as single values: an engine exports
//! cumulative bucket counters, the agent forwards them, and the scaler takes
//! the difference of two snapshots to get the observations of a window, from
//! which it reads percentiles the way Prometheus' `histogram_quantile` does.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// TTFT buckets, seconds (vLLM's `time_to_first_token_seconds` bounds, +Inf implied).
pub const TTFT_BOUNDS_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Inter-token latency buckets, seconds (vLLM's `inter_token_latency_seconds`
/// bounds with finer steps below 100 ms, +Inf implied).
pub const ITL_BOUNDS_SECONDS: &[f64] = &[
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];

/// Per-request time per output token buckets, seconds: the same bounds as
/// [`ITL_BOUNDS_SECONDS`] (a request's TPOT is the mean of its inter-token
/// gaps, so it lives on the same scale).
pub const TPOT_BOUNDS_SECONDS: &[f64] = ITL_BOUNDS_SECONDS;

/// A cumulative histogram: `cumulative[i]` observations were `<= bounds[i]`.
/// The last bound is always `+Inf`, so `cumulative.last() == count`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    bounds: Vec<f64>,
    cumulative: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum HistogramError {
    #[error("histogram has no buckets")]
    Empty,
    #[error("bucket bounds must be strictly increasing and not NaN (bound {index} = {value})")]
    BoundsNotIncreasing { index: usize, value: f64 },
    #[error("the last bucket bound must be +Inf, found {0}")]
    MissingInfBucket(f64),
    #[error("{bounds} bucket bounds but {counts} counts")]
    LengthMismatch { bounds: usize, counts: usize },
    #[error("cumulative counts must not decrease (bucket {index})")]
    CountsDecrease { index: usize },
    #[error("count {count} differs from the +Inf bucket {inf}")]
    CountMismatch { count: u64, inf: u64 },
    #[error("sum must be finite and >= 0, found {0}")]
    BadSum(f64),
    #[error("histograms have different bucket bounds")]
    DifferentBounds,
    #[error("bucket {index} went down: the source's counters were reset")]
    CounterReset { index: usize },
}

impl Histogram {
    /// An empty histogram over `finite_bounds` (increasing, finite); `+Inf` is appended.
    pub fn with_bounds(finite_bounds: &[f64]) -> Result<Self, HistogramError> {
        let mut bounds = finite_bounds.to_vec();
        bounds.push(f64::INFINITY);
        check_bounds(&bounds)?;
        let n = bounds.len();
        Ok(Self {
            bounds,
            cumulative: vec![0; n],
            sum: 0.0,
            count: 0,
        })
    }

    /// From wire or scrape data, validated: bounds increasing and ending in
    /// `+Inf`, counts cumulative (non-decreasing), `count` equal to the `+Inf`
    /// bucket, `sum` finite and non-negative.
    pub fn from_parts(
        bounds: Vec<f64>,
        cumulative: Vec<u64>,
        sum: f64,
        count: u64,
    ) -> Result<Self, HistogramError> {
        check_bounds(&bounds)?;
        if bounds.len() != cumulative.len() {
            return Err(HistogramError::LengthMismatch {
                bounds: bounds.len(),
                counts: cumulative.len(),
            });
        }
        for i in 1..cumulative.len() {
            if cumulative[i] < cumulative[i - 1] {
                return Err(HistogramError::CountsDecrease { index: i });
            }
        }
        let inf = cumulative.last().copied().unwrap_or(0);
        if inf != count {
            return Err(HistogramError::CountMismatch { count, inf });
        }
        if !sum.is_finite() || sum < 0.0 {
            return Err(HistogramError::BadSum(sum));
        }
        Ok(Self {
            bounds,
            cumulative,
            sum,
            count,
        })
    }

    /// The TTFT histogram layout used by gpuscale's own engines and the simulator.
    pub fn ttft() -> Self {
        Self::with_bounds(TTFT_BOUNDS_SECONDS).expect("invariant: constant bounds are valid")
    }

    /// The ITL histogram layout used by gpuscale's own engines and the simulator.
    pub fn itl() -> Self {
        Self::with_bounds(ITL_BOUNDS_SECONDS).expect("invariant: constant bounds are valid")
    }

    /// The per-request TPOT histogram layout used by gpuscale's own engines,
    /// the request proxy and the simulator.
    pub fn tpot() -> Self {
        Self::with_bounds(TPOT_BOUNDS_SECONDS).expect("invariant: constant bounds are valid")
    }

    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }
    pub fn cumulative_counts(&self) -> &[u64] {
        &self.cumulative
    }
    pub fn sum(&self) -> f64 {
        self.sum
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Record `n` observations of `value` (negative and NaN values count as 0).
    pub fn observe_n(&mut self, value: f64, n: u64) {
        let v = if value.is_nan() || value < 0.0 {
            0.0
        } else {
            value
        };
        let first = self.bounds.partition_point(|b| *b < v);
        for c in &mut self.cumulative[first..] {
            *c += n;
        }
        self.sum += v * n as f64;
        self.count += n;
    }

    pub fn observe(&mut self, value: f64) {
        self.observe_n(value, 1);
    }

    /// The observations made between `older` and `self` (both cumulative).
    /// Fails with [`HistogramError::CounterReset`] if any bucket went down.
    pub fn delta_since(&self, older: &Histogram) -> Result<Histogram, HistogramError> {
        if self.bounds != older.bounds {
            return Err(HistogramError::DifferentBounds);
        }
        let mut cumulative = Vec::with_capacity(self.cumulative.len());
        for (i, (a, b)) in self.cumulative.iter().zip(&older.cumulative).enumerate() {
            cumulative.push(
                a.checked_sub(*b)
                    .ok_or(HistogramError::CounterReset { index: i })?,
            );
        }
        let count = self
            .count
            .checked_sub(older.count)
            .ok_or(HistogramError::CounterReset {
                index: self.cumulative.len().saturating_sub(1),
            })?;
        Ok(Histogram {
            bounds: self.bounds.clone(),
            cumulative,
            sum: (self.sum - older.sum).max(0.0),
            count,
        })
    }

    /// Whether `self` can follow `older` in one cumulative series: the same
    /// bounds and no bucket lower (no reset in between).
    pub fn follows(&self, older: &Histogram) -> bool {
        self.bounds == older.bounds
            && self.count >= older.count
            && self
                .cumulative
                .iter()
                .zip(&older.cumulative)
                .all(|(a, b)| a >= b)
    }

    /// Add `other`'s observations to `self` (same bounds required).
    pub fn merge(&mut self, other: &Histogram) -> Result<(), HistogramError> {
        if self.bounds != other.bounds {
            return Err(HistogramError::DifferentBounds);
        }
        for (a, b) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
        Ok(())
    }

    /// The `q`-quantile (0..=1) as Prometheus' `histogram_quantile` computes it:
    /// linear interpolation inside the bucket, the first bucket starting at 0,
    /// and the highest finite bound when the quantile falls in `+Inf`.
    /// `None` when there are no observations or `q` is outside 0..=1.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * self.count as f64;
        let idx = self.cumulative.partition_point(|c| (*c as f64) < rank);
        let idx = idx.min(self.cumulative.len() - 1);
        if self.bounds[idx].is_infinite() {
            // Highest finite bound (or 0 for a histogram with only +Inf).
            return Some(if idx == 0 { 0.0 } else { self.bounds[idx - 1] });
        }
        let upper = self.bounds[idx];
        let (lower, below) = if idx == 0 {
            (0.0_f64.min(upper), 0u64)
        } else {
            (self.bounds[idx - 1], self.cumulative[idx - 1])
        };
        let in_bucket = self.cumulative[idx] - below;
        if in_bucket == 0 {
            return Some(upper);
        }
        let frac = (rank - below as f64) / in_bucket as f64;
        Some(lower + (upper - lower) * frac)
    }

    /// Estimated fraction of observations `<= x`, interpolating linearly inside
    /// the bucket that holds `x`. `None` without observations.
    pub fn fraction_at_or_below(&self, x: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let idx = self.bounds.partition_point(|b| *b < x);
        if idx >= self.bounds.len() {
            return Some(1.0);
        }
        let below = if idx == 0 {
            0
        } else {
            self.cumulative[idx - 1]
        };
        let upper = self.bounds[idx];
        let lower = if idx == 0 { 0.0 } else { self.bounds[idx - 1] };
        let in_bucket = self.cumulative[idx] - below;
        let part = if upper.is_infinite() || upper <= lower {
            0.0
        } else {
            ((x - lower) / (upper - lower)).clamp(0.0, 1.0) * in_bucket as f64
        };
        Some(((below as f64 + part) / self.count as f64).clamp(0.0, 1.0))
    }

    /// Mean of the observations, `None` without observations.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

fn check_bounds(bounds: &[f64]) -> Result<(), HistogramError> {
    let last = *bounds.last().ok_or(HistogramError::Empty)?;
    for (i, b) in bounds.iter().enumerate() {
        if b.is_nan() || (i > 0 && *b <= bounds[i - 1]) {
            return Err(HistogramError::BoundsNotIncreasing {
                index: i,
                value: *b,
            });
        }
    }
    if last != f64::INFINITY {
        return Err(HistogramError::MissingInfBucket(last));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hist(values: &[f64]) -> Histogram {
        let mut h = Histogram::with_bounds(&[0.1, 0.2, 0.5, 1.0]).expect("valid bounds");
        for v in values {
            h.observe(*v);
        }
        h
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        // 10 observations in (0.1, 0.2]: the median is in the middle of the bucket.
        let h = hist(&[0.15; 10]);
        let q = h.quantile(0.5).expect("has data");
        assert!((q - 0.15).abs() < 1e-9, "q = {q}");
    }

    #[test]
    fn quantile_in_inf_bucket_returns_highest_finite_bound() {
        let h = hist(&[5.0, 6.0]);
        assert_eq!(h.quantile(0.99), Some(1.0));
    }

    #[test]
    fn empty_histogram_has_no_quantile() {
        assert_eq!(hist(&[]).quantile(0.5), None);
        assert_eq!(hist(&[]).fraction_at_or_below(1.0), None);
    }

    #[test]
    fn delta_detects_counter_reset() {
        let newer = hist(&[0.15]);
        let older = hist(&[0.15, 0.15]);
        assert!(matches!(
            newer.delta_since(&older),
            Err(HistogramError::CounterReset { .. })
        ));
    }

    #[test]
    fn from_parts_rejects_inconsistent_counts() {
        let b = vec![0.1, f64::INFINITY];
        assert!(matches!(
            Histogram::from_parts(b.clone(), vec![3, 2], 1.0, 2),
            Err(HistogramError::CountsDecrease { index: 1 })
        ));
        assert!(matches!(
            Histogram::from_parts(b.clone(), vec![1, 2], 1.0, 3),
            Err(HistogramError::CountMismatch { .. })
        ));
        assert!(matches!(
            Histogram::from_parts(b, vec![1, 2], f64::NAN, 2),
            Err(HistogramError::BadSum(_))
        ));
        assert!(matches!(
            Histogram::from_parts(vec![0.1, 0.2], vec![1, 2], 1.0, 2),
            Err(HistogramError::MissingInfBucket(_))
        ));
    }

    proptest! {
        #[test]
        fn delta_of_later_snapshot_holds_exactly_the_new_observations(
            first in proptest::collection::vec(0.0f64..2.0, 0..50),
            second in proptest::collection::vec(0.0f64..2.0, 0..50),
        ) {
            let older = hist(&first);
            let mut all = first.clone();
            all.extend_from_slice(&second);
            let newer = hist(&all);
            let delta = newer.delta_since(&older).expect("monotone");
            let expected = hist(&second);
            prop_assert_eq!(delta.cumulative_counts(), expected.cumulative_counts());
            prop_assert_eq!(delta.count(), second.len() as u64);
        }

        #[test]
        fn quantile_is_monotone_in_q(values in proptest::collection::vec(0.0f64..2.0, 1..100)) {
            let h = hist(&values);
            let mut prev = 0.0;
            for i in 0..=20 {
                let q = h.quantile(i as f64 / 20.0).expect("has data");
                prop_assert!(q >= prev - 1e-12);
                prev = q;
            }
        }

        #[test]
        fn fraction_below_is_a_probability(values in proptest::collection::vec(0.0f64..2.0, 1..100), x in 0.0f64..3.0) {
            let f = hist(&values).fraction_at_or_below(x).expect("has data");
            prop_assert!((0.0..=1.0).contains(&f));
        }
    }
}
