//! The InferenceAutoscaler's `status`: composed (pure) from the latest
//! decision, what `/scale` last said and the controller's conditions, and
//! written by one task with a JSON merge patch on the `status` subresource
//! (strategic merge is not served for custom resources).
//!
//! Conditions (`metav1.Condition`, with `observedGeneration`):
//! * `Ready`: the spec is valid and the target resolved (`TargetResolved`),
//!   or why not (`InvalidSpec`, `UnknownPerformanceModel`,
//!   `TargetKindUnknown`, `TargetNotScalable`, `TargetNotFound`,
//!   `TargetHasNoSelector`).
//! * `ScalingActive`: decisions are made from fresh telemetry
//!   (`TelemetryFresh`), from fresh telemetry of only some of the expected
//!   replicas with the rest carried and scale-in held (`TelemetryIncomplete`,
//!   "incomplete: 2 of 3 replicas reported (silent: node-b)"; with at least
//!   the configured `completeness.minReportingShare` reporting, scale-in is
//!   only limited to the replicas that report), or held for
//!   missing or stale data (`MissingTelemetry`).
//! * `AbleToScale`: `/scale` can be read and written (`ReadyForNewScale`,
//!   `SucceededRescale`, `ExternalChangeAdopted`), or not
//!   (`FailedGetScale`, `FailedUpdateScale`).
//! * `Advisory`: `True` (`AdvisoryMode`) when decisions are published but
//!   never applied.
//!
//! A status that differs only in the decision's wording or time (rates move
//! every tick) is written at most every [`REWORDING_INTERVAL`].
//!
//! `desiredReplicas` with `lastDecisionTime` is the persisted last decision:
//! a scaler that starts or becomes leader holds scale-in below it until the
//! scale-down stabilization window has passed since that time
//! ([`gpuscale_scaler::seed`]; see [`persisted_decision`]).

use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_policy::{Decision, Observation, Source};
use gpuscale_scaler::PersistedDecision;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio::time::Instant;

use crate::context::Shared;
use crate::crd::{InferenceAutoscaler, InferenceAutoscalerStatus, SloStatus, StartupStatus};
use crate::drain::one_line;
use crate::error::KubeError;
use crate::events::{EventSpec, EventType};
use crate::workload::{Cond, WorkloadEntry};

/// A status that changed only in its wording is written at most this often.
pub const REWORDING_INTERVAL: Duration = Duration::from_secs(15);

pub(crate) const READY: &str = "Ready";
pub(crate) const SCALING_ACTIVE: &str = "ScalingActive";
pub(crate) const ABLE_TO_SCALE: &str = "AbleToScale";
pub(crate) const ADVISORY: &str = "Advisory";
pub(crate) const INFEASIBLE_REQUESTS: &str = "InfeasibleRequests";

/// Everything a status is made of.
#[derive(Debug, Clone)]
pub(crate) struct StatusInputs<'a> {
    pub(crate) generation: i64,
    pub(crate) ready: Cond,
    pub(crate) able: Cond,
    pub(crate) advisory: bool,
    pub(crate) selector: Option<&'a str>,
    pub(crate) spec_replicas: Option<u32>,
    pub(crate) last_scale_time: Option<Timestamp>,
    pub(crate) decision: Option<&'a Decision>,
    pub(crate) observation: Option<&'a Observation>,
}

pub(crate) fn time(t: Timestamp) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_millisecond(t.as_millis())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// A condition, keeping `lastTransitionTime` when the status did not change.
pub(crate) fn condition(
    prev: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: i64,
    now: Timestamp,
) -> Condition {
    let since = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: one_line(message, 1000),
        observed_generation: Some(generation),
        last_transition_time: since,
    }
}

fn bool_status(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

fn advisory_condition(
    prev: &[Condition],
    advisory: bool,
    generation: i64,
    now: Timestamp,
) -> Condition {
    if advisory {
        condition(
            prev,
            ADVISORY,
            "True",
            "AdvisoryMode",
            "decisions are computed and published, never applied to the target",
            generation,
            now,
        )
    } else {
        condition(
            prev,
            ADVISORY,
            "False",
            "Acting",
            "decisions are applied to the target",
            generation,
            now,
        )
    }
}

/// `InfeasibleRequests`, for a decision of the SLO policy: True when the
/// requests whose own prefill exceeds the TTFT objective are more than the
/// objective's allowance (no replica count meets it).
fn infeasible_condition(
    prev: &[Condition],
    decision: Option<&Decision>,
    generation: i64,
    now: Timestamp,
) -> Option<Condition> {
    let (share, material) = decision?.inputs.infeasible()?;
    let pct = 100.0 * share;
    Some(if material {
        condition(
            prev,
            INFEASIBLE_REQUESTS,
            "True",
            "PrefillExceedsObjective",
            &format!(
                "{pct:.1}% of requests' own prefill exceeds the TTFT objective, more than its percentile allows: no replica count meets the objective, and the SLO feedback judges the other requests"
            ),
            generation,
            now,
        )
    } else {
        condition(
            prev,
            INFEASIBLE_REQUESTS,
            "False",
            "WithinAllowance",
            &format!(
                "{pct:.1}% of requests' own prefill exceeds the TTFT objective, within what its percentile allows"
            ),
            generation,
            now,
        )
    })
}

/// The status of an autoscaler being acted on.
pub(crate) fn compose(
    prev: Option<&InferenceAutoscalerStatus>,
    i: &StatusInputs<'_>,
    now: Timestamp,
) -> InferenceAutoscalerStatus {
    let prev_conditions: &[Condition] = prev.map_or(&[], |p| &p.conditions);
    let g = i.generation;
    let incomplete = i
        .decision
        .and_then(gpuscale_scaler::complete::incomplete_line);
    let scaling = match (i.decision, incomplete) {
        (None, _) => ("Unknown", "AwaitingDecision", "no decision yet".to_string()),
        (Some(d), _) if d.winner == Source::Hold => (
            "False",
            "MissingTelemetry",
            d.recommendations
                .iter()
                .find(|r| r.source == Source::Hold)
                .map_or_else(|| d.summary(), |r| r.reason.clone()),
        ),
        (Some(_), Some(line)) => (
            "True",
            "TelemetryIncomplete",
            if line.contains(gpuscale_scaler::complete::ENOUGH_REPORTED) {
                format!("{line}; scale-in limited to replicas that report")
            } else {
                format!("{line}; scale-in held, scale-up allowed")
            },
        ),
        (Some(d), None) => (
            "True",
            "TelemetryFresh",
            format!(
                "deciding from fresh telemetry; last winner: {}",
                d.winner.as_str()
            ),
        ),
    };
    let conditions = vec![
        condition(
            prev_conditions,
            READY,
            bool_status(i.ready.status),
            i.ready.reason,
            &i.ready.message,
            g,
            now,
        ),
        condition(
            prev_conditions,
            SCALING_ACTIVE,
            scaling.0,
            scaling.1,
            &scaling.2,
            g,
            now,
        ),
        condition(
            prev_conditions,
            ABLE_TO_SCALE,
            bool_status(i.able.status),
            i.able.reason,
            &i.able.message,
            g,
            now,
        ),
        advisory_condition(prev_conditions, i.advisory, g, now),
    ];
    let mut conditions = conditions;
    conditions.extend(infeasible_condition(prev_conditions, i.decision, g, now));
    let n = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    InferenceAutoscalerStatus {
        observed_generation: Some(g),
        desired_replicas: i.decision.map(|d| n(d.desired_replicas)),
        current_replicas: i.spec_replicas.map(n),
        ready_replicas: i.observation.map(|o| n(o.replicas.ready)),
        batch_limit: i.decision.and_then(|d| d.batch_limit).map(n),
        last_scale_time: i
            .last_scale_time
            .map(time)
            .or_else(|| prev.and_then(|p| p.last_scale_time.clone())),
        last_decision: i.decision.map(|d| one_line(&d.summary(), 1000)),
        last_decision_time: i
            .decision
            .map(|d| time(d.at))
            .or_else(|| prev.and_then(|p| p.last_decision_time.clone())),
        slo_status: Some(
            i.decision
                .map_or(SloStatus::Unknown, |d| SloStatus::from(d.slo.status)),
        ),
        selector: i.selector.map(str::to_string),
        conditions,
        startup: i.decision.and_then(startup_status),
    }
}

/// The learned start-up a decision carries (every decision of the SLO
/// policy; with when the first replica is expected, for a workload that may
/// scale to zero), seconds to a tenth.
fn startup_status(d: &Decision) -> Option<StartupStatus> {
    let s = gpuscale_scaler::zero::WorkloadStartup::of(d)?;
    let tenth = |x: f64| (x * 10.0).round() / 10.0;
    Some(StartupStatus {
        p50_seconds: tenth(s.summary.p50_s),
        p90_seconds: tenth(s.summary.p90_s),
        samples: u32::try_from(s.summary.samples).unwrap_or(u32::MAX),
        first_replica_expected_time: s.first_ready_expected.map(time),
    })
}

/// The status of an autoscaler that cannot act: every condition says why.
pub(crate) fn invalid(
    prev: Option<&InferenceAutoscalerStatus>,
    generation: i64,
    reason: &str,
    message: &str,
    advisory: bool,
    now: Timestamp,
) -> InferenceAutoscalerStatus {
    let prev_conditions: &[Condition] = prev.map_or(&[], |p| &p.conditions);
    let mut status = prev.cloned().unwrap_or_default();
    status.observed_generation = Some(generation);
    status.conditions = vec![
        condition(
            prev_conditions,
            READY,
            "False",
            reason,
            message,
            generation,
            now,
        ),
        condition(
            prev_conditions,
            SCALING_ACTIVE,
            "False",
            reason,
            "nothing is decided until the autoscaler is valid",
            generation,
            now,
        ),
        condition(
            prev_conditions,
            ABLE_TO_SCALE,
            "False",
            reason,
            "nothing is applied until the autoscaler is valid",
            generation,
            now,
        ),
        advisory_condition(prev_conditions, advisory, generation, now),
    ];
    status
}

/// The last decision `status` persisted, when it describes `generation` of
/// the spec and says when it was made (a status of another generation, or
/// one written before `lastDecisionTime` existed, gives none). Its time is
/// moved on by [`REWORDING_INTERVAL`], the most the written time lags the
/// decisions when nothing else changed, so that a hold started from it does
/// not end before the previous leader's would have (the scaler takes a time
/// after its own clock's now as now).
pub(crate) fn persisted_decision(
    status: Option<&InferenceAutoscalerStatus>,
    generation: i64,
) -> Option<PersistedDecision> {
    let s = status?;
    if s.observed_generation != Some(generation) {
        return None;
    }
    let desired = u32::try_from(s.desired_replicas?).ok()?;
    let at = Timestamp::from_millis(s.last_decision_time.as_ref()?.0.as_millisecond());
    Some(PersistedDecision {
        desired_replicas: desired,
        at: at.plus_secs(REWORDING_INTERVAL.as_secs_f64()),
    })
}

/// Whether `a` and `b` differ in more than the decision's wording or time.
fn differs_materially(a: &InferenceAutoscalerStatus, b: &InferenceAutoscalerStatus) -> bool {
    let strip = |s: &InferenceAutoscalerStatus| {
        let mut s = s.clone();
        s.last_decision = None;
        s.last_decision_time = None;
        // A late replica's expected time moves with every decision; that
        // one is expected matters.
        if let Some(t) = s
            .startup
            .as_mut()
            .and_then(|st| st.first_replica_expected_time.as_mut())
        {
            *t = time(Timestamp::from_millis(0));
        }
        for c in &mut s.conditions {
            if c.type_ == SCALING_ACTIVE {
                c.message.clear();
            }
        }
        s
    };
    strip(a) != strip(b)
}

/// Writes `status` (merge patch on `/status`).
pub(crate) async fn patch_status(
    shared: &Shared,
    namespace: &str,
    name: &str,
    status: &InferenceAutoscalerStatus,
) -> Result<(), KubeError> {
    let api: Api<InferenceAutoscaler> = Api::namespaced(shared.client.clone(), namespace);
    let params = PatchParams {
        field_manager: Some(shared.config.field_manager.clone()),
        ..PatchParams::default()
    };
    let patch = json!({"status": status});
    shared
        .write("writing status", async {
            api.patch_status(name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(|e| KubeError::api(format!("writing the status of {namespace}/{name}"), e))
        })
        .await
}

/// Writes the status of every autoscaler being acted on, when it changed:
/// on every new view of the scaler, when woken, and every sync period.
pub(crate) async fn run_writer(shared: Arc<Shared>, store: Store<InferenceAutoscaler>) {
    let handle = shared.scaler.clone();
    let mut view = handle.view();
    let mut written: std::collections::HashMap<
        gpuscale_core::WorkloadRef,
        (i64, InferenceAutoscalerStatus, Instant),
    > = std::collections::HashMap::new();
    loop {
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = shared.status_wake.notified() => {}
            _ = tokio::time::sleep(shared.config.sync_period) => {}
        }
        let current = view.borrow_and_update().clone();
        let entries = shared.entries();
        written.retain(|w, _| entries.iter().any(|e| &e.workload == w));
        for entry in entries {
            let wv = current.workloads.get(&entry.workload);
            let last = written.get(&entry.workload);
            let prev = match last {
                Some((g, s, _)) if *g == entry.generation => Some(s.clone()),
                _ => store
                    .get(&ObjectRef::new(&entry.workload.name).within(&entry.workload.namespace))
                    .and_then(|o| o.status.clone()),
            };
            let (able, spec_replicas, last_scale_time) = {
                let st = entry.state();
                (
                    st.able.clone(),
                    st.last.as_ref().map(|r| r.spec_replicas),
                    st.last_scale_time,
                )
            };
            let inputs = StatusInputs {
                generation: entry.generation,
                ready: ready_condition(&entry),
                able,
                advisory: entry.advisory(),
                selector: Some(&entry.selector),
                spec_replicas,
                last_scale_time,
                decision: wv.and_then(|w| w.decision.as_ref()),
                observation: wv.and_then(|w| w.observation.as_ref()),
            };
            let status = compose(prev.as_ref(), &inputs, shared.clock.now());
            let due = match last {
                None => true,
                Some((g, s, at)) => {
                    *g != entry.generation
                        || differs_materially(s, &status)
                        || ((s.last_decision != status.last_decision
                            || s.last_decision_time != status.last_decision_time)
                            && at.elapsed() >= REWORDING_INTERVAL)
                }
            };
            if !due {
                continue;
            }
            let result = {
                let _writes = shared.status_lock.lock().await;
                // Only while this entry is still the one acted on.
                let current_entry = shared
                    .entry(&entry.workload)
                    .is_some_and(|e| Arc::ptr_eq(&e, &entry));
                if !current_entry {
                    continue;
                }
                patch_status(
                    &shared,
                    &entry.workload.namespace,
                    &entry.workload.name,
                    &status,
                )
                .await
            };
            match result {
                Ok(()) => {
                    written.insert(
                        entry.workload.clone(),
                        (entry.generation, status, Instant::now()),
                    );
                }
                Err(e) => {
                    tracing::debug!(workload = %entry.workload, error = %e, "status write failed; retrying")
                }
            }
            if let Some(d) = wv.and_then(|w| w.decision.as_ref()) {
                announce_advisory(&shared, &entry, d).await;
            }
        }
    }
}

fn ready_condition(entry: &WorkloadEntry) -> Cond {
    let how = if entry.advisory() {
        "advisory: decisions are published, never applied"
    } else {
        "acting through /scale"
    };
    Cond::new(
        true,
        "TargetResolved",
        format!(
            "{} (pods: {}); {how}",
            entry.target.describe(),
            entry.selector
        ),
    )
}

/// In advisory mode, an Event each time the recommendation changes.
async fn announce_advisory(shared: &Shared, entry: &WorkloadEntry, d: &Decision) {
    if !d.advisory || d.desired_replicas == d.current_replicas {
        return;
    }
    let key = (d.current_replicas, d.desired_replicas);
    {
        let mut st = entry.state();
        if st.advisory_announced == Some(key) {
            return;
        }
        st.advisory_announced = Some(key);
    }
    shared
        .events
        .publish(
            &entry.ias,
            EventSpec {
                type_: EventType::Normal,
                reason: "AdvisoryRecommendation",
                action: "Recommend",
                note: format!("would scale {}: {}", entry.target.describe(), d.summary()),
                related: Some(entry.target.reference()),
            },
        )
        .await;
}

#[cfg(test)]
mod tests {
    use gpuscale_policy::Limit;

    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let t0 = Timestamp::from_millis(1_000_000);
        let t1 = Timestamp::from_millis(2_000_000);
        let first = condition(&[], READY, "True", "TargetResolved", "a", 1, t0);
        let same = condition(
            std::slice::from_ref(&first),
            READY,
            "True",
            "TargetResolved",
            "b",
            2,
            t1,
        );
        assert_eq!(same.last_transition_time, first.last_transition_time);
        assert_eq!(same.observed_generation, Some(2));
        let flipped = condition(
            std::slice::from_ref(&first),
            READY,
            "False",
            "InvalidSpec",
            "c",
            2,
            t1,
        );
        assert_eq!(flipped.last_transition_time, time(t1));
    }

    #[test]
    fn an_invalid_autoscaler_says_why_in_every_condition() {
        let s = invalid(
            None,
            3,
            "InvalidSpec",
            "spec.minReplicas: 5 is not allowed",
            false,
            Timestamp::from_millis(0),
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.conditions.len(), 4);
        for c in &s.conditions[..3] {
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", "InvalidSpec")
            );
        }
        assert!(s.conditions[0].message.contains("spec.minReplicas"));
        assert_eq!(s.conditions[3].type_, ADVISORY);
    }

    fn decided(at: Timestamp, current: u32, desired: u32, limits: Vec<Limit>) -> Decision {
        Decision {
            at,
            current_replicas: current,
            desired_replicas: desired,
            batch_limit: None,
            action: gpuscale_policy::Action::Hold,
            winner: Source::Reactive,
            recommendations: vec![],
            limits,
            victims: vec![],
            model_confidence: 1.0,
            advisory: false,
            slo: Default::default(),
            inputs: gpuscale_policy::DecisionInputs::None,
            scale_to_zero: None,
        }
    }

    fn with_infeasible(mut d: Decision, share: f64, sized: f64) -> Decision {
        d.inputs = gpuscale_policy::DecisionInputs::Slo(Box::new(gpuscale_policy::SloInputs {
            telemetry_age_s: Some(1.0),
            current: d.current_replicas,
            ready: d.current_replicas,
            in_flight: 0,
            arrival_rps: Some(5.0),
            stable_arrival_rps: Some(5.0),
            forecast_rps: None,
            waiting: Some(0.0),
            kv_cache_usage_ratio: None,
            measured_ttft_s: None,
            measured_tpot_s: None,
            input_tokens: 30_000.0,
            output_tokens: 100.0,
            context_tokens: 30_000.0,
            ttft_objective_s: 1.0,
            infeasible_share: share,
            ttft_quantile_feedback: sized,
            ttft_quantile: 0.95,
            batch_limit: 64,
            model_factor: 1.0,
            slo_demand_factor: 1.0,
            min_replicas: 1,
            max_replicas: 10,
            schedules_open: vec![],
            proposed: d.desired_replicas,
            prediction_at_desired: None,
            startup: Some(gpuscale_policy::startup::StartupSummary {
                samples: 4,
                p50_s: 71.04,
                p90_s: 88.96,
            }),
        }));
        d
    }

    /// The condition is there for the SLO policy's decisions only, True
    /// exactly when the infeasible requests exceed the objective's
    /// allowance, and keeps its transition time while it holds.
    #[test]
    fn infeasible_requests_are_a_condition_when_they_exceed_the_allowance() {
        let at = Timestamp::from_millis(1_700_000_000_000);
        let plain = compose(None, &inputs(&decided(at, 2, 2, vec![])), at);
        assert!(
            plain
                .conditions
                .iter()
                .all(|c| c.type_ != INFEASIBLE_REQUESTS)
        );
        let find = |s: &InferenceAutoscalerStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == INFEASIBLE_REQUESTS)
                .cloned()
                .expect("the condition")
        };
        let within = with_infeasible(decided(at, 2, 2, vec![]), 0.02, 0.95);
        let s1 = compose(None, &inputs(&within), at);
        let c1 = find(&s1);
        assert_eq!(
            (c1.status.as_str(), c1.reason.as_str()),
            ("False", "WithinAllowance")
        );
        assert!(c1.message.contains("2.0%"), "{}", c1.message);
        let over = with_infeasible(decided(at, 2, 2, vec![]), 0.12, 0.836);
        let s2 = compose(Some(&s1), &inputs(&over), at.plus_secs(10.0));
        let c2 = find(&s2);
        assert_eq!(
            (c2.status.as_str(), c2.reason.as_str()),
            ("True", "PrefillExceedsObjective")
        );
        assert!(c2.message.contains("12.0%"), "{}", c2.message);
        assert_eq!(c2.last_transition_time, time(at.plus_secs(10.0)));
        let s3 = compose(Some(&s2), &inputs(&over), at.plus_secs(20.0));
        assert_eq!(find(&s3).last_transition_time, c2.last_transition_time);
    }

    fn inputs(decision: &Decision) -> StatusInputs<'_> {
        StatusInputs {
            generation: 1,
            ready: Cond::new(true, "TargetResolved", "ok"),
            able: Cond::new(true, "ReadyForNewScale", "ok"),
            advisory: false,
            selector: None,
            spec_replicas: Some(decision.current_replicas),
            last_scale_time: None,
            decision: Some(decision),
            observation: None,
        }
    }

    #[test]
    fn an_incomplete_decision_says_whether_scale_in_was_held_or_limited() {
        let now = Timestamp::from_millis(1_000_000);
        let scaling = |what: &str| {
            let d = decided(
                now,
                10,
                10,
                vec![Limit::Incomplete {
                    what: what.to_string(),
                    held: None,
                }],
            );
            let s = compose(None, &inputs(&d), now);
            let c = s
                .conditions
                .into_iter()
                .find(|c| c.type_ == SCALING_ACTIVE)
                .expect("ScalingActive");
            assert_eq!(c.reason, "TelemetryIncomplete");
            c.message
        };
        let held = scaling("incomplete: 8 of 10 replicas reported (silent: node-c)");
        assert!(held.ends_with("scale-in held, scale-up allowed"), "{held}");
        let limited = scaling(&format!(
            "incomplete: 9 of 10 replicas reported (silent: node-c); at least 9 required: {}",
            gpuscale_scaler::complete::ENOUGH_REPORTED
        ));
        assert!(
            limited.ends_with("scale-in limited to replicas that report"),
            "{limited}"
        );
    }

    #[test]
    fn the_status_persists_the_decision_and_its_time_for_the_next_leader() {
        let at = Timestamp::from_millis(1_750_000_000_000);
        let d = decided(at, 6, 6, vec![]);
        let s = compose(None, &inputs(&d), at);
        assert_eq!(s.desired_replicas, Some(6));
        assert_eq!(s.last_decision_time, Some(time(at)));
        // Read back, with the writer's delay added to its time.
        assert_eq!(
            persisted_decision(Some(&s), 1),
            Some(PersistedDecision {
                desired_replicas: 6,
                at: at.plus_secs(REWORDING_INTERVAL.as_secs_f64()),
            })
        );
        // Another generation of the spec, or no time: none.
        assert_eq!(persisted_decision(Some(&s), 2), None);
        let mut untimed = s.clone();
        untimed.last_decision_time = None;
        assert_eq!(persisted_decision(Some(&untimed), 1), None);
        let mut negative = s.clone();
        negative.desired_replicas = Some(-1);
        assert_eq!(persisted_decision(Some(&negative), 1), None);
        assert_eq!(persisted_decision(None, 1), None);
        // A newer decision's time alone is not worth a write before the
        // rewording interval.
        let later = decided(at.plus_secs(2.0), 6, 6, vec![]);
        let s2 = compose(Some(&s), &inputs(&later), at.plus_secs(2.0));
        assert_ne!(s.last_decision_time, s2.last_decision_time);
        assert!(!differs_materially(&s, &s2));
    }

    /// A decision of a workload that may scale to zero.
    fn at_zero_rule(
        at: Timestamp,
        current: u32,
        desired: u32,
        first_ready_expected: Option<Timestamp>,
    ) -> Decision {
        let mut d = decided(at, current, desired, vec![]);
        d.scale_to_zero = Some(Box::new(gpuscale_policy::ScaleToZeroInputs {
            held: 3,
            oldest_held_s: 0.5,
            in_flight: 0.0,
            idle_s: 0.0,
            idle_period: gpuscale_policy::idle::IdleChoice {
                period_s: 300.0,
                reason: gpuscale_policy::idle::IdleReason::BreakEven,
                cold_start_cost_s: 300.0,
            },
            startup: gpuscale_policy::startup::StartupSummary {
                samples: 3,
                p50_s: 41.26,
                p90_s: 58.04,
            },
            starting: vec![],
            ready_at_p90_lead: 0,
            first_ready_expected,
        }));
        d
    }

    #[test]
    fn the_learned_start_up_and_the_first_replicas_expected_time_are_in_the_status() {
        let at = Timestamp::from_millis(1_750_000_000_000);
        // Scaling from zero: the first replica at now + the p50 start-up.
        let from_zero = compose(None, &inputs(&at_zero_rule(at, 0, 1, None)), at);
        let st = from_zero.startup.clone().expect("startup");
        assert_eq!(
            (st.p50_seconds, st.p90_seconds, st.samples),
            (41.3, 58.0, 3)
        );
        assert_eq!(
            st.first_replica_expected_time,
            Some(time(at.plus_secs(41.26)))
        );
        // Starting: the starting replica's expected time, which moves with
        // each decision without being worth a write of its own.
        let t = at.plus_secs(2.0);
        let starting = compose(
            Some(&from_zero),
            &inputs(&at_zero_rule(t, 1, 1, Some(t.plus_secs(40.0)))),
            t,
        );
        let moved = compose(
            Some(&starting),
            &inputs(&at_zero_rule(t, 1, 1, Some(t.plus_secs(45.0)))),
            t,
        );
        assert_eq!(
            starting
                .startup
                .as_ref()
                .unwrap()
                .first_replica_expected_time,
            Some(time(t.plus_secs(40.0)))
        );
        assert!(!differs_materially(&starting, &moved));
        // Ready: none expected, written as null so that the merge patch
        // removes the field.
        let ready = compose(Some(&moved), &inputs(&at_zero_rule(t, 1, 1, None)), t);
        assert_eq!(
            ready.startup.as_ref().unwrap().first_replica_expected_time,
            None
        );
        assert!(differs_materially(&moved, &ready));
        let json = serde_json::to_value(&ready).unwrap();
        assert!(json["startup"]["firstReplicaExpectedTime"].is_null());
        assert!(json["startup"].get("firstReplicaExpectedTime").is_some());
        // Any other decision of the SLO policy: its learned start-up, and
        // no first replica to expect (its replicas never all go).
        let other = compose(
            None,
            &inputs(&with_infeasible(decided(at, 2, 2, vec![]), 0.0, 0.95)),
            at,
        );
        let st = other.startup.clone().expect("startup of a policy decision");
        assert_eq!(
            (st.p50_seconds, st.p90_seconds, st.samples),
            (71.0, 89.0, 4)
        );
        assert_eq!(st.first_replica_expected_time, None);
        // A decider that learns no start-up publishes none.
        let none = compose(None, &inputs(&decided(at, 2, 2, vec![])), at);
        assert_eq!(none.startup, None);
        assert!(
            serde_json::to_value(&none)
                .unwrap()
                .get("startup")
                .is_none()
        );
    }
}
