//! Scale to zero: how long a workload may sit idle before its last replica
//! goes, and whether it goes now.
//!
//! Keeping an idle replica costs one replica-second per second. Removing it
//! costs, at the next request, a cold start: the replica is paid while it
//! starts (the learned p90 start-up) and the requests that arrive meanwhile
//! wait, which the spec prices as `coldStartPenalty` replica-seconds. This
//! is ski rental: waiting `P / c` (the break-even, `P` the cold start's
//! cost, `c` a replica's cost per second) before scaling to zero never pays
//! more than twice the best choice in hindsight, whatever the traffic.
//! When the forecast says the next request is expected sooner than that
//! (Poisson arrivals at rate `λ`: an idle replica costs `c / λ` until the
//! next request, less than `P`), scale to zero does not pay: the period is
//! the longest allowed. A spec field fixes the period instead.
//!
//! **Learned from the workload's own idle gaps.** The break-even is the
//! best choice against the worst traffic; a workload's idle gaps are not
//! the worst, and most traffic has two kinds of them: short pauses inside
//! a burst of use and long silences between bursts. Once the rule has seen
//! [`MIN_LEARNED_GAPS`] gaps (measured the way it measures idleness, so
//! the period applies to the same clock), the period is the one that
//! minimises their total cost: a gap `g` shorter than the period `T` costs
//! `g` (the replica is kept through it), a longer one `T + P` (kept `T`,
//! then a cold start). The optimum lies at one of the gaps (the cost is
//! piecewise linear in `T` and rises between them), so the candidates are
//! the observed gaps within `[minIdle, break-even]`, and `minIdle`. Capped
//! at the break-even, so the choice never waits longer than ski rental
//! would; below it the choice pays off exactly when the gaps seen are
//! the gaps to come.
//!
//! Never while a request is in flight at a replica or held at the
//! activator. Pure: `now` is an argument.

use std::time::Duration;

use gpuscale_core::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// `spec.scaleToZero`: the idle policy of a workload with `minReplicas: 0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleToZeroSpec {
    /// Scale to zero after exactly this many idle seconds instead of the
    /// period chosen from the cold start's cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<f64>,
    /// What one cold start costs the requests that wait for it, in
    /// replica-seconds (default 240): the chosen idle period is at most the
    /// p90 start-up plus this (exactly that until 10 idle gaps are seen,
    /// then the least-cost period over the gaps seen).
    #[serde(default = "default_penalty")]
    pub cold_start_penalty_seconds: f64,
    /// Bounds on the chosen idle period (default 30 and 3600 seconds).
    #[serde(default = "default_min_idle")]
    pub min_idle_seconds: f64,
    #[serde(default = "default_max_idle")]
    pub max_idle_seconds: f64,
}

fn default_penalty() -> f64 {
    240.0
}
fn default_min_idle() -> f64 {
    30.0
}
fn default_max_idle() -> f64 {
    3600.0
}

impl Default for ScaleToZeroSpec {
    fn default() -> Self {
        Self {
            idle_seconds: None,
            cold_start_penalty_seconds: default_penalty(),
            min_idle_seconds: default_min_idle(),
            max_idle_seconds: default_max_idle(),
        }
    }
}

/// The validated idle policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleToZeroConfig {
    pub fixed: Option<Duration>,
    pub cold_start_penalty_s: f64,
    pub min: Duration,
    pub max: Duration,
}

impl Default for ScaleToZeroConfig {
    fn default() -> Self {
        ScaleToZeroSpec::default()
            .validate()
            .expect("invariant: the defaults are valid")
    }
}

impl ScaleToZeroSpec {
    /// Checks every field; the error names it (`spec.scaleToZero.*`).
    pub fn validate(&self) -> Result<ScaleToZeroConfig, SpecError> {
        let secs = |field: &str, v: f64| -> Result<Duration, SpecError> {
            if v.is_finite() && (0.0..=86_400.0).contains(&v) {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(SpecError::invalid(
                    format!("spec.scaleToZero.{field}"),
                    v,
                    "0..=86400 seconds",
                ))
            }
        };
        let fixed = self
            .idle_seconds
            .map(|v| secs("idleSeconds", v))
            .transpose()?;
        let penalty = secs("coldStartPenaltySeconds", self.cold_start_penalty_seconds)?;
        let min = secs("minIdleSeconds", self.min_idle_seconds)?;
        let max = secs("maxIdleSeconds", self.max_idle_seconds)?;
        if min > max {
            return Err(SpecError::invalid(
                "spec.scaleToZero.minIdleSeconds",
                self.min_idle_seconds,
                "at most maxIdleSeconds",
            ));
        }
        Ok(ScaleToZeroConfig {
            fixed,
            cold_start_penalty_s: penalty.as_secs_f64(),
            min,
            max,
        })
    }
}

impl IdleInputs {
    /// The inputs from the validated spec, the learned p90 start-up and
    /// the forecast.
    pub(crate) fn from_config(
        c: &ScaleToZeroConfig,
        startup_p90_s: f64,
        forecast_rps: Option<f64>,
    ) -> Self {
        Self {
            startup_p90_s,
            cold_start_penalty_s: c.cold_start_penalty_s,
            forecast_rps,
            fixed: c.fixed,
            min: c.min,
            max: c.max,
        }
    }
}

/// What the idle period is chosen from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleInputs {
    /// The learned p90 start-up, seconds (the replica is paid meanwhile).
    pub startup_p90_s: f64,
    /// What a cold start costs the requests that wait for it, in
    /// replica-seconds (spec `scaleToZero.coldStartPenalty`).
    pub cold_start_penalty_s: f64,
    /// The forecast arrival rate over the next period, requests/s.
    pub forecast_rps: Option<f64>,
    /// A fixed period from the spec (`scaleToZero.idlePeriod`).
    pub fixed: Option<Duration>,
    /// Bounds on the chosen period.
    pub min: Duration,
    pub max: Duration,
}

/// Idle gaps seen before the period is learned from them rather than set
/// to the break-even. The learned period turns on the share of gaps longer
/// than a candidate; with `n` gaps the smallest share seen is `1/n`, and
/// ten resolve it to 10%: the p90 of the gaps, the same quantile the
/// start-up is planned with, is then an observed gap rather than the
/// largest one.
pub const MIN_LEARNED_GAPS: usize = 10;

/// Idle gaps kept per workload (the most recent ones).
pub const GAP_WINDOW: usize = 64;

/// The period in `[lo, hi]` that minimises the total cost of `gaps` (see
/// the module docs), with its cost; ties go to the longer period (the same
/// cost, fewer cold starts).
fn learned_period(gaps: &[f64], cold_cost_s: f64, lo: f64, hi: f64) -> f64 {
    let cost = |t: f64| -> f64 {
        gaps.iter()
            .map(|&g| if g <= t { g } else { t + cold_cost_s })
            .sum()
    };
    let mut best = (lo, cost(lo));
    for t in gaps.iter().copied().filter(|g| (lo..=hi).contains(g)) {
        let c = cost(t);
        if c < best.1 - 1e-9 || (c <= best.1 + 1e-9 && t > best.0) {
            best = (t, c);
        }
    }
    best.0
}

/// Why the period is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleReason {
    /// The spec fixes it.
    Fixed,
    /// Ski rental's break-even: start-up p90 + the cold start's penalty.
    BreakEven,
    /// The forecast expects the next request before the break-even: keep
    /// the replica (the longest period allowed).
    ForecastBusy,
    /// The period of least cost over the idle gaps seen (at most the
    /// break-even).
    Learned,
}

/// The idle period chosen and why.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IdleChoice {
    pub period_s: f64,
    pub reason: IdleReason,
    /// The cold start's cost, replica-seconds.
    pub cold_start_cost_s: f64,
}

/// Chooses the idle period from `inputs` and the idle `gaps` seen
/// (seconds, as the rule measures idleness); see the module docs.
pub fn idle_period(inputs: &IdleInputs, gaps: &[f64]) -> IdleChoice {
    let cost = inputs.startup_p90_s.max(0.0) + inputs.cold_start_penalty_s.max(0.0);
    let (min, max) = (
        inputs.min.as_secs_f64(),
        inputs.max.as_secs_f64().max(inputs.min.as_secs_f64()),
    );
    if let Some(fixed) = inputs.fixed {
        return IdleChoice {
            period_s: fixed.as_secs_f64(),
            reason: IdleReason::Fixed,
            cold_start_cost_s: cost,
        };
    }
    // An idle replica costs 1/λ replica-seconds until the next request.
    if let Some(rate) = inputs.forecast_rps
        && rate > 0.0
        && 1.0 / rate < cost
    {
        return IdleChoice {
            period_s: max,
            reason: IdleReason::ForecastBusy,
            cold_start_cost_s: cost,
        };
    }
    let break_even = cost.clamp(min, max);
    if gaps.len() >= MIN_LEARNED_GAPS {
        return IdleChoice {
            period_s: learned_period(gaps, cost, min, break_even),
            reason: IdleReason::Learned,
            cold_start_cost_s: cost,
        };
    }
    IdleChoice {
        period_s: break_even,
        reason: IdleReason::BreakEven,
        cold_start_cost_s: cost,
    }
}

/// What says whether a workload is idle now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activity {
    /// Requests running or queued at the replicas.
    pub in_flight: f64,
    /// Requests held at the activator.
    pub held: u64,
    /// The last time a request arrived, ran or was held.
    pub last_active: Timestamp,
}

/// Whether to scale to zero at `now`: idle (nothing in flight or held) for
/// at least the chosen period.
pub fn scale_to_zero(now: Timestamp, activity: &Activity, choice: &IdleChoice) -> bool {
    activity.in_flight <= 0.0
        && activity.held == 0
        && now.secs_since(activity.last_active) >= choice.period_s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> IdleInputs {
        IdleInputs {
            startup_p90_s: 60.0,
            cold_start_penalty_s: 240.0,
            forecast_rps: None,
            fixed: None,
            min: Duration::from_secs(30),
            max: Duration::from_secs(3600),
        }
    }

    #[test]
    fn the_period_is_the_break_even_unless_fixed_or_the_forecast_is_busy() {
        let c = idle_period(&inputs(), &[]);
        assert_eq!((c.period_s, c.reason), (300.0, IdleReason::BreakEven));
        // A longer start-up makes a cold start dearer: wait longer.
        let slow = idle_period(
            &IdleInputs {
                startup_p90_s: 600.0,
                ..inputs()
            },
            &[],
        );
        assert_eq!(slow.period_s, 840.0);
        // Bounded.
        let huge = idle_period(
            &IdleInputs {
                cold_start_penalty_s: 1e9,
                ..inputs()
            },
            &[],
        );
        assert_eq!(huge.period_s, 3600.0);
        // A request expected every 100 s (< 300 s): keep the replica.
        let busy = idle_period(
            &IdleInputs {
                forecast_rps: Some(0.01),
                ..inputs()
            },
            &[],
        );
        assert_eq!(
            (busy.period_s, busy.reason),
            (3600.0, IdleReason::ForecastBusy)
        );
        // One expected every hour (> 300 s): the break-even.
        let sparse = idle_period(
            &IdleInputs {
                forecast_rps: Some(1.0 / 3600.0),
                ..inputs()
            },
            &[],
        );
        assert_eq!(sparse.reason, IdleReason::BreakEven);
        let fixed = idle_period(
            &IdleInputs {
                fixed: Some(Duration::from_secs(45)),
                forecast_rps: Some(10.0),
                ..inputs()
            },
            &[],
        );
        assert_eq!((fixed.period_s, fixed.reason), (45.0, IdleReason::Fixed));
    }

    #[test]
    fn the_spec_validates_each_field_by_name() {
        let c = ScaleToZeroSpec::default().validate().unwrap();
        assert_eq!(c.cold_start_penalty_s, 240.0);
        let bad = ScaleToZeroSpec {
            idle_seconds: Some(-1.0),
            ..ScaleToZeroSpec::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("spec.scaleToZero.idleSeconds")
        );
        let crossed = ScaleToZeroSpec {
            min_idle_seconds: 100.0,
            max_idle_seconds: 10.0,
            ..ScaleToZeroSpec::default()
        };
        assert!(
            crossed
                .validate()
                .unwrap_err()
                .to_string()
                .contains("minIdleSeconds")
        );
    }

    #[test]
    fn never_to_zero_with_requests_in_flight_or_held() {
        let t0 = Timestamp::from_millis(1_700_000_000_000);
        let choice = idle_period(&inputs(), &[]);
        let idle = Activity {
            in_flight: 0.0,
            held: 0,
            last_active: t0,
        };
        assert!(!scale_to_zero(t0.plus_secs(299.0), &idle, &choice));
        assert!(scale_to_zero(t0.plus_secs(300.0), &idle, &choice));
        let running = Activity {
            in_flight: 1.0,
            ..idle
        };
        assert!(!scale_to_zero(t0.plus_secs(10_000.0), &running, &choice));
        let held = Activity { held: 3, ..idle };
        assert!(!scale_to_zero(t0.plus_secs(10_000.0), &held, &choice));
    }

    /// Pauses of 5–40 s inside bursts of use and silences of an hour
    /// between them: the period of least cost waits out the pauses (40 s,
    /// not the 300 s break-even), and costs less over those gaps than the
    /// break-even or any other candidate.
    #[test]
    fn the_learned_period_waits_out_the_pauses_and_not_the_silences() {
        let mut gaps = Vec::new();
        for i in 0..30 {
            gaps.push(5.0 + f64::from(i % 8) * 5.0);
            if i % 3 == 0 {
                gaps.push(3_600.0 + f64::from(i) * 10.0);
            }
        }
        let c = idle_period(&inputs(), &gaps);
        assert_eq!((c.period_s, c.reason), (40.0, IdleReason::Learned));
        let total = |t: f64| -> f64 {
            gaps.iter()
                .map(|&g| if g <= t { g } else { t + c.cold_start_cost_s })
                .sum()
        };
        for t in [30.0, 35.0, 39.0, 45.0, 60.0, 120.0, 300.0] {
            assert!(total(40.0) <= total(t), "40 s vs {t} s");
        }
        // Fewer gaps than MIN_LEARNED_GAPS: the break-even.
        let few = idle_period(&inputs(), &gaps[..MIN_LEARNED_GAPS - 1]);
        assert_eq!((few.period_s, few.reason), (300.0, IdleReason::BreakEven));
        // Only long silences: scale to zero as early as allowed.
        let silent = idle_period(&inputs(), &[3_600.0; 12]);
        assert_eq!(silent.period_s, 30.0);
        // Only pauses longer than the break-even would allow: capped at it.
        let long = idle_period(
            &inputs(),
            &[
                250.0, 280.0, 299.0, 310.0, 290.0, 260.0, 270.0, 255.0, 285.0, 295.0,
            ],
        );
        assert!(long.period_s <= 300.0 && long.period_s >= 299.0, "{long:?}");
        // A fixed period still wins.
        let fixed = idle_period(
            &IdleInputs {
                fixed: Some(Duration::from_secs(45)),
                ..inputs()
            },
            &gaps,
        );
        assert_eq!(fixed.reason, IdleReason::Fixed);
    }

    /// Ski rental's bound: against every gap between requests, waiting the
    /// break-even costs at most twice what the best choice in hindsight
    /// (keep if the gap is shorter than the cold start's cost, else scale
    /// to zero at once) costs.
    #[test]
    fn the_break_even_costs_at_most_twice_the_hindsight_optimum() {
        let c = idle_period(&inputs(), &[]);
        let p = c.cold_start_cost_s;
        for gap in [1.0, 50.0, 299.0, 300.0, 301.0, 1_000.0, 100_000.0] {
            let ours = if gap <= c.period_s {
                gap
            } else {
                c.period_s + p
            };
            let best = gap.min(p);
            assert!(ours <= 2.0 * best + 1e-9, "gap {gap}: {ours} vs {best}");
        }
    }
}
