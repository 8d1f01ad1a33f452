//! The agent's exporter: per-GPU and per-engine metrics of the newest sample,
//! and the health of every source, on the agent's `/metrics`.
//!
//! It does dcgm-exporter's job for the signals gpuscale reads, under our own
//! names (`gpuscale_agent_gpu_*`, `gpuscale_agent_engine_*`) with the labels
//! dcgm-exporter users' dashboards expect (REFERENCE §5.1):
//!
//! | label | value |
//! |---|---|
//! | `gpu` | NVML index (a MIG device carries its parent's index) |
//! | `uuid` | `GPU-…` or `MIG-…` |
//! | `model_name` | NVML model name |
//! | `hostname` | the node name (`--node-name`, `$NODE_NAME`) |
//! | `namespace`, `pod`, `container` | the pod container holding the GPU |
//!
//! A GPU shared by several pods (time-slicing, MPS) has **one series per pod
//! container**, unlike dcgm-exporter's last-one-wins map; a GPU no pod holds
//! has one series with empty `namespace`, `pod` and `container` (Prometheus
//! treats an empty label as absent, so `sum by (pod)` groups idle GPUs under
//! no pod).
//!
//! # Missing is not zero, gone is gone
//!
//! The series are rendered from the newest sample at scrape time (a
//! [`Collector`]), not kept in registered families: a metric a GPU or engine
//! does not report (NVML `NotSupported`, a framework without that metric) is
//! absent rather than 0, and the series of a GPU or pod that left the node
//! disappear with the next sample. Label values are bounded by what is on
//! the node: GPUs, the pods holding them, their engines, and fixed sets of
//! source names and error kinds.
//!
//! [`NodeStats`] carries what the sources count inside themselves (one
//! engine's failed scrape, one NVML call, a PodResources call, a pod-status
//! write): `gpuscale_agent_source_errors_total{source,kind}`. It is distinct
//! from `gpuscale_agent_sample_errors_total`, which counts rounds in which a
//! whole source failed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use gpuscale_core::Histogram;
use gpuscale_core::sample::{EngineSample, EngineState, GpuSample, NodeSnapshot};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use tokio::sync::watch;

use crate::sampler::Sampled;

/// Source names used in `gpuscale_agent_source_errors_total` and
/// `gpuscale_agent_source_up`.
pub mod source {
    pub const NVML: &str = "nvml";
    pub(crate) const POD_RESOURCES: &str = "pod_resources";
    pub(crate) const ENGINE_SCRAPE: &str = "engine_scrape";
    pub(crate) const ENGINE_PUSH: &str = "engine_push";
    pub(crate) const KUBERNETES: &str = "kubernetes";
    pub(crate) const DISCOVERY: &str = "discovery";
    pub(crate) const READINESS_GATE: &str = "readiness_gate";
    pub const WARMUP: &str = "warmup";
}

/// Counters the node's sources keep, shared between them and the exporter.
#[derive(Debug, Default)]
pub struct NodeStats {
    inner: Mutex<NodeStatsSnapshot>,
}

/// A copy of [`NodeStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatsSnapshot {
    /// Errors inside a source by `(source, kind)`.
    pub errors: BTreeMap<(&'static str, &'static str), u64>,
    /// Whether each optional source answers now.
    pub up: BTreeMap<&'static str, bool>,
    /// Engine scrapes attempted.
    pub engine_scrapes_total: u64,
    /// Engine targets scraped now.
    pub engine_targets: u64,
    /// Successful readiness-gate writes by the status written (`true`, `false`).
    pub gate_writes: BTreeMap<&'static str, u64>,
    /// Warm-up probes by result (`success`, `failure`).
    pub warmups: BTreeMap<&'static str, u64>,
    /// GPU-to-pod attribution from the kubelet, when it is on.
    pub attribution: Option<AttributionHealth>,
}

/// When the kubelet last gave the GPU-to-pod mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributionHealth {
    /// When the kubelet last answered (`None`: never).
    pub answered_at: Option<tokio::time::Instant>,
    /// Older than this, the mapping is stale.
    pub stale_after: std::time::Duration,
}

impl AttributionHealth {
    /// Seconds since the kubelet last answered.
    pub fn age(&self) -> Option<std::time::Duration> {
        self.answered_at.map(|t| t.elapsed())
    }

    /// Never answered, or not for longer than `stale_after`.
    pub fn stale(&self) -> bool {
        self.age().is_none_or(|a| a > self.stale_after)
    }
}

impl NodeStats {
    fn lock(&self) -> MutexGuard<'_, NodeStatsSnapshot> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> NodeStatsSnapshot {
        self.lock().clone()
    }

    /// Adds one error of `kind` to `source`.
    pub fn count_error(&self, source: &'static str, kind: &'static str) {
        *self.lock().errors.entry((source, kind)).or_default() += 1;
    }

    /// Replaces `source`'s error totals with the ones it keeps itself.
    pub(crate) fn set_errors(&self, source: &'static str, totals: &BTreeMap<&'static str, u64>) {
        let mut s = self.lock();
        for (kind, n) in totals {
            s.errors.insert((source, kind), *n);
        }
    }

    /// Sets one error total of `source` that the source keeps itself.
    pub(crate) fn set_error_total(&self, source: &'static str, kind: &'static str, total: u64) {
        if total > 0 {
            self.lock().errors.insert((source, kind), total);
        }
    }

    /// Records when the kubelet last answered the attribution task.
    pub(crate) fn set_attribution(
        &self,
        answered_at: Option<tokio::time::Instant>,
        stale_after: std::time::Duration,
    ) {
        self.lock().attribution = Some(AttributionHealth {
            answered_at,
            stale_after,
        });
    }

    pub(crate) fn set_up(&self, source: &'static str, up: bool) {
        self.lock().up.insert(source, up);
    }

    pub fn error_total(&self, source: &str, kind: &str) -> u64 {
        self.lock()
            .errors
            .iter()
            .filter(|((s, k), _)| *s == source && *k == kind)
            .map(|(_, n)| *n)
            .sum()
    }

    pub(crate) fn set_engine_scrapes(&self, total: u64, targets: u64) {
        let mut s = self.lock();
        s.engine_scrapes_total = total;
        s.engine_targets = targets;
    }

    pub(crate) fn gate_written(&self, status: bool) {
        *self
            .lock()
            .gate_writes
            .entry(if status { "true" } else { "false" })
            .or_default() += 1;
    }

    pub(crate) fn warmup(&self, success: bool) {
        *self
            .lock()
            .warmups
            .entry(if success { "success" } else { "failure" })
            .or_default() += 1;
    }
}

/// The collector registered in the agent's registry; see the module docs.
#[derive(Debug)]
pub struct NodeExporter {
    latest: watch::Receiver<Option<Arc<Sampled>>>,
    hostname: String,
    stats: Arc<NodeStats>,
}

impl NodeExporter {
    /// Renders the newest sample of `latest`; `hostname` is the `hostname`
    /// label of every GPU and engine series.
    pub fn new(
        latest: watch::Receiver<Option<Arc<Sampled>>>,
        hostname: impl Into<String>,
        stats: Arc<NodeStats>,
    ) -> Self {
        Self {
            latest,
            hostname: hostname.into(),
            stats,
        }
    }
}

impl Collector for NodeExporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Clone the Arc and release the channel's lock before encoding.
        let newest = self.latest.borrow().clone();
        encode_node(
            &mut encoder,
            newest.as_ref().map(|s| &s.snapshot),
            &self.hostname,
            &self.stats.snapshot(),
        )
    }
}

fn encode_node(
    encoder: &mut DescriptorEncoder,
    snapshot: Option<&NodeSnapshot>,
    hostname: &str,
    stats: &NodeStatsSnapshot,
) -> Result<(), std::fmt::Error> {
    if let Some(snapshot) = snapshot {
        encode_gpus(encoder, snapshot, hostname)?;
        encode_engines(encoder, &snapshot.engines, hostname)?;
    }
    encode_stats(encoder, stats)
}

/// The labels of one GPU series: dcgm-exporter's names.
type GpuLabels<'a> = [(&'static str, &'a str); 7];

struct GpuSeries<'a> {
    gpu: &'a GpuSample,
    labels: GpuLabels<'a>,
}

fn gpu_series<'a>(
    snapshot: &'a NodeSnapshot,
    hostname: &'a str,
    index: &'a [String],
) -> Vec<GpuSeries<'a>> {
    let mut out = Vec::with_capacity(snapshot.gpus.len());
    for (gpu, idx) in snapshot.gpus.iter().zip(index) {
        let base = |ns: &'a str, pod: &'a str, container: &'a str| -> GpuLabels<'a> {
            [
                ("gpu", idx.as_str()),
                ("uuid", gpu.info.uuid.as_str()),
                ("model_name", gpu.info.model_name.as_str()),
                ("hostname", hostname),
                ("namespace", ns),
                ("pod", pod),
                ("container", container),
            ]
        };
        let before = out.len();
        for p in &snapshot.pods {
            for c in &p.containers {
                if c.gpu_uuids.contains(&gpu.info.uuid) {
                    out.push(GpuSeries {
                        gpu,
                        labels: base(&p.pod.namespace, &p.pod.name, &c.container),
                    });
                }
            }
        }
        if out.len() == before {
            out.push(GpuSeries {
                gpu,
                labels: base("", "", ""),
            });
        }
    }
    out
}

fn unit(name: &str) -> Unit {
    Unit::Other(name.to_string())
}

/// One gauge family: a descriptor, then one sample per series that has a value.
fn gauges<'s, T, L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &'s [T],
    value: impl Fn(&'s T) -> Option<(f64, L)>,
) -> Result<(), std::fmt::Error> {
    let values: Vec<(f64, L)> = series.iter().filter_map(value).collect();
    if values.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (v, labels) in values {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter family (the `_total` suffix is added by the encoder).
fn counters<'s, T, L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &'s [T],
    value: impl Fn(&'s T) -> Option<(f64, L)>,
) -> Result<(), std::fmt::Error> {
    let values: Vec<(f64, L)> = series.iter().filter_map(value).collect();
    if values.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (v, labels) in values {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_gpus(
    encoder: &mut DescriptorEncoder,
    snapshot: &NodeSnapshot,
    hostname: &str,
) -> Result<(), std::fmt::Error> {
    if snapshot.gpus.is_empty() {
        return Ok(());
    }
    let index: Vec<String> = snapshot
        .gpus
        .iter()
        .map(|g| g.info.index.to_string())
        .collect();
    let series = gpu_series(snapshot, hostname, &index);
    let bytes = Unit::Bytes;
    let ratio = unit("ratio");
    let watts = unit("watts");
    let hertz = unit("hertz");

    gauges(
        encoder,
        "gpu_info",
        "GPU identity, always 1; driver_version, pci_bus_id and parent_uuid (MIG devices) as labels",
        None,
        &series,
        |s| {
            let info = &s.gpu.info;
            let mut labels: Vec<(&str, &str)> = s.labels.to_vec();
            labels.push(("driver_version", info.driver_version.as_str()));
            labels.push(("pci_bus_id", info.pci_bus_id.as_str()));
            labels.push((
                "parent_uuid",
                info.parent_uuid.as_ref().map_or("", |u| u.as_str()),
            ));
            Some((1.0, labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_memory_total",
        "Framebuffer memory of the GPU (or MIG device)",
        Some(&bytes),
        &series,
        |s| Some((s.gpu.info.memory_total_bytes as f64, s.labels)),
    )?;
    gauges(
        encoder,
        "gpu_memory_used",
        "Framebuffer memory in use (engines pre-allocate their KV cache: flat under load)",
        Some(&bytes),
        &series,
        |s| {
            s.gpu
                .metrics
                .memory_used_bytes
                .map(|v| (v as f64, s.labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_memory_free",
        "Framebuffer memory free",
        Some(&bytes),
        &series,
        |s| {
            s.gpu
                .metrics
                .memory_free_bytes
                .map(|v| (v as f64, s.labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_utilization",
        "Fraction of time any kernel ran (NVML utilization.gpu; not a capacity signal)",
        Some(&ratio),
        &series,
        |s| s.gpu.metrics.utilization_gpu_ratio.map(|v| (v, s.labels)),
    )?;
    gauges(
        encoder,
        "gpu_memory_utilization",
        "Fraction of time the memory controller was busy (NVML utilization.memory)",
        Some(&ratio),
        &series,
        |s| {
            s.gpu
                .metrics
                .utilization_memory_ratio
                .map(|v| (v, s.labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_power",
        "Power draw",
        Some(&watts),
        &series,
        |s| s.gpu.metrics.power_watts.map(|v| (v, s.labels)),
    )?;
    gauges(
        encoder,
        "gpu_power_limit",
        "Enforced power limit",
        Some(&watts),
        &series,
        |s| s.gpu.metrics.power_limit_watts.map(|v| (v, s.labels)),
    )?;
    gauges(
        encoder,
        "gpu_temperature",
        "GPU die temperature",
        Some(&Unit::Celsius),
        &series,
        |s| s.gpu.metrics.temperature_celsius.map(|v| (v, s.labels)),
    )?;
    gauges(
        encoder,
        "gpu_sm_clock",
        "SM clock",
        Some(&hertz),
        &series,
        |s| {
            s.gpu
                .metrics
                .sm_clock_mhz
                .map(|v| (f64::from(v) * 1e6, s.labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_clock_throttle_reasons",
        "NVML clocks-event (throttle) reasons bitmask; 0 when clocks are not held back",
        None,
        &series,
        |s| s.gpu.metrics.throttle_reasons.map(|v| (v as f64, s.labels)),
    )?;
    counters(
        encoder,
        "gpu_ecc_uncorrected_errors",
        "Uncorrected ECC errors (volatile: since the last driver reload)",
        None,
        &series,
        |s| {
            s.gpu
                .metrics
                .ecc_uncorrected_total
                .map(|v| (v as f64, s.labels))
        },
    )?;
    counters(
        encoder,
        "gpu_energy",
        "Energy consumed since the driver loaded (refreshed at the slow NVML rate)",
        Some(&Unit::Joules),
        &series,
        |s| s.gpu.metrics.energy_joules_total.map(|v| (v, s.labels)),
    )?;
    let gpm = |s: &GpuSeries| s.gpu.metrics.gpm;
    gauges(
        encoder,
        "gpu_sm_utilization",
        "GPM: fraction of SMs busy (Hopper and newer)",
        Some(&ratio),
        &series,
        |s| gpm(s).and_then(|g| g.sm_util_ratio).map(|v| (v, s.labels)),
    )?;
    gauges(
        encoder,
        "gpu_sm_occupancy",
        "GPM: warps resident relative to the SMs' maximum (Hopper and newer)",
        Some(&ratio),
        &series,
        |s| {
            gpm(s)
                .and_then(|g| g.sm_occupancy_ratio)
                .map(|v| (v, s.labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_tensor_active",
        "GPM: fraction of cycles any tensor pipe was active (Hopper and newer)",
        Some(&ratio),
        &series,
        |s| {
            gpm(s)
                .and_then(|g| g.tensor_active_ratio)
                .map(|v| (v, s.labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_dram_bandwidth_utilization",
        "GPM: DRAM bandwidth used relative to the peak (Hopper and newer)",
        Some(&ratio),
        &series,
        |s| {
            gpm(s)
                .and_then(|g| g.dram_bw_util_ratio)
                .map(|v| (v, s.labels))
        },
    )?;
    gauges(
        encoder,
        "gpu_healthy",
        "1 while the GPU is healthy; 0 after GPU lost, reset required or a critical Xid",
        None,
        &series,
        |s| match &s.gpu.metrics.health {
            gpuscale_core::sample::GpuHealth::Unknown => None,
            h => Some((f64::from(u8::from(h.is_healthy())), s.labels)),
        },
    )?;
    // One series per Xid code seen: bounded by the codes NVML defines.
    let xids: Vec<(String, &GpuSeries)> = series
        .iter()
        .flat_map(|s| {
            s.gpu
                .metrics
                .xid_totals
                .keys()
                .map(move |x| (x.to_string(), s))
        })
        .collect();
    counters(
        encoder,
        "gpu_xid_errors",
        "Xid events since the agent started, by Xid code",
        None,
        &xids,
        |(code, s)| {
            let total = s.gpu.metrics.xid_totals.get(&code.parse().ok()?)?.total;
            let mut labels: Vec<(&str, &str)> = s.labels.to_vec();
            labels.push(("xid", code.as_str()));
            Some((total as f64, labels))
        },
    )?;
    Ok(())
}

type EngineLabels<'a> = [(&'static str, &'a str); 6];

fn engine_labels<'a>(e: &'a EngineSample, hostname: &'a str) -> EngineLabels<'a> {
    [
        ("namespace", e.pod.namespace.as_str()),
        ("pod", e.pod.name.as_str()),
        ("container", e.container.as_str()),
        ("framework", e.framework.as_str()),
        ("model", e.model.as_str()),
        ("hostname", hostname),
    ]
}

const ENGINE_STATES: [EngineState; 6] = [
    EngineState::Unknown,
    EngineState::Loading,
    EngineState::Warm,
    EngineState::Draining,
    EngineState::Failed,
    EngineState::NoData,
];

fn encode_engines(
    encoder: &mut DescriptorEncoder,
    engines: &[EngineSample],
    hostname: &str,
) -> Result<(), std::fmt::Error> {
    if engines.is_empty() {
        return Ok(());
    }
    let states: Vec<(&EngineSample, EngineState)> = engines
        .iter()
        .flat_map(|e| ENGINE_STATES.iter().map(move |s| (e, *s)))
        .collect();
    gauges(
        encoder,
        "engine_state",
        "1 for the engine's current state (unknown, loading, warm, draining, failed, no_data: answers but reads nothing), 0 for the others",
        None,
        &states,
        |(e, s)| {
            let mut labels: Vec<(&str, &str)> = engine_labels(e, hostname).to_vec();
            labels.push(("state", s.as_str()));
            Some((f64::from(u8::from(e.state == *s)), labels))
        },
    )?;
    let tokens = unit("tokens");
    let ratio = unit("ratio");
    gauges(
        encoder,
        "engine_requests_waiting",
        "Requests queued in the engine",
        None,
        engines,
        |e| e.requests_waiting.map(|v| (v, engine_labels(e, hostname))),
    )?;
    gauges(
        encoder,
        "engine_requests_running",
        "Requests in the running batch",
        None,
        engines,
        |e| e.requests_running.map(|v| (v, engine_labels(e, hostname))),
    )?;
    gauges(
        encoder,
        "engine_kv_cache_usage",
        "KV-cache occupancy",
        Some(&ratio),
        engines,
        |e| {
            e.kv_cache_usage_ratio
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    gauges(
        encoder,
        "engine_kv_cache_capacity",
        "KV-cache capacity",
        Some(&tokens),
        engines,
        |e| {
            e.kv_capacity_tokens
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    gauges(
        encoder,
        "engine_queued_prompt",
        "Prompt tokens of the queued requests",
        Some(&tokens),
        engines,
        |e| {
            e.queued_prompt_tokens
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    gauges(
        encoder,
        "engine_mean_context",
        "Mean context (prompt and generated so far) of the running requests",
        Some(&tokens),
        engines,
        |e| {
            e.mean_context_tokens
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    gauges(
        encoder,
        "engine_batch_limit",
        "Maximum running sequences the engine applies now",
        None,
        engines,
        |e| {
            e.batch_limit
                .map(|v| (f64::from(v), engine_labels(e, hostname)))
        },
    )?;
    counters(
        encoder,
        "engine_prompt_tokens",
        "Prompt tokens processed (continues across engine restarts)",
        None,
        engines,
        |e| {
            e.prompt_tokens_total
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    counters(
        encoder,
        "engine_generation_tokens",
        "Tokens generated (continues across engine restarts)",
        None,
        engines,
        |e| {
            e.generation_tokens_total
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    counters(
        encoder,
        "engine_requests_arrived",
        "Requests accepted by the engine (offered load)",
        None,
        engines,
        |e| {
            e.requests_arrived_total
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    counters(
        encoder,
        "engine_requests_finished",
        "Requests finished",
        None,
        engines,
        |e| {
            e.requests_finished_total
                .map(|v| (v, engine_labels(e, hostname)))
        },
    )?;
    counters(
        encoder,
        "engine_preemptions",
        "Requests preempted (KV cache exhausted)",
        None,
        engines,
        |e| e.preemptions_total.map(|v| (v, engine_labels(e, hostname))),
    )?;
    counters(
        encoder,
        "engine_counter_resets",
        "Times the engine's counters went down (restarts) as seen by the agent",
        None,
        engines,
        |e| Some((e.counter_resets_total as f64, engine_labels(e, hostname))),
    )?;
    histograms(
        encoder,
        "engine_time_to_first_token",
        "Time to first token, as the engine measures it",
        engines,
        |e| {
            e.ttft_seconds
                .as_ref()
                .map(|h| (h, engine_labels(e, hostname)))
        },
    )?;
    histograms(
        encoder,
        "engine_inter_token_latency",
        "Time between generated tokens, as the engine measures it",
        engines,
        |e| {
            e.itl_seconds
                .as_ref()
                .map(|h| (h, engine_labels(e, hostname)))
        },
    )?;
    histograms(
        encoder,
        "engine_time_per_output_token",
        "Time per output token of each finished request, as the engine measures it",
        engines,
        |e| {
            e.tpot_seconds
                .as_ref()
                .map(|h| (h, engine_labels(e, hostname)))
        },
    )?;
    Ok(())
}

fn histograms<'s>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    engines: &'s [EngineSample],
    value: impl Fn(&'s EngineSample) -> Option<(&'s Histogram, EngineLabels<'s>)>,
) -> Result<(), std::fmt::Error> {
    let values: Vec<(&Histogram, EngineLabels)> = engines.iter().filter_map(value).collect();
    if values.is_empty() {
        return Ok(());
    }
    let mut family =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (h, labels) in values {
        // The encoder wants per-bucket counts; ours are cumulative.
        let mut previous = 0u64;
        let buckets: Vec<(f64, u64)> = h
            .bounds()
            .iter()
            .zip(h.cumulative_counts())
            .map(|(b, c)| {
                let n = c.saturating_sub(previous);
                previous = *c;
                (*b, n)
            })
            .collect();
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum(), h.count(), &buckets, None)?;
    }
    Ok(())
}

fn encode_stats(
    encoder: &mut DescriptorEncoder,
    stats: &NodeStatsSnapshot,
) -> Result<(), std::fmt::Error> {
    let errors: Vec<(&(&str, &str), &u64)> = stats.errors.iter().collect();
    counters(
        encoder,
        "source_errors",
        "Errors inside a source (one engine's scrape, one NVML call, a PodResources call, a \
         pod-status write, a warm-up probe), by source and kind; the source kept reporting the rest",
        None,
        &errors,
        |((source, kind), n)| Some((**n as f64, [("source", *source), ("kind", *kind)])),
    )?;
    let up: Vec<(&&str, &bool)> = stats.up.iter().collect();
    gauges(
        encoder,
        "source_up",
        "1 while an optional source answers (nvml: library loaded; pod_resources: the kubelet \
         answered the last call; kubernetes: the pod watch is synced)",
        None,
        &up,
        |(source, up)| Some((f64::from(u8::from(**up)), [("source", **source)])),
    )?;
    ConstCounter::new(stats.engine_scrapes_total).encode(encoder.encode_descriptor(
        "engine_scrapes",
        "Engine metrics scrapes attempted (one per target per round)",
        None,
        MetricType::Counter,
    )?)?;
    ConstGauge::new(stats.engine_targets as i64).encode(encoder.encode_descriptor(
        "engine_targets",
        "Engines scraped now (flags and pod annotations)",
        None,
        MetricType::Gauge,
    )?)?;
    let writes: Vec<(&&str, &u64)> = stats.gate_writes.iter().collect();
    counters(
        encoder,
        "readiness_gate_writes",
        "Readiness-gate conditions written to pods/status, by the status written",
        None,
        &writes,
        |(status, n)| Some((**n as f64, [("status", **status)])),
    )?;
    let warmups: Vec<(&&str, &u64)> = stats.warmups.iter().collect();
    counters(
        encoder,
        "engine_warmups",
        "Warm-up probes sent to engines, by result",
        None,
        &warmups,
        |(result, n)| Some((**n as f64, [("result", **result)])),
    )?;
    if let Some(a) = stats.attribution {
        if let Some(age) = a.age() {
            ConstGauge::new(age.as_secs_f64()).encode(encoder.encode_descriptor(
                "attribution_age",
                "Seconds since the kubelet last gave the GPU-to-pod mapping (PodResources); \
                 samples carry that mapping meanwhile",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?)?;
        }
        ConstGauge::new(i64::from(a.stale())).encode(encoder.encode_descriptor(
            "attribution_stale",
            "1 while the GPU-to-pod mapping is stale: the kubelet never answered, or not for \
             three refresh intervals and a call's deadline",
            None,
            MetricType::Gauge,
        )?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuscale_core::sample::{AgentHealth, ContainerGpus, GpuInfo, GpuMetrics, PodGpus};
    use gpuscale_core::{GpuUuid, NodeName, PodRef, Timestamp};
    use prometheus_client::registry::Registry;

    fn gpu(uuid: &str, index: u32, used: Option<u64>) -> GpuSample {
        GpuSample {
            info: GpuInfo {
                uuid: GpuUuid::new(uuid),
                index,
                model_name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80,
                pci_bus_id: String::new(),
                parent_uuid: None,
                mig_gpu_instance_id: None,
                gpm_supported: false,
                driver_version: "570".into(),
            },
            metrics: GpuMetrics {
                uuid: GpuUuid::new(uuid),
                memory_used_bytes: used,
                ..GpuMetrics::default()
            },
        }
    }

    #[derive(Debug)]
    struct Fixed(NodeSnapshot);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_node(
                &mut encoder,
                Some(&self.0),
                "node-a",
                &NodeStatsSnapshot::default(),
            )
        }
    }

    fn render(snapshot: NodeSnapshot) -> String {
        let mut registry = Registry::with_prefix("gpuscale_agent");
        registry.register_collector(Box::new(Fixed(snapshot)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        out
    }

    #[test]
    fn a_missing_metric_has_no_series_and_an_idle_gpu_has_empty_pod_labels() {
        let snapshot = NodeSnapshot {
            node: NodeName::new("node-a"),
            agent_version: "0".into(),
            sampled_at: Timestamp::EPOCH,
            sample_interval_ms: 1000,
            gpus: vec![gpu("GPU-a", 0, Some(7)), gpu("GPU-b", 1, None)],
            pods: vec![PodGpus {
                pod: PodRef::new("llm", "p-0"),
                containers: vec![ContainerGpus {
                    container: "engine".into(),
                    resource_name: "nvidia.com/gpu".into(),
                    gpu_uuids: vec![GpuUuid::new("GPU-a")],
                }],
            }],
            engines: vec![],
            agent: AgentHealth::default(),
        };
        let text = render(snapshot);
        assert!(
            text.contains(
                "gpuscale_agent_gpu_memory_used_bytes{gpu=\"0\",uuid=\"GPU-a\",model_name=\"NVIDIA H100 80GB HBM3\",hostname=\"node-a\",namespace=\"llm\",pod=\"p-0\",container=\"engine\"} 7"
            ),
            "{text}"
        );
        assert!(
            !text.contains("gpuscale_agent_gpu_memory_used_bytes{gpu=\"1\""),
            "{text}"
        );
        assert!(
            text.contains(
                "gpuscale_agent_gpu_memory_total_bytes{gpu=\"1\",uuid=\"GPU-b\",model_name=\"NVIDIA H100 80GB HBM3\",hostname=\"node-a\",namespace=\"\",pod=\"\",container=\"\"} 80"
            ),
            "{text}"
        );
        assert!(!text.contains("gpu_power"), "no power reported: no family");
    }

    #[test]
    fn an_engine_with_no_data_is_shown_in_its_own_state() {
        let mut e = gpuscale_core::sample::EngineSample::empty(
            PodRef::new("llm", "e-0"),
            gpuscale_core::sample::Framework::Vllm,
            "m",
            Timestamp::EPOCH,
        );
        e.state = EngineState::NoData;
        let snapshot = NodeSnapshot {
            node: NodeName::new("node-a"),
            agent_version: "0".into(),
            sampled_at: Timestamp::EPOCH,
            sample_interval_ms: 1000,
            gpus: vec![],
            pods: vec![],
            engines: vec![e],
            agent: AgentHealth::default(),
        };
        let text = render(snapshot);
        let state = |s: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("gpuscale_agent_engine_state{")
                        && l.contains(&format!("state=\"{s}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(state("no_data").as_deref(), Some("1.0"), "{text}");
        assert_eq!(state("warm").as_deref(), Some("0.0"), "{text}");
    }
}
