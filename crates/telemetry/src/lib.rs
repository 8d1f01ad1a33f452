//! Node telemetry sources.
//!
//! Everything a node agent reads: GPUs through NVML (or a deterministic fake),
//! inference engines through their Prometheus text or pushes, and the
//! GPU-to-pod assignment through the kubelet PodResources API. Each source
//! sits behind a trait so the agent's loop does not know which one it drives.
//!
//! What it offers: the source traits ([`source`]: [`GpuSource`],
//! [`PodGpuSource`], [`EngineSource`]) and their implementations: [`nvml`]
//! (NVML, loaded at run time), [`fake`] (a deterministic node for tests, the
//! demo and `--fake-config`), [`pod_resources`] (the kubelet's GPU
//! assignment), [`engine`] (scraping engines' Prometheus text, parsed by
//! [`prom_text`]), [`push`] (the node-local ServingService engines and
//! proxies push to), plus [`device_id`] (GPU identities) and the crate's
//! [`error`]s.
//!
//! Not for: sending anything anywhere (the agent's uplink does that).

pub mod device_id;
pub mod engine;
pub mod error;
pub mod fake;
pub mod nvml;
pub mod pod_resources;
pub mod prom_text;
pub mod push;
pub mod source;

pub use engine::{EngineTarget, ScrapeConfig, ScrapeEngineSource, ScrapeStats};
pub use error::TelemetryError;
pub use nvml::{NvmlConfig, NvmlSource, NvmlStats};
pub use pod_resources::{PodResourcesConfig, PodResourcesSource, PodResourcesStats};
pub use push::{LimitsHandle, PushConfig, PushEngineSource, PushService, push_source};
pub use source::{EngineSource, GpuSource, PodGpuSource, SourceError};
