//! The scaler's [`Actuator`] on Kubernetes: `/scale` with readiness gating
//! and drain-before-delete, through the registered [`WorkloadEntry`]s.

use std::sync::Arc;

use gpuscale_core::{PodRef, WorkloadRef};
use gpuscale_policy::Decision;
use gpuscale_scaler::{ActuateFuture, Actuator, ScalerError, TargetObservation};

use crate::context::Shared;
use crate::error::KubeError;
use crate::workload::WorkloadEntry;

/// Acts on InferenceAutoscaler targets. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KubeActuator {
    shared: Arc<Shared>,
}

impl KubeActuator {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn entry(&self, workload: &WorkloadRef) -> Result<Arc<WorkloadEntry>, ScalerError> {
        self.shared.entry(workload).ok_or_else(|| {
            ScalerError::actuation(workload, "no InferenceAutoscaler is being acted on for it")
        })
    }
}

fn failed(workload: &WorkloadRef, e: KubeError) -> ScalerError {
    ScalerError::actuation(workload, e.to_string())
}

impl Actuator for KubeActuator {
    fn current_replicas<'a>(&'a self, workload: &'a WorkloadRef) -> ActuateFuture<'a, Option<u32>> {
        Box::pin(async move { Ok(self.observe_target(workload).await?.current) })
    }

    fn observe_target<'a>(
        &'a self,
        workload: &'a WorkloadRef,
    ) -> ActuateFuture<'a, TargetObservation> {
        Box::pin(async move {
            let entry = self.entry(workload)?;
            entry
                .observe(&self.shared)
                .await
                .map_err(|e| failed(workload, e))
        })
    }

    fn set_replicas<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        replicas: u32,
        decision: &'a Decision,
    ) -> ActuateFuture<'a, ()> {
        Box::pin(async move {
            let entry = self.entry(workload)?;
            entry
                .set_replicas(&self.shared, replicas, decision)
                .await
                .map_err(|e| failed(workload, e))
        })
    }

    fn drain_pod<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        pod: &'a PodRef,
        reason: &'a str,
    ) -> ActuateFuture<'a, ()> {
        Box::pin(async move {
            let entry = self.entry(workload)?;
            entry
                .start_drain(&self.shared, pod, reason)
                .await
                .map_err(|e| failed(workload, e))
        })
    }

    fn undrain_pod<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        pod: &'a PodRef,
    ) -> ActuateFuture<'a, ()> {
        Box::pin(async move {
            let entry = self.entry(workload)?;
            entry
                .cancel_drain(&self.shared, pod, "scale-up: the replica is needed again")
                .await
                .map_err(|e| failed(workload, e))
        })
    }
}
