//! The simulated fleet behind the fake cluster: every pod the fake
//! ReplicaSet creates becomes a replica of the simulator's fleet
//! (`gpuscale_sim::Fleet`: continuous batching on the profile's performance
//! model), the trace's requests arrive at its router, and each replica's
//! engine state is pushed into the fake node of the pod's node, where the
//! real agent samples it.
//!
//! Lifecycle: the fake kubelet runs a pod after its start delay; the pod's
//! replica then loads for a drawn cold start (60–90 virtual seconds) and
//! turns warm; its agent sets the readiness gate. A drain directive (the
//! scaler asks the pod's agent) takes the replica out of routing; it
//! finishes what it holds. When the ReplicaSet deletes the pod, whatever
//! its replica still held is dropped and counted.
//!
//! The fleet's time is the trace's: zero when the replay starts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gpuscale_agent::NodeDirectives;
use gpuscale_core::sample::{EngineSample, EngineState, Framework};
use gpuscale_core::{GpuUuid, PodRef, Timestamp};
use gpuscale_fake_apiserver::FakeApiServerHandle;
use gpuscale_sim::fleet::{EngineCounters, ReplicaSample};
use gpuscale_sim::{Fleet, Lifecycle, Request, RunStats};
use gpuscale_telemetry::fake::FakeNodeHandle;
use serde_json::Value;
use tokio::sync::watch;

use super::{GATE, NAMESPACE};

/// Where a pod is, as the demo shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PodPhase {
    /// Created, not running yet (scheduling, image pull).
    Pending,
    /// Running, engine loading or gate not yet True.
    Loading,
    /// Gate True: capacity.
    Ready,
    /// Drained by the scaler: out of routing, finishing its work.
    Draining,
}

impl PodPhase {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "pending",
            PodPhase::Loading => "loading",
            PodPhase::Ready => "ready",
            PodPhase::Draining => "draining",
        }
    }
}

/// What the live view and the summary read of the fleet, once per step.
#[derive(Debug, Clone, Default)]
pub(crate) struct FleetStatus {
    /// Trace seconds replayed (0 before the replay starts).
    pub trace_s: f64,
    pub replaying: bool,
    pub arrived: u64,
    pub completed: u64,
    pub dropped: u64,
    /// The Deployment's `spec.replicas`.
    pub spec_replicas: u32,
    pub pending: u32,
    pub loading: u32,
    pub ready: u32,
    pub draining: u32,
    pub batch_limit: Option<u32>,
    /// Every pod by name: its phase.
    pub pods: BTreeMap<String, PodPhase>,
}

/// One pod of the Deployment and its replica in the fleet.
#[derive(Debug)]
struct PodSlot {
    pod: PodRef,
    node: String,
    /// Trace time when the pod was first seen (GPU time counts from here).
    created_at: f64,
    replica: Option<u32>,
    gpus: Vec<GpuUuid>,
    drained: bool,
    gate_up: bool,
    running: bool,
    /// Counters of the pod's earlier replicas (an engine whose replica
    /// finished serves again with its counters continuing).
    carried: EngineCounters,
    /// The replica's newest counters (kept once it is gone).
    last: EngineCounters,
}

/// Scale changes of the Deployment's `spec.replicas`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ScaleChanges {
    pub up: u32,
    pub down: u32,
}

/// The fleet and its bookkeeping; see the module docs.
#[derive(Debug)]
pub(crate) struct FleetDriver {
    fleet: Fleet,
    requests: Vec<Request>,
    next_request: usize,
    duration_s: f64,
    /// Virtual time (seconds since the demo started) of trace time zero.
    trace_start: Option<f64>,
    deployment: String,
    model: String,
    gpus_per_replica: u32,
    kv_capacity_tokens: f64,
    server: Arc<FakeApiServerHandle>,
    nodes: BTreeMap<String, FakeNodeHandle>,
    directives: Vec<watch::Receiver<NodeDirectives>>,
    pods: BTreeMap<String, PodSlot>,
    batch_limit: Option<u32>,
    chart_bucket_s: f64,
    next_chart: f64,
    /// GPU-seconds of pods already deleted.
    closed_gpu_seconds: f64,
    /// Requests lost because a pod was deleted while its replica held them.
    pub(crate) dropped_on_scale_in: u64,
    last_spec: Option<u32>,
    pub(crate) scale_changes: ScaleChanges,
    pub(crate) peak_ready: u32,
    pub(crate) peak_spec: u32,
}

/// What the driver needs to start.
#[derive(Debug)]
pub(crate) struct FleetParts {
    pub fleet: Fleet,
    pub requests: Vec<Request>,
    pub duration_s: f64,
    pub deployment: String,
    pub model: String,
    pub gpus_per_replica: u32,
    pub kv_capacity_tokens: f64,
    pub server: Arc<FakeApiServerHandle>,
    pub nodes: BTreeMap<String, FakeNodeHandle>,
    pub directives: Vec<watch::Receiver<NodeDirectives>>,
    pub chart_bucket_s: f64,
}

impl FleetDriver {
    pub(crate) fn new(parts: FleetParts) -> Self {
        Self {
            fleet: parts.fleet,
            requests: parts.requests,
            next_request: 0,
            duration_s: parts.duration_s,
            trace_start: None,
            deployment: parts.deployment,
            model: parts.model,
            gpus_per_replica: parts.gpus_per_replica.max(1),
            kv_capacity_tokens: parts.kv_capacity_tokens,
            server: parts.server,
            nodes: parts.nodes,
            directives: parts.directives,
            pods: BTreeMap::new(),
            batch_limit: None,
            chart_bucket_s: parts.chart_bucket_s,
            next_chart: 0.0,
            closed_gpu_seconds: 0.0,
            dropped_on_scale_in: 0,
            last_spec: None,
            scale_changes: ScaleChanges::default(),
            peak_ready: 0,
            peak_spec: 0,
        }
    }

    /// Trace time zero is now (`now`: virtual seconds since the demo started).
    pub(crate) fn start_replay(&mut self, now: f64) {
        self.trace_start = Some(now);
    }

    /// Trace time at virtual time `now`, within the trace.
    fn trace_time(&self, now: f64) -> f64 {
        self.trace_start
            .map_or(0.0, |t0| (now - t0).clamp(0.0, self.duration_s))
    }

    /// Whether the whole trace has been replayed at `now`.
    pub(crate) fn replayed(&self, now: f64) -> bool {
        self.trace_start
            .is_some_and(|t0| now - t0 >= self.duration_s)
    }

    /// Trace seconds replayed as of the last step.
    pub(crate) fn trace_s(&self) -> f64 {
        self.fleet.now()
    }

    /// One step at virtual time `now`: arrivals, pods, drains, engines.
    /// `desired`: the scaler's latest decision, for the chart.
    pub(crate) fn step(&mut self, now: f64, desired: Option<u32>) -> FleetStatus {
        let t = self.trace_time(now);
        if self.trace_start.is_some() {
            while let Some(r) = self.requests.get(self.next_request) {
                if r.arrival_s > t {
                    break;
                }
                let r = *r;
                self.fleet.advance_to(r.arrival_s);
                self.fleet.arrive(&r);
                self.next_request += 1;
            }
        }
        self.fleet.advance_to(t);
        self.sync_pods(t);
        self.apply_directives(t);
        self.push_engines(t);
        let status = self.status(t);
        self.record(t, &status, desired);
        status
    }

    /// Pods created, running or deleted since the last step.
    fn sync_pods(&mut self, t: f64) {
        let objects = self.server.objects("", "pods", Some(NAMESPACE));
        let mut seen = BTreeSet::new();
        for p in &objects {
            if p.pointer("/metadata/labels/app").and_then(Value::as_str)
                != Some(self.deployment.as_str())
                || p.pointer("/metadata/deletionTimestamp").is_some()
            {
                continue;
            }
            let Some(name) = p.pointer("/metadata/name").and_then(Value::as_str) else {
                continue;
            };
            seen.insert(name.to_string());
            let node = p
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let running = p.pointer("/status/phase").and_then(Value::as_str) == Some("Running");
            let gate_up = gate_status(p) == Some("True");
            let slot = self
                .pods
                .entry(name.to_string())
                .or_insert_with(|| PodSlot {
                    pod: PodRef::new(NAMESPACE, name),
                    node: node.clone(),
                    created_at: t,
                    replica: None,
                    gpus: Vec::new(),
                    drained: false,
                    gate_up: false,
                    running: false,
                    carried: EngineCounters::default(),
                    last: EngineCounters::default(),
                });
            slot.node = node;
            slot.gate_up = gate_up;
            slot.running = running;
            if running && slot.replica.is_none() {
                // Pods running before the replay are the warm fleet the
                // demo starts from; later ones pay their cold start.
                let warm = self.trace_start.is_none();
                slot.replica = Some(self.fleet.add_replica(t, warm));
                if let Some(handle) = self.nodes.get(&slot.node) {
                    let free = handle.free_gpus();
                    slot.gpus = free
                        .into_iter()
                        .take(self.gpus_per_replica as usize)
                        .collect();
                    // Claim the GPUs at once, before the next pod looks.
                    let mut e = EngineSample::empty(
                        slot.pod.clone(),
                        Framework::Fake,
                        self.model.clone(),
                        Timestamp::from_millis(0),
                    );
                    e.state = EngineState::Loading;
                    e.gpu_uuids = slot.gpus.clone();
                    handle.upsert_engine(e);
                }
            }
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            let Some(slot) = self.pods.remove(&name) else {
                continue;
            };
            if let Some(id) = slot.replica {
                self.dropped_on_scale_in += self.fleet.remove_replica(id, t);
            }
            if let Some(handle) = self.nodes.get(&slot.node) {
                handle.remove_engine(&slot.pod);
            }
            self.closed_gpu_seconds +=
                (t - slot.created_at).max(0.0) * f64::from(self.gpus_per_replica);
        }
    }

    /// Drains and batch limits as the scaler asked the agents.
    fn apply_directives(&mut self, t: f64) {
        let mut draining: BTreeSet<String> = BTreeSet::new();
        let mut limit: Option<u32> = None;
        for rx in &self.directives {
            let d = rx.borrow();
            for pod in d.draining.keys().filter(|p| p.namespace == NAMESPACE) {
                draining.insert(pod.name.clone());
            }
            for (pod, l) in &d.batch_limits {
                if self.pods.contains_key(&pod.name) {
                    limit = Some(limit.map_or(*l, |m: u32| m.max(*l)));
                }
            }
        }
        for (name, slot) in &mut self.pods {
            let want = draining.contains(name);
            if want == slot.drained {
                continue;
            }
            slot.drained = want;
            let Some(id) = slot.replica else { continue };
            if want {
                self.fleet.drain_replica(id, t);
            } else if !self.fleet.undrain_replica(id, t)
                && self.fleet.replicas()[id as usize].state == Lifecycle::Gone
            {
                // Its replica finished and left; the engine is still up and
                // warm, so it serves again at once (counters continue).
                slot.carried.accumulate(&slot.last);
                slot.last = EngineCounters::default();
                slot.replica = Some(self.fleet.add_replica(t, true));
            }
        }
        if limit.is_some() && limit != self.batch_limit {
            self.batch_limit = limit;
            self.fleet.set_batch_limit(limit, t);
        }
    }

    /// Each running pod's engine state into its node's fake engine source.
    fn push_engines(&mut self, t: f64) {
        for slot in self.pods.values_mut() {
            let Some(id) = slot.replica else { continue };
            let Some(handle) = self.nodes.get(&slot.node) else {
                continue;
            };
            let replica = &self.fleet.replicas()[id as usize];
            let lifecycle = replica.state;
            let sample = if lifecycle == Lifecycle::Gone {
                slot.last = replica.counters;
                None
            } else {
                let s = self.fleet.sample_replica(id, t);
                slot.last = s.counters;
                Some(s)
            };
            let state = match lifecycle {
                Lifecycle::Pending | Lifecycle::Loading => EngineState::Loading,
                Lifecycle::Ready => EngineState::Warm,
                Lifecycle::Draining | Lifecycle::Gone => EngineState::Draining,
            };
            handle.upsert_engine(engine_sample(
                slot,
                &self.model,
                state,
                sample.as_ref(),
                self.kv_capacity_tokens,
            ));
        }
    }

    fn status(&self, t: f64) -> FleetStatus {
        let stats = self.stats();
        let mut s = FleetStatus {
            trace_s: t,
            replaying: self.trace_start.is_some(),
            arrived: stats.map_or(0, |s| s.arrivals),
            completed: stats.map_or(0, |s| s.completed),
            dropped: stats.map_or(0, |s| s.dropped),
            spec_replicas: self.spec_replicas().unwrap_or(0),
            batch_limit: self.batch_limit,
            ..FleetStatus::default()
        };
        for (name, slot) in &self.pods {
            let phase = if slot.drained {
                PodPhase::Draining
            } else if slot.gate_up {
                PodPhase::Ready
            } else if slot.running {
                PodPhase::Loading
            } else {
                PodPhase::Pending
            };
            match phase {
                PodPhase::Pending => s.pending += 1,
                PodPhase::Loading => s.loading += 1,
                PodPhase::Ready => s.ready += 1,
                PodPhase::Draining => s.draining += 1,
            }
            s.pods.insert(name.clone(), phase);
        }
        s
    }

    fn spec_replicas(&self) -> Option<u32> {
        self.server
            .object("apps", "deployments", NAMESPACE, &self.deployment)
            .and_then(|d| d.pointer("/spec/replicas").and_then(Value::as_u64))
            .and_then(|r| u32::try_from(r).ok())
    }

    /// Scale changes, peaks and the chart's replica series.
    fn record(&mut self, t: f64, status: &FleetStatus, desired: Option<u32>) {
        if self.trace_start.is_none() {
            self.last_spec = Some(status.spec_replicas);
            return;
        }
        let spec = status.spec_replicas;
        match self.last_spec {
            Some(last) if spec > last => self.scale_changes.up += 1,
            Some(last) if spec < last => self.scale_changes.down += 1,
            _ => {}
        }
        self.last_spec = Some(spec);
        self.peak_ready = self.peak_ready.max(status.ready);
        self.peak_spec = self.peak_spec.max(spec);
        while t >= self.next_chart && self.next_chart <= self.duration_s {
            let desired = desired.unwrap_or(spec);
            let at = self.next_chart;
            if let Some(s) = self.fleet.recorder.stats_mut() {
                s.series.replicas.push((at, desired, status.ready));
            }
            self.next_chart += self.chart_bucket_s;
        }
    }

    fn stats(&self) -> Option<&RunStats> {
        self.fleet.recorder.stats()
    }

    /// Ends the replay: the fleet finishes what it holds (in simulated
    /// time), and the GPU time of live pods is closed at the trace's end.
    pub(crate) fn finish(mut self) -> FleetOutcome {
        let end = self.duration_s;
        self.fleet.advance_to(end);
        self.fleet.finish();
        let live: f64 = self
            .pods
            .values()
            .map(|s| (end - s.created_at).max(0.0))
            .sum::<f64>()
            * f64::from(self.gpus_per_replica);
        let stats = self.fleet.recorder.stats().cloned();
        FleetOutcome {
            stats,
            gpu_seconds: self.closed_gpu_seconds + live,
            dropped_on_scale_in: self.dropped_on_scale_in,
            scale_changes: self.scale_changes,
            peak_ready: self.peak_ready,
            peak_spec: self.peak_spec,
        }
    }
}

/// What the replay produced.
#[derive(Debug, Clone)]
pub(crate) struct FleetOutcome {
    pub stats: Option<RunStats>,
    pub gpu_seconds: f64,
    pub dropped_on_scale_in: u64,
    pub scale_changes: ScaleChanges,
    pub peak_ready: u32,
    pub peak_spec: u32,
}

/// The readiness-gate condition's status on a pod object.
fn gate_status(pod: &Value) -> Option<&str> {
    pod.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(GATE))?
        .get("status")?
        .as_str()
}

/// The engine sample of `slot`'s replica, as the node agent publishes it.
fn engine_sample(
    slot: &PodSlot,
    model: &str,
    state: EngineState,
    sample: Option<&ReplicaSample>,
    kv_capacity_tokens: f64,
) -> EngineSample {
    let mut totals = slot.carried;
    totals.accumulate(&slot.last);
    let mut e = gpuscale_sim::agent::engine_sample(
        slot.pod.clone(),
        model,
        state,
        sample,
        &totals,
        kv_capacity_tokens,
        Timestamp::from_millis(0),
    );
    e.gpu_uuids = slot.gpus.clone();
    e
}
