//! `gpuscale agent` as a user runs it: `--once --output json|yaml` prints
//! one node snapshot and exits 0, without an NVML library (no-GPU mode) and
//! with a simulated node; bad flags exit 2 naming the flag.

use std::process::{Command, Output};

use gpuscale_core::sample::NodeSnapshot;

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .arg("agent")
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NODE_NAME")
        .env_remove("GPUSCALE_SCALER_URL")
        .output()
        .expect("run gpuscale")
}

#[test]
fn once_prints_a_no_gpu_snapshot_without_the_nvml_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("libnvidia-ml.so.1");
    let out = agent(&[
        "--once",
        "--output",
        "json",
        "--kubernetes",
        "off",
        "--node-name",
        "gpu-node-7",
        "--nvml-library",
        missing.to_str().expect("utf-8 path"),
        "--pod-resources-socket",
        dir.path()
            .join("kubelet.sock")
            .to_str()
            .expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let snapshot: NodeSnapshot = serde_json::from_slice(&out.stdout).expect("one JSON snapshot");
    assert_eq!(snapshot.node.as_str(), "gpu-node-7");
    assert!(snapshot.gpus.is_empty());
    assert!(!snapshot.agent.nvml_available);
    assert!(!snapshot.agent.pod_resources_available);
    assert!(
        stderr.contains("no-GPU mode"),
        "the mode is logged: {stderr}"
    );
}

#[test]
fn once_reads_a_simulated_node_as_json_and_yaml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("node.yaml");
    std::fs::write(
        &config,
        "gpus: [{model: NVIDIA H100 80GB HBM3, count: 2}]\nengines: [{pod: llama-0, model: llama}]\n",
    )
    .expect("write");
    let config = config.to_str().expect("utf-8 path");
    let out = agent(&[
        "--once",
        "--fake-config",
        config,
        "--node-name",
        "sim-0",
        "--kubernetes",
        "off",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["gpus"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["pods"][0]["pod"]["name"], "llama-0");
    assert_eq!(json["engines"][0]["model"], "llama");

    let out = agent(&[
        "--once",
        "--output",
        "yaml",
        "--fake-config",
        config,
        "--node-name",
        "sim-0",
        "--kubernetes",
        "off",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshot: NodeSnapshot = serde_yaml::from_slice(&out.stdout).expect("YAML snapshot");
    assert_eq!(snapshot.gpus.len(), 2);
}

#[test]
fn bad_agent_flags_exit_2_naming_the_flag() {
    for (args, flag) in [
        (
            vec!["--once", "--serving-addr", "nowhere"],
            "--serving-addr",
        ),
        (
            vec!["--once", "--engine", "vllm=ftp://x/metrics"],
            "--engine",
        ),
        (vec!["--once", "--warmup", "sometimes"], "--warmup"),
        (vec!["--once", "--interval", "fast"], "--interval"),
        (vec!["--node-name", "n"], "--scaler"),
    ] {
        let out = agent(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
