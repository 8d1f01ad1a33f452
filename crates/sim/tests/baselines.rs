//! Each baseline reproduces a decision computed by hand from its law in
//! REFERENCE.md §3.2 (and §1.2–§2.4 for the engines they sit on).

use gpuscale_policy::PerfModel;
use gpuscale_policy::hpa::{Behavior, Hpa, Normalization, PodMetric};
use gpuscale_sim::autoscaler::{Autoscaler, ClusterView, FleetSample, PodView};
use gpuscale_sim::baselines::aibrix::{Aibrix, AibrixVariant};
use gpuscale_sim::baselines::aws::AwsPredictiveTargetTracking;
use gpuscale_sim::baselines::dynamo::{
    DynamoLoadPlanner, DynamoSlaPlanner, IntervalObservation, LoadMode,
};
use gpuscale_sim::baselines::hpa_gpu_util::HpaGpuUtil;
use gpuscale_sim::baselines::keda_prometheus::KedaQueueTrigger;
use gpuscale_sim::baselines::knative_kpa::KnativeKpa;
use gpuscale_sim::baselines::llmd_slo::LlmdSloAware;
use gpuscale_sim::baselines::wva::WvaSaturation;
use gpuscale_sim::baselines::{BaselineContext, baseline};
use gpuscale_sim::fleet::{EngineCounters, Lifecycle, ReplicaSample};
use gpuscale_sim::stats::Slo;

fn replica(id: u32, waiting: u32, running: u32, kv: f64) -> ReplicaSample {
    ReplicaSample {
        id,
        state: Lifecycle::Ready,
        created_at: 0.0,
        ready_at: 0.0,
        waiting,
        running,
        queued_prompt_tokens: 0,
        kv_used_tokens: 0.0,
        kv_usage_ratio: kv,
        kv_reserved_tokens: 0,
        mean_context_tokens: 0.0,
        batch_limit: 256,
        counters: EngineCounters::default(),
    }
}

fn sample(at: f64, replicas: Vec<ReplicaSample>) -> FleetSample {
    FleetSample {
        at,
        ingress_total: 0,
        router_queue: 0,
        replicas,
    }
}

fn view(now: f64, ready: u32, loading: u32) -> ClusterView {
    let mut pods: Vec<PodView> = (0..ready)
        .map(|id| PodView {
            id,
            state: Lifecycle::Ready,
            created_at: 0.0,
            ready_at: 0.0,
        })
        .collect();
    pods.extend((0..loading).map(|i| PodView {
        id: ready + i,
        state: Lifecycle::Loading,
        created_at: now - 10.0,
        ready_at: f64::NAN,
    }));
    ClusterView {
        now,
        spec_replicas: ready + loading,
        pending: 0,
        loading,
        ready,
        draining: 0,
        pods,
    }
}

fn slo() -> Slo {
    Slo {
        ttft_s: 2.0,
        itl_s: 0.05,
        percentile: 95.0,
        ttft_per_input_token_s: 0.0,
    }
}

fn h200() -> PerfModel {
    gpuscale_sim::profile::resolve_profile("h200-llama3-8b-bf16").expect("preset")
}

#[test]
fn b1_keda_waiting_scales_to_ceil_of_queue_over_threshold_within_the_legacy_limit() {
    // Q = 12 + 9 + 6 = 27 over 3 replicas at threshold 5: ratio 27/15 = 1.8,
    // proposal ceil(27/5) = 6; legacy limit max(2·3, 4) = 6.
    let mut b = KedaQueueTrigger::production_stack_waiting(5.0, 1, 20);
    b.observe(sample(
        7.5,
        vec![
            replica(0, 12, 5, 0.1),
            replica(1, 9, 5, 0.1),
            replica(2, 6, 5, 0.1),
        ],
    ));
    assert_eq!(b.decide(&view(15.0, 3, 0)).replicas, 6);
    // Q = 16 over 3: ratio 1.07 is within tolerance: stay at 3.
    let mut b = KedaQueueTrigger::production_stack_waiting(5.0, 1, 20);
    b.observe(sample(
        7.5,
        vec![
            replica(0, 6, 5, 0.1),
            replica(1, 5, 5, 0.1),
            replica(2, 5, 5, 0.1),
        ],
    ));
    assert_eq!(b.decide(&view(15.0, 3, 0)).replicas, 3);
}

#[test]
fn b3_kserve_running_is_the_documented_six_running_gives_three() {
    let mut b = KedaQueueTrigger::kserve_running(2.0, 1, 10);
    b.observe(sample(7.5, vec![replica(0, 0, 6, 0.1)]));
    // From 1 replica the legacy limit is max(2, 4) = 4, so 3 is reachable.
    assert_eq!(b.decide(&view(15.0, 1, 0)).replicas, 3);
}

#[test]
fn b12_gpu_utilization_reads_busy_as_eighty_five_percent_and_scales_up() {
    // Two pods busy the whole last second at batch 1: NVML reads 85.1% each;
    // ratio 85.1/80 = 1.064 is within tolerance (0.1): hold at 2.
    let mut b = HpaGpuUtil::new(80.0, 1, 20);
    let busy = |at: f64, busy_s: f64| {
        let mut r0 = replica(0, 0, 1, 0.1);
        let mut r1 = replica(1, 0, 1, 0.1);
        r0.counters.busy_s = busy_s;
        r1.counters.busy_s = busy_s;
        sample(at, vec![r0, r1])
    };
    b.observe(busy(28.5, 0.0));
    b.observe(busy(29.5, 0.0));
    b.observe(busy(30.5, 1.0)); // collect at 30 s: busy the last second
    assert_eq!(b.decide(&view(45.0, 2, 0)).replicas, 2);
    // Target 60: ratio 1.418 → ceil(1.418 · 2) = 3.
    let mut b = HpaGpuUtil::new(60.0, 1, 20);
    b.observe(busy(28.5, 0.0));
    b.observe(busy(29.5, 0.0));
    b.observe(busy(30.5, 1.0));
    assert_eq!(b.decide(&view(45.0, 2, 0)).replicas, 3);
}

#[test]
fn e_hpa_plain_metric_fills_missing_pods_with_the_target_on_scale_down() {
    // Ready pods at 20 and 20 against 80 (ratio 0.25), one pod missing:
    // filled with 80 → new ratio (20+20+80)/3/80 = 0.5 → ceil(0.5·3) = 2.
    let hpa = Hpa::new(1, 10, Normalization::Behavior(Behavior::hpa_default()));
    let pods = [
        PodMetric::Ready(20.0),
        PodMetric::Ready(20.0),
        PodMetric::Missing,
    ];
    assert_eq!(hpa.plain_metric_proposal(3, &pods, 80.0), Some(2));
    // Scale-up with an unready pod: it counts as 0. Ready 160, 160; unready →
    // ratio (160+160+0)/3/80 = 1.33 → ceil(1.33·3) = 4.
    let pods = [
        PodMetric::Ready(160.0),
        PodMetric::Ready(160.0),
        PodMetric::Unready,
    ];
    assert_eq!(hpa.plain_metric_proposal(3, &pods, 80.0), Some(4));
}

#[test]
fn b13_knative_kpa_divides_stable_concurrency_by_the_target_value() {
    // 2 ready pods, concurrency 100 for a minute, target 100 × 0.7 = 70:
    // dspc = ceil(100/70) = 2 … with 140 it is ceil(2) = 2, with 141 → 3.
    let run = |conc: u32| {
        let mut k = KnativeKpa::new(100.0, 1, 50);
        // The queue-proxies' request-seconds grow at their concurrency.
        let at = |id: u32, n: u32, t: f64| {
            let mut r = replica(id, 0, n, 0.0);
            r.counters.concurrency_s = f64::from(n) * t;
            r
        };
        for t in 0..60 {
            let per_pod = conc / 2;
            let t = f64::from(t) + 0.5;
            k.observe(sample(t, vec![at(0, per_pod, t), at(1, conc - per_pod, t)]));
        }
        // A fresh autoscaler with 2 ready pods starts in panic at the current
        // count; use 1 ready pod to start without it.
        let mut v = view(60.0, 1, 0);
        v.spec_replicas = 1;
        k.decide(&v).replicas
    };
    assert_eq!(run(140), 2);
    // 300 concurrent: dspc = ceil(300/70) = 5 within maxUp 1000; panic
    // (dppc/readyN = 5 ≥ 2) takes max(dspc, dppc) = 5.
    assert_eq!(run(300), 5);
}

#[test]
fn b4_aibrix_kpa_mean_does_not_grow_with_pods_but_total_does() {
    // 4 pods each at KV 0.8, target 0.5: mean 0.8 → ceil(1.6) = 2 (clamped
    // to [floor(4/2), 8] = 2); total 3.2 → ceil(6.4) = 7.
    let feed = |a: &mut Aibrix| {
        for t in 0..18 {
            a.observe(sample(
                f64::from(t) * 10.0 + 5.0,
                (0..4).map(|i| replica(i, 0, 10, 0.8)).collect(),
            ));
        }
    };
    let mut mean = Aibrix::new(AibrixVariant::KpaMean, 0.5, 1, 20);
    feed(&mut mean);
    assert_eq!(mean.decide(&view(180.0, 4, 0)).replicas, 2);
    let mut total = Aibrix::new(AibrixVariant::KpaTotal, 0.5, 1, 20);
    feed(&mut total);
    assert_eq!(total.decide(&view(180.0, 4, 0)).replicas, 7);
    // APA: r = 0.8/0.5 = 1.6 > 1.1 → min(ceil(4·1.6), ceil(8)) = 7.
    let mut apa = Aibrix::new(AibrixVariant::Apa, 0.5, 1, 20);
    feed(&mut apa);
    assert_eq!(apa.decide(&view(180.0, 4, 0)).replicas, 7);
}

#[test]
fn b5_wva_saturation_v1_spare_capacity_rules() {
    // A profile whose KV use at the SLO reaches the shipped 0.80: the
    // shipped thresholds.
    let w = WvaSaturation::new(1.0, 0.9, 1, 10);
    // kv 0.5, 0.6; q 1, 2: spare_kv = mean(0.3, 0.2) = 0.25 ≥ 0.1, spare_q =
    // mean(4, 3) = 3.5 ≥ 3: no scale-up. Down: 0.8 − 1.1/1 < 0.1: not safe.
    assert_eq!(w.analyze(&[0.5, 0.6], &[1.0, 2.0]), 0);
    // kv 0.75, 0.75: spare_kv 0.05 < 0.1 → up.
    assert_eq!(w.analyze(&[0.75, 0.75], &[0.0, 0.0]), 1);
    // Three idle pods: 0.8 − 0.15/2 ≥ 0.1 and 5 − 0/2 ≥ 3 → down.
    assert_eq!(w.analyze(&[0.05, 0.05, 0.05], &[0.0, 0.0, 0.0]), -1);
    // Every pod saturated (q ≥ 5): NS empty → up.
    assert_eq!(w.analyze(&[0.2], &[7.0]), 1);
    // A model at its SLO with 10% of its KV cache (a 70B on four GPUs): the
    // threshold follows the profile, so 9.5% is saturated.
    let big = WvaSaturation::new(1.0, 0.1, 1, 10);
    assert_eq!(big.analyze(&[0.095, 0.095], &[0.0, 0.0]), 1);
    // The shipped thresholds read the same pods as idle enough to lose one.
    assert_eq!(w.analyze(&[0.095, 0.095], &[0.0, 0.0]), -1);
}

#[test]
fn b5_wva_steps_by_one_replica_past_ten_replicas() {
    // 13 ready pods, every one saturated (queue ≥ 5): WVA wants 14. Behind an
    // HPA with the default 0.1 tolerance the usage ratio 14/13 = 1.077 would
    // propose no change, so WVA runs with the tolerance at 0 (KEP-4951). The
    // HPA's 120 s window holds the step for two minutes in both directions.
    let run = |waiting: u32, running: u32, kv: f64| {
        let mut w = WvaSaturation::new(1.0, 0.9, 1, 40);
        let mut replicas = Vec::new();
        for step in 1..=12 {
            let t = 15.0 * f64::from(step);
            w.observe(sample(
                t - 1.0,
                (0..13).map(|i| replica(i, waiting, running, kv)).collect(),
            ));
            replicas.push(w.decide(&view(t, 13, 0)).replicas);
        }
        replicas
    };
    let up = run(7, 200, 0.5);
    assert_eq!(up.first(), Some(&13), "{up:?}");
    assert_eq!(up.last(), Some(&14), "{up:?}");
    let down = run(0, 0, 0.01);
    assert_eq!(down.first(), Some(&13), "{down:?}");
    assert_eq!(down.last(), Some(&12), "{down:?}");
}

#[test]
fn b8_dynamo_load_is_swept_over_the_planners_targets() {
    let ctx = BaselineContext {
        perf: h200(),
        slo: slo(),
        min_replicas: 1,
        max_replicas: 100,
        peak_rps: 95.0,
        mean_input: 1000.0,
        mean_output: 200.0,
    };
    let b = baseline("dynamo-load", Some(0.65), &ctx).expect("dynamo-load");
    let p = b.parameters();
    assert!((p["itl_target_s"].as_f64().expect("itl") - 0.65 * 0.05).abs() < 1e-12);
    assert!((p["ttft_target_s"].as_f64().expect("ttft") - 0.65 * 2.0).abs() < 1e-12);
    assert_eq!(p["sensitivity"].as_f64(), Some(0.8));
    // The default is the SLO itself.
    let d = baseline("dynamo-load", None, &ctx).expect("dynamo-load");
    assert_eq!(d.parameters()["itl_target_s"].as_f64(), Some(0.05));
}

#[test]
fn b9_llmd_slo_law_with_in_flight_credit_and_hysteresis() {
    let b = LlmdSloAware::new(slo(), 1.0, 1, 20);
    // s = 1.1, n = 4, r = 4: d = 4 + ceil(4·(1.1/0.55 − 1)) = 8.
    assert_eq!(b.law(1.1, 4, 4), 8);
    // Same s with 2 of 4 ready: c = 0.5 → 4 + ceil(4·(0.55/0.55 − 1)) = 4.
    assert_eq!(b.law(1.1, 4, 2), 4);
    // s = 0.2 < 0.40: d = 8 − floor(8·(1 − 0.5)) = 4.
    assert_eq!(b.law(0.2, 8, 8), 4);
    // Inside the band: hold.
    assert_eq!(b.law(0.5, 6, 6), 6);
}

#[test]
fn b7_dynamo_sla_planner_sizes_prefill_plus_decode() {
    let perf = h200();
    let obs = IntervalObservation {
        ttft: 0.1,
        itl: 0.02,
        count: 18_000.0,
        duration: 5.0,
        isl: 1000.0,
        osl: 200.0,
    };
    // By hand: 18,000 requests per 180 s = 100 req/s. Prefill: 100 × 1000
    // tokens/s over 1000/p(1000) tokens/s. Decode: 100 × 200 tokens/s over
    // the throughput of the largest batch whose step at context 1100 meets
    // the 50 ms ITL SLO.
    let prefill_frac = 100.0 * 1000.0 / (1000.0 / perf.prefill_s(1000.0));
    let best = (1..=perf.max_batch)
        .filter(|&b| perf.decode_step_s(f64::from(b), 1100.0) <= 0.05)
        .max()
        .unwrap_or(1);
    let thpt = f64::from(best) / perf.decode_step_s(f64::from(best), 1100.0);
    let want = (prefill_frac + 100.0 * 200.0 / thpt).ceil() as u32;
    let mut nc = DynamoSlaPlanner::new(&perf, slo(), false, 1.0, 100);
    assert!(
        nc.size(&obs, 10).is_none(),
        "no forecast before any interval"
    );
    nc.observe_interval(&obs);
    assert_eq!(nc.size(&obs, 10), Some(want));
    // With correction: the observed ITL (20 ms) over the model's t(conc, 1100)
    // at conc = 18000/10 × 5/180 = 50 (about 8 ms) gives d_cf ≈ 2.5, so the
    // decode target tightens to ITL_SLO/d_cf and more replicas follow;
    // p_cf = 0.1/p(1000) > 1 leaves prefill demand as is (min(1, p_cf)).
    let mut c = DynamoSlaPlanner::new(&perf, slo(), true, 1.0, 100);
    c.observe_interval(&obs);
    let d_cf = 0.02 / perf.decode_step_s(50.0, 1100.0);
    let best_c = (1..=perf.max_batch)
        .filter(|&b| perf.decode_step_s(f64::from(b), 1100.0) <= 0.05 / d_cf)
        .max()
        .unwrap_or(1);
    let thpt_c = f64::from(best_c) / perf.decode_step_s(f64::from(best_c), 1100.0);
    let want_c = (prefill_frac + 100.0 * 200.0 / thpt_c).ceil() as u32;
    assert_eq!(c.size(&obs, 10), Some(want_c));
    assert!(want_c > want);
}

#[test]
fn b8_dynamo_load_scales_down_only_if_consolidation_keeps_the_sla() {
    let perf = h200();
    let mut d = DynamoLoadPlanner::new(&perf, slo(), LoadMode::Sla, 0.8, 20);
    // Three idle engines: consolidating onto two keeps both SLAs → −1.
    d.observe(sample(
        0.5,
        (0..3).map(|i| replica(i, 0, 1, 0.01)).collect(),
    ));
    let mut v = view(5.0, 3, 0);
    v.spec_replicas = 3;
    assert_eq!(d.decide(&v).replicas, 2);
    // Engines with deep prefill queues (TTFT estimate over 2 s) → +1.
    let mut d = DynamoLoadPlanner::new(&perf, slo(), LoadMode::Sla, 0.8, 20);
    let busy: Vec<ReplicaSample> = (0..3)
        .map(|i| {
            let mut r = replica(i, 40, 200, 0.5);
            r.queued_prompt_tokens = 120_000;
            r
        })
        .collect();
    d.observe(sample(0.5, busy));
    assert_eq!(d.decide(&v).replicas, 4);
    // While a replica is loading (expected ≠ ready) nothing happens.
    let mut v2 = view(10.0, 3, 1);
    v2.spec_replicas = 4;
    assert_eq!(d.decide(&v2).replicas, 4);
}

#[test]
fn b14_aws_target_tracking_needs_three_minutes_above_target() {
    let mut a = AwsPredictiveTargetTracking::new(10.0, 1, 50);
    let mut ingress = 0u64;
    let mut v = view(0.0, 4, 0);
    // 60 req/s over 4 replicas: M = 15 > 10 for consecutive minutes.
    for minute in 0..5u32 {
        let t = f64::from(minute) * 60.0;
        a.observe(FleetSample {
            at: t,
            ingress_total: ingress,
            router_queue: 0,
            replicas: Vec::new(),
        });
        v.now = t;
        let d = a.decide(&v).replicas;
        // Datapoints above target after minutes 1, 2, 3: ceil(4·15/10) = 6 at minute 3.
        match minute {
            0..=2 => assert_eq!(d, 4, "minute {minute}"),
            _ => assert_eq!(d, 6, "minute {minute}"),
        }
        ingress += 3600;
    }
}

#[test]
fn b11_static_peak_is_ceil_of_peak_over_capacity() {
    let perf = h200();
    let ctx = BaselineContext {
        perf: perf.clone(),
        slo: slo(),
        min_replicas: 1,
        max_replicas: 100,
        peak_rps: 95.0,
        mean_input: 1000.0,
        mean_output: 200.0,
    };
    let cap = ctx.capacity_rps();
    let want = (95.0 / cap).ceil() as u32;
    assert_eq!(ctx.static_peak_replicas(), want);
    let mut b = baseline("static", None, &ctx).expect("static");
    assert_eq!(b.decide(&view(60.0, 1, 0)).replicas, want);
}
