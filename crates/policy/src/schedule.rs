//! Scheduled control: cron windows in IANA time zones that set min, max or
//! desired replicas while they are open.
//!
//! A rule is open from a minute its `start` expression matches until a later
//! minute its `end` expression matches (the KEDA cron scaler's model), both
//! read on the wall clock of the rule's time zone. Daylight-saving changes
//! follow Vixie cron: a local minute skipped when clocks spring forward fires
//! at the jump, and a minute repeated when they fall back fires (harmlessly)
//! twice.

use chrono::{Datelike, NaiveDateTime, TimeZone, Timelike};
use chrono_tz::Tz;
use gpuscale_core::Timestamp;

use crate::cron::CronExpr;

/// How far back the first evaluation of a rule looks for its last start or
/// end: eight days covers every weekly expression.
const LOOKBACK_MINUTES: i64 = 8 * 24 * 60;
/// Beyond this gap since the last evaluation, re-scan instead of stepping.
const MAX_STEP_MINUTES: i64 = 24 * 60;

/// One validated schedule rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRule {
    pub name: String,
    pub start: CronExpr,
    pub end: CronExpr,
    pub time_zone: Tz,
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub desired_replicas: Option<u32>,
}

/// The bounds and recommendation of the rules open at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ScheduleEffect {
    /// Highest `minReplicas` of the open rules.
    pub min_replicas: Option<u32>,
    /// Highest `maxReplicas` of the open rules.
    pub max_replicas: Option<u32>,
    /// Highest `desiredReplicas` of the open rules.
    pub desired_replicas: Option<u32>,
    /// Names of the open rules, in spec order.
    pub open: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RuleCache {
    minute: i64,
    open: bool,
}

/// Evaluates a workload's rules, remembering each rule's state at the last
/// minute evaluated so the usual call (one minute later) costs one match.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScheduleEvaluator {
    cache: Vec<Option<RuleCache>>,
}

fn local_fields(tz: Tz, minute: i64) -> NaiveDateTime {
    tz.timestamp_opt(minute * 60, 0)
        .single()
        .map(|dt| dt.naive_local())
        .unwrap_or_default()
}

fn matches_local(expr: &CronExpr, t: &NaiveDateTime) -> bool {
    expr.matches(
        t.month(),
        t.day(),
        t.weekday().num_days_from_sunday(),
        t.hour(),
        t.minute(),
    )
}

/// Whether `expr` fires at UTC minute `minute` in `tz`: the local minute
/// matches, or a local minute skipped by a forward jump just before it does.
fn fires(expr: &CronExpr, tz: Tz, minute: i64) -> bool {
    let here = local_fields(tz, minute);
    if matches_local(expr, &here) {
        return true;
    }
    let before = local_fields(tz, minute - 1);
    let gap = (here - before).num_minutes();
    if gap > 1 {
        let mut t = before;
        for _ in 1..gap.min(24 * 60) {
            t += chrono::Duration::minutes(1);
            if matches_local(expr, &t) {
                return true;
            }
        }
    }
    false
}

impl ScheduleRule {
    /// Whether the rule is open at UTC minute `minute`, scanning back for the
    /// latest start or end (`None` if neither fired in the look-back).
    fn open_by_scan(&self, minute: i64) -> bool {
        for m in (minute - LOOKBACK_MINUTES..=minute).rev() {
            let end = fires(&self.end, self.time_zone, m);
            let start = fires(&self.start, self.time_zone, m);
            if end {
                // A minute matching both ends the window (validated to differ).
                return false;
            }
            if start {
                return true;
            }
        }
        false
    }

    /// Whether the rule is open at `now` (no caching).
    pub fn is_open(&self, now: Timestamp) -> bool {
        self.open_by_scan(now.as_millis().div_euclid(60_000))
    }
}

impl ScheduleEvaluator {
    /// The combined effect of `rules` at `now`.
    pub fn evaluate(&mut self, rules: &[ScheduleRule], now: Timestamp) -> ScheduleEffect {
        if self.cache.len() != rules.len() {
            self.cache = vec![None; rules.len()];
        }
        let minute = now.as_millis().div_euclid(60_000);
        let mut effect = ScheduleEffect::default();
        for (rule, slot) in rules.iter().zip(self.cache.iter_mut()) {
            let open = match *slot {
                Some(c) if c.minute == minute => c.open,
                Some(c) if c.minute < minute && minute - c.minute <= MAX_STEP_MINUTES => {
                    let mut open = c.open;
                    for m in c.minute + 1..=minute {
                        if fires(&rule.end, rule.time_zone, m) {
                            open = false;
                        } else if fires(&rule.start, rule.time_zone, m) {
                            open = true;
                        }
                    }
                    open
                }
                _ => rule.open_by_scan(minute),
            };
            *slot = Some(RuleCache { minute, open });
            if open {
                effect.min_replicas = effect.min_replicas.max(rule.min_replicas);
                effect.max_replicas = effect.max_replicas.max(rule.max_replicas);
                effect.desired_replicas = effect.desired_replicas.max(rule.desired_replicas);
                effect.open.push(rule.name.clone());
            }
        }
        effect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(start: &str, end: &str, tz: &str) -> ScheduleRule {
        ScheduleRule {
            name: "business-hours".into(),
            start: CronExpr::parse(start).unwrap(),
            end: CronExpr::parse(end).unwrap(),
            time_zone: tz.parse().unwrap(),
            min_replicas: Some(10),
            max_replicas: None,
            desired_replicas: None,
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Timestamp {
        Timestamp::from_millis(
            chrono::Utc
                .with_ymd_and_hms(y, mo, d, h, mi, 0)
                .unwrap()
                .timestamp_millis(),
        )
    }

    #[test]
    fn berlin_business_hours_follow_daylight_saving() {
        let r = rule("0 8 * * MON-FRI", "0 18 * * MON-FRI", "Europe/Berlin");
        // Friday 2025-03-28, CET (UTC+1): opens 07:00 UTC.
        assert!(!r.is_open(utc(2025, 3, 28, 6, 59)));
        assert!(r.is_open(utc(2025, 3, 28, 7, 0)));
        assert!(!r.is_open(utc(2025, 3, 28, 17, 0)));
        // Monday 2025-03-31, CEST (UTC+2): opens 06:00 UTC.
        assert!(!r.is_open(utc(2025, 3, 31, 5, 59)));
        assert!(r.is_open(utc(2025, 3, 31, 6, 0)));
        assert!(!r.is_open(utc(2025, 3, 31, 16, 0)));
        // The weekend is closed.
        assert!(!r.is_open(utc(2025, 3, 29, 10, 0)));
    }

    #[test]
    fn a_start_in_the_skipped_hour_fires_at_the_jump() {
        // 02:30 does not exist in Berlin on 2025-03-30; cron runs it at 03:00 CEST = 01:00 UTC.
        let r = rule("30 2 * * *", "0 5 * * *", "Europe/Berlin");
        assert!(!r.is_open(utc(2025, 3, 30, 0, 59)));
        assert!(r.is_open(utc(2025, 3, 30, 1, 0)));
    }

    #[test]
    fn stepping_minute_by_minute_agrees_with_scanning() {
        let rules = vec![rule(
            "0 8 * * MON-FRI",
            "0 18 * * MON-FRI",
            "America/New_York",
        )];
        let mut ev = ScheduleEvaluator::default();
        let start = utc(2025, 3, 7, 0, 0);
        for k in 0..(5 * 24 * 60 / 7) {
            let now = start.plus_secs(f64::from(k * 7 * 60));
            let stepped = !ev.evaluate(&rules, now).open.is_empty();
            assert_eq!(stepped, rules[0].is_open(now), "at {now}");
        }
    }
}
