//! An agent's clock as the scaler reads it.
//!
//! The scaler's clock decides. Every report is stamped with the scaler's
//! receive time; the agent's own timestamp is used only for intervals
//! between its own samples within one boot epoch. Per node and epoch the
//! offset between the agent's clock and the scaler's is tracked: the first
//! report of an epoch sets it (agent time − receive time), and a later
//! report that travelled faster (a larger agent − receive difference, by at
//! most the bound) moves it up, so the offset converges on the least
//! delayed report. A report's time on the scaler's clock is its agent time
//! minus the offset, never later than its receive time and never earlier
//! than the previous report's.
//!
//! A report whose mapped time lies more than [`SKEW_BOUND_MS`] from its
//! receive time (the agent's clock jumped, or one message carries a wild
//! stamp) is **clamped**: it counts as received-now, the offset is measured
//! again from it, and it is counted. A new boot epoch starts a new clock
//! (and the node's windows start over, in the state).

use gpuscale_core::Timestamp;

/// How far a report's mapped time may lie from its receive time before it
/// is clamped, milliseconds.
pub const SKEW_BOUND_MS: i64 = 10_000;

/// One agent's clock within one boot epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AgentClock {
    pub(crate) epoch: u64,
    /// Agent time minus scaler time, milliseconds.
    pub(crate) offset_ms: i64,
    /// The previous report's time on the scaler's clock.
    last: Timestamp,
    /// Reports clamped in this epoch.
    pub(crate) clamped: u64,
}

/// Where one report lands on the scaler's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapped {
    pub(crate) at: Timestamp,
    /// The report was more than the bound away and was clamped.
    pub(crate) clamped: bool,
}

impl AgentClock {
    /// The clock of a new epoch, from its first report (agent time `agent`,
    /// received at `received`).
    pub(crate) fn start(epoch: u64, agent: Timestamp, received: Timestamp) -> Self {
        Self {
            epoch,
            offset_ms: agent.as_millis().saturating_sub(received.as_millis()),
            last: received,
            clamped: 0,
        }
    }

    /// The time of a report stamped `agent` by the agent and received at
    /// `received`, on the scaler's clock.
    pub(crate) fn map(&mut self, agent: Timestamp, received: Timestamp) -> Mapped {
        let raw = agent.as_millis().saturating_sub(received.as_millis());
        if raw > self.offset_ms && raw - self.offset_ms <= SKEW_BOUND_MS {
            // Less delayed than every report before: a better offset.
            self.offset_ms = raw;
        }
        let mapped = agent.as_millis().saturating_sub(self.offset_ms);
        let clamped = mapped.abs_diff(received.as_millis()) > SKEW_BOUND_MS.unsigned_abs();
        let at = if clamped {
            self.offset_ms = raw;
            self.clamped += 1;
            received
        } else {
            Timestamp::from_millis(mapped.min(received.as_millis()))
        };
        let at = at.max(self.last);
        self.last = at;
        Mapped { at, clamped }
    }

    /// True when the agent's clock is further from the scaler's than the bound.
    pub(crate) fn skewed(&self) -> bool {
        self.offset_ms.unsigned_abs() > SKEW_BOUND_MS.unsigned_abs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn a_constant_skew_keeps_the_agents_intervals_on_the_scalers_clock() {
        for skew in [86_400_000, -120_000, 3_600_000, 0] {
            let mut c = AgentClock::start(1, t(1_000_000 + skew), t(1_000_050));
            // Each report travels 50 ms, one only 10 ms.
            let mut times = Vec::new();
            for (i, delay) in [50, 50, 10, 50, 50].into_iter().enumerate() {
                let sampled = 1_000_000 + 1_000 * (i as i64 + 1);
                let m = c.map(t(sampled + skew), t(sampled + delay));
                assert!(!m.clamped, "skew {skew}");
                times.push(m.at.as_millis());
            }
            assert_eq!(
                times,
                vec![1_001_050, 1_002_050, 1_003_010, 1_004_010, 1_005_010],
                "skew {skew}"
            );
            assert_eq!(c.skewed(), skew != 0, "skew {skew}");
        }
    }

    #[test]
    fn a_wild_stamp_is_clamped_counted_and_does_not_move_time_backwards() {
        let mut c = AgentClock::start(1, t(0), t(0));
        assert_eq!(c.map(t(1_000), t(1_000)).at, t(1_000));
        // One message a day ahead.
        let m = c.map(t(86_400_000 + 2_000), t(2_000));
        assert_eq!((m.at, m.clamped), (t(2_000), true));
        // The next is normal again: clamped back, at its receive time.
        let m = c.map(t(3_000), t(3_000));
        assert_eq!((m.at, m.clamped), (t(3_000), true));
        let m = c.map(t(4_000), t(4_000));
        assert_eq!((m.at, m.clamped), (t(4_000), false));
        assert_eq!(c.clamped, 2);
        // A stamp 15 s behind after that: clamped, never before the last time.
        let m = c.map(t(5_000 - 15_000), t(5_000));
        assert_eq!((m.at, m.clamped), (t(5_000), true));
        // A small step back within the bound maps to the previous time.
        let m = c.map(t(5_500 - 15_000 - 2_000), t(5_500));
        assert!(!m.clamped);
        assert_eq!(m.at, t(5_000));
    }
}
