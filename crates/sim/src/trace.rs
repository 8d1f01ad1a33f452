//! Request traces: readers, rate-series expansion, time and rate scaling.
//!
//! Three input formats, detected from the file's first line:
//! * **Azure** 2023 LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`,
//!   timestamps `YYYY-MM-DD HH:MM:SS.fffffff`; REFERENCE.md §8.2);
//! * **JSONL**, one request per line: `timestamp` (milliseconds from the
//!   start), `input_length`, `output_length`; other fields are ignored (the
//!   Mooncake layout, REFERENCE.md §8.4);
//! * **rate series** CSV, `window_start_s,total_rate_rps[,...]`, one row per
//!   window (ServeGen's aggregated layout, §8.5), expanded into requests with
//!   Poisson or Gamma arrivals inside each window and sizes drawn from a
//!   request-size trace.
//!
//! Malformed rows are reported with file, line and column.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::error::SimError;
use crate::rng::SimRng;

/// One request: when it arrives and how large it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Seconds from the start of the trace.
    pub arrival_s: f64,
    /// Prompt tokens (at least 1).
    pub input_tokens: u32,
    /// Tokens to generate, the first one included (at least 1).
    pub output_tokens: u32,
}

/// The formats [`read_trace`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    Azure,
    Jsonl,
    Rate,
}

impl TraceFormat {
    pub const ALLOWED: &'static str = "azure, jsonl, rate";

    pub fn parse(s: &str) -> Result<Self, SimError> {
        match s {
            "azure" => Ok(TraceFormat::Azure),
            "jsonl" => Ok(TraceFormat::Jsonl),
            "rate" => Ok(TraceFormat::Rate),
            other => Err(SimError::config("--trace-format", other, Self::ALLOWED)),
        }
    }
}

/// One window of a rate series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateWindow {
    pub start_s: f64,
    pub len_s: f64,
    pub rate_rps: f64,
    /// Inter-arrival coefficient of variation, when the series has one.
    pub cv: Option<f64>,
}

/// How arrivals are drawn inside a window of a rate series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArrivalProcess {
    /// Exponential inter-arrival times.
    Poisson,
    /// Gamma inter-arrival times with the window's CV (capped at `max_cv`;
    /// Poisson where the series has no CV).
    Gamma { max_cv: f64 },
}

/// A trace as read from a file, before scaling.
#[derive(Debug, Clone)]
pub enum Trace {
    Requests {
        path: PathBuf,
        requests: Vec<Request>,
    },
    Rate {
        path: PathBuf,
        windows: Vec<RateWindow>,
    },
}

impl Trace {
    pub fn path(&self) -> &Path {
        match self {
            Trace::Requests { path, .. } | Trace::Rate { path, .. } => path,
        }
    }
}

/// Detect the format of `path` from its first non-empty line.
pub(crate) fn detect_format(path: &Path, text: &str) -> Result<TraceFormat, SimError> {
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let first = first.trim_start_matches('\u{feff}').trim();
    if first.starts_with('{') {
        Ok(TraceFormat::Jsonl)
    } else if first.starts_with("window_start_s") {
        Ok(TraceFormat::Rate)
    } else if first.starts_with("TIMESTAMP") {
        Ok(TraceFormat::Azure)
    } else {
        Err(SimError::Trace {
            path: path.to_path_buf(),
            message: format!(
                "cannot tell the trace format from the first line {:?}: expected an Azure CSV header \
                 (TIMESTAMP,ContextTokens,GeneratedTokens), a rate-series header (window_start_s,total_rate_rps,...) \
                 or a JSON object per line; pass --trace-format {}",
                truncate(first, 60),
                TraceFormat::ALLOWED
            ),
        })
    }
}

/// Read a trace file, detecting its format unless `format` is given.
pub fn read_trace(path: &Path, format: Option<TraceFormat>) -> Result<Trace, SimError> {
    let text = fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_trace(path, &text, format)
}

/// Parse trace text (`path` is only used in messages).
pub fn parse_trace(
    path: &Path,
    text: &str,
    format: Option<TraceFormat>,
) -> Result<Trace, SimError> {
    let format = match format {
        Some(f) => f,
        None => detect_format(path, text)?,
    };
    match format {
        TraceFormat::Azure => parse_azure(path, text).map(|requests| Trace::Requests {
            path: path.to_path_buf(),
            requests,
        }),
        TraceFormat::Jsonl => parse_jsonl(path, text).map(|requests| Trace::Requests {
            path: path.to_path_buf(),
            requests,
        }),
        TraceFormat::Rate => parse_rate(path, text).map(|windows| Trace::Rate {
            path: path.to_path_buf(),
            windows,
        }),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn row_error(path: &Path, line: usize, column: usize, message: String) -> SimError {
    SimError::TraceRow {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// Split a CSV line on commas, yielding (1-based character column, field).
fn csv_fields(line: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut col = 1;
    line.split(',').map(move |f| {
        let c = col;
        col += f.chars().count() + 1;
        (c, f)
    })
}

fn parse_count(
    path: &Path,
    line: usize,
    column: usize,
    name: &str,
    field: &str,
) -> Result<u32, SimError> {
    field.trim().parse::<u32>().map_err(|_| {
        row_error(
            path,
            line,
            column,
            format!(
                "{name}: expected a non-negative integer token count, found {:?}",
                truncate(field, 40)
            ),
        )
    })
}

fn parse_azure(path: &Path, text: &str) -> Result<Vec<Request>, SimError> {
    let mut lines = text.lines().enumerate();
    let header = loop {
        match lines.next() {
            Some((_, l)) if l.trim().is_empty() => continue,
            Some((i, l)) => break (i + 1, l.trim_start_matches('\u{feff}').trim()),
            None => {
                return Err(SimError::Trace {
                    path: path.to_path_buf(),
                    message: "empty file".into(),
                });
            }
        }
    };
    let names: Vec<&str> = header.1.split(',').map(str::trim).collect();
    let expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];
    for (i, want) in expected.iter().enumerate() {
        if names.get(i) != Some(want) {
            return Err(row_error(
                path,
                header.0,
                1,
                format!(
                    "Azure header must start with TIMESTAMP,ContextTokens,GeneratedTokens, found {:?}",
                    truncate(header.1, 60)
                ),
            ));
        }
    }
    let mut out = Vec::new();
    let mut first_abs: Option<f64> = None;
    for (i, line) in lines {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = csv_fields(line);
        let (c1, ts) = fields.next().unwrap_or((1, ""));
        let abs = parse_azure_timestamp(ts.trim()).ok_or_else(|| {
            row_error(
                path,
                lineno,
                c1,
                format!(
                    "TIMESTAMP: expected YYYY-MM-DD HH:MM:SS[.fffffff], found {:?}",
                    truncate(ts, 40)
                ),
            )
        })?;
        let (c2, ctx) = fields.next().ok_or_else(|| {
            row_error(
                path,
                lineno,
                line.chars().count() + 1,
                "missing ContextTokens and GeneratedTokens columns".into(),
            )
        })?;
        let input = parse_count(path, lineno, c2, "ContextTokens", ctx)?;
        let (c3, gen_tokens) = fields.next().ok_or_else(|| {
            row_error(
                path,
                lineno,
                line.chars().count() + 1,
                "missing GeneratedTokens column".into(),
            )
        })?;
        let output = parse_count(path, lineno, c3, "GeneratedTokens", gen_tokens)?;
        let base = *first_abs.get_or_insert(abs);
        out.push(Request {
            arrival_s: abs - base,
            input_tokens: input.max(1),
            output_tokens: output.max(1),
        });
    }
    finish_requests(path, out)
}

/// Seconds since 1970-01-01 of an Azure timestamp (no time zone).
fn parse_azure_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.split(':');
    let hh: u32 = t.next()?.parse().ok()?;
    let mm: u32 = t.next()?.parse().ok()?;
    let sec_str = t.next()?;
    if t.next().is_some() || hh > 23 || mm > 59 {
        return None;
    }
    let sec: f64 = sec_str.parse().ok()?;
    if !(0.0..61.0).contains(&sec) {
        return None;
    }
    let days = days_from_civil(y, m, day);
    Some(days as f64 * 86_400.0 + f64::from(hh) * 3600.0 + f64::from(mm) * 60.0 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(Deserialize)]
struct JsonlRow {
    timestamp: f64,
    input_length: f64,
    output_length: f64,
}

fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<Request>, SimError> {
    let mut out = Vec::new();
    let mut first: Option<f64> = None;
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let row: JsonlRow = serde_json::from_str(line)
            .map_err(|e| row_error(path, lineno, e.column().max(1), e.to_string()))?;
        let col_of = |key: &str| line.find(&format!("\"{key}\"")).map_or(1, |p| p + 1);
        let check = |v: f64, key: &str, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(row_error(
                    path,
                    lineno,
                    col_of(key),
                    format!("{key}: expected {what}, found {v}"),
                ))
            }
        };
        let ts = check(row.timestamp, "timestamp", "milliseconds >= 0")?;
        let input = check(row.input_length, "input_length", "a token count >= 0")?;
        let output = check(row.output_length, "output_length", "a token count >= 0")?;
        let base = *first.get_or_insert(ts);
        out.push(Request {
            arrival_s: (ts - base) / 1000.0,
            input_tokens: (input.round() as u32).max(1),
            output_tokens: (output.round() as u32).max(1),
        });
    }
    finish_requests(path, out)
}

#[derive(Deserialize)]
struct JsonlPrefixRow {
    timestamp: f64,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// The prompt's prefix blocks of each request of a JSONL trace (Mooncake's
/// `hash_ids`: one id per 512-token block, shared ids are shared prefixes),
/// in the order [`read_trace`] returns the requests, for prefix-cache
/// modelling; a request without `hash_ids` has none.
pub fn read_prefix_blocks(path: &Path) -> Result<Vec<Vec<u64>>, SimError> {
    let text = fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows: Vec<(f64, Vec<u64>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: JsonlPrefixRow = serde_json::from_str(line)
            .map_err(|e| row_error(path, i + 1, e.column().max(1), e.to_string()))?;
        rows.push((row.timestamp, row.hash_ids));
    }
    // The same stable order as the requests.
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(rows.into_iter().map(|(_, h)| h).collect())
}

fn finish_requests(path: &Path, mut out: Vec<Request>) -> Result<Vec<Request>, SimError> {
    if out.is_empty() {
        return Err(SimError::Trace {
            path: path.to_path_buf(),
            message: "the trace has no requests".into(),
        });
    }
    // Traces are nearly sorted; a stable sort keeps equal timestamps in file order.
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    let t0 = out[0].arrival_s;
    for r in &mut out {
        r.arrival_s -= t0;
    }
    Ok(out)
}

fn parse_rate(path: &Path, text: &str) -> Result<Vec<RateWindow>, SimError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (hline, header) = lines.next().ok_or_else(|| SimError::Trace {
        path: path.to_path_buf(),
        message: "empty file".into(),
    })?;
    let names: Vec<String> = header
        .trim_start_matches('\u{feff}')
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    if names.len() < 2 || names[0] != "window_start_s" || names[1] != "total_rate_rps" {
        return Err(row_error(
            path,
            hline + 1,
            1,
            format!(
                "rate-series header must start with window_start_s,total_rate_rps, found {:?}",
                truncate(header, 60)
            ),
        ));
    }
    let cv_col = names
        .iter()
        .position(|n| n == "rate_weighted_mean_cv" || n == "cv");
    let mut starts_rates: Vec<(f64, f64, Option<f64>)> = Vec::new();
    for (i, line) in lines {
        let lineno = i + 1;
        let fields: Vec<(usize, &str)> = csv_fields(line).collect();
        let num = |idx: usize, name: &str| -> Result<f64, SimError> {
            let (col, f) = fields.get(idx).copied().ok_or_else(|| {
                row_error(
                    path,
                    lineno,
                    line.chars().count() + 1,
                    format!("missing column {name}"),
                )
            })?;
            match f.trim().parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
                _ => Err(row_error(
                    path,
                    lineno,
                    col,
                    format!(
                        "{name}: expected a finite number >= 0, found {:?}",
                        truncate(f, 40)
                    ),
                )),
            }
        };
        let start = num(0, "window_start_s")?;
        let rate = num(1, "total_rate_rps")?;
        let cv = match cv_col {
            Some(c) => Some(num(c, &names[c])?),
            None => None,
        };
        if let Some(&(prev, _, _)) = starts_rates.last()
            && start <= prev
        {
            return Err(row_error(
                path,
                lineno,
                1,
                format!("window_start_s: must increase, found {start} after {prev}"),
            ));
        }
        starts_rates.push((start, rate, cv));
    }
    if starts_rates.is_empty() {
        return Err(SimError::Trace {
            path: path.to_path_buf(),
            message: "the rate series has no windows".into(),
        });
    }
    let default_len = if starts_rates.len() >= 2 {
        starts_rates[1].0 - starts_rates[0].0
    } else {
        600.0
    };
    let t0 = starts_rates[0].0;
    let mut out = Vec::with_capacity(starts_rates.len());
    for (i, &(start, rate, cv)) in starts_rates.iter().enumerate() {
        let len = starts_rates
            .get(i + 1)
            .map_or(default_len, |next| next.0 - start);
        out.push(RateWindow {
            start_s: start - t0,
            len_s: len,
            rate_rps: rate,
            cv,
        });
    }
    Ok(out)
}

/// Request sizes to draw from when expanding a rate series.
#[derive(Debug, Clone)]
pub struct SizePool {
    sizes: Arc<Vec<(u32, u32)>>,
}

impl SizePool {
    pub fn from_requests(requests: &[Request]) -> Self {
        Self {
            sizes: Arc::new(
                requests
                    .iter()
                    .map(|r| (r.input_tokens, r.output_tokens))
                    .collect(),
            ),
        }
    }

    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    fn draw(&self, rng: &mut SimRng) -> (u32, u32) {
        self.sizes[rng.below(self.sizes.len() as u64) as usize]
    }

    fn mean(&self) -> (f64, f64) {
        let n = self.sizes.len().max(1) as f64;
        let (a, b) = self.sizes.iter().fold((0.0, 0.0), |(a, b), (i, o)| {
            (a + f64::from(*i), b + f64::from(*o))
        });
        (a / n, b / n)
    }
}

/// How to turn a [`Trace`] into the requests a run replays.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadOptions {
    /// Multiply the arrival rate, keeping the duration (> 0).
    pub rate_scale: f64,
    /// Stretch the timeline (2 = twice as long at half the rate; > 0).
    pub time_scale: f64,
    /// Drop requests arriving after this many seconds (after time scaling).
    pub horizon_s: Option<f64>,
    /// Arrival process inside rate-series windows.
    pub arrivals: ArrivalProcess,
    /// Seed for rate-series expansion and rate scaling.
    pub seed: u64,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        Self {
            rate_scale: 1.0,
            time_scale: 1.0,
            horizon_s: None,
            arrivals: ArrivalProcess::Poisson,
            seed: 1,
        }
    }
}

/// The requests one run replays: a materialised list, or a rate series
/// expanded lazily (a 14-day series holds tens of millions of requests).
/// Every call to [`Workload::stream`] yields the same requests.
#[derive(Debug, Clone)]
pub enum Workload {
    Requests {
        name: String,
        requests: Arc<Vec<Request>>,
        duration_s: f64,
    },
    Rate {
        name: String,
        windows: Arc<Vec<RateWindow>>,
        sizes: SizePool,
        arrivals: ArrivalProcess,
        seed: u64,
        duration_s: f64,
    },
}

impl Workload {
    /// Build a workload from a trace. `sizes` is required for rate series.
    pub fn new(
        trace: &Trace,
        sizes: Option<SizePool>,
        opts: &WorkloadOptions,
    ) -> Result<Self, SimError> {
        if !(opts.rate_scale.is_finite() && opts.rate_scale > 0.0) {
            return Err(SimError::config(
                "--rate-scale",
                opts.rate_scale,
                "a finite number > 0",
            ));
        }
        if !(opts.time_scale.is_finite() && opts.time_scale > 0.0) {
            return Err(SimError::config(
                "--time-scale",
                opts.time_scale,
                "a finite number > 0",
            ));
        }
        if let Some(h) = opts.horizon_s
            && !(h.is_finite() && h > 0.0)
        {
            return Err(SimError::config("--duration", h, "a duration > 0"));
        }
        let name = trace
            .path()
            .file_stem()
            .map_or_else(|| "trace".to_string(), |s| s.to_string_lossy().into_owned());
        match trace {
            Trace::Requests { requests, .. } => {
                let reqs = scale_requests(requests, opts);
                if reqs.is_empty() {
                    return Err(SimError::Trace {
                        path: trace.path().to_path_buf(),
                        message: "no requests left after scaling and --duration".into(),
                    });
                }
                let last = reqs.last().map_or(0.0, |r| r.arrival_s);
                // The trace lasts until its last arrival, or the horizon if shorter.
                let full = requests.last().map_or(0.0, |r| r.arrival_s) * opts.time_scale;
                let duration_s = opts.horizon_s.map_or(last, |h| h.min(full).max(last));
                Ok(Workload::Requests {
                    name,
                    requests: Arc::new(reqs),
                    duration_s: duration_s.max(1e-3),
                })
            }
            Trace::Rate { windows, .. } => {
                let sizes = sizes.ok_or_else(|| {
                    SimError::config(
                        "--sizes",
                        "(none)",
                        "a request-size trace (Azure CSV or JSONL) is required to expand a rate series",
                    )
                })?;
                if sizes.is_empty() {
                    return Err(SimError::config("--sizes", "(empty)", "a non-empty trace"));
                }
                let mut ws: Vec<RateWindow> = windows
                    .iter()
                    .map(|w| RateWindow {
                        start_s: w.start_s * opts.time_scale,
                        len_s: w.len_s * opts.time_scale,
                        rate_rps: w.rate_rps * opts.rate_scale / opts.time_scale,
                        cv: w.cv,
                    })
                    .collect();
                if let Some(h) = opts.horizon_s {
                    ws.retain(|w| w.start_s < h);
                    if let Some(last) = ws.last_mut() {
                        last.len_s = last.len_s.min(h - last.start_s);
                    }
                }
                if ws.is_empty() {
                    return Err(SimError::Trace {
                        path: trace.path().to_path_buf(),
                        message: "no windows left after --duration".into(),
                    });
                }
                let duration_s = ws.last().map_or(0.0, |w| w.start_s + w.len_s);
                Ok(Workload::Rate {
                    name,
                    windows: Arc::new(ws),
                    sizes,
                    arrivals: opts.arrivals,
                    seed: opts.seed,
                    duration_s,
                })
            }
        }
    }

    /// A workload from an explicit list of requests (sorted by arrival).
    pub fn from_requests(name: impl Into<String>, mut requests: Vec<Request>) -> Self {
        requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        let duration_s = requests.last().map_or(1e-3, |r| r.arrival_s.max(1e-3));
        Workload::Requests {
            name: name.into(),
            requests: Arc::new(requests),
            duration_s,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Workload::Requests { name, .. } | Workload::Rate { name, .. } => name,
        }
    }

    /// Seconds from the start to the end of the trace (the GPU-hour horizon).
    pub fn duration_s(&self) -> f64 {
        match self {
            Workload::Requests { duration_s, .. } | Workload::Rate { duration_s, .. } => {
                *duration_s
            }
        }
    }

    /// The requests, in arrival order. Deterministic.
    pub fn stream(&self) -> RequestStream<'_> {
        match self {
            Workload::Requests { requests, .. } => RequestStream::Slice(requests.iter()),
            Workload::Rate {
                windows,
                sizes,
                arrivals,
                seed,
                ..
            } => RequestStream::Rate(RateStream {
                windows,
                sizes,
                arrivals: *arrivals,
                window: 0,
                next_t: f64::NAN,
                rng_t: SimRng::new(*seed, 11),
                rng_s: SimRng::new(*seed, 12),
            }),
        }
    }

    /// Mean prompt and output tokens per request.
    pub fn mean_sizes(&self) -> (f64, f64) {
        match self {
            Workload::Requests { requests, .. } => {
                let n = requests.len().max(1) as f64;
                let (a, b) = requests.iter().fold((0.0, 0.0), |(a, b), r| {
                    (
                        a + f64::from(r.input_tokens),
                        b + f64::from(r.output_tokens),
                    )
                });
                (a / n, b / n)
            }
            Workload::Rate { sizes, .. } => sizes.mean(),
        }
    }

    /// Expected number of requests (exact for request traces).
    pub(crate) fn expected_requests(&self) -> f64 {
        match self {
            Workload::Requests { requests, .. } => requests.len() as f64,
            Workload::Rate { windows, .. } => windows.iter().map(|w| w.rate_rps * w.len_s).sum(),
        }
    }

    /// The peak arrival rate over any sliding window of `window_s` seconds,
    /// requests per second (scans the whole stream once).
    pub fn peak_rate(&self, window_s: f64) -> f64 {
        self.peak_rate_until(window_s, f64::INFINITY)
    }

    /// [`Workload::peak_rate`] over the arrivals before `until_s` only.
    pub fn peak_rate_until(&self, window_s: f64, until_s: f64) -> f64 {
        let mut times = std::collections::VecDeque::new();
        let mut best = 0usize;
        for r in self.stream().take_while(|r| r.arrival_s < until_s) {
            times.push_back(r.arrival_s);
            while let Some(&front) = times.front() {
                if front <= r.arrival_s - window_s {
                    times.pop_front();
                } else {
                    break;
                }
            }
            best = best.max(times.len());
        }
        best as f64 / window_s
    }
}

fn scale_requests(requests: &[Request], opts: &WorkloadOptions) -> Vec<Request> {
    let x = opts.rate_scale;
    let whole = x.floor() as u64;
    let frac = x - whole as f64;
    let mut rng = SimRng::new(opts.seed, 21);
    let mut out = Vec::with_capacity((requests.len() as f64 * x * 1.01) as usize + 1);
    let mean_gap = if requests.len() >= 2 {
        (requests[requests.len() - 1].arrival_s - requests[0].arrival_s)
            / (requests.len() - 1) as f64
    } else {
        1.0
    };
    for (i, r) in requests.iter().enumerate() {
        let gap = requests
            .get(i + 1)
            .map_or(mean_gap, |n| n.arrival_s - r.arrival_s);
        let copies = whole + u64::from(rng.uniform() < frac);
        for j in 0..copies {
            // The first copy keeps the original time; the others spread over
            // the gap to the next arrival, so the rate curve keeps its shape
            // (bursts stay bursts) at every scale above one inter-arrival.
            let t = if j == 0 {
                r.arrival_s
            } else {
                r.arrival_s + rng.uniform() * gap
            };
            out.push(Request {
                arrival_s: t * opts.time_scale,
                ..*r
            });
        }
    }
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    if let Some(h) = opts.horizon_s {
        out.retain(|r| r.arrival_s < h);
    }
    out
}

/// Iterator over a workload's requests.
#[derive(Debug)]
pub enum RequestStream<'a> {
    Slice(std::slice::Iter<'a, Request>),
    Rate(RateStream<'a>),
}

impl Iterator for RequestStream<'_> {
    type Item = Request;

    #[inline]
    fn next(&mut self) -> Option<Request> {
        match self {
            RequestStream::Slice(it) => it.next().copied(),
            RequestStream::Rate(r) => r.next(),
        }
    }
}

/// Lazily expands a rate series into requests.
#[derive(Debug)]
pub struct RateStream<'a> {
    windows: &'a [RateWindow],
    sizes: &'a SizePool,
    arrivals: ArrivalProcess,
    window: usize,
    next_t: f64,
    rng_t: SimRng,
    rng_s: SimRng,
}

impl RateStream<'_> {
    fn gap(&mut self, w: &RateWindow) -> f64 {
        let mean = 1.0 / w.rate_rps;
        match (self.arrivals, w.cv) {
            (ArrivalProcess::Gamma { max_cv }, Some(cv)) if cv > 0.0 => {
                let cv = cv.min(max_cv);
                let k = 1.0 / (cv * cv);
                self.rng_t.gamma(k, mean / k)
            }
            _ => self.rng_t.exponential(mean),
        }
    }
}

impl Iterator for RateStream<'_> {
    type Item = Request;

    fn next(&mut self) -> Option<Request> {
        loop {
            let w = *self.windows.get(self.window)?;
            if w.rate_rps <= 0.0 {
                self.window += 1;
                self.next_t = f64::NAN;
                continue;
            }
            if self.next_t.is_nan() {
                self.next_t = w.start_s + self.gap(&w);
            }
            if self.next_t < w.start_s + w.len_s {
                let t = self.next_t;
                self.next_t = t + self.gap(&w);
                let (input, output) = self.sizes.draw(&mut self.rng_s);
                return Some(Request {
                    arrival_s: t,
                    input_tokens: input.max(1),
                    output_tokens: output.max(1),
                });
            }
            self.window += 1;
            self.next_t = f64::NAN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.csv")
    }

    #[test]
    fn azure_timestamps_become_seconds_from_the_first_row() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-11-16 18:17:03.9799600,4808,10\n\
                    2023-11-16 18:17:05.4799600,31,2\n\
                    2023-11-17 00:00:00,1,1\n";
        let Trace::Requests { requests, .. } = parse_trace(p(), text, None).unwrap() else {
            panic!("expected requests")
        };
        assert_eq!(requests.len(), 3);
        assert!((requests[1].arrival_s - 1.5).abs() < 1e-6);
        let to_midnight = 6.0 * 3600.0 - (17.0 * 60.0 + 3.97996);
        assert!((requests[2].arrival_s - to_midnight).abs() < 1e-4);
        assert_eq!(requests[0].input_tokens, 4808);
    }

    #[test]
    fn jsonl_prefix_blocks_follow_the_requests_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        std::fs::write(
            &path,
            "{\"timestamp\": 500, \"input_length\": 1024, \"output_length\": 3, \"hash_ids\": [7, 8]}\n\
             {\"timestamp\": 0, \"input_length\": 600, \"output_length\": 2, \"hash_ids\": [7]}\n\
             {\"timestamp\": 900, \"input_length\": 10, \"output_length\": 1}\n",
        )
        .expect("write");
        let Trace::Requests { requests, .. } = read_trace(&path, None).expect("trace") else {
            panic!("expected requests")
        };
        let blocks = read_prefix_blocks(&path).expect("prefix blocks");
        assert_eq!(blocks.len(), requests.len());
        assert_eq!(requests[0].input_tokens, 600);
        assert_eq!(blocks, vec![vec![7], vec![7, 8], vec![]]);
    }

    #[test]
    fn rate_series_windows_take_their_length_from_the_next_start() {
        let text = "window_start_s,total_rate_rps,active_clients,rate_weighted_mean_cv\n\
                    0,2.0,4,1.5\n600,3.0,4,1.0\n";
        let Trace::Rate { windows, .. } = parse_trace(p(), text, None).unwrap() else {
            panic!("expected a rate series")
        };
        assert_eq!(windows.len(), 2);
        assert_eq!(windows[1].len_s, 600.0);
        assert_eq!(windows[0].cv, Some(1.5));
    }

    #[test]
    fn poisson_expansion_matches_the_window_rate() {
        let trace = Trace::Rate {
            path: "r.csv".into(),
            windows: vec![RateWindow {
                start_s: 0.0,
                len_s: 10_000.0,
                rate_rps: 5.0,
                cv: None,
            }],
        };
        let sizes = SizePool::from_requests(&[Request {
            arrival_s: 0.0,
            input_tokens: 10,
            output_tokens: 5,
        }]);
        let w = Workload::new(&trace, Some(sizes), &WorkloadOptions::default()).unwrap();
        let n = w.stream().count() as f64;
        assert!((n - 50_000.0).abs() < 4.0 * 50_000f64.sqrt(), "n = {n}");
        assert_eq!(w.stream().count() as f64, n, "streams repeat");
    }

    #[test]
    fn rate_scaling_multiplies_the_count_and_keeps_the_duration() {
        let reqs: Vec<Request> = (0..1000)
            .map(|i| Request {
                arrival_s: i as f64,
                input_tokens: 1,
                output_tokens: 1,
            })
            .collect();
        let trace = Trace::Requests {
            path: "x".into(),
            requests: reqs,
        };
        let opts = WorkloadOptions {
            rate_scale: 2.5,
            ..Default::default()
        };
        let w = Workload::new(&trace, None, &opts).unwrap();
        let n = w.stream().count();
        assert!((2400..2600).contains(&n), "n = {n}");
        assert!(w.duration_s() < 1000.0 && w.duration_s() > 998.0);
    }
}
