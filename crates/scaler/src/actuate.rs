//! The seam between a decision and the world: [`Actuator`].
//!
//! An actuator does two things, as KEDA's scale executor or the HPA
//! controller separate calculation from actuation:
//!
//! * [`Actuator::observe`]: the target at this tick (the count to decide
//!   from and, when the actuator knows them, the target's replicas). The
//!   decide loop observes every workload at once, bounded by one deadline.
//! * [`Actuator::apply`]: carry out a [`Plan`] (the decision, the pods to
//!   drain, the pods to return to service), called only for decisions that
//!   are not advisory and change the count, outside the tick, one at a time
//!   per workload; a failure is logged, counted and retried by the next
//!   decision.
//!
//! **Drains belong to the actuator.** It is given a [`DrainSink`] when it is
//! built and is the only one to ask agents to drain or undrain a pod (the
//! agent sets the readiness gate False, so routing stops); the decide loop
//! sends none. The sink goes to the state owner, which keeps the directive
//! standing (resent when the agent reconnects) and sends it only when it
//! changes: the one dedupe of directives.
//!
//! The Kubernetes controller implements it against `/scale` (with
//! drain-before-delete and deletion cost); [`LoggingActuator`] is what the
//! scaler uses on its own, without a cluster: it asks agents to drain the
//! victims, logs each new requested count and knows no target (the count to
//! decide from is the engines that report).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use gpuscale_core::{NodeName, PodRef, WorkloadRef};
pub use gpuscale_observe::{ClusterReplica, TargetObservation};
use gpuscale_policy::Decision;
use gpuscale_proto::Directive;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::ScalerError;
use crate::state::Command;
use crate::view::StateView;

/// A boxed future returned by [`Actuator`] methods.
pub type ActuateFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ScalerError>> + Send + 'a>>;

/// What one decision asks of the target.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The decision (its `desired_replicas` is the count to reach, relative
    /// to the count the actuator's last [`Actuator::observe`] gave).
    pub decision: Decision,
    /// Scale-in victims to drain before the count is lowered.
    pub drain: Vec<PodRef>,
    /// Draining replicas a scale-out returns to service.
    pub undrain: Vec<PodRef>,
}

/// Observes and acts on scale targets. Implementations must be cheap to
/// call concurrently for different workloads.
pub trait Actuator: Send + Sync + 'static {
    /// The target at this tick: the count to decide from and, when the
    /// actuator knows them, the target's replicas.
    fn observe<'a>(&'a self, workload: &'a WorkloadRef) -> ActuateFuture<'a, TargetObservation>;

    /// Carries out `plan`: drains (through the actuator's [`DrainSink`]),
    /// undrains, then the count.
    fn apply<'a>(&'a self, workload: &'a WorkloadRef, plan: &'a Plan) -> ActuateFuture<'a, ()>;
}

/// Where an actuator asks agents to take pods out of routing and back: the
/// scaler's state owner (which keeps each directive standing and sends it
/// only when it changes). Also the newest state view, for an actuator that
/// waits until a draining engine is idle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DrainSink {
    commands: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<StateView>>,
}

impl DrainSink {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        view: watch::Receiver<Arc<StateView>>,
    ) -> Self {
        Self { commands, view }
    }

    async fn directive(&self, pod: &PodRef, directive: Directive) -> Result<NodeName, ScalerError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Directive {
                pod: pod.clone(),
                directive,
                reply: Some(tx),
            })
            .await
            .map_err(|_| ScalerError::ShuttingDown)?;
        rx.await.map_err(|_| ScalerError::ShuttingDown)?
    }

    /// Asks the agent of the node running `pod` to take it out of routing.
    /// Returns the node. Standing: sent again whenever the agent reconnects.
    pub async fn drain(&self, pod: &PodRef, reason: &str) -> Result<NodeName, ScalerError> {
        self.directive(
            pod,
            Directive::DrainPod {
                pod: pod.clone(),
                reason: reason.to_string(),
            },
        )
        .await
    }

    /// Puts a drained pod back into routing.
    pub async fn undrain(&self, pod: &PodRef) -> Result<NodeName, ScalerError> {
        self.directive(pod, Directive::UndrainPod { pod: pod.clone() })
            .await
    }

    /// The newest published state view.
    pub fn view(&self) -> Arc<StateView> {
        self.view.borrow().clone()
    }
}

/// The standalone actuator: no cluster to act on. It asks the victims'
/// agents to drain them (routing stops; nothing removes the pod), logs each
/// new requested count, and knows no target: the count to decide from is the
/// workload's engines as their agents report them, never a count it asked
/// for (nothing creates or removes pods without a cluster, so a requested
/// count is not a count that exists; deciding from it would drain real pods
/// on a scale-in from a count never reached).
#[derive(Debug)]
pub struct LoggingActuator {
    drains: DrainSink,
    replicas: Mutex<BTreeMap<WorkloadRef, u32>>,
}

impl LoggingActuator {
    pub fn new(drains: DrainSink) -> Self {
        Self {
            drains,
            replicas: Mutex::new(BTreeMap::new()),
        }
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
    fn observe<'a>(&'a self, _workload: &'a WorkloadRef) -> ActuateFuture<'a, TargetObservation> {
        Box::pin(async { Ok(TargetObservation::default()) })
    }

    fn apply<'a>(&'a self, workload: &'a WorkloadRef, plan: &'a Plan) -> ActuateFuture<'a, ()> {
        Box::pin(async move {
            let reason = plan.decision.summary();
            for pod in &plan.drain {
                tracing::info!(%workload, %pod, "draining pod");
                self.drains.drain(pod, &reason).await?;
            }
            for pod in &plan.undrain {
                tracing::info!(%workload, %pod, "undraining pod");
                self.drains.undrain(pod).await?;
            }
            let replicas = plan.decision.desired_replicas;
            let previous = self
                .replicas
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(workload.clone(), replicas);
            if previous != Some(replicas) {
                tracing::info!(%workload, replicas, reason = %reason, "would scale (standalone: no cluster to act on)");
            }
            Ok(())
        })
    }
}
