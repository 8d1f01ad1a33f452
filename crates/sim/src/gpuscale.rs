//! gpuscale's own policy in the simulator: the unchanged
//! [`gpuscale_policy::Policy`], fed the [`Observation`] the real scaler
//! would build.
//!
//! **What it sees.** The node agent samples every engine each second and
//! streams cumulative counters and histograms; the scaler keeps short
//! windows. So each decision (every 2 s by default) gets: the replica counts
//! Kubernetes shows (no lag); the newest agent sample (half a stream
//! interval old); the arrival rate from the engines' request counters over
//! the last 5 s (plus requests held at the router); token rates over the same
//! window; request sizes from the completions of the last 60 s; TTFT and
//! ITL histograms as the bucket deltas of the last 30 s; per-replica gauges
//! for victim choice and model refinement. Missing values stay `None`.
//!
//! Simulated time `t` seconds maps to `Timestamp` `SIM_EPOCH + t`
//! (2024-01-01T00:00:00Z, a Monday), so schedules and the forecaster see
//! real calendar time.

use std::collections::VecDeque;

use gpuscale_core::Timestamp;
use gpuscale_core::histogram::{ITL_BOUNDS_SECONDS, TPOT_BOUNDS_SECONDS, TTFT_BOUNDS_SECONDS};
use gpuscale_policy::{
    Action, Decision, LatencyObservation, LoadObservation, Observation, PerfModel, Policy,
    ReplicaCounts, ReplicaObservation, ReplicaState, Source, WorkloadSpec,
};
use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::error::SimError;
use crate::fleet::{
    ITL_BUCKETS, Lifecycle, ReplicaSample, TPOT_BUCKETS, TTFT_BUCKETS, VictimOrder,
};
use crate::prometheus::histogram_from_counts;

/// 2024-01-01T00:00:00Z in milliseconds: simulated time zero.
pub const SIM_EPOCH_MS: i64 = 1_704_067_200_000;

/// How the simulated scaler feeds the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuscaleOptions {
    /// Seconds between decisions.
    pub decision_interval_s: f64,
    /// Agent stream interval, seconds.
    pub stream_interval_s: f64,
    /// Window of rates (arrivals, tokens), seconds.
    pub rate_window_s: f64,
    /// Window of latency histograms, seconds.
    pub latency_window_s: f64,
    /// Window of request sizes (completions), seconds.
    pub size_window_s: f64,
    /// Keep a JSON line per decision that changes the replica count or the
    /// batch limit (and one per minute otherwise), for `--decision-log`.
    pub record_decisions: bool,
}

impl Default for GpuscaleOptions {
    fn default() -> Self {
        Self {
            decision_interval_s: 2.0,
            stream_interval_s: 1.0,
            rate_window_s: 5.0,
            latency_window_s: 30.0,
            size_window_s: 60.0,
            record_decisions: false,
        }
    }
}

/// gpuscale's policy behind the simulator's [`Autoscaler`] contract.
#[derive(Debug)]
pub struct GpuscaleAutoscaler {
    policy: Policy,
    spec: WorkloadSpec,
    opts: GpuscaleOptions,
    samples: VecDeque<FleetSample>,
    decisions: u64,
    wins: [u64; Source::ALL.len()],
    last: Option<Decision>,
    log: Vec<String>,
    last_logged_at: f64,
}

impl GpuscaleAutoscaler {
    /// The policy for `spec`, sizing with `model`.
    pub fn new(
        spec: WorkloadSpec,
        model: PerfModel,
        opts: GpuscaleOptions,
    ) -> Result<Self, SimError> {
        let config = spec
            .validate()
            .map_err(|e| SimError::PolicySpec(e.to_string()))?;
        Ok(Self {
            policy: Policy::new(config, model),
            spec,
            opts,
            samples: VecDeque::new(),
            decisions: 0,
            wins: [0; Source::ALL.len()],
            last: None,
            log: Vec::new(),
            last_logged_at: f64::NEG_INFINITY,
        })
    }

    /// The last decision, if any.
    pub fn last_decision(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// The newest sample at or before `t − window` (or the oldest one kept).
    fn sample_before(&self, t: f64) -> Option<&FleetSample> {
        let mut best = self.samples.front()?;
        for s in &self.samples {
            if s.at <= t + 1e-9 {
                best = s;
            } else {
                break;
            }
        }
        Some(best)
    }

    /// The observation the scaler would hand the policy at `view.now`.
    pub fn observation(&self, view: &ClusterView) -> Observation {
        let mut obs = Observation::empty();
        obs.replicas = ReplicaCounts {
            current: view.spec_replicas,
            ready: view.ready,
            pending: view.pending,
            loading: view.loading,
            draining: view.draining,
        };
        let Some(newest) = self.samples.back() else {
            obs.replica_samples = pods_without_metrics(view);
            return obs;
        };
        obs.telemetry_at = Some(ts(newest.at));
        let rate_old = self.sample_before(newest.at - self.opts.rate_window_s);
        let lat_old = self.sample_before(newest.at - self.opts.latency_window_s);
        let size_old = self.sample_before(newest.at - self.opts.size_window_s);

        // Rates over the short window.
        let mut load = LoadObservation::default();
        if let Some(old) = rate_old.filter(|o| o.at < newest.at) {
            let dt = newest.at - old.at;
            let received = counter_delta(old, newest, |r| r.counters.received as f64);
            let held = f64::from(newest.router_queue) - f64::from(old.router_queue);
            load.arrival_rate_rps = Some(((received + held) / dt).max(0.0));
            load.generation_tokens_per_second =
                Some(counter_delta(old, newest, |r| r.counters.generation_tokens as f64) / dt);
            load.prompt_tokens_per_second =
                Some(counter_delta(old, newest, |r| r.counters.prompt_tokens as f64) / dt);
        }
        if let Some(old) = size_old.filter(|o| o.at < newest.at) {
            let done = counter_delta(old, newest, |r| r.counters.success as f64);
            if done > 0.0 {
                load.mean_input_tokens = Some(
                    counter_delta(old, newest, |r| r.counters.completed_prompt_tokens as f64)
                        / done,
                );
                load.mean_output_tokens = Some(
                    counter_delta(old, newest, |r| r.counters.completed_output_tokens as f64)
                        / done,
                );
            }
        }
        let serving: Vec<&ReplicaSample> = newest.serving().collect();
        let ready: Vec<&ReplicaSample> = newest.ready().collect();
        load.requests_waiting = Some(
            serving.iter().map(|r| f64::from(r.waiting)).sum::<f64>()
                + f64::from(newest.router_queue),
        );
        load.queued_prompt_tokens =
            Some(serving.iter().map(|r| r.queued_prompt_tokens as f64).sum());
        let running: f64 = serving.iter().map(|r| f64::from(r.running)).sum();
        load.requests_running = Some(running);
        if !ready.is_empty() {
            load.kv_cache_usage_ratio =
                Some(ready.iter().map(|r| r.kv_usage_ratio).sum::<f64>() / ready.len() as f64);
        }
        if running > 0.0 {
            load.mean_context_tokens =
                Some(serving.iter().map(|r| r.kv_used_tokens).sum::<f64>() / running);
        }
        obs.load = load;

        // Latency histograms over the latency window.
        if let Some(old) = lat_old.filter(|o| o.at < newest.at) {
            let mut ttft = [0u64; TTFT_BUCKETS];
            let mut itl = [0u64; ITL_BUCKETS];
            let mut tpot = [0u64; TPOT_BUCKETS];
            let (mut ttft_sum, mut itl_sum, mut tpot_sum) = (0.0, 0.0, 0.0);
            for r in &newest.replicas {
                let base = old.replica(r.id).map(|o| &o.counters);
                for (i, c) in r.counters.ttft_buckets.iter().enumerate() {
                    ttft[i] += c.saturating_sub(base.map_or(0, |b| b.ttft_buckets[i]));
                }
                for (i, c) in r.counters.itl_buckets.iter().enumerate() {
                    itl[i] += c.saturating_sub(base.map_or(0, |b| b.itl_buckets[i]));
                }
                for (i, c) in r.counters.tpot_buckets.iter().enumerate() {
                    tpot[i] += c.saturating_sub(base.map_or(0, |b| b.tpot_buckets[i]));
                }
                tpot_sum += r.counters.tpot_sum - base.map_or(0.0, |b| b.tpot_sum);
                ttft_sum += r.counters.ttft_sum - base.map_or(0.0, |b| b.ttft_sum);
                itl_sum += r.counters.itl_sum - base.map_or(0.0, |b| b.itl_sum);
            }
            obs.latency = LatencyObservation {
                ttft_seconds: histogram_from_counts(TTFT_BOUNDS_SECONDS, &ttft, ttft_sum),
                itl_seconds: histogram_from_counts(ITL_BOUNDS_SECONDS, &itl, itl_sum),
                tpot_seconds: histogram_from_counts(TPOT_BOUNDS_SECONDS, &tpot, tpot_sum),
            };
        }

        // Per replica.
        let mut per = Vec::with_capacity(view.pods.len());
        for pod in &view.pods {
            let state = match pod.state {
                Lifecycle::Pending => ReplicaState::Pending,
                Lifecycle::Loading => ReplicaState::Loading,
                Lifecycle::Ready => ReplicaState::Ready,
                Lifecycle::Draining => ReplicaState::Draining,
                Lifecycle::Gone => continue,
            };
            let mut o = ReplicaObservation {
                id: replica_name(pod.id),
                state,
                protected: false,
                created_at: Some(ts(pod.created_at)),
                requests_running: None,
                requests_waiting: None,
                kv_cache_usage_ratio: None,
                mean_context_tokens: None,
                itl_mean_seconds: None,
                generation_tokens_per_second: None,
                batch_limit: None,
            };
            if let Some(r) = newest
                .replica(pod.id)
                .filter(|r| matches!(r.state, Lifecycle::Ready | Lifecycle::Draining))
            {
                o.requests_running = Some(f64::from(r.running));
                o.requests_waiting = Some(f64::from(r.waiting));
                o.kv_cache_usage_ratio = Some(r.kv_usage_ratio);
                o.mean_context_tokens = (r.running > 0).then_some(r.mean_context_tokens);
                o.batch_limit = Some(r.batch_limit);
                if let Some(b) = lat_old.and_then(|s| s.replica(pod.id)) {
                    let n: u64 = r
                        .counters
                        .itl_buckets
                        .iter()
                        .sum::<u64>()
                        .saturating_sub(b.counters.itl_buckets.iter().sum::<u64>());
                    if n > 0 {
                        o.itl_mean_seconds =
                            Some((r.counters.itl_sum - b.counters.itl_sum) / n as f64);
                    }
                }
                if let Some(old) = rate_old.filter(|o| o.at < newest.at)
                    && let Some(b) = old.replica(pod.id)
                {
                    o.generation_tokens_per_second = Some(
                        r.counters
                            .generation_tokens
                            .saturating_sub(b.counters.generation_tokens)
                            as f64
                            / (newest.at - old.at),
                    );
                }
            }
            per.push(o);
        }
        obs.replica_samples = per;
        obs
    }
}

/// The spec the simulator gives gpuscale when none is supplied: every
/// default, the run's SLOs and bounds, the fleet's cold start and the
/// profile as the performance-model preset.
pub fn default_spec(
    preset: &str,
    slo: &crate::stats::Slo,
    min: u32,
    max: u32,
    cold_start_s: f64,
    gpus_per_replica: u32,
) -> WorkloadSpec {
    let mut spec = WorkloadSpec::new("simulated", max, preset);
    spec.min_replicas = min;
    spec.slo.ttft.threshold_seconds = slo.ttft_s;
    spec.slo.ttft.percentile = slo.percentile;
    spec.slo.itl.threshold_seconds = slo.itl_s;
    spec.slo.itl.percentile = slo.percentile;
    spec.cold_start_seconds = cold_start_s;
    spec.gpus_per_replica = gpus_per_replica;
    spec
}

fn ts(t: f64) -> Timestamp {
    Timestamp::from_millis(SIM_EPOCH_MS + (t * 1000.0).round() as i64)
}

/// The pod name the policy sees for replica `id`.
pub fn replica_name(id: u32) -> String {
    format!("r{id}")
}

fn pods_without_metrics(view: &ClusterView) -> Vec<ReplicaObservation> {
    view.pods
        .iter()
        .filter_map(|pod| {
            let state = match pod.state {
                Lifecycle::Pending => ReplicaState::Pending,
                Lifecycle::Loading => ReplicaState::Loading,
                Lifecycle::Ready => ReplicaState::Ready,
                Lifecycle::Draining => ReplicaState::Draining,
                Lifecycle::Gone => return None,
            };
            Some(ReplicaObservation {
                id: replica_name(pod.id),
                state,
                protected: false,
                created_at: Some(ts(pod.created_at)),
                requests_running: None,
                requests_waiting: None,
                kv_cache_usage_ratio: None,
                mean_context_tokens: None,
                itl_mean_seconds: None,
                generation_tokens_per_second: None,
                batch_limit: None,
            })
        })
        .collect()
}

/// `Σ (f(new) − f(old))` over replicas in `new` (0 for replicas new since `old`).
fn counter_delta(old: &FleetSample, new: &FleetSample, f: impl Fn(&ReplicaSample) -> f64) -> f64 {
    new.replicas
        .iter()
        .map(|r| f(r) - old.replica(r.id).map_or(0.0, &f))
        .sum::<f64>()
        .max(0.0)
}

impl Autoscaler for GpuscaleAutoscaler {
    fn name(&self) -> String {
        "gpuscale".into()
    }
    fn parameters(&self) -> Value {
        let wins: serde_json::Map<String, Value> = Source::ALL
            .iter()
            .zip(self.wins)
            .map(|(n, w)| (n.as_str().to_string(), json!(w)))
            .collect();
        json!({
            "spec": self.spec,
            "decision_interval_s": self.opts.decision_interval_s,
            "stream_interval_s": self.opts.stream_interval_s,
            "rate_window_s": self.opts.rate_window_s,
            "latency_window_s": self.opts.latency_window_s,
            "size_window_s": self.opts.size_window_s,
            "decisions": self.decisions,
            "decisions_won_by": wins,
            "last_decision": self.last.as_ref().map(Decision::summary),
        })
    }
    fn decision_interval_s(&self) -> f64 {
        self.opts.decision_interval_s
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(self.opts.stream_interval_s)
    }
    fn drain_grace_s(&self) -> Option<f64> {
        None
    }
    fn victim_order(&self) -> VictimOrder {
        VictimOrder::LeastWork
    }
    fn observe(&mut self, sample: FleetSample) {
        let keep = self
            .opts
            .latency_window_s
            .max(self.opts.size_window_s)
            .max(self.opts.rate_window_s)
            + 2.0 * self.opts.stream_interval_s;
        let cutoff = sample.at - keep;
        self.samples.push_back(sample);
        while self.samples.front().is_some_and(|s| s.at < cutoff) {
            self.samples.pop_front();
        }
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let obs = self.observation(view);
        let d = self.policy.decide(ts(view.now), &obs);
        self.decisions += 1;
        self.wins[d.winner.index()] += 1;
        let cmd = if d.advisory {
            ScaleCommand::replicas(view.spec_replicas)
        } else {
            ScaleCommand {
                replicas: match d.action {
                    Action::Hold => view.spec_replicas,
                    Action::ScaleUp | Action::ScaleDown => d.desired_replicas,
                },
                batch_limit: d.batch_limit,
                victims: d
                    .victims
                    .iter()
                    .filter_map(|v| v.strip_prefix('r').and_then(|n| n.parse().ok()))
                    .collect(),
            }
        };
        if self.opts.record_decisions {
            let changed = cmd.replicas != view.spec_replicas
                || self.last.as_ref().and_then(|l| l.batch_limit) != d.batch_limit;
            if changed || view.now - self.last_logged_at >= 60.0 {
                self.last_logged_at = view.now;
                self.log.push(
                    json!({
                        "t_s": view.now,
                        "ready": view.ready,
                        "in_flight": view.pending + view.loading,
                        "current": view.spec_replicas,
                        "desired": cmd.replicas,
                        "batch_limit": d.batch_limit,
                        "winner": d.winner.as_str(),
                        "summary": d.summary(),
                        "inputs": d.inputs,
                    })
                    .to_string(),
                );
            }
        }
        self.last = Some(d);
        cmd
    }
    fn take_decision_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }
}
