//! Bad flags and configuration: exit code 2 and a message naming the flag,
//! the value and what is allowed.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("GPUSCALE_SCALER_URL")
        .output()
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_scaler_flags_exit_2_naming_flag_value_and_allowed() {
    let (code, err) = run(&["scaler", "--listen", "7070", "--metrics-addr", "off"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--listen") && err.contains("7070") && err.contains("IP:port"),
        "{err}"
    );

    let (code, err) = run(&["scaler", "--node-ttl", "soon"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--node-ttl") && err.contains("soon"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("scaler.yaml");
    std::fs::write(
        &path,
        "workloads: [{name: chat, engines: {model: m}, proportional: {capacityTokensPerSecond: 0, maxReplicas: 2}}]\n",
    )
    .expect("write");
    let (code, err) = run(&[
        "scaler",
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "off",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("workloads[0].proportional.capacityTokensPerSecond")
            && err.contains("more than 0"),
        "{err}"
    );
}

#[test]
fn bad_agent_flags_exit_2_naming_flag_value_and_allowed() {
    let (code, err) = run(&["agent", "--scaler", "scaler:7070", "--node-name", "n1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--scaler") && err.contains("scaler:7070") && err.contains("http://"),
        "{err}"
    );

    let (code, err) = run(&[
        "agent",
        "--scaler",
        "http://127.0.0.1:1",
        "--node-name",
        "n1",
        "--interval",
        "1ms",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--interval") && err.contains("10ms..=1h"),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.yaml");
    std::fs::write(
        &path,
        "gpus: [{count: 2}]\nengines: [{pod: a, model: m, gpus: 3}]\n",
    )
    .expect("write");
    let (code, err) = run(&[
        "agent",
        "--scaler",
        "http://127.0.0.1:1",
        "--node-name",
        "n1",
        "--metrics-addr",
        "off",
        "--fake-config",
        path.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--fake-config") && err.contains("engines[0].gpus"),
        "{err}"
    );
}
