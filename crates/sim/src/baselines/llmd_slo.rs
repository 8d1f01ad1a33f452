//! B9: the llm-d SLO-aware KEDA law (`llm-d/llm-d
//! guides/workload-autoscaling/README.slo-aware.md`; REFERENCE.md §2.3,
//! §3.2 B9).
//!
//! Signal, evaluated at every 15 s scrape: `s_raw = max(P90_TTFT / S_ttft,
//! P90_TPOT / S_tpot)` from the observed histograms over the last minute
//! (no traffic → 0), clipped at 2, and `s = avg_over_time(s_raw[45s])`.
//! P90 TPOT is read from the inter-token-latency histogram (the simulator's
//! engines export per-token gaps, not per-request TPOT; project choice).
//!
//! Law, with `n` provisioned (`spec.replicas`), `r` ready and
//! `c = r/n` when `0 < r < n`, else 1:
//! * `s > 0.55`: `d = n + ceil(n·(s·c/0.55 − 1))` (in-flight credit);
//! * `s < 0.40`: `d = n − floor(n·(1 − s/0.40))`;
//! * otherwise `d = n`.
//!
//! Actuation: an HPA with scale-up window 30 s, policies Percent 100 and
//! Pods 4 per 60 s (Max), scale-down window 180 s, Pods 1 per 120 s; `d`
//! enters as an External `AverageValue` metric with target 1. Bounds are the
//! comparison's (the reference deployment used 3–8). The sweep multiplies
//! both thresholds (0.55, 0.40) by one factor.

use std::collections::VecDeque;

use gpuscale_core::Timestamp;
use gpuscale_policy::hpa::{
    Behavior, HPA_DEFAULT_TOLERANCE, Hpa, Normalization, ScalingPolicy, ScalingPolicyKind,
    ScalingRules, SelectPolicy,
};
use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::prometheus::{MetricStore, Which};
use crate::stats::Slo;

/// The llm-d SLO-aware law behind KEDA/HPA.
#[derive(Debug, Clone)]
pub struct LlmdSloAware {
    slo: Slo,
    up_threshold: f64,
    down_threshold: f64,
    factor: f64,
    store: MetricStore,
    s_raw: VecDeque<(f64, f64)>,
    hpa: Hpa,
}

impl LlmdSloAware {
    pub fn new(slo: Slo, factor: f64, min: u32, max: u32) -> Self {
        let behavior = Behavior {
            scale_up: ScalingRules {
                stabilization_window_s: 30,
                select_policy: SelectPolicy::Max,
                policies: vec![
                    ScalingPolicy {
                        kind: ScalingPolicyKind::Percent,
                        value: 100,
                        period_s: 60,
                    },
                    ScalingPolicy {
                        kind: ScalingPolicyKind::Pods,
                        value: 4,
                        period_s: 60,
                    },
                ],
                tolerance: HPA_DEFAULT_TOLERANCE,
            },
            scale_down: ScalingRules {
                stabilization_window_s: 180,
                select_policy: SelectPolicy::Max,
                policies: vec![ScalingPolicy {
                    kind: ScalingPolicyKind::Pods,
                    value: 1,
                    period_s: 120,
                }],
                tolerance: HPA_DEFAULT_TOLERANCE,
            },
        };
        Self {
            slo,
            up_threshold: 0.55 * factor,
            down_threshold: 0.40 * factor,
            factor,
            store: MetricStore::new(120.0),
            s_raw: VecDeque::new(),
            hpa: Hpa::new(min.max(1), max, Normalization::Behavior(behavior)),
        }
    }

    /// The law: desired replicas for signal `s`, `n` provisioned, `r` ready.
    pub fn law(&self, s: f64, n: u32, r: u32) -> u32 {
        let nf = f64::from(n);
        let c = if r > 0 && r < n {
            f64::from(r) / nf
        } else {
            1.0
        };
        let d = if s > self.up_threshold {
            nf + (nf * (s * c / self.up_threshold - 1.0)).ceil()
        } else if s < self.down_threshold {
            nf - (nf * (1.0 - s / self.down_threshold)).floor()
        } else {
            nf
        };
        d.max(0.0) as u32
    }

    fn signal(&self, now: f64) -> f64 {
        let mut sum = 0.0;
        let mut n = 0;
        for &(t, v) in self.s_raw.iter().rev() {
            if t <= now - 45.0 {
                break;
            }
            sum += v;
            n += 1;
        }
        if n == 0 { 0.0 } else { sum / f64::from(n) }
    }
}

impl Autoscaler for LlmdSloAware {
    fn name(&self) -> String {
        "b9-llmd-slo-aware".into()
    }
    fn parameters(&self) -> Value {
        json!({
            "threshold_factor": self.factor,
            "scale_up_above": self.up_threshold,
            "scale_down_below": self.down_threshold,
            "signal": "max(P90 TTFT / SLO, P90 ITL / SLO) over 1m, clipped at 2, avg over 45s",
            "scrape_s": 15,
            "hpa_sync_s": 15,
            "hpa": self.hpa,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        15.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(15.0)
    }
    fn observe(&mut self, sample: FleetSample) {
        let at = sample.at;
        self.store.push(sample);
        let p90 = |w: Which| {
            self.store
                .histogram_increase(at, 60.0, w)
                .and_then(|h| h.quantile(0.9))
        };
        let ttft = p90(Which::Ttft).map_or(0.0, |v| v / self.slo.ttft_s);
        let itl = p90(Which::Itl).map_or(0.0, |v| v / self.slo.itl_s);
        let s = ttft.max(itl);
        let s = if s.is_finite() { s.min(2.0) } else { 0.0 };
        self.s_raw.push_back((at, s));
        while self.s_raw.front().is_some_and(|(t, _)| *t <= at - 60.0) {
            self.s_raw.pop_front();
        }
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let s = self.signal(view.now);
        let n = view.spec_replicas;
        let d = self.law(s, n, view.ready);
        let proposal = self.hpa.external_average_value_proposal(
            f64::from(d),
            1.0,
            view.pending + view.loading + view.ready,
        );
        let now = Timestamp::from_secs_f64(view.now);
        ScaleCommand::replicas(self.hpa.reconcile(now, n, Some(proposal)))
    }
}
