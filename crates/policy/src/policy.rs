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
//!    capacity in flight or the replicas are saturated — a breach alone is
//!    the SLO feedback's: the short-window rate plus the queue's drain,
//!    ratcheted — no scale-in while panicking, for at least one stable
//!    window); *SLO feedback* (a demand factor learned from measured latency
//!    quantiles while nothing is in flight, applied to the stable rate: it
//!    grows while the SLO is breached and returns to 1 within one cold start
//!    plus one stable window of latency under the consolidation level,
//!    bounded by what the model, its latency scaled by its measured error
//!    (measured over predicted), says meets the objectives); *predictive*
//!    (forecast peak over the horizon, a floor; published only in
//!    `ForecastOnly`); *scheduled* (open rules'
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
use gpuscale_core::slo::SloAssessment;

use crate::config::WorkloadConfig;
use crate::decision::{Action, Decision, DecisionInputs, Recommendation, SloInputs};
use crate::forecast::{Forecaster, RateSample};
use crate::hpa::BehaviorState;
use crate::limits;
use crate::observation::{Observation, ReplicaState};
use crate::perf::PerfModel;
use crate::refine::ModelRefiner;
use crate::schedule::ScheduleEvaluator;
use crate::sizing::{self, Floor, RequestShape, Sizer, Targets};
use crate::sources;
use crate::spec::PredictiveMode;
use crate::startup::{StartupModel, StartupTracker};
use crate::zero::STARTUP_WINDOW;

/// Latency histograms need at least this many observations in the window
/// before an SLO breach counts.
pub use gpuscale_core::slo::MIN_SLO_SAMPLES;
/// The panic window is this fraction of the stable window (at least 6 s).
pub(crate) const PANIC_WINDOW_FRACTION: f64 = 0.1;
/// Largest demand factor SLO feedback may learn.
pub(crate) const MAX_FEEDBACK_FACTOR: f64 = 3.0;
/// Largest model error (measured / predicted latency) the feedback's bound
/// scales the model by: past it the tightened objectives are below any
/// count's prediction anyway, and the floor bound takes over.
pub(crate) const MAX_MODEL_ERROR: f64 = 100.0;
/// Growth of the demand factor: `× (1 + 0.5·(e − 1))` per 30 s of a
/// measured latency `e` times its objective.
pub(crate) const FEEDBACK_GAIN_PER_S: f64 = 0.5 / 30.0;

/// The SLO-feedback demand factor κ, with anti-windup.
///
/// It grows while measured latency is over its objective in steady state
/// (nothing in flight), so a systematic model error (burstier arrivals than
/// Poisson, a slower engine than profiled) is corrected. It cannot stick:
/// while measured latency is under the level the consolidation check plans
/// for (`relax_below` of the objective), `ln κ` falls linearly, from the
/// largest factor to exactly 1 within `relax_s` — one cold start plus one
/// stable window, the time the replicas a correction bought need to become
/// ready and to fill the latency window, so latency under the objective for
/// that long says the correction is no longer needed (if it still is, the
/// next breach relearns it at the growth rate above). The worst error of
/// the breach is kept with κ, and so is the model's own error (measured
/// over predicted latency, per objective): the feedback never asks for
/// more than the model, its latency scaled to what was measured, says
/// meets the objectives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DemandFeedback {
    pub(crate) factor: f64,
    /// Largest measured latency / objective since κ last stood at 1.
    pub(crate) peak_error: f64,
    /// Largest measured / predicted TTFT and TPOT quantile since κ last
    /// stood at 1 (0: none measured against a prediction).
    pub(crate) peak_ttft_model_error: f64,
    pub(crate) peak_tpot_model_error: f64,
    /// The objectives measured over their thresholds since κ last stood
    /// at 1: the bound judges only these (an objective that held needs
    /// nothing from the feedback).
    pub(crate) breached: Floor,
    updated_at: Option<Timestamp>,
}

impl DemandFeedback {
    const NEUTRAL: DemandFeedback = DemandFeedback {
        factor: 1.0,
        peak_error: 1.0,
        peak_ttft_model_error: 0.0,
        peak_tpot_model_error: 0.0,
        breached: Floor::NONE,
        updated_at: None,
    };

    /// Records which objectives are over their thresholds now.
    pub(crate) fn breach(&mut self, ttft: bool, tpot: bool) {
        self.breached.ttft |= ttft;
        self.breached.tpot |= tpot;
    }

    /// Records the model's error in a breach: measured over predicted
    /// latency at the fleet that produced the measurement.
    pub(crate) fn model_error(&mut self, ttft: Option<f64>, tpot: Option<f64>) {
        let keep = |peak: &mut f64, v: Option<f64>| {
            if let Some(v) = v.filter(|v| v.is_finite() && *v > 0.0) {
                *peak = peak.max(v.min(MAX_MODEL_ERROR));
            }
        };
        keep(&mut self.peak_ttft_model_error, ttft);
        keep(&mut self.peak_tpot_model_error, tpot);
    }

    pub(crate) fn update(&mut self, now: Timestamp, error: f64, relax_below: f64, relax_s: f64) {
        let dt = match self.updated_at {
            Some(t) if now > t => now.secs_since(t).min(60.0),
            Some(_) => return,
            None => 0.0,
        };
        self.updated_at = Some(now);
        if error > 1.0 {
            self.factor *= 1.0 + FEEDBACK_GAIN_PER_S * dt * (error - 1.0).min(2.0);
            self.peak_error = self.peak_error.max(error.min(1.0 + 2.0));
        } else if error < relax_below {
            let step = MAX_FEEDBACK_FACTOR.ln() * dt / relax_s.max(1.0);
            self.factor = (self.factor.ln() - step).max(0.0).exp();
        }
        self.factor = self.factor.clamp(1.0, MAX_FEEDBACK_FACTOR);
        if self.factor <= 1.0 {
            self.peak_error = 1.0;
            self.peak_ttft_model_error = 0.0;
            self.peak_tpot_model_error = 0.0;
            self.breached = Floor::NONE;
        }
    }
}
/// A burst recommendation is made only when the burst rate exceeds the
/// stable mean by more than this fraction (steady traffic's own noise
/// stays with the reactive recommendation and its queueing model).
pub(crate) const BURST_MIN_EXCESS: f64 = 0.25;
/// A burst recommendation needs traffic: at least one request in the stable
/// window. With none, remembered bursts are the scale-down stabilization's
/// to hold, not a reason to keep capacity. (A quiet spell's few requests no
/// longer size remembered bursts: the request shape is a mean over the last
/// requests, see `shape_memory_requests`, so a lone long prompt moves it by
/// one request's worth.)
pub(crate) const BURST_MIN_REQUESTS: f64 = 1.0;
/// KV-cache occupancy at which replicas count as saturated.
pub(crate) const KV_SATURATION: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TimedValue {
    pub(crate) at: Timestamp,
    pub(crate) value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PanicState {
    pub(crate) since: Timestamp,
    pub(crate) last_trigger: Timestamp,
    pub(crate) max_replicas: u32,
}

/// What a workload's policy remembers between decisions, apart from the
/// model, the forecaster and the behaviour state.
#[derive(Debug, Clone)]
pub(crate) struct History {
    rates: VecDeque<TimedValue>,
    /// Short-window arrival rates over the burst window.
    bursts: VecDeque<TimedValue>,
    waiting: VecDeque<TimedValue>,
    pub(crate) shape: Option<RequestShape>,
    /// The requests behind `shape` (at most [`shape_memory_requests`]) and
    /// when it was last updated.
    shape_weight: f64,
    shape_at: Option<Timestamp>,
    last_rate: Option<TimedValue>,
    pub(crate) panic: Option<PanicState>,
    pub(crate) feedback: DemandFeedback,
    /// The replicas' start-up, learned from their states (prior:
    /// `coldStartSeconds`).
    pub(crate) startup: StartupTracker,
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
    history: History,
}

/// Whether the observation can be acted on (stage 1).
#[derive(Debug, Clone)]
pub(crate) struct Freshness {
    pub(crate) telemetry_age_s: Option<f64>,
    pub(crate) fresh: bool,
    /// A finite, non-negative arrival rate.
    pub(crate) arrival: Option<f64>,
    /// Why the decision must not scale in, when it must not.
    pub(crate) hold_reason: Option<String>,
}

impl Freshness {
    pub(crate) fn of(cfg: &WorkloadConfig, now: Timestamp, obs: &Observation) -> Freshness {
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
        Freshness {
            telemetry_age_s,
            fresh,
            arrival,
            hold_reason,
        }
    }
}

/// Everything one decision works from, computed once after learning and
/// read by every later stage.
pub(crate) struct Context<'a> {
    pub(crate) now: Timestamp,
    pub(crate) obs: &'a Observation,
    pub(crate) cfg: &'a WorkloadConfig,
    pub(crate) current: u32,
    pub(crate) ready: u32,
    pub(crate) in_flight: u32,
    pub(crate) freshness: Freshness,
    pub(crate) shape: RequestShape,
    /// The TTFT objective of the typical request: the threshold plus, for a
    /// length-aware objective, its prompt's allowance.
    pub(crate) ttft_objective_s: f64,
    pub(crate) batch_limit: u32,
    /// The objectives less the batch-limit margin: what sizing aims at.
    pub(crate) targets: Targets,
    /// The fraction of the objectives the consolidation check plans for.
    pub(crate) strict: f64,
    pub(crate) strict_targets: Targets,
    pub(crate) sizer: Sizer<'a>,
    /// The stable window's mean arrival rate (fresh telemetry only).
    pub(crate) stable_rps: Option<f64>,
    /// The newest short-window arrival rate (fresh telemetry only).
    pub(crate) short_rps: Option<f64>,
    pub(crate) slo: SloAssessment,
    /// The assessment the SLO feedback acts on: `slo`, with TTFT read at
    /// the feasible quantile ([`sizing::feasible_quantile`]).
    pub(crate) feedback_slo: SloAssessment,
    /// The TTFT quantile `feedback_slo` reads.
    pub(crate) feedback_quantile: f64,
    /// The share of requests no replica count serves within the TTFT
    /// objective ([`sizing::infeasible_share`]).
    pub(crate) infeasible: f64,
    pub(crate) waiting_now: Option<f64>,
    pub(crate) stable_window_s: f64,
    pub(crate) panic_window_s: f64,
    /// The lead time a new replica needs: the learned p90 start-up
    /// (`coldStartSeconds` before one is seen).
    pub(crate) lead_s: f64,
    /// How far ahead the predictive floor looks.
    pub(crate) predictive_horizon_s: f64,
}

impl<'a> Context<'a> {
    fn new(
        now: Timestamp,
        obs: &'a Observation,
        cfg: &'a WorkloadConfig,
        model: &'a PerfModel,
        history: &History,
        freshness: Freshness,
    ) -> Context<'a> {
        let shape = history.shape.unwrap_or_default();
        let lead_s = history.startup.model().lead_time_s();
        let margin = cfg.batch_limit_margin;
        let batch_limit =
            sizing::batch_limit(model, cfg.itl.threshold_s, shape.context_tokens, margin);
        let ttft_objective_s =
            cfg.ttft.threshold_s + cfg.ttft_per_input_token_s * shape.input_tokens;
        let infeasible = sizing::infeasible_share(
            model,
            shape,
            cfg.ttft.threshold_s,
            cfg.ttft_per_input_token_s,
        );
        // The quantile the SLO feedback reads measured TTFT at.
        let ttft_quantile = sizing::feasible_quantile(cfg.ttft.quantile, infeasible);
        let targets = Targets {
            ttft_s: ttft_objective_s * (1.0 - margin),
            ttft_quantile: cfg.ttft.quantile,
            itl_s: cfg.itl.threshold_s * (1.0 - margin),
            itl_quantile: cfg.itl.quantile,
            ttft_per_input_token_s: cfg.ttft_per_input_token_s * (1.0 - margin),
        };
        let strict = (1.0 - margin - cfg.consolidation_margin).max(0.05);
        let strict_targets = Targets {
            ttft_s: ttft_objective_s * strict,
            itl_s: cfg.itl.threshold_s * strict,
            ttft_per_input_token_s: cfg.ttft_per_input_token_s * strict,
            ..targets
        };
        let fresh = freshness.fresh;
        let stable_window_s = cfg.reactive.stable_window_s;
        let stable_rps = if fresh && freshness.arrival.is_some() {
            history.stable_rate(stable_window_s, now)
        } else {
            None
        };
        let (slo, feedback_slo) = if fresh {
            let window = obs.latency.slo_window(obs.load.mean_input_tokens);
            let objectives = cfg.slo_objectives();
            let slo = objectives.assess(&window);
            // The feedback judges the requests a replica count can serve:
            // measured TTFT at the feasible quantile.
            // A length-aware TTFT objective is judged at the prompt of the
            // request the quantile measures (longer than the mean, as the
            // sizing predicts it), not at the mean prompt: the measured
            // quantile is a long prompt's TTFT, allowed its own prompt's
            // share. The published status keeps the mean prompt's.
            let feedback_window = if cfg.ttft_per_input_token_s > 0.0 {
                let factor = sizing::quantile_prompt_factor(ttft_quantile);
                obs.latency
                    .slo_window(obs.load.mean_input_tokens.map(|m| m * factor))
            } else {
                window
            };
            let mut feasible = objectives;
            feasible.ttft.quantile = ttft_quantile;
            let feedback = feasible.assess(&feedback_window);
            (slo, feedback)
        } else {
            (SloAssessment::NONE, SloAssessment::NONE)
        };
        Context {
            now,
            obs,
            cfg,
            current: obs.replicas.current,
            ready: obs.replicas.ready,
            in_flight: obs.replicas.in_flight(),
            short_rps: if fresh { freshness.arrival } else { None },
            freshness,
            shape,
            ttft_objective_s,
            batch_limit,
            targets,
            strict,
            strict_targets,
            sizer: Sizer::new(model, shape, batch_limit, &targets),
            stable_rps,
            slo,
            feedback_slo,
            feedback_quantile: ttft_quantile,
            infeasible,
            waiting_now: waiting_of(obs, shape),
            stable_window_s,
            panic_window_s: panic_window_s(cfg),
            lead_s,
            predictive_horizon_s: if cfg.predictive.horizon_from_startup {
                lead_s + 60.0
            } else {
                cfg.predictive.horizon_s
            },
        }
    }

    pub(crate) fn fresh(&self) -> bool {
        self.freshness.fresh
    }
}

/// The panic window: a fraction of the stable window, at least 6 s.
pub(crate) fn panic_window_s(cfg: &WorkloadConfig) -> f64 {
    (cfg.reactive.stable_window_s * PANIC_WINDOW_FRACTION).max(6.0)
}

impl Policy {
    /// A policy for `config`, sizing with `model` (resolved from the
    /// config's performance-model source by the caller, e.g. with
    /// [`WorkloadConfig::perf_model`]).
    pub fn new(config: WorkloadConfig, model: PerfModel) -> Policy {
        let startup = StartupTracker::new(StartupModel::new(config.cold_start_s, STARTUP_WINDOW));
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
            history: History {
                rates: VecDeque::new(),
                bursts: VecDeque::new(),
                waiting: VecDeque::new(),
                shape: None,
                shape_weight: 0.0,
                shape_at: None,
                last_rate: None,
                panic: None,
                feedback: DemandFeedback::NEUTRAL,
                startup,
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

    /// Starts the scale-down stabilization history from a previous
    /// controller's last decision ([`BehaviorState::start_from`]).
    pub fn start_from(&mut self, at: Timestamp, desired_replicas: u32) {
        self.behavior.start_from(at, desired_replicas);
    }

    /// The forecast arrival rate for the bucket holding `at`, once the
    /// forecaster has its minimum history.
    pub fn forecast_rps(&self, at: Timestamp) -> Option<f64> {
        self.forecaster.as_ref()?.forecast_at(at)
    }

    /// Decide replicas and batch limit for `obs` at `now`. Calling it twice
    /// with the same `now` and `obs` gives the same decision.
    pub fn decide(&mut self, now: Timestamp, obs: &Observation) -> Decision {
        self.behavior.forget_from(now);
        // 1. Freshness; 2. learning from fresh telemetry.
        let freshness = Freshness::of(&self.config, now, obs);
        if freshness.fresh {
            self.learn(now, obs, freshness.arrival);
        }
        self.refiner.refine_into(&self.base_model, &mut self.model);
        self.history
            .startup
            .observe(now, &obs.replica_samples, &|_: &str| false);
        let Policy {
            config,
            model,
            refiner,
            forecaster,
            behavior,
            schedule,
            history,
            ..
        } = self;
        // 3. Sizing context.
        let ctx = Context::new(now, obs, config, model, history, freshness);
        // 4. Recommendations, one source at a time.
        let mut recs: Vec<Recommendation> = Vec::with_capacity(7);
        recs.extend(sources::hold(&ctx));
        recs.extend(sources::reactive(&ctx));
        let burst = sources::burst(&ctx, history);
        recs.extend(sources::panic(&ctx, history));
        // After panic: a tie goes to the panic recommendation.
        recs.extend(burst);
        recs.extend(sources::slo_feedback(&ctx, history));
        let (forecast_rps, predictive) = sources::predictive(&ctx, forecaster.as_ref());
        recs.extend(predictive);
        let effect = schedule.evaluate(&config.schedules, now);
        recs.extend(sources::scheduled(&effect));
        // 5. Combination, limits, behaviour; 6. victims.
        let combined = limits::combine(&ctx, &mut recs);
        let bounded = limits::apply(
            &ctx,
            combined.proposed,
            &effect,
            forecast_rps,
            history.panic.is_some(),
            behavior,
        );
        let mut out = bounded.limits;
        let desired = limits::behaviour(
            &ctx,
            behavior,
            bounded.proposed,
            bounded.min,
            bounded.max,
            &mut out,
        );
        let (desired, victims) = limits::victims(&ctx, desired, &mut out);
        if desired != ctx.current && !config.advisory {
            behavior.record_scale_event_with(Some(&config.behavior), now, ctx.current, desired);
        }
        let action = match desired.cmp(&ctx.current) {
            std::cmp::Ordering::Greater => Action::ScaleUp,
            std::cmp::Ordering::Less => Action::ScaleDown,
            std::cmp::Ordering::Equal => Action::Hold,
        };
        let inputs = SloInputs {
            telemetry_age_s: ctx.freshness.telemetry_age_s,
            current: ctx.current,
            ready: ctx.ready,
            in_flight: ctx.in_flight,
            arrival_rps: ctx.freshness.arrival,
            stable_arrival_rps: ctx.stable_rps,
            forecast_rps,
            waiting: ctx.waiting_now,
            kv_cache_usage_ratio: obs.load.kv_cache_usage_ratio,
            measured_ttft_s: ctx.slo.ttft.and_then(|o| o.measured_s),
            measured_tpot_s: ctx.slo.tpot.and_then(|o| o.measured_s),
            input_tokens: ctx.shape.input_tokens,
            output_tokens: ctx.shape.output_tokens,
            context_tokens: ctx.shape.context_tokens,
            ttft_objective_s: ctx.ttft_objective_s,
            infeasible_share: ctx.infeasible,
            ttft_quantile_feedback: ctx.feedback_quantile,
            ttft_quantile: config.ttft.quantile,
            batch_limit: ctx.batch_limit,
            model_factor: refiner.factor(),
            slo_demand_factor: history.feedback.factor,
            min_replicas: bounded.min,
            max_replicas: bounded.max,
            schedules_open: effect.open,
            proposed: bounded.proposed,
            prediction_at_desired: ctx
                .stable_rps
                .map(|r| ctx.sizer.predict(desired, r, config.ttft.quantile)),
            startup: Some(history.startup.model().summary()),
        };
        Decision {
            at: now,
            current_replicas: ctx.current,
            desired_replicas: desired,
            batch_limit: Some(ctx.batch_limit),
            action,
            winner: combined.winner,
            recommendations: recs,
            limits: out,
            victims,
            model_confidence: refiner.confidence(),
            advisory: config.advisory,
            slo: ctx.slo,
            inputs: DecisionInputs::Slo(Box::new(inputs)),
            scale_to_zero: None,
        }
    }

    /// Fold fresh telemetry into the windows, forecaster, shape and model.
    fn learn(&mut self, now: Timestamp, obs: &Observation, arrival: Option<f64>) {
        let window = self.config.reactive.stable_window_s;
        if let Some(rate) = arrival {
            replace_at(&mut self.history.rates, now, rate, window);
            let burst_window = burst_window_s(&self.config);
            replace_at(&mut self.history.bursts, now, rate, burst_window);
            if let Some(f) = &mut self.forecaster {
                let from = match self.history.last_rate {
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
            self.history.last_rate = Some(TimedValue {
                at: now,
                value: rate,
            });
        }
        let shape = self.learn_shape(now, obs, arrival);
        self.history.shape = Some(shape);
        if let Some(w) = waiting_of(obs, shape) {
            replace_at(&mut self.history.waiting, now, w, window);
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
}

impl Policy {
    /// The request shape as a mean over requests, not over windows: the
    /// observation's window means enter weighted by the requests that
    /// arrived since the previous update (arrival rate × elapsed time), and
    /// the estimate remembers at most [`shape_memory_requests`] requests. A
    /// window that holds one long prompt in a quiet spell then moves the
    /// estimate by one request's worth, instead of becoming the shape every
    /// sizing path uses; at high rates the newest windows dominate.
    fn learn_shape(
        &mut self,
        now: Timestamp,
        obs: &Observation,
        arrival: Option<f64>,
    ) -> RequestShape {
        let l = &obs.load;
        let valid = |v: Option<f64>| v.filter(|v| v.is_finite() && *v > 0.0);
        let seen_input = valid(l.mean_input_tokens);
        let seen_output = valid(l.mean_output_tokens);
        let seen_context = valid(l.mean_context_tokens);
        let memory = shape_memory_requests(&self.config);
        let h = &mut self.history;
        let elapsed = h.shape_at.map_or(0.0, |at| now.secs_since(at).max(0.0));
        h.shape_at = Some(now);
        let new = arrival.filter(|r| r.is_finite() && *r > 0.0).unwrap_or(0.0) * elapsed;
        let Some(prev) = h.shape else {
            // The first observation is all there is.
            let input = seen_input.unwrap_or(RequestShape::default().input_tokens);
            let output = seen_output.unwrap_or(RequestShape::default().output_tokens);
            h.shape_weight = new.min(memory);
            return RequestShape {
                input_tokens: input,
                output_tokens: output,
                context_tokens: seen_context.unwrap_or(input + output / 2.0),
            };
        };
        let w = h.shape_weight.min(memory);
        let blend = |old: f64, seen: Option<f64>| match seen {
            // No new requests since the last update: nothing to learn (and
            // a decision repeated at the same instant stays the same).
            Some(v) if new > 0.0 => (w * old + new * v) / (w + new),
            Some(v) if w <= 0.0 => v,
            _ => old,
        };
        h.shape_weight = (w + new).min(memory);
        RequestShape {
            input_tokens: blend(prev.input_tokens, seen_input),
            output_tokens: blend(prev.output_tokens, seen_output),
            context_tokens: blend(prev.context_tokens, seen_context),
        }
    }
}

/// How many requests the shape estimate remembers: enough that its
/// sampling error stays within the margin the sizing keeps below the
/// objectives (`batchLimitMargin`, 0.1 by default). Request sizes are taken
/// as roughly exponential (coefficient of variation 1, as the sizing model
/// assumes), so a mean over `M` requests has a relative standard error of
/// `1/√M`, and `M = 1/margin²`: 100 requests at the default; the margin
/// clamped to 0.05..=1 (at most 400 requests).
pub(crate) fn shape_memory_requests(cfg: &WorkloadConfig) -> f64 {
    let margin = cfg.batch_limit_margin.clamp(0.05, 1.0);
    1.0 / (margin * margin)
}

impl History {
    /// Time-weighted mean of the arrival rates in the stable window.
    pub(crate) fn stable_rate(&self, stable_window_s: f64, now: Timestamp) -> Option<f64> {
        let start = now.plus_secs(-stable_window_s);
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

    /// The request-weighted `quantile` of the short-window arrival rates
    /// over the burst window, the newest panic window left out: the rate
    /// at or below which that fraction of those requests arrived.
    pub(crate) fn burst_rate(
        &self,
        cfg: &WorkloadConfig,
        now: Timestamp,
        quantile: f64,
    ) -> Option<f64> {
        let start = now.plus_secs(-burst_window_s(cfg));
        let end = now.plus_secs(-panic_window_s(cfg));
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
    pub(crate) fn queue_growth(
        &self,
        cfg: &WorkloadConfig,
        now: Timestamp,
        waiting_now: Option<f64>,
        slack: f64,
    ) -> Option<String> {
        let w = waiting_now?;
        let from = now.plus_secs(-panic_window_s(cfg));
        let reference = self.waiting.iter().find(|s| s.at >= from && s.at < now)?;
        (w > reference.value * 1.2 + slack && w >= slack).then(|| {
            format!(
                "queue grew from {:.0} to {w:.0} in {:.0} s",
                reference.value,
                now.secs_since(reference.at)
            )
        })
    }
}

/// The burst window: the scale-down stabilization window, at least the
/// stable window.
pub(crate) fn burst_window_s(cfg: &WorkloadConfig) -> f64 {
    f64::from(cfg.behavior.scale_down.stabilization_window_s).max(cfg.reactive.stable_window_s)
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

pub(crate) fn waiting_of(obs: &Observation, shape: RequestShape) -> Option<f64> {
    obs.load
        .requests_waiting
        .or_else(|| {
            obs.load
                .queued_prompt_tokens
                .map(|t| t / shape.input_tokens.max(1.0))
        })
        .filter(|w| w.is_finite() && *w >= 0.0)
}

pub(crate) fn saturated(obs: &Observation, batch_limit: u32, ready: u32) -> bool {
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

pub(crate) fn pct(q: f64) -> String {
    let p = q * 100.0;
    if (p - p.round()).abs() < 1e-9 {
        format!("{p:.0}")
    } else {
        format!("{p}")
    }
}

pub(crate) fn fmt_s(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2} s"))
        .unwrap_or_else(|| "n/a".into())
}

pub(crate) fn fmt_ms(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1} ms", 1e3 * x))
        .unwrap_or_else(|| "n/a".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The objectives a breach was measured on are kept with κ (the bound
    /// judges only those) and forgotten with it once it is back at 1.
    #[test]
    fn the_feedback_remembers_which_objectives_were_over_until_it_relaxes() {
        let t0 = Timestamp::from_millis(1_000_000);
        let mut f = DemandFeedback::NEUTRAL;
        f.update(t0, 2.0, 0.75, 150.0);
        f.breach(true, false);
        f.update(t0.plus_secs(30.0), 2.0, 0.75, 150.0);
        f.breach(false, false);
        assert!(f.factor > 1.0);
        assert_eq!(f.breached, Floor::TTFT);
        f.breach(false, true);
        assert_eq!(f.breached, Floor::BOTH);
        // Under the relax level for the whole relax time: back to 1, and
        // the breach is forgotten.
        let mut t = t0.plus_secs(30.0);
        for _ in 0..10 {
            t = t.plus_secs(30.0);
            f.update(t, 0.5, 0.75, 150.0);
        }
        assert_eq!(f.factor, 1.0);
        assert_eq!(f.breached, Floor::NONE);
    }
}
