//! The oracle (REFERENCE.md §3.3): the lower bound on GPU-hours for any
//! online policy at a given SLO attainment.
//!
//! It knows the whole future trace and the exact performance model, has no
//! metric lag, stabilization or rate limit, starts each replica exactly one
//! cold start before it is needed, and removes a replica only after its
//! in-flight requests finish.
//!
//! **Planning.** Walking forward in windows of Δ = 10 s from the real state
//! of a fleet whose ready count changes instantly, `n*(w)` is the smallest
//! `n` such that replaying window `w`'s arrivals with `n` ready replicas
//! (same router, same engine model; until those requests finish, later
//! arrivals still coming to the same replicas, uncounted) meets the
//! attainment target for the window's requests.
//! The search starts from the previous window's answer and gallops, so a
//! window typically costs two or three replays. Then the chosen `n` is
//! applied and the window is replayed for real to reach the next state.
//!
//! **Execution.** A replica needed ready at `s` is created at `s − T_start`
//! (pending plus cold start), and a replica is kept through any gap shorter
//! than `T_start` (relaunching would cost at least as much): the desired count
//! at `t` is `max n*(w)` over the windows starting in `[t, t + T_start]`
//! and the current one. Scale-in drains the least-loaded replicas without a
//! grace limit. Decisions every Δ.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::fleet::{Fleet, FleetConfig, VictimOrder};
use crate::stats::{Recorder, Slo, WindowCount};
use crate::trace::{Request, Workload};

/// The oracle's decision interval, seconds.
pub const WINDOW_S: f64 = 10.0;
/// A window's replay keeps feeding later arrivals (to the same `n`
/// replicas, not counted) for up to this long, until the window's requests
/// are all done: their inter-token latency depends on the batch they share.
pub const LOOKAHEAD_S: f64 = 60.0;

/// The planned ready count per window.
#[derive(Debug, Clone)]
pub struct OraclePlan {
    pub window_s: f64,
    pub ready: Arc<Vec<u32>>,
    /// Attainment target each window was planned for.
    pub target: f64,
    /// Replays run while planning (for the report).
    pub replays: u64,
}

/// Plan the oracle for `workload` with the fleet of `fleet_cfg`.
pub fn plan(
    workload: &Workload,
    fleet_cfg: &FleetConfig,
    slo: Slo,
    target: f64,
    min_replicas: u32,
    max_replicas: u32,
) -> OraclePlan {
    let horizon = workload.duration_s();
    let windows = (horizon / WINDOW_S).ceil().max(1.0) as usize;
    let mut cfg = fleet_cfg.clone();
    cfg.drain_grace_s = None;
    cfg.victim_order = VictimOrder::LeastWork;
    cfg.pending_s = 0.0;
    cfg.horizon_s = horizon;
    let counter = |from_s| {
        Recorder::Window(WindowCount {
            slo,
            from_s,
            total: 0,
            met: 0,
        })
    };
    let mut fleet = Fleet::new(cfg, min_replicas.max(1), counter(0.0));
    fleet.enable_recycling();
    let min = min_replicas.max(1);
    let max = max_replicas.max(min);
    let mut stream = workload.stream();
    // Upcoming requests: the window's, then up to `LOOKAHEAD_S` more.
    let mut ahead: VecDeque<Request> = VecDeque::new();
    let mut next = stream.next();
    let mut ready = Vec::with_capacity(windows);
    let mut prev = min;
    let mut replays = 0u64;
    for w in 0..windows {
        let t0 = w as f64 * WINDOW_S;
        let t1 = t0 + WINDOW_S;
        while let Some(r) = next {
            if r.arrival_s >= t1 + LOOKAHEAD_S {
                break;
            }
            ahead.push_back(r);
            next = stream.next();
        }
        let in_window = ahead.iter().take_while(|r| r.arrival_s < t1).count();
        fleet.advance_to(t0);
        let meets = |n: u32, replays: &mut u64| -> bool {
            *replays += 1;
            let mut trial = fleet.clone();
            trial.recorder = counter(t0);
            trial.force_ready(n, t0);
            let done = |f: &Fleet| match f.recorder {
                Recorder::Window(c) => c.total >= in_window as u64,
                Recorder::Full(_) => true,
            };
            for (i, r) in ahead.iter().enumerate() {
                if i >= in_window && done(&trial) {
                    break;
                }
                trial.advance_to(r.arrival_s);
                trial.arrive(r);
            }
            trial.run_to_completion();
            match trial.recorder {
                Recorder::Window(c) => c.total == 0 || c.met as f64 >= target * c.total as f64,
                Recorder::Full(_) => true,
            }
        };
        let n = if in_window == 0 && fleet.in_flight() == 0 {
            min
        } else {
            search(prev, min, max, |n| meets(n, &mut replays))
        };
        ready.push(n);
        prev = n;
        fleet.force_ready(n, t0);
        for r in ahead.drain(..in_window) {
            fleet.advance_to(r.arrival_s);
            fleet.arrive(&r);
        }
    }
    OraclePlan {
        window_s: WINDOW_S,
        ready: Arc::new(ready),
        target,
        replays,
    }
}

/// The smallest `n` in `[min, max]` with `ok(n)`, starting from `start` and
/// galloping (`max` when none is).
fn search(start: u32, min: u32, max: u32, mut ok: impl FnMut(u32) -> bool) -> u32 {
    let start = start.clamp(min, max);
    if ok(start) {
        // Walk down while it still holds (galloping down).
        let mut good = start;
        let mut step = 1;
        loop {
            if good == min {
                return min;
            }
            let probe = good.saturating_sub(step).max(min);
            if ok(probe) {
                good = probe;
                step *= 2;
            } else {
                // Binary search in (probe, good).
                let mut lo = probe;
                let mut hi = good;
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if ok(mid) {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                return hi;
            }
        }
    }
    let mut bad = start;
    let mut step = 1;
    loop {
        if bad == max {
            return max;
        }
        let probe = (bad + step).min(max);
        if ok(probe) {
            let mut lo = bad;
            let mut hi = probe;
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if ok(mid) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            return hi;
        }
        bad = probe;
        step *= 2;
    }
}

/// The oracle's execution: follows a plan, launching one cold start ahead.
#[derive(Debug, Clone)]
pub struct OracleSchedule {
    plan: OraclePlan,
    lead_s: f64,
}

impl OracleSchedule {
    /// `lead_s` is the full time from creation to ready (pending + cold start).
    pub fn new(plan: OraclePlan, lead_s: f64) -> Self {
        Self { plan, lead_s }
    }

    /// The desired replica count at `t`.
    pub fn desired_at(&self, t: f64) -> u32 {
        let w = self.plan.window_s;
        let first = (t / w).floor().max(0.0) as usize;
        let last = ((t + self.lead_s) / w).floor().max(0.0) as usize;
        let n = self.plan.ready.len();
        if n == 0 {
            return 1;
        }
        (first.min(n - 1)..=last.min(n - 1))
            .map(|i| self.plan.ready[i])
            .max()
            .unwrap_or(1)
    }
}

impl Autoscaler for OracleSchedule {
    fn name(&self) -> String {
        "oracle".into()
    }
    fn parameters(&self) -> Value {
        json!({
            "window_s": self.plan.window_s,
            "attainment_target": self.plan.target,
            "lead_s": self.lead_s,
            "planning_replays": self.plan.replays,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        self.plan.window_s
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        None
    }
    fn drain_grace_s(&self) -> Option<f64> {
        None
    }
    fn victim_order(&self) -> VictimOrder {
        VictimOrder::LeastWork
    }
    fn observe(&mut self, _sample: FleetSample) {}
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        ScaleCommand::replicas(self.desired_at(view.now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_finds_the_smallest_passing_count_from_either_side() {
        for need in 1..40u32 {
            for start in [1u32, 5, 17, 39] {
                assert_eq!(
                    search(start, 1, 40, |n| n >= need),
                    need,
                    "need {need} start {start}"
                );
            }
        }
        assert_eq!(search(3, 1, 10, |_| false), 10);
    }

    #[test]
    fn schedule_launches_one_cold_start_ahead_and_bridges_short_gaps() {
        let plan = OraclePlan {
            window_s: 10.0,
            ready: Arc::new(vec![1, 1, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
            target: 0.99,
            replays: 0,
        };
        let s = OracleSchedule::new(plan, 30.0);
        assert_eq!(s.desired_at(0.0), 1);
        // Window 4 (t = 40) needs 3: launch at 10.
        assert_eq!(s.desired_at(10.0), 3);
        assert_eq!(s.desired_at(50.0), 3);
        assert_eq!(s.desired_at(60.0), 1);
    }
}
