use std::time::Duration;

use gpuscale_core::GpuUuid;
use gpuscale_core::sample::{
    AgentHealth, ContainerGpus, EngineSample, Framework, GpuInfo, GpuMetrics, GpuSample,
};

use super::*;

fn gpu(i: u32, node: &str) -> GpuSample {
    let uuid = GpuUuid::new(format!("GPU-{node}-{i}"));
    GpuSample {
        info: GpuInfo {
            uuid: uuid.clone(),
            index: i,
            model_name: "H100".into(),
            memory_total_bytes: 80 << 30,
            pci_bus_id: String::new(),
            parent_uuid: None,
            mig_gpu_instance_id: None,
            gpm_supported: false,
            driver_version: String::new(),
        },
        metrics: GpuMetrics {
            uuid,
            utilization_gpu_ratio: Some(0.5),
            ..GpuMetrics::default()
        },
    }
}

fn engine(pod: &str, at: i64, generated: f64) -> EngineSample {
    let mut e = EngineSample::empty(
        PodRef::new("default", pod),
        Framework::Fake,
        "m",
        Timestamp(at),
    );
    e.state = EngineState::Warm;
    e.generation_tokens_total = Some(generated);
    e.requests_waiting = Some(0.0);
    e.requests_running = Some(1.0);
    e
}

fn snapshot(node: &str, at: i64, gpus: u32, pods: &[&str]) -> NodeSnapshot {
    NodeSnapshot {
        node: NodeName::new(node),
        agent_version: "test".into(),
        sampled_at: Timestamp(at),
        sample_interval_ms: 1000,
        gpus: (0..gpus).map(|i| gpu(i, node)).collect(),
        pods: pods
            .iter()
            .map(|p| PodGpus {
                pod: PodRef::new("default", *p),
                containers: vec![ContainerGpus {
                    container: "engine".into(),
                    resource_name: "nvidia.com/gpu".into(),
                    gpu_uuids: vec![],
                }],
            })
            .collect(),
        engines: pods.iter().map(|p| engine(p, at, 0.0)).collect(),
        agent: AgentHealth::default(),
    }
}

fn state() -> State {
    State::new(
        StateConfig {
            window: Duration::from_secs(30),
            node_ttl: Duration::from_secs(30),
        },
        Arc::new(ScalerMetrics::new()),
        [],
    )
}

fn report(stream: StreamId, seq: u64, body: ReportBody, out: Option<StreamOut>) -> Command {
    Command::Report {
        stream,
        report: Box::new(AgentReport {
            boot_epoch: 1,
            seq,
            sent_at: Timestamp(0),
            body,
        }),
        out,
    }
}

#[tokio::test(start_paused = true)]
async fn snapshot_replaces_the_node_and_drops_pods_that_are_gone() {
    let mut s = state();
    let (out, mut rx) = mpsc::channel(16);
    let now = Instant::now();
    s.apply(
        report(
            1,
            1,
            ReportBody::Snapshot(snapshot("a", 0, 2, &["p1", "p2"])),
            Some(out.clone()),
        ),
        now,
        Timestamp(0),
    );
    let v = s.publish(Timestamp(0));
    assert_eq!(v.nodes[&NodeName::new("a")].engines.len(), 2);
    assert_eq!(
        rx.try_recv().ok().map(|d| d.body.is_some()),
        Some(true),
        "acked"
    );
    // A new stream (the agent reconnected) with only p1.
    s.apply(
        report(
            2,
            5,
            ReportBody::Snapshot(snapshot("a", 1000, 2, &["p1"])),
            Some(out),
        ),
        now,
        Timestamp(1),
    );
    let v = s.publish(Timestamp(1));
    let node = &v.nodes[&NodeName::new("a")];
    assert_eq!(node.engines.len(), 1);
    assert_eq!(node.pods.len(), 1);
    assert_eq!(node.gpus.len(), 2);
    assert_eq!(node.last_seq, 5);
    // The engine's window survived the reconnect.
    assert_eq!(node.engines[0].window.covered_seconds, 1.0);
}

#[tokio::test(start_paused = true)]
async fn deltas_update_rates_and_old_streams_are_ignored() {
    let mut s = state();
    let (out, _rx) = mpsc::channel(64);
    let now = Instant::now();
    s.apply(
        report(
            1,
            1,
            ReportBody::Snapshot(snapshot("a", 0, 1, &["p1"])),
            Some(out.clone()),
        ),
        now,
        Timestamp(0),
    );
    let mut d = NodeDelta {
        sampled_at: Timestamp(10_000),
        ..NodeDelta::default()
    };
    d.engines_upserted.push(engine("p1", 10_000, 5_000.0));
    s.apply(report(1, 2, ReportBody::Delta(d), None), now, Timestamp(10));
    let v = s.publish(Timestamp(10));
    let e = &v.nodes[&NodeName::new("a")].engines[0];
    assert_eq!(e.window.generation_tokens_per_second, Some(500.0));
    // An unchanged engine is re-stamped by a delta that does not name it.
    s.apply(
        report(
            1,
            3,
            ReportBody::Delta(NodeDelta {
                sampled_at: Timestamp(20_000),
                ..NodeDelta::default()
            }),
            None,
        ),
        now,
        Timestamp(20),
    );
    let v = s.publish(Timestamp(20));
    let e = &v.nodes[&NodeName::new("a")].engines[0];
    assert_eq!(e.seen_at, Timestamp(20_000));
    assert_eq!(e.window.generation_tokens_per_second, Some(250.0));
    // Stream 2 takes the node over; stream 1's late delta changes nothing.
    s.apply(
        report(
            2,
            1,
            ReportBody::Snapshot(snapshot("a", 21_000, 3, &["p1"])),
            Some(out),
        ),
        now,
        Timestamp(21),
    );
    s.apply(
        report(
            1,
            4,
            ReportBody::Delta(NodeDelta {
                sampled_at: Timestamp(22_000),
                gpus_removed: vec![GpuUuid::new("GPU-a-0")],
                ..NodeDelta::default()
            }),
            None,
        ),
        now,
        Timestamp(22),
    );
    let v = s.publish(Timestamp(22));
    assert_eq!(v.nodes[&NodeName::new("a")].gpus.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn silent_nodes_expire_after_the_ttl() {
    let mut s = state();
    let (out, _rx) = mpsc::channel(16);
    let start = Instant::now();
    s.apply(
        report(
            1,
            1,
            ReportBody::Snapshot(snapshot("a", 0, 1, &[])),
            Some(out.clone()),
        ),
        start,
        Timestamp(0),
    );
    s.apply(
        report(
            2,
            1,
            ReportBody::Snapshot(snapshot("b", 0, 1, &[])),
            Some(out),
        ),
        start + Duration::from_secs(20),
        Timestamp(0),
    );
    assert!(s.expire(start + Duration::from_secs(30)).is_empty());
    assert_eq!(
        s.expire(start + Duration::from_secs(31)),
        vec![NodeName::new("a")]
    );
    let v = s.publish(Timestamp(0));
    assert_eq!(
        v.nodes.keys().collect::<Vec<_>>(),
        vec![&NodeName::new("b")]
    );
}

#[tokio::test(start_paused = true)]
async fn directives_reach_the_node_of_the_pod_and_stand_across_reconnects() {
    let mut s = state();
    let (out, mut rx) = mpsc::channel(16);
    let now = Instant::now();
    s.apply(
        report(
            1,
            1,
            ReportBody::Snapshot(snapshot("a", 0, 1, &["p1"])),
            Some(out.clone()),
        ),
        now,
        Timestamp(0),
    );
    let _ack = rx.try_recv();
    let (tx, mut reply) = oneshot::channel();
    s.apply(
        Command::Directive {
            pod: PodRef::new("default", "p1"),
            directive: Directive::DrainPod {
                pod: PodRef::new("default", "p1"),
                reason: "test".into(),
            },
            reply: Some(tx),
        },
        now,
        Timestamp(0),
    );
    assert_eq!(
        reply.try_recv().expect("replied").expect("known pod"),
        NodeName::new("a")
    );
    let drain = rx.try_recv().expect("sent to the agent");
    assert!(matches!(
        Directive::try_from(drain),
        Ok(Directive::DrainPod { .. })
    ));
    // The agent reconnects: after the ack, the drain is sent again.
    s.apply(
        report(
            2,
            2,
            ReportBody::Snapshot(snapshot("a", 1, 1, &["p1"])),
            Some(out),
        ),
        now,
        Timestamp(0),
    );
    let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|d| Directive::try_from(d).expect("valid"))
        .collect();
    assert!(matches!(kinds[0], Directive::Ack { seq: 2 }));
    assert!(matches!(kinds[1], Directive::DrainPod { .. }));
    let (tx, mut reply) = oneshot::channel();
    s.apply(
        Command::Directive {
            pod: PodRef::new("default", "nope"),
            directive: Directive::UndrainPod {
                pod: PodRef::new("default", "nope"),
            },
            reply: Some(tx),
        },
        now,
        Timestamp(0),
    );
    assert!(matches!(
        reply.try_recv().expect("replied"),
        Err(ScalerError::UnknownPod(_))
    ));
}
