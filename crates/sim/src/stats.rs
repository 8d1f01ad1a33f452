//! What a run records about its requests: SLO attainment, latency
//! distributions and a time series for the chart.
//!
//! A request **meets the SLO** when its time to first token is within the
//! TTFT SLO and its mean time per output token after the first (TPOT, the
//! per-request inter-token latency) is within the ITL SLO. Dropped and
//! aborted requests count as misses. Percentiles come from log-spaced
//! histograms with 64 buckets per octave (about 1.1% resolution).

use gpuscale_core::slo::{LatencyObjective, RequestOutcome, SloObjectives};

use crate::ceiling::LONG_PROMPT_TOKENS;
use serde::Serialize;

/// The latency SLOs a run is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    /// TTFT objective, seconds (for a prompt of `T` tokens:
    /// `ttft_s + ttft_per_input_token_s · T`).
    pub ttft_s: f64,
    /// Time per output token of each request, seconds (the spec's `itl`).
    pub itl_s: f64,
    /// The percentile the SLOs are stated at (e.g. 95), for the policy.
    pub percentile: f64,
    /// Extra TTFT allowed per prompt token (a length-aware objective), seconds.
    pub ttft_per_input_token_s: f64,
}

impl Slo {
    /// The SLO as [`gpuscale_core::slo`] defines it, the one definition the
    /// policy, the scaler and this simulator judge by.
    pub fn objectives(&self) -> SloObjectives {
        let quantile = self.percentile / 100.0;
        SloObjectives {
            ttft: LatencyObjective {
                threshold_s: self.ttft_s,
                quantile,
            },
            ttft_per_input_token_s: self.ttft_per_input_token_s,
            tpot: LatencyObjective {
                threshold_s: self.itl_s,
                quantile,
            },
        }
    }

    /// Whether one request met each objective ([`SloObjectives::request`]):
    /// its TTFT, its TPOT (`None` for one output token) and its prompt.
    #[inline]
    pub fn outcome(&self, ttft: f64, tpot: Option<f64>, input_tokens: u32) -> RequestOutcome {
        self.objectives().request(ttft, tpot, input_tokens)
    }
}

/// A histogram with log-spaced buckets: 64 per octave (about 1.1% wide)
/// from 2⁻¹⁷ s (7.6 µs) to 2¹⁷ s (36 h), indexed from the float's bits
/// (no logarithm on the hot path).
#[derive(Debug, Clone)]
pub struct LogHistogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 6;
const SUBS: i64 = 1 << SUB_BITS;
const MIN_EXP: i64 = -17;
const OCTAVES: i64 = 34;

impl Default for LogHistogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (OCTAVES * SUBS) as usize + 2],
            total: 0,
        }
    }
}

impl LogHistogram {
    #[inline]
    fn index(&self, v: f64) -> usize {
        if v.is_nan() || v < 2f64.powi(MIN_EXP as i32) {
            return 0;
        }
        let bits = v.to_bits();
        let exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
        let sub = ((bits >> (52 - SUB_BITS)) & (SUBS as u64 - 1)) as i64;
        (((exp - MIN_EXP) * SUBS + sub + 1).max(1) as usize).min(self.counts.len() - 1)
    }

    /// Lower edge of bucket `i` (`i ≥ 1`).
    fn lower(i: usize) -> f64 {
        let k = i as i64 - 1;
        let exp = MIN_EXP + k / SUBS;
        let sub = k % SUBS;
        2f64.powi(exp as i32) * (1.0 + sub as f64 / SUBS as f64)
    }

    #[inline]
    pub fn observe_n(&mut self, v: f64, n: u64) {
        let i = self.index(v);
        self.counts[i] += n;
        self.total += n;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile (0..=1), interpolated linearly inside a bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.total as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                if i == 0 {
                    return Some(0.0);
                }
                let frac = ((rank - seen as f64) / c as f64).clamp(0.0, 1.0);
                let lo = Self::lower(i);
                let hi = Self::lower(i + 1);
                return Some(lo + frac * (hi - lo));
            }
            seen += c;
        }
        None
    }

    pub fn merge(&mut self, other: &LogHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }
}

/// Everything a full run records.
#[derive(Debug, Clone)]
pub struct RunStats {
    pub slo: Slo,
    pub arrivals: u64,
    pub completed: u64,
    pub dropped: u64,
    pub met_ttft: u64,
    /// Requests whose own time per output token met the objective.
    pub met_tpot: u64,
    pub met_both: u64,
    /// Arrivals and requests that met the SLO with a prompt of at least
    /// [`crate::ceiling::LONG_PROMPT_TOKENS`] tokens.
    pub long_arrivals: u64,
    pub long_met: u64,
    pub ttft: LogHistogram,
    pub tpot: LogHistogram,
    /// Token-weighted inter-token gaps (each gap of each decode step).
    pub itl: LogHistogram,
    /// Requests held at the router for lack of a ready replica (cold-start
    /// hits) that completed: how many, how many met the SLO, their TTFT.
    pub held_completed: u64,
    pub held_met: u64,
    pub held_ttft: LogHistogram,
    pub series: TimeSeries,
}

/// Per-interval counts for the chart, by arrival time.
#[derive(Debug, Clone, Serialize)]
pub struct TimeSeries {
    pub bucket_s: f64,
    pub arrivals: Vec<u32>,
    /// Requests that met the SLO, by arrival bucket.
    pub met: Vec<u32>,
    /// Requests finished or dropped, by arrival bucket.
    pub done: Vec<u32>,
    /// (time, desired replicas, ready replicas) sampled at bucket ends.
    pub replicas: Vec<(f64, u32, u32)>,
}

impl TimeSeries {
    fn new(duration_s: f64, bucket_s: f64) -> Self {
        let n = (duration_s / bucket_s).ceil() as usize + 1;
        Self {
            bucket_s,
            arrivals: vec![0; n],
            met: vec![0; n],
            done: vec![0; n],
            replicas: Vec::with_capacity(n),
        }
    }

    #[inline]
    fn idx(&self, t: f64) -> usize {
        ((t / self.bucket_s) as usize).min(self.arrivals.len() - 1)
    }
}

impl RunStats {
    pub fn new(slo: Slo, duration_s: f64, bucket_s: f64) -> Self {
        Self {
            slo,
            arrivals: 0,
            completed: 0,
            dropped: 0,
            met_ttft: 0,
            met_tpot: 0,
            met_both: 0,
            long_arrivals: 0,
            long_met: 0,
            ttft: LogHistogram::default(),
            tpot: LogHistogram::default(),
            itl: LogHistogram::default(),
            held_completed: 0,
            held_met: 0,
            held_ttft: LogHistogram::default(),
            series: TimeSeries::new(duration_s, bucket_s),
        }
    }

    /// Attainment of requests with a prompt under / at least
    /// [`LONG_PROMPT_TOKENS`] tokens (`None` for a class without requests).
    pub(crate) fn attainment_by_prompt(&self) -> (Option<f64>, Option<f64>) {
        let short_arrivals = self.arrivals - self.long_arrivals;
        let short_met = self.met_both - self.long_met;
        let share = |met: u64, n: u64| (n > 0).then(|| met as f64 / n as f64);
        (
            share(short_met, short_arrivals),
            share(self.long_met, self.long_arrivals),
        )
    }

    /// Fraction of arrived requests that met both SLOs.
    pub fn attainment(&self) -> f64 {
        if self.arrivals == 0 {
            1.0
        } else {
            self.met_both as f64 / self.arrivals as f64
        }
    }
}

/// Counts SLO attainment of the requests that arrive in `[from_s,
/// until_s)` (the lower bound's replay of one window).
#[derive(Debug, Clone, Copy)]
pub struct WindowCount {
    pub slo: Slo,
    pub from_s: f64,
    pub until_s: f64,
    pub total: u64,
    pub met: u64,
}

impl WindowCount {
    #[inline]
    fn counts(&self, arrival: f64) -> bool {
        arrival >= self.from_s && arrival < self.until_s
    }
}

/// Where the fleet reports request outcomes.
#[derive(Debug, Clone)]
pub enum Recorder {
    Full(Box<RunStats>),
    Window(WindowCount),
}

impl Recorder {
    #[inline]
    pub(crate) fn on_arrival(&mut self, arrival: f64, input_tokens: u32) {
        if let Recorder::Full(s) = self {
            s.arrivals += 1;
            s.long_arrivals += u64::from(input_tokens >= LONG_PROMPT_TOKENS);
            let i = s.series.idx(arrival);
            s.series.arrivals[i] += 1;
        }
    }

    #[inline]
    pub(crate) fn on_drop(&mut self, arrival: f64) {
        match self {
            Recorder::Full(s) => {
                s.dropped += 1;
                let i = s.series.idx(arrival);
                s.series.done[i] += 1;
            }
            Recorder::Window(w) => {
                if w.counts(arrival) {
                    w.total += 1;
                }
            }
        }
    }

    /// A request arrived at `arrival` with a prompt of `input_tokens`
    /// finished: its TTFT and its TPOT (`None` for a single output token),
    /// and whether it was held at the router for lack of a ready replica.
    #[inline]
    pub(crate) fn on_complete(
        &mut self,
        arrival: f64,
        input_tokens: u32,
        ttft: f64,
        tpot: Option<f64>,
        held: bool,
    ) {
        match self {
            Recorder::Full(s) => {
                s.completed += 1;
                let o = s.slo.outcome(ttft, tpot, input_tokens);
                if held {
                    s.held_completed += 1;
                    s.held_met += u64::from(o.met());
                    s.held_ttft.observe_n(ttft, 1);
                }
                s.met_ttft += u64::from(o.ttft_met);
                s.met_tpot += u64::from(o.tpot_met);
                s.met_both += u64::from(o.met());
                s.long_met += u64::from(o.met() && input_tokens >= LONG_PROMPT_TOKENS);
                s.ttft.observe_n(ttft, 1);
                if let Some(tpot) = tpot {
                    s.tpot.observe_n(tpot, 1);
                }
                let i = s.series.idx(arrival);
                s.series.done[i] += 1;
                s.series.met[i] += u32::from(o.met());
            }
            Recorder::Window(w) => {
                if w.counts(arrival) {
                    w.total += 1;
                    w.met += u64::from(w.slo.outcome(ttft, tpot, input_tokens).met());
                }
            }
        }
    }

    #[inline]
    pub(crate) fn on_itl(&mut self, gap: f64, tokens: u64) {
        if let Recorder::Full(s) = self {
            s.itl.observe_n(gap, tokens);
        }
    }

    pub fn stats(&self) -> Option<&RunStats> {
        match self {
            Recorder::Full(s) => Some(s),
            Recorder::Window(_) => None,
        }
    }

    pub fn stats_mut(&mut self) -> Option<&mut RunStats> {
        match self {
            Recorder::Full(s) => Some(s),
            Recorder::Window(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_histogram_quantiles_are_within_two_percent() {
        let mut h = LogHistogram::default();
        for i in 1..=10_000 {
            h.observe_n(i as f64 * 1e-3, 1);
        }
        for (q, want) in [(0.5, 5.0), (0.95, 9.5), (0.99, 9.9)] {
            let got = h.quantile(q).unwrap();
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
    }
}
