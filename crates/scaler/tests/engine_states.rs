//! How each engine state the agents report counts in a workload's
//! observation: only warm engines are ready capacity.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpuscale_core::sample::{EngineSample, EngineState, Framework};
use gpuscale_core::{NodeName, PodRef, Timestamp};
use gpuscale_scaler::config::EngineSelector;
use gpuscale_scaler::observe::assemble;
use gpuscale_scaler::view::{EngineView, EngineWindowStats, NodeView, StateView};

fn engine(pod: &str, state: EngineState) -> Arc<EngineView> {
    let mut s = EngineSample::empty(
        PodRef::new("default", pod),
        Framework::Vllm,
        "m",
        Timestamp(100),
    );
    s.state = state;
    if state != EngineState::NoData {
        s.requests_running = Some(4.0);
        s.requests_waiting = Some(1.0);
    }
    Arc::new(EngineView {
        node: NodeName::new("n"),
        sample: Arc::new(s),
        seen_at: Timestamp(100),
        window: EngineWindowStats::default(),
    })
}

fn view(engines: Vec<Arc<EngineView>>) -> StateView {
    let node = NodeView {
        node: NodeName::new("n"),
        boot_epoch: 1,
        last_seq: 1,
        connected: true,
        agent_version: String::new(),
        sample_interval_ms: 1000,
        sampled_at: Timestamp(0),
        received_at: Timestamp(0),
        seen_at: Timestamp(0),
        clock_offset_ms: 0,
        clock_clamped: 0,
        gpus: vec![],
        pods: vec![],
        engines,
        agent: Default::default(),
    };
    StateView {
        nodes: BTreeMap::from([(NodeName::new("n"), Arc::new(node))]),
        ..StateView::default()
    }
}

#[test]
fn an_engine_with_no_data_is_not_serving_capacity() {
    let selector = EngineSelector {
        model: Some("m".into()),
        namespace: None,
    };
    let v = view(vec![
        engine("warm-0", EngineState::Warm),
        engine("nodata-0", EngineState::NoData),
        engine("nodata-1", EngineState::NoData),
    ]);
    let obs = assemble(&v, &selector, None);
    assert_eq!(obs.replicas.ready, 1, "only the warm engine is capacity");
    assert_eq!(obs.replicas.loading, 0, "nor capacity in flight");
    assert_eq!(obs.replicas.current, 1);
    assert_eq!(obs.load.requests_waiting, Some(1.0));

    // The same engines warm: all three are capacity.
    let v = view(vec![
        engine("warm-0", EngineState::Warm),
        engine("warm-1", EngineState::Warm),
        engine("warm-2", EngineState::Warm),
    ]);
    assert_eq!(assemble(&v, &selector, None).replicas.ready, 3);
}

#[test]
fn a_warm_engine_on_an_unhealthy_gpu_is_not_capacity_and_is_the_first_victim() {
    use gpuscale_core::GpuUuid;
    use gpuscale_core::sample::{ContainerGpus, GpuHealth, GpuInfo, GpuMetrics, PodGpus};
    use gpuscale_scaler::view::GpuView;

    let selector = EngineSelector {
        model: Some("m".into()),
        namespace: None,
    };
    let gpu = |uuid: &str, health: GpuHealth| GpuView {
        info: Arc::new(GpuInfo {
            uuid: GpuUuid::new(uuid),
            index: 0,
            model_name: "H100".into(),
            memory_total_bytes: 80 << 30,
            pci_bus_id: String::new(),
            parent_uuid: None,
            mig_gpu_instance_id: None,
            gpm_supported: false,
            driver_version: String::new(),
        }),
        metrics: Arc::new(GpuMetrics {
            uuid: GpuUuid::new(uuid),
            health,
            ..GpuMetrics::default()
        }),
    };
    let holds = |pod: &str, uuid: &str| PodGpus {
        pod: PodRef::new("default", pod),
        containers: vec![ContainerGpus {
            container: "engine".into(),
            resource_name: "nvidia.com/gpu".into(),
            gpu_uuids: vec![GpuUuid::new(uuid)],
        }],
    };
    let mut v = view(vec![
        engine("warm-0", EngineState::Warm),
        engine("warm-1", EngineState::Warm),
    ]);
    let node = Arc::make_mut(v.nodes.get_mut(&NodeName::new("n")).expect("node n"));
    node.gpus = vec![
        gpu("GPU-a", GpuHealth::Healthy),
        gpu(
            "GPU-b",
            GpuHealth::Unhealthy {
                reason: "Xid 79: GPU has fallen off the bus".into(),
            },
        ),
    ];
    node.pods = vec![holds("warm-0", "GPU-a"), holds("warm-1", "GPU-b")];
    let obs = assemble(&v, &selector, None);
    assert_eq!(
        obs.replicas.ready, 1,
        "the replica on GPU-b is not capacity"
    );
    assert_eq!(obs.replicas.unhealthy, 1);
    assert_eq!(obs.replicas.current, 2);
    let sick = obs
        .replica_samples
        .iter()
        .find(|r| r.id == "warm-1")
        .expect("warm-1 observed");
    assert_eq!(
        sick.gpu_fault.as_deref(),
        Some("Xid 79: GPU has fallen off the bus")
    );
    assert_eq!(
        gpuscale_policy::victim::choose_victims(&obs.replica_samples, 1, Timestamp(100), 0.0),
        vec!["warm-1"],
        "the replica on the unhealthy GPU is the scale-in victim although it is as busy"
    );
}
