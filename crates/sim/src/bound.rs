//! The lower bound (REFERENCE.md §3.3): the cheapest replica schedule,
//! cold starts paid, that reaches a given overall SLO attainment, for a
//! planner that knows the whole trace and the exact engine model.
//!
//! **Curves.** Walking forward in windows of Δ = 10 s along a generous
//! reference trajectory, each window's requests are replayed with `n` ready
//! replicas (the same router and engine model, from the reference fleet's
//! state at the window's start; later arrivals keep coming to the same `n`
//! replicas, uncounted, until the window's requests are all done, since
//! their time per output token depends on the batch they share). This
//! gives `met_w(n)`, the window's requests that meet the SLO, for the `n`
//! that matter: the smallest `n_sat` at which the window meets all it can
//! (as many as with the replica cap), and counts below it down to where it
//! meets nothing. The reference fleet then serves the window with `n_sat`.
//! Requests no replica count can serve (see [`crate::ceiling`]) are never
//! chased: they add nothing to any `met_w(n)`.
//!
//! **Schedules.** For a price `λ` of a missed request in replica-seconds,
//! a dynamic programme over windows picks the replica counts `n_w` that
//! minimise `Σ (Δ·n_w + T·max(0, n_w − n_{w−1})) − λ·Σ met_w(n_w)`: ready
//! time plus one cold start `T` per replica launched (so a short gap is
//! bridged when keeping a replica costs less than relaunching it), with
//! `met_w` interpolated on its upper concave hull between the evaluated
//! counts. Before the first cold start has elapsed no more than the initial
//! replicas can be ready. Bisecting `λ` finds the cheapest schedule whose
//! curves reach a target attainment.
//!
//! **Replay.** A schedule runs as a policy ([`BoundSchedule`]): a replica
//! needed ready at `s` is created at `s − T`, a replica is kept through any
//! gap shorter than `T`, scale-in drains the least-loaded replicas without a
//! grace limit. The replay's attainment and GPU-hours are the bound's
//! point; the curves, taken along a well-provisioned trajectory, are
//! slightly optimistic about a schedule's attainment (a window served with
//! fewer replicas leaves a backlog they do not see), and the replay says by
//! how much. [`crate::report`] relates every policy to the frontier of
//! these points and flags any run that reaches a point's attainment with
//! fewer GPU-hours.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::fleet::{Fleet, FleetConfig, VictimOrder};
use crate::stats::{Recorder, Slo, WindowCount};
use crate::trace::{Request, Workload};

/// The bound's window, seconds.
pub const WINDOW_S: f64 = 10.0;
/// A window's replay keeps feeding later arrivals (to the same `n`
/// replicas, not counted) for up to this long, until the window's requests
/// are all done: their time per output token depends on the batch they share.
pub(crate) const LOOKAHEAD_S: f64 = 60.0;

/// One window: its requests and what each evaluated replica count meets.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowCurve {
    /// Requests arriving in the window.
    pub requests: u32,
    /// `(n, met)` for each evaluated ready count, ascending in `n`; the last
    /// is the smallest count that meets all the window can.
    pub points: Vec<(u32, u32)>,
}

impl WindowCurve {
    /// The smallest count that meets all the window can.
    pub fn saturation(&self) -> u32 {
        self.points.last().map_or(0, |p| p.0)
    }

    /// The most requests of the window any count meets.
    pub(crate) fn max_met(&self) -> u32 {
        self.points.last().map_or(0, |p| p.1)
    }
}

/// Every window's curve, with what the schedules need to know.
#[derive(Debug, Clone)]
pub struct Curves {
    pub window_s: f64,
    pub windows: Vec<WindowCurve>,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub initial_replicas: u32,
    /// Seconds from creating a replica until it is ready.
    pub lead_s: f64,
    pub requests: u64,
    /// Replays run to build the curves, and the wall-clock seconds they took
    /// (for the report's speed figures, not a result).
    pub replays: u64,
    pub wall_s: f64,
}

impl Curves {
    /// The attainment a schedule meeting every window's most would reach.
    pub fn max_attainment(&self) -> f64 {
        let met: u64 = self.windows.iter().map(|w| u64::from(w.max_met())).sum();
        met as f64 / self.requests.max(1) as f64
    }

    /// The largest saturation count over the windows.
    pub(crate) fn peak_saturation(&self) -> u32 {
        self.windows
            .iter()
            .map(WindowCurve::saturation)
            .max()
            .unwrap_or(0)
    }
}

/// How much of each window's curve to evaluate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CurveDetail {
    /// Only each window's count that meets this share of what it can
    /// (enough to calibrate a trace's rate to a replica count; 0.99 keeps
    /// one request that needs a replica of its own from setting the scale).
    Saturation(f64),
    /// The saturation count and the counts below it that a schedule may choose.
    Full,
}

/// The curves of `workload` on fleets of `fleet_cfg` under `slo`, along
/// the generous reference trajectory (each window served with its
/// saturation count).
pub fn curves(
    workload: &Workload,
    fleet_cfg: &FleetConfig,
    slo: Slo,
    min_replicas: u32,
    max_replicas: u32,
    initial_replicas: u32,
    detail: CurveDetail,
) -> Curves {
    build_curves(
        workload,
        fleet_cfg,
        slo,
        (min_replicas, max_replicas, initial_replicas),
        detail,
        None,
    )
}

/// The curves along a schedule's own trajectory: each window's replays
/// start from the state the schedule `ready` (ready replicas per window)
/// leaves, backlog included, and the schedule's own count is among the
/// evaluated ones. A schedule that under-provisions builds a backlog the
/// generous reference never sees; solving again on these curves prices it.
pub(crate) fn curves_along(
    workload: &Workload,
    fleet_cfg: &FleetConfig,
    slo: Slo,
    bounds: (u32, u32, u32),
    ready: &[u32],
) -> Curves {
    build_curves(
        workload,
        fleet_cfg,
        slo,
        bounds,
        CurveDetail::Full,
        Some(ready),
    )
}

fn build_curves(
    workload: &Workload,
    fleet_cfg: &FleetConfig,
    slo: Slo,
    (min_replicas, max_replicas, initial_replicas): (u32, u32, u32),
    detail: CurveDetail,
    along: Option<&[u32]>,
) -> Curves {
    let started = std::time::Instant::now();
    let horizon = workload.duration_s();
    let windows = (horizon / WINDOW_S).ceil().max(1.0) as usize;
    let mut cfg = fleet_cfg.clone();
    cfg.drain_grace_s = None;
    cfg.victim_order = VictimOrder::LeastWork;
    cfg.pending_s = 0.0;
    cfg.horizon_s = horizon;
    let counter = |from_s: f64| {
        Recorder::Window(WindowCount {
            slo,
            from_s,
            until_s: from_s + WINDOW_S,
            total: 0,
            met: 0,
        })
    };
    let min = min_replicas.max(1);
    let max = max_replicas.max(min);
    let mut fleet = Fleet::new(cfg, initial_replicas.clamp(min, max), counter(0.0));
    fleet.enable_recycling();
    let mut stream = workload.stream();
    // Upcoming requests: the window's, then up to `LOOKAHEAD_S` more.
    let mut ahead: VecDeque<Request> = VecDeque::new();
    let mut next = stream.next();
    let mut out = Vec::with_capacity(windows);
    let mut prev = min;
    let mut replays = 0u64;
    let mut requests = 0u64;
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
        requests += in_window as u64;
        fleet.advance_to(t0);
        let curve = if in_window == 0 {
            WindowCurve {
                requests: 0,
                points: vec![(min, 0)],
            }
        } else {
            let mut memo: HashMap<u32, u32> = HashMap::new();
            let mut met = |n: u32| -> u32 {
                *memo.entry(n).or_insert_with(|| {
                    replays += 1;
                    replay(&fleet, &ahead, in_window, n, t0, counter(t0))
                })
            };
            let best = met(max);
            let want = match detail {
                CurveDetail::Full => best,
                CurveDetail::Saturation(share) => {
                    (f64::from(best) * share.clamp(0.0, 1.0)).ceil() as u32
                }
            };
            let sat = search(prev, min, max, |n| met(n) >= want);
            let mut points = vec![(sat, met(sat))];
            if detail == CurveDetail::Full {
                // Below saturation: one, two, four, ... fewer, down to
                // nothing met or the floor.
                let mut step = 1;
                let mut n = sat;
                while n > min {
                    n = sat.saturating_sub(step).max(min);
                    let m = met(n);
                    points.push((n, m));
                    if m == 0 {
                        break;
                    }
                    step *= 2;
                }
                if let Some(n) = along.and_then(|a| a.get(w)).copied() {
                    let n = n.clamp(min, sat);
                    points.push((n, met(n)));
                }
                points.sort_unstable();
                points.dedup();
            }
            WindowCurve {
                requests: in_window as u32,
                points,
            }
        };
        prev = curve.saturation().max(min);
        let n = along
            .and_then(|a| a.get(w))
            .map_or(prev, |&n| n.clamp(min, max));
        out.push(curve);
        fleet.force_ready(n, t0);
        for r in ahead.drain(..in_window) {
            fleet.advance_to(r.arrival_s);
            fleet.arrive(&r);
        }
    }
    Curves {
        window_s: WINDOW_S,
        windows: out,
        min_replicas: min,
        max_replicas: max,
        initial_replicas: initial_replicas.clamp(min, max),
        lead_s: fleet_cfg.pending_s + fleet_cfg.cold_start.max_s(),
        requests,
        replays,
        wall_s: started.elapsed().as_secs_f64(),
    }
}

/// Requests of the window (the first `in_window` of `ahead`) that meet the
/// SLO with `n` ready replicas from `fleet`'s state at `t0`.
fn replay(
    fleet: &Fleet,
    ahead: &VecDeque<Request>,
    in_window: usize,
    n: u32,
    t0: f64,
    recorder: Recorder,
) -> u32 {
    let mut trial = fleet.clone();
    trial.recorder = recorder;
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
        Recorder::Window(c) => u32::try_from(c.met).unwrap_or(u32::MAX),
        Recorder::Full(_) => 0,
    }
}

/// The smallest `n` in `[min, max]` with `ok(n)` (monotone), starting from
/// `start` and galloping (`max` when none is).
fn search(start: u32, min: u32, max: u32, mut ok: impl FnMut(u32) -> bool) -> u32 {
    let start = start.clamp(min, max);
    let (mut lo, mut hi) = if ok(start) {
        // Gallop down while it still holds.
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
                break (probe, good);
            }
        }
    } else {
        let mut bad = start;
        let mut step = 1;
        loop {
            if bad == max {
                return max;
            }
            let probe = (bad + step).min(max);
            if ok(probe) {
                break (bad, probe);
            }
            bad = probe;
            step *= 2;
        }
    };
    // ok(hi), !ok(lo): binary search in between.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if ok(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// A schedule the dynamic programme chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Ready replicas per window.
    pub ready: Arc<Vec<u32>>,
    /// Requests the curves say it meets.
    pub predicted_met: f64,
    /// Its cost in replica-seconds (ready time plus cold starts).
    pub replica_seconds: f64,
    /// The price of a miss it was solved for, replica-seconds.
    pub lambda: f64,
}

/// `met_w(n)` on the upper concave hull of the window's evaluated points
/// (through `(0, 0)`): the optimistic interpolation.
fn hull(points: &[(u32, u32)]) -> Vec<(f64, f64)> {
    let mut h: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    for &(n, m) in points {
        let p = (f64::from(n), f64::from(m));
        while h.len() >= 2 {
            let (a, b) = (h[h.len() - 2], h[h.len() - 1]);
            // Drop b when it lies on or below the chord a → p.
            let cross = (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0);
            if cross >= 0.0 {
                h.pop();
            } else {
                break;
            }
        }
        h.push(p);
    }
    h
}

/// Fills `out[n]` with the hull's value at each `n` in `0..out.len()`.
fn hull_values(h: &[(f64, f64)], out: &mut [f64]) {
    let mut k = 0;
    for (n, v) in out.iter_mut().enumerate() {
        let x = n as f64;
        while k + 1 < h.len() && h[k + 1].0 < x {
            k += 1;
        }
        *v = if k + 1 >= h.len() {
            h[k].1
        } else {
            let (a, b) = (h[k], h[k + 1]);
            if x >= b.0 {
                b.1
            } else {
                a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0).max(1e-12)
            }
        };
    }
}

/// The schedule minimising cost − `lambda` × met (see the module docs).
pub fn solve(curves: &Curves, lambda: f64) -> Plan {
    let w_count = curves.windows.len();
    let max = curves.max_replicas as usize;
    let min = curves.min_replicas as usize;
    let dt = curves.window_s;
    let launch = curves.lead_s;
    let width = max + 1;
    const INF: f64 = f64::INFINITY;
    let mut prev = vec![INF; width];
    prev[curves.initial_replicas as usize] = 0.0;
    let mut cur = vec![INF; width];
    let mut choice: Vec<u16> = vec![0; w_count * width];
    let mut met = vec![0.0; width];
    let mut suffix: Vec<(f64, usize)> = vec![(INF, 0); width + 1];
    for (w, curve) in curves.windows.iter().enumerate() {
        hull_values(&hull(&curve.points), &mut met);
        // Replicas beyond the initial ones cannot be ready before a cold start.
        let cap = if (w as f64) * dt < launch {
            curves.initial_replicas as usize
        } else {
            max
        };
        // Suffix minima of prev (staying or scaling in costs nothing more).
        suffix[width] = (INF, 0);
        for m in (0..width).rev() {
            suffix[m] = if prev[m] <= suffix[m + 1].0 {
                (prev[m], m)
            } else {
                suffix[m + 1]
            };
        }
        // Prefix minima of prev − T·m (scaling up from m costs T·(n − m)).
        let mut best_up = (INF, 0usize);
        for n in 0..width {
            let row = &mut choice[w * width..(w + 1) * width];
            if n >= min && n <= cap {
                let stay = suffix[n];
                let up = (best_up.0 + launch * n as f64, best_up.1);
                let (base, from) = if stay.0 <= up.0 { stay } else { up };
                cur[n] = base + dt * n as f64 - lambda * met[n];
                row[n] = u16::try_from(from).unwrap_or(u16::MAX);
            } else {
                cur[n] = INF;
            }
            let v = prev[n] - launch * n as f64;
            if v < best_up.0 {
                best_up = (v, n);
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    // Backtrack from the best final count.
    let mut n = (0..width)
        .min_by(|a, b| prev[*a].total_cmp(&prev[*b]))
        .unwrap_or(min);
    let mut ready = vec![0u32; w_count];
    for w in (0..w_count).rev() {
        ready[w] = n as u32;
        n = usize::from(choice[w * width + n]);
    }
    let mut predicted = 0.0;
    let mut cost = 0.0;
    let mut last = curves.initial_replicas;
    for (w, curve) in curves.windows.iter().enumerate() {
        let n = ready[w];
        hull_values(&hull(&curve.points), &mut met[..=n as usize]);
        predicted += met[n as usize];
        cost += dt * f64::from(n) + launch * f64::from(n.saturating_sub(last));
        last = n;
    }
    Plan {
        ready: Arc::new(ready),
        predicted_met: predicted,
        replica_seconds: cost,
        lambda,
    }
}

/// The cheapest schedule whose curves meet at least `target` (an
/// attainment, 0..=1, of all requests): bisection on the price of a miss.
pub fn optimize(curves: &Curves, target: f64) -> Plan {
    let want = target.clamp(0.0, curves.max_attainment()) * curves.requests as f64;
    let (mut lo, mut hi) = (1e-6_f64, 1e7_f64);
    let mut best = solve(curves, hi);
    if best.predicted_met + 1e-9 < want {
        return best;
    }
    for _ in 0..60 {
        let mid = (lo * hi).sqrt();
        let p = solve(curves, mid);
        if p.predicted_met + 1e-9 >= want {
            hi = mid;
            best = p;
        } else {
            lo = mid;
        }
        if hi / lo < 1.0 + 1e-4 {
            break;
        }
    }
    best
}

/// A plan run as a policy: launches one cold start ahead.
#[derive(Debug, Clone)]
pub struct BoundSchedule {
    plan: Plan,
    /// How the curves behind the plan were built (for the report).
    curve_replays: u64,
    curve_wall_s: f64,
    window_s: f64,
    lead_s: f64,
    /// The attainment target the plan was solved for (for the report).
    target: f64,
}

impl BoundSchedule {
    /// `lead_s` is the full time from creation to ready (pending + cold start).
    pub fn new(plan: Plan, window_s: f64, lead_s: f64, target: f64) -> Self {
        Self {
            plan,
            curve_replays: 0,
            curve_wall_s: 0.0,
            window_s,
            lead_s,
            target,
        }
    }

    /// Records how the curves behind the plan were built.
    pub(crate) fn with_curve_cost(mut self, curves: &Curves) -> Self {
        self.curve_replays = curves.replays;
        self.curve_wall_s = curves.wall_s;
        self
    }

    /// The desired replica count at `t`: the most any window starting within
    /// one cold start needs (so replicas start in time and short gaps are
    /// bridged).
    pub(crate) fn desired_at(&self, t: f64) -> u32 {
        let w = self.window_s;
        let ready = &self.plan.ready;
        let Some(last_index) = ready.len().checked_sub(1) else {
            return 1;
        };
        let first = ((t / w).floor().max(0.0) as usize).min(last_index);
        let last = (((t + self.lead_s) / w).floor().max(0.0) as usize).min(last_index);
        ready[first..=last].iter().copied().max().unwrap_or(1)
    }
}

impl Autoscaler for BoundSchedule {
    fn name(&self) -> String {
        "lower-bound".into()
    }
    fn parameters(&self) -> Value {
        json!({
            "window_s": self.window_s,
            "target_attainment": self.target,
            "lead_s": self.lead_s,
            "price_of_a_miss_replica_s": self.plan.lambda,
            "predicted_met": self.plan.predicted_met,
            "planned_replica_seconds": self.plan.replica_seconds,
            "curve_replays": self.curve_replays,
            "curve_wall_s": self.curve_wall_s,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        self.window_s
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

    fn flat_curves(needs: &[(u32, u32)], lead_s: f64, initial: u32) -> Curves {
        // Each window: `requests` requests, all met from `sat` replicas on,
        // none below.
        Curves {
            window_s: 10.0,
            windows: needs
                .iter()
                .map(|&(sat, requests)| WindowCurve {
                    requests,
                    points: if sat > 1 {
                        vec![(sat - 1, 0), (sat, requests)]
                    } else {
                        vec![(1, requests)]
                    },
                })
                .collect(),
            min_replicas: 1,
            max_replicas: 10,
            initial_replicas: initial,
            lead_s,
            requests: needs.iter().map(|n| u64::from(n.1)).sum(),
            replays: 0,
            wall_s: 0.0,
        }
    }

    #[test]
    fn a_short_dip_is_bridged_when_relaunching_costs_more() {
        // 3 needed, a 10 s dip to 1, then 3 again; a cold start costs 60 s.
        let c = flat_curves(&[(3, 100), (3, 100), (1, 10), (3, 100), (3, 100)], 60.0, 3);
        let p = optimize(&c, 1.0);
        assert_eq!(p.predicted_met, 410.0);
        assert_eq!(
            *p.ready,
            vec![3, 3, 3, 3, 3],
            "keeping 2 for 10 s is cheaper"
        );
        // With a 5 s cold start, letting them go is cheaper.
        let c = flat_curves(&[(3, 100), (3, 100), (1, 10), (3, 100), (3, 100)], 5.0, 3);
        assert_eq!(*optimize(&c, 1.0).ready, vec![3, 3, 1, 3, 3]);
    }

    #[test]
    fn a_lower_target_gives_up_the_most_expensive_requests_first() {
        // A burst window needs 9 replicas for 10 requests; the rest need 2
        // for 100 each. Missing the burst's 10 of 410 is cheapest.
        let c = flat_curves(&[(2, 100), (2, 100), (9, 10), (2, 100), (2, 100)], 0.0, 2);
        let all = optimize(&c, 1.0);
        assert_eq!(all.ready[2], 9);
        let most = optimize(&c, 0.97);
        assert!(most.ready[2] < 9, "{:?}", most.ready);
        assert_eq!(most.ready[1], 2, "{:?}", most.ready);
        assert!(most.replica_seconds < all.replica_seconds);
        assert!(most.predicted_met >= 0.97 * 410.0);
    }

    #[test]
    fn nothing_but_the_initial_replicas_is_ready_before_one_cold_start() {
        let c = flat_curves(&[(5, 100), (5, 100), (5, 100)], 15.0, 2);
        let p = optimize(&c, 1.0);
        assert_eq!(p.ready[0], 2, "window 0 starts before a cold start ends");
        assert_eq!(p.ready[2], 5);
    }

    #[test]
    fn schedule_launches_one_cold_start_ahead_and_bridges_short_gaps() {
        let plan = Plan {
            ready: Arc::new(vec![1, 1, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
            predicted_met: 0.0,
            replica_seconds: 0.0,
            lambda: 1.0,
        };
        let s = BoundSchedule::new(plan, 10.0, 30.0, 1.0);
        assert_eq!(s.desired_at(0.0), 1);
        // Window 4 (t = 40) needs 3: launch at 10.
        assert_eq!(s.desired_at(10.0), 3);
        assert_eq!(s.desired_at(50.0), 3);
        assert_eq!(s.desired_at(60.0), 1);
    }
}
