//! The shared engines of the baselines: E-HPA and E-KEDA (REFERENCE.md §3.1).
//!
//! **E-HPA** is the Kubernetes HPA reconcile loop of §1.2 exactly: bounds
//! first (`current > max → max`, `current < min → min`, `current == 0` with
//! `min != 0` → no action), then the maximum of the metric proposals,
//! normalised on the legacy path when no `behavior` is given (300 s
//! scale-down stabilization taking the max of recent recommendations; a
//! scale-up limit of `max(2·N, 4)` per reconcile) or on the behavior path
//! otherwise (per-direction stabilization windows, `Pods`/`Percent` rate
//! policies over their periods, `selectPolicy`). Proposals come from
//! [`plain_metric_proposal`] (`Pods`/`Resource` `AverageValue`, with the
//! unready/missing-pod correction) or [`external_average_value_proposal`]
//! (the External `AverageValue` path KEDA uses).
//!
//! **E-KEDA** is KEDA's own polling loop of §1.4: activation when a trigger
//! exceeds its activation threshold, 0 → `max(min, 1)` on activation,
//! → 0 after `cooldownPeriod` without activity (only with `min == 0`),
//! `N < min → min`.

use std::collections::VecDeque;

use serde::Serialize;

/// `selectPolicy` of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Select {
    Max,
    Min,
    Disabled,
}

/// A rate policy's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RateKind {
    Pods,
    Percent,
}

/// One rate policy: `value` pods or percent per `period_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatePolicy {
    pub kind: RateKind,
    pub value: u32,
    pub period_s: f64,
}

/// `HPAScalingRules` of one direction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rules {
    pub stabilization_s: f64,
    pub select: Select,
    pub policies: Vec<RatePolicy>,
}

/// HPA `behavior`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Behavior {
    pub scale_up: Rules,
    pub scale_down: Rules,
}

impl Behavior {
    /// The documented defaults: up window 0, max(4 pods, 100%) per 15 s;
    /// down window 300 s, 100% per 15 s.
    pub fn kubernetes_default() -> Self {
        Self {
            scale_up: Rules {
                stabilization_s: 0.0,
                select: Select::Max,
                policies: vec![
                    RatePolicy {
                        kind: RateKind::Pods,
                        value: 4,
                        period_s: 15.0,
                    },
                    RatePolicy {
                        kind: RateKind::Percent,
                        value: 100,
                        period_s: 15.0,
                    },
                ],
            },
            scale_down: Rules {
                stabilization_s: 300.0,
                select: Select::Max,
                policies: vec![RatePolicy {
                    kind: RateKind::Percent,
                    value: 100,
                    period_s: 15.0,
                }],
            },
        }
    }

    /// Defaults with both stabilization windows set to `window_s`.
    pub fn default_with_windows(up_s: f64, down_s: f64) -> Self {
        let mut b = Self::kubernetes_default();
        b.scale_up.stabilization_s = up_s;
        b.scale_down.stabilization_s = down_s;
        b
    }
}

/// How the HPA normalises a recommendation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Normalization {
    /// No `behavior`: the controller's downscale stabilization (300 s) and
    /// the `max(2·N, 4)` scale-up limit.
    Legacy {
        downscale_stabilization_s: f64,
    },
    Behavior(Behavior),
}

/// One HPA object and its controller state.
#[derive(Debug, Clone, Serialize)]
pub struct Hpa {
    pub min: u32,
    pub max: u32,
    pub tolerance_up: f64,
    pub tolerance_down: f64,
    pub normalization: Normalization,
    #[serde(skip)]
    recommendations: VecDeque<(f64, u32)>,
    #[serde(skip)]
    up_events: VecDeque<(f64, u32)>,
    #[serde(skip)]
    down_events: VecDeque<(f64, u32)>,
}

impl Hpa {
    /// An HPA with tolerance 0.1 both ways.
    pub fn new(min: u32, max: u32, normalization: Normalization) -> Self {
        Self {
            min,
            max,
            tolerance_up: 0.1,
            tolerance_down: 0.1,
            normalization,
            recommendations: VecDeque::new(),
            up_events: VecDeque::new(),
            down_events: VecDeque::new(),
        }
    }

    /// `isWithin(r) := (1 − tolDown) ≤ r ≤ (1 + tolUp)`.
    pub fn within(&self, r: f64) -> bool {
        (1.0 - self.tolerance_down) <= r && r <= (1.0 + self.tolerance_up)
    }

    /// One reconcile at `now` with `current = spec.replicas` and the maximum
    /// valid metric proposal (`None`: no valid metric, no change). Returns
    /// the desired count (equal to `current` for no change).
    pub fn reconcile(&mut self, now: f64, current: u32, proposal: Option<u32>) -> u32 {
        if current == 0 && self.min != 0 {
            return current;
        }
        let desired = if current > self.max {
            self.max
        } else if current < self.min {
            self.min
        } else {
            let Some(p) = proposal else {
                return current;
            };
            match self.normalization.clone() {
                Normalization::Legacy {
                    downscale_stabilization_s,
                } => self.normalize_legacy(now, current, p, downscale_stabilization_s),
                Normalization::Behavior(b) => self.normalize_behavior(now, current, p, &b),
            }
        };
        if desired != current && matches!(self.normalization, Normalization::Behavior(_)) {
            if desired > current {
                self.up_events.push_back((now, desired - current));
            } else {
                self.down_events.push_back((now, current - desired));
            }
        }
        desired
    }

    fn normalize_legacy(&mut self, now: f64, current: u32, proposal: u32, window: f64) -> u32 {
        let cutoff = now - window;
        self.recommendations.retain(|(t, _)| *t >= cutoff);
        let stabilized = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .fold(proposal, u32::max);
        self.recommendations.push_back((now, proposal));
        let scale_up_limit = ((2.0 * f64::from(current)).max(4.0)) as u32;
        let max_allowed = self.max.min(scale_up_limit);
        if stabilized < self.min {
            self.min
        } else {
            stabilized.min(max_allowed)
        }
    }

    fn normalize_behavior(&mut self, now: f64, current: u32, proposal: u32, b: &Behavior) -> u32 {
        let longest = b.scale_up.stabilization_s.max(b.scale_down.stabilization_s);
        self.recommendations.retain(|(t, _)| *t > now - longest);
        let up_cut = now - b.scale_up.stabilization_s;
        let down_cut = now - b.scale_down.stabilization_s;
        let mut up = proposal;
        let mut down = proposal;
        for &(t, r) in &self.recommendations {
            if t > up_cut {
                up = up.min(r);
            }
            if t > down_cut {
                down = down.max(r);
            }
        }
        self.recommendations.push_back((now, proposal));
        let mut rec = current;
        if rec < up {
            rec = up;
        }
        if rec > down {
            rec = down;
        }
        // Rate limits.
        let period_max = b
            .scale_up
            .policies
            .iter()
            .chain(&b.scale_down.policies)
            .map(|p| p.period_s)
            .fold(0.0, f64::max);
        self.up_events.retain(|(t, _)| *t > now - period_max);
        self.down_events.retain(|(t, _)| *t > now - period_max);
        if rec > current {
            let limit = self
                .scale_limit(now, current, &b.scale_up, true)
                .max(current);
            let max_allowed = self.max.min(limit);
            rec.min(max_allowed)
        } else if rec < current {
            let limit = self
                .scale_limit(now, current, &b.scale_down, false)
                .min(current);
            let min_allowed = self.min.max(limit);
            rec.max(min_allowed)
        } else {
            rec
        }
    }

    fn change_in(&self, now: f64, period: f64, up: bool) -> i64 {
        let ev = if up {
            &self.up_events
        } else {
            &self.down_events
        };
        ev.iter()
            .filter(|(t, _)| *t > now - period)
            .map(|(_, d)| i64::from(*d))
            .sum()
    }

    fn scale_limit(&self, now: f64, current: u32, rules: &Rules, up: bool) -> u32 {
        if rules.select == Select::Disabled || rules.policies.is_empty() {
            return current;
        }
        let mut result: Option<i64> = None;
        for p in &rules.policies {
            let start = i64::from(current) - self.change_in(now, p.period_s, true)
                + self.change_in(now, p.period_s, false);
            let proposed = match (p.kind, up) {
                (RateKind::Pods, true) => start + i64::from(p.value),
                (RateKind::Percent, true) => {
                    (start as f64 * (1.0 + f64::from(p.value) / 100.0)).ceil() as i64
                }
                (RateKind::Pods, false) => start - i64::from(p.value),
                (RateKind::Percent, false) => {
                    (start as f64 * (1.0 - f64::from(p.value) / 100.0)) as i64
                }
            };
            // Up: Max picks the largest limit; down: Max picks the smallest.
            let pick_larger = (rules.select == Select::Max) == up;
            result = Some(match result {
                None => proposed,
                Some(r) if pick_larger => r.max(proposed),
                Some(r) => r.min(proposed),
            });
        }
        result.unwrap_or(i64::from(current)).max(0) as u32
    }
}

/// A metric sample of one pod as the HPA groups it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PodMetric {
    /// A pod counted ready, with its value.
    Ready(f64),
    /// A pod counted unready (e.g. phase Pending).
    Unready,
    /// A pod with no sample.
    Missing,
}

/// `calcPlainMetricReplicas` (`Pods`/`Resource` `AverageValue` targets):
/// the usage ratio over ready pods, with missing pods filled by the target
/// (scale-down) or 0 (scale-up) and unready pods by 0 on scale-up, and the
/// reversal guards. `None` when no pod has a metric.
pub fn plain_metric_proposal(
    hpa: &Hpa,
    current: u32,
    pods: &[PodMetric],
    target: f64,
) -> Option<u32> {
    let ready: Vec<f64> = pods
        .iter()
        .filter_map(|p| match p {
            PodMetric::Ready(v) => Some(*v),
            _ => None,
        })
        .collect();
    if ready.is_empty() {
        return None;
    }
    let unready = pods.iter().filter(|p| **p == PodMetric::Unready).count();
    let missing = pods.iter().filter(|p| **p == PodMetric::Missing).count();
    let ratio = ready.iter().sum::<f64>() / ready.len() as f64 / target;
    let scale_up_with_unready = unready > 0 && ratio > 1.0;
    if !scale_up_with_unready && missing == 0 {
        if hpa.within(ratio) {
            return Some(current);
        }
        return Some((ratio * ready.len() as f64).ceil() as u32);
    }
    let mut values = ready.clone();
    for _ in 0..missing {
        values.push(if ratio < 1.0 { target } else { 0.0 });
    }
    if scale_up_with_unready {
        values.extend(std::iter::repeat_n(0.0, unready));
    }
    let new_ratio = values.iter().sum::<f64>() / values.len() as f64 / target;
    if hpa.within(new_ratio) || (ratio > 1.0 && new_ratio < 1.0) || (ratio < 1.0 && new_ratio > 1.0)
    {
        return Some(current);
    }
    let n = (new_ratio * values.len() as f64).ceil() as u32;
    if (new_ratio < 1.0 && n > current) || (new_ratio > 1.0 && n < current) {
        return Some(current);
    }
    Some(n)
}

/// The External `AverageValue` proposal (KEDA's default path):
/// `isWithin(total / (target × status_replicas)) ? status_replicas : ceil(total / target)`.
pub fn external_average_value_proposal(
    hpa: &Hpa,
    total: f64,
    target: f64,
    status_replicas: u32,
) -> u32 {
    let ratio = if status_replicas == 0 {
        f64::INFINITY
    } else {
        total / (target * f64::from(status_replicas))
    };
    if hpa.within(ratio) {
        status_replicas
    } else {
        (total / target).ceil().max(0.0) as u32
    }
}

/// KEDA's polling loop for one ScaledObject.
#[derive(Debug, Clone, Serialize)]
pub struct Keda {
    pub polling_s: f64,
    pub cooldown_s: f64,
    pub min: u32,
    #[serde(skip)]
    last_active: f64,
    #[serde(skip)]
    next_poll: f64,
}

impl Keda {
    pub fn new(polling_s: f64, cooldown_s: f64, min: u32) -> Self {
        Self {
            polling_s,
            cooldown_s,
            min,
            last_active: 0.0,
            next_poll: 0.0,
        }
    }

    /// The HPA's `minReplicas`: `max(minReplicaCount, 1)`.
    pub fn hpa_min(&self) -> u32 {
        self.min.max(1)
    }

    /// Whether a poll is due at `now`.
    pub fn due(&self, now: f64) -> bool {
        now >= self.next_poll
    }

    /// One poll at `now` with `current` replicas and whether any trigger is
    /// active. Returns the replica count KEDA itself sets, if it sets one.
    pub fn poll(&mut self, now: f64, current: u32, active: bool) -> Option<u32> {
        self.next_poll = now + self.polling_s;
        if active {
            self.last_active = now;
            if current == 0 {
                return Some(self.min.max(1));
            }
            return None;
        }
        if current > 0 && self.min == 0 {
            if self.last_active + self.cooldown_s < now {
                return Some(0);
            }
        } else if current < self.min {
            return Some(self.min);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_path_holds_the_max_of_five_minutes_and_limits_scale_up() {
        let mut h = Hpa::new(
            1,
            100,
            Normalization::Legacy {
                downscale_stabilization_s: 300.0,
            },
        );
        // From 2 replicas a proposal of 10 is limited to max(2·2, 4) = 4.
        assert_eq!(h.reconcile(0.0, 2, Some(10)), 4);
        // A later proposal of 3 is held at the 300 s max (10, clamped to 8).
        assert_eq!(h.reconcile(15.0, 4, Some(3)), 8);
        // After the window, the low proposal wins.
        assert_eq!(h.reconcile(316.0, 8, Some(3)), 3);
    }

    #[test]
    fn behavior_rate_policies_count_events_within_the_period() {
        let mut b = Behavior::kubernetes_default();
        b.scale_up.policies = vec![RatePolicy {
            kind: RateKind::Pods,
            value: 1,
            period_s: 60.0,
        }];
        let mut h = Hpa::new(1, 100, Normalization::Behavior(b));
        assert_eq!(h.reconcile(0.0, 2, Some(9)), 3);
        // Within the 60 s period the one-pod budget is spent.
        assert_eq!(h.reconcile(15.0, 3, Some(9)), 3);
        assert_eq!(h.reconcile(61.0, 3, Some(9)), 4);
    }

    #[test]
    fn external_average_value_respects_tolerance() {
        let h = Hpa::new(
            1,
            10,
            Normalization::Behavior(Behavior::kubernetes_default()),
        );
        // 21 waiting over 4 replicas at threshold 5: ratio 1.05, within.
        assert_eq!(external_average_value_proposal(&h, 21.0, 5.0, 4), 4);
        assert_eq!(external_average_value_proposal(&h, 30.0, 5.0, 4), 6);
    }

    #[test]
    fn keda_activates_from_zero_and_deactivates_after_cooldown() {
        let mut k = Keda::new(15.0, 300.0, 0);
        assert_eq!(k.poll(0.0, 0, true), Some(1));
        assert_eq!(k.poll(15.0, 1, false), None);
        assert_eq!(k.poll(301.0, 1, false), Some(0));
    }
}
