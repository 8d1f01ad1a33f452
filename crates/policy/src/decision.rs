//! A decision and the reasons behind it, as data.
//!
//! Every decision carries what it decided, which recommendation won, each
//! recommendation's value and reason, the limits applied after combining, the
//! inputs used and the performance model's confidence: enough to answer "why
//! did it scale?" in one line ([`Decision::summary`]) and in full (serde).

use gpuscale_core::Timestamp;
use gpuscale_core::slo::{SloAssessment, TpotSource};
use serde::{Deserialize, Serialize};

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
    /// Limits applied after combining, in order, as one line each
    /// (bounds, stabilization, rate policies, consolidation, hold).
    pub limits_applied: Vec<String>,
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
    pub inputs: serde_json::Value,
}

impl Decision {
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
        if !self.limits_applied.is_empty() {
            line.push_str("; ");
            line.push_str(&self.limits_applied.join("; "));
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
            limits_applied: Vec::new(),
            victims: Vec::new(),
            model_confidence: 1.0,
            advisory: false,
            slo: SloAssessment::NONE,
            inputs: serde_json::Value::Null,
        };
        assert_eq!(d.summary(), "3 -> 9: reactive (replicas needed 9)");
    }
}
