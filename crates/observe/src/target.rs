//! What the actuator knows of a workload's scale target: its replicas as the
//! cluster sees them and the count to decide from.

use gpuscale_core::{PodRef, Timestamp};
use gpuscale_policy::ReplicaState;

/// One replica of the scale target as the cluster sees it (the Kubernetes
/// controller: pod phase, readiness gate, drain record, annotations).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterReplica {
    pub pod: PodRef,
    /// Pending (not scheduled or not running), loading (running, gate not
    /// True), ready (gate True: capacity) or draining (on its way out).
    pub state: ReplicaState,
    /// Annotated `gpuscale.dev/scale-in-protection: "true"`: never a victim.
    pub protected: bool,
    pub created_at: Option<Timestamp>,
}

/// What the actuator knows of a workload's scale target at one tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetObservation {
    /// The count to decide from: the target's `spec.replicas` less the
    /// replicas already on their way out (`None`: count the workload's
    /// engines).
    pub current: Option<u32>,
    /// The target's replicas (`None`: the engines the workload's selector
    /// matches are its replicas, in the state their agents report).
    pub replicas: Option<Vec<ClusterReplica>>,
}
