//! Points in time as plain values.
//!
//! A [`Timestamp`] is milliseconds since the Unix epoch. Pure code never reads
//! a clock: the caller passes `now`. The simulator uses the same type with its
//! own epoch (a configurable start date), so schedules with time zones work in
//! simulation too.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (may be negative for dates before 1970).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const EPOCH: Timestamp = Timestamp(0);

    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// From seconds; sub-millisecond parts are rounded to the nearest millisecond.
    pub fn from_secs_f64(secs: f64) -> Self {
        Self((secs * 1000.0).round() as i64)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// Seconds from `earlier` to `self` (negative if `earlier` is later).
    pub fn secs_since(self, earlier: Timestamp) -> f64 {
        (self.0 - earlier.0) as f64 / 1000.0
    }

    /// `self` moved by `secs` seconds (may be negative).
    pub fn plus_secs(self, secs: f64) -> Self {
        Self(self.0 + (secs * 1000.0).round() as i64)
    }

    pub fn saturating_sub_duration(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(rhs.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, rhs: Duration) -> Timestamp {
        self.saturating_sub_duration(rhs)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:03}s",
            self.0.div_euclid(1000),
            self.0.rem_euclid(1000)
        )
    }
}

/// Parses a duration flag such as `500ms`, `1s`, `1.5s`, `2m`, `1h`; the
/// error says what was wrong and what is allowed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; use e.g. 500ms, 1s, 2m, 1h"))?;
    let scale = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => {
            return Err(format!(
                "`{s}` has no known unit; use us, ms, s, m, h or d (e.g. 40us, 500ms, 1s)"
            ));
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("`{s}` is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration in the syntax [`parse_duration`] reads, in the largest unit
/// that shows it exactly: `0s`, `250ms`, `30s`, `10m`, `1h`, `24h`; what no
/// unit shows whole (`1.5ms`) as `{:?}`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.is_zero() {
        "0s".to_string()
    } else if Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)) != d {
        format!("{d:?}")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secs_since_is_signed() {
        let a = Timestamp::from_millis(1_500);
        let b = Timestamp::from_millis(4_000);
        assert_eq!(b.secs_since(a), 2.5);
        assert_eq!(a.secs_since(b), -2.5);
    }

    #[test]
    fn plus_secs_round_trips() {
        let t = Timestamp::from_secs_f64(10.0).plus_secs(0.25);
        assert_eq!(t.as_millis(), 10_250);
        assert_eq!(
            t + Duration::from_millis(750),
            Timestamp::from_millis(11_000)
        );
    }

    #[test]
    fn durations_format_in_the_largest_exact_unit_and_parse_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(10), "10ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(86_400), "24h"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.5ms");
    }
}
