//! The scale-to-zero rule around any decider's decision, for a workload
//! with `minReplicas: 0`: the one implementation the scaler's decide loop
//! and the simulator both apply.
//!
//! It learns the replicas' start-up time ([`crate::startup`]), counts
//! requests held at the activator as demand, scales from zero at once when
//! requests are held (saying when the first replica is expected), keeps at
//! least one replica while the workload is active, and scales to zero
//! after the idle period ([`crate::idle`]), never while a request is in
//! flight or held, and never without the replicas' telemetry. What it did
//! and why goes into the decision (`limits` and `scale_to_zero`). Pure:
//! `now` is an argument.

use std::collections::VecDeque;

use gpuscale_core::Timestamp;

use crate::decision::{Action, Decision, Limit, ScaleToZeroInputs};
use crate::idle::{self, Activity, IdleInputs, ScaleToZeroConfig};
use crate::observation::Observation;
use crate::startup::{StartupModel, StartupTracker};

/// Start-ups kept per workload for the quantiles.
pub(crate) const STARTUP_WINDOW: usize = 64;

/// Requests held for a workload at its activators, now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HeldDemand {
    /// Requests held now.
    pub held: u32,
    /// Requests that ever arrived at the activators (a counter).
    pub arrivals_total: u64,
    /// How long the oldest held request has waited, seconds.
    pub oldest_s: f64,
}

/// The rule's state for one workload: the learned start-up and when it was
/// last active.
#[derive(Debug, Clone)]
pub struct ZeroRule {
    config: ScaleToZeroConfig,
    tracker: StartupTracker,
    last_active: Option<Timestamp>,
    last_arrivals: u64,
    /// Whether a decision since `last_active` found the workload idle.
    idle_seen: bool,
    /// The idle gaps seen, seconds, the most recent [`idle::GAP_WINDOW`].
    gaps: VecDeque<f64>,
}

impl ZeroRule {
    /// The rule for `config`; `prior_s` is the start-up assumed before one
    /// is seen.
    pub fn new(config: ScaleToZeroConfig, prior_s: f64) -> Self {
        Self {
            config,
            tracker: StartupTracker::new(StartupModel::new(prior_s, STARTUP_WINDOW)),
            last_active: None,
            last_arrivals: 0,
            idle_seen: false,
            gaps: VecDeque::with_capacity(idle::GAP_WINDOW),
        }
    }

    pub fn config(&self) -> &ScaleToZeroConfig {
        &self.config
    }

    /// The learned start-up.
    pub fn model(&self) -> &StartupModel {
        self.tracker.model()
    }

    /// When a request last arrived, ran or was held.
    pub fn last_active(&self) -> Option<Timestamp> {
        self.last_active
    }

    /// Applies the rule to `d`, the inner decider's decision at `now` from
    /// `obs`, with `held` requests at the activators.
    pub fn apply(&mut self, now: Timestamp, obs: &Observation, held: HeldDemand, d: &mut Decision) {
        let engine_up = |_: &str| false;
        self.tracker.observe(now, &obs.replica_samples, &engine_up);
        let summary = self.tracker.model().summary();
        let in_flight =
            obs.load.requests_running.unwrap_or(0.0) + obs.load.requests_waiting.unwrap_or(0.0);
        let arrived = held.arrivals_total > self.last_arrivals
            || obs.load.arrival_rate_rps.is_some_and(|r| r > 0.0);
        self.last_arrivals = held.arrivals_total;
        let active = held.held > 0 || in_flight > 0.0 || arrived;
        if active
            && self.idle_seen
            && let Some(since) = self.last_active
        {
            // An idle gap ends: learn its length, as idleness is measured.
            if self.gaps.len() == idle::GAP_WINDOW {
                self.gaps.pop_front();
            }
            self.gaps.push_back(now.secs_since(since));
        }
        self.idle_seen = !active && self.last_active.is_some();
        if active || self.last_active.is_none() {
            self.last_active = Some(now);
        }
        let last_active = self.last_active.unwrap_or(now);
        let choice = idle::idle_period(
            &IdleInputs::from_config(&self.config, summary.p90_s, obs.load.arrival_rate_rps),
            self.gaps.make_contiguous(),
        );

        let starting = self.tracker.starting(now, &obs.replica_samples);
        let first_ready_expected = (obs.replicas.ready == 0)
            .then(|| starting.first().map(|s| s.expected_ready_at))
            .flatten();
        let current = obs.replicas.current;
        let mut note: Option<Limit> = None;
        if current == 0 {
            if held.held > 0 && d.desired_replicas == 0 {
                d.desired_replicas = 1;
                d.action = Action::ScaleUp;
                note = Some(Limit::ScaleFromZero {
                    held: held.held,
                    oldest_s: held.oldest_s,
                    expected_at: now.plus_secs(summary.p50_s),
                    startup: summary,
                });
            }
        } else if d.desired_replicas <= 1 {
            let activity = Activity {
                in_flight,
                held: u64::from(held.held),
                last_active,
            };
            // Never blind: the replicas' running and waiting requests are known.
            let known = obs.load.requests_running.is_some();
            if known && idle::scale_to_zero(now, &activity, &choice) {
                d.desired_replicas = 0;
                d.action = Action::ScaleDown;
                d.victims = obs.replica_samples.iter().map(|r| r.id.clone()).collect();
                note = Some(Limit::ScaleToZero {
                    idle_s: now.secs_since(last_active),
                    idle: choice,
                });
            } else if d.desired_replicas == 0 {
                d.desired_replicas = 1;
                d.action = if current > 1 {
                    Action::ScaleDown
                } else {
                    Action::Hold
                };
                note = Some(Limit::KeepOne {
                    active_ago_s: now.secs_since(last_active),
                    idle: choice,
                    busy: held.held > 0 || in_flight > 0.0,
                });
            }
        }
        if !starting.is_empty() {
            d.limits.push(Limit::Starting {
                replicas: starting.clone(),
            });
        }
        d.limits.extend(note);
        let ready_by_lead =
            self.tracker
                .ready_by(now, now.plus_secs(summary.p90_s), &obs.replica_samples);
        d.scale_to_zero = Some(Box::new(ScaleToZeroInputs {
            held: held.held,
            oldest_held_s: held.oldest_s,
            in_flight,
            idle_s: now.secs_since(last_active),
            idle_period: choice,
            startup: summary,
            starting,
            ready_at_p90_lead: ready_by_lead,
            first_ready_expected,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{DecisionInputs, Source};
    use crate::idle::{IdleReason, MIN_LEARNED_GAPS};
    use crate::observation::{ReplicaObservation, ReplicaState};
    use gpuscale_core::slo::SloAssessment;

    fn t(s: f64) -> Timestamp {
        Timestamp::from_secs_f64(1_700_000_000.0 + s)
    }

    fn hold(now: Timestamp) -> Decision {
        Decision {
            at: now,
            current_replicas: 1,
            desired_replicas: 1,
            batch_limit: None,
            action: Action::Hold,
            winner: Source::Reactive,
            recommendations: Vec::new(),
            limits: Vec::new(),
            victims: Vec::new(),
            model_confidence: 1.0,
            advisory: false,
            slo: SloAssessment::NONE,
            inputs: DecisionInputs::None,
            scale_to_zero: None,
        }
    }

    /// One ready replica; `rps` arrivals/s in the rate window, nothing in
    /// flight.
    fn obs(rps: f64) -> Observation {
        let mut o = Observation::empty();
        o.replicas.current = 1;
        o.replicas.ready = 1;
        o.load.requests_running = Some(0.0);
        o.load.requests_waiting = Some(0.0);
        o.load.arrival_rate_rps = Some(rps);
        o.replica_samples = vec![ReplicaObservation {
            created_at: Some(t(-600.0)),
            requests_running: Some(0.0),
            requests_waiting: Some(0.0),
            ..ReplicaObservation::new("r0", ReplicaState::Ready)
        }];
        o
    }

    /// Bursts of use with 20 s pauses: the rule learns the pauses from its
    /// own decisions (2 s apart) and, once it has seen enough of them,
    /// scales to zero after the period that waits them out (the 30 s
    /// floor) rather than the 330 s break-even; it never scales to zero
    /// inside a pause.
    #[test]
    fn the_rule_learns_its_idle_gaps_and_scales_to_zero_after_the_learned_period() {
        let mut rule = ZeroRule::new(ScaleToZeroConfig::default(), 90.0);
        let mut now = 0.0;
        let step = |rule: &mut ZeroRule, rps: f64, now: &mut f64| {
            let mut d = hold(t(*now));
            rule.apply(t(*now), &obs(rps), HeldDemand::default(), &mut d);
            *now += 2.0;
            d
        };
        for _ in 0..MIN_LEARNED_GAPS + 2 {
            for _ in 0..5 {
                step(&mut rule, 1.0, &mut now);
            }
            for _ in 0..10 {
                let d = step(&mut rule, 0.0, &mut now);
                assert_eq!(d.desired_replicas, 1, "{d:?}");
            }
        }
        step(&mut rule, 1.0, &mut now);
        // While arrivals come the forecast keeps the replica; once they stop,
        // the learned period.
        let d = step(&mut rule, 0.0, &mut now);
        let inputs = d.scale_to_zero.expect("inputs");
        assert_eq!(inputs.idle_period.reason, IdleReason::Learned);
        // Every pause (22 s between active decisions) is below the floor,
        // minIdleSeconds (30 s), which waits them all out.
        assert_eq!(
            inputs.idle_period.period_s, 30.0,
            "{:?}",
            inputs.idle_period
        );
        let mut zero_at = None;
        for _ in 0..40 {
            let d = step(&mut rule, 0.0, &mut now);
            if d.desired_replicas == 0 {
                zero_at = Some(now);
                break;
            }
        }
        let zero_at = zero_at.expect("scaled to zero") - 2.0;
        let last_active = rule.last_active().expect("active");
        let waited = t(zero_at).secs_since(last_active);
        assert!(
            (30.0..=34.0).contains(&waited),
            "scaled to zero after {waited} s"
        );
    }
}
