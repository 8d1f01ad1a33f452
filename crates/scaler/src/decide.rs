//! The decide loop: every tick, per workload, observe → decide → act.
//!
//! The loop reads the published [`StateView`] (an `Arc`, no lock), builds
//! each workload's [`Observation`] ([`crate::observe::assemble`]), asks the
//! workload's [`Decider`], sends the decision to the state task (so the view
//! and the public APIs carry it), and — unless the decision is advisory —
//! publishes batch limits to the replicas' agents (through the state owner,
//! which sends a directive only when it changes) and hands a [`Plan`] to
//! [`Actuator::apply`] in a task of its own (one at a time per workload; a
//! slow actuator delays nothing else). Drains are the actuator's: the loop
//! only names the victims.
//!
//! Each tick first asks the actuator for every workload's target at once
//! ([`Actuator::observe`], all within one deadline of
//! [`OBSERVE_TIMEOUT`]): the count to decide from and, when it knows them
//! (Kubernetes), the target's replicas and their states. A workload whose
//! target cannot be read in time this tick is not decided for.
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
//! capacity) when it has a `proportional` section. Both live in the policy
//! crate: no decision logic is written here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::{NodeName, PodRef, Timestamp, WorkloadRef};
use gpuscale_policy::proportional::ProportionalDecider;
use gpuscale_policy::{Action, Decision, Observation, Policy, ReplicaState};
use gpuscale_proto::Directive;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::actuate::{Actuator, Plan, TargetObservation};
use crate::complete::{self, Freshness, Roster};
use crate::config::{DeciderConfig, EngineSelector, WorkloadDef};
use crate::metrics::ScalerMetrics;
use crate::observe;
use crate::state::Command;
use crate::stopped;
use crate::view::{ActuationRecord, StateView};
use gpuscale_rt::Clock;

/// Decides one workload's replicas from an observation. Implementations keep
/// their own history and must be pure in `now`: the same history, `now` and
/// observation give the same decision.
pub trait Decider: Send {
    fn decide(&mut self, now: Timestamp, observation: &Observation) -> Decision;

    /// Before the first decision: start the history from a previous
    /// scaler's last decision, `desired_replicas` at `at` (see
    /// [`crate::seed`]). By default nothing is kept.
    fn start_from(&mut self, _at: Timestamp, _desired_replicas: u32) {}
}

impl Decider for Policy {
    fn decide(&mut self, now: Timestamp, observation: &Observation) -> Decision {
        Policy::decide(self, now, observation)
    }

    fn start_from(&mut self, at: Timestamp, desired_replicas: u32) {
        Policy::start_from(self, at, desired_replicas);
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

impl Decider for ProportionalDecider {
    fn decide(&mut self, now: Timestamp, observation: &Observation) -> Decision {
        ProportionalDecider::decide(self, now, observation)
    }

    fn start_from(&mut self, at: Timestamp, desired_replicas: u32) {
        ProportionalDecider::start_from(self, at, desired_replicas);
    }
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
    /// The warm-up after start (or after gaining leadership) is over.
    warm: bool,
    /// The replicas it has heard from, with their last load.
    roster: Roster,
}

impl WorkloadRuntime {
    fn new(def: Arc<WorkloadDef>, zero: &crate::zero::ZeroHooks, now: Timestamp) -> Self {
        let mut decider = build_decider(&def.decider);
        crate::seed::start_from(decider.as_mut(), &def.decider, def.last_decision, now);
        Self {
            workload: def.workload.clone(),
            selector: def.selector.clone(),
            decider: zero.wrap(&def, decider),
            def,
            target: TargetObservation::default(),
            actuating: None,
            last_summary: None,
            warm: false,
            roster: Roster::default(),
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
    /// The longest warm-up, and when the current one began (`None`: not
    /// begun, or a standby).
    warmup: Duration,
    warm_since: Option<tokio::time::Instant>,
    /// When a replica counts as silent, and when a silent one is forgotten.
    freshness: Freshness,
    /// Share of expected replicas that must report for a scale-in.
    min_reporting_share: f64,
    /// Standalone: the nodes whose agents are expected (empty: unknown).
    expected_nodes: BTreeSet<NodeName>,
    zero: crate::zero::ZeroHooks,
}

/// What a workload in warm-up says instead of a decision; `waiting_for`:
/// the expected nodes (standalone) that have not reported yet, of `of`.
fn warming_message(
    observation: &Observation,
    target: &TargetObservation,
    waiting_for: &[&NodeName],
    of: usize,
    left: Duration,
) -> String {
    let heard = observation.replicas.ready + observation.replicas.loading;
    let mut expected = match &target.replicas {
        Some(r) => format!("{heard} of {} replicas reported", r.len()),
        None => format!("{heard} replicas reported so far"),
    };
    if target.replicas.is_none() && of > 0 {
        expected.push_str(&format!(
            ", {} of {of} expected nodes",
            of - waiting_for.len()
        ));
        if !waiting_for.is_empty() {
            let names: Vec<String> = waiting_for.iter().take(5).map(|n| n.to_string()).collect();
            expected.push_str(&format!(
                " (waiting for {}{})",
                names.join(", "),
                if waiting_for.len() > 5 { ", …" } else { "" }
            ));
        }
    }
    format!(
        "warming up after start: {expected}; deciding when all have reported, at most {:.0} s from now",
        left.as_secs_f64().ceil()
    )
}

/// Longest wait for the actuator's observation of all targets at a tick.
pub const OBSERVE_TIMEOUT: Duration = Duration::from_secs(2);

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
        let zero = crate::zero::ZeroHooks {
            activators: None,
            metrics: metrics.clone(),
        };
        let workloads = registry
            .borrow_and_update()
            .values()
            .map(|def| WorkloadRuntime::new(def.clone(), &zero, clock.now()))
            .collect();
        Self {
            zero,
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
            warmup: Duration::ZERO,
            warm_since: None,
            freshness: Freshness {
                // Two ticks of the timer, on the clock that stamps reports
                // (a sped-up simulation's ticks cover more of its time).
                silent_after: clock.span(2 * tick),
                horizon: Duration::from_secs(300),
            },
            min_reporting_share: complete::DEFAULT_MIN_REPORTING_SHARE,
            expected_nodes: BTreeSet::new(),
        }
    }

    /// Standalone: the nodes whose agents are expected. The warm-up ends as
    /// soon as each of them is connected and has reported, and every engine
    /// of the workload has a rate, instead of waiting the whole warm-up.
    pub(crate) fn with_expected_nodes(mut self, nodes: BTreeSet<NodeName>) -> Self {
        self.expected_nodes = nodes;
        self
    }

    /// The share of a workload's expected replicas that must report for a
    /// decision to scale in (see [`crate::complete::hold`]).
    pub(crate) fn with_min_reporting_share(mut self, share: f64) -> Self {
        self.min_reporting_share = share;
        self
    }

    /// After start and after gaining leadership, nothing is decided,
    /// published or actuated for a workload until every replica it expects
    /// has reported (known in Kubernetes mode: the target's ready pods;
    /// standalone, only when the expected nodes are configured, see
    /// [`DecideLoop::with_expected_nodes`]) or `warmup` has passed.
    pub(crate) fn with_warmup(mut self, warmup: Duration) -> Self {
        self.warmup = warmup;
        self
    }

    /// Standalone, a replica silent for `horizon` is no longer expected
    /// (see [`crate::complete`]).
    pub(crate) fn with_replica_horizon(mut self, horizon: Duration) -> Self {
        self.freshness.horizon = horizon;
        self
    }

    /// Workloads with `minReplicas: 0` scale to zero and back with the
    /// activators' reports; a wake-up decides at once.
    pub(crate) fn with_activators(mut self, activators: crate::zero::Activators) -> Self {
        self.zero.activators = Some(activators);
        let registry = self.registry.borrow().clone();
        self.workloads = registry
            .values()
            .map(|def| WorkloadRuntime::new(def.clone(), &self.zero, self.clock.now()))
            .collect();
        self
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
                _ = crate::zero::woken(&self.zero.activators) => self.tick_once().await,
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
                    let mut fresh = WorkloadRuntime::new(def.clone(), &self.zero, self.clock.now());
                    if let Some(p) = previous {
                        fresh.actuating = p.actuating;
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
                w.warm = false;
            }
            self.warm_since = None;
            return;
        }
        let warm_since = *self
            .warm_since
            .get_or_insert_with(tokio::time::Instant::now);
        self.sync_workloads().await;
        let workloads: Vec<WorkloadRef> =
            self.workloads.iter().map(|w| w.workload.clone()).collect();
        let mut targets = observe_all(&self.actuator, workloads).await;
        let view = self.view.borrow().clone();
        for i in 0..self.workloads.len() {
            let workload = self.workloads[i].workload.clone();
            let Some(target) = targets.remove(&workload) else {
                continue;
            };
            let now = self.clock.now();
            let started = std::time::Instant::now();
            let w = &mut self.workloads[i];
            w.target = target;
            let (engines, completeness) =
                w.roster
                    .update(&view, &w.selector, &w.target, now, self.freshness);
            let observation = observe::assemble_engines(&view, &engines, &w.target);
            self.metrics.completeness(&workload, &completeness);
            if !w.warm {
                let elapsed = warm_since.elapsed();
                // Standalone: the expected nodes that have not reported
                // since the start (the view is this process's own).
                let waiting_for: Vec<&NodeName> = self
                    .expected_nodes
                    .iter()
                    .filter(|n| !view.nodes.get(*n).is_some_and(|v| v.connected))
                    .collect();
                let heard_all = match &w.target.replicas {
                    // Kubernetes: the target names its replicas, and the
                    // observation is complete once each ready one has
                    // reported (at once when none is ready: a workload at
                    // zero).
                    Some(_) => {
                        completeness.complete()
                            && (observation.telemetry_at.is_some()
                                || observation.replicas.ready == 0)
                    }
                    // Standalone: every expected node has reported, and
                    // every engine of the workload on them has a rate.
                    None => {
                        !self.expected_nodes.is_empty()
                            && waiting_for.is_empty()
                            && completeness.complete()
                            && completeness.reporting == completeness.heard
                    }
                };
                if elapsed < self.warmup && !heard_all {
                    let left = self.warmup - elapsed;
                    let message = warming_message(
                        &observation,
                        &w.target,
                        &waiting_for,
                        self.expected_nodes.len(),
                        left,
                    );
                    let _ = self
                        .commands
                        .send(Command::WarmingUp { workload, message })
                        .await;
                    continue;
                }
                w.warm = true;
            }
            let mut decision = w.decider.decide(now, &observation);
            complete::hold(&mut decision, &completeness, self.min_reporting_share);
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

    /// The decision's batch limit to each replica's agent; the state owner
    /// sends it only when it differs from the standing one.
    async fn publish_batch_limits(&mut self, i: usize, view: &StateView, decision: &Decision) {
        let Some(limit) = decision.batch_limit else {
            return;
        };
        let w = &self.workloads[i];
        let pods = observe::member_pods(view, &w.selector, &w.target);
        for pod in pods {
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
        let plan = Plan {
            decision: decision.clone(),
            drain: to_drain,
            undrain: to_undrain,
        };
        w.actuating = Some(tokio::spawn(async move {
            let result = actuator.apply(&workload, &plan).await;
            let decision = plan.decision;
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

/// Every workload's target, observed at once within [`OBSERVE_TIMEOUT`];
/// a workload missing from the result is not decided for this tick.
async fn observe_all(
    actuator: &Arc<dyn Actuator>,
    workloads: Vec<WorkloadRef>,
) -> BTreeMap<WorkloadRef, TargetObservation> {
    let mut set = tokio::task::JoinSet::new();
    for workload in workloads {
        let actuator = actuator.clone();
        set.spawn(async move {
            let target = actuator.observe(&workload).await;
            (workload, target)
        });
    }
    let mut targets = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + OBSERVE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok((workload, Ok(t))))) => {
                targets.insert(workload, t);
            }
            Ok(Some(Ok((workload, Err(e))))) => {
                tracing::debug!(%workload, error = %e, "actuator could not read the target; not deciding this tick");
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "observing a target failed");
            }
            Ok(None) => break,
            Err(_) => {
                tracing::debug!(
                    late = set.len(),
                    "actuator did not describe every target in time; those are not decided this tick"
                );
                set.abort_all();
                break;
            }
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Arc;
    use std::time::Duration;

    use gpuscale_core::sample::{EngineSample, EngineState, Framework};
    use gpuscale_core::{NodeName, PodRef, Timestamp, WorkloadRef};
    use gpuscale_policy::proportional::{ProportionalConfig, ProportionalDecider};
    use gpuscale_policy::victim::choose_victims;
    use gpuscale_policy::{Action, Decision, Observation};
    use gpuscale_proto::Directive;
    use tokio::sync::{mpsc, watch};

    use super::{DecideLoop, Decider, WorkloadRegistry};
    use crate::actuate::{DrainSink, LoggingActuator};
    use crate::config::{DeciderConfig, EngineSelector, WorkloadDef};
    use crate::metrics::ScalerMetrics;
    use crate::state::Command;
    use crate::view::{EngineView, EngineWindowStats, NodeView, StateView};
    use gpuscale_rt::Clock;

    fn proportional() -> ProportionalConfig {
        ProportionalConfig {
            capacity_tokens_per_second: 100.0,
            target_utilization: 1.0,
            min_replicas: 1,
            max_replicas: 4,
            scale_down_stabilization: Duration::ZERO,
            tolerance: 0.0,
            stale_after: Duration::from_secs(60),
            advisory: false,
        }
    }

    /// Asks for the counts of a script, one per tick, with the policy's
    /// victim choice (the rest of the decision is the proportional rule's).
    struct Scripted {
        counts: VecDeque<u32>,
        base: ProportionalDecider,
    }

    impl Decider for Scripted {
        fn decide(&mut self, now: Timestamp, obs: &Observation) -> Decision {
            let mut d = self.base.decide(now, obs);
            let current = obs.replicas.current;
            let desired = self.counts.pop_front().unwrap_or(current);
            d.current_replicas = current;
            d.desired_replicas = desired;
            d.action = match desired.cmp(&current) {
                std::cmp::Ordering::Greater => Action::ScaleUp,
                std::cmp::Ordering::Less => Action::ScaleDown,
                std::cmp::Ordering::Equal => Action::Hold,
            };
            d.victims = choose_victims(
                &obs.replica_samples,
                current.saturating_sub(desired) as usize,
                now,
                0.0,
            );
            d
        }
    }

    /// One node with one warm engine (no cluster: nothing creates pods).
    fn one_engine_view() -> StateView {
        let mut s = EngineSample::empty(
            PodRef::new("default", "only"),
            Framework::Vllm,
            "m",
            Timestamp(100),
        );
        s.state = EngineState::Warm;
        s.requests_running = Some(1.0);
        s.requests_waiting = Some(0.0);
        let engine = Arc::new(EngineView {
            node: NodeName::new("n"),
            sample: Arc::new(s),
            seen_at: Timestamp(100),
            window: EngineWindowStats::default(),
        });
        let node = NodeView {
            node: NodeName::new("n"),
            boot_epoch: 1,
            last_seq: 1,
            connected: true,
            agent_version: String::new(),
            sample_interval_ms: 1000,
            sampled_at: Timestamp(0),
            received_at: Timestamp(0),
            seen_at: Timestamp(0),
            clock_offset_ms: 0,
            clock_clamped: 0,
            gpus: vec![],
            pods: vec![],
            engines: vec![engine],
            agent: Default::default(),
        };
        StateView {
            nodes: BTreeMap::from([(NodeName::new("n"), Arc::new(node))]),
            ..StateView::default()
        }
    }

    #[tokio::test]
    async fn standalone_scale_in_from_a_count_never_reached_drains_no_real_pod() {
        let workload = WorkloadRef::new("default", "w");
        let def = Arc::new(WorkloadDef {
            workload: workload.clone(),
            labels: BTreeMap::new(),
            selector: EngineSelector {
                model: Some("m".into()),
                namespace: None,
            },
            decider: DeciderConfig::Proportional(proportional()),
            last_decision: None,
        });
        let registry: WorkloadRegistry = BTreeMap::from([(workload.clone(), def)]);
        let (_registry_tx, registry_rx) = watch::channel(Arc::new(registry));
        let (_view_tx, view_rx) = watch::channel(Arc::new(one_engine_view()));
        let (commands_tx, mut commands_rx) = mpsc::channel(256);
        let (_shutdown_tx, shutdown_rx) = watch::channel(false);
        let sink = DrainSink::new(commands_tx.clone(), view_rx.clone());
        let mut lp = DecideLoop::new(
            registry_rx,
            None,
            view_rx,
            commands_tx,
            Arc::new(LoggingActuator::new(sink)),
            Clock::starting_at(Timestamp::from_millis(1_000)),
            Duration::from_secs(1),
            Arc::new(ScalerMetrics::new()),
            shutdown_rx,
        );
        lp.workloads[0].decider = Box::new(Scripted {
            counts: VecDeque::from([2, 1]),
            base: ProportionalDecider::new(proportional()),
        });
        // The state owner's side: records decisions and drains, answers
        // directives.
        let owner = tokio::spawn(async move {
            let mut decided = Vec::new();
            let mut drained = Vec::new();
            while let Some(c) = commands_rx.recv().await {
                match c {
                    Command::Decision { decision, .. } => {
                        decided.push((decision.current_replicas, decision.desired_replicas));
                    }
                    Command::Directive {
                        directive: Directive::DrainPod { pod, .. },
                        reply,
                        ..
                    } => {
                        drained.push(pod.name);
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(NodeName::new("n")));
                        }
                    }
                    _ => {}
                }
            }
            (decided, drained)
        });
        for _ in 0..2 {
            lp.tick_once().await;
            if let Some(task) = lp.workloads[0].actuating.take() {
                task.await.expect("the actuation finishes");
            }
        }
        drop(lp);
        let (decided, drained) = owner.await.expect("the owner finishes");
        // Scale-out to 2 was asked for but nothing made a second pod: the
        // only engine is the whole workload, so asking for 1 changes nothing.
        assert!(drained.is_empty(), "drained {drained:?}: the only real pod");
        assert_eq!(decided, vec![(1, 2), (1, 1)]);
    }

    /// Observes after a delay per workload (`None`: never answers).
    struct Slow(BTreeMap<String, Option<Duration>>);

    impl crate::actuate::Actuator for Slow {
        fn observe<'a>(
            &'a self,
            workload: &'a WorkloadRef,
        ) -> crate::actuate::ActuateFuture<'a, crate::actuate::TargetObservation> {
            let delay = self.0.get(&workload.name).copied().flatten();
            Box::pin(async move {
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
                Ok(crate::actuate::TargetObservation::default())
            })
        }

        fn apply<'a>(
            &'a self,
            _workload: &'a WorkloadRef,
            _plan: &'a crate::actuate::Plan,
        ) -> crate::actuate::ActuateFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_warm_up_starts_again_when_leadership_is_regained() {
        let workload = WorkloadRef::new("default", "w");
        let def = Arc::new(WorkloadDef {
            workload: workload.clone(),
            labels: BTreeMap::new(),
            selector: EngineSelector {
                model: Some("m".into()),
                namespace: None,
            },
            decider: DeciderConfig::Proportional(proportional()),
            last_decision: None,
        });
        let registry: WorkloadRegistry = BTreeMap::from([(workload.clone(), def)]);
        let (_registry_tx, registry_rx) = watch::channel(Arc::new(registry));
        let (_view_tx, view_rx) = watch::channel(Arc::new(one_engine_view()));
        let (commands_tx, mut commands_rx) = mpsc::channel(256);
        let (_shutdown_tx, shutdown_rx) = watch::channel(false);
        let (active_tx, active_rx) = watch::channel(true);
        let sink = DrainSink::new(commands_tx.clone(), view_rx.clone());
        let mut lp = DecideLoop::new(
            registry_rx,
            Some(active_rx),
            view_rx,
            commands_tx,
            Arc::new(LoggingActuator::new(sink)),
            Clock::starting_at(Timestamp::from_millis(1_000)),
            Duration::from_secs(1),
            Arc::new(ScalerMetrics::new()),
            shutdown_rx,
        )
        .with_warmup(Duration::from_secs(10));
        // What each tick published: a decision, or the warm-up's message.
        let mut tick = async |lp: &mut DecideLoop| {
            lp.tick_once().await;
            let mut out = Vec::new();
            while let Ok(c) = commands_rx.try_recv() {
                match c {
                    Command::Decision { .. } => out.push("decision"),
                    Command::WarmingUp { message, .. } => {
                        assert!(message.contains("warming up"), "{message}");
                        out.push("warming");
                    }
                    _ => {}
                }
            }
            out
        };
        assert_eq!(tick(&mut lp).await, ["warming"]);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(tick(&mut lp).await, ["decision"]);
        // A standby decides nothing; the new leader warms up again.
        active_tx.send_replace(false);
        assert!(tick(&mut lp).await.is_empty());
        active_tx.send_replace(true);
        assert_eq!(tick(&mut lp).await, ["warming"]);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(tick(&mut lp).await, ["decision"]);
    }

    #[tokio::test(start_paused = true)]
    async fn targets_are_observed_at_once_within_one_deadline() {
        let def = |name: &str| {
            Arc::new(WorkloadDef {
                workload: WorkloadRef::new("default", name),
                labels: BTreeMap::new(),
                selector: EngineSelector {
                    model: Some("m".into()),
                    namespace: None,
                },
                decider: DeciderConfig::Proportional(proportional()),
                last_decision: None,
            })
        };
        let registry: WorkloadRegistry = ["a", "b", "hung"]
            .into_iter()
            .map(|n| (WorkloadRef::new("default", n), def(n)))
            .collect();
        let (_registry_tx, registry_rx) = watch::channel(Arc::new(registry));
        let (_view_tx, view_rx) = watch::channel(Arc::new(one_engine_view()));
        let (commands_tx, mut commands_rx) = mpsc::channel(256);
        let (_shutdown_tx, shutdown_rx) = watch::channel(false);
        let slow = Slow(BTreeMap::from([
            ("a".to_string(), Some(Duration::from_millis(1_500))),
            ("b".to_string(), Some(Duration::from_millis(1_500))),
            ("hung".to_string(), None),
        ]));
        let mut lp = DecideLoop::new(
            registry_rx,
            None,
            view_rx,
            commands_tx,
            Arc::new(slow),
            Clock::starting_at(Timestamp::from_millis(1_000)),
            Duration::from_secs(1),
            Arc::new(ScalerMetrics::new()),
            shutdown_rx,
        );
        let started = tokio::time::Instant::now();
        lp.tick_once().await;
        let took = started.elapsed();
        let mut decided = Vec::new();
        while let Ok(c) = commands_rx.try_recv() {
            if let Command::Decision { workload, .. } = c {
                decided.push(workload.name);
            }
        }
        // One at a time, a and b alone would take 3 s (tokio's paused clock).
        assert_eq!(decided, vec!["a".to_string(), "b".to_string()]);
        assert!(
            took <= super::OBSERVE_TIMEOUT + Duration::from_millis(10),
            "the tick took {took:?}"
        );
    }
}
