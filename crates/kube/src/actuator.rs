//! The scaler's [`Actuator`] on Kubernetes: `/scale` with readiness gating
//! and drain-before-delete, through the registered [`WorkloadEntry`]s.
//! Drains go to agents through the [`gpuscale_scaler::DrainSink`] the
//! shared context was built with (see [`crate::workload`]).

use std::sync::Arc;

use gpuscale_core::WorkloadRef;
use gpuscale_scaler::{ActuateFuture, Actuator, Plan, ScalerError, TargetObservation};

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
    fn observe<'a>(&'a self, workload: &'a WorkloadRef) -> ActuateFuture<'a, TargetObservation> {
        Box::pin(async move {
            let entry = self.entry(workload)?;
            entry
                .observe(&self.shared)
                .await
                .map_err(|e| failed(workload, e))
        })
    }

    fn apply<'a>(&'a self, workload: &'a WorkloadRef, plan: &'a Plan) -> ActuateFuture<'a, ()> {
        Box::pin(async move {
            let entry = self.entry(workload)?;
            let shared = &self.shared;
            let reason = plan.decision.summary();
            for pod in &plan.drain {
                entry
                    .start_drain(shared, pod, &reason)
                    .await
                    .map_err(|e| failed(workload, e))?;
            }
            for pod in &plan.undrain {
                entry
                    .cancel_drain(shared, pod, "scale-up: the replica is needed again")
                    .await
                    .map_err(|e| failed(workload, e))?;
            }
            entry
                .set_replicas(shared, &plan.decision)
                .await
                .map_err(|e| failed(workload, e))
        })
    }
}
