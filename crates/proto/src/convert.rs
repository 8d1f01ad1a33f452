//! Conversions between the wire (`gpuscale.v1`, prost) and the domain
//! ([`gpuscale_core`]).
//!
//! From the wire, every conversion is a `TryFrom` that validates as it goes
//! and fails with a [`ConvertError`] naming the offending field by its path in
//! the message, e.g. `snapshot.gpus[3].metrics.utilization_gpu_ratio: 1.7 is
//! outside 0..=1`. What is rejected:
//!
//! * NaN or infinite numbers, negative quantities, ratios outside `0..=1`;
//! * absurd values: power above [`MAX_POWER_WATTS`], temperatures outside
//!   [`TEMPERATURE_RANGE_CELSIUS`], memory used or free above the GPU's total;
//! * histograms that are not cumulative Prometheus histograms (checked by
//!   [`Histogram::from_parts`]);
//! * missing required parts (a report without a body, a pod without a name),
//!   duplicates (two GPUs with one UUID), and more items than any node has
//!   (the `MAX_*` constants), so one message cannot make the scaler allocate
//!   without bound.
//!
//! A bad engine entry need not cost the node its report: the scaler converts
//! with [`AgentReport::from_wire`], which leaves out each engine entry that
//! does not convert (and a second entry for the same pod) and returns them
//! as [`RejectedEngine`]s, while the rest of the node is reported. The strict
//! `TryFrom` rejects the whole report at the first bad entry.
//!
//! To the wire, conversions are infallible `From<&T>`: domain values are valid
//! by construction, and an agent that produced an absurd value learns it from
//! the scaler's answer.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use gpuscale_core::sample::{
    AgentHealth, ContainerGpus, EngineSample, EngineState, Framework, GpmMetrics, GpuHealth,
    GpuInfo, GpuMetrics, GpuSample, NodeDelta, NodeSnapshot, PodGpus, XidCount,
};
use gpuscale_core::{GpuUuid, Histogram, NodeName, PodRef, Timestamp, WorkloadRef};

use crate::v1;

/// Most GPUs (and MIG devices) one node may report: 8 GPUs × 7 MIG slices
/// is 56; 256 leaves room for the largest boxes.
pub const MAX_GPUS_PER_NODE: usize = 256;
/// Most pods, and most engines, one node may report.
pub const MAX_PODS_PER_NODE: usize = 1024;
/// Most containers per pod.
pub const MAX_CONTAINERS_PER_POD: usize = 64;
/// Most buckets in one histogram (vLLM's largest has 26).
pub const MAX_HISTOGRAM_BUCKETS: usize = 256;
/// Most distinct Xid codes per GPU.
pub const MAX_XID_CODES: usize = 256;
/// Longest name or identifier (Kubernetes names are at most 253 bytes).
pub const MAX_NAME_BYTES: usize = 253;
/// Highest plausible board power: the largest accelerators draw about 1.2 kW.
pub const MAX_POWER_WATTS: f64 = 5_000.0;
/// Plausible GPU temperatures.
pub const TEMPERATURE_RANGE_CELSIUS: std::ops::RangeInclusive<f64> = -50.0..=200.0;
/// Highest plausible SM clock.
pub const MAX_SM_CLOCK_MHZ: u32 = 10_000;
/// Highest plausible request count in one engine's queue or batch.
pub const MAX_REQUESTS: f64 = 1e9;
/// Sampling intervals a directive may set.
pub const SAMPLE_INTERVAL_RANGE_MS: std::ops::RangeInclusive<u32> = 100..=3_600_000;

/// A wire message that cannot become a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field is absent or empty.
    #[error("{field}: missing ({what})")]
    Missing { field: String, what: &'static str },
    /// A field holds a value outside what is allowed.
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

impl ConvertError {
    /// The path of the offending field, e.g. `snapshot.gpus[3].metrics.power_watts`.
    pub fn field(&self) -> &str {
        match self {
            ConvertError::Missing { field, .. } | ConvertError::Invalid { field, .. } => field,
        }
    }
}

/// One report of an agent's stream, in domain terms.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentReport {
    /// Random, non-zero, fixed for the life of the agent process.
    pub boot_epoch: u64,
    /// Starts at 1; +1 per message within the epoch, across reconnects.
    pub seq: u64,
    /// The agent's wall clock when it sent the message.
    pub sent_at: Timestamp,
    pub body: ReportBody,
}

/// A full node snapshot or the changes since the previous report.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportBody {
    Snapshot(NodeSnapshot),
    Delta(NodeDelta),
}

impl ReportBody {
    /// How many GPU samples (metrics of one GPU) the body carries.
    pub fn gpu_sample_count(&self) -> usize {
        match self {
            ReportBody::Snapshot(s) => s.gpus.len(),
            ReportBody::Delta(d) => d.gpu_metrics.len(),
        }
    }
}

/// What the scaler asks of an agent, in domain terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// Every report up to `seq` is applied.
    Ack { seq: u64 },
    /// Sample every `interval` from now on.
    SetSampleInterval { interval: Duration },
    /// Take the pod out of routing and let it finish its work.
    DrainPod { pod: PodRef, reason: String },
    /// Put a drained pod back into routing.
    UndrainPod { pod: PodRef },
    /// Apply this batch limit (max running sequences) to the pod's engine.
    SetBatchLimit { pod: PodRef, batch_limit: u32 },
}

// ---------------------------------------------------------------------------
// Field paths, rendered only when something is wrong.

/// A field path as a linked list on the stack: building one costs nothing,
/// and it is turned into text only for an error.
#[derive(Clone, Copy)]
struct At<'a> {
    parent: Option<&'a At<'a>>,
    segment: Segment,
}

#[derive(Clone, Copy)]
enum Segment {
    Field(&'static str),
    Index(usize),
}

impl<'a> At<'a> {
    const fn root(name: &'static str) -> At<'static> {
        At {
            parent: None,
            segment: Segment::Field(name),
        }
    }
    fn field(&'a self, name: &'static str) -> At<'a> {
        At {
            parent: Some(self),
            segment: Segment::Field(name),
        }
    }
    fn index(&'a self, i: usize) -> At<'a> {
        At {
            parent: Some(self),
            segment: Segment::Index(i),
        }
    }
    fn missing(&self, what: &'static str) -> ConvertError {
        ConvertError::Missing {
            field: self.to_string(),
            what,
        }
    }
    fn invalid(&self, problem: impl Into<String>) -> ConvertError {
        ConvertError::Invalid {
            field: self.to_string(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            parent.fmt(f)?;
            match self.segment {
                Segment::Field(name) => write!(f, ".{name}"),
                Segment::Index(i) => write!(f, "[{i}]"),
            }
        } else {
            match self.segment {
                Segment::Field(name) => f.write_str(name),
                Segment::Index(i) => write!(f, "[{i}]"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Value checks.

fn finite(v: f64, at: At<'_>) -> Result<f64, ConvertError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(at.invalid(format!("{v} is not a finite number")))
    }
}

fn ratio(v: Option<f64>, at: At<'_>) -> Result<Option<f64>, ConvertError> {
    match v {
        None => Ok(None),
        Some(v) => {
            let v = finite(v, at)?;
            if (0.0..=1.0).contains(&v) {
                Ok(Some(v))
            } else {
                Err(at.invalid(format!("{v} is outside 0..=1")))
            }
        }
    }
}

fn in_range(
    v: Option<f64>,
    range: std::ops::RangeInclusive<f64>,
    unit: &str,
    at: At<'_>,
) -> Result<Option<f64>, ConvertError> {
    match v {
        None => Ok(None),
        Some(v) => {
            let v = finite(v, at)?;
            if range.contains(&v) {
                Ok(Some(v))
            } else {
                Err(at.invalid(format!(
                    "{v} is outside {}..={} {unit}",
                    range.start(),
                    range.end()
                )))
            }
        }
    }
}

/// A non-negative finite quantity (counters, gauges of counts and tokens).
fn non_negative(v: Option<f64>, at: At<'_>) -> Result<Option<f64>, ConvertError> {
    match v {
        None => Ok(None),
        Some(v) => {
            let v = finite(v, at)?;
            if v >= 0.0 {
                Ok(Some(v))
            } else {
                Err(at.invalid(format!("{v} is negative; it must be >= 0")))
            }
        }
    }
}

fn requests(v: Option<f64>, at: At<'_>) -> Result<Option<f64>, ConvertError> {
    in_range(v, 0.0..=MAX_REQUESTS, "requests", at)
}

fn name(s: String, what: &'static str, at: At<'_>) -> Result<String, ConvertError> {
    if s.is_empty() {
        return Err(at.missing(what));
    }
    if s.len() > MAX_NAME_BYTES {
        return Err(at.invalid(format!(
            "{} bytes is longer than the {MAX_NAME_BYTES} allowed",
            s.len()
        )));
    }
    Ok(s)
}

fn optional_name(s: String, at: At<'_>) -> Result<String, ConvertError> {
    if s.len() > MAX_NAME_BYTES {
        return Err(at.invalid(format!(
            "{} bytes is longer than the {MAX_NAME_BYTES} allowed",
            s.len()
        )));
    }
    Ok(s)
}

/// The index of the first item whose key equals an earlier item's key,
/// without copying keys (a quadratic scan for the usual handful of items).
fn first_duplicate<T, K: Eq + std::hash::Hash>(
    items: &[T],
    key: impl Fn(&T) -> &K,
) -> Option<usize> {
    if items.len() <= 32 {
        (1..items.len()).find(|&i| {
            items[..i]
                .iter()
                .any(|earlier| key(earlier) == key(&items[i]))
        })
    } else {
        let mut seen = HashSet::with_capacity(items.len());
        items.iter().position(|t| !seen.insert(key(t)))
    }
}

fn at_most<T>(items: &[T], max: usize, at: At<'_>) -> Result<(), ConvertError> {
    if items.len() > max {
        Err(at.invalid(format!(
            "{} items is more than the {max} allowed",
            items.len()
        )))
    } else {
        Ok(())
    }
}

fn timestamp(ms: i64, at: At<'_>) -> Result<Timestamp, ConvertError> {
    if ms < 0 {
        Err(at.invalid(format!("{ms} is before 1970; it must be >= 0")))
    } else {
        Ok(Timestamp::from_millis(ms))
    }
}

fn uuid(s: String, at: At<'_>) -> Result<GpuUuid, ConvertError> {
    name(s, "a GPU UUID", at).map(GpuUuid)
}

fn check_memory(metrics: &GpuMetrics, total: u64, at: At<'_>) -> Result<(), ConvertError> {
    if let Some(used) = metrics.memory_used_bytes
        && used > total
    {
        return Err(at.field("memory_used_bytes").invalid(format!(
            "{used} is more than the GPU's memory_total_bytes {total}"
        )));
    }
    if let Some(free) = metrics.memory_free_bytes
        && free > total
    {
        return Err(at.field("memory_free_bytes").invalid(format!(
            "{free} is more than the GPU's memory_total_bytes {total}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Wire → domain.

impl TryFrom<v1::NodeReport> for AgentReport {
    type Error = ConvertError;

    fn try_from(w: v1::NodeReport) -> Result<Self, ConvertError> {
        report(w, &mut Engines::Strict)
    }
}

/// An engine entry left out of a report by [`AgentReport::from_wire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedEngine {
    /// The engine's pod, when it could be read.
    pub pod: Option<PodRef>,
    /// Why, naming the field.
    pub error: ConvertError,
}

impl AgentReport {
    /// Converts a report, leaving out every engine entry that does not
    /// convert (a value out of range, a name too long, a pod listed twice)
    /// instead of rejecting the node: one bad engine never takes the node's
    /// GPUs and healthy engines with it. Everything else is as strict as
    /// `TryFrom`.
    pub fn from_wire(
        w: v1::NodeReport,
    ) -> Result<(AgentReport, Vec<RejectedEngine>), ConvertError> {
        let mut rejected = Vec::new();
        let report = report(w, &mut Engines::Lenient(&mut rejected))?;
        Ok((report, rejected))
    }
}

/// What to do with an engine entry that does not convert.
enum Engines<'a> {
    /// Reject the whole message.
    Strict,
    /// Leave the entry out and record it.
    Lenient(&'a mut Vec<RejectedEngine>),
}

fn report(w: v1::NodeReport, engines: &mut Engines<'_>) -> Result<AgentReport, ConvertError> {
    let root = At::root("report");
    if w.boot_epoch == 0 {
        return Err(root
            .field("boot_epoch")
            .invalid("0 is not a boot epoch; it must be non-zero"));
    }
    if w.seq == 0 {
        return Err(root
            .field("seq")
            .invalid("0 is not a sequence number; sequences start at 1"));
    }
    let sent_at = timestamp(w.sent_at_unix_ms, root.field("sent_at_unix_ms"))?;
    let body = match w.body {
        None => return Err(root.field("body").missing("a snapshot or a delta")),
        Some(v1::node_report::Body::Snapshot(s)) => {
            ReportBody::Snapshot(snapshot(s, At::root("snapshot"), engines)?)
        }
        Some(v1::node_report::Body::Delta(d)) => {
            ReportBody::Delta(delta(d, At::root("delta"), engines)?)
        }
    };
    Ok(AgentReport {
        boot_epoch: w.boot_epoch,
        seq: w.seq,
        sent_at,
        body,
    })
}

impl TryFrom<v1::NodeSnapshot> for NodeSnapshot {
    type Error = ConvertError;
    fn try_from(w: v1::NodeSnapshot) -> Result<Self, ConvertError> {
        snapshot(w, At::root("snapshot"), &mut Engines::Strict)
    }
}

impl TryFrom<v1::NodeDelta> for NodeDelta {
    type Error = ConvertError;
    fn try_from(w: v1::NodeDelta) -> Result<Self, ConvertError> {
        delta(w, At::root("delta"), &mut Engines::Strict)
    }
}

impl TryFrom<v1::EngineSample> for EngineSample {
    type Error = ConvertError;
    fn try_from(w: v1::EngineSample) -> Result<Self, ConvertError> {
        engine(w, At::root("engine"))
    }
}

impl TryFrom<v1::Histogram> for Histogram {
    type Error = ConvertError;
    fn try_from(w: v1::Histogram) -> Result<Self, ConvertError> {
        histogram(w, At::root("histogram"))
    }
}

impl TryFrom<v1::PodRef> for PodRef {
    type Error = ConvertError;
    fn try_from(w: v1::PodRef) -> Result<Self, ConvertError> {
        pod_ref(w, At::root("pod"))
    }
}

impl TryFrom<v1::WorkloadRef> for WorkloadRef {
    type Error = ConvertError;
    fn try_from(w: v1::WorkloadRef) -> Result<Self, ConvertError> {
        let at = At::root("workload");
        Ok(WorkloadRef {
            namespace: name(w.namespace, "a namespace", at.field("namespace"))?,
            name: name(w.name, "a workload name", at.field("name"))?,
        })
    }
}

impl TryFrom<v1::ScalerDirective> for Directive {
    type Error = ConvertError;
    fn try_from(w: v1::ScalerDirective) -> Result<Self, ConvertError> {
        use v1::scaler_directive::Body;
        let at = At::root("directive");
        let pod = |p: Option<v1::PodRef>, at: At<'_>| -> Result<PodRef, ConvertError> {
            let at = at.field("pod");
            pod_ref(p.ok_or_else(|| at.missing("a pod"))?, at)
        };
        match w.body {
            None => Err(at.field("body").missing("a directive")),
            Some(Body::Ack(a)) => Ok(Directive::Ack { seq: a.seq }),
            Some(Body::SetSampleInterval(s)) => {
                if SAMPLE_INTERVAL_RANGE_MS.contains(&s.interval_ms) {
                    Ok(Directive::SetSampleInterval {
                        interval: Duration::from_millis(u64::from(s.interval_ms)),
                    })
                } else {
                    Err(at
                        .field("set_sample_interval")
                        .field("interval_ms")
                        .invalid(format!(
                            "{} ms is outside {}..={} ms",
                            s.interval_ms,
                            SAMPLE_INTERVAL_RANGE_MS.start(),
                            SAMPLE_INTERVAL_RANGE_MS.end()
                        )))
                }
            }
            Some(Body::DrainPod(d)) => Ok(Directive::DrainPod {
                pod: pod(d.pod, at.field("drain_pod"))?,
                reason: d.reason,
            }),
            Some(Body::UndrainPod(u)) => Ok(Directive::UndrainPod {
                pod: pod(u.pod, at.field("undrain_pod"))?,
            }),
            Some(Body::SetBatchLimit(s)) => {
                let at = at.field("set_batch_limit");
                if s.batch_limit == 0 {
                    return Err(at
                        .field("batch_limit")
                        .invalid("0 would stop the engine; it must be >= 1"));
                }
                Ok(Directive::SetBatchLimit {
                    pod: pod(s.pod, at)?,
                    batch_limit: s.batch_limit,
                })
            }
        }
    }
}

fn snapshot(
    w: v1::NodeSnapshot,
    at: At<'_>,
    engines: &mut Engines<'_>,
) -> Result<NodeSnapshot, ConvertError> {
    at_most(&w.gpus, MAX_GPUS_PER_NODE, at.field("gpus"))?;
    at_most(&w.pods, MAX_PODS_PER_NODE, at.field("pods"))?;
    at_most(&w.engines, MAX_PODS_PER_NODE, at.field("engines"))?;
    let node = NodeName(name(w.node_name, "a node name", at.field("node_name"))?);
    let agent_version = optional_name(w.agent_version, at.field("agent_version"))?;
    let sampled_at = timestamp(w.sampled_at_unix_ms, at.field("sampled_at_unix_ms"))?;

    let gpus_at = at.field("gpus");
    let mut gpus = Vec::with_capacity(w.gpus.len());
    for (i, g) in w.gpus.into_iter().enumerate() {
        let at = gpus_at.index(i);
        let info_at = at.field("info");
        let info = gpu_info(
            g.info
                .ok_or_else(|| info_at.missing("the GPU's description"))?,
            info_at,
        )?;
        let metrics_at = at.field("metrics");
        let metrics = match g.metrics {
            Some(m) => gpu_metrics(m, metrics_at)?,
            None => GpuMetrics {
                uuid: info.uuid.clone(),
                ..GpuMetrics::default()
            },
        };
        if metrics.uuid != info.uuid {
            return Err(metrics_at.field("uuid").invalid(format!(
                "{:?} differs from the GPU's uuid {:?}",
                metrics.uuid.as_str(),
                info.uuid.as_str()
            )));
        }
        check_memory(&metrics, info.memory_total_bytes, metrics_at)?;
        gpus.push(GpuSample { info, metrics });
    }
    if let Some(i) = first_duplicate(&gpus, |g| &g.info.uuid) {
        return Err(gpus_at
            .index(i)
            .field("info")
            .field("uuid")
            .invalid(format!("{:?} appears twice", gpus[i].info.uuid.as_str())));
    }

    let pods = pod_list(w.pods, at.field("pods"))?;
    let engines = engine_list(w.engines, at.field("engines"), engines)?;
    let agent = w.agent.map(agent_health).unwrap_or_default();
    Ok(NodeSnapshot {
        node,
        agent_version,
        sampled_at,
        sample_interval_ms: w.sample_interval_ms,
        gpus,
        pods,
        engines,
        agent,
    })
}

fn delta(
    w: v1::NodeDelta,
    at: At<'_>,
    engines: &mut Engines<'_>,
) -> Result<NodeDelta, ConvertError> {
    at_most(
        &w.gpus_upserted,
        MAX_GPUS_PER_NODE,
        at.field("gpus_upserted"),
    )?;
    at_most(&w.gpus_removed, MAX_GPUS_PER_NODE, at.field("gpus_removed"))?;
    at_most(&w.gpu_metrics, MAX_GPUS_PER_NODE, at.field("gpu_metrics"))?;
    at_most(
        &w.pods_upserted,
        MAX_PODS_PER_NODE,
        at.field("pods_upserted"),
    )?;
    at_most(&w.pods_removed, MAX_PODS_PER_NODE, at.field("pods_removed"))?;
    at_most(
        &w.engines_upserted,
        MAX_PODS_PER_NODE,
        at.field("engines_upserted"),
    )?;
    at_most(
        &w.engines_removed,
        MAX_PODS_PER_NODE,
        at.field("engines_removed"),
    )?;
    let sampled_at = timestamp(w.sampled_at_unix_ms, at.field("sampled_at_unix_ms"))?;

    let up_at = at.field("gpus_upserted");
    let mut gpus_upserted = Vec::with_capacity(w.gpus_upserted.len());
    for (i, g) in w.gpus_upserted.into_iter().enumerate() {
        gpus_upserted.push(gpu_info(g, up_at.index(i))?);
    }
    if let Some(i) = first_duplicate(&gpus_upserted, |g| &g.uuid) {
        return Err(up_at.index(i).field("uuid").invalid(format!(
            "{:?} appears twice",
            gpus_upserted[i].uuid.as_str()
        )));
    }
    let rm_at = at.field("gpus_removed");
    let gpus_removed = w
        .gpus_removed
        .into_iter()
        .enumerate()
        .map(|(i, u)| uuid(u, rm_at.index(i)))
        .collect::<Result<Vec<_>, _>>()?;

    let m_at = at.field("gpu_metrics");
    let mut gpu_metrics_out = Vec::with_capacity(w.gpu_metrics.len());
    for (i, m) in w.gpu_metrics.into_iter().enumerate() {
        let at = m_at.index(i);
        let metrics = gpu_metrics(m, at)?;
        if let Some(info) = gpus_upserted.iter().find(|g| g.uuid == metrics.uuid) {
            check_memory(&metrics, info.memory_total_bytes, at)?;
        }
        gpu_metrics_out.push(metrics);
    }
    if let Some(i) = first_duplicate(&gpu_metrics_out, |m| &m.uuid) {
        return Err(m_at.index(i).field("uuid").invalid(format!(
            "{:?} appears twice",
            gpu_metrics_out[i].uuid.as_str()
        )));
    }

    let pods_upserted = pod_list(w.pods_upserted, at.field("pods_upserted"))?;
    let prm_at = at.field("pods_removed");
    let pods_removed = w
        .pods_removed
        .into_iter()
        .enumerate()
        .map(|(i, p)| pod_ref(p, prm_at.index(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let engines_upserted = engine_list(w.engines_upserted, at.field("engines_upserted"), engines)?;
    let erm_at = at.field("engines_removed");
    let engines_removed = w
        .engines_removed
        .into_iter()
        .enumerate()
        .map(|(i, p)| pod_ref(p, erm_at.index(i)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NodeDelta {
        sampled_at,
        gpus_upserted,
        gpus_removed,
        gpu_metrics: gpu_metrics_out,
        pods_upserted,
        pods_removed,
        engines_upserted,
        engines_removed,
        agent: w.agent.map(agent_health),
    })
}

fn gpu_info(w: v1::GpuInfo, at: At<'_>) -> Result<GpuInfo, ConvertError> {
    let parent_uuid = if w.parent_uuid.is_empty() {
        None
    } else {
        Some(uuid(w.parent_uuid, at.field("parent_uuid"))?)
    };
    Ok(GpuInfo {
        uuid: uuid(w.uuid, at.field("uuid"))?,
        index: w.index,
        model_name: optional_name(w.model_name, at.field("model_name"))?,
        memory_total_bytes: w.memory_total_bytes,
        pci_bus_id: optional_name(w.pci_bus_id, at.field("pci_bus_id"))?,
        parent_uuid,
        mig_gpu_instance_id: w.mig_gpu_instance_id,
        gpm_supported: w.gpm_supported,
        driver_version: optional_name(w.driver_version, at.field("driver_version"))?,
    })
}

fn gpu_metrics(w: v1::GpuMetrics, at: At<'_>) -> Result<GpuMetrics, ConvertError> {
    if let (Some(used), Some(free)) = (w.memory_used_bytes, w.memory_free_bytes)
        && used.checked_add(free).is_none()
    {
        return Err(at
            .field("memory_free_bytes")
            .invalid(format!("{free} plus memory_used_bytes {used} overflows")));
    }
    let power_limit_watts = in_range(
        w.power_limit_watts,
        0.0..=MAX_POWER_WATTS,
        "W",
        at.field("power_limit_watts"),
    )?;
    let power_watts = in_range(
        w.power_watts,
        0.0..=MAX_POWER_WATTS,
        "W",
        at.field("power_watts"),
    )?;
    if let Some(clock) = w.sm_clock_mhz
        && clock > MAX_SM_CLOCK_MHZ
    {
        return Err(at
            .field("sm_clock_mhz")
            .invalid(format!("{clock} is outside 0..={MAX_SM_CLOCK_MHZ} MHz")));
    }
    let gpm = match w.gpm {
        None => None,
        Some(g) => {
            let at = at.field("gpm");
            Some(GpmMetrics {
                sm_util_ratio: ratio(g.sm_util_ratio, at.field("sm_util_ratio"))?,
                sm_occupancy_ratio: ratio(g.sm_occupancy_ratio, at.field("sm_occupancy_ratio"))?,
                tensor_active_ratio: ratio(g.tensor_active_ratio, at.field("tensor_active_ratio"))?,
                dram_bw_util_ratio: ratio(g.dram_bw_util_ratio, at.field("dram_bw_util_ratio"))?,
            })
        }
    };
    let health = match w.health {
        None => GpuHealth::Unknown,
        Some(h) => {
            let health_at = at.field("health");
            let at = health_at.field("state");
            match v1::gpu_health::State::try_from(h.state) {
                Ok(v1::gpu_health::State::Unspecified) => GpuHealth::Unknown,
                Ok(v1::gpu_health::State::Healthy) => GpuHealth::Healthy,
                Ok(v1::gpu_health::State::Unhealthy) => GpuHealth::Unhealthy { reason: h.reason },
                Err(_) => {
                    return Err(at.invalid(format!("{} is not a GpuHealth.State", h.state)));
                }
            }
        }
    };
    at_most(&w.xid_totals, MAX_XID_CODES, at.field("xid_totals"))?;
    let mut xid_totals = BTreeMap::new();
    let xids_at = at.field("xid_totals");
    for (i, x) in w.xid_totals.iter().enumerate() {
        let at = xids_at.index(i);
        let last_at = timestamp(x.last_at_unix_ms, at.field("last_at_unix_ms"))?;
        if xid_totals
            .insert(
                x.xid,
                XidCount {
                    total: x.total,
                    last_at,
                },
            )
            .is_some()
        {
            return Err(at
                .field("xid")
                .invalid(format!("Xid {} appears twice", x.xid)));
        }
    }
    Ok(GpuMetrics {
        uuid: uuid(w.uuid, at.field("uuid"))?,
        memory_used_bytes: w.memory_used_bytes,
        memory_free_bytes: w.memory_free_bytes,
        utilization_gpu_ratio: ratio(w.utilization_gpu_ratio, at.field("utilization_gpu_ratio"))?,
        utilization_memory_ratio: ratio(
            w.utilization_memory_ratio,
            at.field("utilization_memory_ratio"),
        )?,
        power_watts,
        power_limit_watts,
        temperature_celsius: in_range(
            w.temperature_celsius,
            TEMPERATURE_RANGE_CELSIUS,
            "°C",
            at.field("temperature_celsius"),
        )?,
        sm_clock_mhz: w.sm_clock_mhz,
        throttle_reasons: w.throttle_reasons,
        ecc_uncorrected_total: w.ecc_uncorrected_total,
        energy_joules_total: non_negative(w.energy_joules_total, at.field("energy_joules_total"))?,
        gpm,
        health,
        xid_totals,
    })
}

fn pod_ref(w: v1::PodRef, at: At<'_>) -> Result<PodRef, ConvertError> {
    Ok(PodRef {
        namespace: name(w.namespace, "a namespace", at.field("namespace"))?,
        name: name(w.name, "a pod name", at.field("name"))?,
    })
}

fn pod_list(w: Vec<v1::PodGpus>, at: At<'_>) -> Result<Vec<PodGpus>, ConvertError> {
    let mut out = Vec::with_capacity(w.len());
    for (i, p) in w.into_iter().enumerate() {
        let at = at.index(i);
        let pod_at = at.field("pod");
        let pod = pod_ref(p.pod.ok_or_else(|| pod_at.missing("a pod"))?, pod_at)?;
        at_most(
            &p.containers,
            MAX_CONTAINERS_PER_POD,
            at.field("containers"),
        )?;
        let c_at = at.field("containers");
        let mut containers = Vec::with_capacity(p.containers.len());
        for (j, c) in p.containers.into_iter().enumerate() {
            let at = c_at.index(j);
            at_most(&c.gpu_uuids, MAX_GPUS_PER_NODE, at.field("gpu_uuids"))?;
            let u_at = at.field("gpu_uuids");
            containers.push(ContainerGpus {
                container: optional_name(c.container, at.field("container"))?,
                resource_name: optional_name(c.resource_name, at.field("resource_name"))?,
                gpu_uuids: c
                    .gpu_uuids
                    .into_iter()
                    .enumerate()
                    .map(|(k, u)| uuid(u, u_at.index(k)))
                    .collect::<Result<_, _>>()?,
            });
        }
        out.push(PodGpus { pod, containers });
    }
    if let Some(i) = first_duplicate(&out, |p| &p.pod) {
        return Err(at
            .index(i)
            .field("pod")
            .invalid(format!("{} appears twice", out[i].pod)));
    }
    Ok(out)
}

fn engine_list(
    w: Vec<v1::EngineSample>,
    at: At<'_>,
    mode: &mut Engines<'_>,
) -> Result<Vec<EngineSample>, ConvertError> {
    let mut out: Vec<EngineSample> = Vec::with_capacity(w.len());
    for (i, e) in w.into_iter().enumerate() {
        let at = at.index(i);
        // The pod, for naming a rejected entry.
        let pod = e.pod.clone().and_then(|p| pod_ref(p, at.field("pod")).ok());
        let converted = engine(e, at).and_then(|e| {
            if out.iter().any(|o| o.pod == e.pod) {
                Err(at.field("pod").invalid(format!("{} appears twice", e.pod)))
            } else {
                Ok(e)
            }
        });
        match (converted, &mut *mode) {
            (Ok(e), _) => out.push(e),
            (Err(error), Engines::Strict) => return Err(error),
            (Err(error), Engines::Lenient(rejected)) => {
                rejected.push(RejectedEngine { pod, error })
            }
        }
    }
    Ok(out)
}

fn engine(w: v1::EngineSample, at: At<'_>) -> Result<EngineSample, ConvertError> {
    let pod_at = at.field("pod");
    let pod = pod_ref(w.pod.ok_or_else(|| pod_at.missing("a pod"))?, pod_at)?;
    let framework = match v1::Framework::try_from(w.framework) {
        Ok(v1::Framework::Vllm) => Framework::Vllm,
        Ok(v1::Framework::Sglang) => Framework::Sglang,
        Ok(v1::Framework::Tgi) => Framework::Tgi,
        Ok(v1::Framework::TritonTrtllm) => Framework::TritonTrtllm,
        Ok(v1::Framework::TrtllmServe) => Framework::TrtllmServe,
        Ok(v1::Framework::LlamaCpp) => Framework::LlamaCpp,
        Ok(v1::Framework::Push) => Framework::Push,
        Ok(v1::Framework::Fake) => Framework::Fake,
        Ok(v1::Framework::Unspecified) => {
            return Err(at
                .field("framework")
                .invalid("FRAMEWORK_UNSPECIFIED; an engine must name its framework"));
        }
        Err(_) => {
            return Err(at
                .field("framework")
                .invalid(format!("{} is not a Framework", w.framework)));
        }
    };
    let state = match v1::EngineState::try_from(w.state) {
        Ok(v1::EngineState::Unspecified) => EngineState::Unknown,
        Ok(v1::EngineState::Loading) => EngineState::Loading,
        Ok(v1::EngineState::Warm) => EngineState::Warm,
        Ok(v1::EngineState::Draining) => EngineState::Draining,
        Ok(v1::EngineState::Failed) => EngineState::Failed,
        Ok(v1::EngineState::NoData) => EngineState::NoData,
        Err(_) => {
            return Err(at
                .field("state")
                .invalid(format!("{} is not an EngineState", w.state)));
        }
    };
    at_most(&w.gpu_uuids, MAX_GPUS_PER_NODE, at.field("gpu_uuids"))?;
    let u_at = at.field("gpu_uuids");
    let gpu_uuids = w
        .gpu_uuids
        .into_iter()
        .enumerate()
        .map(|(k, u)| uuid(u, u_at.index(k)))
        .collect::<Result<_, _>>()?;
    let ttft_seconds = w
        .ttft_seconds
        .map(|h| histogram(h, at.field("ttft_seconds")))
        .transpose()?;
    let itl_seconds = w
        .itl_seconds
        .map(|h| histogram(h, at.field("itl_seconds")))
        .transpose()?;
    let tpot_seconds = w
        .tpot_seconds
        .map(|h| histogram(h, at.field("tpot_seconds")))
        .transpose()?;
    Ok(EngineSample {
        pod,
        container: optional_name(w.container, at.field("container"))?,
        framework,
        model: optional_name(w.model, at.field("model"))?,
        state,
        sampled_at: timestamp(w.sampled_at_unix_ms, at.field("sampled_at_unix_ms"))?,
        gpu_uuids,
        requests_waiting: requests(w.requests_waiting, at.field("requests_waiting"))?,
        requests_running: requests(w.requests_running, at.field("requests_running"))?,
        kv_cache_usage_ratio: ratio(w.kv_cache_usage_ratio, at.field("kv_cache_usage_ratio"))?,
        kv_capacity_tokens: non_negative(w.kv_capacity_tokens, at.field("kv_capacity_tokens"))?,
        queued_prompt_tokens: non_negative(
            w.queued_prompt_tokens,
            at.field("queued_prompt_tokens"),
        )?,
        prompt_tokens_total: non_negative(w.prompt_tokens_total, at.field("prompt_tokens_total"))?,
        generation_tokens_total: non_negative(
            w.generation_tokens_total,
            at.field("generation_tokens_total"),
        )?,
        requests_arrived_total: non_negative(
            w.requests_arrived_total,
            at.field("requests_arrived_total"),
        )?,
        requests_finished_total: non_negative(
            w.requests_finished_total,
            at.field("requests_finished_total"),
        )?,
        preemptions_total: non_negative(w.preemptions_total, at.field("preemptions_total"))?,
        ttft_seconds,
        itl_seconds,
        tpot_seconds,
        batch_limit: w.batch_limit,
        counter_resets_total: w.counter_resets_total,
        mean_context_tokens: non_negative(w.mean_context_tokens, at.field("mean_context_tokens"))?,
    })
}

fn histogram(w: v1::Histogram, at: At<'_>) -> Result<Histogram, ConvertError> {
    at_most(
        &w.upper_bounds,
        MAX_HISTOGRAM_BUCKETS,
        at.field("upper_bounds"),
    )?;
    Histogram::from_parts(w.upper_bounds, w.cumulative_counts, w.sum, w.count)
        .map_err(|e| at.invalid(e.to_string()))
}

fn agent_health(w: v1::AgentHealth) -> AgentHealth {
    AgentHealth {
        samples_total: w.samples_total,
        sample_errors_total: w.sample_errors_total,
        reconnects_total: w.reconnects_total,
        coalesced_total: w.coalesced_total,
        nvml_available: w.nvml_available,
        pod_resources_available: w.pod_resources_available,
    }
}

// ---------------------------------------------------------------------------
// Domain → wire.

impl From<&AgentReport> for v1::NodeReport {
    fn from(r: &AgentReport) -> Self {
        v1::NodeReport {
            boot_epoch: r.boot_epoch,
            seq: r.seq,
            sent_at_unix_ms: r.sent_at.as_millis(),
            body: Some(match &r.body {
                ReportBody::Snapshot(s) => v1::node_report::Body::Snapshot(s.into()),
                ReportBody::Delta(d) => v1::node_report::Body::Delta(d.into()),
            }),
        }
    }
}

impl From<&NodeSnapshot> for v1::NodeSnapshot {
    fn from(s: &NodeSnapshot) -> Self {
        v1::NodeSnapshot {
            node_name: s.node.0.clone(),
            agent_version: s.agent_version.clone(),
            sampled_at_unix_ms: s.sampled_at.as_millis(),
            sample_interval_ms: s.sample_interval_ms,
            gpus: s
                .gpus
                .iter()
                .map(|g| v1::Gpu {
                    info: Some((&g.info).into()),
                    metrics: Some((&g.metrics).into()),
                })
                .collect(),
            pods: s.pods.iter().map(Into::into).collect(),
            engines: s.engines.iter().map(Into::into).collect(),
            agent: Some((&s.agent).into()),
        }
    }
}

impl From<&NodeDelta> for v1::NodeDelta {
    fn from(d: &NodeDelta) -> Self {
        v1::NodeDelta {
            sampled_at_unix_ms: d.sampled_at.as_millis(),
            gpus_upserted: d.gpus_upserted.iter().map(Into::into).collect(),
            gpus_removed: d.gpus_removed.iter().map(|u| u.0.clone()).collect(),
            gpu_metrics: d.gpu_metrics.iter().map(Into::into).collect(),
            pods_upserted: d.pods_upserted.iter().map(Into::into).collect(),
            pods_removed: d.pods_removed.iter().map(Into::into).collect(),
            engines_upserted: d.engines_upserted.iter().map(Into::into).collect(),
            engines_removed: d.engines_removed.iter().map(Into::into).collect(),
            agent: d.agent.as_ref().map(Into::into),
        }
    }
}

impl From<&GpuInfo> for v1::GpuInfo {
    fn from(g: &GpuInfo) -> Self {
        v1::GpuInfo {
            uuid: g.uuid.0.clone(),
            index: g.index,
            model_name: g.model_name.clone(),
            memory_total_bytes: g.memory_total_bytes,
            pci_bus_id: g.pci_bus_id.clone(),
            parent_uuid: g
                .parent_uuid
                .as_ref()
                .map(|u| u.0.clone())
                .unwrap_or_default(),
            mig_gpu_instance_id: g.mig_gpu_instance_id,
            gpm_supported: g.gpm_supported,
            driver_version: g.driver_version.clone(),
        }
    }
}

impl From<&GpuMetrics> for v1::GpuMetrics {
    fn from(m: &GpuMetrics) -> Self {
        let (state, reason) = match &m.health {
            GpuHealth::Unknown => (v1::gpu_health::State::Unspecified, String::new()),
            GpuHealth::Healthy => (v1::gpu_health::State::Healthy, String::new()),
            GpuHealth::Unhealthy { reason } => (v1::gpu_health::State::Unhealthy, reason.clone()),
        };
        v1::GpuMetrics {
            uuid: m.uuid.0.clone(),
            memory_used_bytes: m.memory_used_bytes,
            memory_free_bytes: m.memory_free_bytes,
            utilization_gpu_ratio: m.utilization_gpu_ratio,
            utilization_memory_ratio: m.utilization_memory_ratio,
            power_watts: m.power_watts,
            power_limit_watts: m.power_limit_watts,
            temperature_celsius: m.temperature_celsius,
            sm_clock_mhz: m.sm_clock_mhz,
            throttle_reasons: m.throttle_reasons,
            ecc_uncorrected_total: m.ecc_uncorrected_total,
            energy_joules_total: m.energy_joules_total,
            gpm: m.gpm.map(|g| v1::GpmMetrics {
                sm_util_ratio: g.sm_util_ratio,
                sm_occupancy_ratio: g.sm_occupancy_ratio,
                tensor_active_ratio: g.tensor_active_ratio,
                dram_bw_util_ratio: g.dram_bw_util_ratio,
            }),
            health: Some(v1::GpuHealth {
                state: state as i32,
                reason,
            }),
            xid_totals: m
                .xid_totals
                .iter()
                .map(|(xid, c)| v1::XidCount {
                    xid: *xid,
                    total: c.total,
                    last_at_unix_ms: c.last_at.as_millis(),
                })
                .collect(),
        }
    }
}

impl From<&PodRef> for v1::PodRef {
    fn from(p: &PodRef) -> Self {
        v1::PodRef {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        }
    }
}

impl From<&WorkloadRef> for v1::WorkloadRef {
    fn from(w: &WorkloadRef) -> Self {
        v1::WorkloadRef {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
        }
    }
}

impl From<&PodGpus> for v1::PodGpus {
    fn from(p: &PodGpus) -> Self {
        v1::PodGpus {
            pod: Some((&p.pod).into()),
            containers: p
                .containers
                .iter()
                .map(|c| v1::ContainerGpus {
                    container: c.container.clone(),
                    resource_name: c.resource_name.clone(),
                    gpu_uuids: c.gpu_uuids.iter().map(|u| u.0.clone()).collect(),
                })
                .collect(),
        }
    }
}

impl From<Framework> for v1::Framework {
    fn from(f: Framework) -> Self {
        match f {
            Framework::Vllm => v1::Framework::Vllm,
            Framework::Sglang => v1::Framework::Sglang,
            Framework::Tgi => v1::Framework::Tgi,
            Framework::TritonTrtllm => v1::Framework::TritonTrtllm,
            Framework::TrtllmServe => v1::Framework::TrtllmServe,
            Framework::LlamaCpp => v1::Framework::LlamaCpp,
            Framework::Push => v1::Framework::Push,
            Framework::Fake => v1::Framework::Fake,
        }
    }
}

impl From<EngineState> for v1::EngineState {
    fn from(s: EngineState) -> Self {
        match s {
            EngineState::Unknown => v1::EngineState::Unspecified,
            EngineState::Loading => v1::EngineState::Loading,
            EngineState::Warm => v1::EngineState::Warm,
            EngineState::Draining => v1::EngineState::Draining,
            EngineState::Failed => v1::EngineState::Failed,
            EngineState::NoData => v1::EngineState::NoData,
        }
    }
}

impl From<&Histogram> for v1::Histogram {
    fn from(h: &Histogram) -> Self {
        v1::Histogram {
            upper_bounds: h.bounds().to_vec(),
            cumulative_counts: h.cumulative_counts().to_vec(),
            sum: h.sum(),
            count: h.count(),
        }
    }
}

impl From<&EngineSample> for v1::EngineSample {
    fn from(e: &EngineSample) -> Self {
        v1::EngineSample {
            pod: Some((&e.pod).into()),
            container: e.container.clone(),
            framework: v1::Framework::from(e.framework) as i32,
            model: e.model.clone(),
            state: v1::EngineState::from(e.state) as i32,
            sampled_at_unix_ms: e.sampled_at.as_millis(),
            gpu_uuids: e.gpu_uuids.iter().map(|u| u.0.clone()).collect(),
            requests_waiting: e.requests_waiting,
            requests_running: e.requests_running,
            kv_cache_usage_ratio: e.kv_cache_usage_ratio,
            kv_capacity_tokens: e.kv_capacity_tokens,
            queued_prompt_tokens: e.queued_prompt_tokens,
            prompt_tokens_total: e.prompt_tokens_total,
            generation_tokens_total: e.generation_tokens_total,
            requests_arrived_total: e.requests_arrived_total,
            requests_finished_total: e.requests_finished_total,
            preemptions_total: e.preemptions_total,
            ttft_seconds: e.ttft_seconds.as_ref().map(Into::into),
            itl_seconds: e.itl_seconds.as_ref().map(Into::into),
            tpot_seconds: e.tpot_seconds.as_ref().map(Into::into),
            batch_limit: e.batch_limit,
            counter_resets_total: e.counter_resets_total,
            mean_context_tokens: e.mean_context_tokens,
        }
    }
}

impl From<&AgentHealth> for v1::AgentHealth {
    fn from(a: &AgentHealth) -> Self {
        v1::AgentHealth {
            samples_total: a.samples_total,
            sample_errors_total: a.sample_errors_total,
            reconnects_total: a.reconnects_total,
            coalesced_total: a.coalesced_total,
            nvml_available: a.nvml_available,
            pod_resources_available: a.pod_resources_available,
        }
    }
}

impl From<&Directive> for v1::ScalerDirective {
    fn from(d: &Directive) -> Self {
        use v1::scaler_directive::Body;
        let body = match d {
            Directive::Ack { seq } => Body::Ack(v1::Ack { seq: *seq }),
            Directive::SetSampleInterval { interval } => {
                Body::SetSampleInterval(v1::SetSampleInterval {
                    interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
                })
            }
            Directive::DrainPod { pod, reason } => Body::DrainPod(v1::DrainPod {
                pod: Some(pod.into()),
                reason: reason.clone(),
            }),
            Directive::UndrainPod { pod } => Body::UndrainPod(v1::UndrainPod {
                pod: Some(pod.into()),
            }),
            Directive::SetBatchLimit { pod, batch_limit } => {
                Body::SetBatchLimit(v1::SetBatchLimit {
                    pod: Some(pod.into()),
                    batch_limit: *batch_limit,
                })
            }
        };
        v1::ScalerDirective { body: Some(body) }
    }
}

#[cfg(test)]
mod tests;
