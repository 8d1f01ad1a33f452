//! The agent's and the scaler's clock: wall-clock time that advances with tokio's clock (one
//! reading of the system clock at start, then tokio's monotonic `Instant`),
//! so paused tokio time in tests moves it exactly as the test does.

use gpuscale_core::Timestamp;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_at_start: Timestamp,
    started: tokio::time::Instant,
    speed: f64,
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
            speed: 1.0,
        }
    }

    /// Runs `speed` times faster than tokio's clock (a simulation that
    /// compresses hours into minutes). Non-finite or non-positive: 1.
    pub fn with_speed(mut self, speed: f64) -> Self {
        self.speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        self
    }

    /// How many of this clock's seconds pass per second of tokio's clock.
    pub fn speed(&self) -> f64 {
        self.speed
    }

    /// A span of tokio's clock (a tick, a sample interval) in this clock's
    /// time: what a timer of that length covers on a sped-up clock.
    pub fn span(&self, tokio_span: std::time::Duration) -> std::time::Duration {
        if self.speed == 1.0 {
            tokio_span
        } else {
            std::time::Duration::from_secs_f64(tokio_span.as_secs_f64() * self.speed)
        }
    }

    pub fn now(&self) -> Timestamp {
        let elapsed = self.started.elapsed();
        if self.speed == 1.0 {
            self.wall_at_start + elapsed
        } else {
            self.wall_at_start
                .plus_secs(elapsed.as_secs_f64() * self.speed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_span_of_tokio_time_covers_speed_times_as_much_of_the_clock() {
        let c = Clock::starting_at(Timestamp::from_millis(0));
        assert_eq!(
            c.span(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        let fast = c.with_speed(40.0);
        assert_eq!(fast.speed(), 40.0);
        assert_eq!(
            fast.span(Duration::from_millis(100)),
            Duration::from_secs(4)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn under_paused_tokio_time_the_clock_moves_exactly_as_the_test_does() {
        let c = Clock::starting_at(Timestamp::from_millis(5_000));
        let fast = Clock::starting_at(Timestamp::from_millis(5_000)).with_speed(10.0);
        let ignored = Clock::starting_at(Timestamp::from_millis(0)).with_speed(f64::NAN);
        assert_eq!(ignored.speed(), 1.0);
        tokio::time::advance(Duration::from_millis(1_250)).await;
        assert_eq!(c.now(), Timestamp::from_millis(6_250));
        assert_eq!(fast.now(), Timestamp::from_millis(17_500));
    }
}
