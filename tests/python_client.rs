//! The Python example client (`examples/python/gpuscale_client.py`) against
//! a live scaler and agent: proof that another language speaks the APIs.
//!
//! The scaler decides for one workload (`llm/chat`, the full policy) whose
//! engines are pushed through the agent's node-local ServingService. The
//! script, with code generated from `proto/` by grpcio-tools at run time,
//! declares its engine warm, pushes its statistics, lists the workloads and
//! watches recommendations until the scaler counts the pushed engine as a
//! ready replica and publishes a batch limit, and until that batch limit
//! reaches the engine through `WatchLimits`: engine → agent → scaler → agent
//! → engine.
//!
//! `python3` with `grpcio-tools` must be installed (`./scripts/test.sh`
//! installs grpcio-tools); without them the test fails and says so.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gpuscale_agent::AgentConfig;
use gpuscale_agent::node::{NodeConfig, ServingAddr, start_node};
use gpuscale_scaler::{Scaler, ScalerConfig, ScalerFile};
use gpuscale_telemetry::fake::FakeNodeConfig;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

const SCALER_CONFIG: &str = r#"
tick: 200ms
window: 10s
workloads:
  - name: chat
    namespace: llm
    labels: {app: chat, tier: prod}
    engines: {model: llama-3-8b}
    policy:
      target: {name: chat}
      maxReplicas: 4
      performanceModel: {preset: h200-llama3-8b-bf16}
  - name: batch
    namespace: llm
    labels: {app: batch}
    engines: {model: mistral-7b}
    proportional: {capacityTokensPerSecond: 2000, maxReplicas: 4}
"#;

fn python() -> &'static str {
    let found = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output();
    match found {
        Ok(o) if o.status.success() => "python3",
        Ok(o) => panic!(
            "python3 cannot import grpc and grpc_tools ({}): install them with \
             `python3 -m pip install 'grpcio-tools>=1.60,<2'` (./scripts/test.sh does)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => {
            panic!("python3 is not installed ({e}): this test runs the Python example client")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_lists_watches_pushes_and_receives_its_batch_limit() {
    let python = python();
    let file: ScalerFile = serde_yaml::from_str(SCALER_CONFIG).expect("config parses");
    let mut config = ScalerConfig::new("127.0.0.1:0".parse().expect("addr"));
    file.apply(&mut config, Path::new(ROOT))
        .expect("valid workloads");
    let scaler = Scaler::new(config).start().await.expect("scaler starts");

    let mut agent_config = AgentConfig::new(format!("http://{}", scaler.grpc_addr()), "gpu-node-a");
    agent_config.sample_interval = Duration::from_millis(100);
    let mut node = NodeConfig::fake(FakeNodeConfig::default());
    node.serving = Some(ServingAddr::Tcp("127.0.0.1:0".parse().expect("addr")));
    let agent = start_node(agent_config, node, None)
        .await
        .expect("agent starts");
    let serving = agent.serving_addr().expect("ServingService on TCP");

    let script = Path::new(ROOT).join("examples/python/gpuscale_client.py");
    let args: Vec<String> = [
        "--scaler".to_string(),
        scaler.grpc_addr().to_string(),
        "--serving".into(),
        serving.to_string(),
        "--pod".into(),
        "llm/chat-0".into(),
        "--model".into(),
        "llama-3-8b".into(),
        "--selector".into(),
        "app=chat".into(),
        "--until-ready".into(),
        "1".into(),
        "--timeout".into(),
        "60".into(),
    ]
    .into();
    // The script gives up by itself after its --timeout.
    let output =
        tokio::task::spawn_blocking(move || Command::new(python).arg(&script).args(&args).output())
            .await
            .expect("joins")
            .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!(
        "status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(output.status.success(), "{context}");

    let lines: Vec<&str> = stdout.lines().collect();
    // ListWorkloads with a selector: only chat, with its labels.
    assert!(
        lines.contains(&"workload llm/chat labels=app=chat,tier=prod"),
        "{context}"
    );
    assert!(!stdout.contains("workload llm/batch"), "{context}");
    assert!(lines.contains(&"readiness llm/chat-0 warm"), "{context}");
    // The last recommendation counts the pushed engine as a ready replica
    // and carries a batch limit, which reached the engine.
    let rec = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("recommendation llm/chat "))
        .unwrap_or_else(|| panic!("no recommendation: {context}"));
    assert!(rec.contains(" ready=1 "), "{rec}\n{context}");
    let limit = rec
        .split_whitespace()
        .find_map(|w| w.strip_prefix("batch_limit="))
        .expect("batch_limit field");
    assert_ne!(limit, "none", "{context}");
    assert!(
        lines.contains(&format!("limits llm/chat-0 batch_limit={limit} draining=false").as_str()),
        "the engine received batch limit {limit}: {context}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("pushed accepted=")),
        "{context}"
    );
    assert_eq!(lines.last(), Some(&"done ok=true"), "{context}");

    agent.shutdown().await.expect("agent stops");
    scaler.shutdown().await.expect("scaler stops");
}
