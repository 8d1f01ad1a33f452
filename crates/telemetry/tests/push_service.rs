//! The node-local ServingService over a real unix socket, driven by the
//! generated client.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::Path;
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_core::ids::{GpuUuid, PodRef};
use gpuscale_core::sample::{ContainerGpus, EngineState, Framework, PodGpus};
use gpuscale_proto::v1;
use gpuscale_proto::v1::serving_service_client::ServingServiceClient;
use gpuscale_proto::v1::set_readiness_request::Readiness;
use gpuscale_telemetry::{EngineSource, LimitsHandle, PushConfig, PushEngineSource, push_source};
use hyper_util::rt::TokioIo;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

struct Fixture {
    client: ServingServiceClient<Channel>,
    source: PushEngineSource,
    limits: LimitsHandle,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn connect(socket: &Path) -> ServingServiceClient<Channel> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap();
    ServingServiceClient::new(channel)
}

async fn start(config: PushConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("serving.sock");
    let (service, source, limits) = push_source(config).unwrap();
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    let client = connect(&socket).await;
    Fixture {
        client,
        source,
        limits,
        _dir: dir,
        server,
    }
}

fn pod() -> PodRef {
    PodRef::new("llm", "engine-0")
}

fn wire_pod() -> Option<v1::PodRef> {
    Some(v1::PodRef {
        namespace: "llm".into(),
        name: "engine-0".into(),
    })
}

fn stats(generated: f64) -> v1::EngineStats {
    v1::EngineStats {
        pod: wire_pod(),
        model: "my-model".into(),
        requests_waiting: Some(3.0),
        requests_running: Some(16.0),
        kv_cache_usage_ratio: Some(0.7),
        generation_tokens_total: Some(generated),
        ttft_seconds: Some(v1::Histogram {
            upper_bounds: vec![0.1, 1.0, f64::INFINITY],
            cumulative_counts: vec![5, 9, 10],
            sum: 2.5,
            count: 10,
        }),
        batch_limit: Some(64),
        ..Default::default()
    }
}

fn at(secs: f64) -> Timestamp {
    Timestamp::from_secs_f64(1_700_000_000.0 + secs)
}

fn node_pods() -> Vec<PodGpus> {
    vec![PodGpus {
        pod: pod(),
        containers: vec![ContainerGpus {
            container: "engine".into(),
            resource_name: "nvidia.com/gpu".into(),
            gpu_uuids: vec![GpuUuid::new("GPU-7")],
        }],
    }]
}

#[tokio::test]
async fn pushed_stats_and_readiness_become_one_engine_sample() {
    let mut f = start(PushConfig::default()).await;
    let messages = futures::stream::iter(vec![stats(100.0), stats(200.0), stats(300.0)]);
    let resp = f.client.report_engine_stats(messages).await.unwrap();
    assert_eq!(resp.into_inner().accepted, 3);
    f.client
        .set_readiness(v1::SetReadinessRequest {
            pod: wire_pod(),
            readiness: Readiness::Warm as i32,
            message: "warmed up".into(),
        })
        .await
        .unwrap();

    let engines = f
        .source
        .sample_engines(at(0.0), &node_pods())
        .await
        .unwrap();
    assert_eq!(engines.len(), 1);
    let e = &engines[0];
    assert_eq!(e.pod, pod());
    assert_eq!(e.framework, Framework::Push);
    assert_eq!(e.model, "my-model");
    assert_eq!(e.state, EngineState::Warm);
    assert_eq!(
        e.generation_tokens_total,
        Some(300.0),
        "the latest message wins"
    );
    assert_eq!(e.requests_running, Some(16.0));
    assert_eq!(e.prompt_tokens_total, None, "not pushed: missing");
    assert_eq!(e.ttft_seconds.as_ref().unwrap().count(), 10);
    assert_eq!(e.batch_limit, Some(64));
    assert_eq!(e.gpu_uuids, vec![GpuUuid::new("GPU-7")]);
    assert_eq!(e.sampled_at, at(0.0));
    assert_eq!(f.source.stats().accepted_total, 4);
}

#[tokio::test]
async fn invalid_values_are_rejected_with_invalid_argument_naming_the_field() {
    let mut f = start(PushConfig::default()).await;
    let mut bad = stats(1.0);
    bad.requests_waiting = Some(f64::NAN);
    let err = f
        .client
        .report_engine_stats(futures::stream::iter(vec![stats(1.0), bad]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("requests_waiting"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("NaN"), "{}", err.message());

    let err = f
        .client
        .set_readiness(v1::SetReadinessRequest {
            pod: wire_pod(),
            readiness: 42,
            message: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("readiness"), "{}", err.message());

    let err = f
        .client
        .watch_limits(v1::WatchLimitsRequest { pod: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("pod"), "{}", err.message());

    let stats = f.source.stats();
    assert_eq!(stats.rejected_total, 3);
    assert_eq!(
        stats.accepted_total, 1,
        "the valid message before the bad one"
    );
}

#[tokio::test]
async fn watch_limits_sends_the_current_value_then_each_change() {
    let mut f = start(PushConfig::default()).await;
    f.limits.set_batch_limit(&pod(), Some(48));
    let mut stream = f
        .client
        .watch_limits(v1::WatchLimitsRequest { pod: wire_pod() })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.batch_limit, Some(48));
    assert!(!first.draining);
    assert_eq!(first.pod, wire_pod());

    f.limits.set_batch_limit(&pod(), Some(32));
    f.limits.set_batch_limit(&pod(), Some(32)); // unchanged: not sent again
    f.limits.set_draining(&pod(), true);
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(second.batch_limit, Some(32));
    let third = stream.message().await.unwrap().unwrap();
    assert_eq!(third.batch_limit, Some(32));
    assert!(third.draining);
    assert_eq!(f.limits.watcher_count(&pod()), 1);

    // Draining shows in the engine's state.
    f.client
        .report_engine_stats(futures::stream::iter(vec![stats(1.0)]))
        .await
        .unwrap();
    let engines = f.source.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(engines[0].state, EngineState::Draining);
}

#[tokio::test]
async fn an_engine_that_stops_pushing_turns_failed_and_is_then_forgotten() {
    let mut f = start(PushConfig {
        stale_after: Duration::from_secs(10),
        forget_after: Duration::from_secs(60),
        ..PushConfig::default()
    })
    .await;
    f.client
        .report_engine_stats(futures::stream::iter(vec![stats(1.0)]))
        .await
        .unwrap();
    let e = f.source.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(e[0].requests_running, Some(16.0));
    assert_eq!(e[0].state, EngineState::Unknown, "no readiness declared");

    let e = f.source.sample_engines(at(9.0), &[]).await.unwrap();
    assert_eq!(e[0].requests_running, Some(16.0));
    let e = f.source.sample_engines(at(10.0), &[]).await.unwrap();
    assert_eq!(e[0].state, EngineState::Failed);
    assert_eq!(e[0].requests_running, None);
    assert_eq!(e[0].model, "my-model");
    let e = f.source.sample_engines(at(60.0), &[]).await.unwrap();
    assert!(e.is_empty());
}

#[tokio::test]
async fn a_full_channel_drops_updates_and_counts_them() {
    let mut f = start(PushConfig {
        channel_capacity: 2,
        ..PushConfig::default()
    })
    .await;
    let resp = f
        .client
        .report_engine_stats(futures::stream::iter(
            (1..=5).map(|i| stats(f64::from(i))).collect::<Vec<_>>(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().accepted, 5, "valid messages are accepted");
    let stats = f.source.stats();
    assert_eq!(stats.accepted_total, 2);
    assert_eq!(stats.dropped_full_total, 3);
    let e = f.source.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(e[0].generation_tokens_total, Some(2.0));
}
