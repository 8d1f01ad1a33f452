//! Scale to zero in simulation: many models with sparse traffic, each on
//! its own replicas behind an activator (the router holds requests while a
//! model has no ready replica), compared three ways.
//!
//! * **one replica per model**: every model keeps one replica all the time
//!   (what platform teams run today);
//! * **gpuscale** with `minReplicas: 0`: its policy wrapped in the
//!   scale-to-zero rule ([`gpuscale_policy::zero::ZeroRule`], the same code
//!   the scaler runs: the learned start-up, the idle period of
//!   [`gpuscale_policy::idle`], held requests as demand, an immediate
//!   decision when a request is held at zero replicas);
//! * **Knative KPA** with scale to zero (REFERENCE.md §1.3, B13: the
//!   activator holds requests at zero and pokes the autoscaler, which
//!   decides at once; scale to zero once the stable window's concurrency
//!   is zero, after the 30 s grace period).
//!
//! **The workload** ([`sparse_models`]): each model's traffic is a series
//! of *sessions* separated by idle gaps drawn from an exponential
//! distribution (mean `mean_gap_s`); a session is a slice of one of the
//! shipped Azure traces (code or conversation, alternating by model) of a
//! length drawn uniformly in `session_s`, at a random offset, thinned to
//! `keep` of its requests (arrival times and sizes kept). So the arrivals
//! inside a session keep the trace's own burstiness, and the model is idle
//! between sessions.
//!
//! **What is reported** per policy, summed over the models: GPU-hours;
//! SLO attainment; cold-start hits (requests held at the router for lack
//! of a ready replica) and the p95 TTFT of those (the TTFT *after idle*:
//! the hold counts in it); the attainment of the other requests; replicas
//! created (cold starts paid).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use gpuscale_policy::PerfModel;
use gpuscale_policy::idle::ScaleToZeroSpec;
use serde::Serialize;

use crate::autoscaler::{Autoscaler, FixedReplicas};
use crate::baselines::knative_kpa::KnativeKpa;
use crate::cli::{SimArgs, emit, parse_duration};
use crate::error::SimError;
use crate::fleet::{ColdStart, FleetConfig, VictimOrder};
use crate::gpuscale::{GpuscaleAutoscaler, GpuscaleOptions, default_spec};
use crate::profile::{default_cold_start_s, resolve_profile};
use crate::rng::SimRng;
use crate::run::{RunConfig, run_policy};
use crate::stats::LogHistogram;
use crate::stats::Slo;
use crate::trace::{self, Trace, TraceFormat};
use crate::trace::{Request, Workload};

/// How the sparse multi-model workload is built.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZeroOptions {
    /// Models, each on its own replicas.
    pub models: usize,
    /// Seconds simulated (GPU time counts up to here for every model).
    pub horizon_s: f64,
    /// A session's length is drawn uniformly in this range, seconds.
    pub session_s: (f64, f64),
    /// Mean idle gap between a model's sessions, seconds.
    pub mean_gap_s: f64,
    /// Share of a trace slice's requests kept.
    pub keep: f64,
    /// Most replicas of one model.
    pub max_replicas: u32,
    /// gpuscale is also run with these fixed idle periods
    /// (`scaleToZero.idleSeconds`), seconds, to compare with Knative at
    /// equal GPU-hours.
    pub idle_sweep_s: Vec<f64>,
    pub seed: u64,
}

impl Default for ZeroOptions {
    fn default() -> Self {
        Self {
            models: 8,
            horizon_s: 6.0 * 3600.0,
            session_s: (120.0, 900.0),
            mean_gap_s: 2700.0,
            keep: 0.02,
            max_replicas: 4,
            idle_sweep_s: vec![30.0, 40.0, 50.0, 60.0, 75.0, 90.0, 120.0],
            seed: 1,
        }
    }
}

impl ZeroOptions {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.models == 0 || self.models > 1000 {
            return Err(SimError::config("--zero-models", self.models, "1..=1000"));
        }
        if !(self.horizon_s.is_finite() && self.horizon_s >= 60.0) {
            return Err(SimError::config(
                "--duration",
                self.horizon_s,
                "at least 1m with --scale-to-zero",
            ));
        }
        let (lo, hi) = self.session_s;
        if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
            return Err(SimError::config(
                "session length",
                format!("{lo}..{hi}"),
                "0 < min <= max",
            ));
        }
        if !(self.mean_gap_s > 0.0 && self.mean_gap_s.is_finite()) {
            return Err(SimError::config("mean idle gap", self.mean_gap_s, "> 0"));
        }
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return Err(SimError::config("kept share", self.keep, "(0, 1]"));
        }
        Ok(())
    }
}

/// One workload per model from `sources` (each a trace's requests, sorted
/// by arrival); see the module docs.
pub fn sparse_models(
    sources: &[(&str, &[Request])],
    o: &ZeroOptions,
) -> Result<Vec<Workload>, SimError> {
    o.validate()?;
    if sources.is_empty() || sources.iter().any(|(_, r)| r.is_empty()) {
        return Err(SimError::Report(
            "scale to zero: every source trace needs requests".into(),
        ));
    }
    let mut out = Vec::with_capacity(o.models);
    for m in 0..o.models {
        let (name, src) = sources[m % sources.len()];
        let src_len = src.last().map_or(0.0, |r| r.arrival_s);
        let mut rng = SimRng::new(o.seed, 100 + m as u64);
        let mut requests = Vec::new();
        let mut t = rng.exponential(o.mean_gap_s);
        while t < o.horizon_s {
            let len = o.session_s.0 + rng.uniform() * (o.session_s.1 - o.session_s.0);
            let len = len.min(src_len);
            let offset = rng.uniform() * (src_len - len).max(0.0);
            let from = src.partition_point(|r| r.arrival_s < offset);
            for r in src[from..]
                .iter()
                .take_while(|r| r.arrival_s < offset + len)
            {
                let at = t + (r.arrival_s - offset);
                if at < o.horizon_s && rng.uniform() < o.keep {
                    requests.push(Request {
                        arrival_s: at,
                        ..*r
                    });
                }
            }
            t += len + rng.exponential(o.mean_gap_s);
        }
        requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        out.push(Workload::Requests {
            name: format!("model-{m}-{name}"),
            requests: std::sync::Arc::new(requests),
            duration_s: o.horizon_s,
        });
    }
    Ok(out)
}

/// A policy compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ZeroPolicy {
    OnePerModel,
    /// gpuscale with `minReplicas: 0`; `Some`: a fixed idle period, seconds.
    Gpuscale(Option<f64>),
    KnativeKpa,
}

impl ZeroPolicy {
    pub fn label(&self) -> String {
        match self {
            ZeroPolicy::OnePerModel => "one-replica-per-model".into(),
            ZeroPolicy::Gpuscale(None) => "gpuscale".into(),
            ZeroPolicy::Gpuscale(Some(s)) => format!("gpuscale[idle={s}s]"),
            ZeroPolicy::KnativeKpa => "knative-kpa".into(),
        }
    }
}

/// The policies of a comparison: one replica per model, gpuscale with its
/// own idle period and with each of `idle_sweep_s`, Knative.
pub fn policies(o: &ZeroOptions) -> Vec<ZeroPolicy> {
    let mut v = vec![ZeroPolicy::OnePerModel, ZeroPolicy::Gpuscale(None)];
    v.extend(
        o.idle_sweep_s
            .iter()
            .map(|s| ZeroPolicy::Gpuscale(Some(*s))),
    );
    v.push(ZeroPolicy::KnativeKpa);
    v
}

/// One policy's totals over every model.
#[derive(Debug, Clone, Serialize)]
pub struct ZeroTotals {
    pub policy: String,
    pub gpu_hours: f64,
    pub arrivals: u64,
    pub met: u64,
    /// Requests held at the router for lack of a ready replica, completed.
    pub cold_hits: u64,
    pub cold_met: u64,
    /// p95 TTFT of the held requests, seconds (`None` without any).
    pub cold_ttft_p95_s: Option<f64>,
    pub cold_ttft_max_s: Option<f64>,
    /// Replicas created, the initial ones included (cold starts paid).
    pub replicas_created: u32,
    #[serde(skip)]
    cold_ttft: LogHistogram,
}

impl ZeroTotals {
    fn new(policy: &str) -> Self {
        Self {
            policy: policy.into(),
            gpu_hours: 0.0,
            arrivals: 0,
            met: 0,
            cold_hits: 0,
            cold_met: 0,
            cold_ttft_p95_s: None,
            cold_ttft_max_s: None,
            replicas_created: 0,
            cold_ttft: LogHistogram::default(),
        }
    }

    /// Share of all requests that met the SLO.
    pub fn attainment(&self) -> f64 {
        if self.arrivals == 0 {
            1.0
        } else {
            self.met as f64 / self.arrivals as f64
        }
    }

    /// Share of the requests that found a ready replica (not held) that
    /// met the SLO; a request dropped counts here as a miss.
    pub(crate) fn warm_attainment(&self) -> f64 {
        let n = self.arrivals.saturating_sub(self.cold_hits);
        if n == 0 {
            1.0
        } else {
            self.met.saturating_sub(self.cold_met) as f64 / n as f64
        }
    }

    /// Requests that missed the SLO (dropped ones included).
    pub fn misses(&self) -> u64 {
        self.arrivals.saturating_sub(self.met)
    }
}

/// The comparison's result.
#[derive(Debug, Clone, Serialize)]
pub struct ZeroComparison {
    pub options: ZeroOptions,
    pub cold_start_s: f64,
    pub ttft_slo_s: f64,
    pub requests_per_model: Vec<usize>,
    pub totals: Vec<ZeroTotals>,
}

fn autoscaler(
    policy: ZeroPolicy,
    perf: &PerfModel,
    preset: &str,
    run: &RunConfig,
    max: u32,
) -> Result<(Box<dyn Autoscaler>, u32), SimError> {
    Ok(match policy {
        ZeroPolicy::OnePerModel => (
            Box::new(FixedReplicas {
                label: policy.label(),
                replicas: 1,
                batch_limit: None,
            }),
            1,
        ),
        ZeroPolicy::Gpuscale(idle) => {
            let mut spec = default_spec(
                preset,
                &run.slo,
                0,
                max,
                run.fleet.cold_start.mean_s(),
                perf.gpus_per_replica,
            );
            spec.scale_to_zero = Some(ScaleToZeroSpec {
                idle_seconds: idle,
                ..ScaleToZeroSpec::default()
            });
            (
                Box::new(GpuscaleAutoscaler::new(
                    spec,
                    perf.clone(),
                    GpuscaleOptions::default(),
                )?),
                0,
            )
        }
        ZeroPolicy::KnativeKpa => (
            Box::new(KnativeKpa::new(f64::from(perf.max_batch), 0, max)),
            0,
        ),
    })
}

/// Runs every model with every policy of [`policies`] on `jobs` threads.
/// `run` is the fleet and SLO of one model (its initial replicas are set
/// per policy: one for one replica per model, none for the others).
pub fn compare(
    workloads: &[Workload],
    options: &ZeroOptions,
    run: &RunConfig,
    preset: &str,
    jobs: usize,
) -> Result<ZeroComparison, SimError> {
    let perf = &run.fleet.perf;
    let compared = policies(options);
    let tasks: Vec<(usize, usize)> = (0..compared.len())
        .flat_map(|p| (0..workloads.len()).map(move |w| (p, w)))
        .collect();
    let next = AtomicUsize::new(0);
    let totals = Mutex::new(
        compared
            .iter()
            .map(|p| ZeroTotals::new(&p.label()))
            .collect::<Vec<_>>(),
    );
    let first_error: Mutex<Option<SimError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, tasks.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(p, w)) = tasks.get(i) else { break };
                    let built = autoscaler(compared[p], perf, preset, run, options.max_replicas);
                    let (mut policy, initial) = match built {
                        Ok(b) => b,
                        Err(e) => {
                            let mut g = first_error.lock().unwrap_or_else(|e| e.into_inner());
                            g.get_or_insert(e);
                            break;
                        }
                    };
                    let mut cfg = run.clone();
                    cfg.initial_replicas = initial;
                    cfg.fleet.seed = run.fleet.seed.wrapping_add(w as u64);
                    let o = run_policy(&workloads[w], policy.as_mut(), &cfg, None);
                    let mut g = totals.lock().unwrap_or_else(|e| e.into_inner());
                    let t = &mut g[p];
                    t.gpu_hours += o.gpu_hours;
                    t.arrivals += o.stats.arrivals;
                    t.met += o.stats.met_both;
                    t.cold_hits += o.stats.held_completed;
                    t.cold_met += o.stats.held_met;
                    t.cold_ttft.merge(&o.stats.held_ttft);
                    t.replicas_created += o.replicas_created;
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    for t in &mut totals {
        t.cold_ttft_p95_s = t.cold_ttft.quantile(0.95);
        t.cold_ttft_max_s = t.cold_ttft.quantile(1.0);
    }
    Ok(ZeroComparison {
        options: options.clone(),
        cold_start_s: run.fleet.cold_start.mean_s(),
        ttft_slo_s: run.slo.ttft_s,
        requests_per_model: workloads
            .iter()
            .map(|w| w.expected_requests() as usize)
            .collect(),
        totals,
    })
}

impl ZeroComparison {
    pub(crate) fn totals_of(&self, policy: &str) -> Option<&ZeroTotals> {
        self.totals.iter().find(|t| t.policy == policy)
    }

    /// gpuscale's misses at `gpu_hours`, interpolated linearly between its
    /// runs (its own idle period and the fixed ones) on either side; `None`
    /// when no run lies on one side.
    pub(crate) fn gpuscale_misses_at(&self, gpu_hours: f64) -> Option<f64> {
        let mut runs: Vec<(f64, f64)> = self
            .totals
            .iter()
            .filter(|t| t.policy.starts_with("gpuscale"))
            .map(|t| (t.gpu_hours, t.misses() as f64))
            .collect();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let below = runs.iter().rev().find(|r| r.0 <= gpu_hours)?;
        let above = runs.iter().find(|r| r.0 >= gpu_hours)?;
        if above.0 - below.0 <= f64::EPSILON {
            return Some(below.1.min(above.1));
        }
        let f = (gpu_hours - below.0) / (above.0 - below.0);
        Some(below.1 + f * (above.1 - below.1))
    }

    /// The targets, each with whether it holds.
    pub fn targets(&self) -> Vec<(String, bool)> {
        let (Some(one), Some(gs), Some(kn)) = (
            self.totals_of("one-replica-per-model"),
            self.totals_of("gpuscale"),
            self.totals_of("knative-kpa"),
        ) else {
            return Vec::new();
        };
        let saved = 1.0 - gs.gpu_hours / one.gpu_hours.max(1e-9);
        let equal = self.gpuscale_misses_at(kn.gpu_hours);
        let bound = self.cold_start_s + 5.0;
        let p95 = gs.cold_ttft_p95_s.unwrap_or(0.0);
        vec![
            (
                format!(
                    "gpuscale uses {:.0}% fewer GPU-hours than one replica per model (target >= 50%)",
                    100.0 * saved
                ),
                saved >= 0.5,
            ),
            (
                format!(
                    "gpuscale's p95 TTFT after idle {p95:.1} s <= cold start + 5 s = {bound:.0} s"
                ),
                p95 <= bound,
            ),
            (
                format!(
                    "gpuscale's requests that found a ready replica met the SLO: {:.2}% (target >= 99%)",
                    100.0 * gs.warm_attainment()
                ),
                gs.warm_attainment() >= 0.99,
            ),
            (
                format!(
                    "against Knative: gpuscale GPU-hours {:.2} vs {:.2}, SLO misses {} vs {}; at Knative's GPU-hours gpuscale (its runs' misses interpolated over GPU-hours) misses {} (target: fewer GPU-hours, or fewer misses at equal GPU-hours)",
                    gs.gpu_hours,
                    kn.gpu_hours,
                    gs.misses(),
                    kn.misses(),
                    equal.map_or("- (no gpuscale run on both sides)".into(), |m| format!(
                        "{m:.0}"
                    )),
                ),
                gs.gpu_hours < kn.gpu_hours || equal.is_some_and(|m| m < kn.misses() as f64),
            ),
        ]
    }

    /// A plain-text table and the targets.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let o = &self.options;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scale to zero: {} models over {:.1} h, sessions {:.0}-{:.0} s, mean idle gap {:.0} s, {:.1}% of each Azure slice kept; {} requests; cold start {:.0} s; TTFT SLO {:.1} s",
            o.models,
            o.horizon_s / 3600.0,
            o.session_s.0,
            o.session_s.1,
            o.mean_gap_s,
            100.0 * o.keep,
            self.requests_per_model.iter().sum::<usize>(),
            self.cold_start_s,
            self.ttft_slo_s
        );
        let _ = writeln!(
            s,
            "{:<24} {:>9} {:>10} {:>9} {:>13} {:>13} {:>12} {:>9}",
            "policy",
            "GPU-h",
            "attained",
            "cold hits",
            "p95 TTFT cold",
            "max TTFT cold",
            "warm attained",
            "replicas"
        );
        let secs = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} s"));
        for t in &self.totals {
            let _ = writeln!(
                s,
                "{:<24} {:>9.2} {:>9.2}% {:>9} {:>13} {:>13} {:>11.2}% {:>9}",
                t.policy,
                t.gpu_hours,
                100.0 * t.attainment(),
                t.cold_hits,
                secs(t.cold_ttft_p95_s),
                secs(t.cold_ttft_max_s),
                100.0 * t.warm_attainment(),
                t.replicas_created
            );
        }
        for (line, ok) in self.targets() {
            let _ = writeln!(s, "[{}] {line}", if ok { "met" } else { "MISSED" });
        }
        s
    }
}

/// `gpuscale sim --scale-to-zero`: the comparison on the shipped Azure
/// traces under `--data-dir`, printed as a table (or JSON with `--report
/// json`).
pub(crate) fn run_command(args: &SimArgs, slo: Slo, jobs: usize) -> Result<(), SimError> {
    let horizon_s = match &args.duration {
        Some(d) => parse_duration("--duration", d)?,
        None => 6.0 * 3600.0,
    };
    let options = ZeroOptions {
        models: args.zero_models,
        horizon_s,
        seed: args.seed,
        ..ZeroOptions::default()
    };
    options.validate()?;
    let perf = resolve_profile(&args.profile)?;
    let cold_start_s = match &args.cold_start {
        Some(c) => parse_duration("--cold-start", c)?,
        None => default_cold_start_s(&perf),
    };
    let mut sources = Vec::new();
    for (name, file) in [
        ("code", "AzureLLMInferenceTrace_code.csv"),
        ("conv", "AzureLLMInferenceTrace_conv.csv"),
    ] {
        let path = args.data_dir.join("traces").join(file);
        match trace::read_trace(&path, Some(TraceFormat::Azure))? {
            Trace::Requests { requests, .. } => sources.push((name, requests)),
            Trace::Rate { .. } => {
                return Err(SimError::config(
                    "--data-dir",
                    path.display(),
                    "Azure traces",
                ));
            }
        }
    }
    let refs: Vec<(&str, &[Request])> = sources.iter().map(|(n, r)| (*n, r.as_slice())).collect();
    let workloads = sparse_models(&refs, &options)?;
    let run = RunConfig {
        slo,
        fleet: FleetConfig {
            perf,
            prefill_token_budget: 8192,
            pending_s: parse_duration("--pending", &args.pending)?,
            cold_start: ColdStart::Fixed(cold_start_s),
            drain_grace_s: Some(30.0),
            victim_order: VictimOrder::Kubernetes,
            horizon_s,
            seed: args.seed,
        },
        initial_replicas: 0,
        chart_bucket_s: (horizon_s / 400.0).max(10.0),
    };
    let c = compare(&workloads, &options, &run, &args.profile, jobs)?;
    let text = match args.report.as_str() {
        "json" => serde_json::to_string_pretty(&c).map_err(|e| SimError::Report(e.to_string()))?,
        _ => c.table(),
    };
    emit(&text, args.out.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(rate_rps: f64, secs: f64) -> Vec<Request> {
        let mut rng = SimRng::new(7, 1);
        let mut t = 0.0;
        let mut v = Vec::new();
        while t < secs {
            t += rng.exponential(1.0 / rate_rps);
            v.push(Request {
                arrival_s: t,
                input_tokens: 200 + rng.below(800) as u32,
                output_tokens: 50 + rng.below(200) as u32,
            });
        }
        v
    }

    #[test]
    fn sessions_come_from_the_source_with_idle_gaps_between_them() {
        let src = source(5.0, 3600.0);
        let o = ZeroOptions {
            models: 3,
            horizon_s: 4.0 * 3600.0,
            keep: 0.1,
            ..ZeroOptions::default()
        };
        let ws = sparse_models(&[("a", &src)], &o).unwrap();
        assert_eq!(ws.len(), 3);
        for w in &ws {
            assert_eq!(w.duration_s(), o.horizon_s);
            let arrivals: Vec<f64> = w.stream().map(|r| r.arrival_s).collect();
            assert!(arrivals.len() > 50, "{}", arrivals.len());
            assert!(arrivals.windows(2).all(|p| p[0] <= p[1]));
            // Idle: at least one gap longer than a session's longest.
            let longest_gap = arrivals.windows(2).map(|p| p[1] - p[0]).fold(0.0, f64::max);
            assert!(longest_gap > o.session_s.1, "{longest_gap}");
            // Thinned: far fewer than the source's 5 per second.
            assert!((arrivals.len() as f64) < 0.2 * 5.0 * o.horizon_s);
        }
        // Different models, different sessions.
        assert_ne!(
            ws[0].stream().next().map(|r| r.arrival_s),
            ws[1].stream().next().map(|r| r.arrival_s)
        );
        let bad = ZeroOptions {
            keep: 0.0,
            ..ZeroOptions::default()
        };
        assert!(sparse_models(&[("a", &src)], &bad).is_err());
    }

    #[test]
    fn gpuscale_at_zero_halves_the_gpu_hours_and_wakes_within_the_cold_start() {
        let src = source(5.0, 3600.0);
        let o = ZeroOptions {
            models: 2,
            horizon_s: 3.0 * 3600.0,
            keep: 0.05,
            idle_sweep_s: vec![60.0],
            ..ZeroOptions::default()
        };
        let ws = sparse_models(&[("a", &src)], &o).unwrap();
        let perf = resolve_profile("h200-llama3-8b-bf16").unwrap();
        let run = RunConfig {
            slo: Slo {
                ttft_s: 2.0,
                itl_s: 0.05,
                percentile: 95.0,
                ttft_per_input_token_s: 0.0,
            },
            fleet: FleetConfig {
                perf,
                prefill_token_budget: 8192,
                pending_s: 0.0,
                cold_start: ColdStart::Fixed(90.0),
                drain_grace_s: Some(30.0),
                victim_order: VictimOrder::Kubernetes,
                horizon_s: o.horizon_s,
                seed: 1,
            },
            initial_replicas: 0,
            chart_bucket_s: 60.0,
        };
        let c = compare(&ws, &o, &run, "h200-llama3-8b-bf16", 2).unwrap();
        let one = c.totals_of("one-replica-per-model").unwrap();
        let gs = c.totals_of("gpuscale").unwrap();
        let kn = c.totals_of("knative-kpa").unwrap();
        // One replica per model: the whole horizon, no cold-start hit.
        assert!((one.gpu_hours - 6.0).abs() < 0.01, "{}", one.gpu_hours);
        assert_eq!(one.cold_hits, 0);
        // At zero between sessions: cold-start hits, every one answered.
        for t in [gs, kn] {
            assert!(t.cold_hits > 0, "{t:?}");
            assert!(t.gpu_hours < 0.5 * one.gpu_hours, "{t:?}");
            assert!(t.replicas_created > 2, "{t:?}");
        }
        assert_eq!(gs.arrivals, one.arrivals);
        // Woken at once: a held request waits about one cold start.
        let p95 = gs.cold_ttft_p95_s.unwrap();
        assert!(p95 > 60.0 && p95 <= 95.0, "p95 after idle {p95}");
        assert!(gs.warm_attainment() >= 0.99, "{gs:?}");
        assert!(c.table().contains("gpuscale"));
    }
}
