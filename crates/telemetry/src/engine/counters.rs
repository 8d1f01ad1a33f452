//! Engine restarts, made invisible to consumers of cumulative counters.
//!
//! An engine that restarts (crash, OOM, redeploy in the same pod) starts its
//! counters and histograms from zero. The wire protocol carries cumulative
//! values, so the agent keeps, per engine, the raw values of the last scrape
//! and an offset per field: when any cumulative value goes down, every
//! counter is considered reset, the last raw values are added to the
//! offsets, and the reset is counted. Exported = raw + offset, so totals
//! stay monotonic across restarts. A field the engine does not export stays
//! `None`. Pure code.

use gpuscale_core::Histogram;

use super::mapping::EngineReading;

#[derive(Debug, Clone, Default, PartialEq)]
struct Cumulative {
    prompt_tokens: Option<f64>,
    generation_tokens: Option<f64>,
    requests_arrived: Option<f64>,
    requests_finished: Option<f64>,
    preemptions: Option<f64>,
    ttft: Option<Histogram>,
    itl: Option<Histogram>,
    tpot: Option<Histogram>,
}

impl Cumulative {
    fn of(r: &EngineReading) -> Self {
        Self {
            prompt_tokens: r.prompt_tokens_total,
            generation_tokens: r.generation_tokens_total,
            requests_arrived: r.requests_arrived_total,
            requests_finished: r.requests_finished_total,
            preemptions: r.preemptions_total,
            ttft: r.ttft_seconds.clone(),
            itl: r.itl_seconds.clone(),
            tpot: r.tpot_seconds.clone(),
        }
    }

    fn scalars(&self) -> [Option<f64>; 5] {
        [
            self.prompt_tokens,
            self.generation_tokens,
            self.requests_arrived,
            self.requests_finished,
            self.preemptions,
        ]
    }
}

fn went_down(now: Option<f64>, before: Option<f64>) -> bool {
    matches!((now, before), (Some(n), Some(b)) if n < b)
}

fn histogram_went_down(now: &Option<Histogram>, before: &Option<Histogram>) -> bool {
    match (now, before) {
        // Different bounds (an upgraded engine) also start from zero.
        (Some(n), Some(b)) => n.delta_since(b).is_err(),
        _ => false,
    }
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, _) => None,
    }
}

/// Per-engine counter offsets. See the module docs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CounterTracker {
    last: Cumulative,
    offset: Cumulative,
    resets: u64,
}

impl CounterTracker {
    /// Detects a reset against the previous reading and rewrites `reading`'s
    /// cumulative fields to raw + offset. Returns true when this reading
    /// follows a reset.
    pub fn apply(&mut self, reading: &mut EngineReading) -> bool {
        let now = Cumulative::of(reading);
        let reset = now
            .scalars()
            .iter()
            .zip(self.last.scalars())
            .any(|(n, b)| went_down(*n, b))
            || histogram_went_down(&now.ttft, &self.last.ttft)
            || histogram_went_down(&now.itl, &self.last.itl)
            || histogram_went_down(&now.tpot, &self.last.tpot);
        if reset {
            self.resets += 1;
            let last = std::mem::take(&mut self.last);
            self.offset.prompt_tokens = add(last.prompt_tokens, self.offset.prompt_tokens);
            self.offset.generation_tokens =
                add(last.generation_tokens, self.offset.generation_tokens);
            self.offset.requests_arrived = add(last.requests_arrived, self.offset.requests_arrived);
            self.offset.requests_finished =
                add(last.requests_finished, self.offset.requests_finished);
            self.offset.preemptions = add(last.preemptions, self.offset.preemptions);
            self.offset.ttft = merge_offset(self.offset.ttft.take(), last.ttft);
            self.offset.itl = merge_offset(self.offset.itl.take(), last.itl);
            self.offset.tpot = merge_offset(self.offset.tpot.take(), last.tpot);
        }
        // Remember the raw values (a field missing this time keeps its last).
        let keep = |n: Option<f64>, b: Option<f64>| n.or(b);
        self.last = Cumulative {
            prompt_tokens: keep(now.prompt_tokens, self.last.prompt_tokens),
            generation_tokens: keep(now.generation_tokens, self.last.generation_tokens),
            requests_arrived: keep(now.requests_arrived, self.last.requests_arrived),
            requests_finished: keep(now.requests_finished, self.last.requests_finished),
            preemptions: keep(now.preemptions, self.last.preemptions),
            ttft: now.ttft.clone().or_else(|| self.last.ttft.take()),
            itl: now.itl.clone().or_else(|| self.last.itl.take()),
            tpot: now.tpot.clone().or_else(|| self.last.tpot.take()),
        };
        let o = &self.offset;
        reading.prompt_tokens_total = reading
            .prompt_tokens_total
            .map(|v| v + o.prompt_tokens.unwrap_or(0.0));
        reading.generation_tokens_total = reading
            .generation_tokens_total
            .map(|v| v + o.generation_tokens.unwrap_or(0.0));
        reading.requests_arrived_total = reading
            .requests_arrived_total
            .map(|v| v + o.requests_arrived.unwrap_or(0.0));
        reading.requests_finished_total = reading
            .requests_finished_total
            .map(|v| v + o.requests_finished.unwrap_or(0.0));
        reading.preemptions_total = reading
            .preemptions_total
            .map(|v| v + o.preemptions.unwrap_or(0.0));
        reading.ttft_seconds = with_offset(reading.ttft_seconds.take(), &o.ttft);
        reading.itl_seconds = with_offset(reading.itl_seconds.take(), &o.itl);
        reading.tpot_seconds = with_offset(reading.tpot_seconds.take(), &o.tpot);
        reset
    }

    /// Resets seen so far.
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

fn merge_offset(offset: Option<Histogram>, last: Option<Histogram>) -> Option<Histogram> {
    match (offset, last) {
        (Some(mut o), Some(l)) => {
            if o.merge(&l).is_ok() {
                Some(o)
            } else {
                // Bounds changed: older observations cannot be carried.
                Some(l)
            }
        }
        (o, None) => o,
        (None, l) => l,
    }
}

fn with_offset(raw: Option<Histogram>, offset: &Option<Histogram>) -> Option<Histogram> {
    match (raw, offset) {
        (Some(mut r), Some(o)) => {
            if r.merge(o).is_err() {
                // Bounds differ from the offset's: the raw histogram alone.
                return Some(r);
            }
            Some(r)
        }
        (r, _) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(tokens: f64, ttft_obs: &[f64]) -> EngineReading {
        let mut h = Histogram::with_bounds(&[0.1, 1.0]).unwrap();
        for v in ttft_obs {
            h.observe(*v);
        }
        EngineReading {
            generation_tokens_total: Some(tokens),
            ttft_seconds: Some(h),
            ..EngineReading::default()
        }
    }

    #[test]
    fn totals_stay_monotonic_across_a_restart_and_the_reset_is_counted() {
        let mut t = CounterTracker::default();
        let mut r = reading(100.0, &[0.05, 0.5]);
        assert!(!t.apply(&mut r));
        assert_eq!(r.generation_tokens_total, Some(100.0));

        let mut r = reading(150.0, &[0.05, 0.5, 0.5]);
        assert!(!t.apply(&mut r));
        assert_eq!(r.generation_tokens_total, Some(150.0));

        // Restart: the engine counts from zero.
        let mut r = reading(20.0, &[2.0]);
        assert!(t.apply(&mut r));
        assert_eq!(r.generation_tokens_total, Some(170.0));
        let h = r.ttft_seconds.unwrap();
        assert_eq!(h.count(), 4);
        assert_eq!(h.cumulative_counts(), &[1, 3, 4]);
        assert_eq!(t.resets(), 1);

        let mut r = reading(30.0, &[2.0, 2.0]);
        assert!(!t.apply(&mut r));
        assert_eq!(r.generation_tokens_total, Some(180.0));
        assert_eq!(r.ttft_seconds.unwrap().count(), 5);
    }

    #[test]
    fn a_missing_field_stays_missing_and_does_not_reset() {
        let mut t = CounterTracker::default();
        let mut r = reading(100.0, &[]);
        t.apply(&mut r);
        let mut r = EngineReading::default();
        assert!(!t.apply(&mut r));
        assert_eq!(r.generation_tokens_total, None);
        // Back, lower than before: a reset.
        let mut r = reading(10.0, &[]);
        assert!(t.apply(&mut r));
        assert_eq!(r.generation_tokens_total, Some(110.0));
    }

    #[test]
    fn two_restarts_accumulate() {
        let mut t = CounterTracker::default();
        for (raw, exported) in [(50.0, 50.0), (5.0, 55.0), (60.0, 110.0), (1.0, 111.0)] {
            let mut r = reading(raw, &[]);
            t.apply(&mut r);
            assert_eq!(r.generation_tokens_total, Some(exported));
        }
        assert_eq!(t.resets(), 2);
    }
}
