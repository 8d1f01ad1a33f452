//! The seam between a decision and the world: [`Actuator`].
//!
//! The decide loop calls the actuator only for decisions that are not
//! advisory and change the replica count. The Kubernetes controller
//! implements it against `/scale` (with drain-before-delete and deletion
//! cost); the demo implements it against its simulated fleet;
//! [`LoggingActuator`] is what the scaler uses on its own, without a
//! cluster: it logs each new requested count and knows no target (the
//! count to decide from is the engines that report).
//!
//! Draining is split: the scaler itself asks the victim's agent to drain the
//! pod (the agent sets the readiness gate False, so routing stops); then it
//! calls [`Actuator::drain_pod`] for whatever the cluster side needs
//! (e.g. `controller.kubernetes.io/pod-deletion-cost`, waiting until the
//! engine is idle) and finally [`Actuator::set_replicas`].
//!
//! Calls run outside the state task and outside the decide loop's tick, one
//! at a time per workload; a call that fails is logged, counted and retried
//! by the next decision.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use gpuscale_core::{PodRef, WorkloadRef};
pub use gpuscale_observe::{ClusterReplica, TargetObservation};
use gpuscale_policy::Decision;

use crate::error::ScalerError;

/// A boxed future returned by [`Actuator`] methods.
pub type ActuateFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ScalerError>> + Send + 'a>>;

/// Applies decisions to the scale target. Implementations must be cheap to
/// call concurrently for different workloads.
pub trait Actuator: Send + Sync + 'static {
    /// The target's current desired replica count (`/scale` `spec.replicas`),
    /// when the actuator knows it. The default knows nothing, and the scaler
    /// then counts the workload's engines.
    fn current_replicas<'a>(&'a self, workload: &'a WorkloadRef) -> ActuateFuture<'a, Option<u32>> {
        let _ = workload;
        Box::pin(async { Ok(None) })
    }

    /// The target at this tick: the count to decide from and, when the
    /// actuator knows them, the target's replicas. The default asks
    /// [`Actuator::current_replicas`] and knows no replicas.
    fn observe_target<'a>(
        &'a self,
        workload: &'a WorkloadRef,
    ) -> ActuateFuture<'a, TargetObservation> {
        Box::pin(async move {
            Ok(TargetObservation {
                current: self.current_replicas(workload).await?,
                replicas: None,
            })
        })
    }

    /// Set the target's replica count to `replicas`, for `decision`.
    fn set_replicas<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        replicas: u32,
        decision: &'a Decision,
    ) -> ActuateFuture<'a, ()>;

    /// Prepare `pod` for removal (its agent was already asked to drain it).
    fn drain_pod<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        pod: &'a PodRef,
        reason: &'a str,
    ) -> ActuateFuture<'a, ()>;

    /// Undo [`Actuator::drain_pod`] (its agent was already asked to undrain it).
    fn undrain_pod<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        pod: &'a PodRef,
    ) -> ActuateFuture<'a, ()>;
}

/// The standalone actuator: no cluster to act on, so it logs each new
/// requested count. It knows no target: the count to decide from is the
/// workload's engines as their agents report them, never a count it asked
/// for (nothing creates or removes pods without a cluster, so a requested
/// count is not a count that exists; deciding from it would drain real
/// pods on a scale-in from a count never reached).
#[derive(Debug, Default)]
pub struct LoggingActuator {
    replicas: Mutex<BTreeMap<WorkloadRef, u32>>,
}

impl LoggingActuator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last count requested for `workload`.
    pub fn requested(&self, workload: &WorkloadRef) -> Option<u32> {
        self.replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(workload)
            .copied()
    }
}

impl Actuator for LoggingActuator {
    fn set_replicas<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        replicas: u32,
        decision: &'a Decision,
    ) -> ActuateFuture<'a, ()> {
        let previous = self
            .replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(workload.clone(), replicas);
        if previous == Some(replicas) {
            return Box::pin(async { Ok(()) });
        }
        tracing::info!(%workload, replicas, reason = %decision.summary(), "would scale (standalone: no cluster to act on)");
        Box::pin(async { Ok(()) })
    }

    fn drain_pod<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        pod: &'a PodRef,
        reason: &'a str,
    ) -> ActuateFuture<'a, ()> {
        tracing::info!(%workload, %pod, reason, "draining pod");
        Box::pin(async { Ok(()) })
    }

    fn undrain_pod<'a>(
        &'a self,
        workload: &'a WorkloadRef,
        pod: &'a PodRef,
    ) -> ActuateFuture<'a, ()> {
        tracing::info!(%workload, %pod, "undraining pod");
        Box::pin(async { Ok(()) })
    }
}
