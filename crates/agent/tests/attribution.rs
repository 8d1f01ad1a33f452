//! GPU-to-pod attribution off the sampling loop: a kubelet whose
//! PodResources API accepts and never answers does not slow sampling, does
//! not fail `/healthz`, and the mapping reports its age.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use gpuscale_agent::node::{KubernetesMode, OutputFormat};
use gpuscale_agent::{AgentConfig, NodeConfig, render_once, sample_once_report, start_node};
use gpuscale_core::{NodeName, PodRef};
use gpuscale_proto::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use gpuscale_proto::podresources::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use gpuscale_telemetry::{EngineTarget, PodResourcesConfig};
use support::engine::{Behaviour, FakeEngine, MetricsReply};
use support::fake_nvml::{FakeNvml, h100s};
use support::{eventually, http_get, sample_value};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

const GPU1: &str = "GPU-00000000-0000-0000-0000-000000000001";

/// A kubelet that answers `List` until told to hang, then accepts every
/// call and never answers it.
#[derive(Clone, Default)]
struct Kubelet {
    hang: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    /// Device IDs listed for the pod `llm/llama-0`.
    devices: Vec<String>,
}

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: "llama-0".into(),
                namespace: "llm".into(),
                containers: vec![ContainerResources {
                    name: "server".into(),
                    devices: vec![ContainerDevices {
                        resource_name: "nvidia.com/gpu".into(),
                        device_ids: self.devices.clone(),
                        topology: None,
                    }],
                    ..ContainerResources::default()
                }],
                ..PodResources::default()
            }],
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

fn serve(socket: &std::path::Path, kubelet: Kubelet) {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind the socket");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(kubelet))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
}

/// GETs `/healthz`: its status code.
async fn healthz(addr: std::net::SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_kubelet_never_stalls_sampling_or_health_and_the_mapping_reports_its_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("kubelet.sock");
    let nvml = FakeNvml::new(&h100s(2));
    let kubelet = Kubelet {
        // The second ID is not a GPU of this node: counted, not attributed.
        devices: vec![
            GPU1.into(),
            "GPU-99999999-0000-0000-0000-000000000000".into(),
        ],
        ..Kubelet::default()
    };
    serve(&socket, kubelet.clone());

    let interval = Duration::from_millis(250);
    let mut node = NodeConfig::nvml(nvml.library_path());
    node.kubernetes = KubernetesMode::Off;
    node.pod_resources = Some(PodResourcesConfig {
        socket_path: socket.clone(),
        min_refresh_interval: Duration::from_millis(500),
        call_timeout: Duration::from_secs(2),
        ..PodResourcesConfig::default()
    });
    let mut config = AgentConfig::new("http://127.0.0.1:9", "node-a");
    config.sample_interval = interval;
    config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let running = start_node(config, node, None).await.expect("started");
    let handle = running.handle().clone();
    let addr = running.metrics_addr().expect("metrics");
    let llama = PodRef::new("llm", "llama-0");
    let attributed = |h: &gpuscale_agent::AgentHandle| {
        h.latest_snapshot().is_some_and(|s| {
            s.pods
                .iter()
                .any(|p| p.pod == llama && p.gpu_uuids().iter().map(|u| u.as_str()).eq([GPU1]))
        })
    };
    eventually("the pod attributed to its GPU", || attributed(&handle)).await;
    let text = http_get(addr, "/metrics").await;
    assert_eq!(
        sample_value(&text, "gpuscale_agent_attribution_stale"),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample_value(
            &text,
            "gpuscale_agent_source_errors_total{source=\"pod_resources\",kind=\"unmapped_device\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "a GPU that is not on this node is counted as unmapped: {text}"
    );

    // The kubelet hangs: every call is accepted and never answered.
    kubelet.hang.store(true, Ordering::SeqCst);
    let calls = kubelet.calls.load(Ordering::SeqCst);
    eventually("a call to the hung kubelet", || {
        kubelet.calls.load(Ordering::SeqCst) > calls
    })
    .await;

    // Over the next 8 s (several call deadlines): sampling keeps its
    // interval and /healthz answers 200 every time it is asked.
    let window = Duration::from_secs(8);
    let started = tokio::time::Instant::now();
    let samples_before = handle.health().samples_total;
    let mut polls = 0;
    while started.elapsed() < window {
        assert_eq!(healthz(addr).await, 200, "after {:?}", started.elapsed());
        polls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let samples = handle.health().samples_total - samples_before;
    let expected = elapsed.as_secs_f64() / interval.as_secs_f64();
    assert!(
        (samples as f64 - expected).abs() <= expected * 0.1,
        "{samples} samples in {elapsed:?}, {expected:.1} expected at one per {interval:?}"
    );
    assert!(polls >= 30, "{polls} polls");
    assert!(
        kubelet.calls.load(Ordering::SeqCst) >= calls + 3,
        "the kubelet was tried again after each deadline"
    );

    // The last good mapping is still reported, and its age with it.
    assert!(attributed(&handle), "the last known mapping is kept");
    let text = http_get(addr, "/metrics").await;
    let age = sample_value(&text, "gpuscale_agent_attribution_age_seconds").expect("an age");
    assert!(age >= window.as_secs_f64(), "age {age} s: {text}");
    assert_eq!(
        sample_value(&text, "gpuscale_agent_attribution_stale"),
        Some(1.0)
    );
    assert!(
        sample_value(
            &text,
            "gpuscale_agent_source_errors_total{source=\"pod_resources\",kind=\"timeout\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{text}"
    );
    assert_eq!(
        sample_value(&text, "gpuscale_agent_source_up{source=\"pod_resources\"}"),
        Some(0.0)
    );

    // The kubelet answers again: fresh.
    kubelet.hang.store(false, Ordering::SeqCst);
    eventually("the mapping is fresh again", || {
        let stats = running.stats().snapshot();
        stats
            .attribution
            .is_some_and(|a| !a.stale() && a.age().is_some_and(|x| x < Duration::from_secs(2)))
    })
    .await;
    running.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_reports_the_attribution_age_and_why_each_engine_is_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nvml = FakeNvml::new(&h100s(2));

    // A kubelet socket that accepts connections and never says anything.
    let socket = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let failing = FakeEngine::with(
        "m",
        Behaviour {
            metrics: MetricsReply::Status(500),
            health: 200,
            completions_fail: false,
            completions: 0,
        },
    )
    .await;
    let empty = FakeEngine::with(
        "m",
        Behaviour {
            metrics: MetricsReply::Empty,
            health: 200,
            completions_fail: false,
            completions: 0,
        },
    )
    .await;
    let mut node = NodeConfig::nvml(nvml.library_path());
    node.kubernetes = KubernetesMode::Off;
    node.pod_resources = Some(PodResourcesConfig {
        socket_path: socket.clone(),
        call_timeout: Duration::from_secs(1),
        ..PodResourcesConfig::default()
    });
    node.engines = vec![
        EngineTarget::parse_flag(&format!("llm/failing-0=vllm={}", failing.metrics_url()))
            .expect("target"),
        EngineTarget::parse_flag(&format!("llm/empty-0=vllm={}", empty.metrics_url()))
            .expect("target"),
    ];
    let started = tokio::time::Instant::now();
    let report = sample_once_report(
        &NodeName::new("node-a"),
        &node,
        None,
        Duration::from_millis(100),
    )
    .await
    .expect("sampled");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the silent kubelet bounds --once by its deadline"
    );
    assert_eq!(report.snapshot.gpus.len(), 2, "GPUs are reported");
    let a = report.attribution.clone().expect("kubelet attribution");
    assert!(!a.available);
    assert_eq!(a.age_seconds, None, "never answered");
    assert!(a.error.is_some_and(|e| e.contains("timeout")), "{report:?}");

    let json: serde_json::Value =
        serde_json::from_str(&render_once(&report, OutputFormat::Json).expect("json"))
            .expect("parses");
    assert_eq!(json["attribution"]["available"], false);
    assert!(json["attribution"]["age_seconds"].is_null());
    let engine = |name: &str| {
        json["engines"]
            .as_array()
            .and_then(|es| es.iter().find(|e| e["pod"]["name"] == name))
            .cloned()
            .expect("the engine")
    };
    let failing = engine("failing-0");
    assert_eq!(failing["state"], "failed");
    assert!(
        failing["error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP status 500")),
        "{failing}"
    );
    let empty = engine("empty-0");
    assert_eq!(empty["state"], "no_data");
    assert!(
        empty["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no data")),
        "{empty}"
    );
    let yaml = render_once(&report, OutputFormat::Yaml).expect("yaml");
    assert!(yaml.contains("attribution:"), "{yaml}");
    assert!(yaml.contains("state: no_data"), "{yaml}");
    assert!(yaml.contains("HTTP status 500"), "{yaml}");

    // A kubelet that answers: the mapping and its age.
    let socket = dir.path().join("kubelet.sock");
    serve(
        &socket,
        Kubelet {
            devices: vec![GPU1.into()],
            ..Kubelet::default()
        },
    );
    node.pod_resources = Some(PodResourcesConfig {
        socket_path: socket,
        call_timeout: Duration::from_secs(5),
        ..PodResourcesConfig::default()
    });
    let report = sample_once_report(
        &NodeName::new("node-a"),
        &node,
        None,
        Duration::from_millis(100),
    )
    .await
    .expect("sampled");
    assert_eq!(report.snapshot.pods.len(), 1, "{report:?}");
    let a = report.attribution.clone().expect("kubelet attribution");
    assert!(a.available && a.error.is_none(), "{a:?}");
    let json: serde_json::Value =
        serde_json::from_str(&render_once(&report, OutputFormat::Json).expect("json"))
            .expect("parses");
    assert!(
        json["attribution"]["age_seconds"]
            .as_f64()
            .is_some_and(|s| (0.0..30.0).contains(&s)),
        "{}",
        json["attribution"]
    );
}
