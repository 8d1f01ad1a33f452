//! Scale-in victim choice: cheapest replica to lose first, never a protected one.

use gpuscale_core::Timestamp;

use crate::observation::{ReplicaObservation, ReplicaState};

/// Up to `count` replicas to remove, best victim first.
///
/// Never chosen: replicas annotated for scale-in protection, replicas
/// already draining, and replicas younger than `min_age_s` (when their
/// creation time is known). Among the rest, replicas on an unhealthy GPU go
/// first (they serve nothing well), then pending replicas, then
/// loading ones (neither has work), then ready ones by least work in flight
/// (running + waiting; unknown work counts as the most), newest first among
/// equals, then by name so the choice is deterministic.
pub fn choose_victims(
    replicas: &[ReplicaObservation],
    count: usize,
    now: Timestamp,
    min_age_s: f64,
) -> Vec<String> {
    if count == 0 {
        return Vec::new();
    }
    let mut eligible: Vec<&ReplicaObservation> = replicas
        .iter()
        .filter(|r| is_eligible(r, now, min_age_s))
        .collect();
    eligible.sort_by(|a, b| {
        b.gpu_fault
            .is_some()
            .cmp(&a.gpu_fault.is_some())
            .then(state_rank(a.state).cmp(&state_rank(b.state)))
            .then(work(a).total_cmp(&work(b)))
            .then(b.created_at.cmp(&a.created_at))
            .then(a.id.cmp(&b.id))
    });
    eligible
        .into_iter()
        .take(count)
        .map(|r| r.id.clone())
        .collect()
}

/// Whether `r` may be removed at all.
pub(crate) fn is_eligible(r: &ReplicaObservation, now: Timestamp, min_age_s: f64) -> bool {
    if r.protected || r.state == ReplicaState::Draining {
        return false;
    }
    match r.created_at {
        Some(created) if min_age_s > 0.0 => now.secs_since(created) >= min_age_s,
        _ => true,
    }
}

fn state_rank(s: ReplicaState) -> u8 {
    match s {
        ReplicaState::Pending => 0,
        ReplicaState::Loading => 1,
        ReplicaState::Ready => 2,
        ReplicaState::Draining => 3,
    }
}

fn work(r: &ReplicaObservation) -> f64 {
    match (r.requests_running, r.requests_waiting) {
        (None, None) => f64::INFINITY,
        (a, b) => a.unwrap_or(0.0) + b.unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(
        id: &str,
        state: ReplicaState,
        running: Option<f64>,
        protected: bool,
    ) -> ReplicaObservation {
        ReplicaObservation {
            protected,
            created_at: Some(Timestamp::from_millis(0)),
            requests_running: running,
            requests_waiting: Some(0.0),
            ..ReplicaObservation::new(id, state)
        }
    }

    #[test]
    fn least_work_first_and_never_protected() {
        let reps = vec![
            rep("busy", ReplicaState::Ready, Some(40.0), false),
            rep("idle-but-protected", ReplicaState::Ready, Some(0.0), true),
            rep("light", ReplicaState::Ready, Some(3.0), false),
            rep("loading", ReplicaState::Loading, None, false),
            rep("draining", ReplicaState::Draining, Some(0.0), false),
        ];
        let now = Timestamp::from_millis(1_000_000);
        assert_eq!(choose_victims(&reps, 2, now, 0.0), vec!["loading", "light"]);
        assert_eq!(
            choose_victims(&reps, 10, now, 0.0),
            vec!["loading", "light", "busy"]
        );
    }

    #[test]
    fn young_replicas_are_spared_when_asked() {
        let mut young = rep("young", ReplicaState::Ready, Some(0.0), false);
        young.created_at = Some(Timestamp::from_millis(990_000));
        let old = rep("old", ReplicaState::Ready, Some(5.0), false);
        let now = Timestamp::from_millis(1_000_000);
        assert_eq!(
            choose_victims(&[young.clone(), old.clone()], 1, now, 60.0),
            vec!["old"]
        );
        assert_eq!(choose_victims(&[young, old], 1, now, 0.0), vec!["young"]);
    }

    #[test]
    fn a_replica_on_an_unhealthy_gpu_goes_first_unless_protected() {
        let mut sick = rep("sick", ReplicaState::Ready, Some(40.0), false);
        sick.gpu_fault = Some("Xid 79: fallen off the bus".into());
        let mut sick_protected = rep("sick-protected", ReplicaState::Ready, Some(0.0), true);
        sick_protected.gpu_fault = Some("lost".into());
        let reps = vec![
            rep("pending", ReplicaState::Pending, None, false),
            rep("idle", ReplicaState::Ready, Some(0.0), false),
            sick,
            sick_protected,
        ];
        let now = Timestamp::from_millis(1_000_000);
        assert_eq!(
            choose_victims(&reps, 3, now, 0.0),
            vec!["sick", "pending", "idle"]
        );
    }
}
