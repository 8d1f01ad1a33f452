//! The proportional decider: replicas in proportion to demand in generated
//! tokens per second, for workloads without a performance model.
//!
//! `ceil(demand / (capacity · target utilization))`, within bounds, with a
//! tolerance band and the HPA's scale-down stabilization (scale in only to
//! the highest recommendation of the window; [`crate::hpa`]), victims by
//! [`crate::victim`]. Demand is the larger of the measured generation rate
//! and the offered load (arrival rate × mean output tokens), so a saturated
//! fleet, whose generation rate is capped, still sees its queue. Missing or
//! stale telemetry holds the count.
//!
//! Pure, like the rest of the crate: `now` is an argument and the history
//! is a value.

use std::time::Duration;

use gpuscale_core::Timestamp;

use crate::decision::{
    Action, Decision, DecisionInputs, Direction, Limit, ProportionalInputs, Recommendation, Source,
};
use crate::hpa::{
    Behavior, BehaviorState, LimitReason, ScalingRules, SelectPolicy, within_tolerance,
};
use crate::observation::Observation;
use crate::victim;

/// A validated proportional rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ProportionalConfig {
    /// Generated tokens per second one replica sustains.
    pub capacity_tokens_per_second: f64,
    /// Fraction of the capacity to run at, 0 < t ≤ 1.
    pub target_utilization: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Scale-in follows the highest recommendation within this window
    /// (whole seconds).
    pub scale_down_stabilization: Duration,
    /// No change while desired/current is within 1 ± tolerance.
    pub tolerance: f64,
    /// Telemetry older than this holds the count.
    pub stale_after: Duration,
    pub advisory: bool,
}

impl ProportionalConfig {
    /// The HPA behaviour this rule normalises with: no scale-up window, the
    /// scale-down window, no rate policies (only the bounds limit a step).
    fn behavior(&self) -> Behavior {
        let rules = |window: Duration| ScalingRules {
            stabilization_window_s: u32::try_from(window.as_secs()).unwrap_or(u32::MAX),
            select_policy: SelectPolicy::Max,
            policies: Vec::new(),
            tolerance: self.tolerance,
        };
        Behavior {
            scale_up: rules(Duration::ZERO),
            scale_down: rules(self.scale_down_stabilization),
        }
    }
}

/// Decides one workload by the proportional rule; keeps its own history.
#[derive(Debug, Clone)]
pub struct ProportionalDecider {
    config: ProportionalConfig,
    behavior: Behavior,
    state: BehaviorState,
}

impl ProportionalDecider {
    pub fn new(config: ProportionalConfig) -> Self {
        Self {
            behavior: config.behavior(),
            config,
            state: BehaviorState::default(),
        }
    }

    /// Starts the scale-down stabilization history from a previous
    /// controller's last decision ([`BehaviorState::start_from`]).
    pub fn start_from(&mut self, at: Timestamp, desired_replicas: u32) {
        self.state.start_from(at, desired_replicas);
    }

    /// The decision for `obs` at `now`; see the module docs.
    pub fn decide(&mut self, now: Timestamp, obs: &Observation) -> Decision {
        let c = &self.config;
        let current = obs.replicas.current;
        let mut limits = Vec::new();
        let fresh = obs
            .telemetry_at
            .is_some_and(|t| now.secs_since(t) <= c.stale_after.as_secs_f64());
        let demand = demand_tokens_per_second(obs);
        let per_replica = c.capacity_tokens_per_second * c.target_utilization;
        let recommendation = match demand {
            Some(demand) if fresh => Recommendation {
                source: Source::Reactive,
                replicas: Some(
                    (demand / per_replica)
                        .ceil()
                        .clamp(0.0, f64::from(u32::MAX)) as u32,
                ),
                reason: format!(
                    "{demand:.0} tokens/s over {per_replica:.0} tokens/s per replica ({:.0} × {:.0}%)",
                    c.capacity_tokens_per_second,
                    c.target_utilization * 100.0
                ),
            },
            _ => Recommendation {
                source: Source::Hold,
                replicas: Some(current),
                reason: match obs.telemetry_at {
                    _ if fresh => "no token rate from the engines yet".into(),
                    None => "no telemetry".into(),
                    Some(t) => format!("telemetry is {:.0} s old", now.secs_since(t)),
                },
            },
        };
        let winner = recommendation.source;
        let mut proposed = recommendation.replicas.unwrap_or(current);
        if winner == Source::Reactive {
            if current > 0
                && proposed != current
                && within_tolerance(
                    f64::from(proposed) / f64::from(current),
                    c.tolerance,
                    c.tolerance,
                )
            {
                limits.push(Limit::Tolerance {
                    direction: if proposed > current {
                        Direction::Up
                    } else {
                        Direction::Down
                    },
                    proposed,
                    current,
                    tolerance: c.tolerance,
                });
                proposed = current;
            }
            let n = self.state.normalize(
                &self.behavior,
                now,
                current,
                proposed,
                c.min_replicas,
                c.max_replicas,
            );
            if let Some(reason @ LimitReason::ScaleDownStabilized) = n.stabilization {
                limits.push(Limit::Stabilized {
                    reason,
                    proposed: n.proposed,
                    held_at: n.stabilized,
                });
            }
            if matches!(
                n.rate,
                Some(LimitReason::TooManyReplicas | LimitReason::TooFewReplicas)
            ) {
                limits.push(self.bounds(n.stabilized));
            }
            proposed = n.desired;
        } else {
            // Holding never scales in.
            proposed = proposed.max(current);
        }
        let desired = proposed.clamp(c.min_replicas, c.max_replicas);
        if desired != proposed {
            limits.push(self.bounds(proposed));
        }
        let action = match desired.cmp(&current) {
            std::cmp::Ordering::Greater => Action::ScaleUp,
            std::cmp::Ordering::Less => Action::ScaleDown,
            std::cmp::Ordering::Equal => Action::Hold,
        };
        let victims = if action == Action::ScaleDown {
            victim::choose_victims(&obs.replica_samples, (current - desired) as usize, now, 0.0)
        } else {
            Vec::new()
        };
        Decision {
            at: now,
            current_replicas: current,
            desired_replicas: desired,
            batch_limit: None,
            action,
            winner,
            recommendations: vec![recommendation],
            limits,
            victims,
            model_confidence: 0.0,
            advisory: c.advisory,
            slo: gpuscale_core::SloAssessment::NONE,
            inputs: DecisionInputs::Proportional(ProportionalInputs {
                generation_tokens_per_second: obs.load.generation_tokens_per_second,
                arrival_rate_rps: obs.load.arrival_rate_rps,
                mean_output_tokens: obs.load.mean_output_tokens,
                demand_tokens_per_second: demand,
                capacity_tokens_per_second: c.capacity_tokens_per_second,
                target_utilization: c.target_utilization,
                ready: obs.replicas.ready,
                telemetry_age_s: obs.telemetry_at.map(|t| now.secs_since(t)),
            }),
            scale_to_zero: None,
        }
    }
}

impl ProportionalDecider {
    fn bounds(&self, wanted: u32) -> Limit {
        Limit::Bounds {
            wanted,
            min: self.config.min_replicas,
            max: self.config.max_replicas,
        }
    }
}

/// The larger of the measured generation rate and the offered load
/// (arrival rate × mean output tokens); either alone when only one is known.
fn demand_tokens_per_second(obs: &Observation) -> Option<f64> {
    let offered = match (obs.load.arrival_rate_rps, obs.load.mean_output_tokens) {
        (Some(a), Some(o)) => Some(a * o),
        _ => None,
    };
    match (obs.load.generation_tokens_per_second, offered) {
        (Some(g), Some(o)) => Some(g.max(o)),
        (g, o) => g.or(o),
    }
}

#[cfg(test)]
mod tests {
    use crate::observation::{LoadObservation, ReplicaCounts, ReplicaObservation, ReplicaState};

    use super::*;

    fn config() -> ProportionalConfig {
        ProportionalConfig {
            capacity_tokens_per_second: 1_000.0,
            target_utilization: 0.8,
            min_replicas: 1,
            max_replicas: 10,
            scale_down_stabilization: Duration::from_secs(60),
            tolerance: 0.1,
            stale_after: Duration::from_secs(30),
            advisory: false,
        }
    }

    fn obs(at: i64, current: u32, tokens: Option<f64>) -> Observation {
        Observation {
            telemetry_at: Some(Timestamp::from_secs_f64(at as f64)),
            replicas: ReplicaCounts {
                current,
                ready: current,
                ..ReplicaCounts::default()
            },
            replica_samples: (0..current)
                .map(|i| ReplicaObservation {
                    protected: i == 0,
                    requests_running: Some(20.0 - f64::from(i)),
                    requests_waiting: Some(0.0),
                    ..ReplicaObservation::new(format!("pod-{i}"), ReplicaState::Ready)
                })
                .collect(),
            load: LoadObservation {
                generation_tokens_per_second: tokens,
                ..LoadObservation::default()
            },
            latency: Default::default(),
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_secs_f64(s as f64)
    }

    #[test]
    fn scales_up_in_proportion_to_tokens_per_second() {
        let mut d = ProportionalDecider::new(config());
        let decision = d.decide(t(10), &obs(10, 2, Some(4_000.0)));
        // 4000 / (1000 × 0.8) = 5.
        assert_eq!(decision.desired_replicas, 5);
        assert_eq!(decision.action, Action::ScaleUp);
        assert!(
            decision.summary().contains("reactive"),
            "{}",
            decision.summary()
        );
    }

    #[test]
    fn scale_in_is_held_inside_stabilization_window() {
        let mut d = ProportionalDecider::new(config());
        assert_eq!(
            d.decide(t(0), &obs(0, 5, Some(4_000.0))).desired_replicas,
            5
        );
        let low = d.decide(t(30), &obs(30, 5, Some(800.0)));
        assert_eq!(low.desired_replicas, 5, "{:?}", low.limits);
        assert_eq!(low.action, Action::Hold);
        // 61 s later the high recommendation left the window.
        let later = d.decide(t(91), &obs(91, 5, Some(800.0)));
        assert_eq!(later.desired_replicas, 1);
        // Victims: least work first, never the protected pod-0.
        assert_eq!(later.victims, vec!["pod-4", "pod-3", "pod-2", "pod-1"]);
    }

    #[test]
    fn stale_or_missing_telemetry_never_scales_in() {
        let mut d = ProportionalDecider::new(config());
        let missing = d.decide(t(10), &obs(10, 4, None));
        assert_eq!(
            (missing.desired_replicas, missing.winner),
            (4, Source::Hold)
        );
        let stale = d.decide(t(100), &obs(10, 4, Some(0.0)));
        assert_eq!(stale.desired_replicas, 4);
        assert!(stale.summary().contains("90 s old"), "{}", stale.summary());
    }

    #[test]
    fn small_changes_stay_inside_the_tolerance_and_bounds_apply() {
        let mut d = ProportionalDecider::new(ProportionalConfig {
            max_replicas: 20,
            ..config()
        });
        // 12.5 → 13 replicas' worth against 12 current: within 10%.
        let within = d.decide(t(0), &obs(0, 12, Some(10_000.0)));
        assert_eq!(within.desired_replicas, 12);
        assert!(
            within
                .limits
                .iter()
                .any(|l| matches!(l, Limit::Tolerance { .. }))
        );
        let huge = d.decide(t(1), &obs(1, 12, Some(1e9)));
        assert_eq!(huge.desired_replicas, 20);
        assert!(
            huge.limits_applied()
                .iter()
                .any(|l| l.starts_with("bounds"))
        );
    }
}
