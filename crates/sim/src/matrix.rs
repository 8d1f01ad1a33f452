//! The robustness matrix: gpuscale against the lower bound and every
//! baseline over the suite's traces, three performance profiles, four
//! latency objectives and three cold starts.
//!
//! A full factorial (4 × 3 × 4 × 3 = 144 comparisons of some 80 runs each)
//! is out of reach of one machine, so the matrix varies **one factor at a
//! time** around each trace's suite setting: the base cell, then each other
//! profile, each other objective and each other cold start (9 cells per
//! trace, 36 in all). Every cell is a whole comparison, as in the suite:
//! gpuscale, the lower bound's frontier, every baseline over its sweep and
//! static provisioning bisected to gpuscale's attainment.
//!
//! **Profiles**: the 8B H200 preset, the 70B TP4 H100 preset (Splitwise)
//! and the 70B TP4 A100 preset (Splitwise's A100 runs). **Objectives**, all
//! derived from the profile (`t` its decode step at batch 1 and a 2,048-token
//! context, `p` its prefill): the suite's; *tight* TPOT `2.5·t`, TTFT
//! `max(0.5 s, 4·p(2048))`; *loose* TPOT `8·t`, TTFT 5× the tight one;
//! *length-aware* TPOT `4·t`, TTFT 0.5 s plus twice the profile's prefill
//! time per token at 8,192 tokens, per prompt token. **Cold starts** 30, 90
//! and 240 s. The request traces are rate-scaled as in the suite (the lower
//! bound's busiest 10 s window needs about 20 replicas); the ServeGen series
//! so that its busiest minute needs 33 replicas at the profile's capacity at
//! the SLO (what 100 requests/s needs on the 70B H100 profile), one day of
//! it unless told otherwise.
//!
//! Per cell the verdicts of the policy issue: attainment against
//! `min(99%, ceiling − 0.5 pp)`; GPU-hours against the lower bound at the
//! same attainment (≤ 1.15); against the cheapest baseline setting within
//! 0.2 pp of gpuscale's attainment (≤ 0.85, or ≤ 1 where even the lower
//! bound needs more than 0.75 of it); and whether any baseline setting
//! dominates gpuscale (as good attainment, fewer GPU-hours).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use gpuscale_policy::PerfModel;
use serde::Serialize;

use crate::error::SimError;
use crate::profile::resolve_profile;
use crate::report::{self, PolicyReport};
use crate::suite::{self, SAME_ATTAINMENT, Scaling, SuiteOptions, SuiteWorkload};

/// The matrix's performance profiles.
pub(crate) const PROFILES: &[&str] = &[
    "h200-llama3-8b-bf16",
    "h100-llama2-70b-tp4",
    "a100-llama2-70b-tp4",
];

/// The matrix's cold starts, seconds.
pub(crate) const COLD_STARTS: &[f64] = &[30.0, 90.0, 240.0];

/// Days of the ServeGen series the matrix replays unless told otherwise.
pub(crate) const DEFAULT_MATRIX_DAYS: f64 = 1.0;

/// The busiest minute of a rate series needs this many replicas at the
/// profile's capacity (as 100 requests/s does on the 70B H100 profile).
const SERIES_PEAK_REPLICAS: f64 = 33.0;

/// Which latency objectives a cell uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    Suite,
    Tight,
    Loose,
    LengthAware,
}

impl Objective {
    pub const ALL: [Objective; 4] = [
        Objective::Suite,
        Objective::Tight,
        Objective::Loose,
        Objective::LengthAware,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Suite => "suite",
            Objective::Tight => "tight",
            Objective::Loose => "loose",
            Objective::LengthAware => "length-aware",
        }
    }

    /// `(TTFT s, TTFT s per prompt token, TPOT s)` on `perf`, given the
    /// trace's suite objectives.
    pub fn values(self, perf: &PerfModel, base: &SuiteWorkload) -> (f64, f64, f64) {
        let step = perf.decode_step_s(1.0, 2048.0);
        let tight_ttft = (4.0 * perf.prefill_s(2048.0)).max(0.5);
        match self {
            Objective::Suite => (base.ttft_s, base.ttft_per_input_token_s, base.itl_s),
            Objective::Tight => (tight_ttft, 0.0, 2.5 * step),
            Objective::Loose => (5.0 * tight_ttft, 0.0, 8.0 * step),
            Objective::LengthAware => {
                let per_token = 2.0 * perf.prefill_s(8192.0) / 8192.0;
                (0.5, per_token, 4.0 * step)
            }
        }
    }
}

/// One cell: a trace with one factor moved away from its suite setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    pub trace: String,
    pub profile: String,
    pub objective: Objective,
    pub cold_start_s: f64,
    /// Which factor this cell varies (`base`, `profile`, `objective`, `cold-start`).
    pub varies: &'static str,
}

impl Cell {
    /// A short, unique name (`conv/h100-llama2-70b-tp4/suite/90s`).
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}/{:.0}s",
            self.trace,
            self.profile,
            self.objective.as_str(),
            self.cold_start_s
        )
    }
}

/// The cells of the suite workloads `only` names (all when empty).
pub fn cells(only: &[String]) -> Vec<(SuiteWorkload, Cell)> {
    let mut out = Vec::new();
    for w in suite::workloads() {
        if !only.is_empty() && !only.contains(&w.key) {
            continue;
        }
        let base = Cell {
            trace: w.key.clone(),
            profile: w.profile.clone(),
            objective: Objective::Suite,
            cold_start_s: w.cold_start_s,
            varies: "base",
        };
        out.push((w.clone(), base.clone()));
        for p in PROFILES.iter().filter(|p| **p != w.profile) {
            out.push((
                w.clone(),
                Cell {
                    profile: (*p).to_string(),
                    varies: "profile",
                    ..base.clone()
                },
            ));
        }
        for o in Objective::ALL.iter().filter(|o| **o != Objective::Suite) {
            out.push((
                w.clone(),
                Cell {
                    objective: *o,
                    varies: "objective",
                    ..base.clone()
                },
            ));
        }
        for c in COLD_STARTS.iter().filter(|c| **c != w.cold_start_s) {
            out.push((
                w.clone(),
                Cell {
                    cold_start_s: *c,
                    varies: "cold-start",
                    ..base.clone()
                },
            ));
        }
    }
    out
}

/// The workload a cell runs.
fn workload(w: &SuiteWorkload, cell: &Cell) -> Result<SuiteWorkload, SimError> {
    let perf = resolve_profile(&cell.profile)?;
    let (ttft_s, per_token, itl_s) = cell.objective.values(&perf, w);
    let scaling = match w.scaling {
        Scaling::PeakRps(_) | Scaling::PeakCapacity(_) => {
            Scaling::PeakCapacity(SERIES_PEAK_REPLICAS)
        }
        s @ Scaling::PeakReplicas(_) => s,
    };
    Ok(SuiteWorkload {
        key: cell.id(),
        title: format!("{} ({})", w.title, cell.id()),
        profile: cell.profile.clone(),
        ttft_s,
        ttft_per_input_token_s: per_token,
        itl_s,
        cold_start_s: cell.cold_start_s,
        scaling,
        ..w.clone()
    })
}

/// What the policy issue asks of gpuscale in one cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub cell: Cell,
    pub attainment: f64,
    pub ceiling: f64,
    /// `min(99%, ceiling − 0.5 pp)`.
    pub attainment_floor: f64,
    pub gpu_hours: f64,
    pub x_lower_bound: Option<f64>,
    /// The cheapest baseline setting within 0.2 pp of gpuscale's attainment.
    pub cheapest_within: Option<String>,
    pub x_cheapest: Option<f64>,
    /// The lower bound at gpuscale's attainment over that setting's GPU-hours.
    pub bound_x_cheapest: Option<f64>,
    /// Baseline settings with as good an attainment and fewer GPU-hours.
    pub dominated_by: Vec<String>,
}

impl Verdict {
    pub(crate) fn attainment_met(&self) -> bool {
        self.attainment >= self.attainment_floor
    }

    pub(crate) fn bound_met(&self) -> bool {
        self.x_lower_bound.is_some_and(|x| x <= 1.15)
    }

    /// `≤ 0.85` of the cheapest baseline within 0.2 pp, or `≤ 1` where even
    /// the lower bound needs more than 0.75 of it; met when no baseline
    /// comes within 0.2 pp.
    pub(crate) fn baseline_met(&self) -> bool {
        match (self.x_cheapest, self.bound_x_cheapest) {
            (Some(x), Some(b)) if b > 0.75 => x <= 1.0,
            (Some(x), _) => x <= 0.85,
            (None, _) => true,
        }
    }

    /// Gpuscale's row and the verdict of a cell's reports.
    pub fn of(cell: &Cell, reports: &[PolicyReport]) -> Option<Verdict> {
        let ours = reports.iter().find(|r| r.policy == "gpuscale")?;
        let baselines = || {
            reports
                .iter()
                .filter(|r| r.policy != "gpuscale" && !r.is_lower_bound())
        };
        let cheapest = baselines()
            .filter(|r| r.slo_attainment >= ours.slo_attainment - SAME_ATTAINMENT)
            .min_by(|a, b| a.gpu_hours.total_cmp(&b.gpu_hours));
        let frontier = report::Frontier::of(reports, &ours.trace);
        let bound_at_ours = frontier
            .as_ref()
            .map(|f| f.gpu_hours_at(ours.slo_attainment).0);
        Some(Verdict {
            cell: cell.clone(),
            attainment: ours.slo_attainment,
            ceiling: ours.attainable_ceiling,
            attainment_floor: 0.99_f64.min(ours.attainable_ceiling - 0.005),
            gpu_hours: ours.gpu_hours,
            x_lower_bound: ours.gpu_hours_vs_lower_bound,
            cheapest_within: cheapest.map(PolicyReport::label),
            x_cheapest: cheapest.map(|c| ours.gpu_hours / c.gpu_hours.max(1e-12)),
            bound_x_cheapest: match (bound_at_ours, cheapest) {
                (Some(b), Some(c)) => Some(b / c.gpu_hours.max(1e-12)),
                _ => None,
            },
            dominated_by: baselines()
                .filter(|r| r.slo_attainment >= ours.slo_attainment && r.gpu_hours < ours.gpu_hours)
                .map(PolicyReport::label)
                .collect(),
        })
    }
}

/// The matrix's results.
#[derive(Debug, Clone)]
pub struct MatrixResult {
    pub verdicts: Vec<Verdict>,
    pub reports: Vec<PolicyReport>,
    pub wall_s: f64,
}

/// Run the cells of `only` (all traces when empty); writes `results.csv`,
/// `results.json`, `verdicts.json` and `summary.md` into `opts.out_dir`.
pub(crate) fn run_matrix(
    opts: &SuiteOptions,
    on_done: &(dyn Fn(&str, usize, usize, &str) + Sync),
) -> Result<MatrixResult, SimError> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| SimError::Io {
        path: opts.out_dir.clone(),
        source,
    })?;
    let mut verdicts = Vec::new();
    let mut all = Vec::new();
    for (w, cell) in cells(&opts.only) {
        let cw = workload(&w, &cell)?;
        let reports = suite::compare(&cw, opts, on_done)?.reports;
        if let Some(v) = Verdict::of(&cell, &reports) {
            verdicts.push(v);
        }
        all.extend(reports);
        // Written as it goes: a long matrix keeps what it has done.
        write(opts.out_dir.join("results.csv"), &report::csv(&all))?;
        write(
            opts.out_dir.join("summary.md"),
            &summary_markdown(&verdicts, started.elapsed().as_secs_f64()),
        )?;
    }
    write(opts.out_dir.join("results.json"), &report::json(&all)?)?;
    write(
        opts.out_dir.join("verdicts.json"),
        &serde_json::to_string_pretty(&verdicts).map_err(|e| SimError::Report(e.to_string()))?,
    )?;
    Ok(MatrixResult {
        verdicts,
        reports: all,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

fn write(path: PathBuf, text: &str) -> Result<(), SimError> {
    std::fs::write(&path, text).map_err(|source| SimError::Io { path, source })
}

fn mark(ok: bool) -> &'static str {
    if ok { "" } else { " ✗" }
}

/// The matrix as a markdown table, one row per cell, and the count of
/// cells where each target holds.
pub(crate) fn summary_markdown(verdicts: &[Verdict], wall_s: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| trace | varies | profile | objective | cold start | attainment (floor) | ceiling | × lower bound | cheapest baseline within 0.2 pp | × it | dominated by |"
    );
    let _ = writeln!(out, "|---|---|---|---|---:|---:|---:|---:|---|---:|---|");
    for v in verdicts {
        let c = &v.cell;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} s | {:.2}% ({:.2}%){} | {:.2}% | {}{} | {} | {}{} | {} |",
            c.trace,
            c.varies,
            c.profile,
            c.objective.as_str(),
            c.cold_start_s,
            100.0 * v.attainment,
            100.0 * v.attainment_floor,
            mark(v.attainment_met()),
            100.0 * v.ceiling,
            v.x_lower_bound
                .map_or_else(|| "–".into(), |x| format!("{x:.2}")),
            mark(v.bound_met()),
            v.cheapest_within.as_deref().unwrap_or("none"),
            v.x_cheapest
                .map_or_else(|| "–".into(), |x| format!("{x:.2}")),
            mark(v.baseline_met()),
            if v.dominated_by.is_empty() {
                "–".to_string()
            } else {
                v.dominated_by.join(", ")
            }
        );
    }
    let n = verdicts.len();
    let count = |f: &dyn Fn(&Verdict) -> bool| verdicts.iter().filter(|v| f(v)).count();
    let _ = writeln!(
        out,
        "\nOf {n} cells: attainment floor met in {}, ≤ 1.15× the lower bound in {}, the baseline target met in {}, dominated by no baseline setting in {}. Matrix wall time {:.0} s.",
        count(&Verdict::attainment_met),
        count(&Verdict::bound_met),
        count(&Verdict::baseline_met),
        count(&|v: &Verdict| v.dominated_by.is_empty()),
        wall_s
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trace_gets_a_base_cell_and_one_cell_per_other_setting_of_each_factor() {
        let all = cells(&[]);
        assert_eq!(all.len(), 4 * 8);
        let conv: Vec<&Cell> = all
            .iter()
            .filter(|(_, c)| c.trace == "conv")
            .map(|(_, c)| c)
            .collect();
        assert_eq!(conv.iter().filter(|c| c.varies == "base").count(), 1);
        assert_eq!(conv.iter().filter(|c| c.varies == "profile").count(), 2);
        assert_eq!(conv.iter().filter(|c| c.varies == "objective").count(), 3);
        assert_eq!(conv.iter().filter(|c| c.varies == "cold-start").count(), 2);
        let ids: std::collections::BTreeSet<String> = all.iter().map(|(_, c)| c.id()).collect();
        assert_eq!(ids.len(), all.len(), "cell ids are unique");
    }

    #[test]
    fn objectives_follow_the_profile() {
        let w = suite::workloads().remove(0);
        let small = resolve_profile("h200-llama3-8b-bf16").expect("preset");
        let big = resolve_profile("h100-llama2-70b-tp4").expect("preset");
        let (_, _, tight_small) = Objective::Tight.values(&small, &w);
        let (_, _, tight_big) = Objective::Tight.values(&big, &w);
        assert!(tight_big > tight_small, "{tight_big} vs {tight_small}");
        let (_, per_token, _) = Objective::LengthAware.values(&small, &w);
        assert!(per_token > 0.0);
        assert_eq!(Objective::Suite.values(&big, &w).2, w.itl_s);
    }
}
