//! The JSON file that drives the fake library, and the lookups the exported
//! functions make in it. Everything here is safe code.
//!
//! Every metric is either a value or an NVML error name, so one file can say
//! "this GPU reports 350 W" and "this GPU does not support power readings":
//!
//! ```json
//! {
//!   "driver_version": "580.82.07",
//!   "devices": [{
//!     "uuid": "GPU-00000000-0000-0000-0000-000000000001",
//!     "name": "NVIDIA H200",
//!     "metrics": { "power_mw": 350000, "utilization": "NOT_SUPPORTED" },
//!     "xid_events": [79]
//!   }]
//! }
//! ```
//!
//! A metric left out of `metrics` reads as `NOT_SUPPORTED`.

use std::collections::VecDeque;

use nvml_wrapper_sys::bindings as sys;
use serde::{Deserialize, Serialize};

/// An NVML return code, by its name without the `NVML_ERROR_` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    Uninitialized,
    InvalidArgument,
    NotSupported,
    NoPermission,
    NotFound,
    InsufficientSize,
    DriverNotLoaded,
    Timeout,
    FunctionNotFound,
    GpuIsLost,
    ResetRequired,
    NoData,
    Unknown,
}

impl ErrorCode {
    /// The numeric `nvmlReturn_t`.
    pub fn code(self) -> sys::nvmlReturn_t {
        match self {
            ErrorCode::Uninitialized => sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED,
            ErrorCode::InvalidArgument => sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
            ErrorCode::NotSupported => sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
            ErrorCode::NoPermission => sys::nvmlReturn_enum_NVML_ERROR_NO_PERMISSION,
            ErrorCode::NotFound => sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
            ErrorCode::InsufficientSize => sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE,
            ErrorCode::DriverNotLoaded => sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED,
            ErrorCode::Timeout => sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT,
            ErrorCode::FunctionNotFound => sys::nvmlReturn_enum_NVML_ERROR_FUNCTION_NOT_FOUND,
            ErrorCode::GpuIsLost => sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST,
            ErrorCode::ResetRequired => sys::nvmlReturn_enum_NVML_ERROR_RESET_REQUIRED,
            ErrorCode::NoData => sys::nvmlReturn_enum_NVML_ERROR_NO_DATA,
            ErrorCode::Unknown => sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN,
        }
    }
}

/// A configured reading: a value, or the error NVML returns instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reading<T> {
    Error(ErrorCode),
    Value(T),
}

impl<T> Default for Reading<T> {
    fn default() -> Self {
        Reading::Error(ErrorCode::NotSupported)
    }
}

impl<T: Clone> Reading<T> {
    pub fn get(&self) -> Result<T, sys::nvmlReturn_t> {
        match self {
            Reading::Value(v) => Ok(v.clone()),
            Reading::Error(e) => Err(e.code()),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    /// When set, `nvmlInit_v2` fails with this code.
    #[serde(default)]
    pub init_error: Option<ErrorCode>,
    #[serde(default)]
    pub devices: Vec<FakeDevice>,
}

fn default_driver_version() -> String {
    "580.82.07".to_string()
}

/// One full GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeDevice {
    pub uuid: String,
    pub name: String,
    /// Defaults to `00000000:<index + 0x18>:00.0`.
    #[serde(default)]
    pub pci_bus_id: Option<String>,
    /// When set, every call on this GPU (and its MIG devices), including
    /// `nvmlDeviceGetHandleByIndex_v2`, fails with this code; `GPU_IS_LOST`
    /// models a GPU that fell off the bus.
    #[serde(default)]
    pub fail_all: Option<ErrorCode>,
    #[serde(default)]
    pub metrics: FakeMetrics,
    /// Xid codes delivered, one per `nvmlEventSetWait_v2`, to event sets this
    /// GPU is registered with. Queued again whenever the file changes.
    #[serde(default)]
    pub xid_events: Vec<u64>,
    #[serde(default)]
    pub gpm: Reading<FakeGpm>,
    /// MIG mode; `NOT_SUPPORTED` (the default) for GPUs without MIG.
    #[serde(default)]
    pub mig_mode: Reading<FakeMigMode>,
    /// MIG devices, reported when `mig_mode.current` is true.
    #[serde(default)]
    pub mig_devices: Vec<FakeMigDevice>,
    /// PIDs of compute processes on the full GPU.
    #[serde(default)]
    pub processes: Vec<u32>,
}

/// Values of the per-device queries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMetrics {
    #[serde(default)]
    pub memory: Reading<FakeMemory>,
    #[serde(default)]
    pub utilization: Reading<FakeUtilization>,
    #[serde(default)]
    pub power_mw: Reading<u32>,
    #[serde(default)]
    pub power_limit_mw: Reading<u32>,
    #[serde(default)]
    pub temperature_c: Reading<u32>,
    #[serde(default)]
    pub sm_clock_mhz: Reading<u32>,
    #[serde(default)]
    pub throttle_reasons: Reading<u64>,
    #[serde(default)]
    pub ecc_uncorrected_volatile: Reading<u64>,
    #[serde(default)]
    pub energy_mj: Reading<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMemory {
    pub total: u64,
    pub used: u64,
    pub free: u64,
    #[serde(default)]
    pub reserved: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeUtilization {
    pub gpu: u32,
    pub memory: u32,
}

/// GPM support and the metric values `nvmlGpmMetricsGet` returns (percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGpm {
    #[serde(default = "yes")]
    pub supported: bool,
    #[serde(default)]
    pub sm_util: Reading<f64>,
    #[serde(default)]
    pub sm_occupancy: Reading<f64>,
    #[serde(default)]
    pub any_tensor_util: Reading<f64>,
    #[serde(default)]
    pub dram_bw_util: Reading<f64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMigMode {
    pub current: bool,
    #[serde(default)]
    pub pending: bool,
}

/// One MIG device of a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMigDevice {
    pub uuid: String,
    pub name: String,
    pub gpu_instance_id: u32,
    #[serde(default)]
    pub compute_instance_id: u32,
    #[serde(default)]
    pub fail_all: Option<ErrorCode>,
    #[serde(default)]
    pub metrics: FakeMetrics,
    /// GPM of this GPU instance (`nvmlGpmMigSampleGet` on the parent).
    #[serde(default)]
    pub gpm: Reading<FakeGpm>,
    /// PIDs of compute processes on this MIG device; each reports this
    /// device's GPU and compute instance IDs.
    #[serde(default)]
    pub processes: Vec<u32>,
}

/// Which device a handle names: a full GPU or one of its MIG devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRef {
    pub gpu: usize,
    pub mig: Option<usize>,
}

/// Handles are small integers disguised as pointers; nothing dereferences them.
const MIG_BITS: usize = 12;

impl DeviceRef {
    pub fn to_raw(self) -> usize {
        ((self.gpu + 1) << MIG_BITS) | self.mig.map_or(0, |m| m + 1)
    }

    pub fn from_raw(raw: usize) -> Option<DeviceRef> {
        let gpu = (raw >> MIG_BITS).checked_sub(1)?;
        let mig = raw & ((1 << MIG_BITS) - 1);
        Some(DeviceRef {
            gpu,
            mig: mig.checked_sub(1),
        })
    }
}

/// A device as seen through a handle.
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    pub gpu: &'a FakeDevice,
    pub mig: Option<&'a FakeMigDevice>,
    pub gpu_index: usize,
}

impl<'a> DeviceView<'a> {
    /// The error every call on this device fails with, if any. A GPU that
    /// fails takes its MIG devices with it.
    pub fn failure(&self) -> Option<sys::nvmlReturn_t> {
        self.gpu
            .fail_all
            .or(self.mig.and_then(|m| m.fail_all))
            .map(ErrorCode::code)
    }

    pub fn metrics(&self) -> &'a FakeMetrics {
        match self.mig {
            Some(m) => &m.metrics,
            None => &self.gpu.metrics,
        }
    }

    pub fn uuid(&self) -> &'a str {
        match self.mig {
            Some(m) => &m.uuid,
            None => &self.gpu.uuid,
        }
    }

    pub fn name(&self) -> &'a str {
        match self.mig {
            Some(m) => &m.name,
            None => &self.gpu.name,
        }
    }

    pub fn pci_bus_id(&self) -> String {
        self.gpu
            .pci_bus_id
            .clone()
            .unwrap_or_else(|| format!("00000000:{:02X}:00.0", self.gpu_index + 0x18))
    }

    /// `(pid, gpu_instance_id, compute_instance_id)` of compute processes;
    /// `u32::MAX` marks "no instance" as NVML does on a full GPU.
    pub fn processes(&self) -> Vec<(u32, u32, u32)> {
        match self.mig {
            Some(m) => m
                .processes
                .iter()
                .map(|p| (*p, m.gpu_instance_id, m.compute_instance_id))
                .collect(),
            None => self
                .gpu
                .processes
                .iter()
                .map(|p| (*p, u32::MAX, u32::MAX))
                .collect(),
        }
    }

    pub fn mig_enabled(&self) -> bool {
        matches!(
            self.gpu.mig_mode,
            Reading::Value(FakeMigMode { current: true, .. })
        )
    }
}

impl FakeConfig {
    pub fn parse(text: &str) -> Result<FakeConfig, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid fake NVML config: {e}"))
    }

    pub fn view(&self, dev: DeviceRef) -> Option<DeviceView<'_>> {
        let gpu = self.devices.get(dev.gpu)?;
        let mig = match dev.mig {
            Some(m) => {
                if !matches!(
                    gpu.mig_mode,
                    Reading::Value(FakeMigMode { current: true, .. })
                ) {
                    return None;
                }
                Some(gpu.mig_devices.get(m)?)
            }
            None => None,
        };
        Some(DeviceView {
            gpu,
            mig,
            gpu_index: dev.gpu,
        })
    }

    /// The Xid queues, one per GPU, as configured.
    pub fn xid_queues(&self) -> Vec<VecDeque<u64>> {
        self.devices
            .iter()
            .map(|d| d.xid_events.iter().copied().collect())
            .collect()
    }

    /// The device with this UUID (full GPU or MIG device).
    pub fn find_uuid(&self, uuid: &str) -> Option<DeviceRef> {
        self.devices.iter().enumerate().find_map(|(gi, g)| {
            if g.uuid == uuid {
                return Some(DeviceRef { gpu: gi, mig: None });
            }
            g.mig_devices
                .iter()
                .position(|m| m.uuid == uuid)
                .map(|mi| DeviceRef {
                    gpu: gi,
                    mig: Some(mi),
                })
        })
    }
}

/// The GPM value for one NVML metric ID, or the per-metric error.
pub fn gpm_metric(gpm: &FakeGpm, metric_id: u32) -> Result<f64, sys::nvmlReturn_t> {
    match metric_id {
        sys::nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_UTIL => gpm.sm_util.get(),
        sys::nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_OCCUPANCY => gpm.sm_occupancy.get(),
        sys::nvmlGpmMetricId_t_NVML_GPM_METRIC_ANY_TENSOR_UTIL => gpm.any_tensor_util.get(),
        sys::nvmlGpmMetricId_t_NVML_GPM_METRIC_DRAM_BW_UTIL => gpm.dram_bw_util.get(),
        _ => Err(sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_a_value_or_an_error_name() {
        let cfg = FakeConfig::parse(
            r#"{"devices":[{"uuid":"GPU-1","name":"X",
                "metrics":{"power_mw":350000,"utilization":"NOT_SUPPORTED","temperature_c":"GPU_IS_LOST"}}]}"#,
        )
        .unwrap();
        let m = &cfg.devices[0].metrics;
        assert_eq!(m.power_mw.get(), Ok(350_000));
        assert_eq!(
            m.utilization.get(),
            Err(sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED)
        );
        assert_eq!(
            m.temperature_c.get(),
            Err(sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST)
        );
        // Left out: not supported.
        assert_eq!(
            m.energy_mj.get(),
            Err(sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED)
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err =
            FakeConfig::parse(r#"{"devices":[{"uuid":"GPU-1","name":"X","powr":1}]}"#).unwrap_err();
        assert!(err.contains("powr"), "{err}");
    }

    #[test]
    fn handles_round_trip() {
        for d in [
            DeviceRef { gpu: 0, mig: None },
            DeviceRef {
                gpu: 7,
                mig: Some(6),
            },
        ] {
            assert_eq!(DeviceRef::from_raw(d.to_raw()), Some(d));
        }
        assert_eq!(DeviceRef::from_raw(0), None);
    }

    #[test]
    fn mig_devices_are_hidden_while_mig_mode_is_off() {
        let cfg = FakeConfig::parse(
            r#"{"devices":[{"uuid":"GPU-1","name":"X","mig_mode":{"current":false},
                "mig_devices":[{"uuid":"MIG-1","name":"X MIG 1g","gpu_instance_id":3}]}]}"#,
        )
        .unwrap();
        assert!(
            cfg.view(DeviceRef {
                gpu: 0,
                mig: Some(0)
            })
            .is_none()
        );
    }
}
