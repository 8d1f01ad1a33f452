//! What the scaler has asked of this node, as level state.
//!
//! The uplink turns each `ScalerDirective` into a change of
//! [`NodeDirectives`] and publishes it on a `tokio::sync::watch` channel:
//! consumers (the readiness-gate writer, the node-local `ServingService`'s
//! `WatchLimits`) read the current value first and then every change, and a
//! slow consumer only ever sees the newest state — nothing queues up.

use std::collections::BTreeMap;
use std::time::Duration;

use gpuscale_core::PodRef;
use gpuscale_proto::Directive;

/// The scaler's standing requests to this node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeDirectives {
    /// Pods to keep out of routing, with the scaler's reason.
    pub draining: BTreeMap<PodRef, String>,
    /// Batch limits (max running sequences) per pod.
    pub batch_limits: BTreeMap<PodRef, u32>,
    /// Sampling interval the scaler asked for, if it asked.
    pub sample_interval: Option<Duration>,
}

impl NodeDirectives {
    /// Applies one directive; returns whether anything changed. Acks change nothing.
    pub fn apply(&mut self, directive: &Directive) -> bool {
        match directive {
            Directive::Ack { .. } => false,
            Directive::SetSampleInterval { interval } => {
                let changed = self.sample_interval != Some(*interval);
                self.sample_interval = Some(*interval);
                changed
            }
            Directive::DrainPod { pod, reason } => {
                self.draining.insert(pod.clone(), reason.clone()).as_ref() != Some(reason)
            }
            Directive::UndrainPod { pod } => self.draining.remove(pod).is_some(),
            Directive::SetBatchLimit { pod, batch_limit } => {
                self.batch_limits.insert(pod.clone(), *batch_limit) != Some(*batch_limit)
            }
        }
    }

    pub fn is_draining(&self, pod: &PodRef) -> bool {
        self.draining.contains_key(pod)
    }

    pub fn batch_limit(&self, pod: &PodRef) -> Option<u32> {
        self.batch_limits.get(pod).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_then_undrain_changes_state_once_each() {
        let mut d = NodeDirectives::default();
        let pod = PodRef::new("ns", "p");
        let drain = Directive::DrainPod {
            pod: pod.clone(),
            reason: "scale-in".into(),
        };
        assert!(d.apply(&drain));
        assert!(!d.apply(&drain), "repeating a directive changes nothing");
        assert!(d.is_draining(&pod));
        assert!(d.apply(&Directive::UndrainPod { pod: pod.clone() }));
        assert!(!d.is_draining(&pod));
        assert!(!d.apply(&Directive::Ack { seq: 3 }));
        assert!(d.apply(&Directive::SetBatchLimit {
            pod: pod.clone(),
            batch_limit: 32
        }));
        assert_eq!(d.batch_limit(&pod), Some(32));
    }
}
