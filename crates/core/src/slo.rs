//! The SLO: one definition for the policy, the scaler's API, the custom
//! resource's status, the exported metrics and the simulator.
//!
//! **A request meets its SLO** when its own time to first token is within
//! the TTFT objective (for a length-aware objective, the threshold plus an
//! allowance per prompt token) and its own time per output token (TPOT: its
//! decode time over its output tokens after the first) is within the TPOT
//! objective. A request with a single output token has no TPOT and meets
//! that objective. Attainment is the share of requests that meet both.
//!
//! **A workload meets its SLO** over a window when the objective's
//! percentile of the window's per-request TTFT and per-request TPOT is
//! within the threshold ([`SloObjectives::assess`]). Engines that publish
//! only token-level inter-token latency (no request-level TPOT histogram)
//! are judged on it instead, and the assessment says so
//! ([`TpotSource::TokenLevelFallback`]): the percentile of token gaps is
//! not the percentile of requests' mean gaps. Fewer than
//! [`MIN_SLO_SAMPLES`] observations are no evidence: **unknown**.
//!
//! Pure: no clock, no I/O.

use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;

/// Observations an objective needs in a window before it is judged.
pub const MIN_SLO_SAMPLES: u64 = 20;

/// A measured percentile above this fraction of its threshold is at risk.
pub const AT_RISK_FRACTION: f64 = 0.8;

/// A latency objective: the `quantile` of the latency at most `threshold_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyObjective {
    pub threshold_s: f64,
    /// 0.5 ≤ quantile < 1 (a percentile of 95 is 0.95).
    pub quantile: f64,
}

/// A workload's latency objectives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SloObjectives {
    /// Time to first token; for a prompt of `T` tokens the threshold is
    /// `ttft.threshold_s + ttft_per_input_token_s · T`.
    pub ttft: LatencyObjective,
    /// Extra TTFT allowed per prompt token, seconds (0: a flat objective).
    #[serde(default)]
    pub ttft_per_input_token_s: f64,
    /// Time per output token of each request.
    pub tpot: LatencyObjective,
}

/// Whether one request met each objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestOutcome {
    pub ttft_met: bool,
    pub tpot_met: bool,
}

impl RequestOutcome {
    pub fn met(&self) -> bool {
        self.ttft_met && self.tpot_met
    }
}

/// Where a workload stands against its objectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SloStatus {
    /// Every objective with evidence is met with room.
    Met,
    /// Met, but a measured percentile is above [`AT_RISK_FRACTION`] of its threshold.
    AtRisk,
    /// A measured percentile is over its threshold.
    Breached,
    /// No objective has enough observations (or the workload has no objectives).
    Unknown,
}

impl SloStatus {
    pub const ALL: [SloStatus; 4] = [
        SloStatus::Met,
        SloStatus::AtRisk,
        SloStatus::Breached,
        SloStatus::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SloStatus::Met => "met",
            SloStatus::AtRisk => "at_risk",
            SloStatus::Breached => "breached",
            SloStatus::Unknown => "unknown",
        }
    }

    /// How bad: the worse of two statuses wins; unknown is the least.
    fn severity(self) -> u8 {
        match self {
            SloStatus::Unknown => 0,
            SloStatus::Met => 1,
            SloStatus::AtRisk => 2,
            SloStatus::Breached => 3,
        }
    }
}

/// Which histogram the TPOT objective was judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TpotSource {
    /// Per-request time per output token (the SLO's definition).
    Request,
    /// Token-level inter-token latency: the engines report no per-request
    /// TPOT.
    TokenLevelFallback,
}

/// One objective against one window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveAssessment {
    pub status: SloStatus,
    /// The threshold judged against (length-aware TTFT: at the window's mean prompt).
    pub threshold_s: f64,
    /// The objective's percentile of the window's observations, when there are enough.
    pub measured_s: Option<f64>,
    /// Observations in the window.
    pub samples: u64,
}

impl ObjectiveAssessment {
    /// Measured over threshold (1 is at the objective); `None` without evidence.
    pub fn ratio(&self) -> Option<f64> {
        self.measured_s.map(|m| m / self.threshold_s.max(1e-12))
    }

    fn judge(objective: LatencyObjective, threshold_s: f64, window: Option<&Histogram>) -> Self {
        let samples = window.map_or(0, Histogram::count);
        let measured_s = window
            .filter(|h| h.count() >= MIN_SLO_SAMPLES)
            .and_then(|h| h.quantile(objective.quantile));
        let status = match measured_s {
            None => SloStatus::Unknown,
            Some(m) if m > threshold_s => SloStatus::Breached,
            Some(m) if m > AT_RISK_FRACTION * threshold_s => SloStatus::AtRisk,
            Some(_) => SloStatus::Met,
        };
        Self {
            status,
            threshold_s,
            measured_s,
            samples,
        }
    }
}

/// A workload's latencies over a window against its objectives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SloAssessment {
    /// The worst status of the objectives with evidence.
    pub status: SloStatus,
    pub ttft: Option<ObjectiveAssessment>,
    pub tpot: Option<ObjectiveAssessment>,
    /// Which histogram the TPOT objective was judged on, when it had one.
    pub tpot_source: Option<TpotSource>,
}

impl Default for SloAssessment {
    fn default() -> Self {
        Self::NONE
    }
}

impl SloAssessment {
    /// No objectives: nothing to judge.
    pub const NONE: SloAssessment = SloAssessment {
        status: SloStatus::Unknown,
        ttft: None,
        tpot: None,
        tpot_source: None,
    };

    /// The largest measured-over-threshold ratio of the objectives with
    /// evidence (above 1: breached); `None` without evidence.
    pub fn worst_ratio(&self) -> Option<f64> {
        [self.ttft, self.tpot]
            .into_iter()
            .flatten()
            .filter_map(|o| o.ratio())
            .reduce(f64::max)
    }
}

/// A window's latency histograms, as engines report them.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyWindow<'a> {
    /// Per-request time to first token.
    pub ttft: Option<&'a Histogram>,
    /// Per-request time per output token.
    pub tpot: Option<&'a Histogram>,
    /// Token-level inter-token gaps (the TPOT fallback).
    pub itl: Option<&'a Histogram>,
    /// The window's mean prompt, tokens (for a length-aware TTFT objective).
    pub mean_input_tokens: Option<f64>,
}

impl SloObjectives {
    /// The TTFT threshold for a prompt of `input_tokens`.
    pub fn ttft_threshold_s(&self, input_tokens: f64) -> f64 {
        self.ttft.threshold_s + self.ttft_per_input_token_s * input_tokens.max(0.0)
    }

    /// Whether one request met each objective: its TTFT, its TPOT (`None`
    /// for a single output token), and its prompt length.
    pub fn request(&self, ttft_s: f64, tpot_s: Option<f64>, input_tokens: u32) -> RequestOutcome {
        RequestOutcome {
            ttft_met: ttft_s <= self.ttft_threshold_s(f64::from(input_tokens)),
            tpot_met: tpot_s.is_none_or(|t| t <= self.tpot.threshold_s),
        }
    }

    /// The window's latencies against the objectives. A length-aware TTFT
    /// objective is judged at the window's mean prompt (a histogram of
    /// TTFTs does not say which prompt each came from); without a mean
    /// prompt, at its flat threshold.
    pub fn assess(&self, w: &LatencyWindow<'_>) -> SloAssessment {
        let ttft_threshold = self.ttft_threshold_s(w.mean_input_tokens.unwrap_or(0.0));
        let ttft = w
            .ttft
            .map(|h| ObjectiveAssessment::judge(self.ttft, ttft_threshold, Some(h)));
        // Request-level TPOT wherever engines report it; token-level gaps
        // only where they report nothing else.
        let (tpot_hist, tpot_source) = match (w.tpot, w.itl) {
            (Some(t), _) => (Some(t), Some(TpotSource::Request)),
            (None, Some(i)) => (Some(i), Some(TpotSource::TokenLevelFallback)),
            (None, None) => (None, None),
        };
        let tpot = tpot_hist
            .map(|h| ObjectiveAssessment::judge(self.tpot, self.tpot.threshold_s, Some(h)));
        let status = [ttft, tpot]
            .into_iter()
            .flatten()
            .map(|o| o.status)
            .max_by_key(|s| s.severity())
            .unwrap_or(SloStatus::Unknown);
        SloAssessment {
            status,
            ttft,
            tpot,
            tpot_source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objectives() -> SloObjectives {
        SloObjectives {
            ttft: LatencyObjective {
                threshold_s: 0.5,
                quantile: 0.9,
            },
            ttft_per_input_token_s: 0.0,
            tpot: LatencyObjective {
                threshold_s: 0.05,
                quantile: 0.9,
            },
        }
    }

    fn ttft(values: &[(f64, u64)]) -> Histogram {
        let mut h = Histogram::ttft();
        for (v, n) in values {
            h.observe_n(*v, *n);
        }
        h
    }

    fn tpot(values: &[(f64, u64)]) -> Histogram {
        let mut h = Histogram::tpot();
        for (v, n) in values {
            h.observe_n(*v, *n);
        }
        h
    }

    #[test]
    fn a_request_meets_its_slo_with_its_own_ttft_and_tpot() {
        let o = objectives();
        assert!(o.request(0.4, Some(0.04), 100).met());
        assert!(!o.request(0.6, Some(0.04), 100).met());
        assert!(!o.request(0.4, Some(0.06), 100).met());
        assert!(o.request(0.4, None, 100).met(), "one output token: no TPOT");
        let long = SloObjectives {
            ttft_per_input_token_s: 40e-6,
            ..o
        };
        // 0.5 s + 40 µs × 10 000 tokens = 0.9 s.
        assert!(long.request(0.85, Some(0.01), 10_000).met());
        assert!(!long.request(0.95, Some(0.01), 10_000).met());
    }

    #[test]
    fn the_worst_objective_with_evidence_decides() {
        let o = objectives();
        let fast = ttft(&[(0.1, 100)]);
        let slow_tokens = tpot(&[(0.2, 100)]);
        let a = o.assess(&LatencyWindow {
            ttft: Some(&fast),
            tpot: Some(&slow_tokens),
            ..LatencyWindow::default()
        });
        assert_eq!(a.status, SloStatus::Breached);
        assert_eq!(a.tpot_source, Some(TpotSource::Request));
        assert!(a.worst_ratio().is_some_and(|r| r > 1.0));
        let only_ttft = o.assess(&LatencyWindow {
            ttft: Some(&fast),
            ..LatencyWindow::default()
        });
        assert_eq!(only_ttft.status, SloStatus::Met);
        let close = ttft(&[(0.45, 100)]);
        let at_risk = o.assess(&LatencyWindow {
            ttft: Some(&close),
            ..LatencyWindow::default()
        });
        assert_eq!(at_risk.status, SloStatus::AtRisk);
    }

    #[test]
    fn few_observations_are_unknown_not_met() {
        let o = objectives();
        let few = ttft(&[(5.0, MIN_SLO_SAMPLES - 1)]);
        let a = o.assess(&LatencyWindow {
            ttft: Some(&few),
            ..LatencyWindow::default()
        });
        assert_eq!(a.status, SloStatus::Unknown);
        assert_eq!(a.ttft.map(|t| t.samples), Some(MIN_SLO_SAMPLES - 1));
        assert_eq!(
            o.assess(&LatencyWindow::default()).status,
            SloStatus::Unknown
        );
    }

    #[test]
    fn token_level_itl_stands_in_only_without_request_level_tpot() {
        let o = objectives();
        let gaps = tpot(&[(0.2, 1_000)]);
        let requests = tpot(&[(0.01, 100)]);
        let fallback = o.assess(&LatencyWindow {
            itl: Some(&gaps),
            ..LatencyWindow::default()
        });
        assert_eq!(fallback.tpot_source, Some(TpotSource::TokenLevelFallback));
        assert_eq!(fallback.status, SloStatus::Breached);
        let both = o.assess(&LatencyWindow {
            tpot: Some(&requests),
            itl: Some(&gaps),
            ..LatencyWindow::default()
        });
        assert_eq!(both.tpot_source, Some(TpotSource::Request));
        assert_eq!(both.status, SloStatus::Met);
    }

    #[test]
    fn a_length_aware_ttft_is_judged_at_the_windows_mean_prompt() {
        let o = SloObjectives {
            ttft_per_input_token_s: 100e-6,
            ..objectives()
        };
        let h = ttft(&[(0.9, 100)]);
        let short = o.assess(&LatencyWindow {
            ttft: Some(&h),
            mean_input_tokens: Some(1_000.0),
            ..LatencyWindow::default()
        });
        assert_eq!(short.status, SloStatus::Breached, "0.6 s threshold");
        let long = o.assess(&LatencyWindow {
            ttft: Some(&h),
            mean_input_tokens: Some(8_000.0),
            ..LatencyWindow::default()
        });
        assert_eq!(long.ttft.map(|t| t.threshold_s), Some(1.3));
        assert_ne!(long.status, SloStatus::Breached);
    }
}
