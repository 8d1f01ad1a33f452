//! The behaviour layer configured like a Kubernetes HPA reproduces the
//! HPA's documented decisions (REFERENCE.md §1.2) on a scripted metric
//! series: CPU utilization against a 50% target, all pods ready, 15 s syncs,
//! min 1, max 10.

use gpuscale_core::Timestamp;
use gpuscale_policy::WorkloadSpec;
use gpuscale_policy::hpa::{self, Behavior, BehaviorState, LimitReason};

struct Sync {
    t: i64,
    utilization: f64,
    desired: u32,
    limit: Option<LimitReason>,
}

fn sync(t: i64, utilization: f64, desired: u32, limit: Option<LimitReason>) -> Sync {
    Sync {
        t,
        utilization,
        desired,
        limit,
    }
}

/// Run the series; each sync proposes `isWithin(r) ? N : ceil(r × ready)`
/// with `r = utilization / 50` and every pod ready.
fn run(behavior: Option<&Behavior>, series: &[Sync]) {
    let mut state = BehaviorState::default();
    let mut current = 2u32;
    for s in series {
        let now = Timestamp::from_millis(s.t * 1000);
        let pods = vec![hpa::PodMetric::Ready(s.utilization); current as usize];
        let proposal = hpa::plain_metric_proposal(&pods, 50.0, current, 0.1, 0.1)
            .expect("every pod is ready with a metric");
        let out = hpa::reconcile(&mut state, behavior, now, current, proposal, 1, 10);
        assert_eq!(
            out.desired, s.desired,
            "t={}s util {}%: proposal {proposal}, got {out:?}",
            s.t, s.utilization
        );
        let limit = out.rate.or(out.stabilization);
        assert_eq!(limit, s.limit, "t={}s: limit of {out:?}", s.t);
        current = out.desired;
    }
}

#[test]
fn behavior_path_matches_the_documented_hpa() {
    use LimitReason::*;
    let mut series = vec![
        // Within tolerance (|r − 1| ≤ 0.1): no change.
        sync(0, 50.0, 2, None),
        sync(15, 54.0, 2, None),
        // r = 2: ceil(2 × 2) = 4, allowed (max(4 pods, 100%) per 15 s = 6).
        sync(30, 100.0, 4, None),
        // r = 3 on 4 pods → 12; the period starts at 4 (the event at t=30 is
        // exactly one period old and no longer counts): max(4+4, 4×2) = 8.
        sync(45, 150.0, 8, Some(ScaleUpLimit)),
        // r = 1.5 on 8 → 12; the rate allows 16, maxReplicas 10 binds.
        sync(60, 75.0, 10, Some(TooManyReplicas)),
        // r = 0.8 on 10 → 8, but the 300 s window still holds a 12.
        sync(75, 40.0, 10, Some(ScaleDownStabilized)),
    ];
    // r = 0.4 on 10 → 4, held at 10 while the 12 of t=60 is in the window.
    for t in (90..=345).step_by(15) {
        series.push(sync(t, 20.0, 10, Some(ScaleDownStabilized)));
    }
    // t=360: the window (60, 360] holds 8 (t=75) and 4s: down to 8.
    series.push(sync(360, 20.0, 8, Some(ScaleDownStabilized)));
    // t=375: only 4s remain; 100% per 15 s allows it. r = 20/50 on 8 → ceil(3.2) = 4.
    series.push(sync(375, 20.0, 4, None));
    run(Some(&Behavior::hpa_default()), &series);
}

#[test]
fn legacy_path_matches_the_documented_hpa() {
    use LimitReason::*;
    let mut series = vec![
        sync(0, 50.0, 2, None),
        sync(15, 54.0, 2, None),
        // r = 2 → 4 = max(2N, 4).
        sync(30, 100.0, 4, None),
        // 12 capped at max(2 × 4, 4) = 8.
        sync(45, 150.0, 8, Some(ScaleUpLimit)),
        // 12 capped at min(max 10, 16).
        sync(60, 75.0, 10, Some(TooManyReplicas)),
        // The highest recommendation of the last 300 s (12), capped at 10.
        sync(75, 40.0, 10, Some(TooManyReplicas)),
    ];
    for t in (90..=360).step_by(15) {
        // The legacy window includes its cutoff: the 12 of t=60 counts at t=360.
        series.push(sync(t, 20.0, 10, Some(TooManyReplicas)));
    }
    // [75, 375]: 8 (t=75) and 4s.
    series.push(sync(375, 20.0, 8, Some(ScaleDownStabilized)));
    // r = 0.4 on 8 → ceil(3.2) = 4.
    series.push(sync(390, 20.0, 4, None));
    run(None, &series);
}

#[test]
fn a_workload_spec_can_carry_hpa_behaviour_exactly() {
    let yaml = r#"
target: {name: llama}
maxReplicas: 10
performanceModel: {preset: h200-llama3-8b-bf16}
behavior:
  scaleUp:
    stabilizationWindowSeconds: 0
    selectPolicy: Max
    tolerance: 0.1
    policies: [{type: Pods, value: 4, periodSeconds: 15}, {type: Percent, value: 100, periodSeconds: 15}]
  scaleDown:
    stabilizationWindowSeconds: 300
    selectPolicy: Max
    tolerance: 0.1
    policies: [{type: Percent, value: 100, periodSeconds: 15}]
"#;
    let spec: WorkloadSpec = serde_yaml::from_str(yaml).unwrap();
    let config = spec.validate().unwrap();
    assert_eq!(config.behavior, Behavior::hpa_default());
}
