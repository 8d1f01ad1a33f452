//! The recommendation sources of [`crate::Policy::decide`], one function
//! each: every one reads the decision's [`Context`] and returns its
//! recommendation with its reason (or none), so each can be tested alone.

use gpuscale_core::slo::TpotSource;

use crate::decision::{Recommendation, Source};
use crate::forecast::Forecaster;
use crate::policy::{
    BURST_MIN_EXCESS, BURST_MIN_REQUESTS, Context, History, PanicState, burst_window_s, fmt_ms,
    fmt_s, pct, saturated,
};
use crate::schedule::ScheduleEffect;
use crate::sizing::Targets;
use crate::spec::PredictiveMode;

/// Missing or stale data: keep the current count (the decision can rise,
/// never fall).
pub(crate) fn hold(ctx: &Context<'_>) -> Option<Recommendation> {
    let reason = ctx.freshness.hold_reason.as_ref()?;
    Some(Recommendation {
        source: Source::Hold,
        replicas: Some(ctx.current),
        reason: format!(
            "{reason}: keep {}, never scale in on missing data",
            ctx.current
        ),
    })
}

/// What the reasons say of requests no replica count serves (see
/// [`crate::sizing::infeasible_share`]), where there are any to speak of
/// (a tenth of a percent).
fn infeasible_note(ctx: &Context<'_>) -> String {
    if ctx.infeasible < 1e-3 {
        return String::new();
    }
    let q = ctx.cfg.ttft.quantile;
    if ctx.feedback_quantile < q {
        format!(
            "; {:.1}% of requests' own prefill exceeds the TTFT objective, more than its {:.1}% allowance: no count meets it, the SLO feedback judges the others at their p{}",
            100.0 * ctx.infeasible,
            100.0 * (1.0 - q),
            pct(q)
        )
    } else {
        format!(
            "; {:.1}% of requests' own prefill exceeds the TTFT objective (within its {:.1}% allowance)",
            100.0 * ctx.infeasible,
            100.0 * (1.0 - q)
        )
    }
}

/// The stable window's mean arrival rate against the SLOs; without an
/// arrival rate, the generated-token rate as a lower bound on demand.
pub(crate) fn reactive(ctx: &Context<'_>) -> Option<Recommendation> {
    let cfg = ctx.cfg;
    if let Some(rate) = ctx.stable_rps {
        let s = ctx.sizer.replicas_needed(rate, &ctx.targets);
        return Some(Recommendation {
            source: Source::Reactive,
            replicas: Some(s.replicas),
            reason: format!(
                "{rate:.2} req/s over {:.0} s needs {} (TTFT p{} {:.2} s, ITL p{} {:.1} ms at B*={}{}{})",
                ctx.stable_window_s,
                s.replicas,
                pct(cfg.ttft.quantile),
                s.prediction.ttft_s,
                pct(cfg.itl.quantile),
                1e3 * s.prediction.itl_s,
                ctx.batch_limit,
                infeasible_note(ctx),
                if s.attainable {
                    ""
                } else {
                    "; SLOs unattainable, sized at 70% utilisation"
                }
            ),
        });
    }
    if !ctx.fresh() {
        return None;
    }
    // Arrivals unknown: throughput is a lower bound on demand.
    let gen_tps = ctx.obs.load.generation_tokens_per_second?;
    let rate = gen_tps / ctx.shape.output_tokens.max(1.0);
    let s = ctx.sizer.replicas_needed(rate, &ctx.targets);
    Some(Recommendation {
        source: Source::Reactive,
        replicas: Some(s.replicas),
        reason: format!(
            "arrivals unknown; {gen_tps:.0} generated tokens/s ≈ {rate:.2} req/s (a lower bound) needs {}",
            s.replicas
        ),
    })
}

/// Bursts: the short-window rate at which the burst window's requests
/// arrived (the burst window is the scale-down stabilization window), at the
/// SLO quantile (request-weighted), when it is well above the stable mean:
/// bursty traffic needs capacity for its bursts, not for its mean, and
/// bursts that recur within the window then find it ready instead of
/// waiting a cold start each time. The newest panic window is left to the
/// panic recommendation. Whether to make it is decided on history alone
/// (the stable mean as of the start of the newest panic window, like the
/// bursts), so that more load now never removes it: desired stays monotone
/// in load.
pub(crate) fn burst(ctx: &Context<'_>, history: &History) -> Option<Recommendation> {
    let cfg = ctx.cfg;
    ctx.stable_rps?;
    let quantile = cfg.ttft.quantile.max(cfg.itl.quantile);
    let rate = history.stable_rate(ctx.stable_window_s, ctx.now.plus_secs(-ctx.panic_window_s))?;
    if rate * ctx.stable_window_s < BURST_MIN_REQUESTS {
        return None;
    }
    let burst = history.burst_rate(cfg, ctx.now, quantile)?;
    if burst <= rate * (1.0 + BURST_MIN_EXCESS) {
        return None;
    }
    let s = ctx.sizer.replicas_needed(burst, &ctx.targets);
    Some(Recommendation {
        source: Source::Burst,
        replicas: Some(s.replicas),
        reason: format!(
            "bursts: p{} of the short-window arrival rate over {:.0} s is {burst:.2} req/s ({:.1}× the mean {rate:.2}) and needs {}",
            pct(quantile),
            burst_window_s(cfg),
            burst / rate.max(1e-9),
            s.replicas
        ),
    })
}

/// The queue a panic reads as material on its own: the waiting requests
/// whose prefill, spread over the ready replicas, takes more than the
/// objectives' margin (`batchLimitMargin`, the slack the sizing keeps) of
/// what they can absorb: the typical request's TTFT objective (a new
/// request waits behind the queue) or the stall a typical decoding
/// request's TPOT objective leaves (the queued prefills run between its
/// decode steps); at least one request per replica. A smaller queue is the
/// one continuous batching always has (requests waiting for the next step)
/// unless the short-window rate needs more replicas than are ready
/// ([`short_of_replicas`]): then it is the start of a backlog.
pub(crate) fn queue_slack(ctx: &Context<'_>) -> f64 {
    let ready = f64::from(ctx.ready.max(1));
    let prefill_s = ctx.sizer.prefill_mean_s();
    let absorbed_s = ctx
        .ttft_objective_s
        .min(ctx.sizer.decode_budget_s(ctx.cfg.itl.threshold_s));
    let per_replica = if prefill_s > 0.0 && prefill_s.is_finite() {
        (ctx.cfg.batch_limit_margin * absorbed_s / prefill_s).max(1.0)
    } else {
        1.0
    };
    ready * per_replica
}

/// Whether the short-window arrival rate needs more replicas than are ready.
fn short_of_replicas(ctx: &Context<'_>) -> bool {
    ctx.short_rps
        .is_some_and(|r| ctx.sizer.replicas_needed(r, &ctx.targets).replicas > ctx.ready)
}

/// Panic: load the replicas cannot keep up with (a queue that grows or
/// saturated replicas while nothing is in flight). Sized for the
/// short-window rate plus the queue's drain, ratcheted; it lasts until one
/// stable window passes without a new trigger. A breach alone is the SLO
/// feedback's to answer (a model error, or requests no replica count
/// serves in time).
pub(crate) fn panic(ctx: &Context<'_>, history: &mut History) -> Option<Recommendation> {
    let cfg = ctx.cfg;
    let mut trigger: Option<String> = None;
    if ctx.fresh() && ctx.in_flight == 0 {
        let ready = f64::from(ctx.ready.max(1));
        if let Some(grew) = history.queue_growth(cfg, ctx.now, ctx.waiting_now, ready)
            && (ctx.waiting_now.unwrap_or(0.0) >= queue_slack(ctx) || short_of_replicas(ctx))
        {
            trigger = Some(grew);
        } else if saturated(ctx.obs, ctx.batch_limit, ctx.ready) {
            trigger = Some(format!(
                "replicas saturated (KV {:.0}%, {} waiting)",
                100.0 * ctx.obs.load.kv_cache_usage_ratio.unwrap_or(0.0),
                ctx.waiting_now.unwrap_or(0.0)
            ));
        }
    }
    if trigger.is_some() {
        // Nothing is in flight (a trigger needs that): drain the queue
        // within one cold start and one TTFT objective.
        let drain = ctx.waiting_now.unwrap_or(0.0) / (ctx.lead_s + cfg.ttft.threshold_s);
        let rate = ctx
            .short_rps
            .unwrap_or(0.0)
            .max(ctx.stable_rps.unwrap_or(0.0))
            + drain;
        let n = ctx.sizer.replicas_needed(rate, &ctx.targets).replicas;
        let p = history.panic.get_or_insert(PanicState {
            since: ctx.now,
            last_trigger: ctx.now,
            max_replicas: 0,
        });
        p.last_trigger = ctx.now;
        p.max_replicas = p.max_replicas.max(n);
    } else if let Some(p) = history.panic
        && ctx.now.secs_since(p.last_trigger) > ctx.stable_window_s
    {
        history.panic = None;
    }
    let p = history.panic?;
    Some(Recommendation {
        source: Source::Panic,
        replicas: Some(p.max_replicas),
        reason: format!(
            "{}; panicking since {:.0} s ago, holding {} (no scale-in)",
            trigger.as_deref().unwrap_or("no new trigger"),
            ctx.now.secs_since(p.since),
            p.max_replicas
        ),
    })
}

/// SLO feedback: a demand factor learned from measured latency in steady
/// state (nothing in flight), applied to the stable rate, with anti-windup
/// (see `DemandFeedback`): it returns to 1 within one cold start plus one
/// stable window of latency under the consolidation level, and never asks
/// for more than the model's count once its latency is scaled by the worst
/// measured / predicted ratio of the breach.
pub(crate) fn slo_feedback(ctx: &Context<'_>, history: &mut History) -> Option<Recommendation> {
    let cfg = ctx.cfg;
    let slo = &ctx.feedback_slo;
    let measured_ttft = slo.ttft.and_then(|o| o.measured_s);
    let measured_tpot = slo.tpot.and_then(|o| o.measured_s);
    let error = if ctx.fresh() {
        slo.worst_ratio().unwrap_or(0.0)
    } else {
        0.0
    };
    if ctx.fresh() && ctx.in_flight == 0 && (measured_ttft.is_some() || measured_tpot.is_some()) {
        let relax_s = ctx.lead_s + ctx.stable_window_s;
        history.feedback.update(ctx.now, error, ctx.strict, relax_s);
        let over = |o: Option<gpuscale_core::slo::ObjectiveAssessment>| {
            o.and_then(|o| o.ratio()).is_some_and(|r| r > 1.0)
        };
        let (ttft_over, tpot_over) = (over(slo.ttft), over(slo.tpot));
        if error > 1.0 {
            history.feedback.breach(ttft_over, tpot_over);
        }
        if error > 1.0
            && let Some(rate) = ctx.stable_rps
            && ctx.ready > 0
        {
            // The model's own error at the fleet that was measured, on the
            // objectives that are over (one that holds bounds nothing).
            let predicted = ctx.sizer.predict(ctx.ready, rate, cfg.ttft.quantile);
            let ttft = measured_ttft
                .filter(|_| ttft_over && predicted.ttft_s.is_finite() && predicted.ttft_s > 0.0)
                .map(|m| m / predicted.ttft_s);
            let tpot = measured_tpot.filter(|_| tpot_over).and_then(|m| {
                ctx.sizer
                    .tpot_quantile_s(&predicted, cfg.itl.quantile)
                    .map(|p| m / p)
            });
            history.feedback.model_error(ttft, tpot);
        }
    }
    let kappa = history.feedback.factor;
    let rate = ctx.stable_rps?;
    if kappa <= 1.0 + 1e-6 {
        return None;
    }
    let wanted = ctx
        .sizer
        .replicas_needed(rate * kappa, &ctx.targets)
        .replicas;
    // What the model says meets the objectives once its latency is scaled
    // to what was measured (each objective divided by the worst measured /
    // predicted ratio of the breach; by the measured / objective ratio
    // where nothing was measured against a prediction): more replicas than
    // that buy nothing the calibrated model can see. Tightening by the
    // measured / objective ratio alone bound nothing where the model's
    // latency is wrong in shape (a predicted TPOT p95 half the measured one
    // moves little when the objective is tightened by 1.4×).
    let peak = history.feedback.peak_error;
    let breached = history.feedback.breached;
    let by = |over: bool, model_error: f64| {
        if !over {
            1.0
        } else if model_error > 0.0 {
            model_error.max(1.0)
        } else {
            peak
        }
    };
    let (ttft_by, tpot_by) = (
        by(breached.ttft, history.feedback.peak_ttft_model_error),
        by(breached.tpot, history.feedback.peak_tpot_model_error),
    );
    let tightened = Targets {
        ttft_s: ctx.targets.ttft_s / ttft_by,
        ttft_per_input_token_s: ctx.targets.ttft_per_input_token_s / ttft_by,
        itl_s: ctx.targets.itl_s / tpot_by,
        ..ctx.targets
    };
    let bound = ctx.sizer.replicas_needed(rate, &tightened);
    let modelled = if bound.attainable {
        wanted.min(bound.replicas.max(1))
    } else {
        // Objectives tightened below what any count meets in the model:
        // replicas still buy latency down to its floor (one request's own
        // prefill and decode steps), and nothing past it. Bounded by the
        // count at which the model's latency on the breached objectives is
        // within the sizing's margin of that floor.
        let floor = ctx.sizer.floor_replicas(
            rate,
            ctx.targets.ttft_quantile,
            cfg.batch_limit_margin,
            breached,
        );
        wanted.min(floor.max(bound.replicas).max(1))
    };
    // The feedback exists because the model is wrong here, so it may not
    // grow the fleet by more than the model-free proportional law allows:
    // the replicas that produced the measurement times how far over the
    // objective it is now (`ready × error`, the HPA's law for a latency
    // that falls in proportion to the load per replica). It may hold the
    // ready count while its factor decays; without a current measurement
    // it cannot grow the fleet at all. Growth beyond one step comes from the
    // next measurements, once the added replicas serve.
    let proportional = ctx.ready.max(
        (f64::from(ctx.ready) * error)
            .ceil()
            .min(f64::from(u32::MAX)) as u32,
    );
    let n = modelled.min(proportional);
    Some(Recommendation {
        source: Source::SloFeedback,
        replicas: Some(n),
        reason: format!(
            "measured latency has run over the SLO (TTFT p{} {}, TPOT p{} {}{}: now {error:.2}× it, at worst {peak:.2}×): demand × {kappa:.2} = {:.2} req/s needs {wanted}{}",
            pct(cfg.ttft.quantile),
            fmt_s(measured_ttft),
            pct(cfg.itl.quantile),
            fmt_ms(measured_tpot),
            if slo.tpot_source == Some(TpotSource::TokenLevelFallback) {
                ", token-level ITL: the engines report no per-request TPOT"
            } else {
                ""
            },
            rate * kappa,
            if n < wanted && n == proportional && proportional < modelled {
                format!(
                    ", bounded to {n} (the {} ready replicas × the error now {error:.2})",
                    ctx.ready
                )
            } else if n < wanted {
                format!(
                    ", bounded to {n} (the model's count with its TTFT × {ttft_by:.2} and TPOT × {tpot_by:.2}, as measured)"
                )
            } else {
                String::new()
            }
        ),
    })
}

/// The forecast's peak over the horizon, and its recommendation (a floor
/// where predictive mode is on, published only in `ForecastOnly`).
pub(crate) fn predictive(
    ctx: &Context<'_>,
    forecaster: Option<&Forecaster>,
) -> (Option<f64>, Option<Recommendation>) {
    let cfg = ctx.cfg;
    let forecast = forecaster
        .and_then(|f| f.forecast_peak(ctx.now, ctx.now.plus_secs(ctx.predictive_horizon_s)));
    let rec = forecast.map(|f| {
        let s = ctx.sizer.replicas_needed(f, &ctx.targets);
        let acting = cfg.predictive.mode == PredictiveMode::On;
        Recommendation {
            source: Source::Predictive,
            replicas: Some(s.replicas),
            reason: format!(
                "forecast peak {f:.2} req/s within {:.0} s needs {}{}",
                ctx.predictive_horizon_s,
                s.replicas,
                if acting {
                    " (a floor)"
                } else {
                    " (forecast only, not acted on)"
                }
            ),
        }
    });
    (forecast, rec)
}

/// The open schedule rules' desired count.
pub(crate) fn scheduled(effect: &ScheduleEffect) -> Option<Recommendation> {
    let d = effect.desired_replicas?;
    Some(Recommendation {
        source: Source::Scheduled,
        replicas: Some(d),
        reason: format!("schedule {} sets desired {d}", effect.open.join(", ")),
    })
}
