//! The performance model of one model on one GPU type.
//!
//! Decode step time `t(B, L) = a + b·B + c·B·L + d·B²` for a running batch of
//! `B` sequences with mean context `L` tokens, and prefill time
//! `p(T) = e + f·T + g·T²` for a prompt of `T` tokens, all in seconds. This is
//! DESIGN.md §3's form with a quadratic batch term added: large models on
//! A100/H100 turn compute-bound at large batches, and a straight line misses
//! the Splitwise Llama2-70B batch-64 step by over 10%. Fits weigh relative
//! errors by `√B`, so the large batches where ITL budgets bind are fitted
//! best (within 1–2% on the H200 8B data there; the batch-1 steps, far below
//! any budget, are over-predicted by up to 8%).
//!
//! Presets ([`preset`], [`PRESET_NAMES`]) are fitted from the measured
//! profiles in `data/profiles`, compiled into the crate; users bring their
//! own with [`PerfModel::from_profile_csv`] (the caller reads the file).
//!
//! | preset | source | KV capacity (tokens) |
//! |---|---|---|
//! | `h200-llama3-8b-bf16` | `h200_llama3-8b-shape_bf16_{decode,prefill}.csv` | (141 GB − 16 GB of bf16 weights) / 128 KiB per token = 953,674 |
//! | `h200-llama3.1-8b-fp8-vllm` | `dynamo_h200_llama3.1-8b-fp8_{decode,prefill}.csv` | 945,029 (vLLM's own figure in the profile) |
//! | `h100-llama2-70b-tp4` | `splitwise_perf_model.csv`, `h100-80gb`, TP4 | (4 × 80 GB − 138 GB of fp16 weights) / 320 KiB per token = 555,419 |
//! | `a100-llama2-70b-tp4` | `splitwise_perf_model.csv`, `a100-80gb`, TP4 | same memory as H100 80 GB: 555,419 |
//!
//! KV bytes per token: Llama-3-8B has 32 layers × 8 KV heads × 128 dims × 2
//! (K and V) × 2 bytes = 128 KiB; Llama2-70B has 80 layers × 8 KV heads ×
//! 128 × 2 × 2 bytes = 320 KiB. The capacities count all GPU memory not taken
//! by weights; real engines also reserve activation and CUDA-graph memory
//! (vLLM's `gpu_memory_utilization` defaults to 0.9), so a deployment's
//! figure is typically 10–20% lower — override it with
//! `performanceModel.kvCapacityTokens` when known.
//!
//! `max_batch` is the engine's own ceiling: 1024 for the H200 presets (vLLM
//! V1's default `max_num_seqs` on H100/H200-class GPUs; the Dynamo sweep
//! flattens above it) and 256 for the 70B presets (measured up to 64; beyond
//! it the fit extrapolates).

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

mod fit;

/// Coefficients of the decode and prefill time models, plus the replica's
/// memory limit for KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfModel {
    /// Human-readable name, e.g. `h200-llama3-8b-bf16`.
    pub name: String,
    /// GPU type the model was measured on, e.g. `H200`.
    pub gpu: String,
    /// GPUs per replica (tensor parallelism) the profile was measured with.
    pub gpus_per_replica: u32,
    /// Decode: fixed part of one step, seconds.
    pub decode_base_s: f64,
    /// Decode: seconds per sequence in the batch.
    pub decode_per_seq_s: f64,
    /// Decode: seconds per sequence per context token.
    pub decode_per_seq_token_s: f64,
    /// Prefill: fixed part, seconds.
    pub prefill_base_s: f64,
    /// Prefill: seconds per prompt token.
    pub prefill_per_token_s: f64,
    /// Prefill: seconds per squared prompt token.
    pub prefill_per_token_sq_s: f64,
    /// KV-cache capacity of one replica, tokens.
    pub kv_capacity_tokens: f64,
    /// Largest batch the engine may run (its own `max_num_seqs` ceiling).
    pub max_batch: u32,
    /// Decode: seconds per squared batch size (compute-bound curvature; 0
    /// for a purely linear model).
    #[serde(default)]
    pub decode_per_seq_sq_s: f64,
}

impl PerfModel {
    /// Decode step time for `batch` sequences of mean context `context_tokens`.
    pub fn decode_step_s(&self, batch: f64, context_tokens: f64) -> f64 {
        let b = batch.max(0.0);
        self.decode_base_s
            + self.decode_per_seq_s * b
            + self.decode_per_seq_token_s * b * context_tokens.max(0.0)
            + self.decode_per_seq_sq_s * b * b
    }

    /// Derivative of the decode step time with respect to the batch size.
    pub(crate) fn decode_step_slope_s(&self, batch: f64, context_tokens: f64) -> f64 {
        let b = batch.max(0.0);
        self.decode_per_seq_s
            + self.decode_per_seq_token_s * context_tokens.max(0.0)
            + 2.0 * self.decode_per_seq_sq_s * b
    }

    /// Prefill time for one prompt of `prompt_tokens` tokens.
    pub fn prefill_s(&self, prompt_tokens: f64) -> f64 {
        let t = prompt_tokens.max(0.0);
        self.prefill_base_s + self.prefill_per_token_s * t + self.prefill_per_token_sq_s * t * t
    }

    /// Decode throughput (generated tokens per second) at `batch` and context.
    pub fn decode_tokens_per_s(&self, batch: f64, context_tokens: f64) -> f64 {
        let step = self.decode_step_s(batch, context_tokens);
        if step > 0.0 {
            batch.max(0.0) / step
        } else {
            0.0
        }
    }

    /// The largest whole batch (1..=`max_batch`) whose decode step at
    /// `context_tokens` takes at most `step_budget_s`, and whose KV cache
    /// (`batch × context_tokens`) fits the replica. At least 1.
    pub(crate) fn largest_batch_within(&self, step_budget_s: f64, context_tokens: f64) -> u32 {
        let kv_cap = if context_tokens > 0.0 {
            (self.kv_capacity_tokens / context_tokens).floor()
        } else {
            f64::INFINITY
        };
        let hi_cap = f64::from(self.max_batch.max(1)).min(kv_cap.max(1.0));
        let (mut lo, mut hi) = (1u32, hi_cap as u32);
        if self.decode_step_s(f64::from(hi), context_tokens) <= step_budget_s {
            return hi;
        }
        // Invariant: answer in [lo, hi); t(hi) exceeds the budget.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.decode_step_s(f64::from(mid), context_tokens) <= step_budget_s {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Fit a model to measured points (least squares on relative error,
    /// non-negative coefficients). Needs at least 3 decode and 3 prefill points.
    pub fn fit(
        meta: ProfileMeta,
        decode: &[DecodePoint],
        prefill: &[PrefillPoint],
    ) -> Result<(PerfModel, FitReport), SpecError> {
        if decode.len() < 3 {
            return Err(SpecError::ProfileFit(format!(
                "need at least 3 decode points, found {}",
                decode.len()
            )));
        }
        if prefill.len() < 3 {
            return Err(SpecError::ProfileFit(format!(
                "need at least 3 prefill points, found {}",
                prefill.len()
            )));
        }
        let rows: Vec<Vec<f64>> = decode
            .iter()
            .map(|p| vec![1.0, p.batch, p.batch * p.context_tokens, p.batch * p.batch])
            .collect();
        let y: Vec<f64> = decode.iter().map(|p| p.step_s).collect();
        // Weights √B/t: relative error, tilted toward large batches, where
        // ITL budgets bind (the first few sequences of a batch cost a little
        // more than the polynomial says; it over-predicts them, harmlessly).
        let w: Vec<f64> = decode.iter().map(|p| p.batch.sqrt() / p.step_s).collect();
        let d = fit::nnls(&rows, &y, &w, 4).ok_or_else(|| {
            SpecError::ProfileFit("decode points do not determine a model".into())
        })?;
        let rows: Vec<Vec<f64>> = prefill
            .iter()
            .map(|p| vec![1.0, p.prompt_tokens, p.prompt_tokens * p.prompt_tokens])
            .collect();
        let y: Vec<f64> = prefill.iter().map(|p| p.prefill_s).collect();
        let w: Vec<f64> = y.iter().map(|v| 1.0 / (v * v)).collect();
        let p = fit::nnls(&rows, &y, &w, 3).ok_or_else(|| {
            SpecError::ProfileFit("prefill points do not determine a model".into())
        })?;
        let model = PerfModel {
            name: meta.name,
            gpu: meta.gpu,
            gpus_per_replica: meta.gpus_per_replica,
            decode_base_s: d[0],
            decode_per_seq_s: d[1],
            decode_per_seq_token_s: d[2],
            decode_per_seq_sq_s: d[3],
            prefill_base_s: p[0],
            prefill_per_token_s: p[1],
            prefill_per_token_sq_s: p[2],
            kv_capacity_tokens: meta.kv_capacity_tokens,
            max_batch: meta.max_batch,
        };
        if model.decode_step_s(1.0, 0.0) <= 0.0 || model.prefill_s(1.0) <= 0.0 {
            return Err(SpecError::ProfileFit(
                "the fitted model predicts non-positive times".into(),
            ));
        }
        let report = FitReport::measure(&model, decode, prefill);
        Ok((model, report))
    }

    /// Read a profile file's text (the caller reads the file) in `format`.
    pub fn from_profile_csv(text: &str, format: &ProfileFormat) -> Result<PerfModel, SpecError> {
        Ok(Self::from_profile_csv_with_report(text, format)?.0)
    }

    /// As [`PerfModel::from_profile_csv`], with the fit's errors against the data.
    pub(crate) fn from_profile_csv_with_report(
        text: &str,
        format: &ProfileFormat,
    ) -> Result<(PerfModel, FitReport), SpecError> {
        match format {
            ProfileFormat::Gpuscale => parse_gpuscale_profile(text),
            ProfileFormat::Splitwise(sel) => {
                let (decode, prefill) = parse_splitwise(text, sel)?;
                PerfModel::fit(sel.meta.clone(), &decode, &prefill)
            }
        }
    }
}

/// One measured decode step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodePoint {
    pub batch: f64,
    pub context_tokens: f64,
    pub step_s: f64,
}

/// One measured prefill.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoint {
    pub prompt_tokens: f64,
    pub prefill_s: f64,
}

/// What a profile's data points do not say: names and capacities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileMeta {
    pub name: String,
    pub gpu: String,
    pub gpus_per_replica: u32,
    pub kv_capacity_tokens: f64,
    pub max_batch: u32,
}

/// How well a fitted model reproduces its data: relative errors
/// `|model − measured| / measured`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    pub decode_points: usize,
    pub decode_rms_rel_error: f64,
    pub decode_max_rel_error: f64,
    pub prefill_points: usize,
    pub prefill_rms_rel_error: f64,
    pub prefill_max_rel_error: f64,
}

impl FitReport {
    fn measure(model: &PerfModel, decode: &[DecodePoint], prefill: &[PrefillPoint]) -> Self {
        let rel = |m: f64, y: f64| ((m - y) / y).abs();
        let d: Vec<f64> = decode
            .iter()
            .map(|p| rel(model.decode_step_s(p.batch, p.context_tokens), p.step_s))
            .collect();
        let p: Vec<f64> = prefill
            .iter()
            .map(|p| rel(model.prefill_s(p.prompt_tokens), p.prefill_s))
            .collect();
        let rms = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() / v.len().max(1) as f64).sqrt();
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        Self {
            decode_points: d.len(),
            decode_rms_rel_error: rms(&d),
            decode_max_rel_error: max(&d),
            prefill_points: p.len(),
            prefill_rms_rel_error: rms(&p),
            prefill_max_rel_error: max(&p),
        }
    }
}

/// Profile file layouts [`PerfModel::from_profile_csv`] reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProfileFormat {
    /// gpuscale's own layout. `#` lines before the header carry metadata as
    /// `# key: value` (`name`, `gpu`, `gpus_per_replica`,
    /// `kv_capacity_tokens` — required — and `max_batch`, default 256);
    /// then a header `phase,batch,tokens,milliseconds` and one row per
    /// measurement: `decode,<batch>,<mean context tokens>,<step ms>` or
    /// `prefill,1,<prompt tokens>,<prefill ms>`.
    ///
    /// ```text
    /// # name: my-model-h100
    /// # gpu: H100
    /// # gpus_per_replica: 1
    /// # kv_capacity_tokens: 500000
    /// phase,batch,tokens,milliseconds
    /// decode,1,512,5.56
    /// decode,64,512,7.65
    /// decode,64,2048,10.4
    /// prefill,1,128,12.1
    /// prefill,1,1024,27.6
    /// prefill,1,4096,111.6
    /// ```
    Gpuscale,
    /// SplitwiseSim's `perf_model.csv` (`model,hardware,prompt_size,
    /// batch_size,token_size,...,prompt_time,token_time,e2e_time,
    /// tensor_parallel`), one model × hardware × TP selected.
    Splitwise(SplitwiseSelection),
}

/// Which rows of a Splitwise profile to use, and what the file does not say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitwiseSelection {
    pub model: String,
    pub hardware: String,
    pub tensor_parallel: u32,
    pub meta: ProfileMeta,
}

/// Preset names, in the order [`preset`] knows them.
pub const PRESET_NAMES: &[&str] = &[
    "h200-llama3-8b-bf16",
    "h200-llama3.1-8b-fp8-vllm",
    "h100-llama2-70b-tp4",
    "a100-llama2-70b-tp4",
];

const H200_DECODE: &str =
    include_str!("../../../data/profiles/h200_llama3-8b-shape_bf16_decode.csv");
const H200_PREFILL: &str =
    include_str!("../../../data/profiles/h200_llama3-8b-shape_bf16_prefill.csv");
const DYNAMO_DECODE: &str =
    include_str!("../../../data/profiles/dynamo_h200_llama3.1-8b-fp8_decode.csv");
const DYNAMO_PREFILL: &str =
    include_str!("../../../data/profiles/dynamo_h200_llama3.1-8b-fp8_prefill.csv");
const SPLITWISE: &str = include_str!("../../../data/profiles/splitwise_perf_model.csv");

/// KV bytes per token of Llama-3-8B in bf16 (32 layers × 8 KV heads × 128 × 2 × 2 B).
pub(crate) const LLAMA3_8B_KV_BYTES_PER_TOKEN: f64 = 131_072.0;
/// KV bytes per token of Llama2-70B in fp16 (80 layers × 8 KV heads × 128 × 2 × 2 B).
pub(crate) const LLAMA2_70B_KV_BYTES_PER_TOKEN: f64 = 327_680.0;

fn kv_tokens(memory_bytes: f64, weight_bytes: f64, per_token: f64) -> f64 {
    ((memory_bytes - weight_bytes) / per_token).floor()
}

/// A shipped preset by name, or `None`.
pub fn preset(name: &str) -> Option<PerfModel> {
    preset_with_report(name).map(|(m, _)| m)
}

/// A shipped preset and its fit's errors against the data it was built from.
pub(crate) fn preset_with_report(name: &str) -> Option<(PerfModel, FitReport)> {
    static PRESETS: OnceLock<Vec<(PerfModel, FitReport)>> = OnceLock::new();
    let all = PRESETS.get_or_init(|| {
        PRESET_NAMES
            .iter()
            .filter_map(|n| build_preset(n).ok())
            .collect()
    });
    all.iter().find(|(m, _)| m.name == name).cloned()
}

/// Build one preset from the compiled-in data (errors only if the shipped
/// data is malformed, which the tests rule out).
pub(crate) fn build_preset(name: &str) -> Result<(PerfModel, FitReport), SpecError> {
    match name {
        "h200-llama3-8b-bf16" => {
            let decode = parse_columns(H200_DECODE, &["batch", "context_tokens", "step_ms"])?
                .into_iter()
                .map(|r| DecodePoint {
                    batch: r[0],
                    context_tokens: r[1],
                    step_s: r[2] / 1000.0,
                })
                .collect::<Vec<_>>();
            let prefill = parse_columns(H200_PREFILL, &["prompt_tokens", "prefill_ms"])?
                .into_iter()
                .map(|r| PrefillPoint {
                    prompt_tokens: r[0],
                    prefill_s: r[1] / 1000.0,
                })
                .collect::<Vec<_>>();
            PerfModel::fit(
                ProfileMeta {
                    name: name.into(),
                    gpu: "H200".into(),
                    gpus_per_replica: 1,
                    kv_capacity_tokens: kv_tokens(141e9, 16e9, LLAMA3_8B_KV_BYTES_PER_TOKEN),
                    max_batch: 1024,
                },
                &decode,
                &prefill,
            )
        }
        "h200-llama3.1-8b-fp8-vllm" => {
            let decode = parse_columns(
                DYNAMO_DECODE,
                &["context_length_tokens", "est_concurrent_requests", "itl_ms"],
            )?
            .into_iter()
            // Above vLLM's 1024-sequence ceiling the measured ITL flattens:
            // the engine no longer runs the swept concurrency.
            .filter(|r| r[1] <= 1024.0)
            .map(|r| DecodePoint {
                batch: r[1],
                context_tokens: r[0],
                step_s: r[2] / 1000.0,
            })
            .collect::<Vec<_>>();
            let prefill = parse_columns(DYNAMO_PREFILL, &["isl_tokens", "ttft_ms"])?
                .into_iter()
                .map(|r| PrefillPoint {
                    prompt_tokens: r[0],
                    prefill_s: r[1] / 1000.0,
                })
                .collect::<Vec<_>>();
            PerfModel::fit(
                ProfileMeta {
                    name: name.into(),
                    gpu: "H200".into(),
                    gpus_per_replica: 1,
                    kv_capacity_tokens: 945_029.0,
                    max_batch: 1024,
                },
                &decode,
                &prefill,
            )
        }
        "h100-llama2-70b-tp4" | "a100-llama2-70b-tp4" => {
            let (hardware, gpu) = if name.starts_with("h100") {
                ("h100-80gb", "H100")
            } else {
                ("a100-80gb", "A100")
            };
            let sel = SplitwiseSelection {
                model: "llama2-70b".into(),
                hardware: hardware.into(),
                tensor_parallel: 4,
                meta: ProfileMeta {
                    name: name.into(),
                    gpu: gpu.into(),
                    gpus_per_replica: 4,
                    kv_capacity_tokens: kv_tokens(4.0 * 80e9, 138e9, LLAMA2_70B_KV_BYTES_PER_TOKEN),
                    max_batch: 256,
                },
            };
            let (decode, prefill) = parse_splitwise(SPLITWISE, &sel)?;
            PerfModel::fit(sel.meta, &decode, &prefill)
        }
        _ => Err(SpecError::UnknownPreset {
            path: "performanceModel.preset".into(),
            name: name.into(),
            known: PRESET_NAMES.join(", "),
        }),
    }
}

/// Data lines of a CSV: `(1-based line number, cells)`, skipping blank and
/// `#` lines.
fn data_lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let l = l.trim();
        (!l.is_empty() && !l.starts_with('#'))
            .then(|| (i + 1, l.split(',').map(str::trim).collect()))
    })
}

fn parse_number(cell: &str, line: usize, column: usize, what: &str) -> Result<f64, SpecError> {
    let v: f64 = cell.parse().map_err(|_| SpecError::Profile {
        line,
        column,
        message: format!("{what}: {cell:?} is not a number"),
    })?;
    if !v.is_finite() || v < 0.0 {
        return Err(SpecError::Profile {
            line,
            column,
            message: format!("{what}: {cell} must be finite and at least 0"),
        });
    }
    Ok(v)
}

/// Parse the named columns (by header) of a plain numeric CSV.
fn parse_columns(text: &str, wanted: &[&str]) -> Result<Vec<Vec<f64>>, SpecError> {
    let mut lines = data_lines(text);
    let (hline, header) = lines.next().ok_or(SpecError::Profile {
        line: 1,
        column: 0,
        message: "empty file: expected a header".into(),
    })?;
    let idx: Vec<usize> = wanted
        .iter()
        .map(|w| {
            header
                .iter()
                .position(|h| h == w)
                .ok_or_else(|| SpecError::Profile {
                    line: hline,
                    column: 0,
                    message: format!("header lacks column {w:?}"),
                })
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (line, cells) in lines {
        let mut row = Vec::with_capacity(idx.len());
        for (&i, w) in idx.iter().zip(wanted) {
            let cell = cells.get(i).ok_or_else(|| SpecError::Profile {
                line,
                column: i + 1,
                message: format!("missing column {w:?}"),
            })?;
            row.push(parse_number(cell, line, i + 1, w)?);
        }
        out.push(row);
    }
    Ok(out)
}

fn parse_splitwise(
    text: &str,
    sel: &SplitwiseSelection,
) -> Result<(Vec<DecodePoint>, Vec<PrefillPoint>), SpecError> {
    let mut lines = data_lines(text);
    let (hline, header) = lines.next().ok_or(SpecError::Profile {
        line: 1,
        column: 0,
        message: "empty file: expected a header".into(),
    })?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| SpecError::Profile {
                line: hline,
                column: 0,
                message: format!("header lacks column {name:?}"),
            })
    };
    let (c_model, c_hw, c_prompt, c_batch, c_tokens, c_ptime, c_ttime, c_tp) = (
        col("model")?,
        col("hardware")?,
        col("prompt_size")?,
        col("batch_size")?,
        col("token_size")?,
        col("prompt_time")?,
        col("token_time")?,
        col("tensor_parallel")?,
    );
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    for (line, cells) in lines {
        let get = |c: usize| {
            cells.get(c).copied().ok_or(SpecError::Profile {
                line,
                column: c + 1,
                message: "row has too few columns".into(),
            })
        };
        if get(c_model)? != sel.model || get(c_hw)? != sel.hardware {
            continue;
        }
        let tp = parse_number(get(c_tp)?, line, c_tp + 1, "tensor_parallel")?;
        let batch = parse_number(get(c_batch)?, line, c_batch + 1, "batch_size")?;
        // The TP2 batch-64 rows are anomalous (data/SOURCES.md).
        if tp as u32 != sel.tensor_parallel || (tp as u32 == 2 && batch as u32 == 64) {
            continue;
        }
        let prompt = parse_number(get(c_prompt)?, line, c_prompt + 1, "prompt_size")?;
        let tokens = parse_number(get(c_tokens)?, line, c_tokens + 1, "token_size")?;
        let ptime = parse_number(get(c_ptime)?, line, c_ptime + 1, "prompt_time")?;
        let ttime = parse_number(get(c_ttime)?, line, c_ttime + 1, "token_time")?;
        // Decode context averaged over the generation: prompt + half the output.
        decode.push(DecodePoint {
            batch,
            context_tokens: prompt + tokens / 2.0,
            step_s: ttime / 1000.0,
        });
        if batch as u32 == 1 {
            prefill.push(PrefillPoint {
                prompt_tokens: prompt,
                prefill_s: ptime / 1000.0,
            });
        }
    }
    if decode.is_empty() {
        return Err(SpecError::ProfileFit(format!(
            "no rows for model {:?} on {:?} with tensor_parallel {}",
            sel.model, sel.hardware, sel.tensor_parallel
        )));
    }
    Ok((decode, prefill))
}

fn parse_gpuscale_profile(text: &str) -> Result<(PerfModel, FitReport), SpecError> {
    let mut name = None;
    let mut gpu = None;
    let mut gpus = 1u32;
    let mut kv = None;
    let mut max_batch = 256u32;
    let mut header_seen = false;
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() {
            continue;
        }
        if let Some(meta) = l.strip_prefix('#') {
            let Some((k, v)) = meta.split_once(':') else {
                continue; // a plain comment
            };
            let (k, v) = (k.trim(), v.trim());
            let num = |what: &str| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| SpecError::Profile {
                        line,
                        column: 0,
                        message: format!("{what}: {v:?} must be a positive number"),
                    })
            };
            match k {
                "name" => name = Some(v.to_string()),
                "gpu" => gpu = Some(v.to_string()),
                "gpus_per_replica" => gpus = num(k)? as u32,
                "kv_capacity_tokens" => kv = Some(num(k)?),
                "max_batch" => max_batch = num(k)? as u32,
                _ => {}
            }
            continue;
        }
        let cells: Vec<&str> = l.split(',').map(str::trim).collect();
        if !header_seen {
            if cells != ["phase", "batch", "tokens", "milliseconds"] {
                return Err(SpecError::Profile {
                    line,
                    column: 0,
                    message: format!(
                        "expected the header phase,batch,tokens,milliseconds, found {l:?}"
                    ),
                });
            }
            header_seen = true;
            continue;
        }
        if cells.len() != 4 {
            return Err(SpecError::Profile {
                line,
                column: cells.len().min(4) + 1,
                message: format!("expected 4 columns, found {}", cells.len()),
            });
        }
        let batch = parse_number(cells[1], line, 2, "batch")?;
        let tokens = parse_number(cells[2], line, 3, "tokens")?;
        let ms = parse_number(cells[3], line, 4, "milliseconds")?;
        if ms <= 0.0 {
            return Err(SpecError::Profile {
                line,
                column: 4,
                message: "milliseconds must be greater than 0".into(),
            });
        }
        match cells[0] {
            "decode" => {
                if batch < 1.0 {
                    return Err(SpecError::Profile {
                        line,
                        column: 2,
                        message: "a decode batch is at least 1".into(),
                    });
                }
                decode.push(DecodePoint {
                    batch,
                    context_tokens: tokens,
                    step_s: ms / 1000.0,
                })
            }
            "prefill" => prefill.push(PrefillPoint {
                prompt_tokens: tokens,
                prefill_s: ms / 1000.0,
            }),
            other => {
                return Err(SpecError::Profile {
                    line,
                    column: 1,
                    message: format!("phase {other:?} is neither decode nor prefill"),
                });
            }
        }
    }
    if !header_seen {
        return Err(SpecError::Profile {
            line: text.lines().count().max(1),
            column: 0,
            message: "no header phase,batch,tokens,milliseconds found".into(),
        });
    }
    let kv = kv.ok_or(SpecError::Profile {
        line: 1,
        column: 0,
        message: "missing metadata line `# kv_capacity_tokens: <tokens>`".into(),
    })?;
    PerfModel::fit(
        ProfileMeta {
            name: name.unwrap_or_else(|| "profile".into()),
            gpu: gpu.unwrap_or_default(),
            gpus_per_replica: gpus.max(1),
            kv_capacity_tokens: kv,
            max_batch: max_batch.max(1),
        },
        &decode,
        &prefill,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_builds_and_fits_its_data() {
        for name in PRESET_NAMES {
            let (m, r) = preset_with_report(name).unwrap_or_else(|| panic!("{name} missing"));
            println!(
                "{name}: decode rms {:.1}% max {:.1}% ({} pts); prefill rms {:.1}% max {:.1}% ({} pts); \
                 t = {:.3} + {:.5}·B + {:.3e}·B·L + {:.3e}·B² ms; p = {:.2} + {:.4}·T + {:.3e}·T² ms; kv {}",
                100.0 * r.decode_rms_rel_error,
                100.0 * r.decode_max_rel_error,
                r.decode_points,
                100.0 * r.prefill_rms_rel_error,
                100.0 * r.prefill_max_rel_error,
                r.prefill_points,
                m.decode_base_s * 1e3,
                m.decode_per_seq_s * 1e3,
                m.decode_per_seq_token_s * 1e3,
                m.decode_per_seq_sq_s * 1e3,
                m.prefill_base_s * 1e3,
                m.prefill_per_token_s * 1e3,
                m.prefill_per_token_sq_s * 1e3,
                m.kv_capacity_tokens,
            );
            assert!(r.decode_rms_rel_error < 0.08, "{name} decode fit");
            assert!(r.prefill_rms_rel_error < 0.15, "{name} prefill fit");
        }
    }

    const PROFILE: &str = "# name: my-model-h100\n# gpu: H100\n# gpus_per_replica: 1\n\
# kv_capacity_tokens: 500000\nphase,batch,tokens,milliseconds\n\
decode,1,512,5.56\ndecode,64,512,7.65\ndecode,64,2048,10.4\ndecode,256,2048,24.5\n\
prefill,1,128,12.1\nprefill,1,1024,27.6\nprefill,1,4096,111.6\n";

    #[test]
    fn a_gpuscale_profile_file_reads_and_fits() {
        let (m, r) =
            PerfModel::from_profile_csv_with_report(PROFILE, &ProfileFormat::Gpuscale).unwrap();
        assert_eq!(m.name, "my-model-h100");
        assert_eq!(m.gpu, "H100");
        assert_eq!(m.kv_capacity_tokens, 500_000.0);
        assert_eq!(m.max_batch, 256);
        assert!(r.decode_max_rel_error < 0.1, "{r:?}");
        assert!((m.decode_step_s(64.0, 2048.0) - 0.0104).abs() < 0.001);
    }

    #[test]
    fn profile_errors_name_line_and_column() {
        let bad = PROFILE.replace("decode,64,2048,10.4", "decode,64,2048,ten");
        match PerfModel::from_profile_csv(&bad, &ProfileFormat::Gpuscale) {
            Err(SpecError::Profile {
                line,
                column,
                message,
            }) => {
                assert_eq!((line, column), (8, 4), "{message}");
                assert!(message.contains("ten"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let bad = PROFILE.replace("prefill,1,128,12.1", "warmup,1,128,12.1");
        assert!(matches!(
            PerfModel::from_profile_csv(&bad, &ProfileFormat::Gpuscale),
            Err(SpecError::Profile {
                line: 10,
                column: 1,
                ..
            })
        ));
        let bad = PROFILE.replace("# kv_capacity_tokens: 500000\n", "");
        assert!(
            PerfModel::from_profile_csv(&bad, &ProfileFormat::Gpuscale)
                .unwrap_err()
                .to_string()
                .contains("kv_capacity_tokens")
        );
        let bad = PROFILE.replace("phase,batch,tokens,milliseconds", "phase,batch");
        assert!(PerfModel::from_profile_csv(&bad, &ProfileFormat::Gpuscale).is_err());
    }
}
