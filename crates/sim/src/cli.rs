//! `gpuscale sim`: the command line of the simulator.
//!
//! Flag errors name the flag, the value and what is allowed
//! ([`SimError::is_usage`] → exit code 2).

use crate::report::PolicyReport;
use crate::run::RunOutcome;
use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use gpuscale_policy::WorkloadSpec;

use crate::baselines::{self, BASELINE_NAMES, BaselineContext};
use crate::chart::{ChartSeries, render};
use crate::compare::{Comparison, PolicyChoice};
use crate::error::SimError;
use crate::fleet::{ColdStart, FleetConfig, VictimOrder};
use crate::gpuscale::{GpuscaleOptions, default_spec};
use crate::profile::{default_cold_start_s, resolve_profile};
use crate::report;
use crate::run::RunConfig;
use crate::stats::Slo;
use crate::suite::{SuiteOptions, run_suite};
use crate::trace::{self, ArrivalProcess, SizePool, Trace, TraceFormat, Workload, WorkloadOptions};

/// Replay a request trace against a simulated GPU fleet, driven by gpuscale,
/// a baseline autoscaler or the lower bound; report SLO attainment and GPU-hours.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Request trace: Azure 2023 CSV, JSONL (timestamp ms, input_length,
    /// output_length) or a rate series (window_start_s,total_rate_rps,...).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["suite", "matrix", "scale_to_zero"])]
    pub trace: Option<PathBuf>,
    /// Trace format, detected from the file when not given: azure, jsonl, rate.
    #[arg(long, value_name = "FORMAT")]
    pub trace_format: Option<String>,
    /// Request sizes to draw from when the trace is a rate series (Azure CSV or JSONL).
    #[arg(long, value_name = "FILE")]
    pub sizes: Option<PathBuf>,
    /// Arrivals inside rate-series windows: poisson, or gamma (the series' CV).
    #[arg(long, default_value = "poisson", value_name = "PROCESS")]
    pub arrivals: String,
    /// Largest inter-arrival CV used for gamma arrivals.
    #[arg(long, default_value_t = 4.0, value_name = "CV")]
    pub max_cv: f64,
    /// Performance profile: a preset name, a JSON model or a gpuscale profile CSV.
    #[arg(
        long,
        default_value = "h200-llama3-8b-bf16",
        value_name = "PRESET|FILE"
    )]
    pub profile: String,
    /// Policies, comma-separated: gpuscale, lower-bound, all, or baselines by name
    /// (static, hpa-gpu-util, keda-waiting, kserve-running, knative-kpa,
    /// aibrix-kpa-mean, aibrix-kpa-total, aibrix-apa, wva, llmd-slo,
    /// dynamo-sla-c, dynamo-sla-nc, dynamo-load, dynamo-easy-throughput,
    /// dynamo-easy-latency, aws).
    #[arg(long, default_value = "gpuscale,lower-bound", value_name = "LIST")]
    pub policy: String,
    /// Run each baseline over its sweep of targets instead of its default.
    #[arg(long)]
    pub sweep: bool,
    /// Target of the baseline(s) (meaning per baseline; see docs/simulator.md).
    #[arg(long, value_name = "X")]
    pub target: Option<f64>,
    /// gpuscale's workload spec (YAML or JSON, the custom resource's `spec`).
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// TTFT SLO (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub ttft_slo: String,
    /// Length-aware TTFT: extra TTFT allowed per prompt token (e.g. 40us);
    /// a request's TTFT objective is then `--ttft-slo` plus this times its
    /// prompt length.
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    pub ttft_per_input_token: String,
    /// Time per output token of each request (the `itl` objective, e.g. 50ms).
    #[arg(long, default_value = "50ms", value_name = "DURATION")]
    pub itl_slo: String,
    /// Percentile the SLOs are stated at, for gpuscale's spec (with --suite
    /// or --matrix, for every workload's); every policy is judged by the
    /// share of requests that met the objectives.
    #[arg(long, default_value_t = crate::suite::DEFAULT_SUITE_PERCENTILE, value_name = "P")]
    pub slo_percentile: f64,
    /// Multiply the arrival rate, keeping the duration.
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub rate_scale: f64,
    /// Stretch the timeline (2 = twice as long at half the rate).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub time_scale: f64,
    /// Replay only the first part of the trace (e.g. 2h).
    #[arg(long, value_name = "DURATION")]
    pub duration: Option<String>,
    /// Replica cold start (default: the spec's `coldStartSeconds` with --spec,
    /// else 90s for one-GPU profiles and 240s for multi-GPU ones).
    #[arg(long, value_name = "DURATION")]
    pub cold_start: Option<String>,
    /// Extra cold-start spread: each replica draws uniformly in [cold start, cold start + spread].
    #[arg(long, value_name = "DURATION")]
    pub cold_start_spread: Option<String>,
    /// Time a new replica waits for a GPU node before loading.
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    pub pending: String,
    /// Lower replica bound of every policy.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min_replicas: u32,
    /// Upper replica bound (default: 4 × the static peak count).
    #[arg(long, value_name = "N")]
    pub max_replicas: Option<u32>,
    /// Replicas ready at time 0 (default: sized for the first minutes).
    #[arg(long, value_name = "N")]
    pub initial_replicas: Option<u32>,
    /// The lower bound's frontier targets, comma-separated shares (0..=1]
    /// of the attainment its curves can reach (see docs/simulator.md).
    #[arg(long, value_name = "LIST")]
    pub bound_targets: Option<String>,
    /// Seed of every random draw (arrivals, scaling, cold starts).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Report format: table, json, csv.
    #[arg(long, default_value = "table", value_name = "FORMAT")]
    pub report: String,
    /// Write the report (or, with --suite, the results) here instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Write an SVG chart of arrivals, replicas and attainment over time.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// Write every policy's time series as CSV: per chart bucket (see
    /// --chart) the requests that arrived, finished and met the SLO, and the
    /// desired and ready replicas.
    #[arg(long, value_name = "FILE.csv")]
    pub series: Option<PathBuf>,
    /// Write gpuscale's decisions as JSON lines (every change, and one a minute).
    #[arg(long, value_name = "FILE")]
    pub decision_log: Option<PathBuf>,
    /// Run the benchmark suite (Azure code, Azure conversation, Mooncake, ServeGen).
    #[arg(long)]
    pub suite: bool,
    /// The robustness matrix: each suite trace with one factor varied at a
    /// time (profile, objective, cold start); see docs/simulator.md. Writes
    /// summary.md, verdicts.json and results.{csv,json} under --out
    /// (default target/sim-matrix).
    #[arg(long, conflicts_with = "suite")]
    pub matrix: bool,
    /// Scale to zero on a sparse multi-model workload built from the Azure
    /// traces under --data-dir: one replica per model, gpuscale with
    /// `minReplicas: 0` and Knative's KPA with scale to zero (GPU-hours,
    /// cold-start hits, p95 TTFT after idle); --duration is the horizon
    /// (default 6h). See docs/simulator.md.
    #[arg(long, conflicts_with_all = ["suite", "matrix"])]
    pub scale_to_zero: bool,
    /// Models of the --scale-to-zero workload.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub zero_models: usize,
    /// The suite's (or the matrix's) workloads, comma-separated (code, conv,
    /// mooncake, servegen; default all).
    #[arg(long, value_name = "LIST")]
    pub suite_only: Option<String>,
    /// Days of the suite's ServeGen series to replay (default 2, which keeps
    /// the suite to about 8 minutes on two cores; 14 is the whole series,
    /// about 32 minutes there).
    #[arg(long, value_name = "DAYS")]
    pub suite_days: Option<f64>,
    /// The repository's data directory (traces and profiles) for the suite.
    #[arg(long, default_value = "data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Runs in parallel (default: available cores).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
}

/// Parse a duration (`40us`, `50ms`, `2s`, `1.5m`, `2h`, `1d`: the units of
/// [`gpuscale_core::time::parse_duration`]) or a plain number of seconds, in
/// seconds; the error names `flag`.
pub fn parse_duration(flag: &str, s: &str) -> Result<f64, SimError> {
    let allowed = "a duration >= 0 such as 40us, 50ms, 2s, 1.5m, 2h or 1d";
    let secs = match s.trim().parse::<f64>() {
        Ok(v) => v,
        Err(_) => gpuscale_core::time::parse_duration(s)
            .map_err(|_| SimError::config(flag, s, allowed))?
            .as_secs_f64(),
    };
    if secs.is_finite() && secs >= 0.0 {
        Ok(secs)
    } else {
        Err(SimError::config(flag, s, allowed))
    }
}

fn progress_line(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{msg}");
    }
}

fn bar(frac: f64) -> String {
    let n = (frac.clamp(0.0, 1.0) * 30.0).round() as usize;
    format!(
        "[{}{}] {:3.0}%",
        "#".repeat(n),
        "-".repeat(30 - n),
        frac * 100.0
    )
}

pub(crate) fn emit(text: &str, out: Option<&PathBuf>) -> Result<(), SimError> {
    match out {
        Some(p) => std::fs::write(p, text).map_err(|source| SimError::Io {
            path: p.clone(),
            source,
        }),
        None => stdout(text),
    }
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an
/// error.
fn stdout(text: &str) -> Result<(), SimError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(SimError::Io {
            path: PathBuf::from("<stdout>"),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Run `gpuscale sim`.
pub fn run(args: SimArgs) -> Result<(), SimError> {
    let jobs = match args.jobs {
        Some(0) => return Err(SimError::config("--jobs", 0, "at least 1")),
        Some(j) => j,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let format = args.report.as_str();
    if !matches!(format, "table" | "json" | "csv") {
        return Err(SimError::config("--report", format, "table, json, csv"));
    }
    if args.suite || args.matrix {
        return run_suite_command(&args, jobs);
    }
    let slo = slo_of(&args)?;
    if args.scale_to_zero {
        return crate::zero::run_command(&args, slo, jobs);
    }
    let bound_targets = parse_bound_targets(args.bound_targets.as_deref())?;
    let arrivals = match args.arrivals.as_str() {
        "poisson" => ArrivalProcess::Poisson,
        "gamma" if args.max_cv.is_finite() && args.max_cv > 0.0 => ArrivalProcess::Gamma {
            max_cv: args.max_cv,
        },
        "gamma" => return Err(SimError::config("--max-cv", args.max_cv, "a number > 0")),
        other => return Err(SimError::config("--arrivals", other, "poisson, gamma")),
    };
    let trace_format = args
        .trace_format
        .as_deref()
        .map(TraceFormat::parse)
        .transpose()?;
    let Some(trace_path) = args.trace.as_ref() else {
        return Err(SimError::config("--trace", "(none)", "a trace file"));
    };
    let perf = resolve_profile(&args.profile)?;
    let tr = trace::read_trace(trace_path, trace_format)?;
    let sizes = sizes_of(&tr, &args)?;
    let horizon_s = args
        .duration
        .as_deref()
        .map(|d| parse_duration("--duration", d))
        .transpose()?;
    let workload = Workload::new(
        &tr,
        sizes,
        &WorkloadOptions {
            rate_scale: args.rate_scale,
            time_scale: args.time_scale,
            horizon_s,
            arrivals,
            seed: args.seed,
        },
    )?;
    // The fleet's cold start: the flag, else the spec's estimate, else the profile's default.
    let spec_file = args.spec.as_ref().map(load_spec).transpose()?;
    let cold = match (&args.cold_start, &spec_file) {
        (Some(c), _) => parse_duration("--cold-start", c)?,
        (None, Some(spec)) => spec.cold_start_seconds,
        (None, None) => default_cold_start_s(&perf),
    };
    let cold_start = match &args.cold_start_spread {
        Some(s) => {
            let spread = parse_duration("--cold-start-spread", s)?;
            ColdStart::Uniform(cold, cold + spread)
        }
        None => ColdStart::Fixed(cold),
    };
    let pending_s = parse_duration("--pending", &args.pending)?;
    let (mean_in, mean_out) = workload.mean_sizes();
    let mut ctx = BaselineContext {
        perf: perf.clone(),
        slo,
        min_replicas: args.min_replicas.max(1),
        max_replicas: 1,
        peak_rps: workload.peak_rate(60.0),
        mean_input: mean_in,
        mean_output: mean_out,
    };
    ctx.max_replicas = match args.max_replicas {
        Some(0) => return Err(SimError::config("--max-replicas", 0, "at least 1")),
        Some(m) if m < ctx.min_replicas => {
            return Err(SimError::config(
                "--max-replicas",
                m,
                format!("at least --min-replicas ({})", ctx.min_replicas),
            ));
        }
        Some(m) => m,
        None => (4 * ctx.static_peak_replicas())
            .max(8)
            .max(ctx.min_replicas),
    };
    let lead = pending_s + cold_start.max_s();
    let initial = match args.initial_replicas {
        Some(n) => n.clamp(ctx.min_replicas, ctx.max_replicas),
        None => Comparison::initial_replicas(&workload, &ctx, lead),
    };
    let duration = workload.duration_s();
    let cmp = Comparison::new(
        workload,
        RunConfig {
            slo,
            fleet: FleetConfig {
                perf: perf.clone(),
                prefill_token_budget: 8192,
                pending_s,
                cold_start,
                drain_grace_s: Some(30.0),
                victim_order: VictimOrder::Kubernetes,
                horizon_s: duration,
                seed: args.seed,
            },
            initial_replicas: initial,
            chart_bucket_s: (duration / 400.0).max(10.0),
        },
        ctx.clone(),
    );
    let choices = policy_choices(&args, spec_file, &ctx, &perf, slo, cold, &bound_targets)?;
    let trace_name = cmp.workload.name().to_string();
    let outcomes = if choices.len() == 1 {
        let label = choices[0].label();
        let mut cb = |f: f64| progress_line(&format!("{} {label}", bar(f)));
        let out = cmp.run_one(&choices[0], Some(&mut cb))?;
        vec![out]
    } else {
        cmp.run_all(&choices, jobs, &|d, t, label| {
            progress_line(&format!(
                "{} {d}/{t} runs (last: {label})",
                bar(d as f64 / t as f64)
            ));
        })?
    };
    progress_line("");
    let reports = cmp.reports(&trace_name, &choices, &outcomes);
    let text = match format {
        "json" => report::json(&reports)? + "\n",
        "csv" => report::csv(&reports),
        _ => report::table(&reports),
    };
    emit(&text, args.out.as_ref())?;
    write_extras(&args, &reports, &outcomes, &trace_name, duration)?;
    Ok(())
}

/// The run's SLO from its flags, checked.
fn slo_of(args: &SimArgs) -> Result<Slo, SimError> {
    let slo = Slo {
        ttft_s: parse_duration("--ttft-slo", &args.ttft_slo)?,
        itl_s: parse_duration("--itl-slo", &args.itl_slo)?,
        percentile: args.slo_percentile,
        ttft_per_input_token_s: parse_duration(
            "--ttft-per-input-token",
            &args.ttft_per_input_token,
        )?,
    };
    if slo.ttft_s <= 0.0 {
        return Err(SimError::config(
            "--ttft-slo",
            &args.ttft_slo,
            "a duration > 0",
        ));
    }
    if slo.itl_s <= 0.0 {
        return Err(SimError::config(
            "--itl-slo",
            &args.itl_slo,
            "a duration > 0",
        ));
    }
    check_percentile(args.slo_percentile)?;
    Ok(slo)
}

/// The request sizes a rate series is expanded with (`--sizes`).
fn sizes_of(tr: &Trace, args: &SimArgs) -> Result<Option<SizePool>, SimError> {
    Ok(match (tr, &args.sizes) {
        (_, Some(p)) => match trace::read_trace(p, None)? {
            Trace::Requests { requests, .. } => Some(SizePool::from_requests(&requests)),
            Trace::Rate { .. } => {
                return Err(SimError::config(
                    "--sizes",
                    p.display(),
                    "a trace of requests (Azure CSV or JSONL), not a rate series",
                ));
            }
        },
        (Trace::Requests { .. }, None) => None,
        (Trace::Rate { .. }, None) => {
            return Err(SimError::config(
                "--sizes",
                "(none)",
                "a request-size trace (Azure CSV or JSONL) to expand a rate series",
            ));
        }
    })
}

/// The decision log, the series and the chart, where asked for.
fn write_extras(
    args: &SimArgs,
    reports: &[PolicyReport],
    outcomes: &[RunOutcome],
    trace_name: &str,
    duration: f64,
) -> Result<(), SimError> {
    if let Some(path) = &args.decision_log {
        let mut text = String::new();
        for o in outcomes {
            for line in &o.decision_log {
                text.push_str(line);
                text.push('\n');
            }
        }
        std::fs::write(path, text).map_err(|source| SimError::Io {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(path) = &args.series {
        let mut text = String::from("policy,t_s,arrived,done,met,desired,ready\n");
        for (r, o) in reports.iter().zip(outcomes) {
            let s = &o.stats.series;
            for (i, arrived) in s.arrivals.iter().enumerate() {
                let t = i as f64 * s.bucket_s;
                let (desired, ready) = s
                    .replicas
                    .iter()
                    .find(|x| x.0 >= t)
                    .map_or((0, 0), |x| (x.1, x.2));
                text.push_str(&format!(
                    "{},{t},{arrived},{},{},{desired},{ready}\n",
                    r.label(),
                    s.done[i],
                    s.met[i]
                ));
            }
        }
        std::fs::write(path, text).map_err(|source| SimError::Io {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(path) = &args.chart {
        let series: Vec<ChartSeries<'_>> = reports
            .iter()
            .zip(outcomes)
            .take(10)
            .map(|(r, o)| ChartSeries {
                label: format!(
                    "{} ({:.1}%, {:.1} GPU-h)",
                    r.label(),
                    100.0 * r.slo_attainment,
                    r.gpu_hours
                ),
                series: &o.stats.series,
            })
            .collect();
        let svg = render(trace_name, duration, &series);
        std::fs::write(path, svg).map_err(|source| SimError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn policy_choices(
    args: &SimArgs,
    spec_file: Option<WorkloadSpec>,
    ctx: &BaselineContext,
    perf: &gpuscale_policy::PerfModel,
    slo: Slo,
    cold: f64,
    bound_targets: &[f64],
) -> Result<Vec<PolicyChoice>, SimError> {
    let mut names: Vec<String> = Vec::new();
    for p in args
        .policy
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if p == "all" {
            names.push("gpuscale".into());
            names.push("lower-bound".into());
            names.extend(BASELINE_NAMES.iter().map(|s| (*s).to_string()));
        } else {
            names.push(p.to_string());
        }
    }
    if names.is_empty() {
        return Err(SimError::config(
            "--policy",
            &args.policy,
            "gpuscale, lower-bound, all, or baseline names, comma-separated",
        ));
    }
    let mut out = Vec::new();
    for n in names {
        match n.as_str() {
            "gpuscale" => {
                let spec = match &spec_file {
                    Some(spec) => spec.clone(),
                    None => default_spec(
                        &args.profile,
                        &slo,
                        ctx.min_replicas,
                        ctx.max_replicas,
                        cold,
                        perf.gpus_per_replica,
                    ),
                };
                out.push(PolicyChoice::Gpuscale {
                    spec: Box::new(spec),
                    model: Box::new(perf.clone()),
                    options: GpuscaleOptions {
                        record_decisions: args.decision_log.is_some(),
                        ..GpuscaleOptions::default()
                    },
                });
            }
            "lower-bound" => out.extend(
                bound_targets
                    .iter()
                    .map(|&target| PolicyChoice::LowerBound { target }),
            ),
            name => {
                // Validates the name (and target) now, with the flag in the message.
                baselines::baseline(name, args.target, ctx)?;
                if args.sweep && args.target.is_none() {
                    for t in baselines::sweep_targets(name, ctx) {
                        out.push(PolicyChoice::Baseline {
                            name: name.to_string(),
                            target: Some(t),
                        });
                    }
                } else {
                    out.push(PolicyChoice::Baseline {
                        name: name.to_string(),
                        target: args.target,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// `--bound-targets`: shares in (0, 1], ascending without duplicates.
fn parse_bound_targets(list: Option<&str>) -> Result<Vec<f64>, SimError> {
    let Some(list) = list else {
        return Ok(crate::compare::LOWER_BOUND_TARGETS.to_vec());
    };
    let mut out = Vec::new();
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match t.parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 1.0 => out.push(v),
            _ => {
                return Err(SimError::config(
                    "--bound-targets",
                    t,
                    "shares in (0, 1], comma-separated (e.g. 0.9,0.99,1)",
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(SimError::config(
            "--bound-targets",
            list,
            "at least one share in (0, 1]",
        ));
    }
    out.sort_by(f64::total_cmp);
    out.dedup();
    Ok(out)
}

/// Read gpuscale's workload spec from YAML or JSON.
pub(crate) fn load_spec(path: &PathBuf) -> Result<WorkloadSpec, SimError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.clone(),
        source,
    })?;
    let spec: WorkloadSpec = serde_yaml::from_str(&text)
        .map_err(|e| SimError::PolicySpec(format!("{}: {e}", path.display())))?;
    spec.validate()
        .map_err(|e| SimError::PolicySpec(format!("{}: {e}", path.display())))?;
    Ok(spec)
}

fn check_percentile(p: f64) -> Result<(), SimError> {
    if p > 0.0 && p < 100.0 {
        Ok(())
    } else {
        Err(SimError::config(
            "--slo-percentile",
            p,
            "a percentile strictly between 0 and 100",
        ))
    }
}

fn run_suite_command(args: &SimArgs, jobs: usize) -> Result<(), SimError> {
    let only = args
        .suite_only
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for o in &only {
        if !crate::suite::SUITE_KEYS.contains(&o.as_str()) {
            return Err(SimError::config(
                "--suite-only",
                o,
                crate::suite::SUITE_KEYS.join(", "),
            ));
        }
    }
    check_percentile(args.slo_percentile)?;
    if let Some(d) = args.suite_days
        && !(d.is_finite() && d > 0.0)
    {
        return Err(SimError::config("--suite-days", d, "a number of days > 0"));
    }
    let (default_out, default_days) = if args.matrix {
        ("target/sim-matrix", crate::matrix::DEFAULT_MATRIX_DAYS)
    } else {
        ("target/sim-suite", crate::suite::DEFAULT_SERVEGEN_DAYS)
    };
    let opts = SuiteOptions {
        data_dir: args.data_dir.clone(),
        out_dir: args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(default_out)),
        jobs,
        seed: args.seed,
        servegen_days: Some(args.suite_days.unwrap_or(default_days)),
        only,
        percentile: args.slo_percentile,
    };
    if args.matrix {
        let result = crate::matrix::run_matrix(&opts, &|cell, d, t, label| {
            progress_line(&format!(
                "{} {cell}: {d}/{t} runs (last: {label})",
                bar(d as f64 / t as f64)
            ));
        })?;
        progress_line("");
        stdout(&crate::matrix::summary_markdown(
            &result.verdicts,
            result.wall_s,
        ))?;
        eprintln!("matrix: results in {}", opts.out_dir.display());
        return Ok(());
    }
    let result = run_suite(&opts, &|trace, d, t, label| {
        progress_line(&format!(
            "{} {trace}: {d}/{t} runs (last: {label})",
            bar(d as f64 / t as f64)
        ));
    })?;
    progress_line("");
    let all: Vec<report::PolicyReport> = result
        .traces
        .iter()
        .flat_map(|t| t.reports.clone())
        .collect();
    match args.report.as_str() {
        "json" => stdout(&format!("{}\n", report::json(&all)?))?,
        "csv" => stdout(&report::csv(&all))?,
        _ => stdout(&crate::suite::summary_markdown(&result))?,
    }
    eprintln!(
        "suite: results in {} ({:.2} M simulated requests/s per core)",
        opts.out_dir.display(),
        result.requests_per_core_s / 1e6
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_name_the_flag_on_error() {
        assert_eq!(parse_duration("--x", "2s").unwrap(), 2.0);
        assert!((parse_duration("--x", "50ms").unwrap() - 0.05).abs() < 1e-12);
        assert_eq!(parse_duration("--x", "1.5m").unwrap(), 90.0);
        assert_eq!(parse_duration("--x", "2h").unwrap(), 7200.0);
        assert_eq!(parse_duration("--x", "3").unwrap(), 3.0);
        assert_eq!(parse_duration("--x", "1d").unwrap(), 86_400.0);
        assert!((parse_duration("--x", "40us").unwrap() - 40e-6).abs() < 1e-15);
        assert!(parse_duration("--x", "-1").is_err());
        let e = parse_duration("--ttft-slo", "fast").unwrap_err();
        assert!(e.is_usage());
        let msg = e.to_string();
        assert!(msg.contains("--ttft-slo") && msg.contains("fast"), "{msg}");
    }
}
