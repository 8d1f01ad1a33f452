//! Finds (or builds) the fake `libnvidia-ml.so.1` of `crates/fake-nvml` and
//! gives each test its own copy with its own configuration file (as the
//! telemetry crate's tests do).
//!
//! The cdylib is looked for in the profile directory of the running test
//! binary (`<target>/<profile>/deps/<test>` → `<target>/<profile>/`), which
//! holds for `cargo test` and `cargo nextest`, any `CARGO_TARGET_DIR` and any
//! `--target`. When it is missing or older than the fake's sources it is
//! built with the same cargo, target directory and profile. A copy (not a
//! link) per test makes the dynamic loader treat each as a separate library,
//! so tests running in parallel threads do not share the fake's state.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::Value;
use tempfile::TempDir;

const LIB_NAME: &str = "libfake_nvml.so";

/// One test's fake library: `<tmp>/libnvidia-ml.so.1` and `<tmp>/fake-nvml.json`.
pub struct FakeNvml {
    dir: TempDir,
}

impl FakeNvml {
    /// A fresh copy of the library with this configuration.
    pub fn new(config: &Value) -> FakeNvml {
        let fake = FakeNvml::without_config();
        fake.set_config(config);
        fake
    }

    /// A fresh copy with no configuration file yet (init fails with
    /// `NVML_ERROR_DRIVER_NOT_LOADED` until one is written).
    pub fn without_config() -> FakeNvml {
        let lib = built_library();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::copy(&lib, dir.path().join("libnvidia-ml.so.1")).expect("copy the fake library");
        FakeNvml { dir }
    }

    pub fn library_path(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// Replaces the configuration atomically (write, then rename): the fake
    /// sees a new inode and reloads it on its next call.
    pub fn set_config(&self, config: &Value) {
        let tmp = self.dir.path().join("fake-nvml.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(config).expect("json")).expect("write");
        std::fs::rename(&tmp, self.dir.path().join("fake-nvml.json")).expect("rename");
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `<target>/<profile>` of the running test binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

fn newest_source_mtime() -> SystemTime {
    let root = workspace_root().join("crates/fake-nvml");
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(m);
            }
        }
    }
    newest
}

/// The built cdylib, building it first when missing or stale.
pub fn built_library() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut guard = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = guard.as_ref() {
        return p.clone();
    }
    let profile_dir = profile_dir();
    let lib = profile_dir.join(LIB_NAME);
    let fresh = std::fs::metadata(&lib)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built >= newest_source_mtime());
    if !fresh {
        // CARGO_TARGET_TMPDIR is `<target>/tmp`.
        let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .to_path_buf();
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("-q")
            .arg("-p")
            .arg("fake-nvml")
            .arg("--manifest-path")
            .arg(workspace_root().join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target_dir);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.arg("--profile").arg(other);
            }
        }
        // With `--target <triple>` the profile dir is `<target>/<triple>/<profile>`.
        if let Some(triple_dir) = profile_dir.parent()
            && triple_dir != target_dir
            && let Some(triple) = triple_dir.file_name()
        {
            cmd.arg("--target").arg(triple);
        }
        let status = cmd.status().expect("run cargo build -p fake-nvml");
        assert!(status.success(), "cargo build -p fake-nvml failed");
    }
    assert!(
        lib.exists(),
        "{} missing after building fake-nvml",
        lib.display()
    );
    *guard = Some(lib.clone());
    lib
}

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
