//! One InferenceAutoscaler being acted on: its target, its pods (a
//! reflector over the target's selector), what `/scale` last said, and its
//! drains. The actuator, the drainer and the status writer all work through
//! a [`WorkloadEntry`].
//!
//! **Counting** ([`Count`], the one conversion between the two counts).
//! With `S` the target's `/scale` `spec.replicas`, the count the policy
//! decides from is `S` minus the replicas `S` still counts that are on
//! their way out (drain records `Draining`, and `Removing` not yet
//! applied): a draining replica is already gone for the policy, so a
//! scale-in is never requested twice. Setting a count `desired` writes
//! `desired` plus those replicas; the drainer lowers `/scale` by one per
//! replica as each finishes draining, which leaves the policy's count
//! unchanged.
//!
//! **One `/scale` read per tick.** [`WorkloadEntry::observe`] reads `/scale`;
//! [`WorkloadEntry::set_replicas`] writes from that reading (its
//! resourceVersion guards the write: a change since is a 409, which re-reads).
//!
//! **Drains.** Only this crate asks agents to drain or undrain a pod, through
//! the [`gpuscale_scaler::DrainSink`] in [`Shared`]; the decide loop names
//! victims and never sends a drain itself.
//!
//! **Never fighting a user.** Every `/scale` read compares `spec.replicas`
//! with the last value gpuscale saw or wrote. A different value was set by
//! someone else: it is adopted (the next decision starts from it), every
//! drain in progress is cancelled, and an Event and the `AbleToScale`
//! condition say so. Writes carry the resourceVersion they read; a 409
//! re-reads (adopting a change) and retries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use gpuscale_core::sample::EngineState;
use gpuscale_core::{PodRef, Timestamp, WorkloadRef};
use gpuscale_policy::{Action, Decision, ReplicaState};
use gpuscale_scaler::{ClusterReplica, StateView, TargetObservation};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Map, Value, json};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::context::Shared;
use crate::crd::InferenceAutoscalerSpec;
use crate::drain::{
    DELETION_COST_ANNOTATION, DELETION_COST_FIRST, DRAIN_ANNOTATION, DrainPhase, DrainRecord,
    DrainStep, EngineDrain,
};
use crate::error::KubeError;
use crate::events::{EventSpec, EventType};
use crate::pods::PodFacts;
use crate::target::{ScaleReading, ScaleTarget};

/// How long our own pod writes override what the pod watch shows.
const OVERLAY_TTL: Duration = Duration::from_secs(10);
/// A pod still there this long after `/scale` was lowered past it was kept
/// by the ReplicaSet (it removed another): it returns to service.
const REMOVAL_GRACE_MS: i64 = 60_000;
/// Attempts of one `/scale` write (conflicts and retryable errors).
const WRITE_ATTEMPTS: u32 = 3;

/// The target's `spec.replicas` and the replicas it still counts that are on
/// their way out: the one conversion between `/scale` and the count the
/// policy decides from (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Count {
    pub(crate) spec: u32,
    pub(crate) leaving: u32,
}

impl Count {
    /// The count of `spec_replicas` given the target's pods.
    pub(crate) fn of(spec_replicas: u32, facts: &[PodFacts]) -> Self {
        let leaving = facts
            .iter()
            .filter(|f| {
                f.drain
                    .as_ref()
                    .is_some_and(|d| d.counted_in(spec_replicas))
            })
            .count();
        Self {
            spec: spec_replicas,
            leaving: u32::try_from(leaving).unwrap_or(u32::MAX),
        }
    }

    /// The count the policy decides from.
    pub(crate) fn current(self) -> u32 {
        self.spec.saturating_sub(self.leaving)
    }

    /// The `spec.replicas` that gives the policy's count `desired`.
    pub(crate) fn spec_for(self, desired: u32) -> u32 {
        desired.saturating_add(self.leaving)
    }
}

/// A condition's value as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cond {
    pub(crate) status: bool,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl Cond {
    pub(crate) fn new(status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct EntryState {
    /// `spec.replicas` as gpuscale last saw or wrote it.
    known: Option<u32>,
    /// A write in flight.
    pending: Option<u32>,
    pub(crate) last: Option<ScaleReading>,
    pub(crate) able: Cond,
    pub(crate) last_scale_time: Option<Timestamp>,
    /// Our recent pod writes: the drain record we wrote, and when.
    overlay: BTreeMap<String, (Option<DrainRecord>, Instant)>,
    /// Pods whose agent was asked (by this process) to drain them.
    drain_directives: BTreeSet<String>,
    /// The advisory recommendation last announced in an Event.
    pub(crate) advisory_announced: Option<(u32, u32)>,
    /// A count set outside gpuscale, and when it was adopted.
    adopted: Option<(u32, Timestamp)>,
    /// Pods on an unhealthy GPU, with the reason last announced in an Event.
    gpu_faults: BTreeMap<String, String>,
    /// Nodes of this workload's replicas whose agent's clock is skewed.
    skewed_nodes: BTreeMap<String, i64>,
}

/// One InferenceAutoscaler being acted on.
#[derive(Debug)]
pub(crate) struct WorkloadEntry {
    pub(crate) workload: WorkloadRef,
    pub(crate) ias: ObjectReference,
    pub(crate) generation: i64,
    pub(crate) spec: InferenceAutoscalerSpec,
    pub(crate) target: ScaleTarget,
    pub(crate) selector: String,
    pub(crate) pods: Store<Pod>,
    pub(crate) drain_timeout_s: u32,
    /// After adopting a count set outside gpuscale, no scale-in (scale-out)
    /// for this long: the spec's stabilization window of that direction.
    hold_down: Duration,
    hold_up: Duration,
    scale_lock: tokio::sync::Mutex<()>,
    state: Mutex<EntryState>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Drop for WorkloadEntry {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }
}

/// What an entry is made from.
#[derive(Debug)]
pub(crate) struct EntryParts {
    pub(crate) workload: WorkloadRef,
    pub(crate) ias: ObjectReference,
    pub(crate) generation: i64,
    pub(crate) spec: InferenceAutoscalerSpec,
    pub(crate) target: ScaleTarget,
    pub(crate) reading: ScaleReading,
    pub(crate) selector: String,
    pub(crate) drain_timeout_s: u32,
    /// Scale-in and scale-out stabilization windows.
    pub(crate) hold_down: Duration,
    pub(crate) hold_up: Duration,
}

impl WorkloadEntry {
    /// The entry, with its pod reflector and drainer running.
    pub(crate) fn start(parts: EntryParts, shared: &Arc<Shared>) -> Arc<Self> {
        let (pods, writer) = reflector::store::<Pod>();
        let entry = Arc::new(Self {
            workload: parts.workload,
            ias: parts.ias,
            generation: parts.generation,
            spec: parts.spec,
            target: parts.target,
            selector: parts.selector,
            pods,
            drain_timeout_s: parts.drain_timeout_s,
            hold_down: parts.hold_down,
            hold_up: parts.hold_up,
            scale_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(EntryState {
                known: Some(parts.reading.spec_replicas),
                pending: None,
                last: Some(parts.reading),
                able: Cond::new(true, "ReadyForNewScale", "the target's /scale can be read"),
                last_scale_time: None,
                overlay: BTreeMap::new(),
                drain_directives: BTreeSet::new(),
                advisory_announced: None,
                adopted: None,
                gpu_faults: BTreeMap::new(),
                skewed_nodes: BTreeMap::new(),
            }),
            tasks: Mutex::new(Vec::new()),
        });
        let api: Api<Pod> = Api::namespaced(shared.client.clone(), &entry.workload.namespace);
        let config = watcher::Config::default().labels(&entry.selector);
        let reflect = tokio::spawn(
            watcher(api, config)
                .default_backoff()
                .reflect(writer)
                .for_each(|event| {
                    if let Err(e) = event {
                        tracing::debug!(error = %e, "pod watch error; the watcher retries");
                    }
                    futures::future::ready(())
                }),
        );
        let drainer = tokio::spawn(drainer(Arc::downgrade(&entry), shared.clone()));
        entry
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend([reflect.abort_handle(), drainer.abort_handle()]);
        entry
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, EntryState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn advisory(&self) -> bool {
        self.spec.workload.advisory
    }

    fn pods_listed(&self) -> bool {
        matches!(self.pods.wait_until_ready().now_or_never(), Some(Ok(())))
    }

    /// The target's pods, with our recent drain-record writes applied.
    pub(crate) fn facts(&self, gate: &str) -> Vec<PodFacts> {
        let now = Instant::now();
        let mut state = self.state();
        state
            .overlay
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < OVERLAY_TTL);
        self.pods
            .state()
            .iter()
            .filter_map(|p| PodFacts::of(p, gate))
            .map(|mut f| {
                if let Some((record, _)) = state.overlay.get(&f.pod.name) {
                    f.drain = record.clone();
                }
                f
            })
            .collect()
    }

    /// What the decide loop decides from (see the module docs).
    pub(crate) async fn observe(&self, shared: &Shared) -> Result<TargetObservation, KubeError> {
        shared.may_write()?;
        if !self.pods_listed() {
            return Err(KubeError::Client(format!(
                "the pods of {} are not listed yet",
                self.target.describe()
            )));
        }
        let reading = {
            let _scale = self.scale_lock.lock().await;
            self.read_scale(shared).await?
        };
        let s = reading.spec_replicas;
        let facts = self.facts(&shared.config.readiness_gate);
        let replicas: Vec<ClusterReplica> = facts.iter().filter_map(|f| f.replica(s)).collect();
        self.announce_gpu_faults(shared, &replicas).await;
        self.announce_clock_skew(shared, &replicas).await;
        Ok(TargetObservation {
            current: Some(Count::of(s, &facts).current()),
            replicas: Some(replicas),
        })
    }

    /// An Event for each replica newly seen on an unhealthy GPU (the
    /// observation counts it as no capacity and the policy drains it first).
    async fn announce_gpu_faults(&self, shared: &Shared, replicas: &[ClusterReplica]) {
        let view = shared.drains.view();
        let faults: BTreeMap<String, String> = view
            .engines()
            .filter(|e| replicas.iter().any(|r| r.pod == e.sample.pod))
            .filter_map(|e| {
                gpuscale_scaler::observe::gpu_fault(&view, e)
                    .map(|reason| (e.sample.pod.name.clone(), reason.to_string()))
            })
            .collect();
        let new: Vec<(String, String)> = {
            let mut st = self.state();
            let new = faults
                .iter()
                .filter(|(pod, reason)| st.gpu_faults.get(*pod) != Some(*reason))
                .map(|(p, r)| (p.clone(), r.clone()))
                .collect();
            st.gpu_faults = faults;
            new
        };
        for (pod, reason) in new {
            tracing::warn!(workload = %self.workload, %pod, %reason, "replica on an unhealthy GPU: not capacity, first scale-in victim");
            let pod_ref = PodRef::new(&self.workload.namespace, &pod);
            shared
                .events
                .publish(
                    &self.ias,
                    EventSpec {
                        type_: EventType::Warning,
                        reason: "GpuUnhealthy",
                        action: "Observe",
                        note: format!(
                            "pod {pod} runs on an unhealthy GPU ({reason}): not counted as ready capacity, and the first scale-in victim"
                        ),
                        related: Some(pod_reference(&pod_ref)),
                    },
                )
                .await;
        }
    }

    /// A Warning Event for each node of this workload's replicas newly seen
    /// with an agent clock off by more than the bound (its timestamps count
    /// for intervals only; the scaler's clock decides).
    async fn announce_clock_skew(&self, shared: &Shared, replicas: &[ClusterReplica]) {
        let view = shared.drains.view();
        let bound = gpuscale_scaler::AGENT_CLOCK_SKEW_BOUND_MS;
        let skewed: BTreeMap<String, i64> = view
            .engines()
            .filter(|e| replicas.iter().any(|r| r.pod == e.sample.pod))
            .filter_map(|e| {
                let node = view.nodes.get(&e.node)?;
                (node.clock_offset_ms.abs() > bound)
                    .then(|| (e.node.to_string(), node.clock_offset_ms))
            })
            .collect();
        let new: Vec<(String, i64)> = {
            let mut st = self.state();
            let new = skewed
                .iter()
                .filter(|(node, _)| !st.skewed_nodes.contains_key(*node))
                .map(|(n, o)| (n.clone(), *o))
                .collect();
            st.skewed_nodes = skewed;
            new
        };
        for (node, offset_ms) in new {
            let seconds = offset_ms as f64 / 1000.0;
            tracing::warn!(workload = %self.workload, %node, offset_s = seconds, "agent clock skewed");
            shared
                .events
                .publish(
                    &self.ias,
                    EventSpec {
                        type_: EventType::Warning,
                        reason: "AgentClockSkewed",
                        action: "Observe",
                        note: format!(
                            "the agent on node {node} is {seconds:+.0} s off the scaler's clock: its timestamps are used for intervals only, the scaler's clock decides"
                        ),
                        related: None,
                    },
                )
                .await;
        }
    }

    /// GET `/scale`, adopting a change made outside gpuscale. The caller
    /// holds the scale lock.
    async fn read_scale(&self, shared: &Shared) -> Result<ScaleReading, KubeError> {
        let reading = match shared.read("reading /scale", self.target.read()).await {
            Ok(r) => r,
            Err(e) => {
                self.state().able = Cond::new(false, "FailedGetScale", e.to_string());
                return Err(e);
            }
        };
        let s = reading.spec_replicas;
        let external = {
            let mut st = self.state();
            st.last = Some(reading.clone());
            let external = match st.known {
                Some(k) if k != s && st.pending != Some(s) => Some(k),
                _ => None,
            };
            st.known = Some(s);
            if st.able.reason == "FailedGetScale" {
                st.able = Cond::new(true, "ReadyForNewScale", "the target's /scale can be read");
            }
            external
        };
        if let Some(from) = external {
            self.adopt(shared, from, s).await;
        }
        Ok(reading)
    }

    /// Someone else set `spec.replicas` from `from` to `to`: adopt it, and
    /// keep it at least for the stabilization window of each direction.
    async fn adopt(&self, shared: &Shared, from: u32, to: u32) {
        let message = format!(
            "spec.replicas of {} changed from {from} to {to} outside gpuscale; adopted {to}: no scale-in for {} s, no scale-out for {} s (the stabilization windows), then decisions start from it",
            self.target.describe(),
            self.hold_down.as_secs(),
            self.hold_up.as_secs()
        );
        tracing::info!(workload = %self.workload, from, to, "replicas changed outside gpuscale; adopted");
        {
            let mut st = self.state();
            st.able = Cond::new(true, "ExternalChangeAdopted", message.clone());
            st.adopted = Some((to, shared.clock.now()));
        }
        shared.status_wake.notify_one();
        shared
            .events
            .publish(
                &self.ias,
                EventSpec {
                    type_: EventType::Normal,
                    reason: "ReplicasAdopted",
                    action: "Adopt",
                    note: message,
                    related: Some(self.target.reference()),
                },
            )
            .await;
        // Drains toward a count the user has just replaced are void.
        for f in self.facts(&shared.config.readiness_gate) {
            if f.drain.as_ref().is_some_and(|d| d.counted_in(to)) {
                let _ = self
                    .cancel_drain(
                        shared,
                        &f.pod,
                        "the target's replicas changed outside gpuscale",
                    )
                    .await;
            }
        }
    }

    /// Whether a move away from an adopted count `spec_replicas` (down or
    /// up) must wait: the adopted count is kept for the stabilization window
    /// of that direction.
    fn holding(&self, now: Timestamp, spec_replicas: u32, down: bool) -> bool {
        let Some((count, at)) = self.state().adopted else {
            return false;
        };
        let window = if down { self.hold_down } else { self.hold_up };
        count == spec_replicas && now.secs_since(at) < window.as_secs_f64()
    }

    /// Writes `/scale` to `replicas` from `reading`, retrying conflicts
    /// (re-reading, adopting outside changes) and retryable errors; `plan`
    /// recomputes the count from each fresh reading (`None`: nothing to do).
    /// The caller holds the scale lock.
    async fn write_scale(
        &self,
        shared: &Shared,
        mut reading: ScaleReading,
        plan: impl Fn(&ScaleReading) -> Option<u32>,
    ) -> Result<Option<(u32, u32)>, KubeError> {
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=WRITE_ATTEMPTS {
            let Some(target) = plan(&reading) else {
                return Ok(None);
            };
            let from = reading.spec_replicas;
            if target == from {
                return Ok(None);
            }
            self.state().pending = Some(target);
            let result = shared
                .write(
                    "writing /scale",
                    self.target.write(
                        target,
                        reading.resource_version.as_deref(),
                        &shared.config.field_manager,
                    ),
                )
                .await;
            match result {
                Ok(written) => {
                    let mut st = self.state();
                    st.pending = None;
                    st.adopted = None;
                    st.known = Some(written.spec_replicas);
                    st.last = Some(written);
                    st.last_scale_time = Some(shared.clock.now());
                    return Ok(Some((from, target)));
                }
                Err(e) => {
                    self.state().pending = None;
                    let retry = attempt < WRITE_ATTEMPTS && retryable(&e);
                    if !retry {
                        self.state().able = Cond::new(false, "FailedUpdateScale", e.to_string());
                        shared.status_wake.notify_one();
                        return Err(e);
                    }
                    tracing::debug!(workload = %self.workload, error = %e, attempt, "writing /scale failed; re-reading and retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    let before = self.state().known;
                    reading = self.read_scale(shared).await?;
                    if before != Some(reading.spec_replicas) {
                        return Err(KubeError::ExternalChange(format!(
                            "{} changed outside gpuscale while writing; adopted {}",
                            self.target.describe(),
                            reading.spec_replicas
                        )));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The actuator's count: `decision.desired_replicas` is relative to the
    /// count the policy decided from (see the module docs). Writes from the
    /// reading [`WorkloadEntry::observe`] made this tick; `/scale` is read
    /// again only when there is none or the write conflicts.
    pub(crate) async fn set_replicas(
        &self,
        shared: &Shared,
        decision: &Decision,
    ) -> Result<(), KubeError> {
        shared.may_write()?;
        if self.advisory() {
            return Ok(());
        }
        let desired = decision.desired_replicas;
        let _scale = self.scale_lock.lock().await;
        let last = self.state().last.clone();
        let reading = match last {
            Some(r) => r,
            None => self.read_scale(shared).await?,
        };
        let gate = shared.config.readiness_gate.clone();
        let s = reading.spec_replicas;
        let down = decision.desired_replicas < decision.current_replicas;
        if self.holding(shared.clock.now(), s, down) {
            tracing::debug!(workload = %self.workload, spec_replicas = s, desired, "keeping a count set outside gpuscale for the stabilization window");
            return Ok(());
        }
        let plan = |r: &ScaleReading| {
            Some(Count::of(r.spec_replicas, &self.facts(&gate)).spec_for(desired))
        };
        let Some((from, to)) = self.write_scale(shared, reading, plan).await? else {
            return Ok(());
        };
        let up = to > from;
        tracing::info!(workload = %self.workload, from, to, reason = %decision.summary(), "scaled");
        self.state().able = Cond::new(
            true,
            "SucceededRescale",
            format!("{} scaled from {from} to {to}", self.target.describe()),
        );
        shared.status_wake.notify_one();
        shared
            .events
            .publish(
                &self.ias,
                EventSpec {
                    type_: EventType::Normal,
                    reason: if up { "ScaledUp" } else { "ScaledDown" },
                    action: "Scale",
                    note: if (from, to) == (decision.current_replicas, decision.desired_replicas) {
                        format!("{}: {}", self.target.describe(), decision.summary())
                    } else {
                        format!(
                            "{} {from} -> {to} (replicas draining are counted until removed): {}",
                            self.target.describe(),
                            decision.summary()
                        )
                    },
                    related: Some(self.target.reference()),
                },
            )
            .await;
        if decision.action == Action::ScaleDown && !up {
            tracing::debug!(workload = %self.workload, "scale-in without a drained victim: the ReplicaSet chooses (pending and not-ready pods first)");
        }
        Ok(())
    }

    /// The actuator's `drain_pod`: records the drain on the pod (the agent
    /// was already asked to drain it); the drainer takes it from there.
    pub(crate) async fn start_drain(
        &self,
        shared: &Shared,
        pod: &PodRef,
        reason: &str,
    ) -> Result<(), KubeError> {
        shared.may_write()?;
        if self.advisory() {
            return Ok(());
        }
        let Some(facts) = self
            .facts(&shared.config.readiness_gate)
            .into_iter()
            .find(|f| f.pod == *pod)
        else {
            return Err(KubeError::Drain {
                pod: pod.name.clone(),
                message: "not a pod of the target".into(),
            });
        };
        if facts.protected {
            return Err(KubeError::Drain {
                pod: pod.name.clone(),
                message: "annotated gpuscale.dev/scale-in-protection: never a scale-in victim"
                    .into(),
            });
        }
        if facts.drain.is_some() {
            return Ok(());
        }
        let spec_replicas = self.state().last.as_ref().map(|r| r.spec_replicas);
        if spec_replicas.is_some_and(|s| self.holding(shared.clock.now(), s, true)) {
            tracing::debug!(workload = %self.workload, pod = %pod.name, "no drain while a count set outside gpuscale is kept");
            return Ok(());
        }
        let record = DrainRecord::start(
            shared.clock.now(),
            self.drain_timeout_s,
            reason,
            facts.lifecycle == ReplicaState::Ready,
        );
        // Routing stops first (the agent sets the gate False); an agent that
        // does not report the pod yet is asked again by the drainer.
        let asked = shared.drains.drain(pod, reason).await.is_ok();
        self.write_drain(shared, pod, Some(&record), false).await?;
        if asked {
            self.state().drain_directives.insert(pod.name.clone());
        }
        tracing::info!(workload = %self.workload, pod = %pod.name, timeout_s = self.drain_timeout_s, "draining a replica before scale-in");
        shared
            .events
            .publish(
                &self.ias,
                EventSpec {
                    type_: EventType::Normal,
                    reason: "DrainStarted",
                    action: "Drain",
                    note: format!(
                        "draining pod {} before scale-in (removed when idle, at the latest in {} s): {}",
                        pod.name, self.drain_timeout_s, record.reason
                    ),
                    related: Some(pod_reference(pod)),
                },
            )
            .await;
        Ok(())
    }

    /// Returns a draining pod to service: removes its drain record and
    /// deletion cost, and asks its agent to undrain it.
    pub(crate) async fn cancel_drain(
        &self,
        shared: &Shared,
        pod: &PodRef,
        why: &str,
    ) -> Result<(), KubeError> {
        let _ = shared.drains.undrain(pod).await;
        self.state().drain_directives.remove(&pod.name);
        self.write_drain(shared, pod, None, false).await?;
        tracing::info!(workload = %self.workload, pod = %pod.name, why, "drain cancelled; the pod returns to service");
        drain_cancelled_event(shared, &self.ias, pod, why).await;
        Ok(())
    }

    /// Writes (or removes) the drain record, and with `Removing` the
    /// deletion cost, in one merge patch of the pod's annotations.
    async fn write_drain(
        &self,
        shared: &Shared,
        pod: &PodRef,
        record: Option<&DrainRecord>,
        cost: bool,
    ) -> Result<(), KubeError> {
        write_drain_annotations(shared, pod, record, Some(cost)).await?;
        self.state()
            .overlay
            .insert(pod.name.clone(), (record.cloned(), Instant::now()));
        Ok(())
    }

    /// Advances every drain of this workload (see [`crate::drain`]).
    pub(crate) async fn drain_step(&self, shared: &Shared) -> Result<(), KubeError> {
        if shared.may_write().is_err() || self.advisory() {
            return Ok(());
        }
        let gate = shared.config.readiness_gate.clone();
        let facts = self.facts(&gate);
        if facts.iter().all(|f| f.drain.is_none()) {
            return Ok(());
        }
        let view = shared.drains.view();
        let now = shared.clock.now();
        let mut finished: Vec<(PodFacts, bool)> = Vec::new();
        for f in &facts {
            let Some(record) = &f.drain else { continue };
            if f.protected && record.phase == DrainPhase::Draining {
                self.cancel_drain(shared, &f.pod, "the pod is protected from scale-in")
                    .await?;
                continue;
            }
            if record.phase != DrainPhase::Draining {
                continue;
            }
            self.resend_drain_directive(shared, &f.pod, &record.reason)
                .await;
            let engine = engine_drain(&view, &f.pod);
            if let DrainStep::Remove { timed_out } = record.step(now, !f.gate_up, engine) {
                finished.push((f.clone(), timed_out));
            }
        }
        let last_s = self.state().last.as_ref().map(|r| r.spec_replicas);
        let unapplied = |s: u32, f: &PodFacts| matches!(&f.drain, Some(d) if matches!(d.phase, DrainPhase::Removing { .. }) && d.counted_in(s));
        let any_unapplied = last_s.is_some_and(|s| facts.iter().any(|f| unapplied(s, f)));
        if finished.is_empty() && !any_unapplied {
            return self.reclaim_kept(shared, &facts, last_s, now).await;
        }
        let _scale = self.scale_lock.lock().await;
        let reading = self.read_scale(shared).await?;
        let s = reading.spec_replicas;
        // An outside change cancels drains: look again.
        let facts = self.facts(&gate);
        let finished: Vec<(PodFacts, bool)> = finished
            .into_iter()
            .filter(|(f, _)| {
                facts.iter().any(|g| {
                    g.pod == f.pod
                        && g.drain
                            .as_ref()
                            .is_some_and(|d| d.phase == DrainPhase::Draining)
                })
            })
            .collect();
        let leftover: Vec<PodFacts> = facts.iter().filter(|f| unapplied(s, f)).cloned().collect();
        let removing = finished.len() + leftover.len();
        if removing == 0 {
            return Ok(());
        }
        let scale_to = s.saturating_sub(u32::try_from(removing).unwrap_or(u32::MAX));
        let mut names = Vec::new();
        let mut reasons = Vec::new();
        for (f, timed_out) in finished
            .iter()
            .map(|(f, t)| (f, Some(*t)))
            .chain(leftover.iter().map(|f| (f, None)))
        {
            let Some(mut record) = f.drain.clone() else {
                continue;
            };
            record.phase = DrainPhase::Removing { scale_to };
            record.removing_since_ms = Some(now.as_millis());
            self.write_drain(shared, &f.pod, Some(&record), true)
                .await?;
            names.push(f.pod.name.clone());
            reasons.push(match timed_out {
                Some(true) => format!("{}: drain timeout", f.pod.name),
                Some(false) => format!("{}: idle", f.pod.name),
                None => format!("{}: resumed", f.pod.name),
            });
            if reasons.len() == 1 && !record.reason.is_empty() {
                reasons.push(record.reason.clone());
            }
        }
        let expected = s;
        let written = self
            .write_scale(shared, reading, |r| {
                (r.spec_replicas == expected).then_some(scale_to)
            })
            .await?;
        if let Some((from, to)) = written {
            tracing::info!(workload = %self.workload, from, to, pods = ?names, "removed drained replicas");
            self.state().able = Cond::new(
                true,
                "SucceededRescale",
                format!(
                    "{} scaled from {from} to {to} after draining {}",
                    self.target.describe(),
                    names.join(", ")
                ),
            );
            shared.status_wake.notify_one();
            shared
                .events
                .publish(
                    &self.ias,
                    EventSpec {
                        type_: EventType::Normal,
                        reason: "ScaledDown",
                        action: "Scale",
                        note: format!(
                            "{}: {from} -> {to}: removed drained {}",
                            self.target.describe(),
                            reasons.join("; ")
                        ),
                        related: Some(self.target.reference()),
                    },
                )
                .await;
        }
        Ok(())
    }

    /// Pods `/scale` no longer counts that are still there well after: the
    /// ReplicaSet removed another pod, so this one returns to service.
    async fn reclaim_kept(
        &self,
        shared: &Shared,
        facts: &[PodFacts],
        spec_replicas: Option<u32>,
        now: Timestamp,
    ) -> Result<(), KubeError> {
        let Some(s) = spec_replicas else {
            return Ok(());
        };
        for f in facts {
            let Some(record) = &f.drain else { continue };
            let kept = !record.counted_in(s)
                && record
                    .removing_since_ms
                    .is_some_and(|since| now.as_millis() - since >= REMOVAL_GRACE_MS);
            if kept {
                self.cancel_drain(
                    shared,
                    &f.pod,
                    "the ReplicaSet kept this pod after /scale was lowered",
                )
                .await?;
            }
        }
        Ok(())
    }

    /// After a restart or a change of leader, the scaler no longer has the
    /// standing drain directive: ask the pod's agent again (once per process).
    async fn resend_drain_directive(&self, shared: &Shared, pod: &PodRef, reason: &str) {
        if self.state().drain_directives.contains(&pod.name) {
            return;
        }
        match shared.drains.drain(pod, reason).await {
            Ok(node) => {
                tracing::info!(pod = %pod.name, %node, "asked the agent to drain (resumed drain)");
                self.state().drain_directives.insert(pod.name.clone());
            }
            Err(e) => tracing::debug!(pod = %pod.name, error = %e, "no agent reports this pod yet"),
        }
    }

    /// Cancels every drain of this workload (the autoscaler is gone or invalid).
    pub(crate) async fn cancel_all_drains(&self, shared: &Shared, why: &str) {
        for f in self.facts(&shared.config.readiness_gate) {
            if f.drain.is_some() {
                let _ = self.cancel_drain(shared, &f.pod, why).await;
            }
        }
    }
}

/// Writes (or, with `None`, removes) a pod's drain record and, with
/// `Some(cost)`, sets (`true`) or removes (`false`) the deletion cost, in one
/// merge patch of its annotations; `None` leaves the deletion cost as it is.
pub(crate) async fn write_drain_annotations(
    shared: &Shared,
    pod: &PodRef,
    record: Option<&DrainRecord>,
    cost: Option<bool>,
) -> Result<(), KubeError> {
    let mut annotations = Map::new();
    annotations.insert(
        DRAIN_ANNOTATION.into(),
        record.map_or(Value::Null, |r| Value::String(r.render())),
    );
    if let Some(cost) = cost {
        annotations.insert(
            DELETION_COST_ANNOTATION.into(),
            if cost {
                Value::String(DELETION_COST_FIRST.into())
            } else {
                Value::Null
            },
        );
    }
    let patch = json!({"metadata": {"annotations": annotations}});
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &pod.namespace);
    let params = PatchParams {
        field_manager: Some(shared.config.field_manager.clone()),
        ..PatchParams::default()
    };
    shared
        .write("annotating a pod", async {
            api.patch(&pod.name, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| KubeError::api(format!("annotating pod {}", pod.name), e))
        })
        .await?;
    Ok(())
}

/// The Normal Event on the autoscaler `ias` saying that `pod`'s drain was
/// cancelled, and why.
pub(crate) async fn drain_cancelled_event(
    shared: &Shared,
    ias: &ObjectReference,
    pod: &PodRef,
    why: &str,
) {
    shared
        .events
        .publish(
            ias,
            EventSpec {
                type_: EventType::Normal,
                reason: "DrainCancelled",
                action: "Undrain",
                note: format!("pod {} returns to service: {why}", pod.name),
                related: Some(pod_reference(pod)),
            },
        )
        .await;
}

/// Advances the entry's drains every sync period while it exists.
async fn drainer(entry: Weak<WorkloadEntry>, shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(shared.config.sync_period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(entry) = entry.upgrade() else { return };
        if let Err(e) = entry.drain_step(&shared).await {
            tracing::debug!(workload = %entry.workload, error = %e, "drain step failed; retrying");
        }
    }
}

/// How far the engine of a draining pod is, from the scaler's view.
pub(crate) fn engine_drain(view: &StateView, pod: &PodRef) -> EngineDrain {
    let Some(e) = view.engines().find(|e| e.sample.pod == *pod) else {
        return EngineDrain::NotReported;
    };
    let s = &e.sample;
    match s.state {
        EngineState::Warm => EngineDrain::Serving,
        EngineState::Loading | EngineState::Unknown | EngineState::Failed => EngineDrain::Idle,
        // Answers but reads nothing: its work in flight cannot be seen.
        EngineState::NoData => EngineDrain::Unknown,
        EngineState::Draining => match s.requests_running {
            None => EngineDrain::Unknown,
            Some(r) if r <= 0.0 && s.requests_waiting.unwrap_or(0.0) <= 0.0 => EngineDrain::Idle,
            Some(_) => EngineDrain::Busy,
        },
    }
}

/// Whether an API error is worth retrying: conflicts, throttling, server
/// errors, timeouts and transport failures.
pub(crate) fn retryable(e: &KubeError) -> bool {
    match e {
        KubeError::Api { source, .. } => match source.as_ref() {
            kube::Error::Api(s) => matches!(s.code, 409 | 429 | 500..=599),
            kube::Error::HyperError(_) | kube::Error::Service(_) => true,
            _ => false,
        },
        KubeError::Client(_) => true,
        _ => false,
    }
}

fn pod_reference(pod: &PodRef) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.name.clone()),
        namespace: Some(pod.namespace.clone()),
        ..ObjectReference::default()
    }
}
