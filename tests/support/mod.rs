//! Helpers shared by the workspace-level integration tests: fake nodes,
//! agents configured for fast tests, and waiting on the scaler's view.

#![allow(dead_code)]

pub mod llama_server;

use std::sync::Arc;
use std::time::Duration;

use gpuscale_agent::{Agent, AgentConfig, BackoffConfig, RunningAgent};
use gpuscale_scaler::StateView;
use gpuscale_telemetry::fake::{
    FakeEngineConfig, FakeGpuGroup, FakeLoadCurve, FakeLoadPoint, FakeNode, FakeNodeConfig,
};
use tokio::sync::watch;

/// A node with `gpus` H100s and one single-GPU engine per name in `pods`,
/// under a light constant load.
pub fn fake_node(node: &str, gpus: u32, pods: &[&str]) -> FakeNode {
    let config = FakeNodeConfig {
        seed: 42,
        gpus: vec![FakeGpuGroup {
            model: "NVIDIA H100 80GB HBM3".into(),
            count: gpus,
            memory_gib: 80.0,
            power_limit_watts: 700.0,
            gpm_supported: true,
        }],
        engines: pods
            .iter()
            .map(|p| FakeEngineConfig {
                pod: (*p).into(),
                namespace: "default".into(),
                model: "llama-3-8b".into(),
                gpus: 1,
                capacity_tokens_per_second: 3_000.0,
                batch_limit: 256,
                mean_input_tokens: 512.0,
                mean_output_tokens: 256.0,
                kv_capacity_tokens: 400_000.0,
                warmup_seconds: 0.0,
            })
            .collect(),
        load: FakeLoadCurve {
            points: vec![FakeLoadPoint {
                at_seconds: 0.0,
                requests_per_second: 4.0,
            }],
            noise: 0.1,
            repeat: false,
        },
    };
    FakeNode::new(&config, node).expect("valid fake node")
}

/// An agent config that samples every 50 ms and retries within 20..200 ms.
pub fn fast_agent_config(url: &str, node: &str) -> AgentConfig {
    let mut c = AgentConfig::new(url, node);
    c.sample_interval = Duration::from_millis(50);
    c.backoff = BackoffConfig {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(200),
        jitter: 0.5,
    };
    c.connect_timeout = Duration::from_secs(2);
    c
}

pub async fn start_agent(url: &str, node: &FakeNode, name: &str) -> RunningAgent {
    Agent::new(
        fast_agent_config(url, name),
        node.gpu_source(),
        node.pod_source(),
        node.engine_source(),
    )
    .expect("valid agent config")
    .start()
    .await
    .expect("agent starts")
}

/// Waits until `pred` holds for the published view. The bound is a liveness
/// guard for a broken build, not a timing assertion.
pub async fn wait_for_view(
    view: &mut watch::Receiver<Arc<StateView>>,
    what: &str,
    pred: impl Fn(&StateView) -> bool,
) -> Arc<StateView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let current = view.borrow_and_update().clone();
        if pred(&current) {
            return current;
        }
        match tokio::time::timeout_at(deadline, view.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the scaler stopped while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; last view: {current:#?}"),
        }
    }
}

/// Polls `pred` every 10 ms (same liveness bound as [`wait_for_view`]).
pub async fn eventually(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pred() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
