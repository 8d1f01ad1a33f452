//! Five-field cron expressions, matched against local wall-clock minutes.
//!
//! `minute hour day-of-month month day-of-week`, with `*`, lists (`1,15`),
//! ranges (`8-18`), steps (`*/15`, `0-30/10`), month names (`JAN`..`DEC`) and
//! day names (`SUN`..`SAT`, `0` and `7` both Sunday). As in Vixie cron, when
//! both day-of-month and day-of-week are restricted a day matches if either
//! does. Macros `@hourly`, `@daily`/`@midnight`, `@weekly`, `@monthly`,
//! `@yearly`/`@annually` are accepted.
//!
//! Time zones and daylight-saving transitions are handled by the caller
//! ([`crate::schedule`]); this module only answers "does this local minute
//! match?".

use std::fmt;

/// A parsed cron expression: one bit set per allowed value of each field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CronExpr {
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    days_of_week: u8,
    dom_restricted: bool,
    dow_restricted: bool,
}

/// Why a cron expression was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronError(pub String);

impl fmt::Display for CronError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl CronExpr {
    /// Parse a five-field expression or a macro.
    pub fn parse(text: &str) -> Result<Self, CronError> {
        let trimmed = text.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            _ => trimmed,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(CronError(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            )));
        }
        let minutes = parse_field(fields[0], 0, 59, None, "minute")?;
        let hours = parse_field(fields[1], 0, 23, None, "hour")?;
        let dom = parse_field(fields[2], 1, 31, None, "day-of-month")?;
        let months = parse_field(fields[3], 1, 12, Some(&MONTHS), "month")?;
        let mut dow = parse_field(fields[4], 0, 7, Some(&DAYS), "day-of-week")?;
        if dow & (1 << 7) != 0 {
            dow |= 1; // 7 is Sunday too
            dow &= !(1 << 7);
        }
        Ok(Self {
            minutes,
            hours: hours as u32,
            days_of_month: dom as u32,
            months: months as u16,
            days_of_week: dow as u8,
            dom_restricted: !is_star(fields[2]),
            dow_restricted: !is_star(fields[4]),
        })
    }

    /// Whether the local time `month` (1-12), `day` (1-31), `weekday`
    /// (0 = Sunday), `hour`, `minute` matches.
    pub fn matches(&self, month: u32, day: u32, weekday: u32, hour: u32, minute: u32) -> bool {
        if self.minutes & (1u64 << minute) == 0
            || self.hours & (1u32 << hour) == 0
            || self.months & (1u16 << month) == 0
        {
            return false;
        }
        let dom_ok = self.days_of_month & (1u32 << day) != 0;
        let dow_ok = self.days_of_week & (1u8 << weekday) != 0;
        if self.dom_restricted && self.dow_restricted {
            dom_ok || dow_ok
        } else {
            dom_ok && dow_ok
        }
    }
}

fn is_star(field: &str) -> bool {
    field == "*" || field == "?"
}

fn parse_value(
    text: &str,
    lo: u32,
    hi: u32,
    names: Option<&[&str]>,
    what: &str,
) -> Result<u32, CronError> {
    if let Some(names) = names {
        let upper = text.to_ascii_uppercase();
        if let Some(i) = names.iter().position(|n| *n == upper) {
            // Month names count from 1 (the field's lower bound), day names from 0.
            return Ok(i as u32 + lo);
        }
    }
    let v: u32 = text
        .parse()
        .map_err(|_| CronError(format!("{what}: {text:?} is not a number or a known name")))?;
    if v < lo || v > hi {
        return Err(CronError(format!("{what}: {v} is outside {lo}..={hi}")));
    }
    Ok(v)
}

fn parse_field(
    field: &str,
    lo: u32,
    hi: u32,
    names: Option<&[&str]>,
    what: &str,
) -> Result<u64, CronError> {
    let mut bits = 0u64;
    for part in field.split(',') {
        if part.is_empty() {
            return Err(CronError(format!(
                "{what}: empty list element in {field:?}"
            )));
        }
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| CronError(format!("{what}: step {s:?} is not a number")))?;
                if step == 0 {
                    return Err(CronError(format!("{what}: step must be at least 1")));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (start, end) = if is_star(range) {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = parse_value(a, lo, hi, names, what)?;
            let b = parse_value(b, lo, hi, names, what)?;
            if a > b {
                return Err(CronError(format!("{what}: range {range:?} runs backwards")));
            }
            (a, b)
        } else {
            let a = parse_value(range, lo, hi, names, what)?;
            // `5/15` means 5, 20, 35, 50.
            (a, if part.contains('/') { hi } else { a })
        };
        let mut v = start;
        while v <= end {
            bits |= 1u64 << v;
            v += step;
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekday_business_hours_match() {
        let c = CronExpr::parse("0 8 * * MON-FRI").unwrap();
        assert!(c.matches(3, 31, 1, 8, 0));
        assert!(!c.matches(3, 30, 0, 8, 0));
        assert!(!c.matches(3, 31, 1, 8, 1));
    }

    #[test]
    fn steps_lists_and_names_parse() {
        let c = CronExpr::parse("*/15 0,12 1 jan,Jul *").unwrap();
        assert!(c.matches(1, 1, 3, 0, 45));
        assert!(c.matches(7, 1, 3, 12, 30));
        assert!(!c.matches(2, 1, 3, 12, 30));
        assert!(!c.matches(1, 1, 3, 12, 10));
        let c = CronExpr::parse("5/20 * * * *").unwrap();
        assert!(c.matches(1, 1, 0, 0, 45));
        assert!(!c.matches(1, 1, 0, 0, 0));
    }

    #[test]
    fn sunday_is_zero_and_seven() {
        let c = CronExpr::parse("0 0 * * 7").unwrap();
        assert!(c.matches(1, 5, 0, 0, 0));
        let c = CronExpr::parse("0 0 * * SUN").unwrap();
        assert!(c.matches(1, 5, 0, 0, 0));
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_restricted() {
        let c = CronExpr::parse("0 0 1 * MON").unwrap();
        assert!(c.matches(6, 1, 4, 0, 0), "the 1st, a Thursday");
        assert!(c.matches(6, 9, 1, 0, 0), "a Monday");
        assert!(!c.matches(6, 10, 2, 0, 0));
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(
            CronExpr::parse("0 8 * *")
                .unwrap_err()
                .0
                .contains("5 fields")
        );
        assert!(
            CronExpr::parse("61 * * * *")
                .unwrap_err()
                .0
                .contains("minute")
        );
        assert!(
            CronExpr::parse("0 18-8 * * *")
                .unwrap_err()
                .0
                .contains("backwards")
        );
        assert!(
            CronExpr::parse("0 * * * FUNDAY")
                .unwrap_err()
                .0
                .contains("day-of-week")
        );
        assert!(CronExpr::parse("*/0 * * * *").is_err());
        assert!(CronExpr::parse("@daily").is_ok());
    }
}
