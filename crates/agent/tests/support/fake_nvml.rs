//! The fake `libnvidia-ml.so.1` for tests: the telemetry crate's test
//! support (find or build the cdylib, one copy and configuration file per
//! test), shared rather than copied, plus configurations the agent's tests use.

#[path = "../../../telemetry/tests/support/fake_nvml.rs"]
mod shared;

// Not every test binary uses it (as with the rest of `support`).
#[allow(unused_imports)]
pub use shared::*;

use serde_json::Value;

/// A fake-NVML configuration of `n` H100s (GPM supported), UUIDs
/// `GPU-00000000-0000-0000-0000-00000000000<i>`.
pub fn h100s(n: usize) -> Value {
    let devices: Vec<Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "uuid": format!("GPU-00000000-0000-0000-0000-{i:012x}"),
                "name": "NVIDIA H100 80GB HBM3",
                "pci_bus_id": format!("00000000:{:02X}:00.0", 0x18 + i),
                "metrics": {
                    "memory": {"total": 85_520_809_984u64, "used": 80_000_000_000u64, "free": 5_520_809_984u64},
                    "utilization": {"gpu": 90, "memory": 40},
                    "power_mw": 450_000,
                    "power_limit_mw": 700_000,
                    "temperature_c": 55,
                    "sm_clock_mhz": 1980,
                    "throttle_reasons": 0,
                    "ecc_uncorrected_volatile": 0,
                    "energy_mj": 123_456_789u64
                },
                "gpm": {"sm_util": 52.5, "sm_occupancy": 30.0, "any_tensor_util": 40.0, "dram_bw_util": 49.75}
            })
        })
        .collect();
    serde_json::json!({"driver_version": "580.82.07", "devices": devices})
}
