//! Reports: one row per policy run, as a table, JSON or CSV.
//!
//! `slo_attainment` is the fraction of requests that met both SLOs (TTFT
//! within its threshold and the request's mean inter-token latency within
//! its threshold; dropped requests are misses). `itl_p95_s` is the 95th
//! percentile of every inter-token gap (token-weighted), `tpot_p95_s` the
//! 95th percentile of per-request mean inter-token latency.
//! `oscillations` counts direction reversals of consecutive scale events
//! less than 5 minutes apart.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::error::SimError;
use crate::run::RunOutcome;

/// Oscillation window, seconds.
pub const OSCILLATION_WINDOW_S: f64 = 300.0;

/// One policy's results.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    /// `gpuscale`, `oracle`, or the baseline's name.
    pub policy: String,
    /// The swept target of a baseline run (its meaning depends on the baseline).
    pub target: Option<f64>,
    pub trace: String,
    pub requests: u64,
    pub slo_attainment: f64,
    pub ttft_attainment: f64,
    pub itl_attainment: f64,
    pub ttft_p50_s: Option<f64>,
    pub ttft_p95_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    pub itl_p50_s: Option<f64>,
    pub itl_p95_s: Option<f64>,
    pub itl_p99_s: Option<f64>,
    pub tpot_p95_s: Option<f64>,
    pub gpu_hours: f64,
    /// GPU-hours over the oracle's on the same trace (`None` without an oracle run).
    pub gpu_hours_vs_oracle: Option<f64>,
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
    /// `gpus_per_replica` to turn GPU-hours into replicas.
    pub fn from_outcome(
        out: &RunOutcome,
        trace: &str,
        target: Option<f64>,
        duration_s: f64,
        gpus_per_replica: u32,
        initial_replicas: u32,
    ) -> Self {
        let s = &out.stats;
        let n = s.arrivals.max(1) as f64;
        let hours = (duration_s / 3600.0).max(1e-9);
        Self {
            policy: out.policy.clone(),
            target,
            trace: trace.to_string(),
            requests: s.arrivals,
            slo_attainment: s.attainment(),
            ttft_attainment: s.met_ttft as f64 / n,
            itl_attainment: s.met_itl as f64 / n,
            ttft_p50_s: s.ttft.quantile(0.50),
            ttft_p95_s: s.ttft.quantile(0.95),
            ttft_p99_s: s.ttft.quantile(0.99),
            itl_p50_s: s.itl.quantile(0.50),
            itl_p95_s: s.itl.quantile(0.95),
            itl_p99_s: s.itl.quantile(0.99),
            tpot_p95_s: s.tpot.quantile(0.95),
            gpu_hours: out.gpu_hours,
            gpu_hours_vs_oracle: None,
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
}

/// Fill `gpu_hours_vs_oracle` of every report of a trace from its oracle row.
pub fn relate_to_oracle(reports: &mut [PolicyReport]) {
    let oracles: Vec<(String, f64)> = reports
        .iter()
        .filter(|r| r.policy == "oracle")
        .map(|r| (r.trace.clone(), r.gpu_hours))
        .collect();
    for r in reports.iter_mut() {
        if let Some((_, g)) = oracles.iter().find(|(t, _)| *t == r.trace)
            && *g > 0.0
        {
            r.gpu_hours_vs_oracle = Some(r.gpu_hours / g);
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
        "x_oracle",
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
            r.gpu_hours_vs_oracle
                .map_or_else(|| "-".into(), |x| format!("{x:.2}x")),
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
        "trace,policy,target,requests,slo_attainment,ttft_attainment,itl_attainment,ttft_p50_s,ttft_p95_s,ttft_p99_s,itl_p50_s,itl_p95_s,itl_p99_s,tpot_p95_s,gpu_hours,gpu_hours_vs_oracle,mean_replicas,scale_events,oscillations,requests_dropped,max_queue,cold_starts\n",
    );
    let o = |v: Option<f64>| v.map_or_else(String::new, |x| format!("{x:.6}"));
    for r in reports {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.6},{:.6},{:.6},{},{},{},{},{},{},{},{:.4},{},{:.3},{},{},{},{},{}",
            r.trace,
            r.policy,
            r.target.map_or_else(String::new, |t| format!("{t}")),
            r.requests,
            r.slo_attainment,
            r.ttft_attainment,
            r.itl_attainment,
            o(r.ttft_p50_s),
            o(r.ttft_p95_s),
            o(r.ttft_p99_s),
            o(r.itl_p50_s),
            o(r.itl_p95_s),
            o(r.itl_p99_s),
            o(r.tpot_p95_s),
            r.gpu_hours,
            o(r.gpu_hours_vs_oracle),
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
