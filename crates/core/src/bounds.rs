//! Bounded ranges for configuration values: one check and one rendering of
//! "what is allowed" for every crate's flags and configuration fields. Pure:
//! the caller turns an [`OutOfRange`] into its own error, naming the field.

use std::fmt::Display;
use std::time::Duration;

use crate::time::format_duration;

/// A value outside the range allowed for it, both rendered for an error
/// message: the value as given, the range as `lo..=hi`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfRange {
    /// The value, e.g. `5ms` or `0`.
    pub value: String,
    /// What is allowed, e.g. `10ms..=1h` or `1..=100000`.
    pub allowed: String,
}

/// `value` within `lo..=hi`; otherwise the value (as `{:?}`, what was
/// given to the millisecond) and the range in flag syntax (`10ms..=1h`).
pub fn duration_within(value: Duration, lo: Duration, hi: Duration) -> Result<(), OutOfRange> {
    if value < lo || value > hi {
        return Err(OutOfRange {
            value: format!("{value:?}"),
            allowed: format!("{}..={}", format_duration(lo), format_duration(hi)),
        });
    }
    Ok(())
}

/// `value` within `lo..=hi` (a count, a rate); otherwise the value and the
/// range as `lo..=hi`. A NaN is outside every range.
pub fn within<T: PartialOrd + Display>(value: T, lo: T, hi: T) -> Result<(), OutOfRange> {
    if !(value >= lo && value <= hi) {
        return Err(OutOfRange {
            value: value.to_string(),
            allowed: format!("{lo}..={hi}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_inside_pass_and_outside_name_value_and_range() {
        let (lo, hi) = (Duration::from_millis(10), Duration::from_secs(3600));
        assert_eq!(duration_within(lo, lo, hi), Ok(()));
        assert_eq!(duration_within(hi, lo, hi), Ok(()));
        assert_eq!(
            duration_within(Duration::from_millis(5), lo, hi),
            Err(OutOfRange {
                value: "5ms".into(),
                allowed: "10ms..=1h".into()
            })
        );
        assert_eq!(
            duration_within(Duration::from_secs(3601), lo, hi)
                .map_err(|e| e.value)
                .unwrap_err(),
            "3601s"
        );
        assert_eq!(
            duration_within(
                Duration::from_secs(1),
                Duration::ZERO,
                Duration::from_secs(600)
            )
            .map(|()| "ok"),
            Ok("ok")
        );
    }

    #[test]
    fn numbers_outside_their_range_and_nan_are_refused() {
        assert_eq!(within(1usize, 1, 100_000), Ok(()));
        assert_eq!(
            within(0usize, 1, 100_000),
            Err(OutOfRange {
                value: "0".into(),
                allowed: "1..=100000".into()
            })
        );
        assert!(within(f64::NAN, 0.0, 1.0).is_err());
        assert!(within(0.5, 0.0, 1.0).is_ok());
    }
}
