//! What the policy sees of one workload at one decision instant.
//!
//! The scaler assembles an [`Observation`] from its windows over the agents'
//! streams (and Kubernetes pod state); the simulator assembles it from what a
//! real deployment would see (sampled, delayed, histograms). Every optional
//! value is `None` when it is unknown: the policy must never read a missing
//! value as zero.

use gpuscale_core::slo::LatencyWindow;
use gpuscale_core::{Histogram, Timestamp};
use serde::{Deserialize, Serialize};

/// One workload at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// When the newest telemetry behind this observation was sampled. `None`:
    /// no telemetry at all (the policy holds).
    pub telemetry_at: Option<Timestamp>,
    pub replicas: ReplicaCounts,
    /// Per-replica view (pods of the workload), for victim choice and model refinement.
    pub replica_samples: Vec<ReplicaObservation>,
    pub load: LoadObservation,
    pub latency: LatencyObservation,
}

impl Observation {
    /// An observation with no telemetry, no replicas and every value unknown.
    pub fn empty() -> Self {
        Self {
            telemetry_at: None,
            replicas: ReplicaCounts::default(),
            replica_samples: Vec::new(),
            load: LoadObservation::default(),
            latency: LatencyObservation::default(),
        }
    }
}

/// Replica counts of the scale target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReplicaCounts {
    /// The target's current desired count (`/scale` `spec.replicas`).
    pub current: u32,
    /// Warm replicas: engine ready and warm-up passed. Only these are capacity.
    pub ready: u32,
    /// Created but not scheduled or waiting for a GPU node.
    pub pending: u32,
    /// Scheduled and loading the model (cold start in progress).
    pub loading: u32,
    /// Out of routing, finishing their work before deletion.
    pub draining: u32,
    /// Running but on an unhealthy GPU (an Xid such as 48 or 79, or the GPU
    /// lost): not capacity, the first scale-in victims. Counted in
    /// `current` like any replica the target holds.
    #[serde(default)]
    pub unhealthy: u32,
}

impl ReplicaCounts {
    /// Capacity already on its way: pending plus loading replicas.
    pub fn in_flight(&self) -> u32 {
        self.pending + self.loading
    }
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    Pending,
    Loading,
    Ready,
    Draining,
}

/// One replica (pod) of the workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaObservation {
    /// Pod name (unique within the workload).
    pub id: String,
    pub state: ReplicaState,
    /// Annotated `gpuscale.dev/scale-in-protection: "true"`: never a victim.
    pub protected: bool,
    pub created_at: Option<Timestamp>,
    pub requests_running: Option<f64>,
    pub requests_waiting: Option<f64>,
    pub kv_cache_usage_ratio: Option<f64>,
    /// Mean context (prompt + generated) of running requests, tokens.
    pub mean_context_tokens: Option<f64>,
    /// Mean inter-token latency over the short window, seconds.
    pub itl_mean_seconds: Option<f64>,
    /// Generated tokens per second over the short window.
    pub generation_tokens_per_second: Option<f64>,
    /// The batch limit the engine applies now.
    pub batch_limit: Option<u32>,
    /// Why a GPU of this replica is unhealthy (`None`: none is known to
    /// be). Such a replica is not ready capacity whatever its state says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_fault: Option<String>,
}

impl ReplicaObservation {
    /// Replica `id` in `state`, with nothing else known (no telemetry, not
    /// protected, no fault): the base a caller fills in with what it knows.
    pub fn new(id: impl Into<String>, state: ReplicaState) -> Self {
        Self {
            id: id.into(),
            state,
            protected: false,
            created_at: None,
            requests_running: None,
            requests_waiting: None,
            kv_cache_usage_ratio: None,
            mean_context_tokens: None,
            itl_mean_seconds: None,
            generation_tokens_per_second: None,
            batch_limit: None,
            gpu_fault: None,
        }
    }
}

/// Offered load and engine-side load, summed over the workload's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadObservation {
    /// Offered load at the ingress, requests per second, over the short window.
    pub arrival_rate_rps: Option<f64>,
    /// Mean prompt length of recent requests, tokens.
    pub mean_input_tokens: Option<f64>,
    /// Mean output length of recent requests, tokens.
    pub mean_output_tokens: Option<f64>,
    /// Requests waiting in engine queues (sum over replicas).
    pub requests_waiting: Option<f64>,
    /// Prompt tokens waiting in engine queues (sum over replicas).
    pub queued_prompt_tokens: Option<f64>,
    /// Requests in running batches (sum over replicas).
    pub requests_running: Option<f64>,
    /// Mean KV-cache occupancy over ready replicas, 0..=1.
    pub kv_cache_usage_ratio: Option<f64>,
    /// Generated tokens per second (sum over replicas).
    pub generation_tokens_per_second: Option<f64>,
    /// Prompt tokens per second (sum over replicas).
    pub prompt_tokens_per_second: Option<f64>,
    /// Mean context of running requests, tokens.
    pub mean_context_tokens: Option<f64>,
}

/// Latencies over the short window, as histograms of the window's observations.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LatencyObservation {
    /// Time to first token of each request (request-level).
    pub ttft_seconds: Option<Histogram>,
    /// Inter-token gaps (token-level): the SLO's fallback where no engine
    /// reports request-level TPOT.
    pub itl_seconds: Option<Histogram>,
    /// Time per output token of each finished request (request-level), as
    /// the SLO defines it.
    #[serde(default)]
    pub tpot_seconds: Option<Histogram>,
}

impl LatencyObservation {
    /// The window as the SLO judges it, with the window's mean prompt
    /// (for a length-aware TTFT objective).
    pub fn slo_window(&self, mean_input_tokens: Option<f64>) -> LatencyWindow<'_> {
        LatencyWindow {
            ttft: self.ttft_seconds.as_ref(),
            tpot: self.tpot_seconds.as_ref(),
            itl: self.itl_seconds.as_ref(),
            mean_input_tokens,
        }
    }
}
