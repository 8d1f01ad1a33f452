//! What a node agent samples: GPUs, the pods they are assigned to, and the
//! inference engines running in those pods.
//!
//! Optional fields are `None` when the source does not export the value (an
//! NVML `NotSupported`, a framework without that metric); they are never
//! filled with zero. Counters are cumulative and monotonic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;
use crate::ids::{GpuUuid, NodeName, PodRef};
use crate::time::Timestamp;

/// The whole state of one node at one sampling instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    pub node: NodeName,
    pub agent_version: String,
    pub sampled_at: Timestamp,
    pub sample_interval_ms: u32,
    pub gpus: Vec<GpuSample>,
    pub pods: Vec<PodGpus>,
    pub engines: Vec<EngineSample>,
    pub agent: AgentHealth,
}

/// What changed on a node since the previous report.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeDelta {
    pub sampled_at: Timestamp,
    pub gpus_upserted: Vec<GpuInfo>,
    pub gpus_removed: Vec<GpuUuid>,
    pub gpu_metrics: Vec<GpuMetrics>,
    pub pods_upserted: Vec<PodGpus>,
    pub pods_removed: Vec<PodRef>,
    pub engines_upserted: Vec<EngineSample>,
    pub engines_removed: Vec<PodRef>,
    pub agent: Option<AgentHealth>,
}

impl NodeDelta {
    /// True when the delta carries no change at all.
    pub fn is_empty(&self) -> bool {
        self.gpus_upserted.is_empty()
            && self.gpus_removed.is_empty()
            && self.gpu_metrics.is_empty()
            && self.pods_upserted.is_empty()
            && self.pods_removed.is_empty()
            && self.engines_upserted.is_empty()
            && self.engines_removed.is_empty()
            && self.agent.is_none()
    }
}

/// One GPU: its static description and its latest metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub info: GpuInfo,
    pub metrics: GpuMetrics,
}

/// Static description of a GPU or MIG device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuInfo {
    pub uuid: GpuUuid,
    pub index: u32,
    pub model_name: String,
    pub memory_total_bytes: u64,
    pub pci_bus_id: String,
    /// For a MIG device: the parent GPU.
    pub parent_uuid: Option<GpuUuid>,
    pub mig_gpu_instance_id: Option<u32>,
    pub gpm_supported: bool,
    pub driver_version: String,
}

/// Dynamic metrics of one GPU. Ratios are fractions in 0..=1.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuMetrics {
    pub uuid: GpuUuid,
    pub memory_used_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
    pub utilization_gpu_ratio: Option<f64>,
    pub utilization_memory_ratio: Option<f64>,
    pub power_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub throttle_reasons: Option<u64>,
    pub ecc_uncorrected_total: Option<u64>,
    pub energy_joules_total: Option<f64>,
    pub gpm: Option<GpmMetrics>,
    pub health: GpuHealth,
    /// Cumulative Xid events per code since the agent started.
    pub xid_totals: BTreeMap<u64, XidCount>,
}

/// Hopper+ GPM metrics, fractions in 0..=1.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GpmMetrics {
    pub sm_util_ratio: Option<f64>,
    pub sm_occupancy_ratio: Option<f64>,
    pub tensor_active_ratio: Option<f64>,
    pub dram_bw_util_ratio: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GpuHealth {
    #[default]
    Unknown,
    Healthy,
    Unhealthy {
        reason: String,
    },
}

impl GpuHealth {
    pub fn is_healthy(&self) -> bool {
        matches!(self, GpuHealth::Healthy)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct XidCount {
    pub total: u64,
    pub last_at: Timestamp,
}

/// GPUs the kubelet assigned to a pod's containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodGpus {
    pub pod: PodRef,
    pub containers: Vec<ContainerGpus>,
}

impl PodGpus {
    /// Every GPU of the pod, all containers together, without duplicates.
    pub fn gpu_uuids(&self) -> Vec<GpuUuid> {
        let mut all: Vec<GpuUuid> = self
            .containers
            .iter()
            .flat_map(|c| c.gpu_uuids.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerGpus {
    pub container: String,
    pub resource_name: String,
    pub gpu_uuids: Vec<GpuUuid>,
}

/// The serving framework of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framework {
    Vllm,
    Sglang,
    Tgi,
    TritonTrtllm,
    TrtllmServe,
    LlamaCpp,
    /// Pushes its stats through the agent's node-local ServingService.
    Push,
    /// gpuscale's simulated engine (demo, tests).
    Fake,
}

impl Framework {
    pub fn as_str(self) -> &'static str {
        match self {
            Framework::Vllm => "vllm",
            Framework::Sglang => "sglang",
            Framework::Tgi => "tgi",
            Framework::TritonTrtllm => "triton-trtllm",
            Framework::TrtllmServe => "trtllm-serve",
            Framework::LlamaCpp => "llama-cpp",
            Framework::Push => "push",
            Framework::Fake => "fake",
        }
    }
}

/// Where an engine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    #[default]
    Unknown,
    /// Up but loading or compiling: not capacity yet.
    Loading,
    /// Healthy and warmed up: counts as capacity.
    Warm,
    /// Out of routing on the scaler's request, finishing its work.
    Draining,
    /// Health endpoint failing or metrics unreachable.
    Failed,
    /// Answers, but its metrics read nothing at all (an empty body, a 204,
    /// another framework's names): not capacity, since nobody can see what
    /// it serves.
    NoData,
}

impl EngineState {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Unknown => "unknown",
            EngineState::Loading => "loading",
            EngineState::Warm => "warm",
            EngineState::Draining => "draining",
            EngineState::Failed => "failed",
            EngineState::NoData => "no_data",
        }
    }
}

/// One inference engine (one pod) at one sampling instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineSample {
    pub pod: PodRef,
    pub container: String,
    pub framework: Framework,
    /// Served model name as the engine reports it.
    pub model: String,
    pub state: EngineState,
    pub sampled_at: Timestamp,
    pub gpu_uuids: Vec<GpuUuid>,
    pub requests_waiting: Option<f64>,
    pub requests_running: Option<f64>,
    /// KV-cache occupancy 0..=1.
    pub kv_cache_usage_ratio: Option<f64>,
    pub kv_capacity_tokens: Option<f64>,
    pub queued_prompt_tokens: Option<f64>,
    pub prompt_tokens_total: Option<f64>,
    pub generation_tokens_total: Option<f64>,
    /// Requests accepted by the engine (offered load), when exported.
    pub requests_arrived_total: Option<f64>,
    pub requests_finished_total: Option<f64>,
    pub preemptions_total: Option<f64>,
    /// Time to first token of each request (request-level).
    pub ttft_seconds: Option<Histogram>,
    /// Inter-token gaps (token-level: one observation per generated token
    /// after the first). A fallback for the SLO where an engine has no
    /// request-level TPOT histogram.
    pub itl_seconds: Option<Histogram>,
    /// Time per output token of each finished request (request-level: its
    /// decode time over its output tokens after the first), as the SLO
    /// defines it.
    pub tpot_seconds: Option<Histogram>,
    /// The batch limit (max running sequences) the engine applies now.
    pub batch_limit: Option<u32>,
    /// Times the agent saw this engine's counters reset (restarts).
    pub counter_resets_total: u64,
    /// Mean context (prompt + generated so far) of running requests, tokens.
    pub mean_context_tokens: Option<f64>,
}

impl EngineSample {
    /// A sample with only identity and state set; every metric missing.
    pub fn empty(
        pod: PodRef,
        framework: Framework,
        model: impl Into<String>,
        at: Timestamp,
    ) -> Self {
        Self {
            pod,
            container: String::new(),
            framework,
            model: model.into(),
            state: EngineState::Unknown,
            sampled_at: at,
            gpu_uuids: Vec::new(),
            requests_waiting: None,
            requests_running: None,
            kv_cache_usage_ratio: None,
            kv_capacity_tokens: None,
            queued_prompt_tokens: None,
            prompt_tokens_total: None,
            generation_tokens_total: None,
            requests_arrived_total: None,
            requests_finished_total: None,
            preemptions_total: None,
            ttft_seconds: None,
            itl_seconds: None,
            tpot_seconds: None,
            batch_limit: None,
            counter_resets_total: 0,
            mean_context_tokens: None,
        }
    }
}

/// The agent's own health, reported with its samples.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentHealth {
    pub samples_total: u64,
    pub sample_errors_total: u64,
    pub reconnects_total: u64,
    /// States replaced by a newer one while the scaler was unreachable.
    pub coalesced_total: u64,
    pub nvml_available: bool,
    pub pod_resources_available: bool,
}
