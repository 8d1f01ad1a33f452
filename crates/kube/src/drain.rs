//! The drain state machine of one replica on its way out (scale-in).
//!
//! ```text
//!             drain_pod()                         gate not True and engine idle,
//!  serving ────────────────► Draining ──────────── or the deadline passed ─────────► Removing{scaleTo}
//!     ▲    (agent: DrainPod,   │  record on the pod: startedAt, deadline             pod-deletion-cost = i32::MIN,
//!     │     gate → False)      │                                                     then /scale → scaleTo:
//!     │                        │                                                     the ReplicaSet deletes
//!     └──── undrain / the target's replicas changed outside gpuscale ───────────── exactly this pod
//! ```
//!
//! The record lives on the pod, in the `gpuscale.dev/drain` annotation (JSON),
//! so it survives a restart or a change of leader: the new leader reads it,
//! asks the agent to drain again (the gate may have been reset), keeps the
//! original deadline, and finishes the scale-in. `Removing` is written
//! together with the deletion cost, before `/scale` is lowered, and carries
//! the count `/scale` is lowered to: while the target's `spec.replicas` is
//! above it the scale-in is still to be applied; at or below it the pod is
//! only waiting for the ReplicaSet to delete it.
//!
//! Pure: [`DrainRecord::step`] decides from what was observed and `now`.

use gpuscale_core::Timestamp;
use serde::{Deserialize, Serialize};

/// The pod annotation holding the record.
pub const DRAIN_ANNOTATION: &str = "gpuscale.dev/drain";
/// The ReplicaSet's victim-order annotation (REFERENCE §7.3).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The lowest deletion cost: this pod goes first among equals.
pub(crate) const DELETION_COST_FIRST: &str = "-2147483648";

/// Where a draining replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase")]
pub enum DrainPhase {
    /// Out of routing (gate False), finishing its requests.
    Draining,
    /// Idle or out of time: deletion cost set; `/scale` is lowered to
    /// `scale_to` (or already was).
    Removing {
        #[serde(rename = "scaleTo")]
        scale_to: u32,
    },
}

/// The record on the pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainRecord {
    #[serde(flatten)]
    pub phase: DrainPhase,
    /// When the drain started (unix milliseconds).
    pub started_at_ms: i64,
    /// When the replica is removed even if its engine is still busy.
    pub deadline_ms: i64,
    /// Why (the decision's one-line summary), for people reading the pod.
    #[serde(default)]
    pub reason: String,
    /// The replica was serving (ready) when the drain started: its engine
    /// must report idle. One that never served has nothing to finish.
    #[serde(default)]
    pub served: bool,
    /// When the record became `Removing` (unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing_since_ms: Option<i64>,
}

/// What an engine reports about a draining replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineDrain {
    /// No agent reports an engine for the pod (pending, or never started).
    NotReported,
    /// The engine still serves (warm: the agent has not applied the drain yet).
    Serving,
    /// Draining with requests running or waiting.
    Busy,
    /// Nothing running or waiting (or the engine is loading or failed).
    Idle,
    /// Draining, but the engine does not export its running requests:
    /// only the deadline ends the drain.
    Unknown,
}

/// What to do with a `Draining` record now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainStep {
    /// Keep waiting.
    Wait,
    /// Remove the replica: it is idle, or the deadline passed.
    Remove { timed_out: bool },
}

impl DrainRecord {
    /// A new drain of a replica that was `served`ing (or not), starting at
    /// `now`, ending at the latest after `timeout_s`.
    pub fn start(now: Timestamp, timeout_s: u32, reason: &str, served: bool) -> Self {
        Self {
            phase: DrainPhase::Draining,
            started_at_ms: now.as_millis(),
            deadline_ms: now.as_millis() + i64::from(timeout_s) * 1000,
            reason: one_line(reason, 200),
            served,
            removing_since_ms: None,
        }
    }

    /// Parses the annotation; `None` for anything else (a record written by
    /// someone else is ignored rather than trusted).
    pub fn parse(annotation: &str) -> Option<Self> {
        serde_json::from_str(annotation).ok()
    }

    /// The annotation value.
    pub fn render(&self) -> String {
        serde_json::to_string(self).expect("invariant: a drain record serializes")
    }

    /// For a `Draining` record: done when the gate is down (the pod is out of
    /// the endpoints) and the engine is idle, or when the deadline passed.
    /// An engine no agent reports is idle only for a replica that never
    /// served: after a restart or a change of leader the agents may not have
    /// reconnected yet. `Removing` records never step.
    pub fn step(&self, now: Timestamp, gate_down: bool, engine: EngineDrain) -> DrainStep {
        if self.phase != DrainPhase::Draining {
            return DrainStep::Wait;
        }
        if now.as_millis() >= self.deadline_ms {
            return DrainStep::Remove { timed_out: true };
        }
        let idle = match engine {
            EngineDrain::Idle => true,
            EngineDrain::NotReported => !self.served,
            EngineDrain::Serving | EngineDrain::Busy | EngineDrain::Unknown => false,
        };
        if gate_down && idle {
            DrainStep::Remove { timed_out: false }
        } else {
            DrainStep::Wait
        }
    }

    /// Whether the target's `spec.replicas` still counts this replica, i.e.
    /// its removal has not been applied to `/scale` yet.
    pub(crate) fn counted_in(&self, spec_replicas: u32) -> bool {
        match self.phase {
            DrainPhase::Draining => true,
            DrainPhase::Removing { scale_to } => spec_replicas > scale_to,
        }
    }
}

/// `s` on one line, at most `max` characters.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().count() <= max {
        line
    } else {
        let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_millis(s * 1000)
    }

    #[test]
    fn a_drain_ends_when_the_gate_is_down_and_the_engine_idle() {
        let r = DrainRecord::start(t(100), 60, "4 -> 3", true);
        assert_eq!(r.step(t(101), false, EngineDrain::Idle), DrainStep::Wait);
        assert_eq!(r.step(t(101), true, EngineDrain::Busy), DrainStep::Wait);
        assert_eq!(r.step(t(101), true, EngineDrain::Serving), DrainStep::Wait);
        assert_eq!(r.step(t(101), true, EngineDrain::Unknown), DrainStep::Wait);
        assert_eq!(
            r.step(t(101), true, EngineDrain::Idle),
            DrainStep::Remove { timed_out: false }
        );
        // A serving replica whose agent is not (yet) connected: wait.
        assert_eq!(
            r.step(t(101), true, EngineDrain::NotReported),
            DrainStep::Wait
        );
        // One that never served (pending, loading) has nothing to finish.
        let cold = DrainRecord::start(t(100), 60, "4 -> 3", false);
        assert_eq!(
            cold.step(t(101), true, EngineDrain::NotReported),
            DrainStep::Remove { timed_out: false }
        );
    }

    #[test]
    fn the_deadline_ends_a_drain_whatever_the_engine_says() {
        let r = DrainRecord::start(t(100), 60, "4 -> 3", true);
        assert_eq!(r.step(t(159), false, EngineDrain::Busy), DrainStep::Wait);
        assert_eq!(
            r.step(t(160), false, EngineDrain::Busy),
            DrainStep::Remove { timed_out: true }
        );
    }

    #[test]
    fn records_round_trip_and_foreign_values_are_ignored() {
        let mut r = DrainRecord::start(t(100), 300, "4 -> 3: reactive (x)\nsecond line", true);
        assert!(!r.reason.contains('\n'));
        assert_eq!(DrainRecord::parse(&r.render()), Some(r.clone()));
        r.phase = DrainPhase::Removing { scale_to: 3 };
        let text = r.render();
        assert!(text.contains(r#""phase":"Removing""#), "{text}");
        assert!(text.contains(r#""scaleTo":3"#), "{text}");
        assert_eq!(DrainRecord::parse(&text), Some(r.clone()));
        assert_eq!(DrainRecord::parse("true"), None);
        assert_eq!(DrainRecord::parse(r#"{"phase":"Gone"}"#), None);
        // Removing never steps; it counts until /scale is at or below scaleTo.
        assert_eq!(r.step(t(1000), true, EngineDrain::Idle), DrainStep::Wait);
        assert!(r.counted_in(4));
        assert!(!r.counted_in(3));
        assert!(DrainRecord::start(t(0), 1, "", false).counted_in(0));
    }
}
