//! B5: llm-d Workload Variant Autoscaler, saturation analyzer V1
//! (`llm-d/llm-d-workload-variant-autoscaler` @b08b1c77
//! `internal/saturation/analyzer.go`; REFERENCE.md §2.3, §3.2 B5).
//!
//! Per pod, from Prometheus (15 s scrape): `kv_i = max_over_time(kv[1m])`,
//! `q_i = max_over_time(num_requests_waiting[1m])`. Thresholds
//! `kvCacheThreshold` 0.80, `queueLengthThreshold` 5, spare triggers 0.10
//! and 3. Non-saturated set `NS = {kv_i < 0.80 ∧ q_i < 5}`; scale up if
//! `mean(0.80 − kv_i) < 0.10` or `mean(5 − q_i) < 3` over NS (or NS is
//! empty); scale down is safe if `|NS| ≥ 2`, `0.80 − Σkv/(|NS|−1) ≥ 0.10`
//! and `5 − Σq/(|NS|−1) ≥ 3`. Targets: a previous desired count different
//! from the current (ready) count is kept; up gives `ready + 1` unless
//! replicas are pending (cascade prevention); down gives `ready − 1`.
//! Reconcile every 30 s (project choice; configurable in WVA).
//!
//! Actuation: WVA exports `wva_desired_replicas`; an HPA reads it as an
//! External `AverageValue` metric with target 1, with a 120 s stabilization
//! window in both directions and default policies (REFERENCE.md: the README
//! asks for ≥ 120 s; project choice), and a tolerance of 0 in both
//! directions (`behavior.scaleUp.tolerance` / `scaleDown.tolerance`,
//! KEP-4951, beta and on by default since Kubernetes 1.35). WVA's desired
//! count is exact and moves by one replica, so the default 0.1 tolerance
//! would drop every step once the fleet has more than 10 replicas (the usage
//! ratio `(N ± 1) / N` is then within `[0.9, 1.1]`) and WVA would never scale
//! again: users of larger fleets turn the tolerance off. One variant, so
//! cheapest and most expensive are the same.
//!
//! **Configured as its users would.** WVA's thresholds live in a ConfigMap
//! per model; the shipped 0.80 KV threshold assumes a model whose KV cache
//! fills before its latency objective breaks. A user who profiled the
//! fleet's model sets `kvCacheThreshold` where a pod reaches its capacity
//! at the SLO: the KV use at that load ([`super::BaselineContext::kv_use_at_capacity`],
//! capped at 0.80), with the spare trigger at the same ratio as the
//! defaults (1/8 of the threshold). The sweep scales that threshold and its
//! spare trigger together by one factor; the queue thresholds stay 5 and 3.

use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::prometheus::{MetricStore, OverTime};
use gpuscale_core::Timestamp;
use gpuscale_policy::hpa::{Behavior, Hpa, Normalization};

/// WVA saturation V1 behind an HPA.
#[derive(Debug, Clone)]
pub struct WvaSaturation {
    kv_threshold: f64,
    queue_threshold: f64,
    kv_spare: f64,
    queue_spare: f64,
    factor: f64,
    store: MetricStore,
    hpa: Hpa,
    wva_desired: Option<u32>,
    next_reconcile: f64,
}

impl WvaSaturation {
    /// V1 with the KV threshold at `factor` × the profile's KV use at the
    /// SLO (`kv_at_slo`, capped at the shipped 0.80), its spare trigger at
    /// 1/8 of it, and the shipped queue thresholds.
    pub fn new(factor: f64, kv_at_slo: f64, min: u32, max: u32) -> Self {
        let kv = (kv_at_slo.min(0.80) * factor).clamp(1e-3, 1.0);
        Self {
            kv_threshold: kv,
            queue_threshold: 5.0,
            kv_spare: kv / 8.0,
            queue_spare: 3.0,
            factor,
            store: MetricStore::new(120.0),
            hpa: {
                let mut behavior = Behavior::hpa_default_with_windows(120, 120);
                behavior.scale_up.tolerance = 0.0;
                behavior.scale_down.tolerance = 0.0;
                let mut hpa = Hpa::new(min.max(1), max, Normalization::Behavior(behavior));
                hpa.tolerance_up = 0.0;
                hpa.tolerance_down = 0.0;
                hpa
            },
            wva_desired: None,
            next_reconcile: 0.0,
        }
    }

    /// The analyzer's verdict: +1, −1 or 0 replicas.
    pub fn analyze(&self, kv: &[f64], q: &[f64]) -> i32 {
        let ns: Vec<(f64, f64)> = kv
            .iter()
            .zip(q)
            .filter(|(k, q)| **k < self.kv_threshold && **q < self.queue_threshold)
            .map(|(k, q)| (*k, *q))
            .collect();
        if ns.is_empty() {
            return 1;
        }
        let n = ns.len() as f64;
        let spare_kv = ns.iter().map(|(k, _)| self.kv_threshold - k).sum::<f64>() / n;
        let spare_q = ns
            .iter()
            .map(|(_, q)| self.queue_threshold - q)
            .sum::<f64>()
            / n;
        if spare_kv < self.kv_spare || spare_q < self.queue_spare {
            return 1;
        }
        if ns.len() >= 2 {
            let sum_kv: f64 = ns.iter().map(|(k, _)| k).sum();
            let sum_q: f64 = ns.iter().map(|(_, q)| q).sum();
            let m = n - 1.0;
            if self.kv_threshold - sum_kv / m >= self.kv_spare
                && self.queue_threshold - sum_q / m >= self.queue_spare
            {
                return -1;
            }
        }
        0
    }

    fn reconcile(&mut self, view: &ClusterView) {
        let now = view.now;
        let ready = view.ready;
        if let Some(d) = self.wva_desired
            && d != ready
        {
            return;
        }
        let kv = self
            .store
            .per_pod_over_time(now, 60.0, |r| r.kv_usage_ratio, OverTime::Max);
        let q = self
            .store
            .per_pod_over_time(now, 60.0, |r| f64::from(r.waiting), OverTime::Max);
        if kv.is_empty() {
            return;
        }
        let kvs: Vec<f64> = kv.iter().map(|x| x.1).collect();
        let qs: Vec<f64> = kv
            .iter()
            .map(|(id, _)| q.iter().find(|(i, _)| i == id).map_or(0.0, |x| x.1))
            .collect();
        let verdict = self.analyze(&kvs, &qs);
        let pending = view.pending + view.loading > 0;
        self.wva_desired = Some(match verdict {
            1 if !pending => ready + 1,
            -1 => ready.saturating_sub(1).max(1),
            _ => view.spec_replicas.max(1),
        });
    }
}

impl Autoscaler for WvaSaturation {
    fn name(&self) -> String {
        "b5-wva-saturation-v1".into()
    }
    fn parameters(&self) -> Value {
        json!({
            "threshold_factor": self.factor,
            "kv_cache_threshold": self.kv_threshold,
            "queue_length_threshold": self.queue_threshold,
            "kv_spare_trigger": self.kv_spare,
            "queue_spare_trigger": self.queue_spare,
            "reconcile_s": 30,
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
        self.store.push(sample);
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        if view.now >= self.next_reconcile {
            self.reconcile(view);
            self.next_reconcile = view.now + 30.0;
        }
        let current = view.spec_replicas;
        let proposal = self.wva_desired.map(|d| {
            self.hpa.external_average_value_proposal(
                f64::from(d),
                1.0,
                view.pending + view.loading + view.ready,
            )
        });
        let now = Timestamp::from_secs_f64(view.now);
        ScaleCommand::replicas(self.hpa.reconcile(now, current, proposal))
    }
}
