//! The read-only view of the scaler's state that readers share.
//!
//! The state task publishes a new [`StateView`] through a
//! `tokio::sync::watch` channel after each batch of changes. Readers (the
//! decide loop, HTTP, metrics, the public gRPC APIs) take an
//! `Arc<StateView>` and read it at leisure: no lock is held while they do,
//! and a slow reader only ever skips versions. Views are persistent: a node
//! whose state did not change keeps the same `Arc<NodeView>` from one
//! version to the next, so publishing costs O(changed nodes).

use std::collections::BTreeMap;
use std::sync::Arc;

use gpuscale_core::sample::{AgentHealth, EngineSample, GpuInfo, GpuMetrics, GpuSample, PodGpus};
use gpuscale_core::{NodeName, PodRef, Timestamp, WorkloadRef};
pub use gpuscale_observe::EngineWindowStats;
use gpuscale_policy::{Decision, Observation};

/// Everything the scaler knows, at one instant.
#[derive(Debug, Clone, Default)]
pub struct StateView {
    /// +1 per publication.
    pub generation: u64,
    /// The scaler's clock when this view was published.
    pub published_at: Timestamp,
    pub nodes: BTreeMap<NodeName, Arc<NodeView>>,
    /// Configured workloads with their latest decision.
    pub workloads: BTreeMap<WorkloadRef, Arc<WorkloadView>>,
}

impl StateView {
    /// Every GPU of every node.
    pub fn gpus(&self) -> impl Iterator<Item = (&NodeName, &GpuView)> {
        self.nodes
            .iter()
            .flat_map(|(n, v)| v.gpus.iter().map(move |g| (n, g)))
    }

    /// Every engine of every node.
    pub fn engines(&self) -> impl Iterator<Item = &Arc<EngineView>> {
        self.nodes.values().flat_map(|v| v.engines.iter())
    }

    /// The node that reports `pod`, if any.
    pub fn node_of(&self, pod: &PodRef) -> Option<&NodeName> {
        self.nodes
            .iter()
            .find(|(_, v)| v.pods.iter().any(|p| &p.pod == pod) || v.engine(pod).is_some())
            .map(|(n, _)| n)
    }
}

/// One node as its agent last reported it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node: NodeName,
    pub boot_epoch: u64,
    /// Highest sequence number applied.
    pub last_seq: u64,
    /// True while the node's stream is open.
    pub connected: bool,
    pub agent_version: String,
    pub sample_interval_ms: u32,
    /// When the agent sampled the newest state.
    pub sampled_at: Timestamp,
    /// When the scaler applied the newest report (scaler clock).
    pub received_at: Timestamp,
    /// When the agent sampled the newest state, on the scaler's clock (what
    /// windows and freshness use).
    pub seen_at: Timestamp,
    /// The agent's clock minus the scaler's, milliseconds, as measured in
    /// this boot epoch.
    pub clock_offset_ms: i64,
    /// Reports of this boot epoch whose timestamp was clamped.
    pub clock_clamped: u64,
    /// By GPU index.
    pub gpus: Vec<GpuView>,
    pub pods: Vec<PodGpus>,
    pub engines: Vec<Arc<EngineView>>,
    pub agent: AgentHealth,
}

impl NodeView {
    pub fn engine(&self, pod: &PodRef) -> Option<&Arc<EngineView>> {
        self.engines.iter().find(|e| &e.sample.pod == pod)
    }
}

/// One GPU: its description and latest metrics, shared between views
/// until they change.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuView {
    pub info: Arc<GpuInfo>,
    pub metrics: Arc<GpuMetrics>,
}

impl GpuView {
    /// The GPU as the core type.
    pub fn to_sample(&self) -> GpuSample {
        GpuSample {
            info: GpuInfo::clone(&self.info),
            metrics: GpuMetrics::clone(&self.metrics),
        }
    }
}

/// One engine: its latest sample and what its window says.
#[derive(Debug, Clone)]
pub struct EngineView {
    pub node: NodeName,
    /// The sample as the agent last changed it.
    pub sample: Arc<EngineSample>,
    /// When the agent last confirmed the sample (the node's newest report;
    /// a delta that does not name an engine says it is unchanged).
    pub seen_at: Timestamp,
    pub window: EngineWindowStats,
}

/// A configured workload, its latest decision and actuation.
#[derive(Debug, Clone)]
pub struct WorkloadView {
    pub workload: WorkloadRef,
    pub labels: BTreeMap<String, String>,
    /// The observation the latest decision was made from.
    pub observation: Option<Observation>,
    pub decision: Option<Decision>,
    pub last_actuation: Option<ActuationRecord>,
    /// Set while the workload is in its warm-up after start (or after a
    /// change of leader): what it has heard so far; no decision meanwhile.
    pub warming_up: Option<String>,
}

/// What the scaler last asked the actuator to do for a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct ActuationRecord {
    pub at: Timestamp,
    pub replicas: u32,
    /// `Err` holds the actuator's message.
    pub result: Result<(), String>,
}
