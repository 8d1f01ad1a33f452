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
