//! The scaler's side of the observation pipeline: which engines of the
//! published [`StateView`] belong to a workload, handed to
//! [`gpuscale_observe`], which builds the [`Observation`] (the simulator
//! builds its observations with the same code).

use std::sync::Arc;

use gpuscale_core::PodRef;
use gpuscale_core::sample::GpuHealth;
use gpuscale_observe::{EngineInput, TargetObservation};
use gpuscale_policy::Observation;

use crate::config::EngineSelector;
use crate::view::{EngineView, StateView};

/// The engines of the workload in `view`.
pub fn select<'a>(
    view: &'a StateView,
    selector: &'a EngineSelector,
) -> impl Iterator<Item = &'a EngineView> + 'a {
    view.engines()
        .map(|e| e.as_ref())
        .filter(|e| selector.matches(&e.sample.model, &e.sample.pod.namespace))
}

fn input<'a>(view: &'a StateView, e: &'a EngineView) -> EngineInput<'a> {
    EngineInput {
        sample: &e.sample,
        seen_at: e.seen_at,
        window: &e.window,
        gpu_fault: gpu_fault(view, e),
    }
}

/// Why a GPU the kubelet assigned to `e`'s pod is unhealthy, as the agent of
/// its node reports the GPU (the first such GPU); `None` when none is known
/// to be (healthy, unknown, or no assignment reported).
pub fn gpu_fault<'a>(view: &'a StateView, e: &EngineView) -> Option<&'a str> {
    let node = view.nodes.get(&e.node)?;
    let pod = node.pods.iter().find(|p| p.pod == e.sample.pod)?;
    pod.containers
        .iter()
        .flat_map(|c| c.gpu_uuids.iter())
        .find_map(|uuid| {
            let gpu = node.gpus.iter().find(|g| g.info.uuid == *uuid)?;
            match &gpu.metrics.health {
                GpuHealth::Unhealthy { reason } => Some(reason.as_str()),
                GpuHealth::Healthy | GpuHealth::Unknown => None,
            }
        })
}

/// The observation of the workload whose engines `selector` matches, with
/// the target's current replica count `current` (`None`: count the engines).
pub fn assemble(view: &StateView, selector: &EngineSelector, current: Option<u32>) -> Observation {
    gpuscale_observe::assemble(select(view, selector).map(|e| input(view, e)), current)
}

/// The observation of a workload whose actuator may know the target (see
/// [`gpuscale_observe::assemble_target`]): with the target's replicas, their
/// engines are looked up wherever an agent reports them; without, the
/// engines `selector` matches are the replicas.
pub fn assemble_target(
    view: &StateView,
    selector: &EngineSelector,
    target: &TargetObservation,
) -> Observation {
    match &target.replicas {
        Some(_) => {
            gpuscale_observe::assemble_target(view.engines().map(|e| input(view, e)), target)
        }
        None => assemble(view, selector, target.current),
    }
}

/// [`assemble_target`] over a given set of engines (the view's, with
/// missing replicas carried as last heard: see [`crate::complete`]).
pub(crate) fn assemble_engines(
    view: &StateView,
    engines: &[Arc<EngineView>],
    target: &TargetObservation,
) -> Observation {
    let inputs = engines.iter().map(|e| input(view, e));
    match &target.replicas {
        Some(_) => gpuscale_observe::assemble_target(inputs, target),
        None => gpuscale_observe::assemble(inputs, target.current),
    }
}

/// The pods of the workload: the target's replicas when the actuator knows
/// them, else the engines `selector` matches.
pub(crate) fn member_pods(
    view: &StateView,
    selector: &EngineSelector,
    target: &TargetObservation,
) -> Vec<PodRef> {
    match &target.replicas {
        Some(replicas) => replicas.iter().map(|r| r.pod.clone()).collect(),
        None => select(view, selector)
            .map(|e| e.sample.pod.clone())
            .collect(),
    }
}
