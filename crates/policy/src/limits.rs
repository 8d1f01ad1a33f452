//! After the recommendations: their combination, the limits on the combined
//! count (bounds, tolerance, consolidation, panic, cooldown), the HPA
//! behaviour, and the victims of a scale-in — each a function of the
//! decision's [`Context`] that returns its [`Limit`]s as data.

use crate::decision::{Direction, Limit, Recommendation, Source};
use crate::hpa::BehaviorState;
use crate::policy::Context;
use crate::schedule::ScheduleEffect;
use crate::spec::PredictiveMode;
use crate::victim;

/// The combined recommendation: the largest acting one.
pub(crate) struct Combined {
    pub(crate) winner: Source,
    pub(crate) proposed: u32,
}

/// The maximum of the acting recommendations (a forecast that is only
/// published does not act). Without any, a `hold` at the current count is
/// added and wins.
pub(crate) fn combine(ctx: &Context<'_>, recs: &mut Vec<Recommendation>) -> Combined {
    let acting = |r: &Recommendation| {
        !(r.source == Source::Predictive && ctx.cfg.predictive.mode != PredictiveMode::On)
    };
    let mut best: Option<(Source, u32)> = None;
    for r in recs.iter().filter(|r| acting(r)) {
        if let Some(n) = r.replicas
            && best.is_none_or(|(_, b)| n > b)
        {
            best = Some((r.source, n));
        }
    }
    match best {
        Some((winner, proposed)) => Combined { winner, proposed },
        None => {
            // Fresh telemetry without any usable load signal: hold.
            recs.push(Recommendation {
                source: Source::Hold,
                replicas: Some(ctx.current),
                reason: "no load signal: keep the current count".into(),
            });
            Combined {
                winner: Source::Hold,
                proposed: ctx.current,
            }
        }
    }
}

/// The combined count after bounds, tolerance, consolidation, panic and
/// cooldown, with the effective bounds.
pub(crate) struct Bounded {
    pub(crate) proposed: u32,
    pub(crate) min: u32,
    pub(crate) max: u32,
    pub(crate) limits: Vec<Limit>,
}

/// Bounds (schedules raise min or change max), the per-direction tolerance,
/// the consolidation check, no scale-in while panicking, and the cooldown.
pub(crate) fn apply(
    ctx: &Context<'_>,
    proposed: u32,
    effect: &ScheduleEffect,
    forecast_rps: Option<f64>,
    panicking: bool,
    behavior: &BehaviorState,
) -> Bounded {
    let cfg = ctx.cfg;
    let current = ctx.current;
    let mut limits = Vec::new();
    let min = cfg.min_replicas.max(effect.min_replicas.unwrap_or(0));
    let max = effect.max_replicas.unwrap_or(cfg.max_replicas).max(min);
    if effect.min_replicas.is_some() || effect.max_replicas.is_some() {
        limits.push(Limit::ScheduleBounds {
            schedules: effect.open.clone(),
            min,
            max,
        });
    }
    let mut proposed = proposed;
    if proposed < min {
        limits.push(Limit::MinReplicas { min, proposed });
        proposed = min;
    } else if proposed > max {
        limits.push(Limit::MaxReplicas { max, proposed });
        proposed = max;
    }
    proposed = tolerance(ctx, proposed, min, max, &mut limits);
    // Consolidation-aware scale-in.
    if proposed < current && current > min {
        let load = [
            ctx.stable_rps,
            ctx.short_rps,
            forecast_rps.filter(|_| cfg.predictive.mode == PredictiveMode::On),
        ]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max);
        let headroom = 1.0 + cfg.consolidation_margin;
        let keep = ctx
            .sizer
            .replicas_needed(load * headroom, &ctx.strict_targets)
            .replicas;
        if keep > proposed {
            let to = keep.min(current);
            limits.push(Limit::Consolidation {
                proposed,
                keep: to,
                load_rps: load,
                headroom,
                margin: 1.0 - ctx.strict,
            });
            proposed = to.max(proposed);
        }
    }
    if proposed < current && panicking {
        limits.push(Limit::PanicNoScaleIn);
        proposed = current;
    }
    if proposed < current
        && cfg.cooldown_s > 0.0
        && let Some(last) = behavior.last_scale_event()
    {
        let since_s = ctx.now.secs_since(last);
        if since_s < cfg.cooldown_s {
            limits.push(Limit::Cooldown {
                since_s,
                cooldown_s: cfg.cooldown_s,
            });
            proposed = current;
        }
    }
    Bounded {
        proposed,
        min,
        max,
        limits,
    }
}

/// A change within the direction's tolerance of the current count is no
/// change.
fn tolerance(ctx: &Context<'_>, proposed: u32, min: u32, max: u32, limits: &mut Vec<Limit>) -> u32 {
    let current = ctx.current;
    let b = &ctx.cfg.behavior;
    if current == 0 || proposed == current {
        return proposed;
    }
    let ratio = f64::from(proposed) / f64::from(current);
    let (direction, tolerance) = if proposed > current
        && ratio <= 1.0 + b.scale_up.tolerance
        && proposed <= max
        && current >= min
    {
        (Direction::Up, b.scale_up.tolerance)
    } else if proposed < current && ratio >= 1.0 - b.scale_down.tolerance && current <= max {
        (Direction::Down, b.scale_down.tolerance)
    } else {
        return proposed;
    };
    limits.push(Limit::Tolerance {
        direction,
        proposed,
        current,
        tolerance,
    });
    current
}

/// HPA-exact stabilization and rate policies ([`crate::hpa`]); a current
/// count outside the bounds goes to the bound.
pub(crate) fn behaviour(
    ctx: &Context<'_>,
    behavior: &mut BehaviorState,
    proposed: u32,
    min: u32,
    max: u32,
    limits: &mut Vec<Limit>,
) -> u32 {
    let current = ctx.current;
    if current > max {
        limits.push(Limit::CurrentAboveMax { current, max });
        return max;
    }
    if current < min {
        limits.push(Limit::CurrentBelowMin { current, min });
        return min;
    }
    let n = behavior.normalize(&ctx.cfg.behavior, ctx.now, current, proposed, min, max);
    if let Some(reason) = n.stabilization {
        limits.push(Limit::Stabilized {
            reason,
            proposed: n.proposed,
            held_at: n.stabilized,
        });
    }
    if let Some(reason) = n.rate {
        limits.push(Limit::RateLimited {
            reason,
            from: n.stabilized,
            to: n.desired,
        });
    }
    n.desired
}

/// The replicas to remove on a scale-in ([`crate::victim`]); where fewer
/// may be removed (protected, draining or too young), the count kept.
pub(crate) fn victims(
    ctx: &Context<'_>,
    desired: u32,
    limits: &mut Vec<Limit>,
) -> (u32, Vec<String>) {
    let current = ctx.current;
    if desired >= current || ctx.obs.replica_samples.is_empty() {
        return (desired, Vec::new());
    }
    let want = (current - desired) as usize;
    let victims = victim::choose_victims(
        &ctx.obs.replica_samples,
        want,
        ctx.now,
        ctx.cfg.protection.min_replica_age_s,
    );
    if victims.len() < want {
        let keep = current - victims.len() as u32;
        limits.push(Limit::Protected {
            removable: victims.len() as u32,
            keep,
        });
        return (keep, victims);
    }
    (desired, victims)
}
