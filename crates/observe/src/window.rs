//! Short windows over cumulative series: counter rates and histogram deltas.
//!
//! Pure. A [`Window`] keeps the points of one series whose time lies within
//! `span` of the newest point, plus the newest point older than that (the
//! baseline, so a window that has been filled always covers the whole span),
//! and never more than `max_points`. From it:
//!
//! * [`increase`] and [`rate`]: how much a counter grew, Prometheus-style —
//!   a decrease between two points is a reset (the engine restarted), and
//!   the newer value is what accumulated since;
//! * [`histogram_delta`]: the observations recorded inside the window, the
//!   sum of pairwise deltas of cumulative histograms (a reset contributes the
//!   newer histogram whole; a change of bucket layout restarts the sum);
//! * [`gauge_change`]: the change of a gauge from the first to the last point.
//!
//! Times are the samples' `sampled_at` as the caller places them on one
//! clock: the scaler maps an agent's timestamps onto its own clock through
//! the offset it measured for that agent's boot epoch, so a window measures
//! the engine's own intervals, however late the report arrived and however
//! far off the agent's clock is.

use std::collections::VecDeque;

use gpuscale_core::{Histogram, HistogramError, Timestamp};

/// The points of one series over a bounded span of time.
#[derive(Debug, Clone, PartialEq)]
pub struct Window<T> {
    points: VecDeque<(Timestamp, T)>,
    span_ms: i64,
    max_points: usize,
}

impl<T> Window<T> {
    /// A window covering `span_ms` milliseconds, holding at most `max_points`
    /// points (at least 2).
    pub fn new(span_ms: i64, max_points: usize) -> Self {
        Self {
            points: VecDeque::new(),
            span_ms: span_ms.max(0),
            max_points: max_points.max(2),
        }
    }

    /// Adds a point. A point older than the newest is ignored (returns
    /// false); one at the same time replaces the newest.
    pub fn push(&mut self, at: Timestamp, value: T) -> bool {
        if let Some((last, _)) = self.points.back() {
            if at < *last {
                return false;
            }
            if at == *last {
                self.points.pop_back();
            }
        }
        self.points.push_back((at, value));
        let start = at.as_millis().saturating_sub(self.span_ms);
        // Keep one point at or before the start as the baseline.
        while self.points.len() >= 2 && self.points[1].0.as_millis() <= start {
            self.points.pop_front();
        }
        while self.points.len() > self.max_points {
            self.points.pop_front();
        }
        true
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Oldest first.
    pub fn points(&self) -> impl DoubleEndedIterator<Item = &(Timestamp, T)> + ExactSizeIterator {
        self.points.iter()
    }

    pub fn newest(&self) -> Option<&(Timestamp, T)> {
        self.points.back()
    }

    pub fn oldest(&self) -> Option<&(Timestamp, T)> {
        self.points.front()
    }

    /// Seconds between the oldest and the newest point.
    pub fn covered_seconds(&self) -> f64 {
        match (self.points.front(), self.points.back()) {
            (Some((a, _)), Some((b, _))) => b.secs_since(*a),
            _ => 0.0,
        }
    }

    pub fn clear(&mut self) {
        self.points.clear();
    }
}

/// How much a counter grew over `values` (oldest first), with resets: a
/// decrease means the counter restarted from zero, so the newer value is
/// what accumulated since. `None` for fewer than two values.
pub fn increase(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut it = values.into_iter();
    let mut prev = it.next()?;
    let mut total = 0.0;
    let mut pairs = 0;
    for v in it {
        total += if v >= prev { v - prev } else { v };
        prev = v;
        pairs += 1;
    }
    (pairs > 0).then_some(total)
}

/// Per-second rate of the counter `f` picks from each point over the whole
/// window. `None` when fewer than two points carry the counter or they span
/// no time.
pub fn rate<T>(window: &Window<T>, f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    let with: Vec<(Timestamp, f64)> = window
        .points()
        .filter_map(|(at, v)| f(v).map(|x| (*at, x)))
        .collect();
    let (first, last) = (with.first()?, with.last()?);
    let secs = last.0.secs_since(first.0);
    if secs <= 0.0 {
        return None;
    }
    increase(with.iter().map(|(_, v)| *v)).map(|inc| inc / secs)
}

/// Change per second of a gauge from the first to the last point that carry it.
pub fn gauge_change<T>(window: &Window<T>, f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    let first = window.points().find_map(|(at, v)| f(v).map(|x| (*at, x)))?;
    let last = window
        .points()
        .rev()
        .find_map(|(at, v)| f(v).map(|x| (*at, x)))?;
    let secs = last.0.secs_since(first.0);
    (secs > 0.0).then(|| (last.1 - first.1) / secs)
}

/// The observations recorded within the window, from the cumulative
/// histograms `f` picks from each point. `None` when fewer than two points
/// carry a histogram.
pub fn histogram_delta<T>(
    window: &Window<T>,
    f: impl Fn(&T) -> Option<&Histogram>,
) -> Option<Histogram> {
    // Fast path: one layout and no reset between consecutive points, so the
    // pairwise deltas telescope to newest − oldest (one subtraction instead
    // of one allocation per point).
    let mut first: Option<&Histogram> = None;
    let mut last: Option<&Histogram> = None;
    let mut carried = 0usize;
    let mut continuous = true;
    for (_, point) in window.points() {
        let Some(h) = f(point) else { continue };
        carried += 1;
        if let Some(p) = last
            && !std::ptr::eq(p, h)
            && !h.follows(p)
        {
            continuous = false;
            break;
        }
        first.get_or_insert(h);
        last = Some(h);
    }
    if continuous {
        return match (first, last) {
            (Some(a), Some(b)) if carried >= 2 => b.delta_since(a).ok(),
            _ => None,
        };
    }
    let mut prev: Option<&Histogram> = None;
    let mut total: Option<Histogram> = None;
    for (_, point) in window.points() {
        let Some(h) = f(point) else { continue };
        if let Some(p) = prev {
            match h.delta_since(p) {
                Ok(step) => add(&mut total, step),
                Err(HistogramError::CounterReset { .. }) => add(&mut total, h.clone()),
                // A different bucket layout: start over from this point.
                Err(_) => total = None,
            }
        }
        prev = Some(h);
    }
    total
}

fn add(total: &mut Option<Histogram>, step: Histogram) {
    match total {
        Some(t) => {
            if t.merge(&step).is_err() {
                *total = Some(step);
            }
        }
        None => *total = Some(step),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn window_keeps_a_baseline_before_its_span() {
        let mut w = Window::new(10_000, 100);
        for s in 0..=30 {
            w.push(ts(s * 1000), s as f64);
        }
        // 20 s .. 30 s are inside; 20 s is also the baseline (at the start).
        assert_eq!(w.oldest().map(|p| p.0), Some(ts(20_000)));
        assert_eq!(w.covered_seconds(), 10.0);
        assert!(!w.push(ts(5_000), 0.0), "older points are ignored");
        assert!(w.push(ts(30_000), 99.0), "same time replaces");
        assert_eq!(w.newest().map(|p| p.1), Some(99.0));
    }

    #[test]
    fn counter_reset_counts_the_new_value_as_growth() {
        assert_eq!(increase([10.0, 15.0, 3.0, 7.0]), Some(5.0 + 3.0 + 4.0));
        assert_eq!(increase([1.0]), None);
    }

    #[test]
    fn rate_needs_two_points_over_time() {
        let mut w: Window<Option<f64>> = Window::new(60_000, 100);
        w.push(ts(0), Some(0.0));
        assert_eq!(rate(&w, |v| *v), None);
        w.push(ts(2_000), Some(100.0));
        assert_eq!(rate(&w, |v| *v), Some(50.0));
        // A missing counter is skipped, not read as zero.
        w.push(ts(3_000), None);
        assert_eq!(rate(&w, |v| *v), Some(50.0));
    }

    #[test]
    fn histogram_delta_across_a_reset_counts_the_new_observations() {
        let mut a = Histogram::ttft();
        a.observe_n(0.1, 50);
        let mut b = a.clone();
        b.observe_n(0.3, 10);
        let mut after_reset = Histogram::ttft();
        after_reset.observe_n(2.0, 4);
        let mut w = Window::new(60_000, 100);
        w.push(ts(0), a);
        w.push(ts(1_000), b);
        w.push(ts(2_000), after_reset);
        let d = histogram_delta(&w, |h: &Histogram| Some(h)).expect("delta");
        assert_eq!(d.count(), 14);
    }

    fn counter_series() -> impl Strategy<Value = Vec<(i64, f64, bool)>> {
        // (ms step, increment, reset before this increment)
        proptest::collection::vec(
            (1i64..5_000, 0.0f64..1_000.0, proptest::bool::weighted(0.1)),
            2..60,
        )
    }

    proptest! {
        #[test]
        fn window_never_holds_more_than_max_points_and_covers_its_span(
            steps in proptest::collection::vec(1i64..3_000, 1..200),
            span in 1_000i64..60_000,
            max in 2usize..64,
        ) {
            let mut w = Window::new(span, max);
            let mut t = 0;
            for s in &steps {
                t += s;
                w.push(ts(t), ());
                prop_assert!(w.len() <= max);
                // Points other than the baseline are inside the span.
                let inside = w.points().skip(1).all(|(at, _)| at.as_millis() > t - span);
                prop_assert!(inside);
            }
        }

        #[test]
        fn rate_of_a_linear_counter_is_its_slope(
            steps in proptest::collection::vec(1i64..5_000, 1..50),
            slope in 0.0f64..10_000.0,
        ) {
            let mut w = Window::new(i64::MAX / 4, 1_000);
            let mut t = 0i64;
            w.push(ts(0), 0.0);
            for s in &steps {
                t += s;
                w.push(ts(t), slope * t as f64 / 1000.0);
            }
            let r = rate(&w, |v| Some(*v)).expect("two points over time");
            prop_assert!((r - slope).abs() <= 1e-6 * slope.max(1.0), "{} vs {}", r, slope);
        }

        #[test]
        fn increase_with_visible_resets_is_the_sum_of_true_increments(series in counter_series()) {
            // The counter as an engine exports it: on reset it restarts from
            // zero, and here the first value after a reset is below the last
            // one before, so the reset is visible.
            let mut exported = vec![0.0];
            let mut value = 0.0;
            let mut truth = 0.0;
            for (_, inc, reset) in &series {
                let inc = if *reset && value > 0.0 {
                    value = 0.0;
                    inc.min(exported.last().copied().unwrap_or(0.0) * 0.5)
                } else {
                    *inc
                };
                value += inc;
                truth += inc;
                exported.push(value);
            }
            let got = increase(exported.iter().copied()).expect("two points");
            prop_assert!((got - truth).abs() <= 1e-6 * truth.max(1.0), "{} vs {}", got, truth);
        }

        #[test]
        fn increase_is_never_negative_nor_more_than_the_truth(series in counter_series()) {
            // Resets that land above the previous value cannot be seen (as in
            // Prometheus): the increase may undercount, never overcount.
            let mut exported = vec![0.0];
            let mut value = 0.0;
            let mut truth = 0.0;
            for (_, inc, reset) in &series {
                if *reset {
                    value = 0.0;
                }
                value += inc;
                truth += inc;
                exported.push(value);
            }
            let got = increase(exported.iter().copied()).expect("two points");
            prop_assert!(got >= 0.0);
            prop_assert!(got <= truth * (1.0 + 1e-9) + 1e-9, "{} > {}", got, truth);
        }

        #[test]
        fn histogram_delta_holds_exactly_the_observations_inside_the_window(
            batches in proptest::collection::vec(proptest::collection::vec(0.0f64..10.0, 0..20), 2..40),
            span_points in 1usize..20,
        ) {
            // One point per second; the window spans `span_points` seconds.
            let mut w = Window::new(span_points as i64 * 1000, 1_000);
            let mut h = Histogram::ttft();
            let mut per_point = Vec::new();
            for (i, batch) in batches.iter().enumerate() {
                for v in batch {
                    h.observe(*v);
                }
                per_point.push(batch.len() as u64);
                w.push(ts(i as i64 * 1000), h.clone());
            }
            let d = histogram_delta(&w, |h: &Histogram| Some(h)).expect("at least two points");
            // Observations after the oldest retained point.
            let retained = w.len();
            let expected: u64 = per_point[per_point.len() - retained + 1..].iter().sum();
            prop_assert_eq!(d.count(), expected);
            prop_assert_eq!(d.cumulative_counts().last().copied(), Some(expected));
        }
    }
}
