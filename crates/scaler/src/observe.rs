//! From the scaler's state to what the policy sees of one workload.
//!
//! Pure: [`assemble`] takes the published [`StateView`], the workload's
//! engine selector and its current replica count, and builds the
//! [`Observation`]:
//!
//! * **replicas**: engines by state — `Warm` is ready (capacity), `Loading`
//!   (and `Unknown`) is loading, `Draining` is draining; `Failed` engines are
//!   not replicas. Pending pods are invisible to agents (no GPU yet), so
//!   `pending` is 0 here; the Kubernetes controller knows better:
//!   [`assemble_target`] takes the replicas and their states from the
//!   actuator ([`TargetObservation`]) and only the load from the engines.
//! * **arrival rate**: per engine, the arrival counter's rate when exported,
//!   else finished requests per second plus the growth of requests in the
//!   engine (waiting + running) over the window; summed over engines.
//!   Under overload completions stall while the queue grows: the growth term
//!   is what keeps the offered load visible.
//! * **request shape**: prompt tokens per request and generated tokens per
//!   finished request, from the window rates.
//! * **latencies**: the window's TTFT and ITL observations, merged over the
//!   workload's engines.
//! * **telemetry_at**: the newest time an engine's state was confirmed.
//!
//! A value no engine exports stays `None`; it is never read as zero.

use std::collections::HashMap;

use gpuscale_core::sample::EngineState;
use gpuscale_core::{PodRef, Timestamp};
use gpuscale_policy::{
    LatencyObservation, LoadObservation, Observation, ReplicaCounts, ReplicaObservation,
    ReplicaState,
};

use crate::actuate::TargetObservation;
use crate::config::EngineSelector;
use crate::view::{EngineView, StateView, add, merge};

/// The engines of the workload in `view`.
pub fn select<'a>(
    view: &'a StateView,
    selector: &'a EngineSelector,
) -> impl Iterator<Item = &'a EngineView> + 'a {
    view.engines()
        .map(|e| e.as_ref())
        .filter(|e| selector.matches(&e.sample.model, &e.sample.pod.namespace))
}

/// The observation of the workload whose engines `selector` matches, with
/// the target's current replica count `current` (`None`: count the engines).
pub fn assemble(view: &StateView, selector: &EngineSelector, current: Option<u32>) -> Observation {
    let members: Vec<Member<'_>> = select(view, selector)
        .filter_map(|e| {
            let state = match e.sample.state {
                EngineState::Warm => ReplicaState::Ready,
                EngineState::Loading | EngineState::Unknown => ReplicaState::Loading,
                EngineState::Draining => ReplicaState::Draining,
                EngineState::Failed => return None,
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
/// readiness gate is True), and their engines, wherever an agent reports
/// them, give the load and latencies; without, as [`assemble`].
///
/// A ready replica whose engine no agent reports, or whose window has no
/// arrival rate yet (its agent is not connected, or only just reconnected,
/// e.g. after a change of scaler leader), makes the load incomplete:
/// `telemetry_at` is then `None`, so the policy holds rather than size the
/// fleet from part of it.
pub fn assemble_target(
    view: &StateView,
    selector: &EngineSelector,
    target: &TargetObservation,
) -> Observation {
    let Some(replicas) = &target.replicas else {
        return assemble(view, selector, target.current);
    };
    let engines: HashMap<&PodRef, &EngineView> = view
        .engines()
        .map(|e| (&e.sample.pod, e.as_ref()))
        .collect();
    let members: Vec<Member<'_>> = replicas
        .iter()
        .map(|r| Member {
            id: &r.pod.name,
            state: r.state,
            protected: r.protected,
            created_at: r.created_at,
            engine: engines
                .get(&r.pod)
                .copied()
                .filter(|e| e.sample.state != EngineState::Failed),
        })
        .collect();
    let incomplete = members.iter().any(|m| {
        m.state == ReplicaState::Ready && m.engine.is_none_or(|e| e.window.arrival_rate().is_none())
    });
    let mut observation = build(members, target.current);
    if incomplete {
        observation.telemetry_at = None;
    }
    observation
}

/// The pods of the workload: the target's replicas when the actuator knows
/// them, else the engines `selector` matches.
pub fn member_pods(
    view: &StateView,
    selector: &EngineSelector,
    target: &TargetObservation,
) -> Vec<PodRef> {
    match &target.replicas {
        Some(replicas) => replicas.iter().map(|r| r.pod.clone()).collect(),
        None => pods(view, selector),
    }
}

/// One replica of the workload, with its engine when an agent reports it.
struct Member<'a> {
    id: &'a str,
    state: ReplicaState,
    protected: bool,
    created_at: Option<Timestamp>,
    engine: Option<&'a EngineView>,
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

    for m in &members {
        let state = m.state;
        match state {
            ReplicaState::Ready => replicas.ready += 1,
            ReplicaState::Loading => replicas.loading += 1,
            ReplicaState::Draining => replicas.draining += 1,
            ReplicaState::Pending => replicas.pending += 1,
        }
        let Some(e) = m.engine else {
            replica_samples.push(ReplicaObservation {
                id: m.id.to_string(),
                state,
                protected: m.protected,
                created_at: m.created_at,
                requests_running: None,
                requests_waiting: None,
                kv_cache_usage_ratio: None,
                mean_context_tokens: None,
                itl_mean_seconds: None,
                generation_tokens_per_second: None,
                batch_limit: None,
            });
            continue;
        };
        let s = &e.sample;
        telemetry_at = Some(telemetry_at.map_or(e.seen_at, |t| t.max(e.seen_at)));
        let w = &e.window;
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
        });
    }
    if kv_n > 0 {
        load.kv_cache_usage_ratio = Some(kv_sum / f64::from(kv_n));
    }
    if context_weight > 0.0 {
        load.mean_context_tokens = Some(context_weighted / context_weight);
    }
    let request_rate = load.arrival_rate_rps.or(finished_rate);
    load.mean_input_tokens = ratio(load.prompt_tokens_per_second, request_rate);
    load.mean_output_tokens = ratio(load.generation_tokens_per_second, finished_rate);
    replicas.current = current.unwrap_or(replicas.ready + replicas.loading + replicas.pending);
    Observation {
        telemetry_at,
        replicas,
        replica_samples,
        load,
        latency,
    }
}

fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 1e-9 => Some(n / d),
        _ => None,
    }
}

/// The pods of the workload, with the node that runs each.
pub fn pods(view: &StateView, selector: &EngineSelector) -> Vec<PodRef> {
    select(view, selector)
        .map(|e| e.sample.pod.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use gpuscale_core::sample::{EngineSample, Framework};
    use gpuscale_core::{Histogram, NodeName};

    use super::*;
    use crate::view::{EngineWindowStats, NodeView};

    fn engine(
        pod: &str,
        model: &str,
        state: EngineState,
        seen: i64,
        w: EngineWindowStats,
    ) -> Arc<EngineView> {
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
        Arc::new(EngineView {
            node: NodeName::new("n"),
            sample: Arc::new(s),
            seen_at: Timestamp(seen),
            window: w,
        })
    }

    fn view(engines: Vec<Arc<EngineView>>) -> StateView {
        let node = NodeView {
            node: NodeName::new("n"),
            boot_epoch: 1,
            last_seq: 1,
            connected: true,
            agent_version: String::new(),
            sample_interval_ms: 1000,
            sampled_at: Timestamp(0),
            received_at: Timestamp(0),
            gpus: vec![],
            pods: vec![],
            engines,
            agent: Default::default(),
        };
        let mut nodes = BTreeMap::new();
        nodes.insert(NodeName::new("n"), Arc::new(node));
        StateView {
            nodes,
            ..StateView::default()
        }
    }

    fn selector(model: &str) -> EngineSelector {
        EngineSelector {
            model: Some(model.into()),
            namespace: None,
        }
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
        let v = view(vec![
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
        ]);
        let obs = assemble(&v, &selector("m"), None);
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

    #[test]
    fn missing_metrics_stay_missing() {
        let v = view(vec![engine(
            "a",
            "m",
            EngineState::Warm,
            100,
            EngineWindowStats::default(),
        )]);
        let obs = assemble(&v, &selector("m"), Some(4));
        assert_eq!(obs.replicas.current, 4);
        assert_eq!(obs.load.arrival_rate_rps, None);
        assert_eq!(obs.load.generation_tokens_per_second, None);
        assert_eq!(obs.latency.ttft_seconds, None);
        let none = assemble(&v, &selector("absent"), Some(2));
        assert_eq!(none.telemetry_at, None);
        assert_eq!(none.replicas.ready, 0);
    }
}
