//! The seams between the agent's sampling loop and what it samples.
//!
//! The agent drives three kinds of source every interval: GPUs, the
//! GPU-to-pod assignment, and inference engines. Real implementations (NVML,
//! the kubelet PodResources API, Prometheus scrapers, pushed stats) and fakes
//! (seedable, for the demo and tests) implement the same traits, so the loop
//! never knows which it drives.
//!
//! A source reports per-item problems inside its samples (a metric it cannot
//! read is `None`; a GPU it lost is marked unhealthy) and returns `Err` only
//! when the whole source failed this round; the agent logs once per state
//! change, counts the error, and keeps reporting everything else.

use std::future::Future;

use gpuscale_core::Timestamp;
use gpuscale_core::sample::{EngineSample, GpuSample, PodGpus};

/// Why a whole source failed one sampling round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {kind}: {message}")]
pub struct SourceError {
    /// Which source, e.g. `nvml`, `pod-resources`, `engine default/vllm-0`.
    pub source_name: String,
    /// A short, bounded error class for metrics labels, e.g. `timeout`, `unavailable`, `parse`.
    pub kind: &'static str,
    pub message: String,
}

impl SourceError {
    pub fn new(
        source_name: impl Into<String>,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            source_name: source_name.into(),
            kind,
            message: message.into(),
        }
    }
}

/// GPUs of this node: inventory and metrics.
pub trait GpuSource: Send {
    /// Sample every GPU (and MIG device) now. Cheap calls only: a source that
    /// needs slow NVML calls runs them at a lower rate and reuses the value.
    fn sample_gpus(
        &mut self,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<GpuSample>, SourceError>> + Send;
}

/// Which pods hold which GPUs on this node.
pub trait PodGpuSource: Send {
    fn list_pod_gpus(
        &mut self,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<PodGpus>, SourceError>> + Send;
}

/// Inference engines on this node.
pub trait EngineSource: Send {
    /// One sample per known engine. Engines that could not be read this round
    /// are still returned, with their state set to `Failed` and metrics `None`.
    fn sample_engines(
        &mut self,
        now: Timestamp,
        pods: &[PodGpus],
    ) -> impl Future<Output = Result<Vec<EngineSample>, SourceError>> + Send;
}
