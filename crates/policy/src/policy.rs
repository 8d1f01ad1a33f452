//! The policy of one workload: recommendations, combination, safety, decision.
//!
//! [`Policy::decide`] runs, in order:
//!
//! 1. **Freshness.** No telemetry, telemetry older than
//!    `telemetry.staleAfterSeconds`, or no arrival rate: a `hold`
//!    recommendation at the current count joins the others, so the decision
//!    can rise (schedules, forecast, bounds) but never fall. A measured zero
//!    arrival rate with fresh telemetry is a real zero.
//! 2. **Learning** (fresh telemetry only): the arrival rate enters the
//!    stable window and the forecaster's buckets, the request shape is
//!    updated, and the decode model is refined from the replicas' samples.
//! 3. **Sizing**: batch limit `B*`, then the replicas the queueing model
//!    needs ([`crate::sizing`]).
//! 4. **Recommendations**, each with its reason: *reactive* (the stable
//!    window's mean arrival rate; and, when traffic is bursty, the
//!    request-weighted SLO quantile of the short-window rates over the
//!    scale-down stabilization window, the newest panic window left out, so
//!    bursts that recur find the capacity they needed); *panic* (only when the queue grows with no
//!    capacity in flight, the replicas are saturated, or an SLO is breached:
//!    the short-window rate plus the queue's drain, ratcheted — no scale-in
//!    while panicking, for at least one stable window); *SLO feedback* (a
//!    demand factor learned from measured latency quantiles while nothing is
//!    in flight, applied to the stable rate: it grows while the SLO is
//!    breached and relaxes slowly while latency is well under it, so a
//!    systematic model error is corrected once and kept); *predictive* (forecast peak over the horizon,
//!    a floor; published only in `ForecastOnly`); *scheduled* (open rules'
//!    desired count); *hold*.
//! 5. **Combination**: the maximum of the acting recommendations, then the
//!    bounds (schedules raise min or change max), the per-direction
//!    tolerance, the consolidation check (scale in only to a count that
//!    meets the SLOs tightened by the consolidation margin at the higher of
//!    the current and forecast load raised by the same margin — latency near
//!    saturation is steep, so the load headroom is what makes the band), the
//!    cooldown, then HPA-exact
//!    stabilization and rate policies ([`crate::hpa`]).
//! 6. **Victims** for a scale-in ([`crate::victim`]), and the decision record.
//!
//! Capacity in flight: every count is a total (ready + pending + loading)
//! compared with the target's current count, so a shortfall already being
//! met is never requested again; the queue-growth trigger is ignored while
//! replicas are in flight (the queue is the shortfall they will absorb).

use std::collections::VecDeque;

use gpuscale_core::Timestamp;
use gpuscale_core::slo::{SloAssessment, TpotSource};
use serde::Serialize;

use crate::config::WorkloadConfig;
use crate::decision::{Action, Decision, Recommendation, Source};
use crate::forecast::{Forecaster, RateSample};
use crate::hpa::BehaviorState;
use crate::observation::{Observation, ReplicaState};
use crate::perf::PerfModel;
use crate::refine::ModelRefiner;
use crate::schedule::ScheduleEvaluator;
use crate::sizing::{self, Prediction, RequestShape, Sizer, Targets};
use crate::spec::PredictiveMode;
use crate::victim;

/// Latency histograms need at least this many observations in the window
/// before an SLO breach counts.
pub use gpuscale_core::slo::MIN_SLO_SAMPLES;
/// The panic window is this fraction of the stable window (at least 6 s).
pub const PANIC_WINDOW_FRACTION: f64 = 0.1;
/// Largest demand factor SLO feedback may learn.
pub const MAX_FEEDBACK_FACTOR: f64 = 3.0;
/// Growth of the demand factor: `× (1 + 0.5·(e − 1))` per 30 s of a
/// measured latency `e` times its objective.
pub const FEEDBACK_GAIN_PER_S: f64 = 0.5 / 30.0;
/// Decay of the demand factor toward 1 while latency is below
/// [`FEEDBACK_RELAX_BELOW`] of its objective: a quarter per hour.
pub const FEEDBACK_DECAY_PER_S: f64 = 0.25 / 3600.0;
/// Latency, as a fraction of its objective, below which the factor relaxes.
pub const FEEDBACK_RELAX_BELOW: f64 = 0.7;

/// The SLO-feedback demand factor κ: grows while measured latency is over
/// its objective in steady state, relaxes slowly while it is well under.
/// A systematic model error (burstier arrivals than Poisson, a slower
/// engine than profiled) is corrected once and kept, not re-learned at
/// every breach.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DemandFeedback {
    factor: f64,
    updated_at: Option<Timestamp>,
}

impl DemandFeedback {
    fn update(&mut self, now: Timestamp, error: f64) {
        let dt = match self.updated_at {
            Some(t) if now > t => now.secs_since(t).min(60.0),
            Some(_) => return,
            None => 0.0,
        };
        self.updated_at = Some(now);
        if error > 1.0 {
            self.factor *= 1.0 + FEEDBACK_GAIN_PER_S * dt * (error - 1.0).min(2.0);
        } else if error < FEEDBACK_RELAX_BELOW {
            self.factor *= 1.0 - FEEDBACK_DECAY_PER_S * dt;
        }
        self.factor = self.factor.clamp(1.0, MAX_FEEDBACK_FACTOR);
    }
}
/// A burst recommendation is made only when the burst rate exceeds the
/// stable mean by more than this fraction (steady traffic's own noise
/// stays with the reactive recommendation and its queueing model).
pub const BURST_MIN_EXCESS: f64 = 0.25;
/// A burst recommendation needs at least this many requests in the stable
/// window: it sizes past bursts with the window's request sizes, and in a
/// quiet spell those come from a handful of requests (one long prompt would
/// size every remembered burst as long prompts). Inside the burst window the
/// scale-down stabilization already holds what the bursts needed.
pub const BURST_MIN_REQUESTS: f64 = 20.0;
/// KV-cache occupancy at which replicas count as saturated.
pub const KV_SATURATION: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq)]
struct TimedValue {
    at: Timestamp,
    value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct PanicState {
    since: Timestamp,
    last_trigger: Timestamp,
    max_replicas: u32,
}

/// One workload's policy and all its decision history.
#[derive(Debug, Clone)]
pub struct Policy {
    config: WorkloadConfig,
    base_model: PerfModel,
    /// `base_model` as refined, rewritten in place each decision.
    model: PerfModel,
    refiner: ModelRefiner,
    forecaster: Option<Forecaster>,
    behavior: BehaviorState,
    schedule: ScheduleEvaluator,
    rates: VecDeque<TimedValue>,
    /// Short-window arrival rates over the burst window.
    bursts: VecDeque<TimedValue>,
    waiting: VecDeque<TimedValue>,
    shape: Option<RequestShape>,
    last_rate: Option<TimedValue>,
    panic: Option<PanicState>,
    feedback: DemandFeedback,
}

/// The numbers behind a decision (serialised into [`Decision::inputs`]).
#[derive(Debug, Clone, Serialize)]
struct DecisionInputs {
    telemetry_age_s: Option<f64>,
    current: u32,
    ready: u32,
    in_flight: u32,
    arrival_rps: Option<f64>,
    stable_arrival_rps: Option<f64>,
    forecast_rps: Option<f64>,
    waiting: Option<f64>,
    kv_cache_usage_ratio: Option<f64>,
    measured_ttft_s: Option<f64>,
    /// The TPOT percentile judged (per request; token-level ITL where the
    /// engines report nothing else).
    measured_tpot_s: Option<f64>,
    input_tokens: f64,
    output_tokens: f64,
    context_tokens: f64,
    batch_limit: u32,
    model_factor: f64,
    slo_demand_factor: f64,
    min_replicas: u32,
    max_replicas: u32,
    schedules_open: Vec<String>,
    /// The combined recommendation after bounds, tolerance, consolidation,
    /// panic and cooldown: what the behaviour layer stabilized and limited.
    proposed: u32,
    prediction_at_desired: Option<Prediction>,
}

impl Policy {
    /// A policy for `config`, sizing with `model` (resolved from the
    /// config's performance-model source by the caller, e.g. with
    /// [`WorkloadConfig::perf_model`]).
    pub fn new(config: WorkloadConfig, model: PerfModel) -> Policy {
        let forecaster = (config.predictive.mode != PredictiveMode::Off)
            .then(|| Forecaster::new(config.predictive.bucket_s, config.predictive.min_history_s));
        Policy {
            config,
            base_model: model.clone(),
            model,
            refiner: ModelRefiner::default(),
            forecaster,
            behavior: BehaviorState::default(),
            schedule: ScheduleEvaluator::default(),
            rates: VecDeque::new(),
            bursts: VecDeque::new(),
            waiting: VecDeque::new(),
            shape: None,
            last_rate: None,
            panic: None,
            feedback: DemandFeedback {
                factor: 1.0,
                updated_at: None,
            },
        }
    }

    pub fn config(&self) -> &WorkloadConfig {
        &self.config
    }

    /// The performance model as profiled.
    pub fn base_model(&self) -> &PerfModel {
        &self.base_model
    }

    /// The performance model as refined by observations so far.
    pub fn model(&self) -> PerfModel {
        self.refiner.refined(&self.base_model)
    }

    /// Feed long-term arrival history to the forecaster (oldest first): for
    /// example the last 14 days of the ingress request rate from Prometheus
    /// at start-up, or a simulator's pre-roll. Windows overlapping history
    /// already seen (including what [`Policy::decide`] accumulated from live
    /// observations) are skipped. No effect when predictive mode is `Off`.
    pub fn observe_history(&mut self, samples: &[RateSample]) {
        if let Some(f) = &mut self.forecaster {
            f.observe_history(samples);
        }
    }

    /// The forecast arrival rate for the bucket holding `at`, once the
    /// forecaster has its minimum history.
    pub fn forecast_rps(&self, at: Timestamp) -> Option<f64> {
        self.forecaster.as_ref()?.forecast_at(at)
    }

    /// Decide replicas and batch limit for `obs` at `now`. Calling it twice
    /// with the same `now` and `obs` gives the same decision.
    pub fn decide(&mut self, now: Timestamp, obs: &Observation) -> Decision {
        let cfg = &self.config;
        let current = obs.replicas.current;
        let ready = obs.replicas.ready;
        let in_flight = obs.replicas.in_flight();
        self.behavior.forget_from(now);

        // 1. Freshness.
        let telemetry_age_s = obs.telemetry_at.map(|t| now.secs_since(t).max(0.0));
        let fresh = telemetry_age_s.is_some_and(|a| a <= cfg.stale_after_s);
        let arrival = obs
            .load
            .arrival_rate_rps
            .filter(|r| r.is_finite() && *r >= 0.0);
        let hold_reason = match (telemetry_age_s, fresh, arrival) {
            (None, _, _) => Some("no telemetry".to_string()),
            (Some(age), false, _) => Some(format!(
                "telemetry stale ({age:.0} s old, limit {:.0} s)",
                cfg.stale_after_s
            )),
            (_, true, None) => Some("no arrival rate in fresh telemetry".to_string()),
            _ => None,
        };

        // 2. Learning from fresh telemetry.
        let stable_window = cfg.reactive.stable_window_s;
        if fresh {
            self.learn(now, obs, arrival);
        }
        let cfg = &self.config;
        let shape = self.shape.unwrap_or_default();
        self.refiner.refine_into(&self.base_model, &mut self.model);
        let model = &self.model;

        // 3. Sizing.
        let margin = cfg.batch_limit_margin;
        let batch_limit =
            sizing::batch_limit(model, cfg.itl.threshold_s, shape.context_tokens, margin);
        let targets = Targets {
            ttft_s: cfg.ttft.threshold_s * (1.0 - margin),
            ttft_quantile: cfg.ttft.quantile,
            itl_s: cfg.itl.threshold_s * (1.0 - margin),
            itl_quantile: cfg.itl.quantile,
        };
        let strict = (1.0 - margin - cfg.consolidation_margin).max(0.05);
        let strict_targets = Targets {
            ttft_s: cfg.ttft.threshold_s * strict,
            itl_s: cfg.itl.threshold_s * strict,
            ..targets
        };
        let sizer = Sizer::new(model, shape, batch_limit, &targets);

        // 4. Recommendations.
        let mut recs: Vec<Recommendation> = Vec::with_capacity(6);
        let stable_rps = if fresh && arrival.is_some() {
            self.stable_rate(now)
        } else {
            None
        };
        if let Some(reason) = &hold_reason {
            recs.push(Recommendation {
                source: Source::Hold,
                replicas: Some(current),
                reason: format!("{reason}: keep {current}, never scale in on missing data"),
            });
        }
        // Reactive.
        if let Some(rate) = stable_rps {
            let s = sizer.replicas_needed(rate, &targets);
            recs.push(Recommendation {
                source: Source::Reactive,
                replicas: Some(s.replicas),
                reason: format!(
                    "{rate:.2} req/s over {stable_window:.0} s needs {} (TTFT p{} {:.2} s, ITL p{} {:.1} ms at B*={batch_limit}{})",
                    s.replicas,
                    pct(cfg.ttft.quantile),
                    s.prediction.ttft_s,
                    pct(cfg.itl.quantile),
                    1e3 * s.prediction.itl_s,
                    if s.attainable { "" } else { "; SLOs unattainable, sized at 70% utilisation" }
                ),
            });
        } else if fresh {
            // Arrivals unknown: throughput is a lower bound on demand.
            if let Some(gen_tps) = obs.load.generation_tokens_per_second {
                let rate = gen_tps / shape.output_tokens.max(1.0);
                let s = sizer.replicas_needed(rate, &targets);
                recs.push(Recommendation {
                    source: Source::Reactive,
                    replicas: Some(s.replicas),
                    reason: format!(
                        "arrivals unknown; {gen_tps:.0} generated tokens/s ≈ {rate:.2} req/s (a lower bound) needs {}",
                        s.replicas
                    ),
                });
            }
        }
        // Bursts: the short-window rate at which the burst window's
        // requests arrived (the burst window is the scale-down stabilization
        // window), at the SLO quantile (request-weighted), when it is well
        // above the stable mean: bursty traffic needs capacity for its
        // bursts, not for its mean, and bursts that recur within the window
        // then find it ready instead of waiting a cold start each time. The
        // newest panic window is left to the panic recommendation.
        let burst_quantile = cfg.ttft.quantile.max(cfg.itl.quantile);
        let mut burst_rec: Option<Recommendation> = None;
        // Whether to make it is decided on history alone (the stable mean as
        // of the start of the newest panic window, like the bursts), so that
        // more load now never removes it: desired stays monotone in load.
        let panic_window = (stable_window * PANIC_WINDOW_FRACTION).max(6.0);
        if stable_rps.is_some()
            && let Some(rate) = self.stable_rate(now.plus_secs(-panic_window))
            && rate * stable_window >= BURST_MIN_REQUESTS
            && let Some(burst) = self.burst_rate(now, burst_quantile)
            && burst > rate * (1.0 + BURST_MIN_EXCESS)
        {
            let s = sizer.replicas_needed(burst, &targets);
            burst_rec = Some(Recommendation {
                source: Source::Burst,
                replicas: Some(s.replicas),
                reason: format!(
                    "bursts: p{} of the short-window arrival rate over {:.0} s is {burst:.2} req/s ({:.1}× the mean {rate:.2}) and needs {}",
                    pct(burst_quantile),
                    self.burst_window_s(),
                    burst / rate.max(1e-9),
                    s.replicas
                ),
            });
        }
        // Panic and SLO feedback, from the SLO's one definition (per-request
        // TTFT and TPOT at the objectives' percentiles).
        let slo = if fresh {
            cfg.slo_objectives()
                .assess(&obs.latency.slo_window(obs.load.mean_input_tokens))
        } else {
            SloAssessment::NONE
        };
        let measured_ttft = slo.ttft.and_then(|o| o.measured_s);
        let measured_itl = slo.tpot.and_then(|o| o.measured_s);
        let waiting_now = waiting_of(obs, shape);
        let mut panic_trigger: Option<String> = None;
        let mut slo_error: f64 = 0.0;
        if fresh {
            slo_error = slo.worst_ratio().unwrap_or(0.0);
            if slo_error > 1.0 {
                panic_trigger = Some(format!(
                    "SLO breached (TTFT p{} {}, TPOT p{} {}{})",
                    pct(cfg.ttft.quantile),
                    fmt_s(measured_ttft),
                    pct(cfg.itl.quantile),
                    fmt_ms(measured_itl),
                    if slo.tpot_source == Some(TpotSource::TokenLevelFallback) {
                        ", token-level ITL: the engines report no per-request TPOT"
                    } else {
                        ""
                    }
                ));
            } else if in_flight == 0 {
                if let Some(grew) = self.queue_growth(now, waiting_now, ready) {
                    panic_trigger = Some(grew);
                } else if saturated(obs, batch_limit, ready) {
                    panic_trigger = Some(format!(
                        "replicas saturated (KV {:.0}%, {} waiting)",
                        100.0 * obs.load.kv_cache_usage_ratio.unwrap_or(0.0),
                        waiting_now.unwrap_or(0.0)
                    ));
                }
            }
        }
        let short_rps = if fresh { arrival } else { None };
        if panic_trigger.is_some() {
            let drain = if in_flight == 0 {
                waiting_now.unwrap_or(0.0) / (cfg.cold_start_s + cfg.ttft.threshold_s)
            } else {
                0.0
            };
            let rate = short_rps.unwrap_or(0.0).max(stable_rps.unwrap_or(0.0)) + drain;
            let n = sizer.replicas_needed(rate, &targets).replicas;
            let p = self.panic.get_or_insert(PanicState {
                since: now,
                last_trigger: now,
                max_replicas: 0,
            });
            p.last_trigger = now;
            p.max_replicas = p.max_replicas.max(n);
        } else if let Some(p) = self.panic
            && now.secs_since(p.last_trigger) > stable_window
        {
            self.panic = None;
        }
        if let Some(p) = self.panic {
            recs.push(Recommendation {
                source: Source::Panic,
                replicas: Some(p.max_replicas),
                reason: format!(
                    "{}; panicking since {:.0} s ago, holding {} (no scale-in)",
                    panic_trigger.as_deref().unwrap_or("no new trigger"),
                    now.secs_since(p.since),
                    p.max_replicas
                ),
            });
        }
        // After panic: a tie goes to the panic recommendation.
        if let Some(r) = burst_rec {
            recs.push(r);
        }
        // SLO feedback: a demand factor learned from measured latency in
        // steady state (nothing in flight), applied to the stable rate.
        if fresh && in_flight == 0 && (measured_ttft.is_some() || measured_itl.is_some()) {
            self.feedback.update(now, slo_error);
        }
        let kappa = self.feedback.factor;
        if kappa > 1.0 + 1e-6
            && let Some(rate) = stable_rps
        {
            let n = sizer.replicas_needed(rate * kappa, &targets).replicas;
            recs.push(Recommendation {
                    source: Source::SloFeedback,
                    replicas: Some(n),
                    reason: format!(
                        "measured latency has run over the SLO (now {slo_error:.2}× it): demand × {kappa:.2} = {:.2} req/s needs {n}",
                        rate * kappa
                    ),
                });
        }
        // Predictive.
        let forecast_rps = self
            .forecaster
            .as_ref()
            .and_then(|f| f.forecast_peak(now, now.plus_secs(cfg.predictive.horizon_s)));
        if let Some(f) = forecast_rps {
            let s = sizer.replicas_needed(f, &targets);
            let acting = cfg.predictive.mode == PredictiveMode::On;
            recs.push(Recommendation {
                source: Source::Predictive,
                replicas: Some(s.replicas),
                reason: format!(
                    "forecast peak {f:.2} req/s within {:.0} s needs {}{}",
                    cfg.predictive.horizon_s,
                    s.replicas,
                    if acting {
                        " (a floor)"
                    } else {
                        " (forecast only, not acted on)"
                    }
                ),
            });
        }
        // Scheduled.
        let effect = self.schedule.evaluate(&cfg.schedules, now);
        if let Some(d) = effect.desired_replicas {
            recs.push(Recommendation {
                source: Source::Scheduled,
                replicas: Some(d),
                reason: format!("schedule {} sets desired {d}", effect.open.join(", ")),
            });
        }

        // 5. Combination.
        let mut limits: Vec<String> = Vec::new();
        let acting = |r: &Recommendation| {
            !(r.source == Source::Predictive && cfg.predictive.mode != PredictiveMode::On)
        };
        let (mut winner, mut proposed) = (Source::Hold, current);
        let mut any = false;
        for r in recs.iter().filter(|r| acting(r)) {
            if let Some(n) = r.replicas
                && (!any || n > proposed)
            {
                winner = r.source;
                proposed = n;
                any = true;
            }
        }
        if !any {
            // Fresh telemetry without any usable load signal: hold.
            recs.push(Recommendation {
                source: Source::Hold,
                replicas: Some(current),
                reason: "no load signal: keep the current count".into(),
            });
        }
        let min_eff = cfg.min_replicas.max(effect.min_replicas.unwrap_or(0));
        let max_eff = effect.max_replicas.unwrap_or(cfg.max_replicas).max(min_eff);
        if effect.min_replicas.is_some() || effect.max_replicas.is_some() {
            limits.push(format!(
                "schedule {} sets bounds [{min_eff}, {max_eff}]",
                effect.open.join(", ")
            ));
        }
        if proposed < min_eff {
            limits.push(format!("minReplicas {min_eff} raises {proposed}"));
            proposed = min_eff;
        } else if proposed > max_eff {
            limits.push(format!("maxReplicas {max_eff} caps {proposed}"));
            proposed = max_eff;
        }
        // Tolerance per direction.
        let b = &cfg.behavior;
        if current > 0 && proposed != current {
            let ratio = f64::from(proposed) / f64::from(current);
            if proposed > current
                && ratio <= 1.0 + b.scale_up.tolerance
                && proposed <= max_eff
                && current >= min_eff
            {
                limits.push(format!(
                    "{proposed} within scale-up tolerance {:.2} of {current}",
                    b.scale_up.tolerance
                ));
                proposed = current;
            } else if proposed < current
                && ratio >= 1.0 - b.scale_down.tolerance
                && current <= max_eff
            {
                limits.push(format!(
                    "{proposed} within scale-down tolerance {:.2} of {current}",
                    b.scale_down.tolerance
                ));
                proposed = current;
            }
        }
        // Consolidation-aware scale-in.
        if proposed < current && current > min_eff {
            let load = [
                stable_rps,
                short_rps,
                forecast_rps.filter(|_| cfg.predictive.mode == PredictiveMode::On),
            ]
            .into_iter()
            .flatten()
            .fold(0.0, f64::max);
            let headroom = 1.0 + cfg.consolidation_margin;
            let keep = sizer
                .replicas_needed(load * headroom, &strict_targets)
                .replicas;
            if keep > proposed {
                let to = keep.min(current);
                limits.push(format!(
                    "consolidation: {proposed} would not meet the SLOs with {:.0}% margin at {load:.2} req/s × {headroom:.2}; keep {to}",
                    100.0 * (1.0 - strict)
                ));
                proposed = to.max(proposed);
            }
        }
        if proposed < current && self.panic.is_some() {
            limits.push("panic: no scale-in".into());
            proposed = current;
        }
        if proposed < current
            && cfg.cooldown_s > 0.0
            && let Some(last) = self.behavior.last_scale_event()
        {
            let since = now.secs_since(last);
            if since < cfg.cooldown_s {
                limits.push(format!(
                    "cooldown: last scale {since:.0} s ago (< {:.0} s)",
                    cfg.cooldown_s
                ));
                proposed = current;
            }
        }
        // Behaviour: HPA-exact stabilization and rate policies.
        let proposed_to_behavior = proposed;
        let mut desired = if current > max_eff {
            limits.push(format!("current {current} above maxReplicas {max_eff}"));
            max_eff
        } else if current < min_eff {
            limits.push(format!("current {current} below minReplicas {min_eff}"));
            min_eff
        } else {
            let n = self
                .behavior
                .normalize(b, now, current, proposed, min_eff, max_eff);
            if let Some(r) = n.stabilization {
                limits.push(format!(
                    "{}: {} held at {}",
                    r.as_str(),
                    n.proposed,
                    n.stabilized
                ));
            }
            if let Some(r) = n.rate {
                limits.push(format!(
                    "{}: {} limited to {}",
                    r.as_str(),
                    n.stabilized,
                    n.desired
                ));
            }
            n.desired
        };

        // 6. Victims.
        let mut victims = Vec::new();
        if desired < current && !obs.replica_samples.is_empty() {
            let want = (current - desired) as usize;
            victims = victim::choose_victims(
                &obs.replica_samples,
                want,
                now,
                cfg.protection.min_replica_age_s,
            );
            if victims.len() < want {
                let kept = current - victims.len() as u32;
                limits.push(format!(
                    "only {} replicas may be removed (protected, draining or too young): keep {kept}",
                    victims.len()
                ));
                desired = kept;
            }
        }
        if desired != current && !cfg.advisory {
            self.behavior
                .record_scale_event_with(Some(&cfg.behavior), now, current, desired);
        }
        let action = match desired.cmp(&current) {
            std::cmp::Ordering::Greater => Action::ScaleUp,
            std::cmp::Ordering::Less => Action::ScaleDown,
            std::cmp::Ordering::Equal => Action::Hold,
        };
        if !any {
            winner = Source::Hold;
        }
        let inputs = DecisionInputs {
            telemetry_age_s,
            current,
            ready,
            in_flight,
            arrival_rps: arrival,
            stable_arrival_rps: stable_rps,
            forecast_rps,
            waiting: waiting_now,
            kv_cache_usage_ratio: obs.load.kv_cache_usage_ratio,
            measured_ttft_s: measured_ttft,
            measured_tpot_s: measured_itl,
            input_tokens: shape.input_tokens,
            output_tokens: shape.output_tokens,
            context_tokens: shape.context_tokens,
            batch_limit,
            model_factor: self.refiner.factor(),
            slo_demand_factor: kappa,
            min_replicas: min_eff,
            max_replicas: max_eff,
            schedules_open: effect.open,
            proposed: proposed_to_behavior,
            prediction_at_desired: stable_rps.map(|r| sizer.predict(desired, r, cfg.ttft.quantile)),
        };
        Decision {
            at: now,
            current_replicas: current,
            desired_replicas: desired,
            batch_limit: Some(batch_limit),
            action,
            winner,
            recommendations: recs,
            limits_applied: limits,
            victims,
            model_confidence: self.refiner.confidence(),
            advisory: cfg.advisory,
            slo,
            inputs: serde_json::to_value(&inputs).unwrap_or(serde_json::Value::Null),
        }
    }

    /// Fold fresh telemetry into the windows, forecaster, shape and model.
    fn learn(&mut self, now: Timestamp, obs: &Observation, arrival: Option<f64>) {
        let window = self.config.reactive.stable_window_s;
        if let Some(rate) = arrival {
            replace_at(&mut self.rates, now, rate, window);
            let burst_window = self.burst_window_s();
            replace_at(&mut self.bursts, now, rate, burst_window);
            if let Some(f) = &mut self.forecaster {
                let from = match self.last_rate {
                    Some(prev) if prev.at < now => {
                        // Fill at most one staleness limit back: a longer gap stays unknown.
                        let earliest = now.plus_secs(-self.config.stale_after_s);
                        if prev.at > earliest {
                            prev.at
                        } else {
                            earliest
                        }
                    }
                    _ => now,
                };
                f.accumulate(from, now, rate);
            }
            self.last_rate = Some(TimedValue {
                at: now,
                value: rate,
            });
        }
        let shape = {
            let prev = self.shape.unwrap_or_default();
            let l = &obs.load;
            let input = l.mean_input_tokens.filter(|v| v.is_finite() && *v > 0.0);
            let output = l.mean_output_tokens.filter(|v| v.is_finite() && *v > 0.0);
            let input = input.unwrap_or(prev.input_tokens);
            let output = output.unwrap_or(prev.output_tokens);
            let context = l
                .mean_context_tokens
                .filter(|v| v.is_finite() && *v > 0.0)
                .unwrap_or(input + output / 2.0);
            RequestShape {
                input_tokens: input,
                output_tokens: output,
                context_tokens: context,
            }
        };
        self.shape = Some(shape);
        if let Some(w) = waiting_of(obs, shape) {
            replace_at(&mut self.waiting, now, w, window);
        }
        // Prefill share of a replica's time, from the prompt token rate.
        let ready = f64::from(obs.replicas.ready.max(1));
        let prefill_share = obs
            .load
            .prompt_tokens_per_second
            .map(|tps| {
                let per_token = self.base_model.prefill_s(shape.input_tokens) / shape.input_tokens;
                tps / ready * per_token
            })
            .unwrap_or(0.0);
        self.refiner
            .observe(now, &self.base_model, &obs.replica_samples, prefill_share);
    }

    /// Time-weighted mean of the arrival rates in the stable window.
    fn stable_rate(&self, now: Timestamp) -> Option<f64> {
        let start = now.plus_secs(-self.config.reactive.stable_window_s);
        let mut sum = 0.0;
        let mut span = 0.0;
        let mut prev: Option<Timestamp> = None;
        for s in self.rates.iter().filter(|s| s.at >= start && s.at <= now) {
            // Each sample stands for the time since the previous one.
            let from = prev.unwrap_or(s.at);
            let dt = s.at.secs_since(from);
            if dt > 0.0 {
                sum += s.value * dt;
                span += dt;
            }
            prev = Some(s.at);
        }
        if span > 0.0 {
            Some(sum / span)
        } else {
            self.rates.back().filter(|s| s.at <= now).map(|s| s.value)
        }
    }

    /// The burst window: the scale-down stabilization window, at least the
    /// stable window.
    fn burst_window_s(&self) -> f64 {
        f64::from(self.config.behavior.scale_down.stabilization_window_s)
            .max(self.config.reactive.stable_window_s)
    }

    /// The request-weighted `quantile` of the short-window arrival rates
    /// over the burst window, the newest panic window left out: the rate
    /// at or below which that fraction of those requests arrived.
    fn burst_rate(&self, now: Timestamp, quantile: f64) -> Option<f64> {
        let start = now.plus_secs(-self.burst_window_s());
        let panic_window = (self.config.reactive.stable_window_s * PANIC_WINDOW_FRACTION).max(6.0);
        let end = now.plus_secs(-panic_window);
        let mut samples: Vec<(f64, f64)> = Vec::with_capacity(self.bursts.len());
        let mut prev: Option<Timestamp> = None;
        for s in self.bursts.iter().filter(|s| s.at >= start && s.at < end) {
            let dt = prev.map_or(0.0, |p| s.at.secs_since(p));
            prev = Some(s.at);
            if dt > 0.0 && s.value > 0.0 {
                // Requests that arrived in the sample's span.
                samples.push((s.value, s.value * dt));
            }
        }
        let total: f64 = samples.iter().map(|(_, w)| w).sum();
        if samples.len() < 2 || total <= 0.0 {
            return None;
        }
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut seen = 0.0;
        for (rate, w) in &samples {
            seen += w;
            if seen >= quantile * total {
                return Some(*rate);
            }
        }
        samples.last().map(|(r, _)| *r)
    }

    /// A reason if the queue grew over the panic window.
    fn queue_growth(&self, now: Timestamp, waiting_now: Option<f64>, ready: u32) -> Option<String> {
        let w = waiting_now?;
        let window = (self.config.reactive.stable_window_s * PANIC_WINDOW_FRACTION).max(6.0);
        let from = now.plus_secs(-window);
        let reference = self.waiting.iter().find(|s| s.at >= from && s.at < now)?;
        let slack = f64::from(ready.max(1));
        (w > reference.value * 1.2 + slack && w >= slack).then(|| {
            format!(
                "queue grew from {:.0} to {w:.0} in {:.0} s",
                reference.value,
                now.secs_since(reference.at)
            )
        })
    }
}

fn replace_at(buf: &mut VecDeque<TimedValue>, now: Timestamp, value: f64, window_s: f64) {
    while buf.back().is_some_and(|s| s.at >= now) {
        buf.pop_back();
    }
    buf.push_back(TimedValue { at: now, value });
    // Keep one sample older than the window as the left edge.
    let start = now.plus_secs(-window_s);
    while buf.len() > 1 && buf.get(1).is_some_and(|s| s.at <= start) {
        buf.pop_front();
    }
    while buf.len() > 512 {
        buf.pop_front();
    }
}

fn waiting_of(obs: &Observation, shape: RequestShape) -> Option<f64> {
    obs.load
        .requests_waiting
        .or_else(|| {
            obs.load
                .queued_prompt_tokens
                .map(|t| t / shape.input_tokens.max(1.0))
        })
        .filter(|w| w.is_finite() && *w >= 0.0)
}

fn saturated(obs: &Observation, batch_limit: u32, ready: u32) -> bool {
    let waiting = obs.load.requests_waiting.unwrap_or(0.0);
    if waiting < 1.0 || ready == 0 {
        return false;
    }
    let kv = obs.load.kv_cache_usage_ratio.unwrap_or(0.0) >= KV_SATURATION;
    let running_full = obs
        .load
        .requests_running
        .is_some_and(|r| r >= 0.98 * f64::from(batch_limit) * f64::from(ready));
    let per_replica_full = obs
        .replica_samples
        .iter()
        .filter(|r| r.state == ReplicaState::Ready)
        .all(|r| r.kv_cache_usage_ratio.is_some_and(|k| k >= KV_SATURATION))
        && !obs.replica_samples.is_empty();
    kv || running_full || per_replica_full
}

fn pct(q: f64) -> String {
    let p = q * 100.0;
    if (p - p.round()).abs() < 1e-9 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

fn fmt_s(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2} s"))
        .unwrap_or_else(|| "n/a".into())
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1} ms", 1e3 * x))
        .unwrap_or_else(|| "n/a".into())
}
