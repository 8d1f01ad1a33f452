//! Prometheus, emulated over the fleet samples an autoscaler received.
//!
//! Baselines read their signals the way their real deployments do: from
//! scraped samples (REFERENCE.md §3.1: scrape every 15 s), with instant
//! queries returning the newest sample, `rate()` over a range, and
//! `avg_over_time` / `max_over_time` / `histogram_quantile` over scraped
//! points. Simplifications, stated: `rate()` divides the increase between
//! the first and last samples in the range by their time difference (no
//! extrapolation to the range edges); a series is one replica (pod).

use std::collections::VecDeque;

use gpuscale_core::Histogram;
use gpuscale_core::histogram::{ITL_BOUNDS_SECONDS, TTFT_BOUNDS_SECONDS};

use crate::autoscaler::FleetSample;
use crate::fleet::{EngineCounters, ReplicaSample};

/// Scraped samples kept for range queries.
#[derive(Debug, Clone)]
pub struct MetricStore {
    samples: VecDeque<FleetSample>,
    retention_s: f64,
}

impl MetricStore {
    /// A store that keeps `retention_s` seconds of samples.
    pub fn new(retention_s: f64) -> Self {
        Self {
            samples: VecDeque::new(),
            retention_s,
        }
    }

    pub fn push(&mut self, s: FleetSample) {
        let cutoff = s.at - self.retention_s;
        self.samples.push_back(s);
        while self.samples.front().is_some_and(|f| f.at < cutoff) {
            self.samples.pop_front();
        }
    }

    /// The newest sample at or before `t`.
    pub fn latest(&self) -> Option<&FleetSample> {
        self.samples.back()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples with `t − range < at <= t`, oldest first.
    pub fn range(&self, t: f64, range_s: f64) -> impl Iterator<Item = &FleetSample> {
        let from = t - range_s;
        self.samples
            .iter()
            .filter(move |s| s.at > from && s.at <= t)
    }

    /// `sum(f(pod))` over serving pods of the newest sample.
    pub fn sum_latest(&self, f: impl Fn(&ReplicaSample) -> f64) -> Option<f64> {
        self.latest().map(|s| s.serving().map(&f).sum())
    }

    /// Per pod seen at least twice in the range: (first, last, seconds between).
    fn pod_pairs(&self, t: f64, range_s: f64) -> Vec<(&ReplicaSample, &ReplicaSample, f64)> {
        type Entry<'a> = (u32, &'a ReplicaSample, f64, &'a ReplicaSample, f64);
        let mut acc: Vec<Entry<'_>> = Vec::new();
        for s in self.range(t, range_s) {
            for r in s.serving() {
                match acc.iter_mut().find(|e| e.0 == r.id) {
                    None => acc.push((r.id, r, s.at, r, s.at)),
                    Some(e) => {
                        e.3 = r;
                        e.4 = s.at;
                    }
                }
            }
        }
        acc.into_iter()
            .filter(|e| e.4 > e.2)
            .map(|e| (e.1, e.3, e.4 - e.2))
            .collect()
    }

    /// `sum(rate(counter[range]))` over pods; `None` without two samples of any pod.
    pub fn rate_sum(
        &self,
        t: f64,
        range_s: f64,
        counter: impl Fn(&EngineCounters) -> f64,
    ) -> Option<f64> {
        let pairs = self.pod_pairs(t, range_s);
        if pairs.is_empty() {
            return None;
        }
        Some(
            pairs
                .iter()
                .map(|(a, b, dt)| (counter(&b.counters) - counter(&a.counters)).max(0.0) / dt)
                .sum(),
        )
    }

    /// Per pod, `increase(counter[range])`, summed (no per-second division).
    pub(crate) fn increase_sum(
        &self,
        t: f64,
        range_s: f64,
        counter: impl Fn(&EngineCounters) -> f64,
    ) -> Option<f64> {
        let pairs = self.pod_pairs(t, range_s);
        if pairs.is_empty() {
            return None;
        }
        Some(
            pairs
                .iter()
                .map(|(a, b, _)| (counter(&b.counters) - counter(&a.counters)).max(0.0))
                .sum(),
        )
    }

    /// `increase` of the ingress counter per second over the range.
    pub fn ingress_rate(&self, t: f64, range_s: f64) -> Option<f64> {
        let mut it = self.range(t, range_s);
        let first = it.next()?;
        let last = self.range(t, range_s).last()?;
        (last.at > first.at)
            .then(|| (last.ingress_total - first.ingress_total) as f64 / (last.at - first.at))
    }

    /// Per pod, `agg(f)` over the range: `(pod id, value)` for pods with samples.
    pub(crate) fn per_pod_over_time(
        &self,
        t: f64,
        range_s: f64,
        f: impl Fn(&ReplicaSample) -> f64,
        agg: OverTime,
    ) -> Vec<(u32, f64)> {
        let mut acc: Vec<(u32, f64, u32)> = Vec::new();
        for s in self.range(t, range_s) {
            for r in s.serving() {
                let v = f(r);
                match acc.iter_mut().find(|(id, _, _)| *id == r.id) {
                    None => acc.push((r.id, v, 1)),
                    Some(e) => {
                        e.1 = match agg {
                            OverTime::Max => e.1.max(v),
                            OverTime::Avg => e.1 + v,
                        };
                        e.2 += 1;
                    }
                }
            }
        }
        acc.into_iter()
            .map(|(id, v, n)| match agg {
                OverTime::Max => (id, v),
                OverTime::Avg => (id, v / f64::from(n)),
            })
            .collect()
    }

    /// The window's TTFT or ITL observations summed over pods (bucket
    /// increases between the first and last sample of each pod in range).
    pub(crate) fn histogram_increase(
        &self,
        t: f64,
        range_s: f64,
        which: Which,
    ) -> Option<Histogram> {
        let pairs = self.pod_pairs(t, range_s);
        if pairs.is_empty() {
            return None;
        }
        let (bounds, n) = match which {
            Which::Ttft => (TTFT_BOUNDS_SECONDS, TTFT_BOUNDS_SECONDS.len() + 1),
            Which::Itl => (ITL_BOUNDS_SECONDS, ITL_BOUNDS_SECONDS.len() + 1),
        };
        let mut counts = vec![0u64; n];
        let mut sum = 0.0;
        for (a, b, _) in &pairs {
            let (ba, bb, sa, sb): (&[u64], &[u64], f64, f64) = match which {
                Which::Ttft => (
                    &a.counters.ttft_buckets,
                    &b.counters.ttft_buckets,
                    a.counters.ttft_sum,
                    b.counters.ttft_sum,
                ),
                Which::Itl => (
                    &a.counters.itl_buckets,
                    &b.counters.itl_buckets,
                    a.counters.itl_sum,
                    b.counters.itl_sum,
                ),
            };
            for i in 0..n {
                counts[i] += bb[i].saturating_sub(ba[i]);
            }
            sum += (sb - sa).max(0.0);
        }
        histogram_from_counts(bounds, &counts, sum)
    }
}

/// Build a core [`Histogram`] from per-bucket (non-cumulative) counts.
pub(crate) fn histogram_from_counts(
    finite_bounds: &[f64],
    counts: &[u64],
    sum: f64,
) -> Option<Histogram> {
    let mut bounds = finite_bounds.to_vec();
    bounds.push(f64::INFINITY);
    let mut cum = Vec::with_capacity(counts.len());
    let mut acc = 0u64;
    for c in counts {
        acc += c;
        cum.push(acc);
    }
    Histogram::from_parts(bounds, cum, sum.max(0.0), acc).ok()
}

/// Which latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Ttft,
    Itl,
}

/// `avg_over_time` or `max_over_time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverTime {
    Avg,
    Max,
}
