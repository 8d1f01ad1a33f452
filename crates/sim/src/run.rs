//! One run: a workload replayed against a fleet driven by one autoscaler.
//!
//! The loop merges three clocks: the trace's arrivals, the fleet's internal
//! events (iterations, replica lifecycle), and the autoscaler's telemetry
//! samples and decisions. Samples are taken at `k·s + s/2` for a scrape
//! interval `s`, decisions at `k·d` for a decision interval `d`, so a
//! decision sees telemetry that is on average a quarter to half an interval
//! old, as a real deployment does. A policy that
//! [`Autoscaler::wakes_on_held`] also samples and decides at once when a
//! request arrives at a fleet at zero replicas. After the trace ends no decisions are
//! taken; the fleet finishes its work (GPU time is only counted up to the
//! end of the trace).

use std::time::Instant;

use serde_json::Value;

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, PodView};
use crate::fleet::{Fleet, FleetConfig, Lifecycle, ScaleEvent};
use crate::stats::{Recorder, RunStats, Slo};
use crate::trace::Workload;

/// Settings shared by every policy of a comparison.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub slo: Slo,
    pub fleet: FleetConfig,
    /// Replicas ready at time 0.
    pub initial_replicas: u32,
    /// Chart resolution, seconds.
    pub chart_bucket_s: f64,
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub policy: String,
    pub parameters: Value,
    pub stats: RunStats,
    pub gpu_hours: f64,
    pub scale_events: Vec<ScaleEvent>,
    pub max_queue: u64,
    /// Replicas ever created (cold starts paid, initial ones included).
    pub replicas_created: u32,
    /// Wall-clock seconds the run took (for the speed figure, not a result).
    pub wall_s: f64,
    /// The autoscaler's decision records, if it kept any.
    pub decision_log: Vec<String>,
}

impl RunOutcome {
    /// Direction reversals of consecutive scale events less than `window_s` apart.
    pub fn oscillations(&self, window_s: f64) -> u32 {
        let mut n = 0;
        for w in self.scale_events.windows(2) {
            let d0 = i64::from(w[0].to) - i64::from(w[0].from);
            let d1 = i64::from(w[1].to) - i64::from(w[1].from);
            if d0.signum() * d1.signum() < 0 && w[1].at - w[0].at <= window_s {
                n += 1;
            }
        }
        n
    }
}

/// A callback told the fraction of simulated time done.
pub type Progress<'a> = &'a mut dyn FnMut(f64);

/// Replay `workload` with `policy`.
pub fn run_policy(
    workload: &Workload,
    policy: &mut dyn Autoscaler,
    cfg: &RunConfig,
    mut progress: Option<Progress<'_>>,
) -> RunOutcome {
    let started = Instant::now();
    let horizon = workload.duration_s();
    let mut fcfg = cfg.fleet.clone();
    fcfg.horizon_s = horizon;
    fcfg.drain_grace_s = policy.drain_grace_s();
    fcfg.victim_order = policy.victim_order();
    let stats = RunStats::new(cfg.slo, horizon, cfg.chart_bucket_s);
    let mut fleet = Fleet::new(fcfg, cfg.initial_replicas, Recorder::Full(Box::new(stats)));

    let decide_every = policy.decision_interval_s().max(1e-3);
    let scrape_every = policy.scrape_interval_s().map(|s| s.max(1e-3));
    let mut next_decide = decide_every;
    let mut next_scrape = scrape_every.map_or(f64::INFINITY, |s| 0.5 * s);
    let mut next_chart = 0.0;
    let progress_every = horizon / 200.0;
    let mut next_progress = progress_every;

    let mut stream = workload.stream();
    let mut next_req = stream.next();
    loop {
        let t_arr = next_req.map_or(f64::INFINITY, |r| r.arrival_s);
        let t_ctrl = next_decide.min(next_scrape).min(next_chart);
        if t_arr <= t_ctrl {
            let Some(req) = next_req else { break };
            fleet.advance_to(t_arr);
            fleet.arrive(&req);
            next_req = stream.next();
            if fleet.spec_replicas() == 0 && fleet.router_queue_len() > 0 && policy.wakes_on_held()
            {
                policy.observe(sample_fleet(&fleet, t_arr));
                decide(&mut fleet, policy, t_arr);
            }
            continue;
        }
        if t_ctrl > horizon {
            break;
        }
        fleet.advance_to(t_ctrl);
        if t_ctrl == next_chart {
            let (_, _, ready, _) = fleet.state_counts();
            let spec = fleet.spec_replicas();
            if let Some(s) = fleet.recorder.stats_mut() {
                s.series.replicas.push((t_ctrl, spec, ready));
            }
            next_chart += cfg.chart_bucket_s;
        }
        if t_ctrl == next_scrape {
            policy.observe(sample_fleet(&fleet, t_ctrl));
            next_scrape += scrape_every.unwrap_or(f64::INFINITY);
        }
        if t_ctrl == next_decide {
            decide(&mut fleet, policy, t_ctrl);
            next_decide += decide_every;
        }
        if let Some(p) = progress.as_mut()
            && t_ctrl >= next_progress
        {
            p((t_ctrl / horizon).min(1.0));
            next_progress += progress_every;
        }
    }
    fleet.finish();
    if let Some(p) = progress.as_mut() {
        p(1.0);
    }
    let gpu_hours = fleet.gpu_seconds(horizon) / 3600.0;
    let max_queue = fleet.max_waiting;
    let replicas_created = fleet.replicas().len() as u32;
    let scale_events = std::mem::take(&mut fleet.scale_events);
    let stats = fleet
        .recorder
        .stats()
        .cloned()
        .unwrap_or_else(|| RunStats::new(cfg.slo, horizon, cfg.chart_bucket_s));
    RunOutcome {
        policy: policy.name(),
        parameters: policy.parameters(),
        stats,
        gpu_hours,
        scale_events,
        max_queue,
        replicas_created,
        wall_s: started.elapsed().as_secs_f64(),
        decision_log: policy.take_decision_log(),
    }
}

/// One decision at `now`, applied to the fleet.
fn decide(fleet: &mut Fleet, policy: &mut dyn Autoscaler, now: f64) {
    let view = cluster_view(fleet, now);
    let cmd = policy.decide(&view);
    fleet.set_batch_limit(cmd.batch_limit.or(fleet.published_batch_limit()), now);
    fleet.scale_to(cmd.replicas, &cmd.victims, now);
}

/// Sample every live replica past pending.
pub fn sample_fleet(fleet: &Fleet, now: f64) -> FleetSample {
    let mut replicas = Vec::with_capacity(fleet.live_ids().len());
    for &id in fleet.live_ids() {
        let r = &fleet.replicas()[id as usize];
        if r.state == Lifecycle::Pending {
            continue;
        }
        replicas.push(fleet.sample_replica(id, now));
    }
    FleetSample {
        at: now,
        ingress_total: fleet.ingress_total,
        router_queue: fleet.router_queue_len() as u32,
        replicas,
    }
}

/// What Kubernetes shows at `now`.
pub fn cluster_view(fleet: &Fleet, now: f64) -> ClusterView {
    let (pending, loading, ready, draining) = fleet.state_counts();
    let pods = fleet
        .live_ids()
        .iter()
        .map(|&id| {
            let r = &fleet.replicas()[id as usize];
            PodView {
                id,
                state: r.state,
                created_at: r.created_at,
                ready_at: r.ready_at,
            }
        })
        .collect();
    ClusterView {
        now,
        spec_replicas: fleet.spec_replicas(),
        pending,
        loading,
        ready,
        draining,
        pods,
    }
}
