//! B12: Kubernetes HPA on GPU utilization (REFERENCE.md §3.2 B12, §5.4).
//!
//! Metric `DCGM_FI_DEV_GPU_UTIL` per pod through prometheus-adapter as a
//! `Pods` metric with an `AverageValue` target (80 by default: the HF
//! Inference Endpoints threshold and the HPA CPU default). E-HPA with the
//! default behavior block, tolerance 0.1, 15 s sync; non-CPU grouping (a
//! running pod with a sample counts as ready; missing pods are filled as in
//! §1.2).
//!
//! **Signal model.** NVML utilization is a duty cycle: the percent of the
//! last sample period (1 s) in which any kernel ran. A replica's value is
//! its busy fraction over the last second times the duty cycle measured at
//! its running batch on an H200 (`data/profiles/h200_nvml_vs_load.csv`,
//! context 512: 85.1% at batch 1, 86.2% at 8, 93.1% at 32, 92.1% at 64,
//! 90.7% at 128, 92.1% at 256), so a replica reads ~85–93% as soon as it
//! runs one request. dcgm-exporter collects every 30 s, Prometheus scrapes
//! it every 15 s, and the HPA reads the newest scraped value. A loading
//! replica's GPU reads 0 (weights are copied, not computed; project choice).

use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::fleet::Lifecycle;
use gpuscale_core::Timestamp;
use gpuscale_policy::hpa::{Behavior, Hpa, Normalization, PodMetric};

/// NVML duty cycle (percent) of a replica decoding a batch of `batch`.
pub(crate) fn nvml_duty_pct(batch: f64) -> f64 {
    const POINTS: [(f64, f64); 6] = [
        (1.0, 85.1),
        (8.0, 86.2),
        (32.0, 93.1),
        (64.0, 92.1),
        (128.0, 90.7),
        (256.0, 92.1),
    ];
    if batch <= POINTS[0].0 {
        return POINTS[0].1;
    }
    for w in POINTS.windows(2) {
        let ((b0, u0), (b1, u1)) = (w[0], w[1]);
        if batch <= b1 {
            let f = (batch.log2() - b0.log2()) / (b1.log2() - b0.log2());
            return u0 + f * (u1 - u0);
        }
    }
    POINTS[POINTS.len() - 1].1
}

#[derive(Debug, Clone, Copy)]
struct PodUtil {
    id: u32,
    /// busy seconds at the previous 1 s sample.
    prev_busy: f64,
    prev_at: f64,
    /// Value of the last dcgm collection.
    dcgm: Option<f64>,
    /// Value Prometheus last scraped.
    scraped: Option<f64>,
}

/// HPA on `DCGM_FI_DEV_GPU_UTIL`.
#[derive(Debug, Clone)]
pub struct HpaGpuUtil {
    target: f64,
    hpa: Hpa,
    pods: Vec<PodUtil>,
    last_collect: i64,
    last_scrape: i64,
}

impl HpaGpuUtil {
    pub fn new(target: f64, min: u32, max: u32) -> Self {
        Self {
            target,
            hpa: Hpa::new(
                min.max(1),
                max,
                Normalization::Behavior(Behavior::hpa_default()),
            ),
            pods: Vec::new(),
            last_collect: -1,
            last_scrape: -1,
        }
    }
}

impl Autoscaler for HpaGpuUtil {
    fn name(&self) -> String {
        "b12-hpa-gpu-util".into()
    }
    fn parameters(&self) -> Value {
        json!({
            "metric": "DCGM_FI_DEV_GPU_UTIL (Pods, AverageValue)",
            "target": self.target,
            "dcgm_collect_s": 30,
            "scrape_s": 15,
            "hpa_sync_s": 15,
            "hpa": self.hpa,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        15.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        // NVML's own 1 s sample period; dcgm and Prometheus are modelled on top.
        Some(1.0)
    }
    fn observe(&mut self, sample: FleetSample) {
        let collect = (sample.at / 30.0).floor() as i64;
        let scrape = (sample.at / 15.0).floor() as i64;
        let do_collect = collect != self.last_collect;
        let do_scrape = scrape != self.last_scrape;
        self.last_collect = collect;
        self.last_scrape = scrape;
        self.pods
            .retain(|p| sample.replicas.iter().any(|r| r.id == p.id));
        for r in &sample.replicas {
            let busy = r.counters.busy_s;
            let idx = match self.pods.iter().position(|p| p.id == r.id) {
                Some(i) => i,
                None => {
                    self.pods.push(PodUtil {
                        id: r.id,
                        prev_busy: busy,
                        prev_at: sample.at,
                        dcgm: None,
                        scraped: None,
                    });
                    self.pods.len() - 1
                }
            };
            let p = &mut self.pods[idx];
            if do_collect {
                let util = if r.state == Lifecycle::Loading {
                    0.0
                } else {
                    let dt = (sample.at - p.prev_at).max(1e-9);
                    let frac = ((busy - p.prev_busy) / dt).clamp(0.0, 1.0);
                    frac * nvml_duty_pct(f64::from(r.running.max(1)))
                };
                p.dcgm = Some(util);
            }
            if do_scrape {
                p.scraped = p.dcgm;
            }
            p.prev_busy = busy;
            p.prev_at = sample.at;
        }
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let mut metrics = Vec::with_capacity(view.pods.len());
        for pod in &view.pods {
            let m = match pod.state {
                Lifecycle::Pending => PodMetric::Unready,
                Lifecycle::Draining | Lifecycle::Gone => continue,
                Lifecycle::Loading | Lifecycle::Ready => {
                    match self
                        .pods
                        .iter()
                        .find(|p| p.id == pod.id)
                        .and_then(|p| p.scraped)
                    {
                        Some(v) => PodMetric::Ready(v),
                        None => PodMetric::Missing,
                    }
                }
            };
            metrics.push(m);
        }
        let current = view.spec_replicas;
        let proposal = self
            .hpa
            .plain_metric_proposal(current, &metrics, self.target);
        let now = Timestamp::from_secs_f64(view.now);
        ScaleCommand::replicas(self.hpa.reconcile(now, current, proposal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duty_cycle_follows_the_h200_measurements() {
        assert!((nvml_duty_pct(1.0) - 85.1).abs() < 1e-9);
        assert!((nvml_duty_pct(32.0) - 93.1).abs() < 1e-9);
        assert!((nvml_duty_pct(1000.0) - 92.1).abs() < 1e-9);
        let mid = nvml_duty_pct(16.0);
        assert!(mid > 86.2 && mid < 93.1);
    }
}
