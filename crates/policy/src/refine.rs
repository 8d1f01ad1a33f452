//! Online refinement of the decode model from what replicas report.
//!
//! Each ready replica with a running batch `B`, a mean context `L` and a
//! measured mean inter-token latency yields one sample of the ratio between
//! the decode step it ran and the step the model predicts,
//! `r = itl × (1 − prefill share) / t(B, L)` (the engine's ITL includes the
//! time prefills of new requests take between steps). The refiner keeps the
//! samples of the last [`WINDOW_S`] seconds and estimates one factor `k` on
//! the decode step (`t_true ≈ k · t_model`) robustly:
//!
//! * median and MAD of `ln r`; samples farther than 3 robust standard
//!   deviations from the median (or off by more than 4× either way) are
//!   rejected as outliers;
//! * the estimate is the mean `ln r` of the inliers;
//! * the applied factor moves toward it by at most [`MAX_DRIFT_PER_HOUR`]
//!   (a factor of 1.5 per hour) and stays within `[1/3, 3]`: one bad
//!   scrape, a noisy neighbour or a misconfigured engine cannot swing the
//!   sizing in one step.
//!
//! The confidence reported with each decision (0..=1) starts at
//! [`PRIOR_CONFIDENCE`] and, as inliers accumulate, moves toward a measure of
//! agreement: high when samples agree with each other (small spread) and with
//! the model as refined (the applied factor has caught up with the estimate).

use std::collections::VecDeque;

use gpuscale_core::Timestamp;

use crate::observation::{ReplicaObservation, ReplicaState};
use crate::perf::PerfModel;

/// Samples older than this are forgotten, seconds.
pub const WINDOW_S: f64 = 600.0;
/// Most samples kept.
pub(crate) const MAX_SAMPLES: usize = 128;
/// Largest change of `ln k` per hour.
pub const MAX_DRIFT_PER_HOUR: f64 = 0.405_465_108_108_164_4; // ln 1.5
/// Bounds of the applied factor.
pub(crate) const MIN_FACTOR: f64 = 1.0 / 3.0;
pub(crate) const MAX_FACTOR: f64 = 3.0;
/// Confidence before any observation.
pub const PRIOR_CONFIDENCE: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at: Timestamp,
    log_ratio: f64,
}

/// The refinement state of one workload's decode model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRefiner {
    samples: VecDeque<Sample>,
    log_factor: f64,
    last_update: Option<Timestamp>,
    confidence: f64,
    estimate: Option<f64>,
    spread: Option<f64>,
    inliers: usize,
}

impl Default for ModelRefiner {
    fn default() -> Self {
        Self {
            samples: VecDeque::new(),
            log_factor: 0.0,
            last_update: None,
            confidence: PRIOR_CONFIDENCE,
            estimate: None,
            spread: None,
            inliers: 0,
        }
    }
}

impl ModelRefiner {
    /// The factor applied to the decode step (1 = the model as profiled).
    pub fn factor(&self) -> f64 {
        self.log_factor.exp()
    }

    /// Confidence in the refined model, 0..=1.
    pub fn confidence(&self) -> f64 {
        self.confidence
    }

    /// The robust estimate of the factor from the current window, if any.
    pub fn estimate(&self) -> Option<f64> {
        self.estimate.map(f64::exp)
    }

    /// Inlier samples behind the estimate.
    pub fn inliers(&self) -> usize {
        self.inliers
    }

    /// `base` with its decode coefficients scaled by the current factor.
    pub fn refined(&self, base: &PerfModel) -> PerfModel {
        let mut m = base.clone();
        self.refine_into(base, &mut m);
        m
    }

    /// Write `base`'s decode coefficients scaled by the current factor into
    /// `out` (whose other fields are left as they are): no allocation.
    pub(crate) fn refine_into(&self, base: &PerfModel, out: &mut PerfModel) {
        let k = self.factor();
        out.decode_base_s = base.decode_base_s * k;
        out.decode_per_seq_s = base.decode_per_seq_s * k;
        out.decode_per_seq_token_s = base.decode_per_seq_token_s * k;
        out.decode_per_seq_sq_s = base.decode_per_seq_sq_s * k;
    }

    /// Take the samples of `replicas` observed at `now` and update the
    /// factor. `prefill_share` is the fraction of a replica's time spent in
    /// prefill (0..1). A second call at the same `now` (or earlier) changes
    /// nothing.
    pub fn observe(
        &mut self,
        now: Timestamp,
        base: &PerfModel,
        replicas: &[ReplicaObservation],
        prefill_share: f64,
    ) {
        if self.last_update.is_some_and(|t| now <= t) {
            return;
        }
        let keep = (1.0 - prefill_share.clamp(0.0, 0.9)).max(0.1);
        for r in replicas {
            if r.state != ReplicaState::Ready {
                continue;
            }
            let (Some(b), Some(l), Some(itl)) = (
                r.requests_running,
                r.mean_context_tokens,
                r.itl_mean_seconds,
            ) else {
                continue;
            };
            if !(b >= 1.0 && l.is_finite() && l >= 0.0 && itl.is_finite() && itl > 0.0) {
                continue;
            }
            let predicted = base.decode_step_s(b, l);
            if predicted <= 0.0 {
                continue;
            }
            let log_ratio = (itl * keep / predicted).ln();
            // Off by more than 4× either way: a broken sample, not a model error.
            if log_ratio.abs() > 4f64.ln() {
                continue;
            }
            self.samples.push_back(Sample { at: now, log_ratio });
        }
        let cutoff = now.plus_secs(-WINDOW_S);
        while self
            .samples
            .front()
            .is_some_and(|s| s.at < cutoff || self.samples.len() > MAX_SAMPLES)
        {
            self.samples.pop_front();
        }
        self.estimate_and_move(now);
    }

    fn estimate_and_move(&mut self, now: Timestamp) {
        let dt_h = self
            .last_update
            .map(|t| now.secs_since(t).max(0.0) / 3600.0)
            .unwrap_or(0.0);
        self.last_update = Some(now);
        if self.samples.is_empty() {
            self.estimate = None;
            self.spread = None;
            self.inliers = 0;
            self.confidence = blend_confidence(0, 0.0, 0.0);
            return;
        }
        let mut v: Vec<f64> = self.samples.iter().map(|s| s.log_ratio).collect();
        let med = median(&mut v);
        for x in v.iter_mut() {
            *x = (*x - med).abs();
        }
        let mad = median(&mut v);
        let sigma = (1.4826 * mad).max(0.01);
        let (sum, n) = self
            .samples
            .iter()
            .map(|s| s.log_ratio)
            .filter(|x| (*x - med).abs() <= 3.0 * sigma)
            .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        let est = if n > 0 { sum / n as f64 } else { med };
        self.estimate = Some(est);
        self.spread = Some(sigma);
        self.inliers = n;
        let step = MAX_DRIFT_PER_HOUR * dt_h;
        let moved = self.log_factor + (est - self.log_factor).clamp(-step, step);
        self.log_factor = moved.clamp(MIN_FACTOR.ln(), MAX_FACTOR.ln());
        self.confidence = blend_confidence(n, sigma, (est - self.log_factor).abs());
    }
}

/// Prior blended with agreement: `w = n/(n+8)`, agreement
/// `exp(−spread/0.15 − lag/0.2)` (spread and lag in log units).
fn blend_confidence(n: usize, spread: f64, lag: f64) -> f64 {
    let w = n as f64 / (n as f64 + 8.0);
    let agreement = (-spread / 0.15 - lag / 0.2).exp();
    (PRIOR_CONFIDENCE * (1.0 - w) + agreement * w).clamp(0.0, 1.0)
}

/// Median by selection (O(n)); reorders `v`.
fn median(v: &mut [f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    let (_, upper, _) = v.select_nth_unstable_by(n / 2, f64::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        // The lower middle is the largest of the lower half.
        let lower = v[..n / 2].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        0.5 * (lower + upper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf;

    fn replica(id: &str, b: f64, l: f64, itl: f64) -> ReplicaObservation {
        ReplicaObservation {
            id: id.into(),
            state: ReplicaState::Ready,
            protected: false,
            created_at: None,
            requests_running: Some(b),
            requests_waiting: Some(0.0),
            kv_cache_usage_ratio: None,
            mean_context_tokens: Some(l),
            itl_mean_seconds: Some(itl),
            generation_tokens_per_second: None,
            batch_limit: None,
            gpu_fault: None,
        }
    }

    #[test]
    fn a_slower_gpu_is_learned_within_the_drift_bound_and_outliers_are_ignored() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let mut r = ModelRefiner::default();
        let t0 = Timestamp::from_millis(0);
        for k in 0..720 {
            let now = t0.plus_secs(f64::from(k) * 10.0);
            let mut reps: Vec<_> = (0..4)
                .map(|i| {
                    let b = 16.0 + 16.0 * f64::from(i);
                    replica("r", b, 2048.0, 1.3 * m.decode_step_s(b, 2048.0))
                })
                .collect();
            // One wild sample per round.
            reps.push(replica(
                "bad",
                32.0,
                2048.0,
                10.0 * m.decode_step_s(32.0, 2048.0),
            ));
            reps.push(replica(
                "odd",
                32.0,
                2048.0,
                2.0 * m.decode_step_s(32.0, 2048.0),
            ));
            r.observe(now, &m, &reps, 0.0);
            if k == 6 {
                // After one minute the factor has moved at most 1.5^(1/60).
                assert!(r.factor() <= 1.5f64.powf(1.0 / 60.0) + 1e-9);
                assert!((r.estimate().unwrap() - 1.3).abs() < 0.01);
            }
        }
        assert!((r.factor() - 1.3).abs() < 0.01, "factor {}", r.factor());
        assert!(r.confidence() > 0.8, "confidence {}", r.confidence());
    }

    #[test]
    fn repeating_an_instant_changes_nothing() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let mut r = ModelRefiner::default();
        let reps = vec![replica("a", 32.0, 1024.0, 0.02)];
        r.observe(Timestamp::from_millis(1000), &m, &reps, 0.0);
        let before = r.clone();
        r.observe(Timestamp::from_millis(1000), &m, &reps, 0.0);
        assert_eq!(r, before);
    }

    #[test]
    fn inconsistent_samples_lower_confidence() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let mut r = ModelRefiner::default();
        let reps: Vec<_> = (0..20)
            .map(|i| {
                let f = if i % 2 == 0 { 0.6 } else { 1.6 };
                replica("x", 64.0, 2048.0, f * m.decode_step_s(64.0, 2048.0))
            })
            .collect();
        r.observe(Timestamp::from_millis(1000), &m, &reps, 0.0);
        assert!(r.confidence() < PRIOR_CONFIDENCE, "{}", r.confidence());
    }
}
