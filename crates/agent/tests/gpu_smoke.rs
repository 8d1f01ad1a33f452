//! The checks of `scripts/gpu-smoke.sh` (which needs a real GPU to run in
//! full) on snapshots the agent produces here: through the real NVML code
//! path against the fake library, then broken one way at a time.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gpuscale_agent::node::{KubernetesMode, OutputFormat, render_snapshot};
use gpuscale_agent::{NodeConfig, sample_once};
use gpuscale_core::NodeName;
use serde_json::Value;
use support::fake_nvml::{FakeNvml, h100s};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-smoke.sh")
}

/// Runs `gpu-smoke.sh --check` on `snapshot`; exit code and output.
fn check(snapshot: &Value) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("snapshot.json");
    std::fs::write(&file, serde_json::to_vec_pretty(snapshot).expect("json")).expect("write");
    let out = Command::new("bash")
        .arg(script())
        .arg("--check")
        .arg(&file)
        .output()
        .expect("run gpu-smoke.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn the_smoke_checks_pass_on_a_hopper_snapshot_and_name_each_failure() {
    let nvml = FakeNvml::new(&h100s(2));
    let mut node = NodeConfig::nvml(nvml.library_path());
    node.kubernetes = KubernetesMode::Off;
    node.pod_resources = None;
    let snapshot = sample_once(
        &NodeName::new("gpu-1"),
        &node,
        None,
        Duration::from_millis(100),
    )
    .await
    .expect("sampled");
    let json: Value =
        serde_json::from_str(&render_snapshot(&snapshot, OutputFormat::Json).expect("json"))
            .expect("parses");

    let (code, text) = check(&json);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("PASS all checks"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains("GPM metrics present"), "{text}");

    let mut bad_uuid = json.clone();
    bad_uuid["gpus"][0]["info"]["uuid"] = Value::from("GPU-XYZ");
    let (code, text) = check(&bad_uuid);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAIL gpu 0 GPU-XYZ"), "{text}");

    let mut no_memory = json.clone();
    no_memory["gpus"][1]["info"]["memory_total_bytes"] = Value::from(0);
    let (code, text) = check(&no_memory);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("memory total 0 > 0"), "{text}");

    let mut no_gpm = json.clone();
    no_gpm["gpus"][0]["metrics"]["gpm"] = Value::Null;
    let (code, text) = check(&no_gpm);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL gpu 0") && text.contains("missing: sm_util_ratio"),
        "{text}"
    );

    let mut no_gpus = json.clone();
    no_gpus["gpus"] = Value::Array(Vec::new());
    no_gpus["agent"]["nvml_available"] = Value::Bool(false);
    let (code, text) = check(&no_gpus);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAIL GPUs reported: 0"), "{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{ not json").expect("write");
    let out = Command::new("bash")
        .arg(script())
        .arg("--check")
        .arg(&garbage)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
}
