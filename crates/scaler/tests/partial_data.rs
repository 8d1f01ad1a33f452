//! Never act on partial data, over real gRPC on loopback with crafted agent
//! streams: a scaler that just started publishes and actuates nothing until
//! its warm-up is over (KEDA's `GetMetrics` answers `UNAVAILABLE`, never a
//! count made from no data), and a node that goes silent without closing its
//! stream causes no scale-in while it is missing (at a lower
//! `completeness.minReportingShare`, its load is still carried); with
//! `expectedNodes`, a standalone warm-up ends once those have reported.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gpuscale_core::sample::{
    AgentHealth, EngineSample, EngineState, Framework, NodeDelta, NodeSnapshot,
};
use gpuscale_core::{NodeName, PodRef, Timestamp, WorkloadRef};
use gpuscale_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use gpuscale_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_client::AgentServiceClient;
use gpuscale_proto::{AgentReport, Directive, ReportBody};
use gpuscale_scaler::{RunningScaler, Scaler, ScalerConfig, ScalerFile};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Generated tokens per second one replica sustains in these workloads.
const CAPACITY: f64 = 100.0;

fn config(warmup: Duration, node_ttl: Duration) -> ScalerConfig {
    let file: ScalerFile = serde_yaml::from_str(&format!(
        "workloads:
  - {{name: chat, namespace: llm, engines: {{model: m}}, proportional: {{capacityTokensPerSecond: {CAPACITY}, targetUtilization: 0.8, maxReplicas: 20, scaleDownStabilization: 1s, tolerance: 0.05, staleAfter: 30s}}}}
"
    ))
    .unwrap();
    let mut c = ScalerConfig::new("127.0.0.1:0".parse().unwrap());
    c.tick = Duration::from_millis(100);
    c.warmup = warmup;
    c.node_ttl = node_ttl;
    c.window = Duration::from_secs(2);
    c.workloads = file.workloads(Path::new(".")).unwrap();
    c
}

fn chat() -> WorkloadRef {
    WorkloadRef::new("llm", "chat")
}

async fn channel(scaler: &RunningScaler) -> Channel {
    Endpoint::from_shared(format!("http://{}", scaler.grpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn wall_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A crafted agent: one node, its pods each generating `rate` tokens/s,
/// reporting every 100 ms. While `silent` is set it sends nothing but keeps
/// its stream open; when the scaler ends its stream it opens a new one with
/// a snapshot, as the agent does. Drain directives it receives are counted,
/// and so are the streams it opened.
struct FakeAgent {
    silent: Arc<AtomicBool>,
    streams: Arc<AtomicU64>,
    drains: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    fn start(channel: Channel, node: &str, pods: &[&str], rate: f64) -> Self {
        let silent = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(AtomicU64::new(0));
        let drains = Arc::new(AtomicU64::new(0));
        let node = node.to_string();
        let pods: Vec<String> = pods.iter().map(|p| p.to_string()).collect();
        let task = tokio::spawn({
            let (silent, streams, drains) = (silent.clone(), streams.clone(), drains.clone());
            async move {
                let started = wall_ms();
                let engines = |at: i64| -> Vec<EngineSample> {
                    pods.iter()
                        .map(|p| {
                            let mut e = EngineSample::empty(
                                PodRef::new("llm", p.as_str()),
                                Framework::Fake,
                                "m",
                                Timestamp::from_millis(at),
                            );
                            e.state = EngineState::Warm;
                            e.generation_tokens_total = Some(rate * (at - started) as f64 / 1000.0);
                            e.requests_running = Some(1.0);
                            e.requests_waiting = Some(0.0);
                            e
                        })
                        .collect()
                };
                let mut seq = 0u64;
                let mut tx: Option<mpsc::Sender<v1::NodeReport>> = None;
                let ended = Arc::new(AtomicBool::new(false));
                let mut ticker = tokio::time::interval(Duration::from_millis(100));
                loop {
                    ticker.tick().await;
                    if silent.load(Ordering::SeqCst) {
                        continue;
                    }
                    let at = wall_ms();
                    seq += 1;
                    if tx.is_none() || ended.swap(false, Ordering::SeqCst) {
                        streams.fetch_add(1, Ordering::SeqCst);
                        let snapshot = ReportBody::Snapshot(NodeSnapshot {
                            node: NodeName::new(node.as_str()),
                            agent_version: "test".into(),
                            sampled_at: Timestamp::from_millis(at),
                            sample_interval_ms: 100,
                            gpus: vec![],
                            pods: vec![],
                            engines: engines(at),
                            agent: AgentHealth::default(),
                        });
                        let (new_tx, rx) = mpsc::channel(64);
                        new_tx.send(wire(seq, snapshot)).await.unwrap();
                        let mut inbound = AgentServiceClient::new(channel.clone())
                            .report(ReceiverStream::new(rx))
                            .await
                            .unwrap()
                            .into_inner();
                        let (drains, ended) = (drains.clone(), ended.clone());
                        tokio::spawn(async move {
                            while let Ok(Some(d)) = inbound.message().await {
                                if matches!(Directive::try_from(d), Ok(Directive::DrainPod { .. }))
                                {
                                    drains.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            ended.store(true, Ordering::SeqCst);
                        });
                        tx = Some(new_tx);
                        continue;
                    }
                    let delta = ReportBody::Delta(NodeDelta {
                        sampled_at: Timestamp::from_millis(at),
                        engines_upserted: engines(at),
                        ..NodeDelta::default()
                    });
                    if let Some(t) = &tx
                        && t.send(wire(seq, delta)).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        Self {
            silent,
            streams,
            drains,
            task,
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn wire(seq: u64, body: ReportBody) -> v1::NodeReport {
    (&AgentReport {
        boot_epoch: 1,
        seq,
        sent_at: Timestamp::from_millis(wall_ms()),
        body,
    })
        .into()
}

async fn get_metrics(channel: Channel) -> Result<i64, tonic::Status> {
    ExternalScalerClient::new(channel)
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(ScaledObjectRef {
                name: "chat".into(),
                namespace: "llm".into(),
                scaler_metadata: Default::default(),
            }),
            metric_name: "gpuscale-desired-replicas".into(),
        })
        .await
        .map(|r| r.into_inner().metric_values[0].metric_value_float.round() as i64)
}

#[tokio::test]
async fn a_started_scaler_publishes_and_actuates_nothing_until_its_warm_up_is_over() {
    let warmup = Duration::from_millis(1500);
    let started = Instant::now();
    let scaler = Scaler::new(config(warmup, Duration::from_secs(5)))
        .start()
        .await
        .unwrap();
    let ch = channel(&scaler).await;
    // Two nodes, 180 tokens/s each: 5 replicas at 80 tokens/s per replica.
    let _a = FakeAgent::start(ch.clone(), "node-a", &["a-0"], 180.0);
    let _b = FakeAgent::start(ch.clone(), "node-b", &["b-0"], 180.0);
    let mut answered = Vec::new();
    while started.elapsed() < warmup + Duration::from_secs(2) {
        let at = started.elapsed();
        let r = get_metrics(ch.clone()).await;
        let view = scaler.view().borrow().clone();
        let w = view.workloads.get(&chat());
        match &r {
            // The one count it may publish is from data: never 1.
            Ok(v) => assert_ne!(*v, 1, "published 1 at {at:?}"),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                // Said from the decide loop's first tick on.
                if at > Duration::from_millis(300) && at < warmup {
                    assert!(s.message().contains("warming up"), "{s:?}");
                }
            }
        }
        if started.elapsed() < warmup - Duration::from_millis(100) {
            assert!(r.is_err(), "published during the warm-up: {r:?} at {at:?}");
            assert!(
                w.is_none_or(|w| w.decision.is_none() && w.last_actuation.is_none()),
                "acted at {at:?}"
            );
        }
        answered.push(r.ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // After the warm-up: decided from both nodes' load.
    assert_eq!(answered.last().copied().flatten(), Some(5), "{answered:?}");
    scaler.shutdown().await.unwrap();
}

fn metric(scaler: &RunningScaler, name: &str) -> Option<f64> {
    let text = scaler.handle().metrics().encode();
    let prefix = format!("{name}{{namespace=\"llm\",workload=\"chat\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_silent_node_causes_no_scale_in_and_decisions_resume_when_it_returns() {
    let node_ttl = Duration::from_secs(1);
    let tick = Duration::from_millis(100);
    let scaler = Scaler::new(config(Duration::ZERO, node_ttl))
        .start()
        .await
        .unwrap();
    let ch = channel(&scaler).await;
    // Three nodes of two replicas, 70 tokens/s each: 420 tokens/s needs
    // 6 replicas at 80 tokens/s; without node-c's 140 it would be 4.
    let a = FakeAgent::start(ch.clone(), "node-a", &["a-0", "a-1"], 70.0);
    let b = FakeAgent::start(ch.clone(), "node-b", &["b-0", "b-1"], 70.0);
    let c = FakeAgent::start(ch.clone(), "node-c", &["c-0", "c-1"], 70.0);
    let decision = || {
        let view = scaler.view().borrow().clone();
        view.workloads.get(&chat()).and_then(|w| w.decision.clone())
    };
    let guard = Instant::now();
    loop {
        if let Some(d) = decision()
            && d.current_replicas == 6
            && d.desired_replicas == 6
            && !d.summary().contains("incomplete")
        {
            break;
        }
        assert!(
            guard.elapsed() < Duration::from_secs(20),
            "never settled: {:?}",
            decision().map(|d| d.summary())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // node-c goes silent without closing its stream, for twice the node
    // TTL and the stabilization window (1 s) and a second more.
    c.silent.store(true, Ordering::SeqCst);
    let silent_from = Instant::now();
    let mut said_incomplete = false;
    let mut expired = false;
    while silent_from.elapsed() < 2 * node_ttl + Duration::from_secs(2) {
        let d = decision().unwrap();
        assert!(
            d.desired_replicas >= 6,
            "scaled in on missing data: {}",
            d.summary()
        );
        said_incomplete |= d
            .summary()
            .contains("incomplete: 4 of 6 replicas reported (silent: node-c)");
        expired |= !scaler
            .view()
            .borrow()
            .nodes
            .contains_key(&NodeName::new("node-c"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(said_incomplete, "{}", decision().unwrap().summary());
    assert!(expired, "node-c outlived its TTL");
    assert_eq!(
        metric(&scaler, "gpuscale_scaler_workload_replicas_expected"),
        Some(6.0)
    );
    assert_eq!(
        metric(&scaler, "gpuscale_scaler_workload_replicas_reporting"),
        Some(4.0)
    );
    assert_eq!(
        a.drains.load(Ordering::SeqCst) + b.drains.load(Ordering::SeqCst),
        0,
        "healthy pods drained"
    );
    // It returns. The scaler ended its silent stream when the node expired;
    // the agent opens a new one with a snapshot, and decisions are complete
    // again within two ticks of its engines reporting with a window.
    assert_eq!(c.streams.load(Ordering::SeqCst), 1);
    c.silent.store(false, Ordering::SeqCst);
    let returned = Instant::now();
    let mut reported_at = None;
    loop {
        let view = scaler.view().borrow().clone();
        if reported_at.is_none()
            && view.nodes.get(&NodeName::new("node-c")).is_some_and(|n| {
                n.engines.len() == 2 && n.engines.iter().all(|e| e.window.covered_seconds > 0.0)
            })
        {
            reported_at = Some(view.published_at);
        }
        if let (Some(at), Some(d)) = (reported_at, view.workloads[&chat()].decision.as_ref())
            && d.at >= at
            && !d.summary().contains("incomplete")
        {
            let ticks = d.at.secs_since(at) / tick.as_secs_f64();
            assert!(
                ticks <= 2.0,
                "complete again {ticks:.1} ticks after node-c reported"
            );
            assert_eq!(d.desired_replicas, 6, "{}", d.summary());
            break;
        }
        assert!(
            returned.elapsed() < Duration::from_secs(10),
            "never complete again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        a.drains.load(Ordering::SeqCst) + b.drains.load(Ordering::SeqCst),
        0
    );
    assert_eq!(
        c.streams.load(Ordering::SeqCst),
        2,
        "resent a snapshot on a new stream"
    );
    // The others' streams were never ended.
    assert_eq!(
        a.streams.load(Ordering::SeqCst) + b.streams.load(Ordering::SeqCst),
        2
    );
    scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn at_a_lower_reporting_share_a_silent_nodes_load_is_still_carried() {
    let node_ttl = Duration::from_secs(1);
    let mut config = config(Duration::ZERO, node_ttl);
    config.min_reporting_share = 0.5;
    let scaler = Scaler::new(config).start().await.unwrap();
    let ch = channel(&scaler).await;
    // As above: 420 tokens/s over three nodes need 6 replicas.
    let a = FakeAgent::start(ch.clone(), "node-a", &["a-0", "a-1"], 70.0);
    let b = FakeAgent::start(ch.clone(), "node-b", &["b-0", "b-1"], 70.0);
    let c = FakeAgent::start(ch.clone(), "node-c", &["c-0", "c-1"], 70.0);
    let decision = || {
        let view = scaler.view().borrow().clone();
        view.workloads.get(&chat()).and_then(|w| w.decision.clone())
    };
    let guard = Instant::now();
    while !decision().is_some_and(|d| d.desired_replicas == 6 && d.current_replicas == 6) {
        assert!(guard.elapsed() < Duration::from_secs(20), "never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 4 of 6 is above the share: decisions stand, so only the carried load
    // of node-c keeps the count at 6 (without it, 4).
    c.silent.store(true, Ordering::SeqCst);
    let silent_from = Instant::now();
    let mut said = None;
    while silent_from.elapsed() < 2 * node_ttl + Duration::from_secs(2) {
        let d = decision().unwrap();
        assert!(
            d.desired_replicas >= 6,
            "scaled in on missing data: {}",
            d.summary()
        );
        let s = d.summary();
        if s.contains("incomplete: 4 of 6 replicas reported (silent: node-c)") {
            said = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let said = said.expect("said incomplete");
    assert!(
        said.contains("at least 3 required: deciding with the silent replicas' last load carried")
            && !said.contains("no scale-in"),
        "{said}"
    );
    assert_eq!(
        a.drains.load(Ordering::SeqCst) + b.drains.load(Ordering::SeqCst),
        0,
        "healthy pods drained"
    );
    scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_standalone_warm_up_ends_once_the_expected_nodes_have_reported() {
    // A long warm-up bound; the expected nodes end it early.
    let mut config = config(Duration::from_secs(60), Duration::from_secs(5));
    config.expected_nodes = ["node-a", "node-b"]
        .into_iter()
        .map(NodeName::new)
        .collect();
    let started = Instant::now();
    let scaler = Scaler::new(config).start().await.unwrap();
    let ch = channel(&scaler).await;
    // Only node-a at first: still warming up, waiting for node-b, although
    // node-a's engine has a rate.
    let _a = FakeAgent::start(ch.clone(), "node-a", &["a-0"], 180.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = get_metrics(ch.clone()).await;
    let status = r.expect_err("published before node-b reported");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("1 of 2 expected nodes (waiting for node-b)"),
        "{status:?}"
    );
    // node-b reports: decided from both within a few ticks, long before the
    // 60 s bound.
    let _b = FakeAgent::start(ch.clone(), "node-b", &["b-0"], 180.0);
    let b_started = Instant::now();
    let value = loop {
        match get_metrics(ch.clone()).await {
            Ok(v) => break v,
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        }
        assert!(
            b_started.elapsed() < Duration::from_secs(10),
            "still warming up {:?} after the start",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // 360 tokens/s at 80 per replica: 5, never node-a's 3 alone.
    assert_eq!(value, 5);
    scaler.shutdown().await.unwrap();
}
