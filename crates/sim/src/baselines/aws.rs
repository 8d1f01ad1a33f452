//! B14: AWS-style predictive scaling plus target tracking (REFERENCE.md
//! §1.5, §3.2 B14).
//!
//! Load metric: requests per second at the ingress (the ALB request count),
//! in 1-minute datapoints; the scaling metric is that load per ready
//! replica, with a target (requests/s per replica).
//!
//! * **Target tracking**, every 60 s: `M = load / ready`. If `M > target`
//!   for 3 consecutive minutes, `desired = max(desired, ceil(ready·M/target))`
//!   (warming replicas are excluded from `M` but count in desired). If
//!   `M < 0.7·target` for 15 consecutive minutes (the observed 35/50 and
//!   28/40 alarms), `desired = floor(ready·M/target)`.
//! * **Predictive**: needs 24 h of history; hourly load over the last 14
//!   days; every 6 h a forecast of the next 48 h; the algorithm is
//!   unpublished, so the stand-in is the mean of the same hour of the week
//!   over the available weeks, else the same hour of the day over the last
//!   14 days (project choice). At `hour_start − 300 s` (SchedulingBufferTime)
//!   the hour's capacity `ceil(forecast/target)` becomes a floor; never
//!   scales in; honours max capacity.
//! * `desired = max(predictive floor, target tracking)`; scale-in only
//!   through target tracking.

use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};

/// AWS predictive + target tracking on requests per second per replica.
#[derive(Debug, Clone)]
pub struct AwsPredictiveTargetTracking {
    target_rps: f64,
    min: u32,
    max: u32,
    /// (time, ingress total) of the last minute boundary.
    last_minute: Option<(f64, u64)>,
    above: u32,
    below: u32,
    desired: Option<u32>,
    /// Mean load per completed hour, from the start.
    hourly: Vec<f64>,
    hour_start: Option<(f64, u64)>,
    forecast: Vec<(i64, f64)>,
    next_forecast_at: f64,
    floor: u32,
    latest: Option<(f64, u64)>,
}

impl AwsPredictiveTargetTracking {
    pub fn new(target_rps: f64, min: u32, max: u32) -> Self {
        Self {
            target_rps,
            min: min.max(1),
            max,
            last_minute: None,
            above: 0,
            below: 0,
            desired: None,
            hourly: Vec::new(),
            hour_start: None,
            forecast: Vec::new(),
            next_forecast_at: 0.0,
            floor: 0,
            latest: None,
        }
    }

    /// Forecast of the mean load in hour `h` (hours since the start).
    pub(crate) fn forecast_hour(history: &[f64], h: usize) -> Option<f64> {
        if history.len() < 24 {
            return None;
        }
        let recent_from = history.len().saturating_sub(14 * 24);
        let same_week: Vec<f64> = (1..=2)
            .filter_map(|w| h.checked_sub(w * 168))
            .filter(|&i| i < history.len() && i >= recent_from)
            .map(|i| history[i])
            .collect();
        if !same_week.is_empty() {
            return Some(same_week.iter().sum::<f64>() / same_week.len() as f64);
        }
        let same_day: Vec<f64> = (1..=14)
            .filter_map(|d| h.checked_sub(d * 24))
            .filter(|&i| i < history.len() && i >= recent_from)
            .map(|i| history[i])
            .collect();
        (!same_day.is_empty()).then(|| same_day.iter().sum::<f64>() / same_day.len() as f64)
    }
}

impl Autoscaler for AwsPredictiveTargetTracking {
    fn name(&self) -> String {
        "b14-aws-predictive-tt".into()
    }
    fn parameters(&self) -> Value {
        json!({
            "metric": "ingress requests/s per ready replica",
            "target_rps_per_replica": self.target_rps,
            "scale_out_alarm": "M > target for 3 consecutive 1-min datapoints",
            "scale_in_alarm": "M < 0.7 target for 15 consecutive 1-min datapoints",
            "predictive_history_h": 336,
            "predictive_min_history_h": 24,
            "forecast_every_h": 6,
            "scheduling_buffer_s": 300,
            "min": self.min,
            "max": self.max,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        60.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(15.0)
    }
    fn observe(&mut self, sample: FleetSample) {
        self.latest = Some((sample.at, sample.ingress_total));
        let hour = (sample.at / 3600.0).floor();
        match self.hour_start {
            None => self.hour_start = Some((sample.at, sample.ingress_total)),
            Some((t0, c0)) if (t0 / 3600.0).floor() < hour => {
                let dt = (sample.at - t0).max(1.0);
                self.hourly.push((sample.ingress_total - c0) as f64 / dt);
                self.hour_start = Some((sample.at, sample.ingress_total));
            }
            _ => {}
        }
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let now = view.now;
        let current = view.spec_replicas;
        let mut desired = self.desired.unwrap_or(current);
        // Target tracking on the last minute's datapoint.
        if let Some((t, c)) = self.latest {
            if let Some((t0, c0)) = self.last_minute
                && t > t0
                && view.ready > 0
            {
                let load = (c - c0) as f64 / (t - t0);
                let m = load / f64::from(view.ready);
                if m > self.target_rps {
                    self.above += 1;
                    self.below = 0;
                } else if m < 0.7 * self.target_rps {
                    self.below += 1;
                    self.above = 0;
                } else {
                    self.above = 0;
                    self.below = 0;
                }
                let want = f64::from(view.ready) * m / self.target_rps;
                if self.above >= 3 {
                    desired = desired.max(want.ceil() as u32);
                } else if self.below >= 15 {
                    desired = (want.floor() as u32).min(desired);
                    self.below = 0;
                }
            }
            self.last_minute = Some((t, c));
        }
        // Predictive floor.
        if now >= self.next_forecast_at && self.hourly.len() >= 24 {
            self.next_forecast_at = now + 6.0 * 3600.0;
            let h0 = self.hourly.len();
            self.forecast = (h0..h0 + 48)
                .filter_map(|h| Self::forecast_hour(&self.hourly, h).map(|f| (h as i64, f)))
                .collect();
        }
        let next_hour = ((now + 300.0) / 3600.0).floor() as i64;
        if let Some(&(_, f)) = self.forecast.iter().find(|(h, _)| *h == next_hour) {
            self.floor = (f / self.target_rps).ceil() as u32;
        }
        desired = desired.max(self.floor).clamp(self.min, self.max);
        self.desired = Some(desired);
        ScaleCommand::replicas(desired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forecast_uses_the_same_hour_of_previous_days() {
        let history: Vec<f64> = (0..48)
            .map(|h| if h % 24 == 9 { 100.0 } else { 10.0 })
            .collect();
        assert_eq!(
            AwsPredictiveTargetTracking::forecast_hour(&history, 57),
            Some(100.0)
        );
        assert_eq!(
            AwsPredictiveTargetTracking::forecast_hour(&history[..10], 33),
            None
        );
    }
}
