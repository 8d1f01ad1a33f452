//! The decide loop: every tick, per workload, observe → decide → act.
//!
//! The loop reads the published [`StateView`] (an `Arc`, no lock), builds
//! each workload's [`Observation`] ([`crate::observe::assemble`]), asks the
//! workload's [`Decider`], sends the decision to the state task (so the view
//! and the public APIs carry it), and — unless the decision is advisory —
//! publishes batch limits to the replicas' agents and hands replica changes
//! to the [`Actuator`] in a task of their own (one at a time per workload;
//! a slow actuator delays nothing else).
//!
//! Each tick first asks the actuator for the target
//! ([`Actuator::observe_target`]): the count to decide from and, when it
//! knows them (Kubernetes), the target's replicas and their states. A
//! workload whose target cannot be read this tick is not decided for.
//!
//! The workloads come from the registry ([`crate::ScalerHandle::register_workload`]):
//! the configured ones at start, then whatever is registered or removed at
//! run time (the Kubernetes controller registers one per
//! InferenceAutoscaler). A re-registered workload gets a new decider. While
//! the scaler is not active (a standby replica, see
//! [`crate::Scaler::with_active`]) nothing is decided and in-flight
//! actuations are stopped.
//!
//! **The decider seam.** [`Decider`] is the one interface between the loop
//! and the decision logic; [`build_decider`] is the one place that picks an
//! implementation: the full policy ([`gpuscale_policy::Policy`]) when the
//! workload has a policy spec, or [`ProportionalDecider`] (replicas
//! proportional to generated tokens per second against a per-replica
//! capacity) when it has a `proportional` section.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::{PodRef, Timestamp, WorkloadRef};
use gpuscale_policy::{
    Action, Decision, Observation, Policy, Recommendation, ReplicaState, Source,
};
use gpuscale_proto::Directive;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::actuate::{Actuator, TargetObservation};
use crate::clock::Clock;
use crate::config::{DeciderConfig, EngineSelector, ProportionalConfig, WorkloadDef};
use crate::metrics::ScalerMetrics;
use crate::observe;
use crate::state::Command;
use crate::stopped;
use crate::view::{ActuationRecord, StateView};

/// Decides one workload's replicas from an observation. Implementations keep
/// their own history and must be pure in `now`: the same history, `now` and
/// observation give the same decision.
pub trait Decider: Send {
    fn decide(&mut self, now: Timestamp, observation: &Observation) -> Decision;
}

impl Decider for Policy {
    fn decide(&mut self, now: Timestamp, observation: &Observation) -> Decision {
        Policy::decide(self, now, observation)
    }
}

/// The decider for a workload's configuration.
pub fn build_decider(config: &DeciderConfig) -> Box<dyn Decider> {
    match config {
        DeciderConfig::Policy { config, model } => {
            Box::new(Policy::new((**config).clone(), (**model).clone()))
        }
        DeciderConfig::Proportional(p) => Box::new(ProportionalDecider::new(p.clone())),
    }
}

/// Replicas proportional to demand in generated tokens per second:
/// `ceil(demand / (capacity · target utilization))`, within bounds, with a
/// tolerance band and HPA-style scale-down stabilization (scale in only to
/// the highest recommendation of the stabilization window). Demand is the
/// larger of the measured generation rate and the offered load (arrival rate
/// × mean output tokens), so a saturated fleet, whose generation rate is
/// capped, still sees its queue. Missing or stale telemetry holds the count.
#[derive(Debug, Clone)]
pub struct ProportionalDecider {
    config: ProportionalConfig,
    history: VecDeque<(Timestamp, u32)>,
}

impl ProportionalDecider {
    pub fn new(config: ProportionalConfig) -> Self {
        Self {
            config,
            history: VecDeque::new(),
        }
    }
}

impl Decider for ProportionalDecider {
    fn decide(&mut self, now: Timestamp, obs: &Observation) -> Decision {
        let c = &self.config;
        let current = obs.replicas.current;
        let bound = |n: u32| n.clamp(c.min_replicas, c.max_replicas);
        let mut limits = Vec::new();
        let fresh = obs
            .telemetry_at
            .is_some_and(|t| now.secs_since(t) <= c.stale_after.as_secs_f64());
        let offered = match (obs.load.arrival_rate_rps, obs.load.mean_output_tokens) {
            (Some(a), Some(o)) => Some(a * o),
            _ => None,
        };
        let demand = match (obs.load.generation_tokens_per_second, offered) {
            (Some(g), Some(o)) => Some(g.max(o)),
            (g, o) => g.or(o),
        };
        let per_replica = c.capacity_tokens_per_second * c.target_utilization;
        let (recommendation, winner) = match demand {
            Some(demand) if fresh => {
                let raw = (demand / per_replica)
                    .ceil()
                    .clamp(0.0, f64::from(u32::MAX)) as u32;
                (
                    Recommendation {
                        source: Source::Reactive,
                        replicas: Some(raw),
                        reason: format!(
                            "{demand:.0} tokens/s over {per_replica:.0} tokens/s per replica ({:.0} × {:.0}%)",
                            c.capacity_tokens_per_second,
                            c.target_utilization * 100.0
                        ),
                    },
                    Source::Reactive,
                )
            }
            _ => (
                Recommendation {
                    source: Source::Hold,
                    replicas: Some(current),
                    reason: if fresh {
                        "no token rate from the engines yet".into()
                    } else {
                        match obs.telemetry_at {
                            None => "no telemetry".into(),
                            Some(t) => format!("telemetry is {:.0} s old", now.secs_since(t)),
                        }
                    },
                },
                Source::Hold,
            ),
        };
        let mut proposed = recommendation.replicas.unwrap_or(current);
        if winner == Source::Reactive {
            if current > 0 && proposed != current {
                let ratio = f64::from(proposed) / f64::from(current);
                if (ratio - 1.0).abs() <= c.tolerance {
                    limits.push(format!(
                        "tolerance: {proposed} is within {:.0}% of {current}",
                        c.tolerance * 100.0
                    ));
                    proposed = current;
                }
            }
            self.history.push_back((now, proposed));
            let window_ms =
                i64::try_from(c.scale_down_stabilization.as_millis()).unwrap_or(i64::MAX);
            while self
                .history
                .front()
                .is_some_and(|(t, _)| t.as_millis() < now.as_millis().saturating_sub(window_ms))
            {
                self.history.pop_front();
            }
            if proposed < current {
                let highest = self
                    .history
                    .iter()
                    .map(|(_, n)| *n)
                    .max()
                    .unwrap_or(proposed);
                let stabilized = highest.min(current).max(proposed);
                if stabilized != proposed {
                    limits.push(format!(
                        "scale-down stabilization: highest recommendation in {:?} is {stabilized}",
                        c.scale_down_stabilization
                    ));
                    proposed = stabilized;
                }
            }
        } else {
            // Holding never scales in.
            proposed = proposed.max(current);
        }
        let desired = bound(proposed);
        if desired != proposed {
            limits.push(format!(
                "bounds: {proposed} clamped to {}..={}",
                c.min_replicas, c.max_replicas
            ));
        }
        let action = match desired.cmp(&current) {
            std::cmp::Ordering::Greater => Action::ScaleUp,
            std::cmp::Ordering::Less => Action::ScaleDown,
            std::cmp::Ordering::Equal => Action::Hold,
        };
        let victims = if action == Action::ScaleDown {
            victims(obs, (current - desired) as usize)
        } else {
            Vec::new()
        };
        Decision {
            at: now,
            current_replicas: current,
            desired_replicas: desired,
            batch_limit: None,
            action,
            winner,
            recommendations: vec![recommendation],
            limits_applied: limits,
            victims,
            model_confidence: 0.0,
            advisory: c.advisory,
            slo: gpuscale_core::SloAssessment::NONE,
            inputs: serde_json::json!({
                "generation_tokens_per_second": obs.load.generation_tokens_per_second,
                "arrival_rate_rps": obs.load.arrival_rate_rps,
                "mean_output_tokens": obs.load.mean_output_tokens,
                "demand_tokens_per_second": demand,
                "capacity_tokens_per_second": c.capacity_tokens_per_second,
                "target_utilization": c.target_utilization,
                "ready": obs.replicas.ready,
                "telemetry_age_s": obs.telemetry_at.map(|t| now.secs_since(t)),
            }),
        }
    }
}

/// Replicas to remove, best first: loading before ready (no work lost),
/// then least work in flight; never protected ones.
fn victims(obs: &Observation, n: usize) -> Vec<String> {
    let mut candidates: Vec<_> = obs
        .replica_samples
        .iter()
        .filter(|r| !r.protected && matches!(r.state, ReplicaState::Loading | ReplicaState::Ready))
        .collect();
    candidates.sort_by(|a, b| {
        let work = |r: &gpuscale_policy::ReplicaObservation| {
            r.requests_running.unwrap_or(0.0) + r.requests_waiting.unwrap_or(0.0)
        };
        let rank =
            |r: &gpuscale_policy::ReplicaObservation| u8::from(r.state == ReplicaState::Ready);
        rank(a)
            .cmp(&rank(b))
            .then(work(a).total_cmp(&work(b)))
            .then(a.id.cmp(&b.id))
    });
    candidates
        .into_iter()
        .take(n)
        .map(|r| r.id.clone())
        .collect()
}

/// The workloads the decide loop decides for, by reference.
pub(crate) type WorkloadRegistry = BTreeMap<WorkloadRef, Arc<WorkloadDef>>;

struct WorkloadRuntime {
    workload: WorkloadRef,
    def: Arc<WorkloadDef>,
    selector: EngineSelector,
    /// The target as the actuator last described it.
    target: TargetObservation,
    decider: Box<dyn Decider>,
    actuating: Option<JoinHandle<()>>,
    last_summary: Option<(u32, Action)>,
    limits_sent: BTreeMap<PodRef, u32>,
}

impl WorkloadRuntime {
    fn new(def: Arc<WorkloadDef>) -> Self {
        Self {
            workload: def.workload.clone(),
            selector: def.selector.clone(),
            decider: build_decider(&def.decider),
            def,
            target: TargetObservation::default(),
            actuating: None,
            last_summary: None,
            limits_sent: BTreeMap::new(),
        }
    }
}

pub(crate) struct DecideLoop {
    workloads: Vec<WorkloadRuntime>,
    registry: watch::Receiver<Arc<WorkloadRegistry>>,
    active: Option<watch::Receiver<bool>>,
    view: watch::Receiver<Arc<StateView>>,
    commands: mpsc::Sender<Command>,
    actuator: Arc<dyn Actuator>,
    clock: Clock,
    tick: Duration,
    metrics: Arc<ScalerMetrics>,
    shutdown: watch::Receiver<bool>,
}

/// Longest wait for the actuator's current replica count.
const CURRENT_REPLICAS_TIMEOUT: Duration = Duration::from_secs(2);

impl DecideLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        mut registry: watch::Receiver<Arc<WorkloadRegistry>>,
        active: Option<watch::Receiver<bool>>,
        view: watch::Receiver<Arc<StateView>>,
        commands: mpsc::Sender<Command>,
        actuator: Arc<dyn Actuator>,
        clock: Clock,
        tick: Duration,
        metrics: Arc<ScalerMetrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let workloads = registry
            .borrow_and_update()
            .values()
            .map(|def| WorkloadRuntime::new(def.clone()))
            .collect();
        Self {
            workloads,
            registry,
            active,
            view,
            commands,
            actuator,
            clock,
            tick,
            metrics,
            shutdown,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => break,
                _ = ticker.tick() => self.tick_once().await,
            }
        }
        for w in &mut self.workloads {
            if let Some(task) = w.actuating.take() {
                task.abort();
            }
        }
    }

    /// Applies registry changes: new workloads get a runtime, removed ones
    /// lose theirs (and their in-flight actuation), re-registered ones get a
    /// new decider and keep their in-flight actuation.
    async fn sync_workloads(&mut self) {
        if !self.registry.has_changed().unwrap_or(false) {
            return;
        }
        let registry = self.registry.borrow_and_update().clone();
        let mut old: BTreeMap<WorkloadRef, WorkloadRuntime> = std::mem::take(&mut self.workloads)
            .into_iter()
            .map(|w| (w.workload.clone(), w))
            .collect();
        for (workload, def) in registry.iter() {
            let runtime = match old.remove(workload) {
                Some(w) if Arc::ptr_eq(&w.def, def) => w,
                previous => {
                    let mut fresh = WorkloadRuntime::new(def.clone());
                    if let Some(p) = previous {
                        fresh.actuating = p.actuating;
                        fresh.limits_sent = p.limits_sent;
                    }
                    let _ = self
                        .commands
                        .send(Command::WorkloadRegistered {
                            workload: workload.clone(),
                            labels: def.labels.clone(),
                        })
                        .await;
                    fresh
                }
            };
            self.workloads.push(runtime);
        }
        for (workload, mut gone) in old {
            if let Some(task) = gone.actuating.take() {
                task.abort();
            }
            let _ = self
                .commands
                .send(Command::WorkloadUnregistered { workload })
                .await;
        }
    }

    async fn tick_once(&mut self) {
        if let Some(active) = &self.active
            && !*active.borrow()
        {
            for w in &mut self.workloads {
                if let Some(task) = w.actuating.take() {
                    task.abort();
                }
                w.last_summary = None;
            }
            return;
        }
        self.sync_workloads().await;
        let view = self.view.borrow().clone();
        for i in 0..self.workloads.len() {
            let workload = self.workloads[i].workload.clone();
            let target = match tokio::time::timeout(
                CURRENT_REPLICAS_TIMEOUT,
                self.actuator.observe_target(&workload),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%workload, error = %e, "actuator could not read the target; not deciding this tick");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(%workload, "actuator did not describe the target in time; not deciding this tick");
                    continue;
                }
            };
            let now = self.clock.now();
            let started = std::time::Instant::now();
            let w = &mut self.workloads[i];
            w.target = target;
            let observation = observe::assemble_target(&view, &w.selector, &w.target);
            let decision = w.decider.decide(now, &observation);
            self.metrics.decided(
                &workload,
                &decision,
                &observation,
                started.elapsed().as_secs_f64(),
            );
            let summary = (decision.desired_replicas, decision.action);
            if w.last_summary != Some(summary) {
                tracing::info!(
                    %workload,
                    current = decision.current_replicas,
                    desired = decision.desired_replicas,
                    ready = observation.replicas.ready,
                    arrival_rps = observation.load.arrival_rate_rps,
                    advisory = decision.advisory,
                    "{}",
                    decision.summary()
                );
                w.last_summary = Some(summary);
            }
            if !decision.advisory {
                self.publish_batch_limits(i, &view, &decision).await;
                self.actuate(i, &view, &observation, &decision);
            }
            let _ = self
                .commands
                .send(Command::Decision {
                    workload,
                    observation: Box::new(observation),
                    decision: Box::new(decision),
                })
                .await;
        }
    }

    async fn publish_batch_limits(&mut self, i: usize, view: &StateView, decision: &Decision) {
        let Some(limit) = decision.batch_limit else {
            return;
        };
        let w = &self.workloads[i];
        let pods = observe::member_pods(view, &w.selector, &w.target);
        for pod in pods {
            if self.workloads[i].limits_sent.get(&pod) == Some(&limit) {
                continue;
            }
            self.workloads[i].limits_sent.insert(pod.clone(), limit);
            let _ = self
                .commands
                .send(Command::Directive {
                    pod: pod.clone(),
                    directive: Directive::SetBatchLimit {
                        pod,
                        batch_limit: limit,
                    },
                    reply: None,
                })
                .await;
        }
    }

    fn actuate(&mut self, i: usize, view: &StateView, obs: &Observation, decision: &Decision) {
        let w = &mut self.workloads[i];
        if decision.action == Action::Hold || decision.desired_replicas == obs.replicas.current {
            return;
        }
        if w.actuating.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let pods: BTreeMap<String, PodRef> = observe::member_pods(view, &w.selector, &w.target)
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let to_drain: Vec<PodRef> = if decision.action == Action::ScaleDown {
            decision
                .victims
                .iter()
                .take((decision.current_replicas - decision.desired_replicas) as usize)
                .filter_map(|v| pods.get(v).cloned())
                .collect()
        } else {
            Vec::new()
        };
        let to_undrain: Vec<PodRef> = if decision.action == Action::ScaleUp {
            obs.replica_samples
                .iter()
                .filter(|r| r.state == ReplicaState::Draining)
                .filter_map(|r| pods.get(&r.id).cloned())
                .take((decision.desired_replicas - decision.current_replicas) as usize)
                .collect()
        } else {
            Vec::new()
        };
        let actuator = self.actuator.clone();
        let commands = self.commands.clone();
        let metrics = self.metrics.clone();
        let clock = self.clock;
        let workload = w.workload.clone();
        let decision = decision.clone();
        w.actuating = Some(tokio::spawn(async move {
            let reason = decision.summary();
            for pod in &to_drain {
                let _ = commands
                    .send(Command::Directive {
                        pod: pod.clone(),
                        directive: Directive::DrainPod {
                            pod: pod.clone(),
                            reason: reason.clone(),
                        },
                        reply: None,
                    })
                    .await;
            }
            for pod in &to_undrain {
                let _ = commands
                    .send(Command::Directive {
                        pod: pod.clone(),
                        directive: Directive::UndrainPod { pod: pod.clone() },
                        reply: None,
                    })
                    .await;
            }
            let result = async {
                for pod in &to_drain {
                    actuator.drain_pod(&workload, pod, &reason).await?;
                }
                for pod in &to_undrain {
                    actuator.undrain_pod(&workload, pod).await?;
                }
                actuator
                    .set_replicas(&workload, decision.desired_replicas, &decision)
                    .await
            }
            .await;
            metrics.actuated(&workload, result.is_ok());
            if let Err(e) = &result {
                tracing::warn!(%workload, desired = decision.desired_replicas, error = %e, "actuation failed; the next decision retries");
            }
            let _ = commands
                .send(Command::Actuated {
                    workload,
                    record: ActuationRecord {
                        at: clock.now(),
                        replicas: decision.desired_replicas,
                        result: result.map_err(|e| e.to_string()),
                    },
                })
                .await;
        }));
    }
}

#[cfg(test)]
mod tests {
    use gpuscale_policy::{LoadObservation, ReplicaCounts, ReplicaObservation};

    use super::*;

    fn config() -> ProportionalConfig {
        ProportionalConfig {
            capacity_tokens_per_second: 1_000.0,
            target_utilization: 0.8,
            min_replicas: 1,
            max_replicas: 10,
            scale_down_stabilization: Duration::from_secs(60),
            tolerance: 0.1,
            stale_after: Duration::from_secs(30),
            advisory: false,
        }
    }

    fn obs(at: i64, current: u32, tokens: Option<f64>) -> Observation {
        Observation {
            telemetry_at: Some(Timestamp::from_secs_f64(at as f64)),
            replicas: ReplicaCounts {
                current,
                ready: current,
                ..ReplicaCounts::default()
            },
            replica_samples: (0..current)
                .map(|i| ReplicaObservation {
                    id: format!("pod-{i}"),
                    state: ReplicaState::Ready,
                    protected: i == 0,
                    created_at: None,
                    requests_running: Some(20.0 - f64::from(i)),
                    requests_waiting: Some(0.0),
                    kv_cache_usage_ratio: None,
                    mean_context_tokens: None,
                    itl_mean_seconds: None,
                    generation_tokens_per_second: None,
                    batch_limit: None,
                })
                .collect(),
            load: LoadObservation {
                generation_tokens_per_second: tokens,
                ..LoadObservation::default()
            },
            latency: Default::default(),
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_secs_f64(s as f64)
    }

    #[test]
    fn scales_up_in_proportion_to_tokens_per_second() {
        let mut d = ProportionalDecider::new(config());
        let decision = d.decide(t(10), &obs(10, 2, Some(4_000.0)));
        // 4000 / (1000 × 0.8) = 5.
        assert_eq!(decision.desired_replicas, 5);
        assert_eq!(decision.action, Action::ScaleUp);
        assert!(
            decision.summary().contains("reactive"),
            "{}",
            decision.summary()
        );
    }

    #[test]
    fn scale_in_is_held_inside_stabilization_window() {
        let mut d = ProportionalDecider::new(config());
        assert_eq!(
            d.decide(t(0), &obs(0, 5, Some(4_000.0))).desired_replicas,
            5
        );
        let low = d.decide(t(30), &obs(30, 5, Some(800.0)));
        assert_eq!(low.desired_replicas, 5, "{:?}", low.limits_applied);
        assert_eq!(low.action, Action::Hold);
        // 61 s later the high recommendation left the window.
        let later = d.decide(t(91), &obs(91, 5, Some(800.0)));
        assert_eq!(later.desired_replicas, 1);
        // Victims: least work first, never the protected pod-0.
        assert_eq!(later.victims, vec!["pod-4", "pod-3", "pod-2", "pod-1"]);
    }

    #[test]
    fn stale_or_missing_telemetry_never_scales_in() {
        let mut d = ProportionalDecider::new(config());
        let missing = d.decide(t(10), &obs(10, 4, None));
        assert_eq!(
            (missing.desired_replicas, missing.winner),
            (4, Source::Hold)
        );
        let stale = d.decide(t(100), &obs(10, 4, Some(0.0)));
        assert_eq!(stale.desired_replicas, 4);
        assert!(stale.summary().contains("90 s old"), "{}", stale.summary());
    }

    #[test]
    fn small_changes_stay_inside_the_tolerance_and_bounds_apply() {
        let mut d = ProportionalDecider::new(ProportionalConfig {
            max_replicas: 20,
            ..config()
        });
        // 12.5 → 13 replicas' worth against 12 current: within 10%.
        let within = d.decide(t(0), &obs(0, 12, Some(10_000.0)));
        assert_eq!(within.desired_replicas, 12);
        assert!(
            within
                .limits_applied
                .iter()
                .any(|l| l.starts_with("tolerance"))
        );
        let huge = d.decide(t(1), &obs(1, 12, Some(1e9)));
        assert_eq!(huge.desired_replicas, 20);
        assert!(huge.limits_applied.iter().any(|l| l.starts_with("bounds")));
    }
}
