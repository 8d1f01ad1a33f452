//! The one task that owns all of the scaler's state.
//!
//! Everything that changes state arrives as a [`Command`] on one bounded
//! queue: reports from the stream tasks, stream closures, directives asked
//! for through the [`crate::ScalerHandle`], decisions and actuation results
//! from the decide loop. The task applies commands in batches (one `recv`,
//! then whatever is already queued, up to [`MAX_BATCH`]) and publishes one
//! new [`StateView`] per batch, so publication is amortised under load and
//! immediate when idle. It never awaits anything but its queue and its TTL
//! timer: directives to agents are `try_send`s into bounded per-stream
//! queues; when one is full, the node is marked and its standing directives
//! are sent again with its next report.
//!
//! Per node: the GPUs (latest sample), the pods and their GPUs, and per
//! engine its latest sample and a [`Window`] of its counters and histograms.
//! A snapshot replaces the node's inventory wholesale (pods or GPUs that are
//! gone disappear; windows of engines that persist are kept); a delta
//! changes what it names and re-stamps every other engine with the delta's
//! time. A node that reported nothing for the node TTL is forgotten.
//!
//! Times in windows and freshness are on the scaler's clock: a report's
//! agent timestamp is mapped through the node's [`AgentClock`] (one per boot
//! epoch; a report too far from its receive time is clamped and counted),
//! and a new boot epoch starts the node's windows over.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::sample::{
    AgentHealth, EngineSample, EngineState, GpuMetrics, NodeDelta, NodeSnapshot, PodGpus,
};
use gpuscale_core::{GpuUuid, NodeName, PodRef, Timestamp, WorkloadRef};
use gpuscale_policy::{Decision, Observation};
use gpuscale_proto::v1;
use gpuscale_proto::{AgentReport, Directive, ReportBody};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::error::ScalerError;
use crate::ingest::StreamId;
use crate::metrics::ScalerMetrics;
use crate::stopped;
use crate::view::{ActuationRecord, EngineView, GpuView, NodeView, StateView, WorkloadView};
use gpuscale_observe::EngineTracker;
use gpuscale_rt::Clock;

mod agent_clock;
pub(crate) use agent_clock::{AgentClock, SKEW_BOUND_MS};

/// Most commands applied before a view is published.
pub const MAX_BATCH: usize = 4096;

/// The queue towards an agent.
pub(crate) type StreamOut = mpsc::Sender<v1::ScalerDirective>;

/// A change for the state task.
pub(crate) enum Command {
    /// A validated report of a stream; `out` comes with every snapshot.
    Report {
        stream: StreamId,
        report: Box<AgentReport>,
        out: Option<StreamOut>,
    },
    /// A stream opened: `end` ends it (its node expired, so anything more
    /// it sends must start with a snapshot).
    StreamOpened {
        stream: StreamId,
        end: oneshot::Sender<crate::ingest::Rejection>,
    },
    /// The stream ended.
    StreamClosed { stream: StreamId },
    /// Ask the node that runs `pod` for something.
    Directive {
        pod: PodRef,
        directive: Directive,
        reply: Option<oneshot::Sender<Result<NodeName, ScalerError>>>,
    },
    /// The decide loop's latest decision for a workload.
    Decision {
        workload: WorkloadRef,
        observation: Box<Observation>,
        decision: Box<Decision>,
    },
    /// The workload is in its warm-up: no decision is published (a
    /// previous one, from before a change of leader, is withdrawn).
    WarmingUp {
        workload: WorkloadRef,
        message: String,
    },
    /// What the actuator made of a decision.
    Actuated {
        workload: WorkloadRef,
        record: ActuationRecord,
    },
    /// A workload registered at run time (or re-registered with new labels).
    WorkloadRegistered {
        workload: WorkloadRef,
        labels: BTreeMap<String, String>,
    },
    /// A workload removed at run time.
    WorkloadUnregistered { workload: WorkloadRef },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Standing {
    drains: BTreeMap<PodRef, String>,
    batch_limits: BTreeMap<PodRef, u32>,
}

impl Standing {
    fn directives(&self) -> impl Iterator<Item = Directive> + '_ {
        self.drains
            .iter()
            .map(|(pod, reason)| Directive::DrainPod {
                pod: pod.clone(),
                reason: reason.clone(),
            })
            .chain(
                self.batch_limits
                    .iter()
                    .map(|(pod, limit)| Directive::SetBatchLimit {
                        pod: pod.clone(),
                        batch_limit: *limit,
                    }),
            )
    }
}

struct NodeState {
    name: NodeName,
    stream: StreamId,
    connected: bool,
    epoch: u64,
    last_seq: u64,
    last_report: Instant,
    received_at: Timestamp,
    agent_version: String,
    sample_interval_ms: u32,
    /// The newest report's time on the agent's clock.
    sampled_at: Timestamp,
    /// The same on the scaler's clock (through `clock`).
    seen_at: Timestamp,
    clock: AgentClock,
    gpus: BTreeMap<GpuUuid, GpuView>,
    pods: BTreeMap<PodRef, PodGpus>,
    engines: BTreeMap<PodRef, EngineTracker>,
    agent: AgentHealth,
    standing: Standing,
    /// Standing directives must be sent again (a queue was full).
    resend: bool,
    view: Option<Arc<NodeView>>,
}

impl NodeState {
    fn build_view(&self) -> Arc<NodeView> {
        let mut gpus: Vec<GpuView> = self.gpus.values().cloned().collect();
        gpus.sort_by_key(|g| g.info.index);
        Arc::new(NodeView {
            node: self.name.clone(),
            boot_epoch: self.epoch,
            last_seq: self.last_seq,
            connected: self.connected,
            agent_version: self.agent_version.clone(),
            sample_interval_ms: self.sample_interval_ms,
            sampled_at: self.sampled_at,
            received_at: self.received_at,
            seen_at: self.seen_at,
            clock_offset_ms: self.clock.offset_ms,
            clock_clamped: self.clock.clamped,
            gpus,
            pods: self.pods.values().cloned().collect(),
            engines: self
                .engines
                .values()
                .map(|e| {
                    Arc::new(EngineView {
                        node: self.name.clone(),
                        sample: e.sample().clone(),
                        seen_at: self.seen_at,
                        window: e.stats(),
                    })
                })
                .collect(),
            agent: self.agent.clone(),
        })
    }
}

/// One open agent stream.
struct StreamEntry {
    out: StreamOut,
    /// The node its snapshot named.
    node: Option<NodeName>,
    /// When it was last acknowledged.
    acked_at: Option<Instant>,
}

/// Deltas are acknowledged at most this often per stream (snapshots at once).
const ACK_INTERVAL: Duration = Duration::from_millis(250);

/// Parameters of the state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StateConfig {
    pub(crate) window: Duration,
    pub(crate) node_ttl: Duration,
}

/// All of the scaler's state. Methods are synchronous and take the time as
/// an argument; [`run`] drives them.
pub(crate) struct State {
    config: StateConfig,
    metrics: Arc<ScalerMetrics>,
    nodes: BTreeMap<NodeName, NodeState>,
    streams: HashMap<StreamId, StreamEntry>,
    /// How to end each open stream.
    enders: HashMap<StreamId, oneshot::Sender<crate::ingest::Rejection>>,
    workloads: BTreeMap<WorkloadRef, Arc<WorkloadView>>,
    changed: bool,
    generation: u64,
}

impl State {
    pub(crate) fn new(
        config: StateConfig,
        metrics: Arc<ScalerMetrics>,
        workloads: impl IntoIterator<Item = (WorkloadRef, BTreeMap<String, String>)>,
    ) -> Self {
        Self {
            config,
            metrics,
            nodes: BTreeMap::new(),
            streams: HashMap::new(),
            enders: HashMap::new(),
            workloads: workloads
                .into_iter()
                .map(|(w, labels)| {
                    (
                        w.clone(),
                        Arc::new(WorkloadView {
                            workload: w,
                            labels,
                            observation: None,
                            decision: None,
                            last_actuation: None,
                            warming_up: None,
                        }),
                    )
                })
                .collect(),
            changed: true,
            generation: 0,
        }
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.config.window.as_millis()).unwrap_or(i64::MAX)
    }

    /// Applies one command at `now` (tokio clock) / `wall` (scaler clock).
    pub(crate) fn apply(&mut self, command: Command, now: Instant, wall: Timestamp) {
        match command {
            Command::Report {
                stream,
                report,
                out,
            } => self.report(stream, *report, out, now, wall),
            Command::StreamOpened { stream, end } => {
                self.enders.insert(stream, end);
            }
            Command::StreamClosed { stream } => {
                self.enders.remove(&stream);
                if let Some(StreamEntry {
                    node: Some(node), ..
                }) = self.streams.remove(&stream)
                    && let Some(n) = self.nodes.get_mut(&node)
                    && n.stream == stream
                {
                    n.connected = false;
                    n.view = None;
                    self.changed = true;
                }
            }
            Command::Directive {
                pod,
                directive,
                reply,
            } => {
                let result = self.directive(&pod, directive);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::WarmingUp { workload, message } => {
                if let Some(w) = self.workloads.get_mut(&workload)
                    && w.warming_up.as_ref() != Some(&message)
                {
                    let w = Arc::make_mut(w);
                    w.warming_up = Some(message);
                    w.decision = None;
                    w.observation = None;
                    self.changed = true;
                }
            }
            Command::Decision {
                workload,
                observation,
                decision,
            } => {
                if let Some(w) = self.workloads.get_mut(&workload) {
                    let w = Arc::make_mut(w);
                    w.observation = Some(*observation);
                    w.decision = Some(*decision);
                    w.warming_up = None;
                    self.changed = true;
                }
            }
            Command::Actuated { workload, record } => {
                if let Some(w) = self.workloads.get_mut(&workload) {
                    Arc::make_mut(w).last_actuation = Some(record);
                    self.changed = true;
                }
            }
            Command::WorkloadRegistered { workload, labels } => {
                match self.workloads.get_mut(&workload) {
                    Some(w) => Arc::make_mut(w).labels = labels,
                    None => {
                        self.workloads.insert(
                            workload.clone(),
                            Arc::new(WorkloadView {
                                workload,
                                labels,
                                observation: None,
                                decision: None,
                                last_actuation: None,
                                warming_up: None,
                            }),
                        );
                    }
                }
                self.changed = true;
            }
            Command::WorkloadUnregistered { workload } => {
                if self.workloads.remove(&workload).is_some() {
                    self.changed = true;
                }
            }
        }
    }

    fn report(
        &mut self,
        stream: StreamId,
        report: AgentReport,
        out: Option<StreamOut>,
        now: Instant,
        wall: Timestamp,
    ) {
        let seq = report.seq;
        let epoch = report.boot_epoch;
        let gpu_samples = report.body.gpu_sample_count();
        let snapshot = matches!(report.body, ReportBody::Snapshot(_));
        let node = match report.body {
            ReportBody::Snapshot(s) => {
                if let Some(out) = out {
                    self.streams.insert(
                        stream,
                        StreamEntry {
                            out,
                            node: Some(s.node.clone()),
                            acked_at: None,
                        },
                    );
                }
                let window_ms = self.window_ms();
                let clock = self
                    .nodes
                    .get(&s.node)
                    .map(|n| n.clock)
                    .filter(|c| c.epoch == epoch)
                    .unwrap_or_else(|| AgentClock::start(epoch, s.sampled_at, wall));
                let metrics = &self.metrics;
                snapshot_node(
                    &mut self.nodes,
                    window_ms,
                    stream,
                    seq,
                    s,
                    (now, wall),
                    clock,
                    metrics,
                )
            }
            ReportBody::Delta(d) => {
                let node = self
                    .streams
                    .get(&stream)
                    .and_then(|e| e.node.as_ref())
                    .and_then(|name| self.nodes.get_mut(name));
                match node {
                    Some(node) if node.stream == stream => {
                        node.apply_delta(d, &self.config, seq, now, wall, &self.metrics);
                        node
                    }
                    _ => {
                        // A newer stream of the node took over (or it expired).
                        self.metrics.superseded();
                        return;
                    }
                }
            }
        };
        self.metrics.report(snapshot, gpu_samples);
        self.changed = true;
        let Some(entry) = self.streams.get_mut(&stream) else {
            return;
        };
        // Acknowledge a snapshot at once, deltas at most every ACK_INTERVAL:
        // an ack says "everything up to seq is applied", so the newest one
        // is all an agent needs, and one write per report would cost the
        // ingest path as much as decoding it.
        let ack_due = snapshot
            || entry
                .acked_at
                .is_none_or(|at| now.saturating_duration_since(at) >= ACK_INTERVAL);
        if ack_due {
            if send(&entry.out, Directive::Ack { seq }).is_err() {
                self.metrics.directive_dropped();
            }
            entry.acked_at = Some(now);
        }
        if snapshot || node.resend {
            node.resend = false;
            for d in node.standing.directives() {
                if send(&entry.out, d).is_err() {
                    self.metrics.directive_dropped();
                    node.resend = true;
                    break;
                }
            }
        }
    }

    fn directive(&mut self, pod: &PodRef, directive: Directive) -> Result<NodeName, ScalerError> {
        let Some(node) = self
            .nodes
            .values_mut()
            .find(|n| n.engines.contains_key(pod) || n.pods.contains_key(pod))
        else {
            return Err(ScalerError::UnknownPod(pod.clone()));
        };
        let changed = match &directive {
            Directive::DrainPod { pod, reason } => {
                node.standing
                    .drains
                    .insert(pod.clone(), reason.clone())
                    .as_ref()
                    != Some(reason)
            }
            Directive::UndrainPod { pod } => node.standing.drains.remove(pod).is_some(),
            Directive::SetBatchLimit { pod, batch_limit } => {
                node.standing.batch_limits.insert(pod.clone(), *batch_limit) != Some(*batch_limit)
            }
            Directive::Ack { .. } | Directive::SetSampleInterval { .. } => true,
        };
        if changed
            && node.connected
            && let Some(entry) = self.streams.get(&node.stream)
            && send(&entry.out, directive).is_err()
        {
            self.metrics.directive_dropped();
            node.resend = true;
        }
        Ok(node.name.clone())
    }

    /// Forgets nodes that reported nothing for the node TTL.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<NodeName> {
        let ttl = self.config.node_ttl;
        let expired: Vec<NodeName> = self
            .nodes
            .values()
            .filter(|n| now.saturating_duration_since(n.last_report) > ttl)
            .map(|n| n.name.clone())
            .collect();
        for name in &expired {
            // Its stream (silent, not closed: a partition, a hung agent)
            // is ended: whatever it sends later would be a delta of a node
            // the scaler no longer has, so the agent must resend a snapshot.
            if let Some(node) = self.nodes.get(name)
                && let Some(end) = self.enders.remove(&node.stream)
            {
                let _ = end.send(crate::ingest::Rejection {
                    code: tonic::Code::FailedPrecondition,
                    reason: "node_expired",
                    message: format!(
                        "node {name} sent nothing for the node TTL ({:?}) and was forgotten; reconnect and send a snapshot",
                        ttl
                    ),
                });
            }
            self.nodes.remove(name);
            self.metrics.node_expired();
            tracing::info!(node = %name, ttl_s = ttl.as_secs_f64(), "node expired: no report within the node TTL");
        }
        if !expired.is_empty() {
            self.changed = true;
        }
        expired
    }

    /// Sets the inventory gauges (nodes, GPUs, engines by state). Called on
    /// the TTL tick, not per publication: gauges may lag by a tick.
    pub(crate) fn update_inventory(&self) {
        let mut by_state: Vec<(&'static str, i64)> = [
            EngineState::Unknown,
            EngineState::Loading,
            EngineState::Warm,
            EngineState::Draining,
            EngineState::Failed,
        ]
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        let mut gpus = 0;
        for n in self.nodes.values() {
            gpus += n.gpus.len();
            for e in n.engines.values() {
                if let Some(slot) = by_state
                    .iter_mut()
                    .find(|(s, _)| *s == e.sample().state.as_str())
                {
                    slot.1 += 1;
                }
            }
        }
        self.metrics.inventory(self.nodes.len(), gpus, &by_state);
    }

    /// Whether anything changed since the last publication.
    pub(crate) fn changed(&self) -> bool {
        self.changed
    }

    /// A new view: rebuilt nodes where they changed, shared otherwise.
    pub(crate) fn publish(&mut self, wall: Timestamp) -> Arc<StateView> {
        self.generation += 1;
        self.changed = false;
        let mut nodes = BTreeMap::new();
        for (name, n) in &mut self.nodes {
            let view = match &n.view {
                Some(v) => v.clone(),
                None => {
                    let v = n.build_view();
                    n.view = Some(v.clone());
                    v
                }
            };
            nodes.insert(name.clone(), view);
        }
        Arc::new(StateView {
            generation: self.generation,
            published_at: wall,
            nodes,
            workloads: self.workloads.clone(),
        })
    }
}

/// Replaces the node of snapshot `s` wholesale, keeping the windows of
/// engines that persist and the standing directives of pods that remain.
#[allow(clippy::too_many_arguments)]
fn snapshot_node<'a>(
    nodes: &'a mut BTreeMap<NodeName, NodeState>,
    window_ms: i64,
    stream: StreamId,
    seq: u64,
    s: NodeSnapshot,
    (now, wall): (Instant, Timestamp),
    mut clock: AgentClock,
    metrics: &ScalerMetrics,
) -> &'a mut NodeState {
    let epoch = clock.epoch;
    let fresh = nodes.get(&s.node).is_none_or(|p| p.clock.epoch != epoch);
    let previous = nodes.remove(&s.node);
    let (mut old_engines, standing) = match previous {
        // Windows carry over a reconnect of the same boot epoch only: a
        // restarted agent's samples are on a clock measured anew.
        Some(p) if p.clock.epoch == epoch => (p.engines, p.standing),
        Some(p) => (BTreeMap::new(), p.standing),
        None => (BTreeMap::new(), Standing::default()),
    };
    let at = clock.map(s.sampled_at, wall);
    note_clock(&s.node, &clock, at.clamped, fresh, metrics);
    let at = at.at;
    let mut engines = BTreeMap::new();
    for e in s.engines {
        let pod = e.pod.clone();
        let tracker = match old_engines.remove(&pod) {
            Some(mut old) => {
                old.update(e, at);
                old
            }
            None => EngineTracker::new(e, at, window_ms),
        };
        engines.insert(pod, tracker);
    }
    // Standing directives for pods that are gone are dropped.
    let mut standing = standing;
    standing.drains.retain(|p, _| engines.contains_key(p));
    standing.batch_limits.retain(|p, _| engines.contains_key(p));
    let node = NodeState {
        name: s.node.clone(),
        stream,
        connected: true,
        epoch,
        last_seq: seq,
        last_report: now,
        received_at: wall,
        agent_version: s.agent_version,
        sample_interval_ms: s.sample_interval_ms,
        sampled_at: s.sampled_at,
        seen_at: at,
        clock,
        gpus: s
            .gpus
            .into_iter()
            .map(|g| {
                (
                    g.info.uuid.clone(),
                    GpuView {
                        info: Arc::new(g.info),
                        metrics: Arc::new(g.metrics),
                    },
                )
            })
            .collect(),
        pods: s.pods.into_iter().map(|p| (p.pod.clone(), p)).collect(),
        engines,
        agent: s.agent,
        standing,
        resend: false,
        view: None,
    };
    match nodes.entry(node.name.clone()) {
        std::collections::btree_map::Entry::Vacant(v) => v.insert(node),
        std::collections::btree_map::Entry::Occupied(mut o) => {
            o.insert(node);
            o.into_mut()
        }
    }
}

/// Counts a clamped report, and an epoch (`fresh`: its first report) whose
/// agent's clock is off by more than the bound; both are logged.
fn note_clock(
    node: &NodeName,
    clock: &AgentClock,
    clamped: bool,
    fresh: bool,
    metrics: &ScalerMetrics,
) {
    if clamped {
        metrics.clock_clamped();
        tracing::warn!(
            %node,
            epoch = clock.epoch,
            offset_ms = clock.offset_ms,
            "a report's timestamp was more than {} s from its receive time: clamped to the receive time",
            SKEW_BOUND_MS / 1000
        );
    } else if fresh && clock.skewed() {
        metrics.clock_skewed();
        tracing::warn!(
            %node,
            epoch = clock.epoch,
            offset_ms = clock.offset_ms,
            "the agent's clock is off from the scaler's; its timestamps are used for intervals only"
        );
    }
}

fn send(out: &StreamOut, d: Directive) -> Result<(), ()> {
    match out.try_send((&d).into()) {
        Ok(()) => Ok(()),
        // The stream is gone: nothing to resend to.
        Err(TrySendError::Closed(_)) => Ok(()),
        Err(TrySendError::Full(_)) => Err(()),
    }
}

impl NodeState {
    fn apply_delta(
        &mut self,
        d: NodeDelta,
        config: &StateConfig,
        seq: u64,
        now: Instant,
        wall: Timestamp,
        metrics: &ScalerMetrics,
    ) {
        let _ = config;
        self.last_seq = seq;
        self.last_report = now;
        self.received_at = wall;
        self.sampled_at = d.sampled_at;
        let mapped = self.clock.map(d.sampled_at, wall);
        note_clock(&self.name, &self.clock, mapped.clamped, false, metrics);
        let at = mapped.at;
        self.seen_at = at;
        self.connected = true;
        self.view = None;
        for u in &d.gpus_removed {
            self.gpus.remove(u);
        }
        for info in d.gpus_upserted {
            match self.gpus.get_mut(&info.uuid) {
                Some(g) => g.info = Arc::new(info),
                None => {
                    let metrics = Arc::new(GpuMetrics {
                        uuid: info.uuid.clone(),
                        ..GpuMetrics::default()
                    });
                    self.gpus.insert(
                        info.uuid.clone(),
                        GpuView {
                            info: Arc::new(info),
                            metrics,
                        },
                    );
                }
            }
        }
        for m in d.gpu_metrics {
            if let Some(g) = self.gpus.get_mut(&m.uuid) {
                g.metrics = Arc::new(m);
            }
        }
        for p in &d.pods_removed {
            self.pods.remove(p);
        }
        for p in d.pods_upserted {
            self.pods.insert(p.pod.clone(), p);
        }
        for p in &d.engines_removed {
            self.engines.remove(p);
            self.standing.drains.remove(p);
            self.standing.batch_limits.remove(p);
        }
        let mut upserted: BTreeMap<PodRef, EngineSample> = d
            .engines_upserted
            .into_iter()
            .map(|e| (e.pod.clone(), e))
            .collect();
        for (pod, tracker) in &mut self.engines {
            // Engines the delta does not name are unchanged as of its time.
            match upserted.remove(pod) {
                Some(e) => tracker.update(e, at),
                None => tracker.confirm(at),
            }
        }
        let window_ms = i64::try_from(config.window.as_millis()).unwrap_or(i64::MAX);
        for (pod, e) in upserted {
            self.engines
                .insert(pod, EngineTracker::new(e, at, window_ms));
        }
        if let Some(a) = d.agent {
            self.agent = a;
        }
    }
}

/// The state task: applies commands in batches, expires nodes, publishes.
pub(crate) async fn run(
    mut state: State,
    mut commands: mpsc::Receiver<Command>,
    view: watch::Sender<Arc<StateView>>,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let period =
        (state.config.node_ttl / 4).clamp(Duration::from_millis(25), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            command = commands.recv() => {
                let Some(command) = command else { break };
                let now = Instant::now();
                let wall = clock.now();
                state.apply(command, now, wall);
                let mut applied = 1;
                while applied < MAX_BATCH {
                    match commands.try_recv() {
                        Ok(c) => {
                            state.apply(c, now, wall);
                            applied += 1;
                        }
                        Err(_) => break,
                    }
                }
                state.metrics.applied_batch(applied);
            }
            _ = ticker.tick() => {
                state.expire(Instant::now());
                state.update_inventory();
                // Publish at least once per tick so readers see time pass.
                state.changed = true;
            }
        }
        if state.changed() {
            view.send_replace(state.publish(clock.now()));
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod parity;
