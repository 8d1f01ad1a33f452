//! The InferenceAutoscaler's finalizer: drain records never outlive the
//! autoscaler that wrote them.
//!
//! The controller adds [`FINALIZER`] when it starts acting on an autoscaler,
//! before any drain of its pods can be written. Deleting the autoscaler then
//! only marks it (`deletionTimestamp`); the leader, the one running now or
//! the next to start however much later, stops acting on it, cancels the
//! drains of its target's pods (the drain record removed, and the deletion
//! cost gpuscale set with a `Removing` record; the agents asked to undrain),
//! and removes the finalizer, which lets the API server delete it. A target
//! that no longer exists has no pods left to clean: the finalizer goes at
//! once. Both writes are JSON patches that test the finalizers they read, so
//! another controller's finalizer is never lost.

use std::sync::Arc;

use gpuscale_core::{PodRef, WorkloadRef};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::context::Shared;
use crate::crd::InferenceAutoscaler;
use crate::drain::{DRAIN_ANNOTATION, DrainPhase, DrainRecord};
use crate::error::{KubeError, api_status};
use crate::target::ScaleTarget;
use crate::workload::{drain_cancelled_event, write_drain_annotations};

/// The finalizer on every InferenceAutoscaler gpuscale acts on.
pub const FINALIZER: &str = "autoscaling.gpuscale.dev/drains";

const WHY: &str = "the InferenceAutoscaler was deleted";

/// Whether `ias` carries gpuscale's finalizer.
pub(crate) fn holds(ias: &InferenceAutoscaler) -> bool {
    ias.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the finalizer to `ias` unless it is there.
pub(crate) async fn ensure(shared: &Shared, ias: &InferenceAutoscaler) -> Result<(), KubeError> {
    if holds(ias) {
        return Ok(());
    }
    let current = ias.finalizers();
    let ops = if current.is_empty() {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    patch(shared, ias, ops, "adding the finalizer").await
}

/// The deletion of `ias`: stops acting on it, cancels its pods' drains and
/// removes the finalizer. An error leaves the finalizer for the next try.
pub(crate) async fn finish(
    shared: &Arc<Shared>,
    ias: &InferenceAutoscaler,
    workload: &WorkloadRef,
) -> Result<(), KubeError> {
    crate::controller::remove(shared, workload, WHY).await;
    let Some(at) = ias.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let cancelled = cancel_drains(shared, ias).await?;
    let ops = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": ias.finalizers()},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
    ]);
    match patch(shared, ias, ops, "removing the finalizer").await {
        Err(KubeError::Api { source, .. }) if api_status(&source) == Some(404) => {}
        r => r?,
    }
    tracing::info!(%workload, cancelled, "the deleted InferenceAutoscaler's drains are cancelled; finalizer removed");
    Ok(())
}

/// Removes the drain records gpuscale wrote on the pods of `ias`'s target
/// (and the deletion cost a `Removing` record set); how many it removed.
async fn cancel_drains(shared: &Shared, ias: &InferenceAutoscaler) -> Result<usize, KubeError> {
    let namespace = ias.namespace().unwrap_or_default();
    let resolved = shared
        .read(
            "resolving the target",
            ScaleTarget::resolve(&shared.client, &namespace, &ias.spec.workload.target),
        )
        .await?;
    let selector = match resolved {
        Ok((_, reading)) => reading.selector,
        Err(problem) => {
            tracing::info!(ias = %ias.name_any(), reason = problem.reason, "the deleted InferenceAutoscaler's target is gone: no drains to cancel");
            None
        }
    };
    let Some(selector) = selector else {
        return Ok(0);
    };
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
    let pods = shared
        .read("listing the target's pods", async {
            api.list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| KubeError::api("listing the target's pods", e))
        })
        .await?;
    let mut cancelled = 0;
    for p in pods.items {
        let Some(record) = p
            .annotations()
            .get(DRAIN_ANNOTATION)
            .and_then(|a| DrainRecord::parse(a))
        else {
            continue;
        };
        let pod = PodRef {
            namespace: namespace.clone(),
            name: p.name_any(),
        };
        let _ = shared.drains.undrain(&pod).await;
        let ours_cost = matches!(record.phase, DrainPhase::Removing { .. });
        write_drain_annotations(shared, &pod, None, ours_cost.then_some(false)).await?;
        cancelled += 1;
        drain_cancelled_event(shared, &ias.object_ref(&()), &pod, WHY).await;
    }
    Ok(cancelled)
}

async fn patch(
    shared: &Shared,
    ias: &InferenceAutoscaler,
    ops: Value,
    what: &str,
) -> Result<(), KubeError> {
    let ops: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| KubeError::Client(format!("{what}: {e}")))?;
    let api: Api<InferenceAutoscaler> =
        Api::namespaced(shared.client.clone(), &ias.namespace().unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(shared.config.field_manager.clone()),
        ..PatchParams::default()
    };
    let name = ias.name_any();
    shared
        .write(what, async {
            api.patch(&name, &params, &Patch::Json::<()>(ops))
                .await
                .map_err(|e| KubeError::api(format!("{what} of InferenceAutoscaler {name}"), e))
        })
        .await?;
    Ok(())
}
