//! Reconnect delays: jittered exponential backoff as a pure function.
//!
//! The delay before attempt `n` (0-based) is `min(cap, base · 2ⁿ)` shortened
//! by a random fraction of at most `jitter`: `exp · (1 − jitter · draw)` for
//! a uniform `draw` in `[0, 1)`. Subtracting the jitter (rather than adding
//! it, then clamping) keeps every delay at or below the cap and spreads
//! agents that lost the scaler at the same instant over `[exp·(1−jitter),
//! exp]`. The random draw is an argument, so the function is pure and its
//! properties are tested directly (compare linkerd's `exp-backoff`; avoid
//! tokio-console's `max(backoff + step, MAX)`, which never stops growing past
//! its cap).

use std::time::Duration;

use crate::error::AgentError;

/// Reconnect backoff parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
    /// Largest fraction of a delay removed at random, 0..=1.
    pub jitter: f64,
}

impl Default for BackoffConfig {
    /// 250 ms doubling to 30 s, up to half of each delay removed at random.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
            jitter: 0.5,
        }
    }
}

impl BackoffConfig {
    /// Checks the parameters; the error names the field, value and range.
    pub fn validate(&self) -> Result<(), AgentError> {
        if self.base.is_zero() || self.base > self.cap {
            return Err(AgentError::config(
                "backoff.base",
                format!("{:?}", self.base),
                format!("more than 0 and at most the cap ({:?})", self.cap),
            ));
        }
        if self.cap > Duration::from_secs(3600) {
            return Err(AgentError::config(
                "backoff.cap",
                format!("{:?}", self.cap),
                "at most 1h",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(AgentError::config(
                "backoff.jitter",
                self.jitter.to_string(),
                "0..=1",
            ));
        }
        Ok(())
    }

    /// The delay before attempt `attempt` (0-based) for a uniform random
    /// `draw` in `[0, 1)` (values outside are clamped).
    pub fn delay(&self, attempt: u32, draw: f64) -> Duration {
        delay(self, attempt, draw)
    }
}

/// The un-jittered delay before attempt `attempt`: `min(cap, base · 2^attempt)`.
pub fn exponential(config: &BackoffConfig, attempt: u32) -> Duration {
    let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
    config
        .base
        .checked_mul(factor)
        .unwrap_or(config.cap)
        .min(config.cap)
}

/// The delay before attempt `attempt` with jitter from `draw` in `[0, 1)`.
pub fn delay(config: &BackoffConfig, attempt: u32, draw: f64) -> Duration {
    let exp = exponential(config, attempt);
    let draw = if draw.is_nan() {
        0.0
    } else {
        draw.clamp(0.0, 1.0)
    };
    let jitter = config.jitter.clamp(0.0, 1.0);
    exp.mul_f64(1.0 - jitter * draw)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn config() -> impl Strategy<Value = BackoffConfig> {
        (1u64..5_000, 1u64..120_000, 0.0f64..=1.0).prop_map(|(base, cap_extra, jitter)| {
            BackoffConfig {
                base: Duration::from_millis(base),
                cap: Duration::from_millis(base + cap_extra),
                jitter,
            }
        })
    }

    #[test]
    fn default_doubles_from_250ms_to_30s() {
        let c = BackoffConfig::default();
        c.validate().expect("default is valid");
        assert_eq!(c.delay(0, 0.0), Duration::from_millis(250));
        assert_eq!(c.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(c.delay(7, 0.0), Duration::from_secs(30));
        assert_eq!(c.delay(u32::MAX, 0.0), Duration::from_secs(30));
        assert_eq!(
            c.delay(0, 0.999_999),
            Duration::from_millis(250).mul_f64(1.0 - 0.5 * 0.999_999)
        );
    }

    #[test]
    fn invalid_parameters_name_the_field() {
        let c = BackoffConfig {
            jitter: 1.5,
            ..BackoffConfig::default()
        };
        assert!(
            c.validate()
                .expect_err("jitter")
                .to_string()
                .contains("backoff.jitter")
        );
        let c = BackoffConfig {
            base: Duration::from_secs(60),
            ..BackoffConfig::default()
        };
        assert!(
            c.validate()
                .expect_err("base")
                .to_string()
                .contains("backoff.base")
        );
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_the_cap(c in config(), attempt in any::<u32>(), draw in any::<f64>()) {
            prop_assert!(delay(&c, attempt, draw) <= c.cap);
        }

        #[test]
        fn delay_grows_until_the_cap_then_stays(c in config(), attempt in 0u32..64) {
            let now = exponential(&c, attempt);
            let next = exponential(&c, attempt + 1);
            prop_assert!(next >= now);
            if now < c.cap {
                // Doubles, unless the cap cuts it short.
                prop_assert_eq!(next, (now * 2).min(c.cap));
            } else {
                prop_assert_eq!(next, c.cap);
            }
            // The cap is reached in finitely many attempts.
            prop_assert_eq!(exponential(&c, 63), c.cap);
        }

        #[test]
        fn jitter_stays_within_its_bounds(c in config(), attempt in 0u32..64, draw in 0.0f64..1.0) {
            let exp = exponential(&c, attempt);
            let d = delay(&c, attempt, draw);
            prop_assert!(d <= exp);
            // Duration::mul_f64 rounds to whole nanoseconds.
            let lower = exp.mul_f64(1.0 - c.jitter).saturating_sub(Duration::from_nanos(1));
            prop_assert!(d >= lower, "{:?} < {:?}", d, lower);
        }
    }
}
