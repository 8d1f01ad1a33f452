//! Starting from a persisted decision: the scale-down stabilization window
//! holds across a restart or a change of leader, and ends where the previous
//! leader's would have.
//!
//! A decider keeps its recommendations in memory. A fresh one seeds its
//! scale-down window with the current count (as the HPA does), so a scaler
//! that restarts, or a standby that becomes leader, never scales in within
//! one window of its first decision, however long the previous leader had
//! been stable. In Kubernetes mode the InferenceAutoscaler's status carries
//! the last decision (`desiredReplicas`) and when it was made
//! (`lastDecisionTime`); the controller hands it over with the workload
//! ([`crate::WorkloadDef::last_decision`]) and the decider's history starts
//! from it instead ([`gpuscale_policy::hpa::BehaviorState::start_from`]):
//! until `at + window` no decision goes below `min(desired, current)`, as
//! with the previous leader, whose window held at least that count.
//!
//! What keeps it safe:
//! * a persisted decision older than the window is ignored: the fresh
//!   decider's own seed (the current count, for a whole window) applies;
//! * a time in the future (another replica's clock ahead) is taken as now,
//!   so the hold never lasts longer than a fresh decider's;
//! * it enters the scale-down window only, which never scales out above
//!   the current count, and `minReplicas`/`maxReplicas` still bound it;
//! * the controller passes it only when the status describes the current
//!   generation of the spec (a changed spec starts afresh, as it does for a
//!   running scaler), and adds the status writer's delay to its time (the
//!   time is rewritten at most every 15 s when nothing else changes), so the
//!   hold does not end before the previous leader's would have.

use std::time::Duration;

use gpuscale_core::Timestamp;

use crate::config::{DeciderConfig, PersistedDecision};
use crate::decide::Decider;

/// The scale-down stabilization window of `config`.
fn window(config: &DeciderConfig) -> Duration {
    match config {
        DeciderConfig::Policy { config, .. } => {
            Duration::from_secs(u64::from(config.behavior.scale_down.stabilization_window_s))
        }
        DeciderConfig::Proportional(p) => p.scale_down_stabilization,
    }
}

/// Starts `decider`'s history from `last` when it is within the window of
/// `now` (see the module docs); returns whether it did.
pub(crate) fn start_from(
    decider: &mut dyn Decider,
    config: &DeciderConfig,
    last: Option<PersistedDecision>,
    now: Timestamp,
) -> bool {
    let Some(last) = last else {
        return false;
    };
    // Before `now`: the decider forgets recommendations at or after the
    // instant it decides at (a repeated decision replaces them).
    let at = Timestamp::from_millis(last.at.as_millis().min(now.as_millis() - 1));
    let window = window(config);
    if window.is_zero() || now.secs_since(at) >= window.as_secs_f64() {
        tracing::debug!(
            desired = last.desired_replicas,
            "the persisted decision is older than the scale-down stabilization window; starting afresh"
        );
        return false;
    }
    decider.start_from(at, last.desired_replicas);
    true
}

#[cfg(test)]
mod tests {
    use gpuscale_policy::proportional::ProportionalConfig;
    use gpuscale_policy::{Action, Observation, ReplicaCounts};

    use super::*;
    use crate::decide::build_decider;

    fn config(window: Duration) -> DeciderConfig {
        DeciderConfig::Proportional(ProportionalConfig {
            capacity_tokens_per_second: 100.0,
            target_utilization: 1.0,
            min_replicas: 1,
            max_replicas: 8,
            scale_down_stabilization: window,
            tolerance: 0.0,
            stale_after: Duration::from_secs(60),
            advisory: false,
        })
    }

    /// `current` replicas generating `tokens` per second in all, at `now`.
    fn obs(now: Timestamp, current: u32, tokens: f64) -> Observation {
        let mut o = Observation::empty();
        o.replicas = ReplicaCounts {
            current,
            ready: current,
            ..ReplicaCounts::default()
        };
        o.telemetry_at = Some(now);
        o.load.generation_tokens_per_second = Some(tokens);
        o
    }

    const T0: i64 = 1_000_000;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_millis(T0 + s * 1000)
    }

    /// The counts a decider started from `last` at t(0) decides at each
    /// second of `at`, 6 replicas generating 200 tokens/s (2 replicas' worth).
    fn counts(window: Duration, last: Option<PersistedDecision>, at: &[i64]) -> Vec<u32> {
        let c = config(window);
        let mut d = build_decider(&c);
        start_from(d.as_mut(), &c, last, t(0));
        at.iter()
            .map(|s| d.decide(t(*s), &obs(t(*s), 6, 200.0)).desired_replicas)
            .collect()
    }

    fn last(desired_replicas: u32, at: i64) -> Option<PersistedDecision> {
        Some(PersistedDecision {
            desired_replicas,
            at: t(at),
        })
    }

    #[test]
    fn a_recent_persisted_decision_ends_the_hold_where_the_previous_leaders_would() {
        let minute = Duration::from_secs(60);
        // Fresh: the current count holds for a whole window from the first
        // decision.
        assert_eq!(counts(minute, None, &[0, 39, 41, 59, 61]), [6, 6, 6, 6, 2]);
        // Persisted 6 at -20 s: held until 40 s.
        assert_eq!(counts(minute, last(6, -20), &[0, 39, 41]), [6, 6, 2]);
        // Persisted 4 (the previous leader was scaling in): continued.
        assert_eq!(counts(minute, last(4, -20), &[0, 41]), [4, 2]);
        // The decision says why it held.
        let c = config(minute);
        let mut d = build_decider(&c);
        assert!(start_from(d.as_mut(), &c, last(6, -20), t(0)));
        let first = d.decide(t(0), &obs(t(0), 6, 200.0));
        assert_eq!((first.desired_replicas, first.action), (6, Action::Hold));
        assert!(
            first.summary().contains("ScaleDownStabilized: 2 held at 6"),
            "{}",
            first.summary()
        );
    }

    #[test]
    fn a_stale_or_future_persisted_decision_never_holds_longer_than_a_fresh_start() {
        let minute = Duration::from_secs(60);
        // Older than the window: ignored, the fresh start's hold applies.
        let c = config(minute);
        let mut d = build_decider(&c);
        assert!(!start_from(d.as_mut(), &c, last(8, -61), t(0)));
        assert_eq!(counts(minute, last(8, -61), &[0, 61]), [6, 2]);
        // In the future (a clock ahead): taken as now.
        assert_eq!(counts(minute, last(6, 3600), &[0, 59, 61]), [6, 6, 2]);
        // A persisted count above the current one never scales out.
        assert_eq!(counts(minute, last(8, -5), &[0]), [6]);
        // No window: nothing to hold.
        assert_eq!(counts(Duration::ZERO, last(6, -5), &[0]), [2]);
    }
}
