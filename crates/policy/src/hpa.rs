//! Kubernetes HPA behaviour, exactly, as a pure library: the one
//! implementation gpuscale has.
//!
//! The Horizontal Pod Autoscaler's proposals (`replica_calculator.go`, with
//! the correction for unready and missing pods) and its normalisation of a
//! recommendation — stabilization windows, `Pods`/`Percent` rate policies
//! per period, `selectPolicy`, per-direction tolerance, and the legacy path
//! used when an HPA has no `behavior` — re-implemented from
//! `kubernetes/kubernetes pkg/controller/podautoscaler/horizontal.go` and
//! `replica_calculator.go` (v1.33+, see REFERENCE.md §1.2), with `now` as an
//! argument and the state in a value ([`BehaviorState`]) instead of on a
//! controller struct.
//!
//! gpuscale's own policy and the proportional decider run their
//! recommendations through [`BehaviorState::normalize`]; the simulator's HPA
//! and KEDA baselines are an [`Hpa`] each, fed [`plain_metric_proposal`] or
//! [`external_average_value_proposal`].
//!
//! ```
//! use gpuscale_core::Timestamp;
//! use gpuscale_policy::hpa::{plain_metric_proposal, Behavior, BehaviorState, PodMetric};
//!
//! let behavior = Behavior::hpa_default();
//! let mut state = BehaviorState::default();
//! let now = Timestamp::from_millis(0);
//! // 4 ready pods at 90% CPU against a 50% target: proposal ceil(1.8 × 4) = 8.
//! let pods = [PodMetric::Ready(90.0); 4];
//! let proposal = plain_metric_proposal(&pods, 50.0, 4, 0.1, 0.1).expect("ready pods");
//! let out = state.normalize(&behavior, now, 4, proposal, 1, 10);
//! assert_eq!(out.desired, 8); // within max(4 pods, 100%) per 15 s
//! state.record_scale_event(now, 4, out.desired);
//! ```

use std::collections::VecDeque;

use gpuscale_core::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the policies of one direction combine (`selectPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
pub enum SelectPolicy {
    /// The policy allowing the largest change wins (HPA default).
    #[default]
    Max,
    /// The policy allowing the smallest change wins.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// The unit of a rate policy (`type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ScalingPolicyKind {
    /// An absolute number of pods per period.
    Pods,
    /// A percentage of the replicas at the start of the period.
    Percent,
}

/// One rate policy: at most `value` pods (or percent) per `period_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalingPolicy {
    pub kind: ScalingPolicyKind,
    pub value: u32,
    pub period_s: u32,
}

/// The rules of one direction (HPA `HPAScalingRules`), validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingRules {
    /// Stabilization window, seconds (0..=3600).
    pub stabilization_window_s: u32,
    pub select_policy: SelectPolicy,
    pub policies: Vec<ScalingPolicy>,
    /// Tolerance of this direction: a usage ratio within
    /// `[1 − down.tolerance, 1 + up.tolerance]` proposes no change.
    pub tolerance: f64,
}

/// Scale-up and scale-down rules (HPA `behavior`), validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Behavior {
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
}

/// The HPA's default tolerance (`--horizontal-pod-autoscaler-tolerance`).
pub const HPA_DEFAULT_TOLERANCE: f64 = 0.1;
/// The legacy path's scale-down stabilization window (controller flag default).
pub(crate) const HPA_DOWNSCALE_STABILIZATION_S: u32 = 300;
/// Longest allowed `periodSeconds` of a policy.
pub(crate) const MAX_PERIOD_S: u32 = 1800;
/// Longest allowed `stabilizationWindowSeconds`.
pub(crate) const MAX_STABILIZATION_WINDOW_S: u32 = 3600;

impl ScalingRules {
    /// HPA's default scale-up rules: no window; max of 4 pods and 100% per 15 s.
    pub(crate) fn hpa_default_scale_up() -> Self {
        Self {
            stabilization_window_s: 0,
            select_policy: SelectPolicy::Max,
            policies: vec![
                ScalingPolicy {
                    kind: ScalingPolicyKind::Pods,
                    value: 4,
                    period_s: 15,
                },
                ScalingPolicy {
                    kind: ScalingPolicyKind::Percent,
                    value: 100,
                    period_s: 15,
                },
            ],
            tolerance: HPA_DEFAULT_TOLERANCE,
        }
    }

    /// HPA's default scale-down rules: 300 s window; 100% per 15 s.
    pub(crate) fn hpa_default_scale_down() -> Self {
        Self {
            stabilization_window_s: HPA_DOWNSCALE_STABILIZATION_S,
            select_policy: SelectPolicy::Max,
            policies: vec![ScalingPolicy {
                kind: ScalingPolicyKind::Percent,
                value: 100,
                period_s: 15,
            }],
            tolerance: HPA_DEFAULT_TOLERANCE,
        }
    }

    fn longest_period_s(&self) -> u32 {
        self.policies.iter().map(|p| p.period_s).max().unwrap_or(0)
    }
}

impl Behavior {
    /// The behaviour an HPA gets when its `behavior` is present but empty:
    /// the documented defaults (REFERENCE.md §1.2), tolerance 0.1 both ways.
    pub fn hpa_default() -> Self {
        Self {
            scale_up: ScalingRules::hpa_default_scale_up(),
            scale_down: ScalingRules::hpa_default_scale_down(),
        }
    }

    /// The defaults with stabilization windows `up_s` and `down_s`.
    pub fn hpa_default_with_windows(up_s: u32, down_s: u32) -> Self {
        let mut b = Self::hpa_default();
        b.scale_up.stabilization_window_s = up_s;
        b.scale_down.stabilization_window_s = down_s;
        b
    }
}

/// Whether a usage ratio proposes no change: `1 − tol_down ≤ r ≤ 1 + tol_up`.
pub fn within_tolerance(ratio: f64, tol_up: f64, tol_down: f64) -> bool {
    (1.0 - tol_down) <= ratio && ratio <= 1.0 + tol_up
}

/// One pod's metric sample as the HPA groups it (`groupPods`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PodMetric {
    /// A pod counted ready, with its value.
    Ready(f64),
    /// A pod counted unready (e.g. phase Pending, or not Ready yet).
    Unready,
    /// A pod with no sample.
    Missing,
}

/// The HPA proposal for a `Pods` (or `Resource` `AverageValue`) metric with
/// target `target` per pod: `calcPlainMetricReplicas` of
/// `replica_calculator.go`, with its correction for unready and missing
/// pods. The usage ratio is taken over ready pods; within tolerance and with
/// no unready or missing pod to correct for, `current`; else missing pods
/// are filled with the target (scale-down) or 0 (scale-up), unready pods
/// with 0 on a scale-up, and the ratio is taken again: `current` if it is
/// now within tolerance or the direction reversed, else
/// `ceil(ratio × pods)` unless that, too, reverses the direction. `None`
/// when no pod is ready with a metric (the HPA then does not scale), or
/// when the target is not a positive finite number.
pub fn plain_metric_proposal(
    pods: &[PodMetric],
    target: f64,
    current: u32,
    tol_up: f64,
    tol_down: f64,
) -> Option<u32> {
    if !(target.is_finite() && target > 0.0) {
        return None;
    }
    let (mut sum, mut ready, mut unready, mut missing) = (0.0, 0usize, 0usize, 0usize);
    for p in pods {
        match p {
            PodMetric::Ready(v) => {
                sum += v;
                ready += 1;
            }
            PodMetric::Unready => unready += 1,
            PodMetric::Missing => missing += 1,
        }
    }
    if ready == 0 || !sum.is_finite() {
        return None;
    }
    let ratio = sum / ready as f64 / target;
    let scale_up_with_unready = unready > 0 && ratio > 1.0;
    if !scale_up_with_unready && missing == 0 {
        if within_tolerance(ratio, tol_up, tol_down) {
            return Some(current);
        }
        return Some(ceil_u32(ratio * ready as f64));
    }
    let mut counted = ready + missing;
    if ratio < 1.0 {
        sum += target * missing as f64;
    }
    if scale_up_with_unready {
        counted += unready;
    }
    let new_ratio = sum / counted as f64 / target;
    if within_tolerance(new_ratio, tol_up, tol_down)
        || (ratio > 1.0 && new_ratio < 1.0)
        || (ratio < 1.0 && new_ratio > 1.0)
    {
        return Some(current);
    }
    let n = ceil_u32(new_ratio * counted as f64);
    if (new_ratio < 1.0 && n > current) || (new_ratio > 1.0 && n < current) {
        return Some(current);
    }
    Some(n)
}

/// The HPA proposal for an `External` (or `Object`) metric with an
/// `AverageValue` target, the path KEDA's triggers take: with
/// `r = total / (target × status_replicas)`, `status_replicas` if `r` is within
/// tolerance, else `ceil(total / target)`. Ignores readiness, as the HPA does.
pub fn external_average_value_proposal(
    total: f64,
    target: f64,
    status_replicas: u32,
    tol_up: f64,
    tol_down: f64,
) -> u32 {
    if !(total.is_finite() && target.is_finite() && target > 0.0 && total >= 0.0) {
        return status_replicas;
    }
    if status_replicas > 0 {
        let r = total / (target * f64::from(status_replicas));
        if within_tolerance(r, tol_up, tol_down) {
            return status_replicas;
        }
    }
    ceil_u32(total / target)
}

fn ceil_u32(x: f64) -> u32 {
    if x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // Guard against 2.0000000000000004-style noise turning 2 into 3.
        let r = x.round();
        if (x - r).abs() < 1e-9 {
            r as u32
        } else {
            x.ceil() as u32
        }
    }
}

/// Which limit decided the normalised count (HPA's `ScalingLimited` reasons
/// and the stabilization reasons of `AbleToScale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitReason {
    /// Held up by the scale-down stabilization window.
    ScaleDownStabilized,
    /// Held down by the scale-up stabilization window.
    ScaleUpStabilized,
    /// A scale-up rate policy cut the increase.
    ScaleUpLimit,
    /// A scale-down rate policy cut the decrease.
    ScaleDownLimit,
    /// `maxReplicas` (or the legacy `max(2N, 4)` cap).
    TooManyReplicas,
    /// `minReplicas`.
    TooFewReplicas,
}

impl LimitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitReason::ScaleDownStabilized => "ScaleDownStabilized",
            LimitReason::ScaleUpStabilized => "ScaleUpStabilized",
            LimitReason::ScaleUpLimit => "ScaleUpLimit",
            LimitReason::ScaleDownLimit => "ScaleDownLimit",
            LimitReason::TooManyReplicas => "TooManyReplicas",
            LimitReason::TooFewReplicas => "TooFewReplicas",
        }
    }
}

/// The result of one normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Normalized {
    /// The recommendation handed in.
    pub proposed: u32,
    /// After the stabilization windows.
    pub stabilized: u32,
    /// After the rate policies and min/max: the count to set.
    pub desired: u32,
    /// The stabilization limit that applied, if any.
    pub stabilization: Option<LimitReason>,
    /// The rate or bound limit that applied, if any.
    pub rate: Option<LimitReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimedCount {
    at: Timestamp,
    count: u32,
}

/// Decision history one HPA keeps per target: recommendations for the
/// stabilization windows and scale events for the rate policies.
///
/// Every method takes `now`. Entries stamped at or after `now` are replaced
/// (not added to) by a call at `now`, so repeating a call at the same instant
/// gives the same answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BehaviorState {
    recommendations: VecDeque<TimedCount>,
    scale_up_events: VecDeque<TimedCount>,
    scale_down_events: VecDeque<TimedCount>,
    /// The scale-down window has been seeded (once, on the first call).
    seeded: bool,
}

impl BehaviorState {
    /// Normalise `proposed` with `behavior` (HPA `normalizeDesiredReplicasWithBehaviors`):
    /// stabilization, then rate policies bounded by `[min, max]`. Stores the
    /// raw proposal for later windows. Does not record a scale event: call
    /// [`BehaviorState::record_scale_event`] when the count is applied.
    pub fn normalize(
        &mut self,
        behavior: &Behavior,
        now: Timestamp,
        current: u32,
        proposed: u32,
        min: u32,
        max: u32,
    ) -> Normalized {
        self.forget_from(now);
        // maybeInitScaleDownStabilizationWindow: a fresh controller seeds the
        // window with the current count, so it never scales in at start-up.
        // Stamped a millisecond early so that a call repeated at `now` keeps it.
        if !self.seeded && behavior.scale_down.stabilization_window_s > 0 {
            self.recommendations.push_back(TimedCount {
                at: Timestamp::from_millis(now.as_millis() - 1),
                count: current,
            });
        }
        self.seeded = true;
        let up_cutoff = now.plus_secs(-f64::from(behavior.scale_up.stabilization_window_s));
        let down_cutoff = now.plus_secs(-f64::from(behavior.scale_down.stabilization_window_s));
        let mut up_rec = proposed;
        let mut down_rec = proposed;
        for rec in &self.recommendations {
            if rec.at > up_cutoff {
                up_rec = up_rec.min(rec.count);
            }
            if rec.at > down_cutoff {
                down_rec = down_rec.max(rec.count);
            }
        }
        let mut stabilized = current;
        let mut stabilization = None;
        if stabilized < up_rec {
            stabilized = up_rec;
        }
        if stabilized > down_rec {
            stabilized = down_rec;
        }
        if proposed > current && stabilized < proposed {
            stabilization = Some(LimitReason::ScaleUpStabilized);
        } else if proposed < current && stabilized > proposed {
            stabilization = Some(LimitReason::ScaleDownStabilized);
        }
        // Record the raw recommendation, dropping those older than both windows.
        let oldest_needed = if up_cutoff < down_cutoff {
            up_cutoff
        } else {
            down_cutoff
        };
        while self
            .recommendations
            .front()
            .is_some_and(|r| r.at < oldest_needed)
        {
            self.recommendations.pop_front();
        }
        self.recommendations.push_back(TimedCount {
            at: now,
            count: proposed,
        });

        let (desired, rate) = self.limit_rate(behavior, now, current, stabilized, min, max);
        Normalized {
            proposed,
            stabilized,
            desired,
            stabilization,
            rate,
        }
    }

    /// HPA `convertDesiredReplicasWithBehaviorRate`.
    fn limit_rate(
        &self,
        behavior: &Behavior,
        now: Timestamp,
        current: u32,
        desired: u32,
        min: u32,
        max: u32,
    ) -> (u32, Option<LimitReason>) {
        let current_i = i64::from(current);
        if desired > current {
            let mut limit = self.scale_up_limit(&behavior.scale_up, now, current_i);
            if limit < current_i {
                limit = current_i;
            }
            let (max_allowed, reason) = if i64::from(max) > limit {
                (limit, LimitReason::ScaleUpLimit)
            } else {
                (i64::from(max), LimitReason::TooManyReplicas)
            };
            if i64::from(desired) > max_allowed {
                return (clamp_u32(max_allowed), Some(reason));
            }
        } else if desired < current {
            let mut limit = self.scale_down_limit(&behavior.scale_down, now, current_i);
            if limit > current_i {
                limit = current_i;
            }
            let (min_allowed, reason) = if i64::from(min) < limit {
                (limit, LimitReason::ScaleDownLimit)
            } else {
                (i64::from(min), LimitReason::TooFewReplicas)
            };
            if i64::from(desired) < min_allowed {
                return (clamp_u32(min_allowed), Some(reason));
            }
        }
        (desired, None)
    }

    fn change_in_period(events: &VecDeque<TimedCount>, now: Timestamp, period_s: u32) -> i64 {
        let cutoff = now.plus_secs(-f64::from(period_s));
        events
            .iter()
            .filter(|e| e.at > cutoff)
            .map(|e| i64::from(e.count))
            .sum()
    }

    fn period_start(&self, now: Timestamp, current: i64, period_s: u32) -> i64 {
        current - Self::change_in_period(&self.scale_up_events, now, period_s)
            + Self::change_in_period(&self.scale_down_events, now, period_s)
    }

    fn scale_up_limit(&self, rules: &ScalingRules, now: Timestamp, current: i64) -> i64 {
        if rules.select_policy == SelectPolicy::Disabled {
            return current;
        }
        let min_change = rules.select_policy == SelectPolicy::Min;
        let mut result = if min_change { i64::MAX } else { i64::MIN };
        for p in &rules.policies {
            let start = self.period_start(now, current, p.period_s);
            let proposed = match p.kind {
                ScalingPolicyKind::Pods => start + i64::from(p.value),
                ScalingPolicyKind::Percent => {
                    (start as f64 * (1.0 + f64::from(p.value) / 100.0)).ceil() as i64
                }
            };
            result = if min_change {
                result.min(proposed)
            } else {
                result.max(proposed)
            };
        }
        if rules.policies.is_empty() {
            // No policy: nothing limits the rate (only min/max).
            return i64::MAX;
        }
        result
    }

    fn scale_down_limit(&self, rules: &ScalingRules, now: Timestamp, current: i64) -> i64 {
        if rules.select_policy == SelectPolicy::Disabled {
            return current;
        }
        let min_change = rules.select_policy == SelectPolicy::Min;
        let mut result = if min_change { i64::MIN } else { i64::MAX };
        for p in &rules.policies {
            let start = self.period_start(now, current, p.period_s);
            let proposed = match p.kind {
                ScalingPolicyKind::Pods => start - i64::from(p.value),
                // int32(float64(start) * (1 - value/100)): truncation.
                ScalingPolicyKind::Percent => {
                    (start as f64 * (1.0 - f64::from(p.value) / 100.0)).trunc() as i64
                }
            };
            result = if min_change {
                result.max(proposed)
            } else {
                result.min(proposed)
            };
        }
        if rules.policies.is_empty() {
            return i64::MIN;
        }
        result
    }

    /// Record that the target was scaled from `from` to `to` at `now` (HPA
    /// `storeScaleEvent`); events older than the direction's longest policy
    /// period are dropped.
    pub fn record_scale_event(&mut self, now: Timestamp, from: u32, to: u32) {
        self.record_scale_event_with(None, now, from, to);
    }

    /// As [`BehaviorState::record_scale_event`], pruning with `behavior`'s
    /// longest policy periods.
    pub(crate) fn record_scale_event_with(
        &mut self,
        behavior: Option<&Behavior>,
        now: Timestamp,
        from: u32,
        to: u32,
    ) {
        // Replace an event already recorded at this instant.
        self.scale_up_events.retain(|e| e.at < now);
        self.scale_down_events.retain(|e| e.at < now);
        if let Some(b) = behavior {
            // Each direction's limit counts the events of both directions
            // over its own periods (the period's starting count), so both
            // lists are kept for the longer of the two.
            let longest = b
                .scale_up
                .longest_period_s()
                .max(b.scale_down.longest_period_s());
            let cut = now.plus_secs(-f64::from(longest));
            self.scale_up_events.retain(|e| e.at > cut);
            self.scale_down_events.retain(|e| e.at > cut);
        } else {
            let cut = now.plus_secs(-f64::from(MAX_PERIOD_S));
            self.scale_up_events.retain(|e| e.at > cut);
            self.scale_down_events.retain(|e| e.at > cut);
        }
        if to > from {
            self.scale_up_events.push_back(TimedCount {
                at: now,
                count: to - from,
            });
        } else if to < from {
            self.scale_down_events.push_back(TimedCount {
                at: now,
                count: from - to,
            });
        }
    }

    /// Starts the history from a recommendation persisted by a previous
    /// controller (its last decision, `count` at `at`): it takes the place of
    /// the current count a fresh state seeds its scale-down window with, so
    /// the window ends where the previous controller's would have. Only
    /// before the first [`BehaviorState::normalize`]; `at` must be before
    /// that call's `now`.
    pub fn start_from(&mut self, at: Timestamp, count: u32) {
        if self.seeded {
            return;
        }
        self.recommendations.push_back(TimedCount { at, count });
        self.seeded = true;
    }

    /// The time of the newest recorded scale event, if any.
    pub(crate) fn last_scale_event(&self) -> Option<Timestamp> {
        let up = self.scale_up_events.back().map(|e| e.at);
        let down = self.scale_down_events.back().map(|e| e.at);
        up.max(down)
    }

    /// Legacy normalisation for an HPA without `behavior`
    /// (`normalizeDesiredReplicas`): the maximum of the recommendations of the
    /// last `window_s` seconds (300 by default), then clamped to
    /// `[min, min(max, max(2 × current, 4))]`.
    pub(crate) fn normalize_legacy(
        &mut self,
        now: Timestamp,
        window_s: u32,
        current: u32,
        proposed: u32,
        min: u32,
        max: u32,
    ) -> Normalized {
        self.forget_from(now);
        let cutoff = now.plus_secs(-f64::from(window_s));
        let mut stabilized = proposed;
        for rec in &self.recommendations {
            if rec.at >= cutoff && rec.count > stabilized {
                stabilized = rec.count;
            }
        }
        while self.recommendations.front().is_some_and(|r| r.at < cutoff) {
            self.recommendations.pop_front();
        }
        self.recommendations.push_back(TimedCount {
            at: now,
            count: proposed,
        });
        let stabilization = (stabilized > proposed).then_some(LimitReason::ScaleDownStabilized);
        let scale_up_limit = (2.0 * f64::from(current)).max(4.0) as u32;
        let (max_allowed, max_reason) = if max > scale_up_limit {
            (scale_up_limit, LimitReason::ScaleUpLimit)
        } else {
            (max, LimitReason::TooManyReplicas)
        };
        let (desired, rate) = if stabilized < min {
            (min, Some(LimitReason::TooFewReplicas))
        } else if stabilized > max_allowed {
            (max_allowed, Some(max_reason))
        } else {
            (stabilized, None)
        };
        Normalized {
            proposed,
            stabilized,
            desired,
            stabilization,
            rate,
        }
    }

    /// Drop every recommendation and scale event stamped at or after `now`:
    /// a call repeated at `now` replaces, never adds. Every method taking
    /// `now` does this first.
    pub(crate) fn forget_from(&mut self, now: Timestamp) {
        self.recommendations.retain(|r| r.at < now);
        self.scale_up_events.retain(|e| e.at < now);
        self.scale_down_events.retain(|e| e.at < now);
    }

    /// Number of stored recommendations and events (for memory accounting).
    pub fn len(&self) -> usize {
        self.recommendations.len() + self.scale_up_events.len() + self.scale_down_events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn clamp_u32(x: i64) -> u32 {
    x.clamp(0, i64::from(u32::MAX)) as u32
}

/// How an HPA normalises its recommendation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Normalization {
    /// No `behavior`: the controller's downscale stabilization (the
    /// `--horizontal-pod-autoscaler-downscale-stabilization` flag, 300 s by
    /// default) and the `max(2·N, 4)` scale-up limit.
    Legacy { downscale_stabilization_s: u32 },
    /// With `behavior`.
    Behavior(Behavior),
}

/// The full HPA reconcile of one target at one sync, behaviour path, or the
/// legacy path (with the default 300 s window) when `behavior` is `None`;
/// see [`Hpa::reconcile`].
pub fn reconcile(
    state: &mut BehaviorState,
    behavior: Option<&Behavior>,
    now: Timestamp,
    current: u32,
    proposal: u32,
    min: u32,
    max: u32,
) -> Normalized {
    let normalization = match behavior {
        Some(b) => NormalizationRef::Behavior(b),
        None => NormalizationRef::Legacy(HPA_DOWNSCALE_STABILIZATION_S),
    };
    reconcile_with(state, normalization, now, current, proposal, min, max)
}

#[derive(Clone, Copy)]
enum NormalizationRef<'a> {
    Legacy(u32),
    Behavior(&'a Behavior),
}

/// `reconcileAutoscaler` steps 1–5: handles `current == 0` with `min > 0`
/// (scaling disabled), `current` outside `[min, max]`, then normalises the
/// metric proposal. Records a scale event (behaviour path) when the count
/// to set differs from `current`.
fn reconcile_with(
    state: &mut BehaviorState,
    normalization: NormalizationRef<'_>,
    now: Timestamp,
    current: u32,
    proposal: u32,
    min: u32,
    max: u32,
) -> Normalized {
    let plain = |desired| Normalized {
        proposed: proposal,
        stabilized: desired,
        desired,
        stabilization: None,
        rate: None,
    };
    let out = if current == 0 && min != 0 {
        plain(0)
    } else if current > max {
        Normalized {
            rate: Some(LimitReason::TooManyReplicas),
            ..plain(max)
        }
    } else if current < min {
        Normalized {
            rate: Some(LimitReason::TooFewReplicas),
            ..plain(min)
        }
    } else {
        match normalization {
            NormalizationRef::Behavior(b) => state.normalize(b, now, current, proposal, min, max),
            NormalizationRef::Legacy(window_s) => {
                state.normalize_legacy(now, window_s, current, proposal, min, max)
            }
        }
    };
    if let NormalizationRef::Behavior(b) = normalization
        && out.desired != current
        && !(current == 0 && min != 0)
    {
        state.record_scale_event_with(Some(b), now, current, out.desired);
    }
    out
}

/// One HorizontalPodAutoscaler and its controller's state for its target:
/// bounds, tolerances and normalisation, with the proposals of
/// `replica_calculator.go`. The simulator's HPA and KEDA baselines run on it.
#[derive(Debug, Clone, Serialize)]
pub struct Hpa {
    pub min: u32,
    pub max: u32,
    pub tolerance_up: f64,
    pub tolerance_down: f64,
    pub normalization: Normalization,
    #[serde(skip)]
    state: BehaviorState,
}

impl Hpa {
    /// An HPA with the default tolerance (0.1) both ways.
    pub fn new(min: u32, max: u32, normalization: Normalization) -> Self {
        Self {
            min,
            max,
            tolerance_up: HPA_DEFAULT_TOLERANCE,
            tolerance_down: HPA_DEFAULT_TOLERANCE,
            normalization,
            state: BehaviorState::default(),
        }
    }

    /// Whether the usage ratio `r` proposes no change (`isWithin`).
    pub fn within(&self, r: f64) -> bool {
        within_tolerance(r, self.tolerance_up, self.tolerance_down)
    }

    /// [`plain_metric_proposal`] with this HPA's tolerances.
    pub fn plain_metric_proposal(
        &self,
        current: u32,
        pods: &[PodMetric],
        target: f64,
    ) -> Option<u32> {
        plain_metric_proposal(
            pods,
            target,
            current,
            self.tolerance_up,
            self.tolerance_down,
        )
    }

    /// [`external_average_value_proposal`] with this HPA's tolerances.
    pub fn external_average_value_proposal(
        &self,
        total: f64,
        target: f64,
        status_replicas: u32,
    ) -> u32 {
        external_average_value_proposal(
            total,
            target,
            status_replicas,
            self.tolerance_up,
            self.tolerance_down,
        )
    }

    /// One reconcile at `now` with `current = spec.replicas` and the largest
    /// valid metric proposal (`None`: no valid metric, so no change once the
    /// bounds are satisfied). Returns the count to set (`current` for no
    /// change).
    pub fn reconcile(&mut self, now: Timestamp, current: u32, proposal: Option<u32>) -> u32 {
        let in_bounds =
            !(current == 0 && self.min != 0) && current <= self.max && current >= self.min;
        let proposal = match proposal {
            Some(p) => p,
            None if in_bounds => return current,
            None => current,
        };
        let normalization = match &self.normalization {
            Normalization::Behavior(b) => NormalizationRef::Behavior(b),
            Normalization::Legacy {
                downscale_stabilization_s,
            } => NormalizationRef::Legacy(*downscale_stabilization_s),
        };
        reconcile_with(
            &mut self.state,
            normalization,
            now,
            current,
            proposal,
            self.min,
            self.max,
        )
        .desired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_millis(s * 1000)
    }

    #[test]
    fn tolerance_band_is_inclusive() {
        assert!(within_tolerance(1.1, 0.1, 0.1));
        assert!(within_tolerance(0.9, 0.1, 0.1));
        assert!(!within_tolerance(1.1000001, 0.1, 0.1));
        let at = |v: f64| [PodMetric::Ready(v); 4];
        assert_eq!(
            plain_metric_proposal(&at(105.0), 100.0, 4, 0.1, 0.1),
            Some(4)
        );
        assert_eq!(
            plain_metric_proposal(&at(150.0), 100.0, 4, 0.1, 0.1),
            Some(6)
        );
        assert_eq!(
            plain_metric_proposal(&at(50.0), 100.0, 4, 0.1, 0.1),
            Some(2)
        );
        assert_eq!(plain_metric_proposal(&[], 100.0, 0, 0.1, 0.1), None);
        assert_eq!(plain_metric_proposal(&at(50.0), 0.0, 4, 0.1, 0.1), None);
    }

    #[test]
    fn missing_pods_count_at_the_target_on_scale_down_and_unready_as_zero_on_scale_up() {
        // Ready 20 and 20 against 80 (ratio 0.25), one missing: filled with
        // 80 → (20+20+80)/3/80 = 0.5 → ceil(0.5·3) = 2.
        let pods = [
            PodMetric::Ready(20.0),
            PodMetric::Ready(20.0),
            PodMetric::Missing,
        ];
        assert_eq!(plain_metric_proposal(&pods, 80.0, 3, 0.1, 0.1), Some(2));
        // Scale-up with an unready pod: it counts as 0 → (160+160+0)/3/80 =
        // 1.33 → ceil(1.33·3) = 4.
        let pods = [
            PodMetric::Ready(160.0),
            PodMetric::Ready(160.0),
            PodMetric::Unready,
        ];
        assert_eq!(plain_metric_proposal(&pods, 80.0, 3, 0.1, 0.1), Some(4));
        // A correction that reverses the direction proposes no change: ready
        // at 90 (ratio 1.125) with one missing pod, filled with 0 on a
        // scale-up → 0.75 < 1: keep 3.
        let pods = [
            PodMetric::Ready(90.0),
            PodMetric::Ready(90.0),
            PodMetric::Missing,
        ];
        assert_eq!(plain_metric_proposal(&pods, 80.0, 3, 0.1, 0.1), Some(3));
        // No ready pod: no proposal, the HPA does not scale.
        let pods = [PodMetric::Unready, PodMetric::Missing];
        assert_eq!(plain_metric_proposal(&pods, 80.0, 2, 0.1, 0.1), None);
    }

    #[test]
    fn an_hpa_enforces_its_bounds_before_its_metric() {
        let mut h = Hpa::new(2, 5, Normalization::Behavior(Behavior::hpa_default()));
        assert_eq!(h.reconcile(t(0), 7, None), 5);
        assert_eq!(h.reconcile(t(15), 1, None), 2);
        // No metric inside the bounds: no change.
        assert_eq!(h.reconcile(t(30), 3, None), 3);
        // Scaling disabled: 0 replicas with minReplicas > 0 stays 0.
        assert_eq!(h.reconcile(t(45), 0, Some(4)), 0);
    }

    #[test]
    fn an_hpa_rate_policy_counts_its_own_scale_events() {
        let mut b = Behavior::hpa_default();
        b.scale_up.policies = vec![ScalingPolicy {
            kind: ScalingPolicyKind::Pods,
            value: 1,
            period_s: 60,
        }];
        let mut h = Hpa::new(1, 100, Normalization::Behavior(b));
        assert_eq!(h.reconcile(t(0), 2, Some(9)), 3);
        // Within the 60 s period the one-pod budget is spent.
        assert_eq!(h.reconcile(t(15), 3, Some(9)), 3);
        assert_eq!(h.reconcile(t(61), 3, Some(9)), 4);
    }

    #[test]
    fn an_hpa_without_behavior_holds_the_max_of_its_window_and_limits_scale_up() {
        let mut h = Hpa::new(
            1,
            100,
            Normalization::Legacy {
                downscale_stabilization_s: 300,
            },
        );
        // From 2 replicas a proposal of 10 is limited to max(2·2, 4) = 4.
        assert_eq!(h.reconcile(t(0), 2, Some(10)), 4);
        // A later proposal of 3 is held at the 300 s max (10, capped at 8).
        assert_eq!(h.reconcile(t(15), 4, Some(3)), 8);
        // After the window, the low proposal wins.
        assert_eq!(h.reconcile(t(316), 8, Some(3)), 3);
    }

    #[test]
    fn external_average_value_uses_total_over_target() {
        // KEDA: 23 waiting, threshold 5, 3 replicas: r = 23/15 > 1.1 → ceil(23/5) = 5.
        assert_eq!(external_average_value_proposal(23.0, 5.0, 3, 0.1, 0.1), 5);
        // 16 waiting, 3 replicas: r = 16/15 = 1.067 within tolerance → 3.
        assert_eq!(external_average_value_proposal(16.0, 5.0, 3, 0.1, 0.1), 3);
    }

    #[test]
    fn scale_up_is_limited_to_four_pods_or_double_per_period() {
        let b = Behavior::hpa_default();
        let mut s = BehaviorState::default();
        let out = s.normalize(&b, t(0), 2, 20, 1, 100);
        assert_eq!(out.desired, 6);
        assert_eq!(out.rate, Some(LimitReason::ScaleUpLimit));
        s.record_scale_event_with(Some(&b), t(0), 2, 6);
        // Same period: the period started at 2, so the limit is still 6.
        let out = s.normalize(&b, t(10), 6, 20, 1, 100);
        assert_eq!(out.desired, 6);
        // Next period: start 6 → max(10, 12) = 12.
        let out = s.normalize(&b, t(16), 6, 20, 1, 100);
        assert_eq!(out.desired, 12);
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let b = Behavior::hpa_default();
        let mut s = BehaviorState::default();
        assert_eq!(s.normalize(&b, t(0), 10, 10, 1, 100).desired, 10);
        assert_eq!(s.normalize(&b, t(15), 10, 4, 1, 100).desired, 10);
        assert_eq!(s.normalize(&b, t(299), 10, 4, 1, 100).desired, 10);
        // The 10 recorded at t=0 is exactly at the cutoff at t=300 and no longer counts.
        assert_eq!(s.normalize(&b, t(300), 10, 4, 1, 100).desired, 4);
    }

    #[test]
    fn percent_scale_down_truncates() {
        let mut b = Behavior::hpa_default();
        b.scale_down.stabilization_window_s = 0;
        b.scale_down.policies = vec![ScalingPolicy {
            kind: ScalingPolicyKind::Percent,
            value: 50,
            period_s: 60,
        }];
        let mut s = BehaviorState::default();
        // int(5 × 0.5) = 2.
        assert_eq!(s.normalize(&b, t(0), 5, 1, 1, 100).desired, 2);
    }

    #[test]
    fn repeating_a_call_at_the_same_instant_gives_the_same_answer() {
        let b = Behavior::hpa_default();
        let mut s = BehaviorState::default();
        s.normalize(&b, t(0), 10, 10, 1, 100);
        let a = s.normalize(&b, t(30), 10, 3, 1, 100);
        let again = s.normalize(&b, t(30), 10, 3, 1, 100);
        assert_eq!(a, again);
        s.record_scale_event_with(Some(&b), t(40), 10, 14);
        s.record_scale_event_with(Some(&b), t(40), 10, 14);
        let a = s.normalize(&b, t(45), 14, 40, 1, 100);
        assert_eq!(a.desired, 20, "period start 10 → max(14, 20)");
    }

    #[test]
    fn legacy_path_caps_scale_up_at_double_or_four() {
        let mut s = BehaviorState::default();
        assert_eq!(s.normalize_legacy(t(0), 300, 1, 10, 1, 100).desired, 4);
        assert_eq!(s.normalize_legacy(t(15), 300, 4, 10, 1, 100).desired, 8);
        assert_eq!(s.normalize_legacy(t(30), 300, 8, 2, 1, 100).desired, 10);
    }

    #[test]
    fn a_persisted_recommendation_takes_the_place_of_the_start_up_seed() {
        let b = Behavior::hpa_default_with_windows(0, 60);
        // A fresh state holds the current count for a whole window.
        let mut fresh = BehaviorState::default();
        assert_eq!(fresh.normalize(&b, t(100), 6, 2, 1, 10).desired, 6);
        assert_eq!(fresh.normalize(&b, t(159), 6, 2, 1, 10).desired, 6);
        // Started from 6 persisted at 80 s: held until 140 s, not 160 s.
        let mut started = BehaviorState::default();
        started.start_from(t(80), 6);
        let held = started.normalize(&b, t(100), 6, 2, 1, 10);
        assert_eq!(
            (held.desired, held.stabilization),
            (6, Some(LimitReason::ScaleDownStabilized))
        );
        assert_eq!(started.normalize(&b, t(139), 6, 2, 1, 10).desired, 6);
        assert_eq!(started.normalize(&b, t(141), 6, 2, 1, 10).desired, 2);
        // A persisted count below the current one continues its scale-in.
        let mut lower = BehaviorState::default();
        lower.start_from(t(90), 4);
        assert_eq!(lower.normalize(&b, t(100), 6, 2, 1, 10).desired, 4);
        // Once it has decided, a state is not started again.
        let mut late = BehaviorState::default();
        late.normalize(&b, t(0), 2, 2, 1, 10);
        late.start_from(t(50), 6);
        assert_eq!(late.normalize(&b, t(61), 6, 2, 1, 10).desired, 2);
    }
}
