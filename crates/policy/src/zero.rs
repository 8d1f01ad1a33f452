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

use gpuscale_core::Timestamp;

use crate::decision::{Action, Decision, Limit, ScaleToZeroInputs};
use crate::idle::{self, Activity, IdleInputs, ScaleToZeroConfig};
use crate::observation::Observation;
use crate::startup::{StartupModel, StartupTracker};

/// Start-ups kept per workload for the quantiles.
pub const STARTUP_WINDOW: usize = 64;

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
        if held.held > 0 || in_flight > 0.0 || arrived || self.last_active.is_none() {
            self.last_active = Some(now);
        }
        let last_active = self.last_active.unwrap_or(now);
        let choice = idle::idle_period(&IdleInputs::from_config(
            &self.config,
            summary.p90_s,
            obs.load.arrival_rate_rps,
        ));
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
