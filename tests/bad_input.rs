//! Every kind of bad input on the agent stream, sent with a raw generated
//! client: each gets the right gRPC status naming the problem, and a healthy
//! agent streaming beside it is never disturbed.

mod support;

use std::time::Duration;

use gpuscale_core::sample::{
    AgentHealth, EngineSample, Framework, GpuHealth, GpuInfo, GpuMetrics, GpuSample, NodeDelta,
    NodeSnapshot,
};
use gpuscale_core::{GpuUuid, Histogram, NodeName, PodRef, Timestamp};
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_client::AgentServiceClient;
use gpuscale_proto::{AgentReport, ReportBody};
use gpuscale_scaler::{Scaler, ScalerConfig};
use support::{fake_node, start_agent, wait_for_view};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::Bytes;

fn snapshot(node: &str) -> NodeSnapshot {
    let uuid = GpuUuid::new(format!("GPU-{node}-0"));
    let mut engine = EngineSample::empty(
        PodRef::new("default", "p0"),
        Framework::Vllm,
        "m",
        Timestamp(1),
    );
    engine.ttft_seconds = Some(Histogram::ttft());
    NodeSnapshot {
        node: NodeName::new(node),
        agent_version: "test".into(),
        sampled_at: Timestamp(1),
        sample_interval_ms: 1000,
        gpus: vec![GpuSample {
            info: GpuInfo {
                uuid: uuid.clone(),
                index: 0,
                model_name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                pci_bus_id: String::new(),
                parent_uuid: None,
                mig_gpu_instance_id: None,
                gpm_supported: true,
                driver_version: "570".into(),
            },
            metrics: GpuMetrics {
                uuid,
                memory_used_bytes: Some(1 << 30),
                utilization_gpu_ratio: Some(0.5),
                power_watts: Some(300.0),
                health: GpuHealth::Healthy,
                ..GpuMetrics::default()
            },
        }],
        pods: vec![],
        engines: vec![engine],
        agent: AgentHealth::default(),
    }
}

fn wire(epoch: u64, seq: u64, body: ReportBody) -> v1::NodeReport {
    (&AgentReport {
        boot_epoch: epoch,
        seq,
        sent_at: Timestamp(1),
        body,
    })
        .into()
}

fn wire_snapshot(node: &str, edit: impl FnOnce(&mut v1::NodeSnapshot)) -> v1::NodeReport {
    let mut r = wire(1, 1, ReportBody::Snapshot(snapshot(node)));
    if let Some(v1::node_report::Body::Snapshot(s)) = r.body.as_mut() {
        edit(s);
    }
    r
}

fn delta() -> ReportBody {
    ReportBody::Delta(NodeDelta {
        sampled_at: Timestamp(2),
        ..NodeDelta::default()
    })
}

/// Sends `reports` on one stream and returns the status that ends it.
async fn status_after(url: &str, reports: Vec<v1::NodeReport>) -> tonic::Status {
    let mut client = AgentServiceClient::connect(url.to_string())
        .await
        .expect("connects");
    let (tx, rx) = mpsc::channel(reports.len().max(1));
    for r in reports {
        tx.send(r).await.expect("queued");
    }
    let response = client.report(ReceiverStream::new(rx)).await;
    let status = match response {
        Err(status) => status,
        Ok(r) => {
            let mut inbound = r.into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
                    Ok(Ok(Some(_directive))) => continue,
                    Ok(Ok(None)) => panic!("the stream ended without an error"),
                    Ok(Err(status)) => break status,
                    Err(_) => panic!("no status within the liveness bound"),
                }
            }
        }
    };
    drop(tx);
    status
}

/// A codec that sends raw bytes as the request message.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = v1::ScalerDirective;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<v1::ScalerDirective>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

async fn malformed_status(url: &str) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connects");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    // Field 10 (snapshot) as length-delimited with a length running past the end.
    let garbage = Bytes::from_static(&[0x08, 0x01, 0x52, 0x7f, 0x01, 0x02]);
    let request = tonic::Request::new(tokio_stream::iter(vec![garbage]));
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/gpuscale.v1.AgentService/Report");
    let result: Result<tonic::Response<tonic::Streaming<v1::ScalerDirective>>, tonic::Status> =
        grpc.streaming(request, path, RawCodec).await;
    match result {
        Err(s) => s,
        Ok(r) => {
            let mut inbound = r.into_inner();
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("ended without an error"),
                    Err(s) => break s,
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_status_and_other_agents_keep_streaming() {
    let scaler = Scaler::new(ScalerConfig::new("127.0.0.1:0".parse().expect("addr")))
        .start()
        .await
        .expect("scaler starts");
    let url = format!("http://{}", scaler.grpc_addr());
    let healthy_node = fake_node("healthy", 2, &["healthy-llama-0"]);
    let healthy = start_agent(&url, &healthy_node, "healthy").await;
    let mut view = scaler.view();
    let healthy_name = NodeName::new("healthy");
    wait_for_view(&mut view, "the healthy agent", |v| {
        v.nodes.get(&healthy_name).is_some_and(|n| n.last_seq >= 2)
    })
    .await;

    let oversized = wire_snapshot("big", |s| s.agent_version = "x".repeat(2 << 20));
    let cases: Vec<(&str, Code, &str, Vec<v1::NodeReport>)> = vec![
        (
            "oversized",
            Code::ResourceExhausted,
            "limit of 1048576 bytes",
            vec![oversized],
        ),
        (
            "delta first",
            Code::FailedPrecondition,
            "unknown epoch 1",
            vec![wire(1, 1, delta())],
        ),
        (
            "out of order",
            Code::InvalidArgument,
            "out of order",
            vec![
                wire(1, 5, ReportBody::Snapshot(snapshot("b1"))),
                wire(1, 6, delta()),
                wire(1, 6, delta()),
            ],
        ),
        (
            "unknown epoch",
            Code::FailedPrecondition,
            "unknown epoch 2",
            vec![
                wire(1, 1, ReportBody::Snapshot(snapshot("b2"))),
                wire(2, 2, delta()),
            ],
        ),
        (
            "sequence gap",
            Code::FailedPrecondition,
            "expected seq 2, got 4",
            vec![
                wire(1, 1, ReportBody::Snapshot(snapshot("b3"))),
                wire(1, 4, delta()),
            ],
        ),
        (
            "NaN",
            Code::InvalidArgument,
            "snapshot.gpus[0].metrics.utilization_gpu_ratio: NaN is not a finite number",
            vec![wire_snapshot("b4", |s| {
                s.gpus[0]
                    .metrics
                    .as_mut()
                    .expect("metrics")
                    .utilization_gpu_ratio = Some(f64::NAN)
            })],
        ),
        (
            "negative",
            Code::InvalidArgument,
            "snapshot.gpus[0].metrics.power_watts: -5 is outside 0..=5000 W",
            vec![wire_snapshot("b5", |s| {
                s.gpus[0].metrics.as_mut().expect("metrics").power_watts = Some(-5.0)
            })],
        ),
        (
            "absurd power",
            Code::InvalidArgument,
            "snapshot.gpus[0].metrics.power_watts: 90000 is outside 0..=5000 W",
            vec![wire_snapshot("b7", |s| {
                s.gpus[0].metrics.as_mut().expect("metrics").power_watts = Some(90_000.0)
            })],
        ),
        (
            "memory above total",
            Code::InvalidArgument,
            "snapshot.gpus[0].metrics.memory_used_bytes",
            vec![wire_snapshot("b8", |s| {
                s.gpus[0]
                    .metrics
                    .as_mut()
                    .expect("metrics")
                    .memory_used_bytes = Some(81 << 30)
            })],
        ),
        (
            "no body",
            Code::InvalidArgument,
            "report.body: missing",
            vec![v1::NodeReport {
                boot_epoch: 1,
                seq: 1,
                sent_at_unix_ms: 1,
                body: None,
            }],
        ),
    ];

    for (name, code, needle, reports) in cases {
        let last_seq = view.borrow().nodes[&healthy_name].last_seq;
        let status = status_after(&url, reports).await;
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: {:?}",
            status.message()
        );
        // The healthy agent's stream keeps being applied.
        wait_for_view(&mut view, "the healthy agent to keep streaming", |v| {
            v.nodes[&healthy_name].last_seq > last_seq + 1
        })
        .await;
    }

    let status = malformed_status(&url).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("malformed report"),
        "{:?}",
        status.message()
    );

    // None of the rejected streams left a node behind, and the healthy agent
    // never lost its stream.
    let last_seq = view.borrow().nodes[&healthy_name].last_seq;
    let v = wait_for_view(&mut view, "the healthy agent after all of it", |v| {
        v.nodes[&healthy_name].last_seq > last_seq + 1
    })
    .await;
    let names: Vec<_> = v.nodes.keys().map(|n| n.as_str().to_string()).collect();
    assert!(names.contains(&"healthy".to_string()));
    assert!(!names.iter().any(|n| n == "big"));
    assert_eq!(healthy.handle().health().reconnects_total, 0);
    assert!(healthy.handle().link().borrow().is_connected());
    let metrics = scaler.handle().metrics().encode();
    for reason in [
        "oversized",
        "not_snapshot_first",
        "out_of_order",
        "unknown_epoch",
        "sequence_gap",
        "invalid_value",
        "malformed",
    ] {
        assert!(
            metrics.contains(&format!(
                "gpuscale_scaler_reports_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason} counted"
        );
    }

    healthy.shutdown().await.expect("agent stops");
    scaler.shutdown().await.expect("scaler stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_engine_entry_is_left_out_and_its_node_stays() {
    let scaler = Scaler::new(ScalerConfig::new("127.0.0.1:0".parse().expect("addr")))
        .start()
        .await
        .expect("scaler starts");
    let url = format!("http://{}", scaler.grpc_addr());
    let mut view = scaler.view();
    // Three engines on one node: an absurd ratio, a model name longer than
    // the protocol allows, a histogram whose counts go down; and a good one.
    let mut report = wire_snapshot("mixed", |s| {
        let good = s.engines[0].clone();
        s.engines[0].kv_cache_usage_ratio = Some(1.7);
        let mut long = good.clone();
        long.pod.as_mut().expect("pod").name = "long-name".into();
        long.model = "m".repeat(300);
        let mut bad_h = good.clone();
        bad_h.pod.as_mut().expect("pod").name = "bad-histogram".into();
        bad_h
            .ttft_seconds
            .as_mut()
            .expect("histogram")
            .cumulative_counts[0] = 9;
        let mut ok = good;
        ok.pod.as_mut().expect("pod").name = "ok-0".into();
        s.engines.extend([long, bad_h, ok]);
    });
    report.seq = 1;
    let mut client = AgentServiceClient::connect(url.clone())
        .await
        .expect("connects");
    let (tx, rx) = mpsc::channel(4);
    tx.send(report).await.expect("queued");
    let mut inbound = client
        .report(ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let node = NodeName::new("mixed");
    let v = wait_for_view(&mut view, "the node with its good engine", |v| {
        v.nodes.contains_key(&node)
    })
    .await;
    let n = &v.nodes[&node];
    assert_eq!(n.gpus.len(), 1, "the node's GPU is reported");
    let engines: Vec<&str> = n
        .engines
        .iter()
        .map(|e| e.sample.pod.name.as_str())
        .collect();
    assert_eq!(engines, ["ok-0"]);
    assert_eq!(scaler.handle().metrics().engines_rejected_total(), 3);
    let metrics = scaler.handle().metrics().encode();
    assert!(
        metrics.contains("gpuscale_scaler_engine_entries_rejected_total 3"),
        "{metrics}"
    );
    assert!(!metrics.contains("gpuscale_scaler_reports_rejected_total{reason=\"invalid_value\"}"));
    // The stream is still open: a delta continues it.
    tx.send(wire(1, 2, delta())).await.expect("queued");
    wait_for_view(&mut view, "the delta applied", |v| {
        v.nodes.get(&node).is_some_and(|n| n.last_seq == 2)
    })
    .await;
    // Directives may come; no status ends the stream.
    let quiet = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match inbound.message().await {
                Ok(Some(_directive)) => continue,
                other => break other,
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the stream ended: {quiet:?}");
    drop(tx);
    scaler.shutdown().await.expect("scaler stops");
}
