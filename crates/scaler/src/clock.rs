//! The scaler's clock: wall-clock time that advances with tokio's clock (one
//! reading of the system clock at start, then tokio's monotonic `Instant`),
//! so paused tokio time in tests moves it exactly as the test does.

use gpuscale_core::Timestamp;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_at_start: Timestamp,
    started: tokio::time::Instant,
}

impl Clock {
    /// Starts now, from the system clock.
    pub fn start() -> Self {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self::starting_at(Timestamp::from_millis(wall))
    }

    /// Starts at `wall` (tests, simulations with their own epoch).
    pub fn starting_at(wall: Timestamp) -> Self {
        Self {
            wall_at_start: wall,
            started: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        self.wall_at_start + self.started.elapsed()
    }
}
