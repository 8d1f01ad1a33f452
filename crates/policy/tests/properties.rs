//! Properties of `Policy::decide` over random workloads and observation
//! sequences: bounds, rate policies, stabilization, monotonicity in load,
//! determinism, and never scaling in on missing data.

use gpuscale_core::Timestamp;
use gpuscale_policy::hpa::ScalingPolicyKind;
use gpuscale_policy::spec::{BehaviorSpec, ScalingPolicySpec, ScalingRulesSpec};
use gpuscale_policy::{Decision, Observation, Policy, PredictiveMode, WorkloadSpec};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Knobs {
    min: u32,
    max: u32,
    up_pods: u32,
    up_percent: u32,
    up_period: u32,
    down_percent: u32,
    down_period: u32,
    down_window: u32,
    preset: usize,
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        0u32..4,
        1u32..30,
        1u32..8,
        10u32..300,
        5u32..120,
        10u32..100,
        5u32..120,
        0u32..600,
        0usize..4,
    )
        .prop_map(
            |(
                min,
                extra,
                up_pods,
                up_percent,
                up_period,
                down_percent,
                down_period,
                down_window,
                preset,
            )| Knobs {
                min,
                max: min.max(1) + extra,
                up_pods,
                up_percent,
                up_period,
                down_percent,
                down_period,
                down_window,
                preset,
            },
        )
}

fn spec(k: &Knobs) -> WorkloadSpec {
    let preset = gpuscale_policy::perf::PRESET_NAMES[k.preset];
    let mut s = WorkloadSpec::new("w", k.max, preset);
    s.min_replicas = k.min;
    s.predictive.mode = PredictiveMode::Off;
    s.behavior = BehaviorSpec {
        scale_up: Some(ScalingRulesSpec {
            stabilization_window_seconds: Some(0),
            select_policy: None,
            policies: Some(vec![
                ScalingPolicySpec {
                    kind: ScalingPolicyKind::Pods,
                    value: k.up_pods,
                    period_seconds: k.up_period,
                },
                ScalingPolicySpec {
                    kind: ScalingPolicyKind::Percent,
                    value: k.up_percent,
                    period_seconds: k.up_period,
                },
            ]),
            tolerance: None,
        }),
        scale_down: Some(ScalingRulesSpec {
            stabilization_window_seconds: Some(k.down_window),
            select_policy: None,
            policies: Some(vec![ScalingPolicySpec {
                kind: ScalingPolicyKind::Percent,
                value: k.down_percent,
                period_seconds: k.down_period,
            }]),
            tolerance: None,
        }),
    };
    s
}

fn policy(k: &Knobs) -> Policy {
    let config = spec(k).validate().expect("generated specs are valid");
    let model = config.perf_model(None).expect("presets resolve");
    Policy::new(config, model)
}

/// One step of a random timeline.
#[derive(Debug, Clone)]
struct Step {
    dt_s: u32,
    arrival: Option<f64>,
    waiting: f64,
    /// Telemetry age; `None`: no telemetry.
    age_s: Option<u32>,
}

fn steps(max_len: usize) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            1u32..40,
            prop_oneof![4 => (0.0f64..400.0).prop_map(Some), 1 => Just(Some(0.0)), 1 => Just(None)],
            prop_oneof![3 => Just(0.0), 1 => 0.0f64..2000.0],
            prop_oneof![6 => (0u32..20).prop_map(Some), 1 => (61u32..400).prop_map(Some), 1 => Just(None)],
        )
            .prop_map(|(dt_s, arrival, waiting, age_s)| Step {
                dt_s,
                arrival,
                waiting,
                age_s,
            }),
        1..max_len,
    )
}

fn observation(now: Timestamp, s: &Step, current: u32, ready: u32) -> Observation {
    let mut o = Observation::empty();
    o.telemetry_at = s.age_s.map(|a| now.plus_secs(-f64::from(a)));
    o.replicas.current = current;
    o.replicas.ready = ready.min(current);
    o.replicas.loading = current - ready.min(current);
    o.load.arrival_rate_rps = s.arrival;
    o.load.requests_waiting = Some(s.waiting);
    o.load.mean_input_tokens = Some(1500.0);
    o.load.mean_output_tokens = Some(150.0);
    o
}

/// Run a timeline, applying each decision (replicas become ready 30 s
/// later). Returns every (time, decision).
fn run(
    p: &mut Policy,
    k: &Knobs,
    timeline: &[Step],
    start_current: u32,
) -> Vec<(Timestamp, Decision)> {
    let mut now = Timestamp::from_millis(1_750_000_000_000);
    let mut current = start_current.clamp(k.min, k.max);
    let mut ready_at: Vec<Timestamp> = vec![now; current as usize];
    let mut out = Vec::new();
    for s in timeline {
        now = now.plus_secs(f64::from(s.dt_s));
        let ready = ready_at.iter().filter(|t| **t <= now).count() as u32;
        let d = p.decide(now, &observation(now, s, current, ready));
        if d.desired_replicas > current {
            for _ in current..d.desired_replicas {
                ready_at.push(now.plus_secs(30.0));
            }
        } else {
            ready_at.sort();
            ready_at.truncate(d.desired_replicas as usize);
        }
        current = d.desired_replicas;
        out.push((now, d));
    }
    out
}

fn proposed(d: &Decision) -> u32 {
    d.inputs.slo().expect("inputs carry the proposal").proposed
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn desired_is_always_within_min_and_max(k in knobs(), t in steps(40), c in 0u32..40) {
        let mut p = policy(&k);
        for (_, d) in run(&mut p, &k, &t, c) {
            prop_assert!(d.desired_replicas >= k.min && d.desired_replicas <= k.max, "{}", d.summary());
        }
    }

    #[test]
    fn scaling_never_exceeds_the_rate_policies(k in knobs(), t in steps(40), c in 0u32..40) {
        let mut p = policy(&k);
        let decisions = run(&mut p, &k, &t, c);
        // Independent bookkeeping of scale events: (time, change).
        let mut events: Vec<(Timestamp, i64)> = Vec::new();
        for (now, d) in &decisions {
            let cur = i64::from(d.current_replicas);
            let des = i64::from(d.desired_replicas);
            let in_period = |period: u32| -> i64 {
                let cutoff = now.plus_secs(-f64::from(period));
                events.iter().filter(|(t, _)| *t > cutoff).map(|(_, c)| *c).sum()
            };
            if des > cur && cur >= i64::from(k.min) {
                let start = cur - in_period(k.up_period);
                let pods = start + i64::from(k.up_pods);
                let pct = (start as f64 * (1.0 + f64::from(k.up_percent) / 100.0)).ceil() as i64;
                let limit = pods.max(pct).max(cur);
                prop_assert!(des <= limit, "scale-up {cur} -> {des} above limit {limit}: {}", d.summary());
            }
            if des < cur && cur <= i64::from(k.max) {
                let start = cur - in_period(k.down_period);
                let limit = ((start as f64) * (1.0 - f64::from(k.down_percent) / 100.0)).trunc() as i64;
                let limit = limit.min(cur).max(i64::from(k.min));
                prop_assert!(des >= limit, "scale-down {cur} -> {des} below limit {limit}: {}", d.summary());
            }
            if des != cur {
                events.push((*now, des - cur));
            }
        }
    }

    #[test]
    fn no_scale_in_inside_the_stabilization_window(k in knobs(), t in steps(40), c in 0u32..40) {
        let mut p = policy(&k);
        let decisions = run(&mut p, &k, &t, c);
        let window = f64::from(k.down_window);
        for (i, (now, d)) in decisions.iter().enumerate() {
            if d.desired_replicas < d.current_replicas && d.current_replicas <= k.max {
                for (then, earlier) in &decisions[..i] {
                    if now.secs_since(*then) < window {
                        prop_assert!(
                            proposed(earlier) <= d.desired_replicas,
                            "scale-in to {} at {now} while {} was proposed {:.0} s earlier (window {window} s)",
                            d.desired_replicas, proposed(earlier), now.secs_since(*then)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn desired_is_non_decreasing_in_load(
        k in knobs(),
        t in steps(20),
        c in 1u32..20,
        lo in 0.0f64..300.0,
        extra in 0.0f64..300.0,
        w_lo in 0.0f64..500.0,
        w_extra in 0.0f64..500.0,
    ) {
        let mut a = policy(&k);
        let mut b = policy(&k);
        let hist_a = run(&mut a, &k, &t, c);
        let hist_b = run(&mut b, &k, &t, c);
        prop_assert_eq!(&hist_a, &hist_b);
        let (last, d) = hist_a.last().unwrap();
        let now = last.plus_secs(2.0);
        let current = d.desired_replicas;
        let step = |arrival: f64, waiting: f64| Step { dt_s: 2, arrival: Some(arrival), waiting, age_s: Some(0) };
        let low = a.decide(now, &observation(now, &step(lo, w_lo), current, current));
        let high = b.decide(now, &observation(now, &step(lo + extra, w_lo + w_extra), current, current));
        prop_assert!(
            low.desired_replicas <= high.desired_replicas,
            "{} at {lo:.1} req/s but {} at {:.1}:\n{}\n{}",
            low.desired_replicas, high.desired_replicas, lo + extra, low.summary(), high.summary()
        );
    }

    #[test]
    fn identical_inputs_and_now_give_identical_decisions(k in knobs(), t in steps(40), c in 0u32..40) {
        let mut a = policy(&k);
        let mut b = policy(&k);
        let da = run(&mut a, &k, &t, c);
        prop_assert_eq!(&da, &run(&mut b, &k, &t, c));
        // And a decision repeated at the same instant is the same decision.
        let (last, d) = da.last().unwrap();
        let now = last.plus_secs(1.0);
        let obs = observation(now, &t[0], d.desired_replicas, d.desired_replicas);
        let first = a.decide(now, &obs);
        prop_assert_eq!(first, a.decide(now, &obs));
    }

    #[test]
    fn missing_data_never_lowers_replicas(
        k in knobs(),
        t in steps(30),
        c in 0u32..40,
        kind in 0u8..3,
    ) {
        // No stabilization window: only the missing-data rule can hold.
        let k = Knobs { down_window: 0, down_percent: 100, ..k };
        let mut p = policy(&k);
        let hist = run(&mut p, &k, &t, c);
        let (last, d) = hist.last().unwrap();
        // Past the stable window, so no fresh sample remains in it.
        let now = last.plus_secs(120.0);
        let current = d.desired_replicas;
        let s = match kind {
            0 => Step { dt_s: 120, arrival: Some(0.0), waiting: 0.0, age_s: None },
            1 => Step { dt_s: 120, arrival: Some(0.0), waiting: 0.0, age_s: Some(3600) },
            _ => Step { dt_s: 120, arrival: None, waiting: 0.0, age_s: Some(0) },
        };
        let d = p.decide(now, &observation(now, &s, current, current));
        prop_assert!(d.desired_replicas >= current, "{}", d.summary());
    }
}
