//! The uplink against a scripted scaler over loopback gRPC, and against no
//! scaler at all.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuscale_agent::{Agent, AgentConfig, BackoffConfig, LinkStatus};
use gpuscale_core::PodRef;
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use gpuscale_proto::{AgentReport, Directive, ReportBody};
use gpuscale_telemetry::fake::{FakeEngineConfig, FakeGpuGroup, FakeNode, FakeNodeConfig};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

fn node() -> FakeNode {
    let config = FakeNodeConfig {
        gpus: vec![FakeGpuGroup {
            model: "NVIDIA H100 80GB HBM3".into(),
            count: 2,
            memory_gib: 80.0,
            power_limit_watts: 700.0,
            gpm_supported: true,
        }],
        engines: vec![FakeEngineConfig {
            pod: "llama-0".into(),
            namespace: "default".into(),
            model: "llama".into(),
            gpus: 1,
            capacity_tokens_per_second: 3000.0,
            batch_limit: 256,
            mean_input_tokens: 512.0,
            mean_output_tokens: 256.0,
            kv_capacity_tokens: 400_000.0,
            warmup_seconds: 0.0,
        }],
        ..FakeNodeConfig::default()
    };
    FakeNode::new(&config, "node-a").expect("valid")
}

fn fast(url: String) -> AgentConfig {
    let mut c = AgentConfig::new(url, "node-a");
    c.sample_interval = Duration::from_millis(10);
    c.backoff = BackoffConfig {
        base: Duration::from_millis(2),
        cap: Duration::from_millis(20),
        jitter: 0.5,
    };
    c
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    // A liveness bound, not a timing assertion.
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Counts log events whose message contains a needle.
#[derive(Clone, Default)]
struct LogCounter(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        self.0.lock().expect("lock").push(m.0);
    }
}

impl LogCounter {
    fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }
}

#[tokio::test]
async fn unreachable_scaler_keeps_sampling_coalesces_and_logs_once() {
    use tracing_subscriber::layer::SubscriberExt;
    let logs = LogCounter::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(logs.clone()));

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let node = node();
    let agent = Agent::new(
        fast(format!("http://127.0.0.1:{port}")),
        node.gpu_source(),
        node.pod_source(),
        node.engine_source(),
    )
    .expect("valid config");
    let running = agent.start().await.expect("started");
    let handle = running.handle().clone();
    eventually("60 samples", || handle.health().samples_total >= 60).await;
    let health = handle.health();
    // Every state but the newest was replaced unsent.
    assert!(
        health.coalesced_total + 2 >= health.samples_total,
        "{health:?}"
    );
    assert!(matches!(
        *handle.link().borrow(),
        LinkStatus::Disconnected { .. }
    ));
    let text = handle.metrics().encode();
    let failures: u64 = text
        .lines()
        .find(|l| l.starts_with("gpuscale_agent_uplink_failures_total{reason=\"unreachable\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("failure counter exported");
    assert!(failures >= 3, "only {failures} attempts");
    assert_eq!(
        logs.count("scaler link down"),
        1,
        "logged once, not per attempt"
    );
    running.shutdown().await.expect("clean shutdown");
}

/// A scaler that records every report and follows a script per stream.
#[derive(Clone)]
struct ScriptedScaler {
    reports: mpsc::UnboundedSender<(usize, AgentReport)>,
    streams: Arc<Mutex<usize>>,
}

type DirectiveStream = Pin<Box<dyn Stream<Item = Result<v1::ScalerDirective, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for ScriptedScaler {
    type ReportStream = DirectiveStream;

    async fn report(
        &self,
        request: Request<Streaming<v1::NodeReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let stream_no = {
            let mut n = self.streams.lock().expect("lock");
            *n += 1;
            *n
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let mut count = 0;
            while let Ok(Some(msg)) = inbound.message().await {
                let report = AgentReport::try_from(msg).expect("agent sends valid reports");
                let seq = report.seq;
                count += 1;
                let _ = reports.send((stream_no, report));
                if stream_no == 1 && count == 3 {
                    // Pretend a gap: the agent must come back at once with a snapshot.
                    let _ = tx
                        .send(Err(Status::failed_precondition("sequence gap: test")))
                        .await;
                    return;
                }
                let _ = tx.send(Ok((&Directive::Ack { seq }).into())).await;
                if stream_no == 2 && count == 1 {
                    let pod = PodRef::new("default", "llama-0");
                    for d in [
                        Directive::DrainPod {
                            pod: pod.clone(),
                            reason: "scale-in".into(),
                        },
                        Directive::SetBatchLimit {
                            pod,
                            batch_limit: 48,
                        },
                        Directive::SetSampleInterval {
                            interval: Duration::from_millis(200),
                        },
                    ] {
                        let _ = tx.send(Ok((&d).into())).await;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tokio::test]
async fn stream_starts_with_a_snapshot_resyncs_on_failed_precondition_and_applies_directives() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let scaler = ScriptedScaler {
        reports: reports_tx,
        streams: Arc::new(Mutex::new(0)),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(scaler))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let node = node();
    let mut config = fast(format!("http://{addr}"));
    // A long backoff: the resync must not wait for it.
    config.backoff.base = Duration::from_secs(600);
    config.backoff.cap = Duration::from_secs(600);
    let agent = Agent::new(
        config,
        node.gpu_source(),
        node.pod_source(),
        node.engine_source(),
    )
    .expect("valid config");
    let handle = agent.handle();
    let running = agent.start().await.expect("started");

    let mut seen = Vec::new();
    while seen.len() < 6 {
        let r = tokio::time::timeout(Duration::from_secs(30), reports.recv())
            .await
            .expect("reports keep coming")
            .expect("server alive");
        seen.push(r);
    }
    let epoch = handle.boot_epoch();
    assert!(seen.iter().all(|(_, r)| r.boot_epoch == epoch));
    // Stream 1: snapshot, delta, delta with consecutive sequence numbers.
    assert_eq!(seen[0].0, 1);
    assert!(matches!(seen[0].1.body, ReportBody::Snapshot(_)));
    assert!(matches!(seen[1].1.body, ReportBody::Delta(_)));
    assert_eq!(seen[1].1.seq, seen[0].1.seq + 1);
    assert_eq!(seen[2].1.seq, seen[1].1.seq + 1);
    // Stream 2 opens right after FAILED_PRECONDITION, with a snapshot, and
    // the sequence keeps growing across the reconnect.
    assert_eq!(seen[3].0, 2);
    match &seen[3].1.body {
        ReportBody::Snapshot(s) => {
            assert_eq!(s.gpus.len(), 2);
            assert_eq!(s.engines.len(), 1);
            assert_eq!(s.pods.len(), 1);
        }
        ReportBody::Delta(_) => panic!("a new stream must start with a snapshot"),
    }
    assert!(seen[3].1.seq > seen[2].1.seq);
    assert_eq!(seen[4].1.seq, seen[3].1.seq + 1);

    let mut directives = handle.directives();
    directives
        .wait_for(|d| !d.draining.is_empty() && !d.batch_limits.is_empty())
        .await
        .expect("directives arrive");
    let pod = PodRef::new("default", "llama-0");
    assert!(directives.borrow().is_draining(&pod));
    assert_eq!(directives.borrow().batch_limit(&pod), Some(48));
    assert_eq!(
        directives.borrow().sample_interval,
        Some(Duration::from_millis(200))
    );
    assert_eq!(handle.health().reconnects_total, 1);
    running.shutdown().await.expect("clean shutdown");
    server.abort();
}
