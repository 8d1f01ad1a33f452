//! B4: AIBrix KPA and APA on KV-cache use (`vllm-project/aibrix`
//! @e3e10f9e `pkg/controller/podautoscaler/`; REFERENCE.md §2.4, §3.2 B4).
//!
//! Parameters: metric `vllm:kv_cache_usage_perc`, target 0.5, stable window
//! 180 s, panic window 60 s, panic threshold 2.0, tolerance 0.1 both ways,
//! max scale-up and scale-down rate 2, up cooldown 0 s, down 300 s,
//! controller tick 10 s; the controller scrapes every pod's `/metrics`
//! itself at each tick. `min` 1; `max` the pool maximum (the samples use 8).
//!
//! Signal: `m` = the arithmetic mean over pods with metrics, recorded every
//! tick; `stable` and `panic` are the averages of `m` over their windows.
//!
//! * **KPA**: panic iff `stable ≤ 0` or `panic/stable > 2` (left after a
//!   stable window without it); `dspc = ceil(stable/target)` unless within
//!   10% of the target (then `N`), `dppc` likewise from `panic`; both
//!   clamped to `[floor(N/2), max(1, ceil(2N))]`; in panic
//!   `max(dspc, dppc)` ratcheted. Two semantic variants, labelled:
//!   **mean** (as coded: the per-pod mean feeds the Knative-style formula,
//!   so the result does not grow with the pod count) and **total**
//!   (Knative semantics: the sum over pods divided by the per-pod target).
//! * **APA**: `r = m/target`; `r > 1.1 → min(ceil(N·r), ceil(2N))`;
//!   `r < 0.9 → max(ceil(N·r), floor(N/2))`; else `N`.
//!
//! Stabilisation (both): every recommendation is stored; above `N` the max
//! within the 0 s up window (immediate); below `N` the **min** within the
//! 300 s down window; clamp to `[min, max]`. `N` is `spec.replicas`.

use std::collections::VecDeque;

use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};

/// Which AIBrix algorithm and semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AibrixVariant {
    KpaMean,
    KpaTotal,
    Apa,
}

/// AIBrix PodAutoscaler on KV-cache use.
#[derive(Debug, Clone)]
pub struct Aibrix {
    variant: AibrixVariant,
    target: f64,
    min: u32,
    max: u32,
    /// (time, mean KV use, total KV use).
    history: VecDeque<(f64, f64, f64)>,
    recommendations: VecDeque<(f64, u32)>,
    panic_since: Option<f64>,
    max_panic_pods: u32,
}

const STABLE_S: f64 = 180.0;
const PANIC_S: f64 = 60.0;
const DOWN_WINDOW_S: f64 = 300.0;

impl Aibrix {
    pub fn new(variant: AibrixVariant, target: f64, min: u32, max: u32) -> Self {
        Self {
            variant,
            target,
            min: min.max(1),
            max,
            history: VecDeque::new(),
            recommendations: VecDeque::new(),
            panic_since: None,
            max_panic_pods: 0,
        }
    }

    fn avg(&self, now: f64, window: f64, total: bool) -> Option<f64> {
        let mut s = 0.0;
        let mut n = 0;
        for &(t, mean, tot) in self.history.iter().rev() {
            if t <= now - window {
                break;
            }
            s += if total { tot } else { mean };
            n += 1;
        }
        (n > 0).then(|| s / f64::from(n))
    }

    fn kpa(&mut self, now: f64, n: u32, total: bool) -> Option<u32> {
        let stable = self.avg(now, STABLE_S, total)?;
        let panic = self.avg(now, PANIC_S, total)?;
        let nf = f64::from(n);
        let per_pod = |v: f64| if total { v / nf.max(1.0) } else { v };
        let within = |v: f64| {
            let r = per_pod(v) / self.target;
            (0.9..=1.1).contains(&r)
        };
        let max_up = (2.0 * nf).ceil().max(1.0);
        let max_down = (nf / 2.0).floor();
        let dspc = if within(stable) {
            nf
        } else {
            (stable / self.target).ceil()
        }
        .clamp(max_down, max_up) as u32;
        let dppc = if within(panic) {
            nf
        } else {
            (panic / self.target).ceil()
        }
        .clamp(max_down, max_up) as u32;
        let over = stable <= 0.0 || panic / stable > 2.0;
        match self.panic_since {
            _ if over => self.panic_since = Some(now),
            Some(t) if t + STABLE_S < now => {
                self.panic_since = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }
        Some(if self.panic_since.is_some() {
            let d = dspc.max(dppc);
            self.max_panic_pods = self.max_panic_pods.max(d);
            self.max_panic_pods
        } else {
            dspc
        })
    }

    fn apa(&self, n: u32) -> Option<u32> {
        let &(_, m, _) = self.history.back()?;
        let r = m / self.target;
        let nf = f64::from(n);
        Some(if r > 1.1 {
            (nf * r).ceil().min((2.0 * nf).ceil()) as u32
        } else if r < 0.9 {
            (nf * r).ceil().max((nf / 2.0).floor()) as u32
        } else {
            n
        })
    }
}

impl Autoscaler for Aibrix {
    fn name(&self) -> String {
        match self.variant {
            AibrixVariant::KpaMean => "b4-aibrix-kpa-mean",
            AibrixVariant::KpaTotal => "b4-aibrix-kpa-total",
            AibrixVariant::Apa => "b4-aibrix-apa",
        }
        .into()
    }
    fn parameters(&self) -> Value {
        json!({
            "metric": "vllm:kv_cache_usage_perc",
            "target": self.target,
            "stable_window_s": STABLE_S,
            "panic_window_s": PANIC_S,
            "panic_threshold": 2.0,
            "tolerance": 0.1,
            "max_scale_up_rate": 2,
            "max_scale_down_rate": 2,
            "scale_up_cooldown_s": 0,
            "scale_down_cooldown_s": DOWN_WINDOW_S,
            "tick_s": 10,
            "min": self.min,
            "max": self.max,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        10.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(10.0)
    }
    fn observe(&mut self, sample: FleetSample) {
        let vals: Vec<f64> = sample.ready().map(|r| r.kv_usage_ratio).collect();
        if vals.is_empty() {
            return;
        }
        let total: f64 = vals.iter().sum();
        self.history
            .push_back((sample.at, total / vals.len() as f64, total));
        while self
            .history
            .front()
            .is_some_and(|(t, _, _)| *t <= sample.at - STABLE_S)
        {
            self.history.pop_front();
        }
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let now = view.now;
        let n = view.spec_replicas;
        let rec = match self.variant {
            AibrixVariant::KpaMean => self.kpa(now, n, false),
            AibrixVariant::KpaTotal => self.kpa(now, n, true),
            AibrixVariant::Apa => self.apa(n),
        };
        let Some(rec) = rec else {
            return ScaleCommand::replicas(n);
        };
        self.recommendations
            .retain(|(t, _)| *t > now - DOWN_WINDOW_S);
        self.recommendations.push_back((now, rec));
        let desired = if rec > n {
            rec
        } else if rec < n {
            self.recommendations
                .iter()
                .map(|(_, r)| *r)
                .min()
                .unwrap_or(rec)
        } else {
            n
        };
        ScaleCommand::replicas(desired.clamp(self.min, self.max.max(self.min)))
    }
}
