//! One engine's window: the cumulative series of its samples over the
//! observation window, and what they say (rates, latency histograms).
//!
//! The scaler keeps one [`EngineTracker`] per engine an agent reports; the
//! simulator keeps one per simulated replica, fed the samples an agent would
//! publish. Both read the same [`EngineWindowStats`] from it.

use std::sync::Arc;

use gpuscale_core::sample::EngineSample;
use gpuscale_core::{Histogram, Timestamp};

use crate::window::{self, Window};

/// The span of the rate and latency windows unless configured otherwise
/// (the scaler's `window`).
pub const DEFAULT_WINDOW_MS: i64 = 30_000;

/// Points kept per engine window: enough for a 100 ms interval over the
/// default window, bounded whatever agents send.
pub const MAX_WINDOW_POINTS: usize = 512;

/// One point of an engine's window: its cumulative series at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct EnginePoint {
    prompt: Option<f64>,
    generation: Option<f64>,
    arrived: Option<f64>,
    finished: Option<f64>,
    preemptions: Option<f64>,
    in_system: Option<f64>,
    ttft: Option<Arc<Histogram>>,
    itl: Option<Arc<Histogram>>,
    tpot: Option<Arc<Histogram>>,
}

impl EnginePoint {
    /// The cumulative series of `s`.
    pub fn of(s: &EngineSample) -> Self {
        let in_system = match (s.requests_waiting, s.requests_running) {
            (None, None) => None,
            (w, r) => Some(w.unwrap_or(0.0) + r.unwrap_or(0.0)),
        };
        Self {
            prompt: s.prompt_tokens_total,
            generation: s.generation_tokens_total,
            arrived: s.requests_arrived_total,
            finished: s.requests_finished_total,
            preemptions: s.preemptions_total,
            in_system,
            ttft: s.ttft_seconds.clone().map(Arc::new),
            itl: s.itl_seconds.clone().map(Arc::new),
            tpot: s.tpot_seconds.clone().map(Arc::new),
        }
    }
}

/// An engine's latest sample and the window of its cumulative series.
#[derive(Debug, Clone)]
pub struct EngineTracker {
    sample: Arc<EngineSample>,
    point: EnginePoint,
    window: Window<EnginePoint>,
}

impl EngineTracker {
    /// A tracker for `sample`, whose window spans `span_ms`; the sample is
    /// the window's first point, at `at`.
    pub fn new(sample: EngineSample, at: Timestamp, span_ms: i64) -> Self {
        let point = EnginePoint::of(&sample);
        let mut window = Window::new(span_ms, MAX_WINDOW_POINTS);
        window.push(at, point.clone());
        Self {
            sample: Arc::new(sample),
            point,
            window,
        }
    }

    /// A new sample of the engine, as of `at`.
    pub fn update(&mut self, sample: EngineSample, at: Timestamp) {
        self.point = EnginePoint::of(&sample);
        self.sample = Arc::new(sample);
        self.window.push(at, self.point.clone());
    }

    /// The agent confirmed at `at` that the engine's sample is unchanged.
    pub fn confirm(&mut self, at: Timestamp) {
        self.window.push(at, self.point.clone());
    }

    pub fn sample(&self) -> &Arc<EngineSample> {
        &self.sample
    }

    /// Rates and latencies over the window.
    pub fn stats(&self) -> EngineWindowStats {
        let w = &self.window;
        EngineWindowStats {
            covered_seconds: w.covered_seconds(),
            generation_tokens_per_second: window::rate(w, |p| p.generation),
            prompt_tokens_per_second: window::rate(w, |p| p.prompt),
            requests_arrived_per_second: window::rate(w, |p| p.arrived),
            requests_finished_per_second: window::rate(w, |p| p.finished),
            preemptions_per_second: window::rate(w, |p| p.preemptions),
            in_system_change_per_second: window::gauge_change(w, |p| p.in_system),
            prefilled: prefilled(w),
            ttft_seconds: window::histogram_delta(w, |p| p.ttft.as_deref()),
            itl_seconds: window::histogram_delta(w, |p| p.itl.as_deref()),
            tpot_seconds: window::histogram_delta(w, |p| p.tpot.as_deref()),
        }
    }
}

/// Rates and latencies of one engine over the window. Every value is `None`
/// when the engine does not export what it needs or the window holds fewer
/// than two samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineWindowStats {
    /// Seconds between the oldest and newest sample in the window.
    pub covered_seconds: f64,
    pub generation_tokens_per_second: Option<f64>,
    pub prompt_tokens_per_second: Option<f64>,
    pub requests_arrived_per_second: Option<f64>,
    pub requests_finished_per_second: Option<f64>,
    pub preemptions_per_second: Option<f64>,
    /// Change per second of waiting + running requests.
    pub in_system_change_per_second: Option<f64>,
    /// Prompt tokens and first tokens (TTFT observations) over the points
    /// that carry both: an engine counts a request's prompt tokens in the
    /// step that emits its first token, so their ratio is the mean prompt
    /// of the requests prefilled in the window.
    pub prefilled: Option<(f64, f64)>,
    /// TTFT observations inside the window.
    pub ttft_seconds: Option<Histogram>,
    /// Inter-token latency observations inside the window.
    pub itl_seconds: Option<Histogram>,
    /// Per-request TPOT observations inside the window.
    pub tpot_seconds: Option<Histogram>,
}

impl EngineWindowStats {
    /// Offered load: the arrival counter's rate when the engine exports it,
    /// else finished requests plus the growth of requests in the engine.
    pub fn arrival_rate(&self) -> Option<f64> {
        self.requests_arrived_per_second.or_else(|| {
            let finished = self.requests_finished_per_second?;
            let growth = self.in_system_change_per_second.unwrap_or(0.0);
            Some((finished + growth).max(0.0))
        })
    }
}

/// Prompt tokens and first tokens over the points of `w` that carry both
/// the prompt counter and the TTFT histogram (resets counted as in
/// [`window::increase`]).
fn prefilled(w: &Window<EnginePoint>) -> Option<(f64, f64)> {
    let both: Vec<(f64, f64)> = w
        .points()
        .filter_map(|(_, p)| Some((p.prompt?, p.ttft.as_ref()?.count() as f64)))
        .collect();
    Some((
        window::increase(both.iter().map(|b| b.0))?,
        window::increase(both.iter().map(|b| b.1))?,
    ))
}

/// `acc + v`, where a missing `v` leaves `acc` as it is and a missing `acc`
/// becomes `v`: a sum over the engines that export the value.
pub fn add(acc: &mut Option<f64>, v: Option<f64>) {
    if let Some(v) = v {
        *acc = Some(acc.unwrap_or(0.0) + v);
    }
}

/// Merges `h` into `acc`; histograms of another bucket layout are skipped.
pub fn merge(acc: &mut Option<Histogram>, h: Option<&Histogram>) {
    let Some(h) = h else { return };
    match acc {
        Some(a) => {
            let _ = a.merge(h);
        }
        None => *acc = Some(h.clone()),
    }
}

#[cfg(test)]
mod tests {
    use gpuscale_core::PodRef;
    use gpuscale_core::sample::Framework;

    use super::*;

    fn sample(finished: f64, ttft: &[(f64, u64)]) -> EngineSample {
        let mut s = EngineSample::empty(
            PodRef::new("ns", "p"),
            Framework::Fake,
            "m",
            Timestamp::EPOCH,
        );
        s.requests_finished_total = Some(finished);
        s.requests_running = Some(1.0);
        let mut h = Histogram::ttft();
        for (v, n) in ttft {
            h.observe_n(*v, *n);
        }
        s.ttft_seconds = Some(h);
        s
    }

    #[test]
    fn confirmed_samples_extend_the_window_without_new_observations() {
        let t = Timestamp::from_millis;
        let mut e = EngineTracker::new(sample(0.0, &[]), t(0), DEFAULT_WINDOW_MS);
        e.update(sample(10.0, &[(0.1, 10)]), t(1_000));
        e.confirm(t(2_000));
        let s = e.stats();
        assert_eq!(s.covered_seconds, 2.0);
        assert_eq!(s.requests_finished_per_second, Some(5.0));
        assert_eq!(s.arrival_rate(), Some(5.0));
        assert_eq!(s.ttft_seconds.map(|h| h.count()), Some(10));
        assert_eq!(s.tpot_seconds, None, "not exported: missing, not zero");
    }

    /// Prompt tokens and first tokens over the points carrying both: a
    /// first point without the TTFT histogram is skipped for both, and an
    /// engine restart (counters from zero) counts what follows it.
    #[test]
    fn prefilled_pairs_prompt_tokens_with_first_tokens_point_by_point() {
        let t = Timestamp::from_millis;
        let with = |prompt: f64, firsts: u64| {
            let mut s = sample(0.0, &[(0.2, firsts)]);
            s.prompt_tokens_total = Some(prompt);
            s
        };
        let mut first = with(500.0, 0);
        first.ttft_seconds = None;
        let mut e = EngineTracker::new(first, t(0), DEFAULT_WINDOW_MS);
        e.update(with(1_000.0, 1), t(1_000));
        e.update(with(7_000.0, 4), t(2_000));
        assert_eq!(e.stats().prefilled, Some((6_000.0, 3.0)));
        // Restarted: counters from zero again.
        e.update(with(2_000.0, 1), t(3_000));
        assert_eq!(e.stats().prefilled, Some((8_000.0, 4.0)));
    }
}
