//! GPUs through NVML (`nvml-wrapper` 0.13).
//!
//! [`NvmlSource`] reports every GPU, and every MIG device when MIG mode is on,
//! with the metrics of [`GpuMetrics`]. It never fails the agent: a node
//! without the library runs in a logged no-GPU mode, a metric a GPU does not
//! support is `None` (and is not asked for again), a GPU that fell off the bus
//! is reported unhealthy with the reason.
//!
//! # Two schedules
//!
//! NVML calls cost 1–7 µs each on an H200, except a few that cost
//! milliseconds (`data/profiles/h200_nvml_call_cost.csv`): total energy
//! ~4 ms, `GetFieldValues` ~4 ms, `GetSamples` ~2.4 ms, MIG mode ~150 µs.
//! Every tick runs only the cheap ones (memory, utilization, power and limit,
//! temperature, SM clock, throttle reasons, volatile uncorrected ECC, a
//! non-blocking Xid poll, one GPM sample). The slow ones run on a lower-rate
//! schedule, [`NvmlConfig::slow_interval`] (30 s by default):
//!
//! * total energy, for **one GPU per tick** at most (round-robin), so a tick
//!   never pays more than one ~4 ms call, and each GPU is refreshed at most
//!   once per slow interval; the last value is reported in between;
//! * inventory: device count, MIG mode and MIG devices (and, while unknown,
//!   a MIG device's GPU instance ID), once per slow interval;
//! * `GetSamples` and `GetFieldValues` are not called at all: nothing the
//!   agent reports needs them.
//!
//! # Health
//!
//! A GPU is `Unhealthy` when a call returns `GpuLost` or `ResetRequired`, or
//! after a critical Xid event ([`DEFAULT_CRITICAL_XIDS`]); MIG devices share
//! their parent's health. A lost GPU stays unhealthy until a later inventory
//! finds it working again; a critical Xid stays until the agent restarts
//! (the GPU needs a reset either way).
//!
//! # Lifetimes
//!
//! `nvml_wrapper::Device` borrows the `Nvml` it came from. The source leaks
//! its one `Nvml` (`Box::leak`) to hold `Device<'static>`s, GPM samples and
//! event sets across ticks; a process has one source, so this is one
//! allocation, and `nvmlShutdown` is left to process exit.
//!
//! # Known gaps of the safe API
//!
//! `nvml-wrapper` 0.13 does not wrap `nvmlDeviceGetGpuInstanceId`. A MIG
//! device's GPU instance ID is therefore learnt from its compute processes
//! (`ProcessInfo::gpu_instance_id`), which exist only while something runs on
//! it; until then `GpuInfo::mig_gpu_instance_id` is `None` and per-instance
//! GPM (which needs the ID) is not sampled. The Xid event's GPU instance is
//! not exposed either: Xids are attributed to the full GPU.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_core::ids::GpuUuid;
use gpuscale_core::sample::{GpmMetrics, GpuHealth, GpuInfo, GpuMetrics, GpuSample, XidCount};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, GpmSample, Nvml};
use tracing::{debug, error, info, warn};

use crate::error::TelemetryError;
use crate::source::{GpuSource, SourceError};

/// The library `nvml-wrapper` loads by default on Linux.
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// Xid codes that make a GPU unhealthy.
///
/// From NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors, "Resolution
/// Bucket (Immediate Action)": a GPU reset, node reboot or hardware
/// replacement), the codes the k8s device plugin and dcgm-exporter users
/// alert on:
///
/// | Xid | meaning |
/// |---|---|
/// | 48 | double-bit (uncorrectable) ECC error |
/// | 63 | ECC page retirement / row remapping event |
/// | 64 | ECC page retirement / row remapper recording failure |
/// | 74 | NVLink error |
/// | 79 | GPU has fallen off the bus |
/// | 92 | high single-bit ECC error rate |
/// | 94 | contained ECC error (the affected application must restart) |
/// | 95 | uncontained ECC error (GPU reset required) |
/// | 119, 120 | GSP RPC timeout / GSP error |
/// | 140 | unrecovered ECC error |
///
/// Application-caused Xids (13, 31, 43, 45, 68, 109, ...) are counted but do
/// not change health. Configurable through [`NvmlConfig::critical_xids`].
pub const DEFAULT_CRITICAL_XIDS: &[u64] = &[48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140];

/// At most this many Xid events are drained per GPU per tick.
const MAX_EVENTS_PER_TICK: usize = 32;

/// `NVML_DEVICE_MIG_ENABLE`.
const MIG_ENABLED: u32 = 1;

/// The GPM metrics the source reads.
const GPM_METRICS: [GpmMetricId; 4] = [
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
];

/// How the NVML source loads and samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlConfig {
    /// The NVML library: a file name searched the usual way, or a path
    /// (e.g. `/usr/local/nvidia/lib64/libnvidia-ml.so.1`).
    pub library_path: PathBuf,
    /// Period of the slow calls (energy, inventory, MIG) and of init retries
    /// in no-GPU mode.
    pub slow_interval: Duration,
    /// Read GPM metrics on GPUs that support them.
    pub gpm: bool,
    /// Register for Xid events.
    pub xid_events: bool,
    /// Xid codes that mark a GPU unhealthy.
    pub critical_xids: BTreeSet<u64>,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        Self {
            library_path: PathBuf::from(DEFAULT_NVML_LIBRARY),
            slow_interval: Duration::from_secs(30),
            gpm: true,
            xid_events: true,
            critical_xids: DEFAULT_CRITICAL_XIDS.iter().copied().collect(),
        }
    }
}

impl NvmlConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if self.library_path.as_os_str().is_empty() {
            return Err(TelemetryError::config(
                "nvml.library_path",
                "",
                "a library file name or path",
            ));
        }
        if self.slow_interval < Duration::from_secs(1)
            || self.slow_interval > Duration::from_secs(3600)
        {
            return Err(TelemetryError::config(
                "nvml.slow_interval",
                format!("{:?}", self.slow_interval),
                "between 1 s and 1 h",
            ));
        }
        Ok(())
    }
}

/// Counters of the NVML source, for the agent's own metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmlStats {
    /// NVML call failures by kind (`gpu_lost`, `unknown`, ...). `NotSupported`
    /// is not an error and is not counted.
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// Xid events received, all codes.
    pub xid_events_total: u64,
    /// Slow calls made (energy and inventory).
    pub slow_calls_total: u64,
    /// Attempts to load the library (the first, and retries in no-GPU mode).
    pub init_attempts_total: u64,
}

impl NvmlStats {
    fn count(&mut self, kind: &'static str) {
        *self.errors_by_kind.entry(kind).or_default() += 1;
    }
}

/// A short, bounded class of an NVML error, for metric labels.
pub(crate) fn nvml_error_kind(e: &NvmlError) -> &'static str {
    match e {
        NvmlError::NotSupported => "not_supported",
        NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound => "missing_symbol",
        NvmlError::GpuLost => "gpu_lost",
        NvmlError::ResetRequired => "reset_required",
        NvmlError::NoPermission => "no_permission",
        NvmlError::Timeout => "timeout",
        NvmlError::NotFound => "not_found",
        NvmlError::DriverNotLoaded => "driver_not_loaded",
        NvmlError::Uninitialized => "uninitialized",
        NvmlError::LibloadingError(_) => "library_not_loaded",
        NvmlError::UnexpectedVariant(_) => "unexpected_variant",
        _ => "other",
    }
}

fn is_unsupported(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound
    )
}

fn lost_reason(e: &NvmlError) -> Option<&'static str> {
    match e {
        NvmlError::GpuLost => Some("GPU lost (NVML_ERROR_GPU_IS_LOST): fell off the bus"),
        NvmlError::ResetRequired => Some("GPU requires reset (NVML_ERROR_RESET_REQUIRED)"),
        _ => None,
    }
}

/// One readable thing of a device, remembered as unsupported once NVML says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    Memory,
    Utilization,
    Power,
    PowerLimit,
    Temperature,
    SmClock,
    Throttle,
    Ecc,
    Energy,
    Gpm,
    Events,
}

impl Metric {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
    fn name(self) -> &'static str {
        match self {
            Metric::Memory => "memory",
            Metric::Utilization => "utilization",
            Metric::Power => "power",
            Metric::PowerLimit => "power_limit",
            Metric::Temperature => "temperature",
            Metric::SmClock => "sm_clock",
            Metric::Throttle => "throttle_reasons",
            Metric::Ecc => "ecc",
            Metric::Energy => "energy",
            Metric::Gpm => "gpm",
            Metric::Events => "xid_events",
        }
    }
}

/// Per-device state kept across ticks.
struct DeviceState {
    device: Device<'static>,
    /// For a MIG device: a handle of its parent (GPM per GPU instance is
    /// sampled on the parent).
    parent: Option<Device<'static>>,
    /// The parent's position in the device list, for a MIG device.
    parent_slot: Option<usize>,
    info: GpuInfo,
    unsupported: u16,
    /// Metrics whose last read failed (other than unsupported), so each
    /// failure is logged once per change.
    failing: u16,
    gpm_prev: Option<GpmSample<'static>>,
    events: Option<EventSet<'static>>,
    energy_joules: Option<f64>,
    next_slow_at: Timestamp,
    lost: Option<String>,
    xid_unhealthy: Option<String>,
    xid_totals: BTreeMap<u64, XidCount>,
    /// The metrics of the last tick.
    metrics: GpuMetrics,
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("uuid", &self.info.uuid)
            .field("unsupported", &self.unsupported)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl DeviceState {
    fn new(device: Device<'static>, info: GpuInfo) -> Self {
        Self {
            device,
            parent: None,
            parent_slot: None,
            unsupported: 0,
            failing: 0,
            gpm_prev: None,
            events: None,
            energy_joules: None,
            next_slow_at: Timestamp::EPOCH,
            lost: None,
            xid_unhealthy: None,
            metrics: GpuMetrics {
                uuid: info.uuid.clone(),
                ..GpuMetrics::default()
            },
            xid_totals: BTreeMap::new(),
            info,
        }
    }

    fn supports(&self, m: Metric) -> bool {
        self.unsupported & m.bit() == 0
    }

    /// Reads one metric: `None` when unsupported (remembered), when the GPU
    /// is lost (recorded), or on another error (counted, logged on change).
    fn read<T>(
        &mut self,
        metric: Metric,
        stats: &mut NvmlStats,
        f: impl FnOnce(&Device<'static>) -> Result<T, NvmlError>,
    ) -> Option<T> {
        if !self.supports(metric) || self.lost.is_some() {
            return None;
        }
        match f(&self.device) {
            Ok(v) => {
                if self.failing & metric.bit() != 0 {
                    info!(gpu = %self.info.uuid, metric = metric.name(), "NVML reads again");
                    self.failing &= !metric.bit();
                }
                Some(v)
            }
            Err(e) => {
                self.fail(metric, &e, stats);
                None
            }
        }
    }

    fn fail(&mut self, metric: Metric, e: &NvmlError, stats: &mut NvmlStats) {
        if is_unsupported(e) {
            debug!(gpu = %self.info.uuid, metric = metric.name(), error = %e,
                "not supported by this GPU or driver; not asked again");
            self.unsupported |= metric.bit();
            return;
        }
        stats.count(nvml_error_kind(e));
        if let Some(reason) = lost_reason(e) {
            if self.lost.is_none() {
                error!(gpu = %self.info.uuid, index = self.info.index, metric = metric.name(),
                    reason, "GPU unhealthy");
            }
            self.lost = Some(reason.to_string());
            return;
        }
        if self.failing & metric.bit() == 0 {
            warn!(gpu = %self.info.uuid, metric = metric.name(), error = %e,
                "NVML read failed; reported as missing until it recovers");
            self.failing |= metric.bit();
        }
    }

    fn record_xid(&mut self, xid: u64, now: Timestamp, critical: &BTreeSet<u64>) {
        let entry = self.xid_totals.entry(xid).or_default();
        entry.total += 1;
        entry.last_at = now;
        if critical.contains(&xid) {
            if self.xid_unhealthy.is_none() {
                error!(gpu = %self.info.uuid, index = self.info.index, xid, "critical Xid event: GPU unhealthy");
            }
            self.xid_unhealthy = Some(format!("Xid {xid}"));
        } else {
            warn!(gpu = %self.info.uuid, index = self.info.index, xid, "Xid event");
        }
    }

    fn own_health(&self) -> Option<String> {
        self.lost.clone().or_else(|| self.xid_unhealthy.clone())
    }
}

/// The loaded library and its devices.
struct Backend {
    nvml: &'static Nvml,
    driver_version: String,
    devices: Vec<DeviceState>,
    /// `None` until the first tick tells the time.
    next_inventory_at: Option<Timestamp>,
    /// Round-robin cursor of the per-GPU slow calls.
    slow_cursor: usize,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("driver_version", &self.driver_version)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

/// GPUs of this node through NVML. See the module docs.
#[derive(Debug)]
pub struct NvmlSource {
    config: NvmlConfig,
    backend: Option<Backend>,
    /// Why there is no backend, for logs and `--once` output.
    unavailable_reason: Option<String>,
    /// `None` until the first tick tells the time.
    next_init_at: Option<Timestamp>,
    stats: NvmlStats,
}

impl NvmlSource {
    /// Loads the library and discovers the GPUs. Never fails: without the
    /// library (or the driver) the source runs in no-GPU mode, logs why, and
    /// retries every slow interval.
    pub fn new(config: NvmlConfig) -> Result<Self, TelemetryError> {
        config.validate()?;
        let mut source = Self {
            config,
            backend: None,
            unavailable_reason: None,
            next_init_at: None,
            stats: NvmlStats::default(),
        };
        source.try_init(None);
        Ok(source)
    }

    /// Whether the library is loaded (false in no-GPU mode).
    pub fn nvml_available(&self) -> bool {
        self.backend.is_some()
    }

    /// Why the source runs without GPUs, when it does.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.unavailable_reason.as_deref()
    }

    /// The driver version, when the library is loaded.
    pub fn driver_version(&self) -> Option<&str> {
        self.backend.as_ref().map(|b| b.driver_version.as_str())
    }

    pub fn stats(&self) -> &NvmlStats {
        &self.stats
    }

    /// The current inventory (GPUs, then MIG devices), as of the last sample
    /// or discovery.
    pub fn inventory(&self) -> Vec<GpuInfo> {
        self.backend
            .as_ref()
            .map(|b| b.devices.iter().map(|d| d.info.clone()).collect())
            .unwrap_or_default()
    }

    /// `now` is `None` at construction, before any tick.
    fn try_init(&mut self, now: Option<Timestamp>) {
        let first = now.is_none();
        self.stats.init_attempts_total += 1;
        let path: &OsStr = self.config.library_path.as_os_str();
        match Nvml::builder().lib_path(path).init() {
            Ok(nvml) => {
                let nvml: &'static Nvml = Box::leak(Box::new(nvml));
                let driver_version = nvml.sys_driver_version().unwrap_or_default();
                info!(library = %self.config.library_path.display(), driver_version,
                    "NVML loaded");
                let mut backend = Backend {
                    nvml,
                    driver_version,
                    devices: Vec::new(),
                    next_inventory_at: None,
                    slow_cursor: 0,
                };
                if let Err(e) = backend.discover(&self.config, &mut self.stats, now) {
                    warn!(error = %e, "GPU discovery failed; retried next slow interval");
                }
                self.backend = Some(backend);
                self.unavailable_reason = None;
            }
            Err(e) => {
                let reason = match &e {
                    NvmlError::LibloadingError(_) => format!(
                        "no NVIDIA driver on this node: cannot load {} ({e})",
                        self.config.library_path.display()
                    ),
                    NvmlError::DriverNotLoaded => {
                        "the NVML library loaded but the NVIDIA kernel driver is not running".into()
                    }
                    _ => format!("NVML init failed: {e}"),
                };
                if first || self.unavailable_reason.as_deref() != Some(reason.as_str()) {
                    warn!(reason = %reason, retry_every_s = self.config.slow_interval.as_secs(),
                        "running in no-GPU mode: GPU inventory is empty");
                }
                self.stats.count(nvml_error_kind(&e));
                self.unavailable_reason = Some(reason);
                self.next_init_at = now.map(|t| t + self.config.slow_interval);
            }
        }
    }

    /// One sampling round; the synchronous body of [`GpuSource::sample_gpus`].
    pub fn sample_now(&mut self, now: Timestamp) -> Result<Vec<GpuSample>, SourceError> {
        if self.backend.is_none() {
            match self.next_init_at {
                None => self.next_init_at = Some(now + self.config.slow_interval),
                Some(at) if now >= at => self.try_init(Some(now)),
                Some(_) => {}
            }
            if self.backend.is_none() {
                return Ok(Vec::new());
            }
        }
        let Some(backend) = self.backend.as_mut() else {
            return Ok(Vec::new());
        };
        let due = match backend.next_inventory_at {
            None => {
                backend.next_inventory_at = Some(now + self.config.slow_interval);
                false
            }
            Some(at) => now >= at,
        };
        if due && let Err(e) = backend.discover(&self.config, &mut self.stats, Some(now)) {
            self.stats.count(nvml_error_kind(&e));
            return Err(SourceError::new("nvml", nvml_error_kind(&e), e.to_string()));
        }
        backend.sample(&self.config, &mut self.stats, now);
        Ok(backend.samples())
    }
}

impl GpuSource for NvmlSource {
    fn sample_gpus(
        &mut self,
        now: Timestamp,
    ) -> impl std::future::Future<Output = Result<Vec<GpuSample>, SourceError>> + Send {
        // NVML calls are synchronous and cheap on this path (the slow ones
        // are spread out, see the module docs), so they run inline.
        std::future::ready(self.sample_now(now))
    }
}

impl Backend {
    /// (Re)builds the device list. Existing per-UUID state (unsupported
    /// metrics, GPM sample, event set, Xid counts) carries over; a GPU that
    /// cannot be opened any more keeps its old entry, marked lost.
    fn discover(
        &mut self,
        config: &NvmlConfig,
        stats: &mut NvmlStats,
        now: Option<Timestamp>,
    ) -> Result<(), NvmlError> {
        stats.slow_calls_total += 1;
        self.next_inventory_at = now.map(|t| t + config.slow_interval);
        let count = self.nvml.device_count()?;
        let mut old: BTreeMap<GpuUuid, DeviceState> = self
            .devices
            .drain(..)
            .map(|d| (d.info.uuid.clone(), d))
            .collect();
        let mut old_by_index: BTreeMap<u32, GpuUuid> = old
            .values()
            .filter(|d| d.info.parent_uuid.is_none())
            .map(|d| (d.info.index, d.info.uuid.clone()))
            .collect();
        let mut gpus = Vec::new();
        let mut migs: Vec<DeviceState> = Vec::new();
        for index in 0..count {
            let opened = self
                .nvml
                .device_by_index(index)
                .and_then(|d| d.uuid().map(|u| (d, u)));
            let (device, uuid) = match opened {
                Ok(x) => x,
                Err(e) => {
                    stats.count(nvml_error_kind(&e));
                    match old_by_index.remove(&index).and_then(|u| old.remove(&u)) {
                        Some(mut prev) => {
                            if let Some(reason) = lost_reason(&e) {
                                if prev.lost.is_none() {
                                    error!(gpu = %prev.info.uuid, index, reason, "GPU unhealthy");
                                }
                                prev.lost = Some(reason.to_string());
                            }
                            // Its MIG devices stay listed with it.
                            let slot = gpus.len();
                            let children: Vec<GpuUuid> = old
                                .values()
                                .filter(|d| d.info.parent_uuid.as_ref() == Some(&prev.info.uuid))
                                .map(|d| d.info.uuid.clone())
                                .collect();
                            for c in children {
                                if let Some(mut child) = old.remove(&c) {
                                    child.parent_slot = Some(slot);
                                    migs.push(child);
                                }
                            }
                            gpus.push(prev);
                        }
                        None => error!(index, error = %e,
                            "GPU cannot be opened and was never seen: left out of the inventory"),
                    }
                    continue;
                }
            };
            let uuid = GpuUuid::new(uuid);
            let mut state = match old.remove(&uuid) {
                Some(mut prev) => {
                    if prev.lost.take().is_some() {
                        info!(gpu = %uuid, index, "GPU reads again after being lost");
                    }
                    prev.device = device;
                    prev.info.index = index;
                    prev
                }
                None => {
                    let info = self.describe(&device, &uuid, index);
                    info!(gpu = %uuid, index, model = %info.model_name,
                        memory_bytes = info.memory_total_bytes, gpm = info.gpm_supported, "GPU found");
                    DeviceState::new(device, info)
                }
            };
            if config.xid_events && state.events.is_none() && state.supports(Metric::Events) {
                self.register_events(&mut state, stats);
            }
            let slot = gpus.len();
            // MIG mode: a slow call (~150 µs), only here.
            let mig_on = state.lost.is_none()
                && match state.device.mig_mode() {
                    Ok(m) => m.current == MIG_ENABLED,
                    Err(e) if is_unsupported(&e) => false,
                    Err(e) => {
                        stats.count(nvml_error_kind(&e));
                        false
                    }
                };
            if mig_on {
                for mut mig in self.discover_mig(&state, &mut old, stats) {
                    mig.parent_slot = Some(slot);
                    migs.push(mig);
                }
            }
            gpus.push(state);
        }
        for mig in &migs {
            debug!(mig = %mig.info.uuid, parent = ?mig.info.parent_uuid,
                gpu_instance = ?mig.info.mig_gpu_instance_id, "MIG device");
        }
        for gone in old.values() {
            info!(gpu = %gone.info.uuid, "device no longer present");
        }
        self.devices = gpus;
        self.devices.extend(migs);
        if self.slow_cursor >= self.devices.len() {
            self.slow_cursor = 0;
        }
        Ok(())
    }

    fn describe(&self, device: &Device<'static>, uuid: &GpuUuid, index: u32) -> GpuInfo {
        GpuInfo {
            uuid: uuid.clone(),
            index,
            model_name: device.name().unwrap_or_default(),
            // The type has no "unknown": 0 when NVML cannot say.
            memory_total_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
            pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
            parent_uuid: None,
            mig_gpu_instance_id: None,
            gpm_supported: device.gpm_support().unwrap_or(false),
            driver_version: self.driver_version.clone(),
        }
    }

    fn discover_mig(
        &self,
        parent: &DeviceState,
        old: &mut BTreeMap<GpuUuid, DeviceState>,
        stats: &mut NvmlStats,
    ) -> Vec<DeviceState> {
        let max = match parent.device.mig_device_count() {
            Ok(n) => n,
            Err(e) => {
                stats.count(nvml_error_kind(&e));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for mi in 0..max {
            let mig = match parent.device.mig_device_by_index(mi) {
                Ok(d) => d,
                Err(NvmlError::NotFound) | Err(NvmlError::InvalidArg) => continue, // empty slot
                Err(e) => {
                    stats.count(nvml_error_kind(&e));
                    continue;
                }
            };
            let Ok(uuid) = mig.uuid() else { continue };
            let uuid = GpuUuid::new(uuid);
            let parent_handle = self.nvml.device_by_index(parent.info.index).ok();
            let mut state = match old.remove(&uuid) {
                Some(mut prev) => {
                    prev.device = mig;
                    prev.parent = parent_handle;
                    prev
                }
                None => {
                    let info = GpuInfo {
                        uuid: uuid.clone(),
                        // The parent's index, as dcgm-exporter's `gpu` label.
                        index: parent.info.index,
                        model_name: mig.name().unwrap_or_default(),
                        memory_total_bytes: mig.memory_info().map(|m| m.total).unwrap_or(0),
                        pci_bus_id: parent.info.pci_bus_id.clone(),
                        parent_uuid: Some(parent.info.uuid.clone()),
                        mig_gpu_instance_id: None,
                        gpm_supported: parent.info.gpm_supported,
                        driver_version: self.driver_version.clone(),
                    };
                    let mut s = DeviceState::new(mig, info);
                    s.parent = parent_handle;
                    s
                }
            };
            if state.info.mig_gpu_instance_id.is_none() {
                // See "Known gaps": learnt from a process on the instance.
                if let Ok(procs) = state.device.running_compute_processes() {
                    state.info.mig_gpu_instance_id = procs.iter().find_map(|p| p.gpu_instance_id);
                }
            }
            out.push(state);
        }
        out
    }

    fn register_events(&self, state: &mut DeviceState, stats: &mut NvmlStats) {
        let set = match self.nvml.create_event_set() {
            Ok(s) => s,
            Err(e) => {
                state.fail(Metric::Events, &e, stats);
                return;
            }
        };
        match state
            .device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
        {
            Ok(set) => state.events = Some(set),
            Err(e) => state.fail(Metric::Events, &e.error, stats),
        }
    }

    fn sample(&mut self, config: &NvmlConfig, stats: &mut NvmlStats, now: Timestamp) {
        let nvml = self.nvml;
        // At most one device's slow calls per tick, round-robin.
        let n = self.devices.len();
        let mut slow_slot = None;
        for k in 0..n {
            let i = (self.slow_cursor + k) % n;
            let d = &self.devices[i];
            if now >= d.next_slow_at && d.supports(Metric::Energy) && d.lost.is_none() {
                slow_slot = Some(i);
                self.slow_cursor = (i + 1) % n;
                break;
            }
        }
        for (i, d) in self.devices.iter_mut().enumerate() {
            if Some(i) == slow_slot {
                stats.slow_calls_total += 1;
                d.next_slow_at = now + config.slow_interval;
                d.energy_joules = d
                    .read(Metric::Energy, stats, |dev| dev.total_energy_consumption())
                    .map(|mj| mj as f64 / 1000.0);
            }
            if let Some(set) = d.events.take()
                && poll_events(&set, d, stats, now, &config.critical_xids)
            {
                d.events = Some(set);
            }
            let memory = d.read(Metric::Memory, stats, |dev| dev.memory_info());
            let utilization = d.read(Metric::Utilization, stats, |dev| dev.utilization_rates());
            let power = d.read(Metric::Power, stats, |dev| dev.power_usage());
            let power_limit = d.read(Metric::PowerLimit, stats, |dev| dev.enforced_power_limit());
            let temperature = d.read(Metric::Temperature, stats, |dev| {
                dev.temperature(TemperatureSensor::Gpu)
            });
            let sm_clock = d.read(Metric::SmClock, stats, |dev| dev.clock_info(Clock::SM));
            let throttle = d.read(Metric::Throttle, stats, |dev| {
                dev.current_throttle_reasons().map(|r| r.bits())
            });
            let ecc = d.read(Metric::Ecc, stats, |dev| {
                dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            });
            let gpm = if config.gpm && d.info.gpm_supported {
                sample_gpm(nvml, d, stats)
            } else {
                None
            };
            if let Some(m) = &memory
                && d.info.memory_total_bytes == 0
            {
                d.info.memory_total_bytes = m.total;
            }
            d.metrics = GpuMetrics {
                uuid: d.info.uuid.clone(),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                memory_free_bytes: memory.as_ref().map(|m| m.free),
                utilization_gpu_ratio: utilization.as_ref().map(|u| percent(f64::from(u.gpu))),
                utilization_memory_ratio: utilization
                    .as_ref()
                    .map(|u| percent(f64::from(u.memory))),
                power_watts: power.map(|mw| f64::from(mw) / 1000.0),
                power_limit_watts: power_limit.map(|mw| f64::from(mw) / 1000.0),
                temperature_celsius: temperature.map(f64::from),
                sm_clock_mhz: sm_clock,
                throttle_reasons: throttle,
                ecc_uncorrected_total: ecc,
                energy_joules_total: if d.lost.is_none() {
                    d.energy_joules
                } else {
                    None
                },
                gpm,
                health: GpuHealth::Unknown,
                xid_totals: d.xid_totals.clone(),
            };
        }
    }

    /// Samples with health resolved: a MIG device shares its parent's.
    fn samples(&self) -> Vec<GpuSample> {
        self.devices
            .iter()
            .map(|d| {
                let reason = d.own_health().or_else(|| {
                    d.parent_slot
                        .and_then(|p| self.devices.get(p))
                        .and_then(DeviceState::own_health)
                        .map(|r| format!("parent GPU: {r}"))
                });
                let mut metrics = d.metrics.clone();
                metrics.health = match reason {
                    Some(reason) => GpuHealth::Unhealthy { reason },
                    None => GpuHealth::Healthy,
                };
                GpuSample {
                    info: d.info.clone(),
                    metrics,
                }
            })
            .collect()
    }
}

fn percent(p: f64) -> f64 {
    (p / 100.0).clamp(0.0, 1.0)
}

/// Drains the GPU's pending Xid events without blocking (timeout 0). Returns
/// false when the event set is no longer usable.
fn poll_events(
    set: &EventSet<'static>,
    d: &mut DeviceState,
    stats: &mut NvmlStats,
    now: Timestamp,
    critical: &BTreeSet<u64>,
) -> bool {
    for _ in 0..MAX_EVENTS_PER_TICK {
        match set.wait(0) {
            Ok(event) => {
                if let Some(xid) = event.event_data {
                    let code = match xid {
                        XidError::Value(v) => v,
                        // NVML's 999: an Xid it could not decode.
                        XidError::Unknown => 999,
                    };
                    stats.xid_events_total += 1;
                    d.record_xid(code, now, critical);
                }
            }
            Err(NvmlError::Timeout) => return true,
            Err(e) => {
                d.fail(Metric::Events, &e, stats);
                return !is_unsupported(&e) && lost_reason(&e).is_none();
            }
        }
    }
    true
}

/// Takes this tick's GPM sample and, with the previous one, computes the
/// metrics over the interval between them. The first tick has no previous
/// sample and reports `None`.
fn sample_gpm(
    nvml: &'static Nvml,
    d: &mut DeviceState,
    stats: &mut NvmlStats,
) -> Option<GpmMetrics> {
    if !d.supports(Metric::Gpm) || d.lost.is_some() {
        return None;
    }
    let taken = match (&d.info.parent_uuid, d.info.mig_gpu_instance_id, &d.parent) {
        (None, _, _) => d.device.gpm_sample(),
        (Some(_), Some(gi), Some(parent)) => parent.gpm_mig_sample(gi),
        // A MIG device whose GPU instance ID is not known yet.
        _ => return None,
    };
    let current = match taken {
        Ok(s) => s,
        Err(e) => {
            d.gpm_prev = None;
            d.fail(Metric::Gpm, &e, stats);
            return None;
        }
    };
    let result = match d.gpm_prev.take() {
        None => None,
        Some(prev) => match nvml_wrapper::gpm::gpm_metrics_get(nvml, &prev, &current, &GPM_METRICS)
        {
            Ok(values) => {
                let mut m = GpmMetrics::default();
                for v in values {
                    match v {
                        Ok(r) => {
                            let ratio = Some(percent(r.value));
                            match r.metric_id {
                                GpmMetricId::SmUtil => m.sm_util_ratio = ratio,
                                GpmMetricId::SmOccupancy => m.sm_occupancy_ratio = ratio,
                                GpmMetricId::AnyTensorUtil => m.tensor_active_ratio = ratio,
                                GpmMetricId::DramBwUtil => m.dram_bw_util_ratio = ratio,
                                _ => {}
                            }
                        }
                        // A metric this GPU does not offer stays None.
                        Err(e) if is_unsupported(&e) => {}
                        Err(e) => stats.count(nvml_error_kind(&e)),
                    }
                }
                Some(m)
            }
            Err(e) => {
                d.fail(Metric::Gpm, &e, stats);
                None
            }
        },
    };
    d.gpm_prev = Some(current);
    result
}
