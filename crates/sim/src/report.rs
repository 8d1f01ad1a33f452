//! Reports: one row per policy run, as a table, JSON or CSV.
//!
//! `slo_attainment` is the fraction of requests that met the SLO as
//! [`gpuscale_core::slo`] defines it (the request's own TTFT and its own
//! time per output token within their objectives; dropped requests are
//! misses); `ttft_attainment` and `tpot_attainment` count each objective
//! alone. `attainable_ceiling` is the share of requests any fleet could
//! serve within the SLO ([`crate::ceiling`]), and `attainment_vs_ceiling`
//! the attainment relative to it. `short_prompt_attainment` and
//! `long_prompt_attainment` split requests at
//! [`crate::ceiling::LONG_PROMPT_TOKENS`] prompt tokens. `itl_p95_s` is
//! the 95th percentile of every inter-token gap (token-weighted),
//! `tpot_p95_s` of per-request time per output token.
//!
//! `gpu_hours_vs_lower_bound`: GPU-hours over the lower bound's
//! ([`crate::bound`]) at the same attainment, interpolated between the
//! bound's frontier points (outside the frontier: against its nearest end
//! point, and `lower_bound_extrapolated` says so). `beats_lower_bound`
//! flags a run that reaches one of the bound's points' attainment with
//! fewer GPU-hours: the bound is then not one, and the report says so.
//! `oscillations` counts direction reversals of consecutive scale events
//! less than 5 minutes apart.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::error::SimError;
use crate::run::RunOutcome;

/// Oscillation window, seconds.
pub(crate) const OSCILLATION_WINDOW_S: f64 = 300.0;

/// The policy name of the lower bound's rows.
pub(crate) const LOWER_BOUND: &str = "lower-bound";
/// The policy name of static provisioning (B11), chosen in hindsight.
pub(crate) const STATIC: &str = "b11-static-peak";

/// One policy's results.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    /// `gpuscale`, `lower-bound`, or the baseline's name.
    pub policy: String,
    /// The swept target of a baseline run (its meaning depends on the
    /// baseline); for the lower bound, its target as a share of what its
    /// curves can meet.
    pub target: Option<f64>,
    pub trace: String,
    pub requests: u64,
    pub slo_attainment: f64,
    /// Share of the trace's requests any fleet could serve within the SLO.
    pub attainable_ceiling: f64,
    /// `slo_attainment / attainable_ceiling`.
    pub attainment_vs_ceiling: f64,
    pub ttft_attainment: f64,
    pub tpot_attainment: f64,
    pub short_prompt_attainment: Option<f64>,
    pub long_prompt_attainment: Option<f64>,
    pub ttft_p50_s: Option<f64>,
    pub ttft_p95_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    pub itl_p50_s: Option<f64>,
    pub itl_p95_s: Option<f64>,
    pub itl_p99_s: Option<f64>,
    pub tpot_p95_s: Option<f64>,
    pub gpu_hours: f64,
    /// GPU-hours over the lower bound's at the same attainment (`None`
    /// without a lower-bound run on the same trace).
    pub gpu_hours_vs_lower_bound: Option<f64>,
    /// The attainment was outside the bound's frontier.
    pub lower_bound_extrapolated: bool,
    /// Reaches a lower-bound point's attainment with fewer GPU-hours.
    pub beats_lower_bound: bool,
    pub mean_replicas: f64,
    pub scale_events: usize,
    pub scale_events_per_hour: f64,
    pub oscillations: u32,
    pub requests_dropped: u64,
    pub max_queue: u64,
    pub cold_starts: u32,
    /// Wall-clock seconds of the run and simulated requests per second.
    pub wall_s: f64,
    pub sim_requests_per_s: f64,
    pub parameters: Value,
}

impl PolicyReport {
    /// The report of one run over a trace of `duration_s` seconds, with
    /// `gpus_per_replica` to turn GPU-hours into replicas and the trace's
    /// attainable ceiling.
    pub(crate) fn from_outcome(
        out: &RunOutcome,
        trace: &str,
        target: Option<f64>,
        duration_s: f64,
        gpus_per_replica: u32,
        initial_replicas: u32,
        attainable_ceiling: f64,
    ) -> Self {
        let s = &out.stats;
        let n = s.arrivals.max(1) as f64;
        let hours = (duration_s / 3600.0).max(1e-9);
        let (short, long) = s.attainment_by_prompt();
        Self {
            policy: out.policy.clone(),
            target,
            trace: trace.to_string(),
            requests: s.arrivals,
            slo_attainment: s.attainment(),
            attainable_ceiling,
            attainment_vs_ceiling: s.attainment() / attainable_ceiling.max(1e-12),
            ttft_attainment: s.met_ttft as f64 / n,
            tpot_attainment: s.met_tpot as f64 / n,
            short_prompt_attainment: short,
            long_prompt_attainment: long,
            ttft_p50_s: s.ttft.quantile(0.50),
            ttft_p95_s: s.ttft.quantile(0.95),
            ttft_p99_s: s.ttft.quantile(0.99),
            itl_p50_s: s.itl.quantile(0.50),
            itl_p95_s: s.itl.quantile(0.95),
            itl_p99_s: s.itl.quantile(0.99),
            tpot_p95_s: s.tpot.quantile(0.95),
            gpu_hours: out.gpu_hours,
            gpu_hours_vs_lower_bound: None,
            lower_bound_extrapolated: false,
            beats_lower_bound: false,
            mean_replicas: out.gpu_hours / hours / f64::from(gpus_per_replica.max(1)),
            scale_events: out.scale_events.len(),
            scale_events_per_hour: out.scale_events.len() as f64 / hours,
            oscillations: out.oscillations(OSCILLATION_WINDOW_S),
            requests_dropped: s.dropped,
            max_queue: out.max_queue,
            cold_starts: out.replicas_created.saturating_sub(initial_replicas),
            wall_s: out.wall_s,
            sim_requests_per_s: s.arrivals as f64 / out.wall_s.max(1e-9),
            parameters: out.parameters.clone(),
        }
    }

    /// `policy` with its target, for tables.
    pub fn label(&self) -> String {
        match self.target {
            Some(t) => format!("{} [{}]", self.policy, fmt_target(t)),
            None => self.policy.clone(),
        }
    }

    pub(crate) fn is_lower_bound(&self) -> bool {
        self.policy == LOWER_BOUND
    }

    /// Static provisioning, chosen in hindsight: reported apart from the
    /// dynamic baselines.
    pub(crate) fn is_static(&self) -> bool {
        self.policy == STATIC
    }
}

/// The lower bound's frontier on one trace: its points `(attainment,
/// GPU-hours)`, cheapest first, each reaching more than the one before.
#[derive(Debug, Clone, PartialEq)]
pub struct Frontier {
    points: Vec<(f64, f64)>,
}

impl Frontier {
    /// The frontier of the lower-bound rows of `trace` (`None` without any).
    pub fn of(reports: &[PolicyReport], trace: &str) -> Option<Self> {
        let mut pts: Vec<(f64, f64)> = reports
            .iter()
            .filter(|r| r.is_lower_bound() && r.trace == trace)
            .map(|r| (r.slo_attainment, r.gpu_hours))
            .collect();
        pts.sort_by(|a, b| a.1.total_cmp(&b.1).then(b.0.total_cmp(&a.0)));
        // Keep the points no cheaper point matches in attainment.
        let mut points: Vec<(f64, f64)> = Vec::new();
        for p in pts {
            if points.last().is_none_or(|l| p.0 > l.0) {
                points.push(p);
            }
        }
        (!points.is_empty()).then_some(Self { points })
    }

    pub fn points(&self) -> &[(f64, f64)] {
        &self.points
    }

    /// The bound's GPU-hours at `attainment`, linear between points;
    /// outside the frontier, its nearest end point (and `true`).
    pub(crate) fn gpu_hours_at(&self, attainment: f64) -> (f64, bool) {
        let first = self.points[0];
        let last = self.points[self.points.len() - 1];
        if attainment <= first.0 {
            return (first.1, attainment < first.0);
        }
        if attainment >= last.0 {
            return (last.1, attainment > last.0);
        }
        for w in self.points.windows(2) {
            let (a, b) = (w[0], w[1]);
            if attainment <= b.0 {
                let f = (attainment - a.0) / (b.0 - a.0).max(1e-12);
                return (a.1 + f * (b.1 - a.1), false);
            }
        }
        (last.1, false)
    }

    /// Whether a run with `attainment` and `gpu_hours` reaches a point's
    /// attainment with fewer GPU-hours.
    pub(crate) fn beaten_by(&self, attainment: f64, gpu_hours: f64) -> bool {
        self.points
            .iter()
            .any(|&(a, g)| attainment >= a && gpu_hours < g * (1.0 - 1e-9))
    }
}

/// Fill `gpu_hours_vs_lower_bound` and `beats_lower_bound` of every report
/// from the lower-bound rows of its trace.
pub(crate) fn relate_to_lower_bound(reports: &mut [PolicyReport]) {
    let mut traces: Vec<String> = reports.iter().map(|r| r.trace.clone()).collect();
    traces.sort();
    traces.dedup();
    for trace in traces {
        let Some(frontier) = Frontier::of(reports, &trace) else {
            continue;
        };
        for r in reports.iter_mut().filter(|r| r.trace == trace) {
            let (bound, outside) = frontier.gpu_hours_at(r.slo_attainment);
            if bound > 0.0 {
                r.gpu_hours_vs_lower_bound = Some(r.gpu_hours / bound);
            }
            r.lower_bound_extrapolated = outside;
            r.beats_lower_bound =
                !r.is_lower_bound() && frontier.beaten_by(r.slo_attainment, r.gpu_hours);
        }
    }
}

fn fmt_target(t: f64) -> String {
    if t == t.round() && t.abs() < 1e6 {
        format!("{t:.0}")
    } else if t.abs() >= 10.0 {
        format!("{t:.1}")
    } else {
        format!("{t:.2}")
    }
}

fn fmt_opt_s(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{:.1}ms", v * 1000.0),
    }
}

/// A fixed-width text table.
pub fn table(reports: &[PolicyReport]) -> String {
    let mut out = String::new();
    let w = reports
        .iter()
        .map(|r| r.label().chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:w$}  {:>8} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8} {:>6} {:>5} {:>7} {:>8}",
        "policy",
        "attain",
        "ttft50",
        "ttft95",
        "itl95",
        "gpu_h",
        "x_bound",
        "replicas",
        "events",
        "osc",
        "dropped",
        "max_q"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:w$}  {:>7.2}% {:>8} {:>8} {:>9} {:>8.2} {:>9} {:>8.1} {:>6} {:>5} {:>7} {:>8}",
            r.label(),
            100.0 * r.slo_attainment,
            fmt_opt_s(r.ttft_p50_s),
            fmt_opt_s(r.ttft_p95_s),
            fmt_opt_s(r.itl_p95_s),
            r.gpu_hours,
            r.gpu_hours_vs_lower_bound.map_or_else(
                || "-".into(),
                |x| format!("{x:.2}x{}", if r.beats_lower_bound { "!" } else { "" })
            ),
            r.mean_replicas,
            r.scale_events,
            r.oscillations,
            r.requests_dropped,
            r.max_queue
        );
    }
    out
}

/// The reports as a JSON array.
pub fn json(reports: &[PolicyReport]) -> Result<String, SimError> {
    serde_json::to_string_pretty(reports).map_err(|e| SimError::Report(e.to_string()))
}

/// The reports as CSV (parameters left out).
pub fn csv(reports: &[PolicyReport]) -> String {
    let mut out = String::from(
        "trace,policy,target,requests,slo_attainment,attainable_ceiling,attainment_vs_ceiling,ttft_attainment,tpot_attainment,short_prompt_attainment,long_prompt_attainment,ttft_p50_s,ttft_p95_s,ttft_p99_s,itl_p50_s,itl_p95_s,itl_p99_s,tpot_p95_s,gpu_hours,gpu_hours_vs_lower_bound,beats_lower_bound,mean_replicas,scale_events,oscillations,requests_dropped,max_queue,cold_starts\n",
    );
    let o = |v: Option<f64>| v.map_or_else(String::new, |x| format!("{x:.6}"));
    for r in reports {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{},{},{},{},{},{},{},{},{},{:.4},{},{},{:.3},{},{},{},{},{}",
            r.trace,
            r.policy,
            r.target.map_or_else(String::new, |t| format!("{t}")),
            r.requests,
            r.slo_attainment,
            r.attainable_ceiling,
            r.attainment_vs_ceiling,
            r.ttft_attainment,
            r.tpot_attainment,
            o(r.short_prompt_attainment),
            o(r.long_prompt_attainment),
            o(r.ttft_p50_s),
            o(r.ttft_p95_s),
            o(r.ttft_p99_s),
            o(r.itl_p50_s),
            o(r.itl_p95_s),
            o(r.itl_p99_s),
            o(r.tpot_p95_s),
            r.gpu_hours,
            o(r.gpu_hours_vs_lower_bound),
            r.beats_lower_bound,
            r.mean_replicas,
            r.scale_events,
            r.oscillations,
            r.requests_dropped,
            r.max_queue,
            r.cold_starts
        );
    }
    out
}
