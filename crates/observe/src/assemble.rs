//! From engines' windows and the scale target to what the policy sees of
//! one workload.
//!
//! Pure. [`assemble`] builds the [`Observation`] from the engines of a
//! workload (standalone: the engines are its replicas); [`assemble_target`]
//! from the target's replicas as the cluster sees them (Kubernetes: a pod
//! counts as ready only when its readiness gate is True) with their engines
//! wherever an agent reports them. Both the scaler and the simulator build
//! every observation through here.
//!
//! * **replicas**: engines by state — `Warm` is ready (capacity), `Loading`
//!   (and `Unknown`) is loading, `Draining` is draining; `Failed` engines are
//!   not replicas. Pending pods are invisible to agents (no GPU yet), so
//!   `pending` is 0 in [`assemble`]; the target knows better. A ready
//!   replica whose engine's GPU is unhealthy ([`EngineInput::gpu_fault`]) is
//!   `unhealthy`, not ready: not capacity, and the first scale-in victim.
//! * **arrival rate**: per engine, the arrival counter's rate when exported,
//!   else finished requests per second plus the growth of requests in the
//!   engine (waiting + running) over the window; summed over engines.
//!   Under overload completions stall while the queue grows: the growth term
//!   is what keeps the offered load visible.
//! * **request shape**: prompt tokens per request and generated tokens per
//!   finished request, from the window rates.
//! * **latencies**: the window's TTFT, ITL and TPOT observations, merged
//!   over the workload's engines.
//! * **telemetry_at**: the newest time an engine's state was confirmed.
//!
//! A value no engine exports stays `None`; it is never read as zero.

use std::collections::HashMap;

use gpuscale_core::sample::{EngineSample, EngineState};
use gpuscale_core::{PodRef, Timestamp};
use gpuscale_policy::{
    LatencyObservation, LoadObservation, Observation, ReplicaCounts, ReplicaObservation,
    ReplicaState,
};

use crate::engine::{EngineWindowStats, add, merge};
use crate::target::{ClusterReplica, TargetObservation};

/// One engine as the observation reads it: its latest sample, when an agent
/// last confirmed it, and its window.
#[derive(Debug, Clone, Copy)]
pub struct EngineInput<'a> {
    pub sample: &'a EngineSample,
    pub seen_at: Timestamp,
    pub window: &'a EngineWindowStats,
    /// Why a GPU the engine's pod holds is unhealthy (Xid 48/79, lost), as
    /// its agent reports the GPU; `None`: none is known to be.
    pub gpu_fault: Option<&'a str>,
}

/// The observation of a workload whose replicas are `engines` (standalone:
/// no cluster to ask), with the target's count `current` (`None`: count the
/// engines).
pub fn assemble<'a>(
    engines: impl IntoIterator<Item = EngineInput<'a>>,
    current: Option<u32>,
) -> Observation {
    let members: Vec<Member<'a>> = engines
        .into_iter()
        .filter_map(|e| {
            let state = match e.sample.state {
                EngineState::Warm => ReplicaState::Ready,
                EngineState::Loading | EngineState::Unknown => ReplicaState::Loading,
                EngineState::Draining => ReplicaState::Draining,
                // Nobody can see what a no-data engine serves: not capacity.
                EngineState::Failed | EngineState::NoData => return None,
            };
            Some(Member {
                id: &e.sample.pod.name,
                state,
                protected: false,
                created_at: None,
                engine: Some(e),
            })
        })
        .collect();
    build(members, current)
}

/// The observation of a workload whose actuator knows the target: with
/// `target.replicas`, the replicas are exactly those (their state from the
/// cluster: a pod counts as ready only when the cluster says so, e.g. its
/// readiness gate is True), and their engines (`engine_of`), wherever an
/// agent reports them, give the load and latencies; without, as
/// [`assemble`] over `engines`.
///
/// A ready replica whose engine no agent reports, or whose window has no
/// arrival rate yet (its agent is not connected, or only just reconnected,
/// e.g. after a change of scaler leader), makes the load incomplete:
/// `telemetry_at` is then `None`, so the policy holds rather than size the
/// fleet from part of it.
pub fn assemble_target<'a>(
    engines: impl IntoIterator<Item = EngineInput<'a>>,
    target: &'a TargetObservation,
) -> Observation {
    let Some(replicas) = &target.replicas else {
        return assemble(engines, target.current);
    };
    let by_pod: HashMap<&PodRef, EngineInput<'a>> =
        engines.into_iter().map(|e| (&e.sample.pod, e)).collect();
    assemble_replicas(replicas, |pod| by_pod.get(pod).copied(), target.current)
}

/// [`assemble_target`] for known replicas, with a lookup of each pod's engine.
pub fn assemble_replicas<'a>(
    replicas: &'a [ClusterReplica],
    engine_of: impl Fn(&PodRef) -> Option<EngineInput<'a>>,
    current: Option<u32>,
) -> Observation {
    let members: Vec<Member<'a>> = replicas
        .iter()
        .map(|r| Member {
            id: &r.pod.name,
            state: r.state,
            protected: r.protected,
            created_at: r.created_at,
            engine: engine_of(&r.pod)
                .filter(|e| !matches!(e.sample.state, EngineState::Failed | EngineState::NoData)),
        })
        .collect();
    let incomplete = members.iter().any(|m| {
        m.state == ReplicaState::Ready && m.engine.is_none_or(|e| e.window.arrival_rate().is_none())
    });
    let mut observation = build(members, current);
    if incomplete {
        observation.telemetry_at = None;
    }
    observation
}

/// One replica of the workload, with its engine when an agent reports it.
struct Member<'a> {
    id: &'a str,
    state: ReplicaState,
    protected: bool,
    created_at: Option<Timestamp>,
    engine: Option<EngineInput<'a>>,
}

fn build(members: Vec<Member<'_>>, current: Option<u32>) -> Observation {
    let mut replicas = ReplicaCounts::default();
    let mut load = LoadObservation::default();
    let mut latency = LatencyObservation::default();
    let mut telemetry_at: Option<Timestamp> = None;
    let mut replica_samples = Vec::with_capacity(members.len());
    let mut finished_rate: Option<f64> = None;
    let mut kv_sum = 0.0;
    let mut kv_n = 0u32;
    let mut context_weighted = 0.0;
    let mut context_weight = 0.0;
    // Prompt tokens and first tokens over the window, from engines that
    // export both (`None` once one exports prompt tokens without TTFT).
    let mut prefilled: Option<(f64, f64)> = Some((0.0, 0.0));

    for m in &members {
        let state = m.state;
        let gpu_fault = m.engine.and_then(|e| e.gpu_fault);
        match state {
            ReplicaState::Ready if gpu_fault.is_some() => replicas.unhealthy += 1,
            ReplicaState::Ready => replicas.ready += 1,
            ReplicaState::Loading => replicas.loading += 1,
            ReplicaState::Draining => replicas.draining += 1,
            ReplicaState::Pending => replicas.pending += 1,
        }
        let Some(e) = m.engine else {
            replica_samples.push(ReplicaObservation {
                protected: m.protected,
                created_at: m.created_at,
                ..ReplicaObservation::new(m.id, state)
            });
            continue;
        };
        let s = e.sample;
        telemetry_at = Some(telemetry_at.map_or(e.seen_at, |t| t.max(e.seen_at)));
        let w = e.window;
        add(&mut load.arrival_rate_rps, w.arrival_rate());
        add(&mut finished_rate, w.requests_finished_per_second);
        add(
            &mut load.generation_tokens_per_second,
            w.generation_tokens_per_second,
        );
        add(
            &mut load.prompt_tokens_per_second,
            w.prompt_tokens_per_second,
        );
        add(&mut load.requests_waiting, s.requests_waiting);
        add(&mut load.requests_running, s.requests_running);
        add(&mut load.queued_prompt_tokens, s.queued_prompt_tokens);
        if state == ReplicaState::Ready
            && gpu_fault.is_none()
            && let Some(kv) = s.kv_cache_usage_ratio
        {
            kv_sum += kv;
            kv_n += 1;
        }
        if let (Some(ctx), Some(running)) = (s.mean_context_tokens, s.requests_running)
            && running > 0.0
        {
            context_weighted += ctx * running;
            context_weight += running;
        }
        if w.prompt_tokens_per_second.is_some() {
            prefilled = match (prefilled, w.prefilled) {
                (Some((tokens, firsts)), Some((t, f))) => Some((tokens + t, firsts + f)),
                _ => None,
            };
        }
        merge(&mut latency.ttft_seconds, w.ttft_seconds.as_ref());
        merge(&mut latency.itl_seconds, w.itl_seconds.as_ref());
        merge(&mut latency.tpot_seconds, w.tpot_seconds.as_ref());
        replica_samples.push(ReplicaObservation {
            id: m.id.to_string(),
            state,
            protected: m.protected,
            created_at: m.created_at,
            requests_running: s.requests_running,
            requests_waiting: s.requests_waiting,
            kv_cache_usage_ratio: s.kv_cache_usage_ratio,
            mean_context_tokens: s.mean_context_tokens,
            itl_mean_seconds: w.itl_seconds.as_ref().and_then(|h| h.mean()),
            generation_tokens_per_second: w.generation_tokens_per_second,
            batch_limit: s.batch_limit,
            gpu_fault: gpu_fault.map(str::to_string),
        });
    }
    if kv_n > 0 {
        load.kv_cache_usage_ratio = Some(kv_sum / f64::from(kv_n));
    }
    if context_weight > 0.0 {
        load.mean_context_tokens = Some(context_weighted / context_weight);
    }
    let request_rate = load.arrival_rate_rps.or(finished_rate);
    // The mean prompt is the prompt tokens over the first tokens of the
    // same points (see `EngineWindowStats::prefilled`). Over the requests
    // that arrived instead, a window that starts with requests queued or
    // mid-prefill (a replica that just came up with held requests, a
    // backlog draining) counts their tokens without them: 17,313 tokens
    // for the 2,000-token prompts of a model woken from zero.
    load.mean_input_tokens = match prefilled {
        // Every prompt has a token: none counted over first tokens means
        // the counter is not kept, not empty prompts.
        Some((tokens, firsts)) if firsts > 0.0 && tokens > 0.0 => Some(tokens / firsts),
        _ => ratio(load.prompt_tokens_per_second, request_rate),
    };
    load.mean_output_tokens = ratio(load.generation_tokens_per_second, finished_rate);
    replicas.current = current
        .unwrap_or(replicas.ready + replicas.unhealthy + replicas.loading + replicas.pending);
    Observation {
        telemetry_at,
        replicas,
        replica_samples,
        load,
        latency,
    }
}

/// Tokens per request. Every request has at least one prompt token and
/// generates at least one, so no tokens over some requests means none of
/// them reached that stage inside the window (all queued): unknown.
fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 1e-9 && n > 0.0 => Some(n / d),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use gpuscale_core::Histogram;
    use gpuscale_core::sample::Framework;

    use super::*;

    struct Owned {
        sample: EngineSample,
        seen: Timestamp,
        window: EngineWindowStats,
    }

    fn engine(
        pod: &str,
        model: &str,
        state: EngineState,
        seen: i64,
        w: EngineWindowStats,
    ) -> Owned {
        let mut s = EngineSample::empty(
            PodRef::new("default", pod),
            Framework::Fake,
            model,
            Timestamp(seen),
        );
        s.state = state;
        s.requests_waiting = Some(2.0);
        s.requests_running = Some(10.0);
        s.kv_cache_usage_ratio = Some(0.5);
        s.mean_context_tokens = Some(700.0);
        Owned {
            sample: s,
            seen: Timestamp(seen),
            window: w,
        }
    }

    fn inputs<'a>(engines: &'a [Owned], model: &'a str) -> impl Iterator<Item = EngineInput<'a>> {
        engines
            .iter()
            .filter(move |e| e.sample.model == model)
            .map(|e| EngineInput {
                sample: &e.sample,
                seen_at: e.seen,
                window: &e.window,
                gpu_fault: None,
            })
    }

    #[test]
    fn a_warm_engine_on_an_unhealthy_gpu_is_not_capacity_and_goes_first() {
        let engines = [
            engine(
                "ok",
                "m",
                EngineState::Warm,
                100,
                EngineWindowStats::default(),
            ),
            engine(
                "sick",
                "m",
                EngineState::Warm,
                100,
                EngineWindowStats::default(),
            ),
        ];
        let mut sick_kv = engines[1].sample.clone();
        sick_kv.kv_cache_usage_ratio = Some(1.0);
        let obs = assemble(
            [
                EngineInput {
                    sample: &engines[0].sample,
                    seen_at: engines[0].seen,
                    window: &engines[0].window,
                    gpu_fault: None,
                },
                EngineInput {
                    sample: &sick_kv,
                    seen_at: engines[1].seen,
                    window: &engines[1].window,
                    gpu_fault: Some("Xid 79"),
                },
            ],
            None,
        );
        assert_eq!(obs.replicas.ready, 1);
        assert_eq!(obs.replicas.unhealthy, 1);
        assert_eq!(obs.replicas.current, 2, "it still holds a replica");
        assert_eq!(obs.load.kv_cache_usage_ratio, Some(0.5), "only capacity");
        let sick = obs
            .replica_samples
            .iter()
            .find(|r| r.id == "sick")
            .expect("the sick replica is observed");
        assert_eq!(sick.gpu_fault.as_deref(), Some("Xid 79"));
        assert_eq!(
            gpuscale_policy::victim::choose_victims(&obs.replica_samples, 1, Timestamp(100), 0.0),
            vec!["sick"]
        );
    }

    #[test]
    fn arrival_is_finished_plus_queue_growth_when_no_arrival_counter() {
        let mut ttft = Histogram::ttft();
        ttft.observe_n(0.2, 10);
        let w = EngineWindowStats {
            covered_seconds: 30.0,
            generation_tokens_per_second: Some(2_000.0),
            prompt_tokens_per_second: Some(5_000.0),
            requests_finished_per_second: Some(8.0),
            in_system_change_per_second: Some(2.0),
            ttft_seconds: Some(ttft.clone()),
            ..EngineWindowStats::default()
        };
        let engines = vec![
            engine("a", "m", EngineState::Warm, 100, w.clone()),
            engine("b", "m", EngineState::Warm, 200, w),
            engine(
                "c",
                "m",
                EngineState::Loading,
                150,
                EngineWindowStats::default(),
            ),
            engine(
                "d",
                "m",
                EngineState::Failed,
                150,
                EngineWindowStats::default(),
            ),
            engine(
                "e",
                "other",
                EngineState::Warm,
                900,
                EngineWindowStats::default(),
            ),
        ];
        let obs = assemble(inputs(&engines, "m"), None);
        assert_eq!(obs.replicas.ready, 2);
        assert_eq!(obs.replicas.loading, 1);
        assert_eq!(obs.replicas.current, 3);
        assert_eq!(obs.telemetry_at, Some(Timestamp(200)));
        assert_eq!(obs.load.arrival_rate_rps, Some(20.0));
        assert_eq!(obs.load.generation_tokens_per_second, Some(4_000.0));
        // 10 000 prompt tokens/s over 20 req/s; 4 000 generated over 16 finished.
        assert_eq!(obs.load.mean_input_tokens, Some(500.0));
        assert_eq!(obs.load.mean_output_tokens, Some(250.0));
        assert_eq!(obs.load.requests_waiting, Some(6.0));
        assert_eq!(obs.load.kv_cache_usage_ratio, Some(0.5));
        assert_eq!(
            obs.latency.ttft_seconds.as_ref().map(|h| h.count()),
            Some(20)
        );
        assert_eq!(obs.replica_samples.len(), 3);
    }

    /// A replica that came up with five held requests: its window starts
    /// with them queued (no prompt tokens yet), and in it one more arrives
    /// and all six are prefilled. Over arrivals the mean prompt reads six
    /// prompts' tokens over one request; over first tokens it is right.
    /// An engine without a TTFT histogram falls back to arrivals for all.
    #[test]
    fn the_mean_prompt_is_prompt_tokens_over_first_tokens() {
        let mut ttft = Histogram::ttft();
        ttft.observe_n(0.3, 6);
        let w = EngineWindowStats {
            covered_seconds: 2.0,
            prompt_tokens_per_second: Some(6.0 * 2_000.0 / 2.0),
            requests_arrived_per_second: Some(0.5),
            requests_finished_per_second: Some(0.0),
            ttft_seconds: Some(ttft),
            prefilled: Some((12_000.0, 6.0)),
            ..EngineWindowStats::default()
        };
        let engines = vec![engine("a", "m", EngineState::Warm, 100, w.clone())];
        let obs = assemble(inputs(&engines, "m"), None);
        assert_eq!(obs.load.arrival_rate_rps, Some(0.5));
        assert_eq!(obs.load.mean_input_tokens, Some(2_000.0));
        let without = EngineWindowStats {
            prefilled: None,
            ..w.clone()
        };
        let engines = vec![
            engine("a", "m", EngineState::Warm, 100, w),
            engine("b", "m", EngineState::Warm, 100, without),
        ];
        let obs = assemble(inputs(&engines, "m"), None);
        // 12 000 prompt tokens/s over 1 req/s.
        assert_eq!(obs.load.mean_input_tokens, Some(12_000.0));
    }

    #[test]
    fn missing_metrics_stay_missing() {
        let engines = vec![engine(
            "a",
            "m",
            EngineState::Warm,
            100,
            EngineWindowStats::default(),
        )];
        let obs = assemble(inputs(&engines, "m"), Some(4));
        assert_eq!(obs.replicas.current, 4);
        assert_eq!(obs.load.arrival_rate_rps, None);
        assert_eq!(obs.load.generation_tokens_per_second, None);
        assert_eq!(obs.latency.ttft_seconds, None);
        let none = assemble(inputs(&engines, "absent"), Some(2));
        assert_eq!(none.telemetry_at, None);
        assert_eq!(none.replicas.ready, 0);
    }

    #[test]
    fn a_ready_replica_without_an_engine_makes_the_observation_incomplete() {
        let w = EngineWindowStats {
            requests_finished_per_second: Some(3.0),
            ..EngineWindowStats::default()
        };
        let engines = vec![engine("a", "m", EngineState::Warm, 100, w)];
        let replica = |name: &str, state| ClusterReplica {
            pod: PodRef::new("default", name),
            state,
            protected: false,
            created_at: None,
        };
        let complete = TargetObservation {
            current: Some(2),
            replicas: Some(vec![
                replica("a", ReplicaState::Ready),
                replica("x", ReplicaState::Pending),
            ]),
        };
        let obs = assemble_target(inputs(&engines, "m"), &complete);
        assert_eq!(obs.telemetry_at, Some(Timestamp(100)));
        assert_eq!(obs.replicas.pending, 1);
        assert_eq!(obs.replicas.current, 2);
        let incomplete = TargetObservation {
            current: Some(2),
            replicas: Some(vec![
                replica("a", ReplicaState::Ready),
                replica("b", ReplicaState::Ready),
            ]),
        };
        let obs = assemble_target(inputs(&engines, "m"), &incomplete);
        assert_eq!(obs.telemetry_at, None, "b is ready but silent");
    }
}
