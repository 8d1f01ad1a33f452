//! What a target's pods are, for the policy: pending, loading, ready
//! (capacity) or draining; protected or not. Pure.
//!
//! * A pod being deleted, or `Succeeded`/`Failed`, is not a replica.
//! * Not scheduled yet, or phase `Pending`: **pending** (capacity in flight).
//! * Running, readiness-gate condition (`gpuscale.dev/engine-warm`) not
//!   `True`: **loading** (capacity in flight). A gate the pod does not list
//!   in `status.conditions` counts as False, as for the kubelet.
//! * Running, gate `True`: **ready**, the only capacity.
//! * With a drain record ([`crate::drain`]) still counted by `/scale`:
//!   **draining**; once `/scale` no longer counts it, not a replica.
//! * Annotated `gpuscale.dev/scale-in-protection: "true"`: **protected**,
//!   never a scale-in victim.

use gpuscale_core::{PodRef, Timestamp};
use gpuscale_policy::ReplicaState;
use gpuscale_scaler::ClusterReplica;
use k8s_openapi::api::core::v1::Pod;

use crate::drain::{DRAIN_ANNOTATION, DrainRecord};

/// The readiness gate the agent sets when the engine is warm.
pub const DEFAULT_READINESS_GATE: &str = "gpuscale.dev/engine-warm";
/// Pods annotated with this set to `"true"` are never scale-in victims.
pub(crate) const PROTECTION_ANNOTATION: &str = "gpuscale.dev/scale-in-protection";

/// One pod of a target, as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PodFacts {
    pub pod: PodRef,
    /// Pending, loading or ready (before any drain record is considered).
    pub lifecycle: ReplicaState,
    /// The readiness-gate condition is `True`.
    pub gate_up: bool,
    pub protected: bool,
    pub created_at: Option<Timestamp>,
    pub drain: Option<DrainRecord>,
}

impl PodFacts {
    /// The facts of `pod`; `None` when it is not a replica (being deleted,
    /// or finished).
    pub fn of(pod: &Pod, gate: &str) -> Option<Self> {
        let meta = &pod.metadata;
        if meta.deletion_timestamp.is_some() {
            return None;
        }
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        if matches!(phase, "Succeeded" | "Failed") {
            return None;
        }
        let scheduled = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| !n.is_empty());
        let gate_up = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == gate))
            .is_some_and(|c| c.status == "True");
        let lifecycle = if !scheduled || phase != "Running" {
            ReplicaState::Pending
        } else if gate_up {
            ReplicaState::Ready
        } else {
            ReplicaState::Loading
        };
        let annotations = meta.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        Some(Self {
            pod: PodRef::new(
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            ),
            lifecycle,
            gate_up,
            protected: annotation(PROTECTION_ANNOTATION) == Some("true"),
            created_at: meta
                .creation_timestamp
                .as_ref()
                .map(|t| Timestamp::from_millis(t.0.as_millisecond())),
            drain: annotation(DRAIN_ANNOTATION).and_then(DrainRecord::parse),
        })
    }

    /// The replica the policy sees with the target at `spec_replicas`;
    /// `None` once `/scale` no longer counts it (it is being removed).
    pub fn replica(&self, spec_replicas: u32) -> Option<ClusterReplica> {
        let state = match &self.drain {
            Some(d) if !d.counted_in(spec_replicas) => return None,
            Some(_) => ReplicaState::Draining,
            None => self.lifecycle,
        };
        Some(ClusterReplica {
            pod: self.pod.clone(),
            state,
            protected: self.protected,
            created_at: self.created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::drain::DrainPhase;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn running(gate: &str, annotations: serde_json::Value) -> Pod {
        pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": annotations,
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"nodeName": "n", "containers": []},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "False"},
                {"type": DEFAULT_READINESS_GATE, "status": gate}]}
        }))
    }

    #[test]
    fn only_a_true_gate_is_capacity() {
        let ready = PodFacts::of(&running("True", json!({})), DEFAULT_READINESS_GATE).unwrap();
        assert_eq!(ready.lifecycle, ReplicaState::Ready);
        assert_eq!(ready.pod, PodRef::new("ns", "p"));
        assert_eq!(
            ready.created_at,
            Some(Timestamp::from_millis(1_735_689_600_000))
        );
        let loading = PodFacts::of(&running("False", json!({})), DEFAULT_READINESS_GATE).unwrap();
        assert_eq!(loading.lifecycle, ReplicaState::Loading);
        // Another gate name: ours is missing, which counts as False.
        let other = PodFacts::of(&running("True", json!({})), "example.com/other").unwrap();
        assert_eq!(other.lifecycle, ReplicaState::Loading);
        let pending = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": []},
                                 "status": {"phase": "Pending"}}),
        );
        assert_eq!(
            PodFacts::of(&pending, DEFAULT_READINESS_GATE)
                .unwrap()
                .lifecycle,
            ReplicaState::Pending
        );
        let no_status = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": []}}));
        assert_eq!(
            PodFacts::of(&no_status, DEFAULT_READINESS_GATE)
                .unwrap()
                .lifecycle,
            ReplicaState::Pending
        );
    }

    #[test]
    fn deleted_and_finished_pods_are_not_replicas() {
        let mut p = running("True", json!({}));
        p.metadata.deletion_timestamp = p.metadata.creation_timestamp.clone();
        assert!(PodFacts::of(&p, DEFAULT_READINESS_GATE).is_none());
        let done = pod(
            json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n", "containers": []},
                              "status": {"phase": "Failed"}}),
        );
        assert!(PodFacts::of(&done, DEFAULT_READINESS_GATE).is_none());
    }

    #[test]
    fn protection_and_drain_records_come_from_annotations() {
        let mut record = DrainRecord::start(Timestamp::from_millis(0), 60, "x", true);
        let p = running(
            "False",
            json!({PROTECTION_ANNOTATION: "true", DRAIN_ANNOTATION: record.render()}),
        );
        let facts = PodFacts::of(&p, DEFAULT_READINESS_GATE).unwrap();
        assert!(facts.protected);
        assert_eq!(facts.replica(4).unwrap().state, ReplicaState::Draining);
        record.phase = DrainPhase::Removing { scale_to: 3 };
        let p = running(
            "False",
            json!({DRAIN_ANNOTATION: record.render(), PROTECTION_ANNOTATION: "yes"}),
        );
        let facts = PodFacts::of(&p, DEFAULT_READINESS_GATE).unwrap();
        assert!(!facts.protected);
        assert_eq!(facts.replica(4).unwrap().state, ReplicaState::Draining);
        assert_eq!(facts.replica(3), None);
    }
}
