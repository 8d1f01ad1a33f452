//! Scale to zero and back.
//!
//! * [`Activators`]: what the activators hold, per workload and activator
//!   replica (reports older than [`REPORT_TTL`] count for nothing: an
//!   activator that went away holds nothing), and the wake-up that makes
//!   the decide loop decide at once when a workload at zero receives a
//!   request (scale from zero does not wait for the next tick).
//! * [`ZeroDecider`]: wraps a workload's decider when its `minReplicas` is
//!   0 and applies [`gpuscale_policy::zero::ZeroRule`] (the simulator
//!   applies the same rule) with the activators' held requests. It learns the replicas' start-up time
//!   ([`gpuscale_policy::startup`]), counts held requests as demand, scales
//!   from zero at once when requests are held (saying when the first
//!   replica is expected), keeps at least one replica while the workload is
//!   active, and scales to zero after the idle period
//!   ([`gpuscale_policy::idle`]), never while a request is in flight or
//!   held. What it did and why is in the decision (`limits` and
//!   `inputs.scale_to_zero`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use gpuscale_core::{Timestamp, WorkloadRef};
use gpuscale_policy::idle::ScaleToZeroConfig;
use gpuscale_policy::startup::{Phase, StartupModel, StartupSummary};
use gpuscale_policy::zero::{HeldDemand, ZeroRule};
use gpuscale_policy::{Decision, Observation};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::Notify;

use crate::config::{DeciderConfig, WorkloadDef};
use crate::decide::Decider;

/// A report older than this counts for nothing.
pub const REPORT_TTL: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Held {
    held: u32,
    arrivals_total: u64,
    oldest_s: f64,
    /// When the report arrived (its freshness is real time).
    at: std::time::Instant,
}

/// What every activator holds now for one workload.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HeldNow {
    pub held: u32,
    /// Summed over activators (each counts from its own start).
    pub arrivals_total: u64,
    pub oldest_s: f64,
}

#[derive(Debug, Default)]
struct Table {
    held: BTreeMap<WorkloadRef, BTreeMap<String, Held>>,
    startup: BTreeMap<WorkloadRef, WorkloadStartup>,
}

/// A workload's learned start-up and its first replica's expected time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadStartup {
    pub summary: StartupSummary,
    /// When the first replica is expected ready (none ready, one starting).
    pub first_ready_expected: Option<Timestamp>,
}

impl WorkloadStartup {
    /// What a decision says of the learned start-up and when the first
    /// replica is expected ready. A workload that may scale to zero (one
    /// with `scale_to_zero` inputs): scaling from zero now, at now plus the
    /// p50 start-up; with none ready and one starting, at the earliest
    /// starting replica's expected time. Any other decision of the SLO
    /// policy: its learned start-up, no first-replica time (its replicas
    /// never all go). `None` for deciders that learn no start-up.
    pub fn of(d: &Decision) -> Option<Self> {
        let Some(z) = d.scale_to_zero.as_ref() else {
            return d.inputs.slo().and_then(|i| i.startup).map(|summary| Self {
                summary,
                first_ready_expected: None,
            });
        };
        Some(Self {
            summary: z.startup,
            first_ready_expected: if d.current_replicas == 0 && d.desired_replicas > 0 {
                Some(d.at.plus_secs(z.startup.p50_s))
            } else {
                z.first_ready_expected
            },
        })
    }
}

/// The activators' reports and the wake-up; cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct Activators {
    table: Arc<Mutex<Table>>,
    wake: Arc<Notify>,
}

impl Activators {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Critical sections only replace map entries.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what `activator` holds for `workload` now; `wake` (a
    /// request arrived with no ready replica) wakes the decide loop.
    pub fn report(
        &self,
        activator: &str,
        workload: &WorkloadRef,
        held: u32,
        arrivals_total: u64,
        oldest_s: f64,
        wake: bool,
    ) {
        let now = std::time::Instant::now();
        self.lock()
            .held
            .entry(workload.clone())
            .or_default()
            .insert(
                activator.to_string(),
                Held {
                    held,
                    arrivals_total,
                    oldest_s: if oldest_s.is_finite() {
                        oldest_s.max(0.0)
                    } else {
                        0.0
                    },
                    at: now,
                },
            );
        if wake && held > 0 {
            self.wake.notify_one();
        }
    }

    /// Forgets an activator whose stream ended (it holds nothing now).
    pub fn forget(&self, activator: &str) {
        for per in self.lock().held.values_mut() {
            per.remove(activator);
        }
    }

    /// What the activators hold for `workload` now (reports received
    /// within [`REPORT_TTL`] only).
    pub fn held(&self, workload: &WorkloadRef) -> HeldNow {
        let t = self.lock();
        let mut out = HeldNow::default();
        for h in t.held.get(workload).into_iter().flat_map(|m| m.values()) {
            if h.at.elapsed() > REPORT_TTL {
                continue;
            }
            out.held += h.held;
            out.arrivals_total += h.arrivals_total;
            out.oldest_s = out.oldest_s.max(h.oldest_s);
        }
        out
    }

    /// The learned start-up of `workload`, once decided for.
    pub fn startup(&self, workload: &WorkloadRef) -> Option<WorkloadStartup> {
        self.lock().startup.get(workload).copied()
    }

    fn set_startup(&self, workload: &WorkloadRef, s: WorkloadStartup) {
        self.lock().startup.insert(workload.clone(), s);
    }

    /// Resolves at the next wake-up (one pending wake-up is kept).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StartupLabels {
    namespace: String,
    workload: String,
    phase: &'static str,
    quantile: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HeldLabels {
    namespace: String,
    workload: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

/// `gpuscale_scaler_startup_seconds` and `gpuscale_scaler_activator_held_requests`.
#[derive(Debug, Default)]
pub(crate) struct ZeroMetrics {
    startup: Family<StartupLabels, GaugeF>,
    held: Family<HeldLabels, Gauge>,
}

impl ZeroMetrics {
    pub(crate) fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register_with_unit(
            "startup",
            "Learned start-up time of a workload's replicas, by phase (scheduling, engine_start, warm_up, total) and quantile (0.5, 0.9)",
            Unit::Seconds,
            m.startup.clone(),
        );
        r.register(
            "activator_held_requests",
            "Requests the activators hold for a workload with no ready replica",
            m.held.clone(),
        );
        m
    }

    /// The whole start-up's quantiles of a workload that never scales to
    /// zero (its policy learns no per-phase model).
    pub(crate) fn publish_total(&self, workload: &WorkloadRef, s: &StartupSummary) {
        for (v, quantile) in [(s.p50_s, "0.5"), (s.p90_s, "0.9")] {
            self.startup
                .get_or_create(&StartupLabels {
                    namespace: workload.namespace.clone(),
                    workload: workload.name.clone(),
                    phase: Phase::Total.as_str(),
                    quantile,
                })
                .set(v);
        }
    }

    fn publish(&self, workload: &WorkloadRef, model: &StartupModel, held: u32) {
        for phase in Phase::ALL {
            for (q, name) in [(0.5, "0.5"), (0.9, "0.9")] {
                if let Some(v) = model.quantile(phase, q) {
                    self.startup
                        .get_or_create(&StartupLabels {
                            namespace: workload.namespace.clone(),
                            workload: workload.name.clone(),
                            phase: phase.as_str(),
                            quantile: name,
                        })
                        .set(v);
                }
            }
        }
        self.held
            .get_or_create(&HeldLabels {
                namespace: workload.namespace.clone(),
                workload: workload.name.clone(),
            })
            .set(i64::from(held));
    }
}

/// A decider for a workload that may scale to zero; see the module docs.
pub struct ZeroDecider {
    inner: Box<dyn Decider>,
    workload: WorkloadRef,
    activators: Activators,
    metrics: Option<Arc<crate::ScalerMetrics>>,
    rule: ZeroRule,
}

impl std::fmt::Debug for ZeroDecider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroDecider")
            .field("workload", &self.workload)
            .field("config", self.rule.config())
            .field("last_active", &self.rule.last_active())
            .finish_non_exhaustive()
    }
}

impl ZeroDecider {
    /// Wraps `inner`; `prior_s` is the start-up assumed before one is seen.
    pub fn new(
        inner: Box<dyn Decider>,
        workload: WorkloadRef,
        activators: Activators,
        config: ScaleToZeroConfig,
        prior_s: f64,
    ) -> Self {
        Self {
            inner,
            workload,
            activators,
            metrics: None,
            rule: ZeroRule::new(config, prior_s),
        }
    }

    /// Export the learned start-up and the held requests.
    pub fn with_metrics(mut self, metrics: Arc<crate::ScalerMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl Decider for ZeroDecider {
    fn decide(&mut self, now: Timestamp, obs: &Observation) -> Decision {
        let mut d = self.inner.decide(now, obs);
        let h = self.activators.held(&self.workload);
        let held = HeldDemand {
            held: h.held,
            arrivals_total: h.arrivals_total,
            oldest_s: h.oldest_s,
        };
        self.rule.apply(now, obs, held, &mut d);
        if let Some(startup) = WorkloadStartup::of(&d) {
            self.activators.set_startup(&self.workload, startup);
        }
        if let Some(m) = &self.metrics {
            m.zero().publish(&self.workload, self.rule.model(), h.held);
        }
        d
    }
}

/// What wraps the decider of a workload that may scale to zero.
#[derive(Clone)]
pub(crate) struct ZeroHooks {
    pub(crate) activators: Option<Activators>,
    pub(crate) metrics: Arc<crate::ScalerMetrics>,
}

impl ZeroHooks {
    pub(crate) fn wrap(&self, def: &WorkloadDef, inner: Box<dyn Decider>) -> Box<dyn Decider> {
        let (min, config, prior) = match &def.decider {
            DeciderConfig::Policy { config, .. } => (
                config.min_replicas,
                config.scale_to_zero,
                config.cold_start_s,
            ),
            DeciderConfig::Proportional(p) => (p.min_replicas, Default::default(), 60.0),
        };
        match &self.activators {
            Some(a) if min == 0 => Box::new(
                ZeroDecider::new(inner, def.workload.clone(), a.clone(), config, prior)
                    .with_metrics(self.metrics.clone()),
            ),
            _ => inner,
        }
    }
}

/// The next scale-from-zero wake-up; never without activators.
pub(crate) async fn woken(activators: &Option<Activators>) {
    match activators {
        Some(a) => a.woken().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gpuscale_policy::proportional::{ProportionalConfig, ProportionalDecider};
    use gpuscale_policy::{Action, ReplicaObservation, ReplicaState};

    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn t(s: f64) -> Timestamp {
        Timestamp::from_millis(T0).plus_secs(s)
    }

    fn decider(activators: &Activators, fixed_idle: Option<f64>) -> ZeroDecider {
        let inner = ProportionalDecider::new(ProportionalConfig {
            capacity_tokens_per_second: 1_000.0,
            target_utilization: 0.8,
            min_replicas: 0,
            max_replicas: 4,
            scale_down_stabilization: Duration::ZERO,
            tolerance: 0.1,
            stale_after: Duration::from_secs(60),
            advisory: false,
        });
        let config = gpuscale_policy::idle::ScaleToZeroSpec {
            idle_seconds: fixed_idle,
            ..Default::default()
        }
        .validate()
        .unwrap();
        ZeroDecider::new(
            Box::new(inner),
            WorkloadRef::new("ns", "chat"),
            activators.clone(),
            config,
            30.0,
        )
    }

    fn replica(id: &str, state: ReplicaState, created: f64) -> ReplicaObservation {
        ReplicaObservation {
            created_at: Some(t(created)),
            ..ReplicaObservation::new(id, state)
        }
    }

    fn obs(now: f64, replicas: Vec<ReplicaObservation>, running: Option<f64>) -> Observation {
        let mut o = Observation::empty();
        o.replicas.current = replicas.len() as u32;
        o.replicas.ready = replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Ready)
            .count() as u32;
        if running.is_some() {
            o.telemetry_at = Some(t(now));
            o.load.requests_running = running;
            o.load.requests_waiting = Some(0.0);
            o.load.generation_tokens_per_second = Some(0.0);
            o.load.arrival_rate_rps = Some(0.0);
        }
        o.replica_samples = replicas;
        o
    }

    #[tokio::test]
    async fn held_requests_wake_the_loop_and_scale_from_zero_saying_when_the_first_replica_is_expected()
     {
        let clock = crate::Clock::starting_at(t(0.0));
        let activators = Activators::default();
        let mut d = decider(&activators, None);
        let w = WorkloadRef::new("ns", "chat");
        let at_zero = d.decide(t(0.0), &obs(0.0, vec![], None));
        assert_eq!(at_zero.desired_replicas, 0, "{at_zero:?}");
        activators.report("act-1", &w, 3, 3, 0.2, true);
        tokio::time::timeout(Duration::from_secs(1), activators.woken())
            .await
            .expect("a wake-up");
        assert_eq!(activators.held(&w).held, 3);
        let up = d.decide(clock.now(), &obs(0.0, vec![], None));
        assert_eq!((up.desired_replicas, up.action), (1, Action::ScaleUp));
        let why = up.limits_applied().join("\n");
        assert!(why.contains("scale from zero: 3 requests held"), "{why}");
        assert!(why.contains("p50 start-up 30.0 s"), "{why}");
        let s = activators.startup(&w).unwrap();
        assert!(s.first_ready_expected.is_some());
        // The activator's stream ended: it holds nothing.
        activators.forget("act-1");
        assert_eq!(activators.held(&w).held, 0);
    }

    #[tokio::test]
    async fn in_flight_replicas_are_logged_at_their_learned_expected_ready_times() {
        let activators = Activators::default();
        let mut d = decider(&activators, None);
        // Three start-ups of 40 s observed (created at c, ready at c + 40).
        for (i, c) in [0.0, 100.0, 200.0].into_iter().enumerate() {
            let id = format!("r{i}");
            d.decide(
                t(c + 1.0),
                &obs(c + 1.0, vec![replica(&id, ReplicaState::Loading, c)], None),
            );
            d.decide(
                t(c + 40.0),
                &obs(c + 40.0, vec![replica(&id, ReplicaState::Ready, c)], None),
            );
        }
        // A replica created at 300 s, seen loading at 310 s: expected at 340 s.
        let dec = d.decide(
            t(310.0),
            &obs(
                310.0,
                vec![replica("r9", ReplicaState::Loading, 300.0)],
                None,
            ),
        );
        let why = dec.limits_applied().join("\n");
        assert!(
            why.contains(&format!(
                "r9 (Loading, 10 s old) expected ready at {}",
                t(340.0)
            )),
            "{why}"
        );
        let z = serde_json::to_value(&dec.scale_to_zero).expect("serialises");
        assert_eq!(z["startup"]["samples"], 3);
        assert_eq!(z["startup"]["p50_s"], 40.0);
        assert_eq!(
            z["starting"][0]["expected_ready_at"],
            serde_json::json!(t(340.0))
        );
    }

    #[tokio::test]
    async fn scales_to_zero_after_the_idle_period_never_while_busy_or_held() {
        let clock = crate::Clock::starting_at(t(0.0));
        let activators = Activators::default();
        let mut d = decider(&activators, Some(60.0));
        let w = WorkloadRef::new("ns", "chat");
        let ready = || vec![replica("r0", ReplicaState::Ready, -500.0)];
        // Busy at 0 s: one request running.
        let busy = d.decide(t(0.0), &obs(0.0, ready(), Some(1.0)));
        assert_eq!(busy.desired_replicas, 1, "{busy:?}");
        // Idle 59 s later: still one (the period is 60 s).
        let early = d.decide(t(59.0), &obs(59.0, ready(), Some(0.0)));
        assert_eq!(early.desired_replicas, 1, "{:?}", early.limits);
        // Without telemetry, never to zero.
        let blind = d.decide(t(120.0), &obs(120.0, ready(), None));
        assert_eq!(blind.desired_replicas, 1);
        let gone = d.decide(t(120.0), &obs(120.0, ready(), Some(0.0)));
        assert_eq!((gone.desired_replicas, gone.action), (0, Action::ScaleDown));
        assert_eq!(gone.victims, vec!["r0".to_string()]);
        assert!(
            gone.limits_applied()
                .join("\n")
                .contains("scale to zero: idle")
        );
        // Held at the activator (a report just now): not idle, though
        // nothing ran for 100 s.
        let mut d = decider(&activators, Some(60.0));
        d.decide(t(-100.0), &obs(-100.0, ready(), Some(0.0)));
        activators.report("act-1", &w, 1, 1, 0.0, false);
        let now = clock.now();
        let kept = d.decide(now, &obs(now.secs_since(t(0.0)), ready(), Some(0.0)));
        assert_eq!(kept.desired_replicas, 1, "{:?}", kept.limits);
    }

    /// A workload that never scales to zero still has its learned start-up
    /// in the decision and the metrics (the whole start-up's quantiles),
    /// and in [`WorkloadStartup::of`] without a first replica to expect.
    #[test]
    fn the_slo_policys_start_up_is_exported_for_every_workload() {
        use gpuscale_policy::{Policy, WorkloadSpec};
        let mut spec = WorkloadSpec::new("chat", 20, "h200-llama3-8b-bf16");
        spec.cold_start_seconds = 75.0;
        let config = spec.validate().unwrap();
        let model = config.perf_model(None).unwrap();
        let mut policy = Policy::new(config, model);
        let now = t(0.0);
        let mut o = Observation::empty();
        o.telemetry_at = Some(now);
        o.replicas.current = 2;
        o.replicas.ready = 2;
        o.load.arrival_rate_rps = Some(10.0);
        let d = policy.decide(now, &o);
        let st = WorkloadStartup::of(&d).expect("the SLO policy learns a start-up");
        assert_eq!((st.summary.samples, st.summary.p90_s), (0, 75.0));
        assert_eq!(st.first_ready_expected, None);
        let metrics = crate::ScalerMetrics::new();
        metrics.decided(&WorkloadRef::new("ns", "chat"), &d, &o, 0.001);
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("gpuscale_scaler_startup_seconds{")
                    && l.contains(r#"workload="chat""#)
                    && l.contains(r#"phase="total""#)
                    && l.contains(r#"quantile="0.9""#)
            })
            .unwrap_or_else(|| panic!("no total start-up p90 in:\n{text}"));
        assert!(line.ends_with(" 75.0"), "{line}");
    }
}
