//! How long a workload's replicas take to start, learned from what the
//! scaler observes, and what it implies for replicas still starting.
//!
//! A replica's start-up is split in the phases the scaler sees:
//! created → scheduled (the pod is bound to a node: it leaves `Pending`)
//! → engine up (the engine answers its health check: the agent reports it)
//! → warm (the warm-up request succeeded: the readiness gate is True, the
//! replica is `Ready`). [`StartupTracker`] follows replicas through
//! successive observations (each with its `now`) and records each
//! replica's phase durations once it is warm; [`StartupModel`] keeps the
//! most recent of them and answers quantiles (p50, p90) of every phase and
//! of the whole start-up, and when a replica still starting is expected
//! to be ready: the median of the start-ups that took longer than it has
//! already been starting.
//!
//! Pure: `now` is an argument, nothing reads a clock.

use std::collections::{BTreeMap, VecDeque};

use gpuscale_core::Timestamp;
use serde::{Deserialize, Serialize};

use crate::observation::{ReplicaObservation, ReplicaState};

/// A phase of a replica's start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Created → scheduled (bound to a node, image pulled or not).
    Scheduling,
    /// Scheduled → the engine answers its health check.
    EngineStart,
    /// Engine up → the warm-up request succeeded (ready).
    WarmUp,
    /// Created → ready: the whole start-up.
    Total,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Scheduling,
        Phase::EngineStart,
        Phase::WarmUp,
        Phase::Total,
    ];

    /// A short name for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Scheduling => "scheduling",
            Phase::EngineStart => "engine_start",
            Phase::WarmUp => "warm_up",
            Phase::Total => "total",
        }
    }
}

/// When one replica reached each point of its start-up (those known).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StartupTimes {
    pub created: Option<Timestamp>,
    pub scheduled: Option<Timestamp>,
    pub engine_up: Option<Timestamp>,
    pub warm: Option<Timestamp>,
}

impl StartupTimes {
    /// Seconds spent in `phase`, when both ends are known and in order.
    pub(crate) fn phase_s(&self, phase: Phase) -> Option<f64> {
        let (from, to) = match phase {
            Phase::Scheduling => (self.created, self.scheduled),
            Phase::EngineStart => (self.scheduled, self.engine_up),
            Phase::WarmUp => (self.engine_up, self.warm),
            Phase::Total => (self.created, self.warm),
        };
        let s = to?.secs_since(from?);
        (s >= 0.0).then_some(s)
    }
}

/// Quantiles of the learned start-up, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StartupSummary {
    /// How many start-ups the figures come from (0: the prior).
    pub samples: usize,
    pub p50_s: f64,
    pub p90_s: f64,
}

/// The most recent start-ups of one workload (or node), by phase.
#[derive(Debug, Clone)]
pub struct StartupModel {
    prior_s: f64,
    capacity: usize,
    phases: BTreeMap<Phase, VecDeque<f64>>,
}

impl StartupModel {
    /// A model that answers `prior_s` (the configured cold start) until it
    /// has seen a start-up, and keeps the last `capacity` of each phase.
    pub fn new(prior_s: f64, capacity: usize) -> Self {
        Self {
            prior_s: prior_s.max(0.0),
            capacity: capacity.max(1),
            phases: BTreeMap::new(),
        }
    }

    /// Records one finished start-up (the phases whose ends are known).
    pub fn record(&mut self, times: &StartupTimes) {
        for phase in Phase::ALL {
            if let Some(s) = times.phase_s(phase) {
                let q = self.phases.entry(phase).or_default();
                if q.len() == self.capacity {
                    q.pop_front();
                }
                q.push_back(s);
            }
        }
    }

    /// Start-ups recorded for `phase` (at most the capacity).
    pub fn samples(&self, phase: Phase) -> usize {
        self.phases.get(&phase).map_or(0, VecDeque::len)
    }

    /// The `q` quantile (0..=1) of `phase`, `None` before any sample.
    pub fn quantile(&self, phase: Phase, q: f64) -> Option<f64> {
        let samples = self.phases.get(&phase)?;
        let mut v: Vec<f64> = samples.iter().copied().collect();
        quantile_of(&mut v, q)
    }

    /// p50 and p90 of the whole start-up; the prior before any sample.
    pub fn summary(&self) -> StartupSummary {
        let n = self.samples(Phase::Total);
        StartupSummary {
            samples: n,
            p50_s: self.quantile(Phase::Total, 0.5).unwrap_or(self.prior_s),
            p90_s: self.quantile(Phase::Total, 0.9).unwrap_or(self.prior_s),
        }
    }

    /// The lead time to plan with: the p90 start-up (the prior before any).
    pub(crate) fn lead_time_s(&self) -> f64 {
        self.summary().p90_s
    }

    /// When a replica created at `created` and not ready at `now` is
    /// expected to be ready: the median of the start-ups that lasted longer
    /// than it has been starting (conditional on its age); past every one
    /// seen, `now` plus the spread between p90 and p50 (it is late: expect
    /// it soon, not never).
    pub fn expected_ready_at(&self, created: Timestamp, now: Timestamp) -> Timestamp {
        let age = now.secs_since(created).max(0.0);
        let Some(samples) = self.phases.get(&Phase::Total) else {
            return created.plus_secs(self.prior_s.max(age));
        };
        let mut longer: Vec<f64> = samples.iter().copied().filter(|&s| s > age).collect();
        match quantile_of(&mut longer, 0.5) {
            Some(s) => created.plus_secs(s),
            None => {
                let s = self.summary();
                now.plus_secs((s.p90_s - s.p50_s).max(1.0))
            }
        }
    }
}

/// The `q` quantile of `v` by linear interpolation between order
/// statistics (sorts `v`); `None` when empty.
pub(crate) fn quantile_of(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// A replica still starting and when it is expected to be ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Starting {
    pub id: String,
    pub state: ReplicaState,
    /// Seconds since the pod was created.
    pub age_s: f64,
    pub expected_ready_at: Timestamp,
}

/// Follows replicas through successive observations and records the
/// start-up of each that becomes ready while followed.
#[derive(Debug, Clone)]
pub struct StartupTracker {
    model: StartupModel,
    seen: BTreeMap<String, StartupTimes>,
}

impl StartupTracker {
    pub fn new(model: StartupModel) -> Self {
        Self {
            model,
            seen: BTreeMap::new(),
        }
    }

    pub fn model(&self) -> &StartupModel {
        &self.model
    }

    /// Updates from the replicas observed at `now`; `engine_up` names the
    /// replicas whose engine answers (the agent reports it healthy) that
    /// are not yet warm. A replica already ready when first seen is not
    /// recorded (its start-up was not observed). Returns how many
    /// start-ups were recorded.
    pub fn observe(
        &mut self,
        now: Timestamp,
        replicas: &[ReplicaObservation],
        engine_up: &dyn Fn(&str) -> bool,
    ) -> usize {
        let mut recorded = 0;
        let mut present: Vec<&str> = Vec::with_capacity(replicas.len());
        for r in replicas {
            present.push(&r.id);
            let known = self.seen.contains_key(&r.id);
            match r.state {
                ReplicaState::Pending | ReplicaState::Loading => {
                    let t = self.seen.entry(r.id.clone()).or_insert(StartupTimes {
                        created: r.created_at,
                        ..StartupTimes::default()
                    });
                    if r.state == ReplicaState::Loading && t.scheduled.is_none() {
                        t.scheduled = Some(now);
                    }
                    if engine_up(&r.id) && t.engine_up.is_none() {
                        t.scheduled.get_or_insert(now);
                        t.engine_up = Some(now);
                    }
                }
                ReplicaState::Ready if known => {
                    if let Some(mut t) = self.seen.remove(&r.id)
                        && t.warm.is_none()
                    {
                        t.warm = Some(now);
                        t.scheduled.get_or_insert(now);
                        t.engine_up.get_or_insert(now);
                        self.model.record(&t);
                        recorded += 1;
                    }
                }
                ReplicaState::Ready | ReplicaState::Draining => {
                    self.seen.remove(&r.id);
                }
            }
        }
        self.seen.retain(|id, _| present.contains(&id.as_str()));
        recorded
    }

    /// The replicas still starting at `now` with their expected ready
    /// times, earliest first.
    pub fn starting(&self, now: Timestamp, replicas: &[ReplicaObservation]) -> Vec<Starting> {
        let mut out: Vec<Starting> = replicas
            .iter()
            .filter(|r| matches!(r.state, ReplicaState::Pending | ReplicaState::Loading))
            .map(|r| {
                let created = r.created_at.unwrap_or(now);
                Starting {
                    id: r.id.clone(),
                    state: r.state,
                    age_s: now.secs_since(created).max(0.0),
                    expected_ready_at: self.model.expected_ready_at(created, now),
                }
            })
            .collect();
        out.sort_by_key(|s| s.expected_ready_at);
        out
    }

    /// How many replicas will be ready at `at`: those ready now plus those
    /// starting whose expected ready time is at or before `at`.
    pub(crate) fn ready_by(
        &self,
        now: Timestamp,
        at: Timestamp,
        replicas: &[ReplicaObservation],
    ) -> u32 {
        let ready = replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Ready)
            .count();
        let starting = self
            .starting(now, replicas)
            .into_iter()
            .filter(|s| s.expected_ready_at <= at)
            .count();
        (ready + starting) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64) for the tests.
    struct Rng(u64);
    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Standard normal by Box–Muller.
        fn normal(&mut self) -> f64 {
            let u1 = self.next_f64().max(1e-12);
            let u2 = self.next_f64();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    fn t(s: f64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000).plus_secs(s)
    }

    fn replica(id: &str, state: ReplicaState, created: f64) -> ReplicaObservation {
        ReplicaObservation {
            created_at: Some(t(created)),
            ..ReplicaObservation::new(id, state)
        }
    }

    /// Start-ups drawn from known log-normal phases, followed through
    /// observations every second as the scaler makes them: the learned p50
    /// and p90 of each phase and of the total are within 10% of the
    /// distribution's own.
    #[test]
    fn recovers_p50_and_p90_of_a_known_distribution_from_observations() {
        // Scheduling ~ LN(ln 4, 0.3), engine start ~ LN(ln 40, 0.25), warm-up ~ LN(ln 6, 0.2).
        let phases = [(4.0_f64, 0.3_f64), (40.0, 0.25), (6.0, 0.2)];
        let mut rng = Rng(7);
        let mut tracker = StartupTracker::new(StartupModel::new(90.0, 400));
        let mut totals = Vec::new();
        let mut clock = 0.0;
        for i in 0..400 {
            let d: Vec<f64> = phases
                .iter()
                .map(|(median, sigma)| median * (sigma * rng.normal()).exp())
                .collect();
            let created = clock;
            let (sched, up, warm) = (
                created + d[0],
                created + d[0] + d[1],
                created + d[0] + d[1] + d[2],
            );
            totals.push(warm - created);
            let id = format!("r{i}");
            // Observed every 100 ms, so each edge is seen up to 0.1 s late.
            let mut now = created;
            loop {
                let state = if now < sched {
                    ReplicaState::Pending
                } else if now < warm {
                    ReplicaState::Loading
                } else {
                    ReplicaState::Ready
                };
                let r = [replica(&id, state, created)];
                let engine = |_: &str| now >= up;
                tracker.observe(t(now), &r, &engine);
                if state == ReplicaState::Ready {
                    break;
                }
                now += 0.1;
            }
            clock = now + 1.0;
        }
        let model = tracker.model();
        assert_eq!(model.samples(Phase::Total), 400);
        // The distribution's own quantiles: the total's from a large draw of
        // the same phases; each phase's in closed form.
        let mut big: Vec<f64> = (0..200_000)
            .map(|_| {
                phases
                    .iter()
                    .map(|(m, s)| m * (s * rng.normal()).exp())
                    .sum::<f64>()
            })
            .collect();
        let true_total = (
            quantile_of(&mut big, 0.5).unwrap(),
            quantile_of(&mut big, 0.9).unwrap(),
        );
        let z90 = 1.281_551_6;
        for (phase, (median, sigma)) in [Phase::Scheduling, Phase::EngineStart]
            .into_iter()
            .zip(phases)
        {
            let p50 = model.quantile(phase, 0.5).unwrap();
            let p90 = model.quantile(phase, 0.9).unwrap();
            let want90 = median * (sigma * z90).exp();
            assert!(
                (p50 / median - 1.0).abs() < 0.10,
                "{phase:?} p50 {p50} vs {median}"
            );
            assert!(
                (p90 / want90 - 1.0).abs() < 0.10,
                "{phase:?} p90 {p90} vs {want90}"
            );
        }
        let s = model.summary();
        assert!(
            (s.p50_s / true_total.0 - 1.0).abs() < 0.10,
            "{s:?} vs {true_total:?}"
        );
        assert!(
            (s.p90_s / true_total.1 - 1.0).abs() < 0.10,
            "{s:?} vs {true_total:?}"
        );
        // The drawn totals themselves agree with the learned ones to the
        // observation period (each phase edge up to 0.1 s late).
        let drawn = (
            quantile_of(&mut totals.clone(), 0.5).unwrap(),
            quantile_of(&mut totals, 0.9).unwrap(),
        );
        assert!((s.p50_s - drawn.0).abs() <= 0.3, "{s:?} vs drawn {drawn:?}");
        assert_eq!(model.lead_time_s(), s.p90_s);
    }

    #[test]
    fn a_replica_is_expected_at_the_median_of_start_ups_longer_than_its_age() {
        let mut m = StartupModel::new(60.0, 10);
        // Before any sample: the prior from creation.
        assert_eq!(m.expected_ready_at(t(0.0), t(5.0)), t(60.0));
        for s in [10.0, 20.0, 30.0, 40.0, 50.0] {
            m.record(&StartupTimes {
                created: Some(t(0.0)),
                warm: Some(t(s)),
                ..StartupTimes::default()
            });
        }
        assert_eq!(m.summary().p50_s, 30.0);
        // Age 0: the median of all. Age 25: the median of 30, 40, 50.
        assert_eq!(m.expected_ready_at(t(100.0), t(100.0)), t(130.0));
        assert_eq!(m.expected_ready_at(t(100.0), t(125.0)), t(140.0));
        // Older than every start-up seen: soon (p90 − p50 from now), never in the past.
        let late = m.expected_ready_at(t(100.0), t(170.0));
        assert!(late > t(170.0), "{late:?}");
        // The window keeps the last `capacity` samples.
        for _ in 0..10 {
            m.record(&StartupTimes {
                created: Some(t(0.0)),
                warm: Some(t(100.0)),
                ..StartupTimes::default()
            });
        }
        assert_eq!(m.samples(Phase::Total), 10);
        assert_eq!(m.summary().p90_s, 100.0);
    }

    #[test]
    fn starting_replicas_count_from_their_expected_ready_times() {
        let mut tracker = StartupTracker::new(StartupModel::new(30.0, 16));
        let none = |_: &str| false;
        let replicas = [
            replica("a", ReplicaState::Ready, -100.0),
            replica("b", ReplicaState::Loading, 0.0),
            replica("c", ReplicaState::Pending, 20.0),
        ];
        tracker.observe(t(25.0), &replicas, &none);
        let starting = tracker.starting(t(25.0), &replicas);
        assert_eq!(
            starting
                .iter()
                .map(|s| (s.id.as_str(), s.expected_ready_at))
                .collect::<Vec<_>>(),
            vec![("b", t(30.0)), ("c", t(50.0))]
        );
        assert_eq!(tracker.ready_by(t(25.0), t(25.0), &replicas), 1);
        assert_eq!(tracker.ready_by(t(25.0), t(30.0), &replicas), 2);
        assert_eq!(tracker.ready_by(t(25.0), t(60.0), &replicas), 3);
        // "a" was ready when first seen: its start-up is not learned.
        assert_eq!(tracker.model().samples(Phase::Total), 0);
        // b becomes ready at 31 s: learned as 31 s.
        let later = [
            replica("a", ReplicaState::Ready, -100.0),
            replica("b", ReplicaState::Ready, 0.0),
        ];
        assert_eq!(tracker.observe(t(31.0), &later, &none), 1);
        assert_eq!(tracker.model().summary().p50_s, 31.0);
    }
}
