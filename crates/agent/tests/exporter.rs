//! The exporter on the agent's `/metrics`, scraped over HTTP: per-GPU
//! series with dcgm-exporter's labels (one per pod of a shared GPU),
//! per-engine series, and series that go away with their pod.

mod support;

use std::sync::Arc;
use std::time::Duration;

use gpuscale_agent::{Agent, AgentConfig, AgentMetrics, NodeExporter, NodeStats};
use gpuscale_core::sample::{EngineSample, EngineState, Framework};
use gpuscale_core::{Histogram, PodRef, Timestamp};
use gpuscale_telemetry::fake::{FakeGpuGroup, FakeNode, FakeNodeConfig};
use support::{eventually, http_get, sample_value};

fn engine(pod: &str, gpu: &gpuscale_core::GpuUuid, running: f64) -> EngineSample {
    let mut e = EngineSample::empty(
        PodRef::new("llm", pod),
        Framework::Vllm,
        "llama-3-8b",
        Timestamp::EPOCH,
    );
    e.container = "engine".into();
    e.state = EngineState::Warm;
    e.gpu_uuids = vec![gpu.clone()];
    e.requests_running = Some(running);
    e.generation_tokens_total = Some(1000.0);
    let mut ttft = Histogram::ttft();
    ttft.observe(0.05);
    ttft.observe(0.3);
    e.ttft_seconds = Some(ttft);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_and_engine_series_carry_pod_labels_and_leave_with_their_pod() {
    let node = FakeNode::new(
        &FakeNodeConfig {
            gpus: vec![FakeGpuGroup {
                model: "NVIDIA H100 80GB HBM3".into(),
                count: 2,
                memory_gib: 80.0,
                power_limit_watts: 700.0,
                gpm_supported: true,
            }],
            ..FakeNodeConfig::default()
        },
        "node-a",
    )
    .expect("fake node");
    let fake = node.handle();
    let uuids = fake.gpu_uuids();
    // GPU 0 is time-sliced between two pods; GPU 1 is idle.
    fake.upsert_engine(engine("a-0", &uuids[0], 3.0));
    fake.upsert_engine(engine("b-0", &uuids[0], 5.0));

    let mut config = AgentConfig::new("http://127.0.0.1:9", "node-a");
    config.sample_interval = Duration::from_millis(20);
    config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let agent = Agent::new(
        config,
        node.gpu_source(),
        node.pod_source(),
        node.engine_source(),
    )
    .expect("valid");
    let stats = Arc::new(NodeStats::default());
    stats.count_error("engine_scrape", "content_type");
    let mut metrics = AgentMetrics::new();
    metrics.register_collector(Box::new(NodeExporter::new(
        agent.samples(),
        "node-a",
        stats,
    )));
    let running = agent.with_metrics(metrics).start().await.expect("started");
    let addr = running.metrics_addr().expect("metrics served");
    let handle = running.handle().clone();
    eventually("a sample", || handle.latest_snapshot().is_some()).await;

    let text = http_get(addr, "/metrics").await;
    let gpu0 = uuids[0].as_str();
    let gpu1 = uuids[1].as_str();
    let labels = |gpu: &str, uuid: &str, pod: &str| {
        let ns = if pod.is_empty() { "" } else { "llm" };
        let container = if pod.is_empty() { "" } else { "engine" };
        format!(
            "{{gpu=\"{gpu}\",uuid=\"{uuid}\",model_name=\"NVIDIA H100 80GB HBM3\",hostname=\"node-a\",namespace=\"{ns}\",pod=\"{pod}\",container=\"{container}\"}}"
        )
    };
    for pod in ["a-0", "b-0"] {
        let series = format!(
            "gpuscale_agent_gpu_memory_total_bytes{}",
            labels("0", gpu0, pod)
        );
        assert_eq!(
            sample_value(&text, &series),
            Some(80.0 * 1024.0 * 1024.0 * 1024.0),
            "{series} in\n{text}"
        );
        let power = format!("gpuscale_agent_gpu_power_watts{}", labels("0", gpu0, pod));
        assert!(sample_value(&text, &power).is_some(), "{power}");
    }
    let idle = format!(
        "gpuscale_agent_gpu_utilization_ratio{}",
        labels("1", gpu1, "")
    );
    assert!(sample_value(&text, &idle).is_some(), "{idle} in\n{text}");
    assert!(
        text.contains("# TYPE gpuscale_agent_gpu_energy_joules counter"),
        "{text}"
    );
    assert!(
        text.contains("# UNIT gpuscale_agent_gpu_power_watts watts"),
        "{text}"
    );
    assert!(
        text.contains("# HELP gpuscale_agent_gpu_tensor_active_ratio GPM"),
        "{text}"
    );

    assert_engine_and_agent_series(&text);

    // Pod b-0 leaves: its GPU and engine series go with it.
    assert!(fake.remove_engine(&PodRef::new("llm", "b-0")));
    eventually("a sample without b-0", || {
        handle
            .latest_snapshot()
            .is_some_and(|s| s.engines.iter().all(|e| e.pod.name != "b-0"))
    })
    .await;
    let text = http_get(addr, "/metrics").await;
    assert!(!text.contains("pod=\"b-0\""), "{text}");
    assert!(
        sample_value(
            &text,
            &format!(
                "gpuscale_agent_gpu_memory_total_bytes{}",
                labels("0", gpu0, "a-0")
            )
        )
        .is_some()
    );
    running.shutdown().await.expect("clean shutdown");
}

/// The engine series of pods a-0 and b-0 and the agent's own health series.
fn assert_engine_and_agent_series(text: &str) {
    let engine_labels = |pod: &str| {
        format!(
            "{{namespace=\"llm\",pod=\"{pod}\",container=\"engine\",framework=\"vllm\",model=\"llama-3-8b\",hostname=\"node-a\""
        )
    };
    assert_eq!(
        sample_value(
            text,
            &format!(
                "gpuscale_agent_engine_requests_running{}}}",
                engine_labels("b-0")
            )
        ),
        Some(5.0)
    );
    assert_eq!(
        sample_value(
            text,
            &format!(
                "gpuscale_agent_engine_state{},state=\"warm\"}}",
                engine_labels("a-0")
            )
        ),
        Some(1.0)
    );
    assert_eq!(
        sample_value(
            text,
            &format!(
                "gpuscale_agent_engine_state{},state=\"failed\"}}",
                engine_labels("a-0")
            )
        ),
        Some(0.0)
    );
    assert_eq!(
        sample_value(
            text,
            &format!(
                "gpuscale_agent_engine_generation_tokens_total{}}}",
                engine_labels("a-0")
            )
        ),
        Some(1000.0)
    );
    assert_eq!(
        sample_value(
            text,
            &format!(
                "gpuscale_agent_engine_time_to_first_token_seconds_bucket{{le=\"0.06\",{}}}",
                &engine_labels("a-0")[1..]
            )
        ),
        Some(1.0)
    );
    assert_eq!(
        sample_value(
            text,
            &format!(
                "gpuscale_agent_engine_time_to_first_token_seconds_count{}}}",
                engine_labels("a-0")
            )
        ),
        Some(2.0)
    );
    assert!(
        !text.contains("gpuscale_agent_engine_kv_cache_usage_ratio"),
        "a metric no engine reports is absent, not 0"
    );
    // The agent's own health, beside the node's.
    assert!(text.contains("gpuscale_agent_samples_total"), "{text}");
    assert!(text.contains("# TYPE gpuscale_agent_collection_duration_seconds histogram"));
    assert_eq!(
        sample_value(
            text,
            "gpuscale_agent_source_errors_total{source=\"engine_scrape\",kind=\"content_type\"}"
        ),
        Some(1.0)
    );
    assert!(text.trim_end().ends_with("# EOF"));
}
