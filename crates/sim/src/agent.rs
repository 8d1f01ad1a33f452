//! What production would publish about a simulated replica: the engine
//! sample a node agent streams for its pod, and the scale target as the
//! Kubernetes actuator sees it.
//!
//! The simulator's engines are vLLM-like engines behind gpuscale's request
//! proxy (the proxy enforces the batch limit and measures every request), so
//! a replica's sample carries what the two export together: the running
//! batch, the queue (at the proxy, beyond the batch limit), KV-cache use,
//! cumulative token and request counters (arrivals counted by the proxy),
//! and request-level TTFT and TPOT histograms beside the token-level ITL
//! histogram. A loading engine answers no metrics: only its state. Pending
//! pods have no engine yet (no GPU), so no agent reports them.
//!
//! The simulator ([`crate::gpuscale`]) and the demo (real agents streaming
//! simulated engines) both publish through here.

use gpuscale_core::histogram::{ITL_BOUNDS_SECONDS, TPOT_BOUNDS_SECONDS, TTFT_BOUNDS_SECONDS};
use gpuscale_core::sample::{EngineSample, EngineState, Framework};
use gpuscale_core::{Histogram, PodRef, Timestamp};
use gpuscale_observe::{ClusterReplica, TargetObservation};
use gpuscale_policy::ReplicaState;

use crate::autoscaler::ClusterView;
use crate::fleet::{EngineCounters, Lifecycle, ReplicaSample};

/// 2024-01-01T00:00:00Z in milliseconds: simulated time zero.
pub const SIM_EPOCH_MS: i64 = 1_704_067_200_000;

/// The namespace of simulated pods.
pub(crate) const SIM_NAMESPACE: &str = "sim";

/// Simulated time `t` seconds as a [`Timestamp`] (`SIM_EPOCH_MS + t`), so
/// schedules and the forecaster see real calendar time (a Monday).
pub fn sim_time(t: f64) -> Timestamp {
    Timestamp::from_millis(SIM_EPOCH_MS + (t * 1000.0).round() as i64)
}

/// The pod name of replica `id`.
pub fn replica_name(id: u32) -> String {
    format!("r{id}")
}

/// The replica id of a pod name made by [`replica_name`].
pub(crate) fn replica_id(name: &str) -> Option<u32> {
    name.strip_prefix('r').and_then(|n| n.parse().ok())
}

/// The pod of replica `id`.
pub fn replica_pod(id: u32) -> PodRef {
    PodRef::new(SIM_NAMESPACE, replica_name(id))
}

/// The engine state an agent reports for a replica in `state`; `None` for a
/// replica no agent sees (pending: no GPU yet; gone).
pub fn engine_state(state: Lifecycle) -> Option<EngineState> {
    match state {
        Lifecycle::Pending | Lifecycle::Gone => None,
        Lifecycle::Loading => Some(EngineState::Loading),
        Lifecycle::Ready => Some(EngineState::Warm),
        Lifecycle::Draining => Some(EngineState::Draining),
    }
}

/// The engine sample an agent publishes for `pod` in `state`: gauges from
/// `sample` (zero without one: the replica is gone and the engine idle),
/// cumulative series from `totals` (the engine's counters since the pod
/// started). A loading engine serves no metrics.
pub fn engine_sample(
    pod: PodRef,
    model: &str,
    state: EngineState,
    sample: Option<&ReplicaSample>,
    totals: &EngineCounters,
    kv_capacity_tokens: f64,
    at: Timestamp,
) -> EngineSample {
    let mut e = EngineSample::empty(pod, Framework::Fake, model, at);
    e.container = "vllm".into();
    e.state = state;
    if state == EngineState::Loading {
        return e;
    }
    e.requests_waiting = Some(sample.map_or(0.0, |s| f64::from(s.waiting)));
    e.requests_running = Some(sample.map_or(0.0, |s| f64::from(s.running)));
    e.queued_prompt_tokens = Some(sample.map_or(0.0, |s| s.queued_prompt_tokens as f64));
    e.kv_cache_usage_ratio = Some(sample.map_or(0.0, |s| s.kv_usage_ratio.clamp(0.0, 1.0)));
    e.kv_capacity_tokens = Some(kv_capacity_tokens);
    e.mean_context_tokens = sample
        .filter(|s| s.running > 0)
        .map(|s| s.mean_context_tokens);
    e.batch_limit = sample.map(|s| s.batch_limit);
    e.prompt_tokens_total = Some(totals.prompt_tokens as f64);
    e.generation_tokens_total = Some(totals.generation_tokens as f64);
    e.requests_arrived_total = Some(totals.received as f64);
    e.requests_finished_total = Some((totals.success + totals.aborted) as f64);
    e.preemptions_total = Some(0.0);
    e.ttft_seconds = histogram(TTFT_BOUNDS_SECONDS, &totals.ttft_buckets, totals.ttft_sum);
    e.itl_seconds = histogram(ITL_BOUNDS_SECONDS, &totals.itl_buckets, totals.itl_sum);
    e.tpot_seconds = histogram(TPOT_BOUNDS_SECONDS, &totals.tpot_buckets, totals.tpot_sum);
    e
}

/// Bucket counts (the last one `+Inf`) as a cumulative histogram.
pub fn histogram(bounds: &[f64], counts: &[u64], sum: f64) -> Option<Histogram> {
    let mut all = Vec::with_capacity(bounds.len() + 1);
    all.extend_from_slice(bounds);
    all.push(f64::INFINITY);
    let mut acc = 0u64;
    let cumulative: Vec<u64> = counts
        .iter()
        .map(|c| {
            acc += c;
            acc
        })
        .collect();
    Histogram::from_parts(all, cumulative, sum.max(0.0), acc).ok()
}

/// The scale target as the Kubernetes actuator observes it: every pod of
/// the target with its state (a pod is ready only once its engine is warm:
/// the readiness gate), and the count to decide from, `spec.replicas` less
/// the pods on their way out (the simulator's `spec_replicas` already
/// excludes draining pods).
pub fn target_observation(view: &ClusterView) -> TargetObservation {
    let replicas = view
        .pods
        .iter()
        .filter_map(|p| {
            let state = match p.state {
                Lifecycle::Pending => ReplicaState::Pending,
                Lifecycle::Loading => ReplicaState::Loading,
                Lifecycle::Ready => ReplicaState::Ready,
                Lifecycle::Draining => ReplicaState::Draining,
                Lifecycle::Gone => return None,
            };
            Some(ClusterReplica {
                pod: replica_pod(p.id),
                state,
                protected: false,
                created_at: Some(sim_time(p.created_at)),
            })
        })
        .collect();
    TargetObservation {
        current: Some(view.spec_replicas),
        replicas: Some(replicas),
    }
}
