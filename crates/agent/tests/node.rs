//! The agent on a node with real sources (the real nvml-wrapper path
//! against the project's fake `libnvidia-ml.so.1`, the PodResources client,
//! engine scrapers over HTTP) and every bad input of the node at once: the
//! rest of the node keeps reporting, and each problem is counted by kind.

mod support;

use std::time::Duration;

use gpuscale_agent::{AgentConfig, NodeConfig, sample_once, start_node};
use gpuscale_core::sample::{EngineState, NodeSnapshot};
use gpuscale_core::{NodeName, PodRef};
use gpuscale_telemetry::EngineTarget;
use gpuscale_telemetry::PodResourcesConfig;
use gpuscale_telemetry::fake::{FakeGpuGroup, FakeNodeConfig};
use support::engine::{Behaviour, FakeEngine, MetricsReply};
use support::fake_nvml::{FakeNvml, h100s};
use support::{eventually, http_get, sample_value};

async fn engine(reply: MetricsReply) -> FakeEngine {
    FakeEngine::with(
        "llama",
        Behaviour {
            metrics: reply,
            health: 200,
            completions_fail: false,
            completions: 0,
        },
    )
    .await
}

fn target(pod: &str, e: &FakeEngine) -> EngineTarget {
    EngineTarget::parse_flag(&format!("llm/{pod}=vllm={}", e.metrics_url())).expect("target")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_counted_by_kind_while_the_rest_of_the_node_reports() {
    let nvml = FakeNvml::new(&h100s(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let good = engine(MetricsReply::Vllm { running: 4.0 }).await;
    let html = engine(MetricsReply::Html).await;
    let hang = engine(MetricsReply::Hang).await;
    let garbage = engine(MetricsReply::Garbage).await;
    let truncated = engine(MetricsReply::Truncated).await;
    let huge = engine(MetricsReply::Huge { bytes: 64 * 1024 }).await;

    let mut node = NodeConfig::nvml(nvml.library_path());
    node.kubernetes = gpuscale_agent::node::KubernetesMode::Off;
    // The kubelet's socket is not mounted.
    node.pod_resources = Some(PodResourcesConfig {
        socket_path: dir.path().join("kubelet.sock"),
        ..PodResourcesConfig::default()
    });
    node.scrape.default_timeout = Duration::from_millis(300);
    node.scrape.http.max_body_bytes = 16 * 1024;
    node.engines = vec![
        target("good-0", &good),
        target("html-0", &html),
        target("hang-0", &hang),
        target("garbage-0", &garbage),
        target("truncated-0", &truncated),
        target("huge-0", &huge),
    ];
    let mut config = AgentConfig::new("http://127.0.0.1:9", "node-a");
    config.sample_interval = Duration::from_millis(100);
    config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let running = start_node(config, node, None).await.expect("started");
    let handle = running.handle().clone();
    eventually("three rounds", || handle.health().samples_total >= 3).await;

    let snapshot = handle.latest_snapshot().expect("sampled");
    assert_eq!(snapshot.gpus.len(), 2, "GPUs keep reporting");
    assert!(
        snapshot
            .gpus
            .iter()
            .all(|g| g.metrics.power_watts == Some(450.0))
    );
    assert!(
        snapshot.pods.is_empty(),
        "no attribution without the socket"
    );
    assert!(snapshot.agent.nvml_available);
    assert!(!snapshot.agent.pod_resources_available);
    let state = |name: &str| {
        snapshot
            .engines
            .iter()
            .find(|e| e.pod == PodRef::new("llm", name))
            .map(|e| (e.state, e.requests_running))
    };
    assert_eq!(state("good-0"), Some((EngineState::Warm, Some(4.0))));
    for bad in ["html-0", "hang-0", "garbage-0", "truncated-0", "huge-0"] {
        assert_eq!(state(bad), Some((EngineState::Failed, None)), "{bad}");
    }

    let text = http_get(running.metrics_addr().expect("metrics"), "/metrics").await;
    for (source, kind) in [
        ("pod_resources", "socket_absent"),
        ("engine_scrape", "content_type"),
        ("engine_scrape", "timeout"),
        ("engine_scrape", "parse"),
        ("engine_scrape", "truncated"),
        ("engine_scrape", "too_large"),
    ] {
        let series =
            format!("gpuscale_agent_source_errors_total{{source=\"{source}\",kind=\"{kind}\"}}");
        assert!(
            sample_value(&text, &series).is_some_and(|n| n >= 1.0),
            "{series} in\n{text}"
        );
    }
    assert_eq!(
        sample_value(&text, "gpuscale_agent_source_up{source=\"nvml\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&text, "gpuscale_agent_source_up{source=\"pod_resources\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample_value(&text, "gpuscale_agent_engine_targets"),
        Some(6.0)
    );
    assert!(
        sample_value(
            &text,
            "gpuscale_agent_gpu_sm_utilization_ratio{gpu=\"1\",uuid=\"GPU-00000000-0000-0000-0000-000000000001\",model_name=\"NVIDIA H100 80GB HBM3\",hostname=\"node-a\",namespace=\"\",pod=\"\",container=\"\"}"
        )
        .is_some(),
        "GPM from two samples: {text}"
    );
    running.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn once_reads_every_source_and_works_without_the_nvml_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = engine(MetricsReply::Vllm { running: 2.0 }).await;
    let mut node = NodeConfig::nvml(dir.path().join("libnvidia-ml.so.1"));
    node.kubernetes = gpuscale_agent::node::KubernetesMode::Off;
    node.pod_resources = None;
    node.engines = vec![target("good-0", &good)];
    let name = NodeName::new("node-a");
    let snapshot = sample_once(&name, &node, None, Duration::from_millis(100))
        .await
        .expect("sampled");
    assert!(snapshot.gpus.is_empty(), "no-GPU mode");
    assert!(!snapshot.agent.nvml_available);
    assert_eq!(snapshot.engines.len(), 1);
    assert_eq!(snapshot.engines[0].requests_running, Some(2.0));
    // The printed form parses back to the same snapshot; JSON has no
    // infinity, so histograms end in the bound "+Inf" as Prometheus writes it.
    let json =
        gpuscale_agent::node::render_snapshot(&snapshot, gpuscale_agent::node::OutputFormat::Json)
            .expect("json");
    let mut value: serde_json::Value = serde_json::from_str(&json).expect("parses");
    let ttft = value["engines"][0]["ttft_seconds"].take();
    assert_eq!(
        ttft["bounds"].as_array().and_then(|b| b.last()),
        Some(&"+Inf".into())
    );
    assert_eq!(ttft["count"], 20);
    let back: NodeSnapshot = serde_json::from_value(value).expect("the rest parses");
    let mut without_histograms = snapshot.clone();
    without_histograms.engines[0].ttft_seconds = None;
    assert_eq!(back, without_histograms);

    let nvml = FakeNvml::new(&h100s(8));
    let node = NodeConfig {
        gpus: gpuscale_agent::node::GpuConfig::Nvml(gpuscale_telemetry::NvmlConfig {
            library_path: nvml.library_path(),
            ..gpuscale_telemetry::NvmlConfig::default()
        }),
        ..node
    };
    let snapshot = sample_once(&name, &node, None, Duration::from_millis(100))
        .await
        .expect("sampled");
    assert_eq!(snapshot.gpus.len(), 8);
    assert!(snapshot.agent.nvml_available);
    assert!(
        snapshot
            .gpus
            .iter()
            .all(|g| g.metrics.gpm.and_then(|m| m.sm_util_ratio).is_some()),
        "GPM needs two samples: --once takes them"
    );

    let fake = NodeConfig::fake(FakeNodeConfig {
        gpus: vec![FakeGpuGroup {
            model: "NVIDIA H200".into(),
            count: 4,
            memory_gib: 141.0,
            power_limit_watts: 700.0,
            gpm_supported: true,
        }],
        ..FakeNodeConfig::default()
    });
    let snapshot = sample_once(&name, &fake, None, Duration::from_millis(10))
        .await
        .expect("sampled");
    assert_eq!(snapshot.gpus.len(), 4);
    let yaml =
        gpuscale_agent::node::render_snapshot(&snapshot, gpuscale_agent::node::OutputFormat::Yaml)
            .expect("yaml");
    eprintln!("{yaml}");
    let back: NodeSnapshot = serde_yaml::from_str(&yaml).expect("parses");
    assert_eq!(back.gpus.len(), 4);
}
