//! The NVML source through the real `nvml-wrapper` code path, against the
//! project's fake `libnvidia-ml.so.1` (crates/fake-nvml).

#[path = "support/fake_nvml.rs"]
mod fake_nvml;

use std::time::Duration;

use fake_nvml::FakeNvml;
use gpuscale_core::Timestamp;
use gpuscale_core::ids::GpuUuid;
use gpuscale_core::sample::{GpuHealth, GpuSample};
use gpuscale_telemetry::{GpuSource, NvmlConfig, NvmlSource};
use serde_json::{Value, json};

const H200: &str = "GPU-11111111-2222-3333-4444-555555555555";
const A100: &str = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const MIG_A: &str = "MIG-0a0a0a0a-0000-0000-0000-000000000001";
const MIG_B: &str = "MIG-0b0b0b0b-0000-0000-0000-000000000002";

fn full_metrics() -> Value {
    json!({
        "memory": {"total": 150_754_820_096u64, "used": 120_000_000_000u64, "free": 30_754_820_096u64},
        "utilization": {"gpu": 85, "memory": 40},
        "power_mw": 350_500,
        "power_limit_mw": 700_000,
        "temperature_c": 45,
        "sm_clock_mhz": 1980,
        "throttle_reasons": 4,
        "ecc_uncorrected_volatile": 2,
        "energy_mj": 123_456_789u64
    })
}

fn h200() -> Value {
    json!({
        "uuid": H200,
        "name": "NVIDIA H200",
        "pci_bus_id": "00000000:19:00.0",
        "metrics": full_metrics(),
        "gpm": {"sm_util": 52.5, "sm_occupancy": 7.25, "any_tensor_util": 1.5, "dram_bw_util": 49.75}
    })
}

fn a100_mig() -> Value {
    json!({
        "uuid": A100,
        "name": "NVIDIA A100-SXM4-80GB",
        "metrics": full_metrics(),
        "mig_mode": {"current": true, "pending": true},
        "mig_devices": [
            {"uuid": MIG_A, "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "gpu_instance_id": 1,
             "processes": [4242],
             "metrics": {"memory": {"total": 40_000_000_000u64, "used": 1_000, "free": 39_999_999_000u64}}},
            {"uuid": MIG_B, "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "gpu_instance_id": 2,
             "metrics": {"memory": {"total": 40_000_000_000u64, "used": 0, "free": 40_000_000_000u64}}}
        ]
    })
}

fn config(devices: Vec<Value>) -> Value {
    json!({"driver_version": "580.82.07", "devices": devices})
}

fn source(fake: &FakeNvml) -> NvmlSource {
    NvmlSource::new(NvmlConfig {
        library_path: fake.library_path(),
        ..NvmlConfig::default()
    })
    .expect("valid config")
}

fn at(secs: f64) -> Timestamp {
    Timestamp::from_secs_f64(1_700_000_000.0 + secs)
}

fn by_uuid<'a>(samples: &'a [GpuSample], uuid: &str) -> &'a GpuSample {
    samples
        .iter()
        .find(|s| s.info.uuid.as_str() == uuid)
        .unwrap_or_else(|| panic!("{uuid} not in {samples:#?}"))
}

#[tokio::test]
async fn inventory_lists_gpus_and_mig_devices_with_their_parents() {
    let fake = FakeNvml::new(&config(vec![h200(), a100_mig()]));
    let mut src = source(&fake);
    assert!(src.nvml_available());
    assert_eq!(src.driver_version(), Some("580.82.07"));

    let gpus = src.sample_gpus(at(0.0)).await.unwrap();
    let uuids: Vec<&str> = gpus.iter().map(|g| g.info.uuid.as_str()).collect();
    assert_eq!(uuids, vec![H200, A100, MIG_A, MIG_B]);

    let h = &by_uuid(&gpus, H200).info;
    assert_eq!(h.index, 0);
    assert_eq!(h.model_name, "NVIDIA H200");
    assert_eq!(h.memory_total_bytes, 150_754_820_096);
    assert_eq!(h.pci_bus_id, "00000000:19:00.0");
    assert!(h.gpm_supported);
    assert_eq!(h.parent_uuid, None);
    assert_eq!(h.driver_version, "580.82.07");

    let a = &by_uuid(&gpus, A100).info;
    assert_eq!(a.index, 1);
    assert!(!a.gpm_supported, "the A100 config has no GPM");

    let mig_a = &by_uuid(&gpus, MIG_A).info;
    assert_eq!(mig_a.parent_uuid, Some(GpuUuid::new(A100)));
    assert_eq!(mig_a.index, 1, "MIG devices carry their parent's index");
    assert_eq!(mig_a.memory_total_bytes, 40_000_000_000);
    assert_eq!(mig_a.model_name, "NVIDIA A100-SXM4-80GB MIG 3g.40gb");
    // Learnt from the process running on it.
    assert_eq!(mig_a.mig_gpu_instance_id, Some(1));
    // Nothing runs on the second instance: its ID is not known (documented gap).
    assert_eq!(by_uuid(&gpus, MIG_B).info.mig_gpu_instance_id, None);
    assert_eq!(src.inventory().len(), 4);
}

#[tokio::test]
async fn every_metric_is_read_and_converted_to_base_units() {
    let fake = FakeNvml::new(&config(vec![h200()]));
    let mut src = source(&fake);

    let first = src.sample_gpus(at(0.0)).await.unwrap();
    let m = &first[0].metrics;
    assert_eq!(m.uuid.as_str(), H200);
    assert_eq!(m.memory_used_bytes, Some(120_000_000_000));
    assert_eq!(m.memory_free_bytes, Some(30_754_820_096));
    assert_eq!(m.utilization_gpu_ratio, Some(0.85));
    assert_eq!(m.utilization_memory_ratio, Some(0.40));
    assert_eq!(m.power_watts, Some(350.5));
    assert_eq!(m.power_limit_watts, Some(700.0));
    assert_eq!(m.temperature_celsius, Some(45.0));
    assert_eq!(m.sm_clock_mhz, Some(1980));
    assert_eq!(m.throttle_reasons, Some(4));
    assert_eq!(m.ecc_uncorrected_total, Some(2));
    assert_eq!(m.energy_joules_total, Some(123_456.789));
    assert_eq!(m.health, GpuHealth::Healthy);
    assert!(m.xid_totals.is_empty());
    // GPM needs two samples one interval apart.
    assert_eq!(m.gpm, None);

    let second = src.sample_gpus(at(1.0)).await.unwrap();
    let gpm = second[0].metrics.gpm.expect("GPM after the second sample");
    assert_eq!(gpm.sm_util_ratio, Some(0.525));
    assert_eq!(gpm.sm_occupancy_ratio, Some(0.0725));
    assert_eq!(gpm.tensor_active_ratio, Some(0.015));
    assert_eq!(gpm.dram_bw_util_ratio, Some(0.4975));
    assert!(src.stats().errors_by_kind.is_empty(), "{:?}", src.stats());
}

#[tokio::test]
async fn not_supported_metrics_are_missing_and_not_asked_again() {
    let mut dev = h200();
    dev["metrics"]["utilization"] = json!("NOT_SUPPORTED");
    dev["metrics"]["power_mw"] = json!("NOT_SUPPORTED");
    dev["metrics"]["ecc_uncorrected_volatile"] = json!("FUNCTION_NOT_FOUND");
    dev["gpm"]["dram_bw_util"] = json!("NOT_SUPPORTED");
    let fake = FakeNvml::new(&config(vec![dev]));
    let mut src = source(&fake);

    src.sample_gpus(at(0.0)).await.unwrap();
    let gpus = src.sample_gpus(at(1.0)).await.unwrap();
    let m = &gpus[0].metrics;
    assert_eq!(m.utilization_gpu_ratio, None);
    assert_eq!(m.utilization_memory_ratio, None);
    assert_eq!(m.power_watts, None);
    assert_eq!(m.ecc_uncorrected_total, None);
    assert_eq!(m.temperature_celsius, Some(45.0), "others still read");
    let gpm = m.gpm.expect("GPM");
    assert_eq!(gpm.dram_bw_util_ratio, None);
    assert_eq!(gpm.sm_util_ratio, Some(0.525));
    assert_eq!(m.health, GpuHealth::Healthy, "unsupported is not unhealthy");
    assert!(
        src.stats().errors_by_kind.is_empty(),
        "NotSupported is not counted as an error: {:?}",
        src.stats()
    );

    // The driver now "supports" them; the source remembered they are not
    // and does not ask every tick.
    fake.set_config(&config(vec![h200()]));
    let gpus = src.sample_gpus(at(2.0)).await.unwrap();
    assert_eq!(gpus[0].metrics.power_watts, None);
    assert_eq!(gpus[0].metrics.utilization_gpu_ratio, None);
}

#[tokio::test]
async fn a_gpu_lost_mid_run_is_reported_unhealthy_with_its_mig_devices() {
    let fake = FakeNvml::new(&config(vec![h200(), a100_mig()]));
    let mut src = source(&fake);
    let gpus = src.sample_gpus(at(0.0)).await.unwrap();
    assert!(gpus.iter().all(|g| g.metrics.health == GpuHealth::Healthy));

    let mut lost = a100_mig();
    lost["fail_all"] = json!("GPU_IS_LOST");
    fake.set_config(&config(vec![h200(), lost]));
    let gpus = src.sample_gpus(at(1.0)).await.unwrap();

    assert_eq!(by_uuid(&gpus, H200).metrics.health, GpuHealth::Healthy);
    let a = by_uuid(&gpus, A100);
    match &a.metrics.health {
        GpuHealth::Unhealthy { reason } => assert!(reason.contains("GPU lost"), "{reason}"),
        other => panic!("expected unhealthy, got {other:?}"),
    }
    assert_eq!(a.metrics.power_watts, None, "a lost GPU reports no values");
    match &by_uuid(&gpus, MIG_A).metrics.health {
        GpuHealth::Unhealthy { reason } => assert!(reason.contains("GPU lost"), "{reason}"),
        other => panic!("expected unhealthy, got {other:?}"),
    }
    assert!(
        src.stats()
            .errors_by_kind
            .get("gpu_lost")
            .copied()
            .unwrap_or(0)
            >= 1
    );

    // Still reported (not dropped) after the next inventory, MIG devices too.
    let gpus = src.sample_gpus(at(60.0)).await.unwrap();
    assert_eq!(gpus.len(), 4);
    assert!(matches!(
        by_uuid(&gpus, A100).metrics.health,
        GpuHealth::Unhealthy { .. }
    ));
    assert!(matches!(
        by_uuid(&gpus, MIG_B).metrics.health,
        GpuHealth::Unhealthy { .. }
    ));
}

#[tokio::test]
async fn a_gpu_lost_before_discovery_is_left_out_and_counted() {
    let mut lost = a100_mig();
    lost["fail_all"] = json!("GPU_IS_LOST");
    let fake = FakeNvml::new(&config(vec![h200(), lost]));
    let mut src = source(&fake);
    let gpus = src.sample_gpus(at(0.0)).await.unwrap();
    assert_eq!(gpus.len(), 1);
    assert_eq!(gpus[0].info.uuid.as_str(), H200);
    assert!(
        src.stats()
            .errors_by_kind
            .get("gpu_lost")
            .copied()
            .unwrap_or(0)
            >= 1
    );
}

#[tokio::test]
async fn xid_events_are_counted_and_a_critical_one_makes_the_gpu_unhealthy() {
    let fake = FakeNvml::new(&config(vec![h200()]));
    let mut src = source(&fake);
    src.sample_gpus(at(0.0)).await.unwrap();

    // An application Xid: counted, health unchanged.
    let mut dev = h200();
    dev["xid_events"] = json!([13]);
    fake.set_config(&config(vec![dev]));
    let gpus = src.sample_gpus(at(1.0)).await.unwrap();
    let m = &gpus[0].metrics;
    assert_eq!(m.xid_totals.get(&13).map(|x| x.total), Some(1));
    assert_eq!(m.xid_totals.get(&13).map(|x| x.last_at), Some(at(1.0)));
    assert_eq!(m.health, GpuHealth::Healthy);

    // Xid 79: fell off the bus.
    let mut dev = h200();
    dev["xid_events"] = json!([79]);
    fake.set_config(&config(vec![dev]));
    let gpus = src.sample_gpus(at(2.0)).await.unwrap();
    let m = &gpus[0].metrics;
    assert_eq!(m.xid_totals.get(&13).map(|x| x.total), Some(1));
    assert_eq!(m.xid_totals.get(&79).map(|x| x.total), Some(1));
    assert_eq!(
        m.health,
        GpuHealth::Unhealthy {
            reason: "Xid 79".to_string()
        }
    );
    assert_eq!(src.stats().xid_events_total, 2);

    // Sticky: no new event, still unhealthy.
    let gpus = src.sample_gpus(at(3.0)).await.unwrap();
    assert!(matches!(
        gpus[0].metrics.health,
        GpuHealth::Unhealthy { .. }
    ));
}

#[tokio::test]
async fn a_missing_library_runs_in_no_gpu_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = NvmlSource::new(NvmlConfig {
        library_path: dir.path().join("libnvidia-ml.so.1"),
        ..NvmlConfig::default()
    })
    .unwrap();
    assert!(!src.nvml_available());
    let reason = src.unavailable_reason().unwrap().to_string();
    assert!(reason.contains("no NVIDIA driver"), "{reason}");
    assert!(reason.contains("libnvidia-ml.so.1"), "{reason}");
    assert_eq!(src.sample_gpus(at(0.0)).await.unwrap(), Vec::new());
    assert!(src.inventory().is_empty());
    assert_eq!(
        src.stats().errors_by_kind.get("library_not_loaded"),
        Some(&1)
    );
}

#[tokio::test]
async fn a_driver_that_appears_later_is_picked_up_on_a_retry() {
    // The library is there but the driver is not loaded yet (no config:
    // the fake's init fails with NVML_ERROR_DRIVER_NOT_LOADED).
    let fake = FakeNvml::without_config();
    let mut src = NvmlSource::new(NvmlConfig {
        library_path: fake.library_path(),
        slow_interval: Duration::from_secs(30),
        ..NvmlConfig::default()
    })
    .unwrap();
    assert!(!src.nvml_available());
    assert!(
        src.unavailable_reason()
            .unwrap()
            .contains("kernel driver is not running")
    );
    assert!(src.sample_gpus(at(0.0)).await.unwrap().is_empty());

    fake.set_config(&config(vec![h200()]));
    // Not before the retry interval.
    assert!(src.sample_gpus(at(10.0)).await.unwrap().is_empty());
    let gpus = src.sample_gpus(at(31.0)).await.unwrap();
    assert_eq!(gpus.len(), 1);
    assert!(src.nvml_available());
    assert_eq!(src.stats().init_attempts_total, 2);
}

#[tokio::test]
async fn energy_is_read_for_one_gpu_per_tick_at_the_slow_rate() {
    let mut second = h200();
    second["uuid"] = json!("GPU-22222222-2222-3333-4444-555555555555");
    let fake = FakeNvml::new(&config(vec![h200(), second.clone()]));
    let mut src = source(&fake);

    let t0 = src.sample_gpus(at(0.0)).await.unwrap();
    assert_eq!(t0[0].metrics.energy_joules_total, Some(123_456.789));
    assert_eq!(t0[1].metrics.energy_joules_total, None, "not this tick");
    let t1 = src.sample_gpus(at(1.0)).await.unwrap();
    assert_eq!(t1[0].metrics.energy_joules_total, Some(123_456.789));
    assert_eq!(t1[1].metrics.energy_joules_total, Some(123_456.789));

    // New values in the driver: not read again before the slow interval.
    let mut a = h200();
    a["metrics"]["energy_mj"] = json!(200_000_000u64);
    second["metrics"]["energy_mj"] = json!(200_000_000u64);
    fake.set_config(&config(vec![a, second]));
    let t2 = src.sample_gpus(at(2.0)).await.unwrap();
    assert_eq!(t2[0].metrics.energy_joules_total, Some(123_456.789));
    let t3 = src.sample_gpus(at(30.5)).await.unwrap();
    assert_eq!(t3[0].metrics.energy_joules_total, Some(200_000.0));
    assert_eq!(t3[1].metrics.energy_joules_total, Some(123_456.789));
}

#[tokio::test]
async fn mig_devices_report_memory_and_gpm_per_gpu_instance() {
    let mut dev = a100_mig();
    dev["gpm"] =
        json!({"sm_util": 10.0, "sm_occupancy": 5.0, "any_tensor_util": 1.0, "dram_bw_util": 20.0});
    dev["mig_devices"][0]["gpm"] =
        json!({"sm_util": 30.0, "sm_occupancy": 6.0, "any_tensor_util": 2.0, "dram_bw_util": 40.0});
    let fake = FakeNvml::new(&config(vec![dev]));
    let mut src = source(&fake);
    src.sample_gpus(at(0.0)).await.unwrap();
    let gpus = src.sample_gpus(at(1.0)).await.unwrap();

    let mig = &by_uuid(&gpus, MIG_A).metrics;
    assert_eq!(mig.memory_used_bytes, Some(1_000));
    assert_eq!(
        mig.utilization_gpu_ratio, None,
        "not available per MIG device"
    );
    assert_eq!(mig.gpm.and_then(|g| g.sm_util_ratio), Some(0.30));
    assert_eq!(
        by_uuid(&gpus, A100)
            .metrics
            .gpm
            .and_then(|g| g.sm_util_ratio),
        Some(0.10)
    );
    // Unknown GPU instance: no per-instance GPM.
    assert_eq!(by_uuid(&gpus, MIG_B).metrics.gpm, None);
}

#[test]
fn config_rejects_a_slow_interval_out_of_range() {
    let err = NvmlConfig {
        slow_interval: Duration::from_millis(10),
        ..NvmlConfig::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("nvml.slow_interval"), "{err}");
    assert!(err.contains("between 1 s and 1 h"), "{err}");
}

#[tokio::test]
async fn mig_devices_share_the_health_of_their_parent() {
    let fake = FakeNvml::new(&config(vec![a100_mig()]));
    let mut src = source(&fake);
    src.sample_gpus(at(0.0)).await.unwrap();
    let mut dev = a100_mig();
    dev["xid_events"] = json!([48]);
    fake.set_config(&config(vec![dev]));
    let gpus = src.sample_gpus(at(1.0)).await.unwrap();
    assert_eq!(
        by_uuid(&gpus, MIG_B).metrics.health,
        GpuHealth::Unhealthy {
            reason: "parent GPU: Xid 48".to_string()
        }
    );
}

#[tokio::test]
async fn an_error_mid_run_is_counted_and_the_metric_recovers() {
    let fake = FakeNvml::new(&config(vec![h200()]));
    let mut src = source(&fake);
    src.sample_gpus(at(0.0)).await.unwrap();

    let mut dev = h200();
    dev["metrics"]["temperature_c"] = json!("UNKNOWN");
    fake.set_config(&config(vec![dev]));
    let gpus = src.sample_gpus(at(1.0)).await.unwrap();
    assert_eq!(gpus[0].metrics.temperature_celsius, None);
    assert_eq!(
        gpus[0].metrics.power_watts,
        Some(350.5),
        "the rest still reads"
    );
    assert_eq!(gpus[0].metrics.health, GpuHealth::Healthy);
    assert_eq!(src.stats().errors_by_kind.get("other"), Some(&1));

    // Not remembered as unsupported: read again next tick.
    fake.set_config(&config(vec![h200()]));
    let gpus = src.sample_gpus(at(2.0)).await.unwrap();
    assert_eq!(gpus[0].metrics.temperature_celsius, Some(45.0));
}
