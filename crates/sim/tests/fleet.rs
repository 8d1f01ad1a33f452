//! The fleet simulator's acceptance tests: conservation, determinism, an
//! M/M/1 queue against its closed form, cold starts, and the lower bound.

use gpuscale_policy::PerfModel;
use gpuscale_sim::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use gpuscale_sim::bound::{self, BoundSchedule, CurveDetail};
use gpuscale_sim::fleet::{ColdStart, Fleet, FleetConfig, Lifecycle, VictimOrder};
use gpuscale_sim::rng::SimRng;
use gpuscale_sim::stats::{Recorder, RunStats, Slo};
use gpuscale_sim::trace::{Request, Workload};
use gpuscale_sim::{FixedReplicas, RunConfig, baselines, run_policy};

fn h200() -> PerfModel {
    gpuscale_sim::profile::resolve_profile("h200-llama3-8b-bf16").expect("preset")
}

fn slo() -> Slo {
    Slo {
        ttft_s: 2.0,
        itl_s: 0.05,
        percentile: 95.0,
        ttft_per_input_token_s: 0.0,
    }
}

fn fleet_config(perf: PerfModel, cold_start_s: f64) -> FleetConfig {
    FleetConfig {
        perf,
        prefill_token_budget: 8192,
        pending_s: 0.0,
        cold_start: ColdStart::Fixed(cold_start_s),
        drain_grace_s: Some(30.0),
        victim_order: VictimOrder::Kubernetes,
        horizon_s: 0.0,
        seed: 7,
    }
}

/// Poisson arrivals at `rate` for `duration_s`, sizes uniform in the given ranges.
fn poisson(
    seed: u64,
    rate: f64,
    duration_s: f64,
    input: (u32, u32),
    output: (u32, u32),
) -> Workload {
    let mut rng = SimRng::new(seed, 99);
    let mut t = 0.0;
    let mut reqs = Vec::new();
    loop {
        t += rng.exponential(1.0 / rate);
        if t >= duration_s {
            break;
        }
        let i = input.0 + rng.below(u64::from(input.1 - input.0 + 1)) as u32;
        let o = output.0 + rng.below(u64::from(output.1 - output.0 + 1)) as u32;
        reqs.push(Request {
            arrival_s: t,
            input_tokens: i,
            output_tokens: o,
        });
    }
    Workload::from_requests("poisson", reqs)
}

/// Scales 2 → 6 → 1 → 4 on a schedule, removing replicas mid-work.
#[derive(Debug)]
struct Stepper;

impl Autoscaler for Stepper {
    fn name(&self) -> String {
        "stepper".into()
    }
    fn parameters(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn decision_interval_s(&self) -> f64 {
        20.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(5.0)
    }
    fn observe(&mut self, _sample: FleetSample) {}
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let n = match (view.now / 60.0) as u32 {
            0 => 6,
            1 => 1,
            2 => 4,
            _ => 2,
        };
        ScaleCommand::replicas(n)
    }
}

#[test]
fn every_request_finishes_or_is_counted_dropped() {
    let w = poisson(1, 40.0, 300.0, (100, 3000), (1, 400));
    let cfg = RunConfig {
        slo: slo(),
        fleet: fleet_config(h200(), 15.0),
        initial_replicas: 2,
        chart_bucket_s: 10.0,
    };
    let out = run_policy(&w, &mut Stepper, &cfg, None);
    let s = &out.stats;
    assert!(s.arrivals > 10_000);
    assert_eq!(s.arrivals, s.completed + s.dropped, "conservation");
    let series_done: u64 = s.series.done.iter().map(|&x| u64::from(x)).sum();
    assert_eq!(series_done, s.arrivals);
    assert!(out.scale_events.len() >= 3);
}

#[test]
fn a_drain_grace_period_aborts_what_is_left_and_counts_it_dropped() {
    let mut fc = fleet_config(h200(), 15.0);
    fc.horizon_s = 200.0;
    let mut fleet = Fleet::new(
        fc,
        2,
        Recorder::Full(Box::new(RunStats::new(slo(), 200.0, 10.0))),
    );
    // One long request (about a minute of decoding) on each replica.
    for _ in 0..2 {
        fleet.arrive(&Request {
            arrival_s: 0.0,
            input_tokens: 100,
            output_tokens: 10_000,
        });
    }
    fleet.advance_to(1.0);
    fleet.scale_to(1, &[], 1.0);
    fleet.advance_to(40.0);
    fleet.finish();
    let s = fleet.recorder.stats().expect("full");
    assert_eq!(s.arrivals, 2);
    assert_eq!(s.dropped, 1, "aborted 30 s after the drain began");
    assert_eq!(s.completed, 1);
}

#[test]
fn without_a_grace_limit_scale_in_drops_nothing() {
    let w = poisson(2, 40.0, 300.0, (100, 3000), (1, 400));
    let mut fc = fleet_config(h200(), 15.0);
    fc.horizon_s = w.duration_s();
    fc.drain_grace_s = None;
    let mut fleet = Fleet::new(
        fc,
        6,
        Recorder::Full(Box::new(RunStats::new(slo(), 300.0, 10.0))),
    );
    for (i, r) in w.stream().enumerate() {
        fleet.advance_to(r.arrival_s);
        if i == 2000 {
            fleet.scale_to(1, &[], r.arrival_s);
        }
        fleet.arrive(&r);
    }
    fleet.finish();
    let s = fleet.recorder.stats().expect("full");
    assert_eq!(s.dropped, 0);
    assert_eq!(s.completed, s.arrivals);
}

#[test]
fn a_seed_gives_the_same_run_and_another_seed_a_different_one() {
    let perf = h200();
    let w = poisson(3, 30.0, 600.0, (50, 4000), (1, 500));
    let ctx = baselines::BaselineContext {
        perf: perf.clone(),
        slo: slo(),
        min_replicas: 1,
        max_replicas: 20,
        peak_rps: w.peak_rate(60.0),
        mean_input: w.mean_sizes().0,
        mean_output: w.mean_sizes().1,
    };
    let mut cfg = RunConfig {
        slo: slo(),
        fleet: fleet_config(perf, 30.0),
        initial_replicas: 1,
        chart_bucket_s: 10.0,
    };
    cfg.fleet.cold_start = ColdStart::Uniform(20.0, 60.0);
    let run = |cfg: &RunConfig| {
        let mut b = baselines::baseline("knative-kpa", Some(64.0), &ctx).expect("baseline");
        run_policy(&w, b.as_mut(), cfg, None)
    };
    let a = run(&cfg);
    let b = run(&cfg);
    assert_eq!(a.stats.met_both, b.stats.met_both);
    assert_eq!(a.stats.series.met, b.stats.series.met);
    assert_eq!(a.scale_events, b.scale_events);
    assert_eq!(a.gpu_hours.to_bits(), b.gpu_hours.to_bits());
    cfg.fleet.seed = 8;
    let c = run(&cfg);
    assert!(
        c.stats.series.met != a.stats.series.met || c.scale_events != a.scale_events,
        "another seed draws other cold starts"
    );
}

#[test]
fn rate_series_expansion_is_deterministic_for_a_seed() {
    use gpuscale_sim::trace::{RateWindow, SizePool, Trace, WorkloadOptions};
    let trace = Trace::Rate {
        path: "r.csv".into(),
        windows: vec![
            RateWindow {
                start_s: 0.0,
                len_s: 600.0,
                rate_rps: 3.0,
                cv: Some(2.0),
            },
            RateWindow {
                start_s: 600.0,
                len_s: 600.0,
                rate_rps: 1.0,
                cv: Some(1.0),
            },
        ],
    };
    let sizes = SizePool::from_requests(
        &poisson(4, 1.0, 100.0, (1, 9), (1, 9))
            .stream()
            .collect::<Vec<_>>(),
    );
    let mk = |seed| {
        let opts = WorkloadOptions {
            seed,
            arrivals: gpuscale_sim::trace::ArrivalProcess::Gamma { max_cv: 4.0 },
            ..Default::default()
        };
        Workload::new(&trace, Some(sizes.clone()), &opts)
            .expect("workload")
            .stream()
            .collect::<Vec<_>>()
    };
    assert_eq!(mk(5), mk(5));
    assert_ne!(mk(5), mk(6));
}

/// A model whose service time is `prefill ≈ 0` plus `(output − 1)` steps of 1 ms.
fn constant_step_model() -> PerfModel {
    serde_json::from_value(serde_json::json!({
        "name": "constant", "gpu": "none", "gpus_per_replica": 1,
        "decode_base_s": 0.001, "decode_per_seq_s": 0.0, "decode_per_seq_token_s": 0.0,
        "prefill_base_s": 1e-9, "prefill_per_token_s": 0.0, "prefill_per_token_sq_s": 0.0,
        "kv_capacity_tokens": 1.0e9, "max_batch": 1
    }))
    .expect("model")
}

#[test]
fn a_single_replica_with_batch_one_is_an_mm1_queue() {
    // λ = 3.5/s, exponential service of mean 0.2 s (geometric steps of 1 ms,
    // mean 200): ρ = 0.7. M/M/1 waiting time: P(Wq > t) = ρ·e^{−(μ−λ)t}, so
    // P(Wq = 0) = 0.3, median ln(1.4)/1.5 = 0.224 s, p95 ln(14)/1.5 = 1.759 s.
    let (lambda, mu) = (3.5, 5.0);
    let mut rng = SimRng::new(11, 1);
    let p = 1.0 / 201.0; // geometric steps ≥ 0 with mean 200
    let mut t = 0.0;
    let mut reqs = Vec::new();
    for _ in 0..150_000 {
        t += rng.exponential(1.0 / lambda);
        let steps = (rng.uniform_open0().ln() / (1.0f64 - p).ln()).floor() as u32;
        reqs.push(Request {
            arrival_s: t,
            input_tokens: 1,
            output_tokens: 1 + steps,
        });
    }
    let w = Workload::from_requests("mm1", reqs);
    let cfg = RunConfig {
        slo: Slo {
            ttft_s: 1e-4,
            itl_s: 1.0,
            percentile: 95.0,
            ttft_per_input_token_s: 0.0,
        },
        fleet: fleet_config(constant_step_model(), 0.0),
        initial_replicas: 1,
        chart_bucket_s: 600.0,
    };
    let mut one = FixedReplicas {
        label: "one".into(),
        replicas: 1,
        batch_limit: None,
    };
    let out = run_policy(&w, &mut one, &cfg, None);
    let s = &out.stats;
    assert_eq!(s.completed, s.arrivals);
    let no_wait = s.met_ttft as f64 / s.arrivals as f64;
    let rho = lambda / mu;
    assert!(
        (no_wait - (1.0 - rho)).abs() < 0.02,
        "P(Wq = 0) = {no_wait}"
    );
    let median = s.ttft.quantile(0.5).expect("data");
    let p95 = s.ttft.quantile(0.95).expect("data");
    let want_median = (rho / 0.5f64).ln() / (mu - lambda);
    let want_p95 = (rho / 0.05f64).ln() / (mu - lambda);
    assert!(
        (median - want_median).abs() / want_median < 0.08,
        "median {median} vs {want_median}"
    );
    assert!(
        (p95 - want_p95).abs() / want_p95 < 0.06,
        "p95 {p95} vs {want_p95}"
    );
}

#[test]
fn a_replica_serves_nothing_before_it_is_ready() {
    let mut fc = fleet_config(h200(), 90.0);
    fc.horizon_s = 400.0;
    let mut fleet = Fleet::new(
        fc,
        0,
        Recorder::Full(Box::new(RunStats::new(slo(), 400.0, 10.0))),
    );
    fleet.scale_to(1, &[], 0.0);
    for i in 0..80 {
        let t = f64::from(i);
        fleet.advance_to(t);
        fleet.arrive(&Request {
            arrival_s: t,
            input_tokens: 500,
            output_tokens: 20,
        });
    }
    fleet.advance_to(89.9);
    let r = &fleet.replicas()[0];
    assert_eq!(r.state, Lifecycle::Loading);
    assert_eq!(r.counters.received, 0);
    assert_eq!(r.counters.generation_tokens, 0);
    assert_eq!(fleet.router_queue_len(), 80);
    fleet.advance_to(90.0);
    assert_eq!(fleet.replicas()[0].state, Lifecycle::Ready);
    fleet.finish();
    let s = fleet.recorder.stats().expect("full");
    assert_eq!(s.completed, 80);
    // The last arrival (t = 79) waited at least until the replica was ready.
    let fastest = s.ttft.quantile(0.0).expect("data");
    assert!(fastest >= 90.0 - 79.0 - 0.2, "fastest TTFT {fastest}");
    // GPU time counts from creation, loading included: 400 s of one GPU.
    assert!((fleet.gpu_seconds(400.0) - 400.0).abs() < 1e-6);
}

#[test]
fn the_lower_bound_meets_its_target_for_less_than_the_peak_and_less_than_a_static_fleet() {
    let perf = h200();
    // A step: 20 req/s, then 120 req/s, then back.
    let mut reqs: Vec<Request> = Vec::new();
    for (from, to, rate) in [
        (0.0, 300.0, 20.0),
        (300.0, 600.0, 120.0),
        (600.0, 900.0, 20.0),
    ] {
        let seg = poisson(from as u64 + 9, rate, to - from, (200, 2000), (20, 200));
        reqs.extend(seg.stream().map(|r| Request {
            arrival_s: r.arrival_s + from,
            ..r
        }));
    }
    let w = Workload::from_requests("step", reqs);
    let mut fc = fleet_config(perf, 60.0);
    fc.drain_grace_s = None;
    fc.victim_order = VictimOrder::LeastWork;
    let curves = bound::curves(&w, &fc, slo(), 1, 40, 2, CurveDetail::Full);
    let sat: Vec<u32> = curves.windows.iter().map(|c| c.saturation()).collect();
    let peak = *sat.iter().max().expect("windows");
    assert!(
        peak > sat[0],
        "the step needs more replicas ({} → {peak})",
        sat[0]
    );
    assert!(curves.max_attainment() > 0.99);
    let run = |target: f64| {
        let plan = bound::optimize(&curves, target * curves.max_attainment());
        let cfg = RunConfig {
            slo: slo(),
            fleet: fc.clone(),
            initial_replicas: 2,
            chart_bucket_s: 10.0,
        };
        let mut s = BoundSchedule::new(plan, curves.window_s, 60.0, target);
        run_policy(&w, &mut s, &cfg, None)
    };
    let all = run(1.0);
    assert!(
        all.stats.attainment() >= 0.985,
        "attainment {}",
        all.stats.attainment()
    );
    assert_eq!(all.stats.dropped, 0);
    let peak_static = f64::from(peak) * w.duration_s() / 3600.0;
    assert!(
        all.gpu_hours < peak_static,
        "{} vs {peak_static}",
        all.gpu_hours
    );
    // A lower target costs less.
    let most = run(0.9);
    assert!(
        most.gpu_hours < all.gpu_hours,
        "{} vs {}",
        most.gpu_hours,
        all.gpu_hours
    );
    assert!(most.stats.attainment() < all.stats.attainment());
}
