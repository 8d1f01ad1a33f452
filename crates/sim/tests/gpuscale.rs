//! gpuscale's policy in the simulator: the observation it is given is what
//! the real scaler would build, and it drives a fleet end to end.

use gpuscale_sim::autoscaler::{Autoscaler, ClusterView, FleetSample, PodView};
use gpuscale_sim::fleet::{
    ColdStart, EngineCounters, FleetConfig, Lifecycle, ReplicaSample, VictimOrder,
};
use gpuscale_sim::gpuscale::{GpuscaleAutoscaler, GpuscaleOptions, SIM_EPOCH_MS, default_spec};
use gpuscale_sim::rng::SimRng;
use gpuscale_sim::stats::Slo;
use gpuscale_sim::trace::{Request, Workload};
use gpuscale_sim::{RunConfig, run_policy};

fn slo() -> Slo {
    Slo {
        ttft_s: 2.0,
        itl_s: 0.05,
        percentile: 95.0,
        ttft_per_input_token_s: 0.0,
    }
}

fn ours() -> GpuscaleAutoscaler {
    let perf = gpuscale_sim::profile::resolve_profile("h200-llama3-8b-bf16").expect("preset");
    let spec = default_spec("h200-llama3-8b-bf16", &slo(), 1, 30, 60.0, 1);
    GpuscaleAutoscaler::new(spec, perf, GpuscaleOptions::default()).expect("valid spec")
}

fn replica(id: u32, received: u64, ttft_in_bucket_9: u64) -> ReplicaSample {
    let mut counters = EngineCounters {
        received,
        ..Default::default()
    };
    counters.ttft_buckets[9] = ttft_in_bucket_9; // (0.25, 0.5] s
    counters.ttft_sum = 0.3 * ttft_in_bucket_9 as f64;
    ReplicaSample {
        id,
        state: Lifecycle::Ready,
        created_at: 0.0,
        ready_at: 0.0,
        waiting: 3,
        running: 10,
        queued_prompt_tokens: 3000,
        kv_used_tokens: 12_000.0,
        kv_usage_ratio: 0.2,
        kv_reserved_tokens: 20_000,
        mean_context_tokens: 1200.0,
        batch_limit: 256,
        counters,
    }
}

#[test]
fn the_observation_holds_counter_rates_window_histograms_and_pod_states() {
    let mut a = ours();
    // Agent samples 1 s apart; 2 replicas each receive 10 requests per second.
    for k in 0..40u64 {
        let at = k as f64 + 0.5;
        a.observe(FleetSample {
            at,
            ingress_total: 20 * k,
            router_queue: 0,
            replicas: vec![replica(0, 10 * k, k), replica(1, 10 * k, k)],
        });
    }
    let view = ClusterView {
        now: 40.0,
        spec_replicas: 3,
        pending: 0,
        loading: 1,
        ready: 2,
        draining: 0,
        pods: vec![
            PodView {
                id: 0,
                state: Lifecycle::Ready,
                created_at: 0.0,
                ready_at: 0.0,
            },
            PodView {
                id: 1,
                state: Lifecycle::Ready,
                created_at: 0.0,
                ready_at: 0.0,
            },
            PodView {
                id: 2,
                state: Lifecycle::Loading,
                created_at: 30.0,
                ready_at: f64::NAN,
            },
        ],
    };
    let obs = a.observation(&view);
    assert_eq!(
        obs.telemetry_at.map(|t| t.as_millis()),
        Some(SIM_EPOCH_MS + 39_500)
    );
    assert_eq!(obs.replicas.loading, 1);
    assert_eq!(obs.replicas.current, 3);
    let rate = obs.load.arrival_rate_rps.expect("rate");
    assert!((rate - 20.0).abs() < 1e-9, "{rate}");
    assert_eq!(obs.load.requests_waiting, Some(6.0));
    assert_eq!(obs.load.requests_running, Some(20.0));
    assert_eq!(obs.load.queued_prompt_tokens, Some(6000.0));
    assert!((obs.load.mean_context_tokens.expect("ctx") - 1200.0).abs() < 1e-9);
    // 30 s of TTFT observations: 30 per replica in (0.25, 0.5].
    let ttft = obs.latency.ttft_seconds.expect("ttft histogram");
    assert_eq!(ttft.count(), 60);
    let p95 = ttft.quantile(0.95).expect("quantile");
    assert!(p95 > 0.25 && p95 <= 0.5, "{p95}");
    // Per pod: metrics for ready ones, none for the loading one.
    assert_eq!(obs.replica_samples.len(), 3);
    assert_eq!(obs.replica_samples[0].id, "r0");
    assert_eq!(obs.replica_samples[0].requests_running, Some(10.0));
    assert_eq!(obs.replica_samples[2].requests_running, None);
    // No request sizes were completed: unknown, not zero.
    assert_eq!(obs.load.mean_input_tokens, None);
}

#[test]
fn with_no_telemetry_the_policy_sees_none_and_holds() {
    let mut a = ours();
    let view = ClusterView {
        now: 2.0,
        spec_replicas: 4,
        pending: 0,
        loading: 0,
        ready: 4,
        draining: 0,
        pods: Vec::new(),
    };
    assert!(a.observation(&view).telemetry_at.is_none());
    assert_eq!(
        a.decide(&view).replicas,
        4,
        "never scale in on missing data"
    );
}

#[test]
fn ours_meets_a_load_step_drops_nothing_and_publishes_a_batch_limit() {
    let mut rng = SimRng::new(5, 0);
    let mut reqs = Vec::new();
    let mut t = 0.0;
    while t < 900.0 {
        let rate = if (300.0..600.0).contains(&t) {
            120.0
        } else {
            30.0
        };
        t += rng.exponential(1.0 / rate);
        reqs.push(Request {
            arrival_s: t,
            input_tokens: 200 + rng.below(1800) as u32,
            output_tokens: 20 + rng.below(300) as u32,
        });
    }
    let w = Workload::from_requests("step", reqs);
    let perf = gpuscale_sim::profile::resolve_profile("h200-llama3-8b-bf16").expect("preset");
    let cfg = RunConfig {
        slo: slo(),
        fleet: FleetConfig {
            perf,
            prefill_token_budget: 8192,
            pending_s: 0.0,
            cold_start: ColdStart::Fixed(60.0),
            drain_grace_s: Some(30.0),
            victim_order: VictimOrder::Kubernetes,
            horizon_s: 0.0,
            seed: 1,
        },
        initial_replicas: 2,
        chart_bucket_s: 10.0,
    };
    let mut a = ours();
    let out = run_policy(&w, &mut a, &cfg, None);
    assert_eq!(
        out.stats.dropped, 0,
        "gpuscale drains without a grace limit"
    );
    assert_eq!(out.stats.completed, out.stats.arrivals);
    let peak = out
        .stats
        .series
        .replicas
        .iter()
        .map(|r| r.1)
        .max()
        .unwrap_or(0);
    assert!(peak > 2, "scaled up for the step (peak {peak})");
    let last = a.last_decision().expect("decided");
    assert!(last.batch_limit.is_some(), "publishes a batch limit");
}
