//! B13: the Knative Pod Autoscaler on concurrency (REFERENCE.md §1.3,
//! §3.2 B13; `knative/serving pkg/autoscaler/scaling/autoscaler.go`).
//!
//! Knative defaults: `containerConcurrency` = the engine's batch limit
//! (project choice), target utilization 70% (`TargetValue = 0.7 ×
//! per-pod total`, the `target` annotation overriding the total), stable
//! window 60 s, panic window 6 s (10%), panic threshold 200%, max scale-up
//! rate 1000, max scale-down rate 2, decisions every 2 s over 1 s buckets
//! (linear averaging), scale to zero on with a 30 s grace, initial scale 1.
//!
//! Signal: total in-flight requests per queue-proxy (engine running +
//! waiting) plus requests held at the activator (router). A queue-proxy
//! reports its concurrency averaged over the reporting period, weighted by
//! time (a request half a second at the pod adds 0.5 to that second), not
//! the count at the instant of the scrape, which misses requests shorter
//! than the scrape interval: it is the increase of the replica's
//! request-seconds since its last scrape over the time between. Pods are
//! sampled as Knative does — all when `N ≤ 3`, else `ceil(N·X / (N + X − 1))`
//! with `X = 1.96²·100/5² ≈ 15.4`, the oldest first — and the sample mean is
//! extrapolated to all ready pods.
//!
//! Decision: `dspc = ceil(S / TargetValue)`, `dppc = ceil(P / TargetValue)`
//! clamped to `[floor(readyN / 2), ceil(1000·readyN)]`; panic when
//! `dppc / readyN ≥ 2`, left after a stable window without it; in panic
//! the desired count is `max(dspc, dppc)` ratcheted (never down). A new
//! autoscaler with more than one ready pod starts in panic at the current count.

use std::collections::VecDeque;

use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};

/// Knative KPA on concurrency.
#[derive(Debug, Clone)]
pub struct KnativeKpa {
    /// Per-pod total (containerConcurrency or the `target` annotation).
    total_per_pod: f64,
    target_utilization: f64,
    min: u32,
    max: u32,
    stable_window_s: f64,
    panic_window_s: f64,
    /// (second, observed total concurrency), one per 1 s scrape.
    buckets: VecDeque<(f64, f64)>,
    panic_since: Option<f64>,
    max_panic_pods: u32,
    started: bool,
    zero_since: Option<f64>,
    /// Each replica's request-seconds and time at its last scrape.
    last_scrape: std::collections::HashMap<u32, (f64, f64)>,
}

impl KnativeKpa {
    pub fn new(total_per_pod: f64, min: u32, max: u32) -> Self {
        Self {
            total_per_pod,
            target_utilization: 0.7,
            min,
            max,
            stable_window_s: 60.0,
            panic_window_s: 6.0,
            buckets: VecDeque::new(),
            panic_since: None,
            max_panic_pods: 0,
            started: false,
            zero_since: None,
            last_scrape: std::collections::HashMap::new(),
        }
    }

    fn target_value(&self) -> f64 {
        (self.total_per_pod * self.target_utilization).max(0.01)
    }

    fn window_avg(&self, now: f64, window: f64) -> Option<f64> {
        let mut sum = 0.0;
        let mut n = 0;
        for &(t, v) in self.buckets.iter().rev() {
            if t <= now - window {
                break;
            }
            sum += v;
            n += 1;
        }
        (n > 0).then(|| sum / f64::from(n))
    }
}

/// Knative's pod sample size for `n` pods (`sample_size.go`).
pub fn sample_size(n: usize) -> usize {
    if n <= 3 {
        return n;
    }
    let x = 1.96f64 * 1.96 * 100.0 / 25.0;
    let nf = n as f64;
    ((nf * x) / (nf + x - 1.0)).ceil() as usize
}

impl Autoscaler for KnativeKpa {
    fn name(&self) -> String {
        "b13-knative-kpa".into()
    }
    fn parameters(&self) -> Value {
        json!({
            "metric": "concurrency",
            "per_pod_total": self.total_per_pod,
            "target_utilization": self.target_utilization,
            "target_value": self.target_value(),
            "stable_window_s": self.stable_window_s,
            "panic_window_s": self.panic_window_s,
            "panic_threshold": 2.0,
            "max_scale_up_rate": 1000,
            "max_scale_down_rate": 2,
            "tick_s": 2,
            "scrape_s": 1,
            "scale_to_zero_grace_s": 30,
            "min_scale": self.min,
            "max_scale": self.max,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        2.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(1.0)
    }
    /// The activator pokes the autoscaler when a revision at zero
    /// receives a request, with its concurrency.
    fn wakes_on_held(&self) -> bool {
        true
    }
    fn observe(&mut self, sample: FleetSample) {
        let last = std::mem::take(&mut self.last_scrape);
        for r in &sample.replicas {
            self.last_scrape
                .insert(r.id, (r.counters.concurrency_s, sample.at));
        }
        // The time-averaged concurrency since the replica's last scrape (the
        // count now at its first).
        let averaged = |r: &crate::fleet::ReplicaSample| match last.get(&r.id) {
            Some(&(c, at)) if sample.at > at => (r.counters.concurrency_s - c) / (sample.at - at),
            _ => f64::from(r.running + r.waiting),
        };
        let mut ready: Vec<(f64, f64)> = sample
            .ready()
            .map(|r| (r.created_at, averaged(r)))
            .collect();
        // Older pods first.
        ready.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = sample_size(ready.len());
        let pods_total = if n == 0 {
            0.0
        } else {
            let mean = ready[..n].iter().map(|x| x.1).sum::<f64>() / n as f64;
            mean * ready.len() as f64
        };
        let total = pods_total + f64::from(sample.router_queue);
        self.buckets.push_back((sample.at, total));
        while self
            .buckets
            .front()
            .is_some_and(|(t, _)| *t <= sample.at - self.stable_window_s)
        {
            self.buckets.pop_front();
        }
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let now = view.now;
        let current = view.spec_replicas;
        if !self.started {
            self.started = true;
            if view.ready > 1 {
                self.panic_since = Some(now);
                self.max_panic_pods = current;
            }
        }
        let (Some(stable), Some(panic)) = (
            self.window_avg(now, self.stable_window_s),
            self.window_avg(now, self.panic_window_s),
        ) else {
            return ScaleCommand::replicas(current);
        };
        let ready_n = f64::from(view.ready.max(1));
        let max_up = (1000.0 * ready_n).ceil();
        let max_down = if view.ready > 0 {
            (ready_n / 2.0).floor()
        } else {
            0.0
        };
        let tv = self.target_value();
        let dspc = (stable / tv).ceil().clamp(max_down, max_up) as u32;
        let dppc = (panic / tv).ceil().clamp(max_down, max_up) as u32;
        let over = f64::from(dppc) / ready_n >= 2.0;
        match self.panic_since {
            None if over => self.panic_since = Some(now),
            Some(_) if over => self.panic_since = Some(now),
            Some(t) if t + self.stable_window_s < now => {
                self.panic_since = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }
        let mut desired = if self.panic_since.is_some() {
            let d = dspc.max(dppc);
            if d > self.max_panic_pods {
                self.max_panic_pods = d;
            }
            self.max_panic_pods
        } else {
            dspc
        };
        desired = desired.min(self.max);
        if desired < self.min {
            desired = self.min;
        }
        // Scale to zero only after the grace period with nothing to do.
        if desired == 0 {
            let since = *self.zero_since.get_or_insert(now);
            if now - since < 30.0 {
                desired = current.min(1);
            }
        } else {
            self.zero_since = None;
        }
        ScaleCommand::replicas(desired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_size_matches_knative() {
        assert_eq!(sample_size(3), 3);
        assert_eq!(sample_size(4), 4);
        assert_eq!(sample_size(20), 9);
        assert_eq!(sample_size(100), 14);
    }

    fn scrape(at: f64, request_seconds: f64) -> FleetSample {
        let counters = crate::fleet::EngineCounters {
            concurrency_s: request_seconds,
            ..Default::default()
        };
        FleetSample {
            at,
            ingress_total: 0,
            router_queue: 0,
            replicas: vec![crate::fleet::ReplicaSample {
                id: 0,
                state: crate::fleet::Lifecycle::Ready,
                created_at: 0.0,
                ready_at: 0.0,
                waiting: 0,
                running: 0,
                queued_prompt_tokens: 0,
                kv_used_tokens: 0.0,
                kv_usage_ratio: 0.0,
                kv_reserved_tokens: 0,
                mean_context_tokens: 0.0,
                batch_limit: 64,
                counters,
            }],
        }
    }

    /// A request shorter than the scrape interval is at the pod at no
    /// scrape instant; the queue-proxy's time-averaged concurrency still
    /// counts it, so the pod is kept a stable window (and the grace) after
    /// it rather than going to zero.
    #[test]
    fn requests_between_scrapes_count_in_the_averaged_concurrency() {
        let run = |short_request_at: Option<u32>| -> u32 {
            let mut k = KnativeKpa::new(64.0, 0, 4);
            let mut request_seconds = 0.0;
            let mut last = 1;
            for s in 0..=100u32 {
                if Some(s) == short_request_at {
                    request_seconds += 0.4;
                }
                k.observe(scrape(f64::from(s), request_seconds));
                if s % 2 == 0 {
                    let view = ClusterView {
                        now: f64::from(s),
                        spec_replicas: last,
                        pending: 0,
                        loading: 0,
                        ready: last,
                        draining: 0,
                        pods: vec![],
                    };
                    last = k.decide(&view).replicas;
                }
            }
            last
        };
        assert_eq!(run(None), 0, "idle for 100 s: scaled to zero");
        assert_eq!(run(Some(50)), 1, "a 0.4 s request at 50 s keeps the pod");
    }
}
