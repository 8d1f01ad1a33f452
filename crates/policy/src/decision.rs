//! A decision and the reasons behind it, as data.
//!
//! Every decision carries what it decided, which recommendation won, each
//! recommendation's value and reason, the limits applied after combining, the
//! inputs used and the performance model's confidence: enough to answer "why
//! did it scale?" in one line ([`Decision::summary`]) and in full (serde).

use std::fmt;

use gpuscale_core::Timestamp;
use gpuscale_core::slo::{SloAssessment, TpotSource};
use serde::{Deserialize, Serialize};

use crate::hpa::LimitReason;
use crate::idle::IdleChoice;
use crate::sizing::Prediction;
use crate::startup::{Starting, StartupSummary};

/// What a decision does to the scale target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Hold,
    ScaleUp,
    ScaleDown,
}

/// Where a recommendation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Sizing against the SLOs at the current offered load.
    Reactive,
    /// Sizing for the arrival bursts seen within the scale-down
    /// stabilization window (bursty traffic needs capacity for its bursts,
    /// not for its mean).
    Burst,
    /// Short-window burst path: only scales up.
    Panic,
    /// SLO error feedback (measured TTFT/ITL against the SLO).
    SloFeedback,
    /// Forecast floor at the horizon of one cold start.
    Predictive,
    /// A schedule rule's min/max/desired.
    Scheduled,
    /// Missing or stale data: keep the current count.
    Hold,
}

impl Source {
    /// Every source, in the order decision reports list them.
    pub const ALL: [Source; 7] = [
        Source::Reactive,
        Source::Burst,
        Source::Panic,
        Source::SloFeedback,
        Source::Predictive,
        Source::Scheduled,
        Source::Hold,
    ];

    /// Position in [`Source::ALL`]; exhaustive, so a new source cannot be
    /// left out of per-source counts without a compile error here.
    pub fn index(self) -> usize {
        match self {
            Source::Reactive => 0,
            Source::Burst => 1,
            Source::Panic => 2,
            Source::SloFeedback => 3,
            Source::Predictive => 4,
            Source::Scheduled => 5,
            Source::Hold => 6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Reactive => "reactive",
            Source::Burst => "burst",
            Source::Panic => "panic",
            Source::SloFeedback => "slo_feedback",
            Source::Predictive => "predictive",
            Source::Scheduled => "scheduled",
            Source::Hold => "hold",
        }
    }
}

/// One recommendation: a replica count (or none) and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub source: Source,
    pub replicas: Option<u32>,
    pub reason: String,
}

/// The result of one call to the policy for one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at: Timestamp,
    /// The target's replica count when the decision was made.
    pub current_replicas: u32,
    pub desired_replicas: u32,
    /// Per-replica batch limit to publish (`max_num_seqs`-style).
    pub batch_limit: Option<u32>,
    pub action: Action,
    /// The recommendation that set the desired count before limits.
    pub winner: Source,
    pub recommendations: Vec<Recommendation>,
    /// Limits applied after combining, in order (bounds, tolerance,
    /// consolidation, panic, cooldown, stabilization, rate policies,
    /// protection); [`Limit`]'s `Display` renders each as one line.
    pub limits: Vec<Limit>,
    /// Replicas to remove on scale-in, best victim first (never protected ones).
    pub victims: Vec<String>,
    /// Confidence of the performance model behind the sizing, 0..=1.
    pub model_confidence: f64,
    /// Advisory mode: computed and published, never acted on.
    pub advisory: bool,
    /// Where the workload stood against its SLO in the observation the
    /// decision was made from (unknown when that telemetry was missing or
    /// stale): the one status the API, the custom resource and the metrics
    /// publish.
    #[serde(default)]
    pub slo: SloAssessment,
    /// The numbers the decision used, for the full explanation.
    pub inputs: DecisionInputs,
    /// What the scale-to-zero wrapper decided from, for a workload that may
    /// scale to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero: Option<Box<ScaleToZeroInputs>>,
}

/// What a decision of a workload that may scale to zero saw: held requests,
/// idleness and the learned start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleToZeroInputs {
    /// Requests held at the activators.
    pub held: u32,
    pub oldest_held_s: f64,
    /// Requests running or waiting at the replicas.
    pub in_flight: f64,
    pub idle_s: f64,
    pub idle_period: IdleChoice,
    pub startup: StartupSummary,
    /// Replicas still starting, with their expected ready times.
    pub starting: Vec<Starting>,
    /// Replicas expected ready within one p90 start-up.
    pub ready_at_p90_lead: u32,
    pub first_ready_expected: Option<Timestamp>,
}

/// A direction of scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Up,
    Down,
}

/// One limit applied to the combined recommendation, as data. `Display`
/// renders the line that explanations, logs and the API show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "limit", rename_all = "snake_case")]
pub enum Limit {
    /// Open schedule rules set the bounds.
    ScheduleBounds {
        schedules: Vec<String>,
        min: u32,
        max: u32,
    },
    /// `minReplicas` raised the proposal.
    MinReplicas {
        min: u32,
        proposed: u32,
    },
    /// `maxReplicas` capped the proposal.
    MaxReplicas {
        max: u32,
        proposed: u32,
    },
    /// The proposal was within the direction's tolerance of the current count.
    Tolerance {
        direction: Direction,
        proposed: u32,
        current: u32,
        tolerance: f64,
    },
    /// Scale-in only to a count that meets the SLOs with the consolidation
    /// margin at the load raised by the same margin.
    Consolidation {
        proposed: u32,
        keep: u32,
        load_rps: f64,
        headroom: f64,
        margin: f64,
    },
    /// No scale-in while panicking.
    PanicNoScaleIn,
    /// No scale-in within the cooldown after the last scale event.
    Cooldown {
        since_s: f64,
        cooldown_s: f64,
    },
    /// The current count is outside the bounds: set to the bound.
    CurrentAboveMax {
        current: u32,
        max: u32,
    },
    CurrentBelowMin {
        current: u32,
        min: u32,
    },
    /// An HPA stabilization window held the proposal.
    Stabilized {
        reason: LimitReason,
        proposed: u32,
        held_at: u32,
    },
    /// An HPA rate policy or bound limited the stabilized count.
    RateLimited {
        reason: LimitReason,
        from: u32,
        to: u32,
    },
    /// Fewer replicas may be removed than the scale-in asked for.
    Protected {
        removable: u32,
        keep: u32,
    },
    /// The proportional decider's bounds clamped its count.
    Bounds {
        wanted: u32,
        min: u32,
        max: u32,
    },
    /// The observation was incomplete (replicas expected but not heard
    /// from): no scale-in. `what` says how incomplete; `held` is the count
    /// held and the one the scale-in asked for, when one was held.
    Incomplete {
        what: String,
        held: Option<(u32, u32)>,
    },
    /// Replicas in flight, counted at their expected ready times.
    Starting {
        replicas: Vec<Starting>,
    },
    /// Requests held at the activator at zero replicas: scale to one.
    ScaleFromZero {
        held: u32,
        oldest_s: f64,
        expected_at: Timestamp,
        startup: StartupSummary,
    },
    /// Idle for the idle period: scale to zero.
    ScaleToZero {
        idle_s: f64,
        idle: IdleChoice,
    },
    /// Not idle long enough (or requests in flight or held): keep one.
    KeepOne {
        active_ago_s: f64,
        idle: IdleChoice,
        busy: bool,
    },
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::ScheduleBounds {
                schedules,
                min,
                max,
            } => write!(
                f,
                "schedule {} sets bounds [{min}, {max}]",
                schedules.join(", ")
            ),
            Limit::MinReplicas { min, proposed } => {
                write!(f, "minReplicas {min} raises {proposed}")
            }
            Limit::MaxReplicas { max, proposed } => write!(f, "maxReplicas {max} caps {proposed}"),
            Limit::Tolerance {
                direction,
                proposed,
                current,
                tolerance,
            } => write!(
                f,
                "{proposed} within scale-{} tolerance {tolerance:.2} of {current}",
                match direction {
                    Direction::Up => "up",
                    Direction::Down => "down",
                }
            ),
            Limit::Consolidation {
                proposed,
                keep,
                load_rps,
                headroom,
                margin,
            } => write!(
                f,
                "consolidation: {proposed} would not meet the SLOs with {:.0}% margin at {load_rps:.2} req/s × {headroom:.2}; keep {keep}",
                100.0 * margin
            ),
            Limit::PanicNoScaleIn => write!(f, "panic: no scale-in"),
            Limit::Cooldown {
                since_s,
                cooldown_s,
            } => write!(
                f,
                "cooldown: last scale {since_s:.0} s ago (< {cooldown_s:.0} s)"
            ),
            Limit::CurrentAboveMax { current, max } => {
                write!(f, "current {current} above maxReplicas {max}")
            }
            Limit::CurrentBelowMin { current, min } => {
                write!(f, "current {current} below minReplicas {min}")
            }
            Limit::Stabilized {
                reason,
                proposed,
                held_at,
            } => write!(f, "{}: {proposed} held at {held_at}", reason.as_str()),
            Limit::RateLimited { reason, from, to } => {
                write!(f, "{}: {from} limited to {to}", reason.as_str())
            }
            Limit::Protected { removable, keep } => write!(
                f,
                "only {removable} replicas may be removed (protected, draining or too young): keep {keep}"
            ),
            Limit::Bounds { wanted, min, max } => {
                write!(f, "bounds: {wanted} clamped to {min}..={max}")
            }
            Limit::Starting { replicas } => {
                write!(f, "in-flight replicas: ")?;
                for (i, s) in replicas.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(
                        f,
                        "{} ({:?}, {:.0} s old) expected ready at {}",
                        s.id, s.state, s.age_s, s.expected_ready_at
                    )?;
                }
                Ok(())
            }
            Limit::ScaleFromZero {
                held,
                oldest_s,
                expected_at,
                startup,
            } => write!(
                f,
                "scale from zero: {held} requests held at the activator (oldest {oldest_s:.1} s); first replica expected at {expected_at} (p50 start-up {:.1} s, p90 {:.1} s, {} seen)",
                startup.p50_s, startup.p90_s, startup.samples
            ),
            Limit::ScaleToZero { idle_s, idle } => write!(
                f,
                "scale to zero: idle {idle_s:.0} s ≥ idle period {:.0} s ({:?})",
                idle.period_s, idle.reason
            ),
            Limit::KeepOne {
                active_ago_s,
                idle,
                busy,
            } => write!(
                f,
                "at least 1 replica: active {active_ago_s:.0} s ago, scale to zero after {:.0} s idle ({:?}){}",
                idle.period_s,
                idle.reason,
                if *busy {
                    ", requests in flight or held"
                } else {
                    ""
                }
            ),
            Limit::Incomplete { what, held } => {
                write!(f, "{what}")?;
                match held {
                    Some((at, instead)) => {
                        write!(f, "; no scale-in (held at {at} instead of {instead})")
                    }
                    None => Ok(()),
                }
            }
        }
    }
}

/// The numbers a decision used, typed; serialised for the full explanation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "decider", rename_all = "snake_case")]
pub enum DecisionInputs {
    /// No inputs recorded (a decision built elsewhere, e.g. in tests).
    #[default]
    None,
    /// gpuscale's SLO policy ([`crate::Policy`]).
    Slo(Box<SloInputs>),
    /// The throughput-proportional decider.
    Proportional(ProportionalInputs),
}

impl DecisionInputs {
    /// The forecast arrival rate the decision saw, if any.
    pub fn forecast_rps(&self) -> Option<f64> {
        match self {
            DecisionInputs::Slo(i) => i.forecast_rps,
            _ => None,
        }
    }

    /// The share of requests no replica count serves within the TTFT
    /// objective, and whether it exceeds the objective's allowance (no
    /// replica count meets the objective), for a decision of the SLO policy.
    pub fn infeasible(&self) -> Option<(f64, bool)> {
        self.slo().map(|i| {
            (
                i.infeasible_share,
                i.infeasible_share > 1.0 - i.ttft_quantile,
            )
        })
    }

    /// The SLO policy's inputs, if this decision came from it.
    pub fn slo(&self) -> Option<&SloInputs> {
        match self {
            DecisionInputs::Slo(i) => Some(i),
            _ => None,
        }
    }
}

/// The numbers behind a decision of the SLO policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SloInputs {
    pub telemetry_age_s: Option<f64>,
    pub current: u32,
    pub ready: u32,
    pub in_flight: u32,
    pub arrival_rps: Option<f64>,
    pub stable_arrival_rps: Option<f64>,
    pub forecast_rps: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_cache_usage_ratio: Option<f64>,
    pub measured_ttft_s: Option<f64>,
    /// The TPOT percentile judged (per request; token-level ITL where the
    /// engines report nothing else).
    pub measured_tpot_s: Option<f64>,
    pub input_tokens: f64,
    pub output_tokens: f64,
    pub context_tokens: f64,
    /// The TTFT objective of the typical request (the threshold plus its
    /// prompt's allowance where the objective is length-aware).
    pub ttft_objective_s: f64,
    /// The share of requests whose own prefill exceeds their TTFT
    /// objective: no replica count serves them.
    #[serde(default)]
    pub infeasible_share: f64,
    /// The TTFT quantile the SLO feedback judged: the objective's, or its
    /// quantile of the feasible requests when the infeasible ones exceed
    /// its allowance.
    #[serde(default)]
    pub ttft_quantile_feedback: f64,
    /// The objective's own TTFT quantile.
    #[serde(default)]
    pub ttft_quantile: f64,
    pub batch_limit: u32,
    pub model_factor: f64,
    pub slo_demand_factor: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub schedules_open: Vec<String>,
    /// The combined recommendation after bounds, tolerance, consolidation,
    /// panic and cooldown: what the behaviour layer stabilized and limited.
    pub proposed: u32,
    pub prediction_at_desired: Option<Prediction>,
    /// The replicas' start-up learned from this workload's pods (created
    /// to ready; the prior until one is seen): what the predictive lead
    /// time and in-flight replicas are planned with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<StartupSummary>,
}

/// The numbers behind a decision of the throughput-proportional decider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProportionalInputs {
    pub generation_tokens_per_second: Option<f64>,
    pub arrival_rate_rps: Option<f64>,
    pub mean_output_tokens: Option<f64>,
    pub demand_tokens_per_second: Option<f64>,
    pub capacity_tokens_per_second: f64,
    pub target_utilization: f64,
    pub ready: u32,
    pub telemetry_age_s: Option<f64>,
}

impl Decision {
    /// The limits as the lines explanations show.
    pub fn limits_applied(&self) -> Vec<String> {
        self.limits.iter().map(ToString::to_string).collect()
    }

    /// One line: what was decided and why.
    pub fn summary(&self) -> String {
        let what = match self.action {
            Action::Hold => format!("hold at {}", self.current_replicas),
            Action::ScaleUp | Action::ScaleDown => {
                format!("{} -> {}", self.current_replicas, self.desired_replicas)
            }
        };
        // The winning recommendation: of the winner's source, the first with
        // the most replicas (a source can recommend twice, e.g. reactive at
        // the stable rate and at remembered bursts).
        let mut winning: Option<&Recommendation> = None;
        for r in self
            .recommendations
            .iter()
            .filter(|r| r.source == self.winner)
        {
            if winning.is_none_or(|w| r.replicas.unwrap_or(0) > w.replicas.unwrap_or(0)) {
                winning = Some(r);
            }
        }
        let reason = winning.map(|r| r.reason.as_str()).unwrap_or("");
        let mut line = format!("{what}: {} ({reason})", self.winner.as_str());
        for l in &self.limits {
            line.push_str("; ");
            line.push_str(&l.to_string());
        }
        if let Some(b) = self.batch_limit {
            line.push_str(&format!("; batch limit {b}"));
        }
        if self.slo.tpot_source == Some(TpotSource::TokenLevelFallback) {
            line.push_str(
                "; SLO judged on token-level ITL (the engines report no per-request TPOT)",
            );
        }
        if self.advisory {
            line.push_str(" [advisory]");
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(source: Source, replicas: u32, reason: &str) -> Recommendation {
        Recommendation {
            source,
            replicas: Some(replicas),
            reason: reason.into(),
        }
    }

    #[test]
    fn every_source_sits_at_its_index_in_all() {
        for (i, s) in Source::ALL.iter().enumerate() {
            assert_eq!(s.index(), i, "{}", s.as_str());
        }
    }

    #[test]
    fn summary_quotes_the_recommendation_that_won_not_the_first_of_its_source() {
        let d = Decision {
            at: Timestamp::from_millis(0),
            current_replicas: 3,
            desired_replicas: 9,
            batch_limit: None,
            action: Action::ScaleUp,
            winner: Source::Reactive,
            recommendations: vec![
                rec(Source::Reactive, 4, "stable rate needs 4"),
                rec(Source::Panic, 5, "panic"),
                rec(Source::Reactive, 9, "replicas needed 9"),
                rec(Source::Reactive, 9, "a later tie"),
            ],
            limits: Vec::new(),
            victims: Vec::new(),
            model_confidence: 1.0,
            advisory: false,
            slo: SloAssessment::NONE,
            inputs: DecisionInputs::None,
            scale_to_zero: None,
        };
        assert_eq!(d.summary(), "3 -> 9: reactive (replicas needed 9)");
    }
}
