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
        Timestamp(1_000),
    );
    let v = s.publish(Timestamp(1_000));
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
    s.apply(
        report(1, 2, ReportBody::Delta(d), None),
        now,
        Timestamp(10_000),
    );
    let v = s.publish(Timestamp(10_000));
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
        Timestamp(20_000),
    );
    let v = s.publish(Timestamp(20_000));
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
        Timestamp(21_000),
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
        Timestamp(22_000),
    );
    let v = s.publish(Timestamp(22_000));
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

fn report_of(epoch: u64, stream: StreamId, seq: u64, body: ReportBody) -> Command {
    // A snapshot opens the stream; its directives are not read here.
    let out = matches!(body, ReportBody::Snapshot(_)).then(|| mpsc::channel(1024).0);
    Command::Report {
        stream,
        report: Box::new(AgentReport {
            boot_epoch: epoch,
            seq,
            sent_at: Timestamp(0),
            body,
        }),
        out,
    }
}

/// Two minutes of one engine's load (4,000 then 1,000 tokens/s), reported
/// every second by an agent whose clock is `skew_ms` off the scaler's, each
/// report received 40 ms after it was sampled (the 30th 400 ms, and the
/// 45th stamped `wild_ms` further off when given). Returns each second's
/// proportional decision and the last view.
fn replay(
    skew_ms: i64,
    wild_ms: Option<i64>,
    metrics: Arc<ScalerMetrics>,
) -> (Vec<u32>, Arc<StateView>) {
    use crate::config::{DeciderConfig, EngineSelector, ProportionalConfig};
    let mut s = State::new(
        StateConfig {
            window: Duration::from_secs(30),
            node_ttl: Duration::from_secs(30),
        },
        metrics,
        [],
    );
    let mut decider =
        crate::decide::build_decider(&DeciderConfig::Proportional(ProportionalConfig {
            capacity_tokens_per_second: 500.0,
            target_utilization: 0.8,
            min_replicas: 1,
            max_replicas: 20,
            scale_down_stabilization: Duration::from_secs(20),
            tolerance: 0.1,
            stale_after: Duration::from_secs(30),
            advisory: false,
        }));
    let selector = EngineSelector {
        model: Some("m".into()),
        namespace: None,
    };
    let base = 1_800_000_000_000i64;
    let now = Instant::now();
    let mut generated = 0.0;
    let mut decisions = Vec::new();
    let mut view = s.publish(Timestamp(base));
    for i in 0..120i64 {
        let sampled = base + i * 1000;
        generated += if i < 60 { 4000.0 } else { 1000.0 };
        let mut agent = sampled + skew_ms;
        if i == 45 {
            agent += wild_ms.unwrap_or(0);
        }
        let received = sampled + if i == 30 { 400 } else { 40 };
        let mut e = engine("p1", agent, generated);
        e.sampled_at = Timestamp(agent);
        let body = if i == 0 {
            let mut snap = snapshot("a", agent, 1, &["p1"]);
            snap.engines = vec![e];
            ReportBody::Snapshot(snap)
        } else {
            ReportBody::Delta(NodeDelta {
                sampled_at: Timestamp(agent),
                engines_upserted: vec![e],
                ..NodeDelta::default()
            })
        };
        s.apply(
            report_of(1, 1, i as u64 + 1, body),
            now,
            Timestamp(received),
        );
        view = s.publish(Timestamp(received));
        let observation = crate::observe::assemble(&view, &selector, None);
        decisions.push(
            decider
                .decide(Timestamp(received + 500), &observation)
                .desired_replicas,
        );
    }
    (decisions, view)
}

#[tokio::test(start_paused = true)]
async fn skewed_agent_clocks_give_the_decisions_of_an_unskewed_run_and_are_reported() {
    let plain_metrics = Arc::new(ScalerMetrics::new());
    let (plain, plain_view) = replay(0, None, plain_metrics.clone());
    // The load moves the decision (4,000 tokens/s: 10 replicas; 1,000: 3).
    assert!(plain.contains(&10) && plain.last() == Some(&3), "{plain:?}");
    assert_eq!(plain_metrics.clock_skewed_total(), 0);
    assert_eq!(plain_metrics.clock_clamped_total(), 0);
    let node = |v: &StateView| v.nodes[&NodeName::new("a")].clone();
    for skew in [86_400_000, -120_000, 3_600_000] {
        let metrics = Arc::new(ScalerMetrics::new());
        let (decisions, view) = replay(skew, None, metrics.clone());
        assert_eq!(decisions, plain, "skew {skew} ms");
        assert_eq!(
            node(&view).engines[0].window,
            node(&plain_view).engines[0].window,
            "skew {skew} ms"
        );
        assert_eq!(
            node(&view).engines[0].seen_at,
            node(&plain_view).engines[0].seen_at
        );
        // Reported: the offset, and the epoch counted as skewed.
        assert!(
            (node(&view).clock_offset_ms - skew).abs() <= 40,
            "offset {} for skew {skew}",
            node(&view).clock_offset_ms
        );
        assert_eq!(metrics.clock_skewed_total(), 1, "skew {skew} ms");
        let text = metrics.encode();
        assert!(
            text.contains("gpuscale_scaler_agent_clock_skewed_total 1"),
            "{text}"
        );
    }
    // One message a day ahead in an otherwise good stream: clamped (it and
    // the next, whose offset is measured again), counted, same decisions.
    let metrics = Arc::new(ScalerMetrics::new());
    let (decisions, _) = replay(0, Some(86_400_000), metrics.clone());
    assert_eq!(decisions, plain);
    assert_eq!(metrics.clock_clamped_total(), 2);
    // And one 120 s behind.
    let metrics = Arc::new(ScalerMetrics::new());
    let (decisions, _) = replay(0, Some(-120_000), metrics.clone());
    assert_eq!(decisions, plain);
    assert_eq!(metrics.clock_clamped_total(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_new_boot_epoch_starts_the_windows_over() {
    let mut s = state();
    let now = Instant::now();
    let mut snap = snapshot("a", 0, 1, &["p1"]);
    snap.engines = vec![engine("p1", 0, 0.0)];
    s.apply(
        report_of(1, 1, 1, ReportBody::Snapshot(snap)),
        now,
        Timestamp(0),
    );
    let delta = |agent: i64, generated: f64| {
        ReportBody::Delta(NodeDelta {
            sampled_at: Timestamp(agent),
            engines_upserted: vec![engine("p1", agent, generated)],
            ..NodeDelta::default()
        })
    };
    s.apply(
        report_of(1, 1, 2, delta(10_000, 40_000.0)),
        now,
        Timestamp(10_000),
    );
    let v = s.publish(Timestamp(10_000));
    assert_eq!(
        v.nodes[&NodeName::new("a")].engines[0]
            .window
            .generation_tokens_per_second,
        Some(4000.0)
    );
    // The agent restarts with its clock a day ahead: a new epoch, a new
    // clock, and a window that holds nothing of the old epoch.
    let day = 86_400_000;
    let mut snap = snapshot("a", 11_000 + day, 1, &["p1"]);
    snap.engines = vec![engine("p1", 11_000 + day, 0.0)];
    s.apply(
        report_of(2, 2, 1, ReportBody::Snapshot(snap)),
        now,
        Timestamp(11_000),
    );
    let v = s.publish(Timestamp(11_000));
    let n = &v.nodes[&NodeName::new("a")];
    assert_eq!(n.boot_epoch, 2);
    assert_eq!(n.engines[0].window.covered_seconds, 0.0);
    assert_eq!(n.engines[0].seen_at, Timestamp(11_000));
    s.apply(
        report_of(2, 2, 2, delta(12_000 + day, 4_000.0)),
        now,
        Timestamp(12_000),
    );
    let v = s.publish(Timestamp(12_000));
    let n = &v.nodes[&NodeName::new("a")];
    assert_eq!(
        n.engines[0].window.generation_tokens_per_second,
        Some(4000.0)
    );
    assert_eq!(n.engines[0].seen_at, Timestamp(12_000));
    assert_eq!(n.clock_clamped, 0);
}
