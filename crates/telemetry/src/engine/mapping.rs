//! Each framework's metric names mapped to one model (REFERENCE §6.1–6.7).
//!
//! | concept | vLLM | SGLang | TGI | llama.cpp | Triton + TRT-LLM | trtllm-serve |
//! |---|---|---|---|---|---|---|
//! | waiting | `num_requests_waiting` | `num_queue_reqs` | `tgi_queue_size` | `requests_deferred` | `request_type="waiting"`, else `nv_inference_pending_request_count` | `num_requests_waiting`, else JSON `numQueuedRequests + numPausedRequests` |
//! | running | `num_requests_running` | `num_running_reqs` | `tgi_batch_current_size` | `requests_processing` | `request_type="scheduled"`, else `"active"` | `num_requests_running`, else JSON `numActiveRequests` |
//! | KV 0–1 | `kv_cache_usage_perc` (was `gpu_cache_usage_perc`) | `token_usage` | `current_max_tokens / max_total_tokens` | `kv_cache_usage_ratio` (until May 2025) | `kv_cache_block_type="fraction"`, else `used / max` | `kv_cache_utilization`, else JSON `usedNumBlocks / maxNumBlocks` |
//! | KV tokens | `cache_config_info` blocks × block size | `max_total_num_tokens` | `tgi_batch_max_total_tokens` | – | max blocks × tokens per block | max blocks × tokens per block (text or JSON) |
//! | prompt tokens | `prompt_tokens_total` | `prompt_tokens_total` | `tgi_request_input_length_sum` | `prompt_tokens_total` | `nv_llm_input_token_len_sum` | `prompt_tokens_total` |
//! | generated tokens | `generation_tokens_total` | `generation_tokens_total` | `tgi_request_generated_tokens_sum` | `tokens_predicted_total` | `nv_llm_output_token_len_sum` | `generation_tokens_total` |
//! | arrived | – | – | `tgi_request_count` | – | – | – |
//! | finished | `request_success_total` | `num_requests_total` | `tgi_request_success` | – | `nv_inference_request_success` | `request_success_total` |
//! | preemptions | `num_preemptions_total` | – (a gauge only) | – | – | – (a gauge only) | – |
//! | TTFT | `time_to_first_token_seconds` | same | – | – | `nv_inference_first_response_histogram_ms` (opt-in) | same |
//! | ITL (token-level) | `inter_token_latency_seconds` (was `time_per_output_token_seconds`) | same (older: `time_per_output_token_seconds`) | – | – | – | – |
//! | TPOT (request-level) | `request_time_per_output_token_seconds` | same | `tgi_request_mean_time_per_token_duration` (includes prefill) | – | – | `time_per_output_token_seconds` |
//! | batch limit | – | – | – | – | `request_type="max"` | JSON `maxNumActiveRequests` |
//!
//! Aggregation over labels: vLLM data-parallel `engine`s are summed (their
//! KV ratios averaged). SGLang is summed over its schedulers: each
//! data-parallel rank (`dp_rank`, with DP attention) is a scheduler of its
//! own, while the tensor- and pipeline-parallel ranks of one scheduler
//! (`tp_rank`, `pp_rank`, `moe_ep_rank`, with
//! `--enable-metrics-for-all-schedulers`) repeat its counts, so of those
//! only the lowest rank is kept. Triton's `nv_inference_*` series are taken
//! for the served model (the `ensemble` when there is one), so an
//! ensemble's steps are not counted twice. trtllm-serve's names are read
//! with and without the `trtllm_` prefix (its own server exports them
//! unprefixed; some deployments add the prefix), the prefixed name first;
//! its JSON iteration stats ([`TrtllmIterationStats`]) fill what the text
//! lacks.
//!
//! A metric the engine does not export is `None`, never zero. A series that
//! is exported but NaN or infinite is `None` too, and named in
//! [`EngineReading::non_finite`] (it never falls back to another series, as
//! Triton's `scheduled` once fell back to `active`). Pure code.

use std::collections::HashMap;

use gpuscale_core::Histogram;
use gpuscale_core::sample::Framework;

use crate::prom_text::{Exposition, PromSample};

/// What one scrape says, before counter-reset handling.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineReading {
    /// The served model from the labels, when there is one.
    pub model: Option<String>,
    pub requests_waiting: Option<f64>,
    pub requests_running: Option<f64>,
    pub kv_cache_usage_ratio: Option<f64>,
    pub kv_capacity_tokens: Option<f64>,
    pub queued_prompt_tokens: Option<f64>,
    pub prompt_tokens_total: Option<f64>,
    pub generation_tokens_total: Option<f64>,
    pub requests_arrived_total: Option<f64>,
    pub requests_finished_total: Option<f64>,
    pub preemptions_total: Option<f64>,
    pub ttft_seconds: Option<Histogram>,
    pub itl_seconds: Option<Histogram>,
    /// Request-level time per output token.
    pub tpot_seconds: Option<Histogram>,
    pub batch_limit: Option<u32>,
    pub mean_context_tokens: Option<f64>,
    /// Histograms present but inconsistent, left out (`name: why`).
    pub invalid_histograms: Vec<String>,
    /// Series read whose value was NaN or infinite: missing this round.
    pub non_finite: Vec<String>,
    /// Sample lines that repeated a series already read (kept once).
    pub duplicate_series: usize,
}

impl EngineReading {
    /// True when the reading holds no value at all: an empty body, a 204,
    /// or the text of another framework (`--engine` naming the wrong one).
    pub fn has_no_data(&self) -> bool {
        self.requests_waiting.is_none()
            && self.requests_running.is_none()
            && self.kv_cache_usage_ratio.is_none()
            && self.kv_capacity_tokens.is_none()
            && self.queued_prompt_tokens.is_none()
            && self.prompt_tokens_total.is_none()
            && self.generation_tokens_total.is_none()
            && self.requests_arrived_total.is_none()
            && self.requests_finished_total.is_none()
            && self.preemptions_total.is_none()
            && self.ttft_seconds.is_none()
            && self.itl_seconds.is_none()
            && self.tpot_seconds.is_none()
            && self.batch_limit.is_none()
            && self.mean_context_tokens.is_none()
    }
}

/// trtllm-serve's names without the `trtllm_` prefix, as its own server
/// exports them (histograms with their `_bucket`/`_sum`/`_count`).
const TRTLLM_SERVE_NAMES: &[&str] = &[
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_utilization",
    "kv_cache_max_blocks",
    "kv_cache_tokens_per_block",
    "time_to_first_token_seconds",
    "time_per_output_token_seconds",
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
];

/// Whether the mapping of `framework` reads series named `name`; everything
/// else is skipped while parsing (and its value never interpreted).
pub fn keeps(framework: Framework, name: &str) -> bool {
    let prefixes: &[&str] = match framework {
        Framework::Vllm => &["vllm:"],
        Framework::Sglang => &["sglang:"],
        Framework::Tgi => &["tgi_"],
        Framework::TritonTrtllm => &["nv_trt_llm_", "nv_llm_", "nv_inference_"],
        Framework::TrtllmServe => {
            return name.starts_with("trtllm_")
                || TRTLLM_SERVE_NAMES.iter().any(|n| name.starts_with(n));
        }
        Framework::LlamaCpp => &["llamacpp:"],
        Framework::Push | Framework::Fake => &[],
    };
    prefixes.iter().any(|p| name.starts_with(p))
}

type Filter<'a> = &'a dyn Fn(&PromSample) -> bool;

fn any(_: &PromSample) -> bool {
    true
}

/// Reads values out of one exposition, remembering which series were
/// present but not finite.
struct Reader<'a> {
    exp: &'a Exposition,
    non_finite: Vec<String>,
}

impl<'a> Reader<'a> {
    fn new(exp: &'a Exposition) -> Self {
        Self {
            exp,
            non_finite: Vec::new(),
        }
    }

    /// Whether any sample of `name` matches.
    fn present(&self, name: &str, filter: Filter<'_>) -> bool {
        self.exp.samples(name).any(filter)
    }

    /// The matching values; `None` when there is none, or when one is not
    /// finite (then `name` is recorded).
    fn values(&mut self, name: &str, filter: Filter<'_>) -> Option<Vec<f64>> {
        let values: Vec<f64> = self
            .exp
            .samples(name)
            .filter(|s| filter(s))
            .map(|s| s.value)
            .collect();
        if values.is_empty() {
            return None;
        }
        if values.iter().any(|v| !v.is_finite()) {
            self.non_finite.push(name.to_string());
            return None;
        }
        Some(values)
    }

    /// Sum of the matching samples.
    fn sum(&mut self, name: &str, filter: Filter<'_>) -> Option<f64> {
        self.values(name, filter).map(|v| v.iter().sum())
    }

    fn mean(&mut self, name: &str, filter: Filter<'_>) -> Option<f64> {
        self.values(name, filter)
            .map(|v| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// The sum of the first of `names` that is present.
    fn sum_first(&mut self, names: &[&str], filter: Filter<'_>) -> Option<f64> {
        let name = names.iter().find(|n| self.present(n, filter))?;
        self.sum(name, filter)
    }

    fn mean_first(&mut self, names: &[&str], filter: Filter<'_>) -> Option<f64> {
        let name = names.iter().find(|n| self.present(n, filter))?;
        self.mean(name, filter)
    }

    fn finish(self, mut reading: EngineReading) -> EngineReading {
        reading.non_finite = self.non_finite;
        reading.duplicate_series = self.exp.duplicates().len();
        reading
    }
}

fn first_label(
    exp: &Exposition,
    names: &[&str],
    label: &str,
    filter: Filter<'_>,
) -> Option<String> {
    names.iter().find_map(|n| {
        exp.samples(n)
            .filter(|s| filter(s))
            .find_map(|s| s.label(label).map(str::to_string))
    })
}

fn ratio(v: Option<f64>) -> Option<f64> {
    v.map(|r| r.clamp(0.0, 1.0))
}

fn nonneg(v: Option<f64>) -> Option<f64> {
    v.filter(|x| *x >= 0.0)
}

/// A histogram family (`<base>_bucket` / `_sum` / `_count`) merged over its
/// label sets, bounds and sum multiplied by `scale` (e.g. 0.001 for ms).
/// `Ok(None)` when the family is absent.
fn histogram(
    exp: &Exposition,
    base: &str,
    filter: Filter<'_>,
    scale: f64,
) -> Result<Option<Histogram>, String> {
    let bucket_name = format!("{base}_bucket");
    if !exp.has(&bucket_name) {
        return Ok(None);
    }
    // Label set without `le` → (bound, count) pairs.
    type Key = Vec<(String, String)>;
    let mut groups: Vec<(Key, Vec<(f64, f64)>)> = Vec::new();
    for s in exp.samples(&bucket_name).filter(|s| filter(s)) {
        let le = s
            .label("le")
            .ok_or_else(|| format!("{bucket_name}: a bucket without `le`"))?;
        let bound = match le {
            "+Inf" | "Inf" => f64::INFINITY,
            other => other
                .parse::<f64>()
                .map_err(|_| format!("{bucket_name}: le=\"{other}\" is not a number"))?,
        };
        let key: Key = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, b)) => b.push((bound, s.value)),
            None => groups.push((key, vec![(bound, s.value)])),
        }
    }
    let mut merged: Option<Histogram> = None;
    for (key, mut buckets) in groups {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let same = |s: &&PromSample| {
            s.labels.len() == key.len() && key.iter().all(|(k, v)| s.label(k) == Some(v.as_str()))
        };
        let sum_v = exp
            .samples(&format!("{base}_sum"))
            .find(|s| same(s))
            .map(|s| s.value * scale)
            .ok_or_else(|| format!("{base}: buckets without `_sum`"))?;
        if !sum_v.is_finite() {
            return Err(format!("{base}: sum {sum_v} is not a number"));
        }
        let count_v = exp
            .samples(&format!("{base}_count"))
            .find(|s| same(s))
            .map(|s| s.value)
            .ok_or_else(|| format!("{base}: buckets without `_count`"))?;
        let to_count = |v: f64| -> Result<u64, String> {
            if v.is_finite() && v >= 0.0 {
                Ok(v.round() as u64)
            } else {
                Err(format!("{base}: count {v} is not a non-negative number"))
            }
        };
        let bounds: Vec<f64> = buckets
            .iter()
            .map(|(b, _)| if b.is_finite() { b * scale } else { *b })
            .collect();
        let counts = buckets
            .iter()
            .map(|(_, c)| to_count(*c))
            .collect::<Result<Vec<u64>, String>>()?;
        let h = Histogram::from_parts(bounds, counts, sum_v.max(0.0), to_count(count_v)?)
            .map_err(|e| format!("{base}: {e}"))?;
        match merged.as_mut() {
            None => merged = Some(h),
            Some(m) => m.merge(&h).map_err(|e| format!("{base}: {e}"))?,
        }
    }
    Ok(merged)
}

/// Reads a histogram into `slot`, recording why it was left out if invalid.
fn read_histogram(
    reading: &mut EngineReading,
    exp: &Exposition,
    names: &[&str],
    filter: Filter<'_>,
    scale: f64,
) -> Option<Histogram> {
    for name in names {
        match histogram(exp, name, filter, scale) {
            Ok(Some(h)) => return Some(h),
            Ok(None) => continue,
            Err(why) => {
                reading.invalid_histograms.push(why);
                return None;
            }
        }
    }
    None
}

/// Maps one exposition. `model_hint` (from the target's configuration)
/// picks the model where the metrics carry several (Triton).
pub fn map_exposition(
    framework: Framework,
    exp: &Exposition,
    model_hint: Option<&str>,
) -> EngineReading {
    let mut rd = Reader::new(exp);
    let reading = match framework {
        Framework::Vllm => map_vllm(&mut rd),
        Framework::Sglang => map_sglang(&mut rd),
        Framework::Tgi => map_tgi(&mut rd),
        Framework::TritonTrtllm => map_triton(&mut rd, model_hint),
        Framework::TrtllmServe => map_trtllm_serve(&mut rd),
        Framework::LlamaCpp => map_llamacpp(&mut rd),
        Framework::Push | Framework::Fake => EngineReading::default(),
    };
    rd.finish(reading)
}

fn map_vllm(rd: &mut Reader<'_>) -> EngineReading {
    let exp = rd.exp;
    let mut r = EngineReading {
        model: first_label(
            exp,
            &["vllm:num_requests_running", "vllm:generation_tokens_total"],
            "model_name",
            &any,
        ),
        requests_waiting: nonneg(rd.sum("vllm:num_requests_waiting", &any)),
        requests_running: nonneg(rd.sum("vllm:num_requests_running", &any)),
        kv_cache_usage_ratio: ratio(rd.mean_first(
            &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
            &any,
        )),
        prompt_tokens_total: nonneg(rd.sum("vllm:prompt_tokens_total", &any)),
        generation_tokens_total: nonneg(rd.sum("vllm:generation_tokens_total", &any)),
        requests_finished_total: nonneg(rd.sum("vllm:request_success_total", &any)),
        preemptions_total: nonneg(rd.sum("vllm:num_preemptions_total", &any)),
        ..EngineReading::default()
    };
    // KV capacity: every engine's cache_config_info{num_gpu_blocks, block_size}.
    let mut capacity = None;
    for s in exp.samples("vllm:cache_config_info") {
        let blocks = s
            .label("num_gpu_blocks")
            .and_then(|v| v.parse::<f64>().ok());
        let block_size = s.label("block_size").and_then(|v| v.parse::<f64>().ok());
        if let (Some(b), Some(size)) = (blocks, block_size) {
            *capacity.get_or_insert(0.0) += b * size;
        }
    }
    r.kv_capacity_tokens = capacity.filter(|c: &f64| c.is_finite());
    r.ttft_seconds = read_histogram(
        &mut r,
        exp,
        &["vllm:time_to_first_token_seconds"],
        &any,
        1.0,
    );
    r.itl_seconds = read_histogram(
        &mut r,
        exp,
        &[
            "vllm:inter_token_latency_seconds",
            "vllm:time_per_output_token_seconds",
        ],
        &any,
        1.0,
    );
    r.tpot_seconds = read_histogram(
        &mut r,
        exp,
        &["vllm:request_time_per_output_token_seconds"],
        &any,
        1.0,
    );
    r
}

/// Labels that tell the ranks of one SGLang scheduler apart; the rest (with
/// `dp_rank`, and `priority` and the like) tell series apart.
const SGLANG_RANK_LABELS: &[&str] = &["tp_rank", "pp_rank", "moe_ep_rank"];

type SchedulerKey = Vec<(String, String)>;

fn sglang_scheduler(s: &PromSample) -> SchedulerKey {
    let mut key: SchedulerKey = s
        .labels
        .iter()
        .filter(|(k, _)| k != "le" && !SGLANG_RANK_LABELS.contains(&k.as_str()))
        .cloned()
        .collect();
    key.sort();
    key
}

fn sglang_rank(s: &PromSample) -> (u32, u32) {
    let rank = |label: &str| {
        s.label(label)
            .map_or(0, |v| v.trim().parse::<u32>().unwrap_or(u32::MAX))
    };
    (rank("pp_rank"), rank("tp_rank"))
}

/// Which samples of `name` speak for their scheduler: per scheduler key,
/// only those of the lowest (pipeline, tensor) rank.
struct SglangLeaders(HashMap<SchedulerKey, (u32, u32)>);

impl SglangLeaders {
    fn of(exp: &Exposition, name: &str) -> Self {
        let mut lowest: HashMap<SchedulerKey, (u32, u32)> = HashMap::new();
        for s in exp.samples(name) {
            let rank = sglang_rank(s);
            lowest
                .entry(sglang_scheduler(s))
                .and_modify(|r| *r = (*r).min(rank))
                .or_insert(rank);
        }
        Self(lowest)
    }

    fn keeps(&self, s: &PromSample) -> bool {
        self.0.get(&sglang_scheduler(s)) == Some(&sglang_rank(s))
    }
}

fn sglang_sum(rd: &mut Reader<'_>, name: &str) -> Option<f64> {
    let leaders = SglangLeaders::of(rd.exp, name);
    rd.sum(name, &|s| leaders.keeps(s))
}

fn sglang_histogram(r: &mut EngineReading, exp: &Exposition, names: &[&str]) -> Option<Histogram> {
    let name = names.iter().find(|n| exp.has(&format!("{n}_bucket")))?;
    let leaders = SglangLeaders::of(exp, &format!("{name}_bucket"));
    read_histogram(r, exp, &[name], &|s| leaders.keeps(s), 1.0)
}

fn map_sglang(rd: &mut Reader<'_>) -> EngineReading {
    let exp = rd.exp;
    let usage = {
        let leaders = SglangLeaders::of(exp, "sglang:token_usage");
        rd.mean("sglang:token_usage", &|s| leaders.keeps(s))
    };
    let mut r = EngineReading {
        model: first_label(
            exp,
            &["sglang:num_running_reqs", "sglang:generation_tokens_total"],
            "model_name",
            &any,
        ),
        requests_waiting: nonneg(sglang_sum(rd, "sglang:num_queue_reqs")),
        requests_running: nonneg(sglang_sum(rd, "sglang:num_running_reqs")),
        kv_cache_usage_ratio: ratio(usage),
        kv_capacity_tokens: nonneg(sglang_sum(rd, "sglang:max_total_num_tokens")),
        prompt_tokens_total: nonneg(sglang_sum(rd, "sglang:prompt_tokens_total")),
        generation_tokens_total: nonneg(sglang_sum(rd, "sglang:generation_tokens_total")),
        requests_finished_total: nonneg(sglang_sum(rd, "sglang:num_requests_total")),
        ..EngineReading::default()
    };
    r.ttft_seconds = sglang_histogram(&mut r, exp, &["sglang:time_to_first_token_seconds"]);
    r.itl_seconds = sglang_histogram(
        &mut r,
        exp,
        &[
            "sglang:inter_token_latency_seconds",
            "sglang:time_per_output_token_seconds",
        ],
    );
    r.tpot_seconds = sglang_histogram(
        &mut r,
        exp,
        &["sglang:request_time_per_output_token_seconds"],
    );
    r
}

fn map_tgi(rd: &mut Reader<'_>) -> EngineReading {
    let exp = rd.exp;
    let current = rd.sum("tgi_batch_current_max_tokens", &any);
    let max_total = rd.sum("tgi_batch_max_total_tokens", &any);
    let mut r = EngineReading {
        requests_waiting: nonneg(rd.sum("tgi_queue_size", &any)),
        requests_running: nonneg(rd.sum("tgi_batch_current_size", &any)),
        kv_cache_usage_ratio: match (current, max_total) {
            (Some(c), Some(m)) if m > 0.0 => ratio(Some(c / m)),
            _ => None,
        },
        kv_capacity_tokens: nonneg(max_total),
        prompt_tokens_total: nonneg(rd.sum("tgi_request_input_length_sum", &any)),
        generation_tokens_total: nonneg(rd.sum("tgi_request_generated_tokens_sum", &any)),
        requests_arrived_total: nonneg(rd.sum("tgi_request_count", &any)),
        requests_finished_total: nonneg(rd.sum("tgi_request_success", &any)),
        ..EngineReading::default()
    };
    // No TTFT histogram in TGI and no token-level ITL. Its per-request mean
    // time per token includes prefill: a conservative TPOT.
    r.tpot_seconds = read_histogram(
        &mut r,
        exp,
        &["tgi_request_mean_time_per_token_duration"],
        &any,
        1.0,
    );
    r
}

fn map_triton(rd: &mut Reader<'_>, model_hint: Option<&str>) -> EngineReading {
    let exp = rd.exp;
    // Which model's `nv_inference_*` series speak for the endpoint.
    let model = model_hint.map(str::to_string).or_else(|| {
        let models: Vec<&str> = exp
            .samples("nv_inference_request_success")
            .filter_map(|s| s.label("model"))
            .collect();
        if models.contains(&"ensemble") {
            Some("ensemble".to_string())
        } else {
            first_label(exp, &["nv_trt_llm_request_metrics"], "model", &any)
                .or_else(|| models.first().map(|m| m.to_string()))
        }
    });
    let served = |s: &PromSample| match &model {
        Some(m) => s.label("model") == Some(m.as_str()),
        None => true,
    };
    let request = |t: &'static str| move |s: &PromSample| s.label("request_type") == Some(t);
    let block = |t: &'static str| move |s: &PromSample| s.label("kv_cache_block_type") == Some(t);
    let trt_req = "nv_trt_llm_request_metrics";
    let trt_kv = "nv_trt_llm_kv_cache_block_metrics";
    let max_blocks = rd.sum(trt_kv, &block("max"));
    let tokens_per = rd.sum(trt_kv, &block("tokens_per"));
    // A series that is there but not a number is missing, never replaced
    // by a neighbour with another meaning.
    let waiting = if rd.present(trt_req, &request("waiting")) {
        rd.sum(trt_req, &request("waiting"))
    } else {
        rd.sum("nv_inference_pending_request_count", &served)
    };
    let running = if rd.present(trt_req, &request("scheduled")) {
        rd.sum(trt_req, &request("scheduled"))
    } else {
        rd.sum(trt_req, &request("active"))
    };
    // Before 2025 the backend had no `fraction`: used over max blocks.
    let kv_ratio = if rd.present(trt_kv, &block("fraction")) {
        rd.mean(trt_kv, &block("fraction"))
    } else {
        match (rd.sum(trt_kv, &block("used")), max_blocks) {
            (Some(used), Some(max)) if max > 0.0 => Some(used / max),
            _ => None,
        }
    };
    let mut r = EngineReading {
        model: model.clone(),
        requests_waiting: nonneg(waiting),
        requests_running: nonneg(running),
        batch_limit: rd
            .sum(trt_req, &request("max"))
            .filter(|m| *m >= 0.0 && *m <= f64::from(u32::MAX))
            .map(|m| m.round() as u32),
        kv_cache_usage_ratio: ratio(kv_ratio),
        kv_capacity_tokens: match (max_blocks, tokens_per) {
            (Some(b), Some(t)) => nonneg(Some(b * t)),
            _ => None,
        },
        prompt_tokens_total: nonneg(rd.sum("nv_llm_input_token_len_sum", &any)),
        generation_tokens_total: nonneg(rd.sum("nv_llm_output_token_len_sum", &any)),
        requests_finished_total: nonneg(rd.sum("nv_inference_request_success", &served)),
        ..EngineReading::default()
    };
    // Opt-in, decoupled models only, and the first response chunk rather
    // than strictly the first token.
    r.ttft_seconds = read_histogram(
        &mut r,
        exp,
        &["nv_inference_first_response_histogram_ms"],
        &served,
        0.001,
    );
    r
}

fn map_trtllm_serve(rd: &mut Reader<'_>) -> EngineReading {
    let exp = rd.exp;
    // The `trtllm_`-prefixed name first, then trtllm-serve's own.
    let both = |base: &'static str| -> [String; 2] { [format!("trtllm_{base}"), base.to_string()] };
    let sum = |rd: &mut Reader<'_>, base: &'static str| {
        let names = both(base);
        rd.sum_first(&[names[0].as_str(), names[1].as_str()], &any)
    };
    let max_blocks = sum(rd, "kv_cache_max_blocks");
    let tokens_per = sum(rd, "kv_cache_tokens_per_block");
    let [util_prefixed, util] = both("kv_cache_utilization");
    let mut r = EngineReading {
        model: first_label(
            exp,
            &[
                "trtllm_num_requests_running",
                "num_requests_running",
                "request_success_total",
                "time_to_first_token_seconds_count",
                "e2e_request_latency_seconds_count",
            ],
            "model_name",
            &any,
        ),
        requests_waiting: nonneg(sum(rd, "num_requests_waiting")),
        requests_running: nonneg(sum(rd, "num_requests_running")),
        kv_cache_usage_ratio: ratio(rd.mean_first(&[&util_prefixed, &util], &any)),
        kv_capacity_tokens: match (max_blocks, tokens_per) {
            (Some(b), Some(t)) => nonneg(Some(b * t)),
            _ => None,
        },
        prompt_tokens_total: nonneg(sum(rd, "prompt_tokens_total")),
        generation_tokens_total: nonneg(sum(rd, "generation_tokens_total")),
        requests_finished_total: nonneg(sum(rd, "request_success_total")),
        ..EngineReading::default()
    };
    let [ttft_prefixed, ttft] = both("time_to_first_token_seconds");
    r.ttft_seconds = read_histogram(&mut r, exp, &[&ttft_prefixed, &ttft], &any, 1.0);
    // Recorded per finished request (its decode time over its output tokens).
    let [tpot_prefixed, tpot] = both("time_per_output_token_seconds");
    r.tpot_seconds = read_histogram(&mut r, exp, &[&tpot_prefixed, &tpot], &any, 1.0);
    r
}

fn map_llamacpp(rd: &mut Reader<'_>) -> EngineReading {
    EngineReading {
        requests_waiting: nonneg(rd.sum("llamacpp:requests_deferred", &any)),
        requests_running: nonneg(rd.sum("llamacpp:requests_processing", &any)),
        // Until PR #13660 (May 2025); later builds have no KV metric.
        kv_cache_usage_ratio: ratio(rd.sum("llamacpp:kv_cache_usage_ratio", &any)),
        prompt_tokens_total: nonneg(rd.sum("llamacpp:prompt_tokens_total", &any)),
        generation_tokens_total: nonneg(rd.sum("llamacpp:tokens_predicted_total", &any)),
        ..EngineReading::default()
    }
}

/// What trtllm-serve's JSON `/metrics` (its iteration stats) says: the
/// newest iteration's active and queued requests and KV-cache blocks, which
/// its Prometheus text lacks. The endpoint hands out each iteration's stats
/// once (a queue drained by every call), and only when the server collects
/// them (`enable_iter_perf_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrtllmIterationStats {
    /// Iterations in this answer (0: no iteration ran since the last call).
    pub iterations: usize,
    pub active_requests: Option<f64>,
    pub queued_requests: Option<f64>,
    pub paused_requests: Option<f64>,
    pub max_active_requests: Option<f64>,
    pub kv_used_blocks: Option<f64>,
    pub kv_max_blocks: Option<f64>,
    pub kv_tokens_per_block: Option<f64>,
}

impl TrtllmIterationStats {
    /// Reads the answer: a JSON array of iteration objects (the one with
    /// the highest `iter` is the newest). An error names what is wrong.
    pub fn parse(body: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        let items = value
            .as_array()
            .ok_or("not a JSON array of iteration stats")?;
        let newest = items
            .iter()
            .filter(|i| i.is_object())
            .enumerate()
            .max_by_key(|(pos, i)| (i.get("iter").and_then(|v| v.as_u64()), *pos))
            .map(|(_, i)| i);
        let Some(it) = newest else {
            if items.is_empty() {
                return Ok(Self::default());
            }
            return Err("no iteration object in the array".into());
        };
        let num = |v: Option<&serde_json::Value>| {
            v.and_then(|v| v.as_f64())
                .filter(|x| x.is_finite() && *x >= 0.0)
        };
        let kv = it.get("kvCacheStats");
        let batch = it.get("inflightBatchingStats");
        let kv_max_blocks = num(kv.and_then(|k| k.get("maxNumBlocks")));
        let kv_used_blocks = num(kv.and_then(|k| k.get("usedNumBlocks"))).or_else(|| {
            let free = num(kv.and_then(|k| k.get("freeNumBlocks")))?;
            Some((kv_max_blocks? - free).max(0.0))
        });
        Ok(Self {
            iterations: items.len(),
            active_requests: num(it.get("numActiveRequests")),
            queued_requests: num(it.get("numQueuedRequests")),
            paused_requests: num(batch.and_then(|b| b.get("numPausedRequests"))),
            max_active_requests: num(it.get("maxNumActiveRequests")),
            kv_used_blocks,
            kv_max_blocks,
            kv_tokens_per_block: num(kv.and_then(|k| k.get("tokensPerBlock"))),
        })
    }

    /// Fills what the Prometheus text left missing. `previous` is the last
    /// answer that held iterations: when this one holds none, no iteration
    /// ran since, so nothing was running or waiting (the cache's size is
    /// carried over); before any iteration was seen, an empty answer says
    /// nothing (the server may not collect stats at all).
    pub fn fill(&self, previous: Option<&Self>, reading: &mut EngineReading) {
        let current = if self.iterations > 0 {
            *self
        } else if let Some(prev) = previous {
            Self {
                iterations: 0,
                active_requests: Some(0.0),
                queued_requests: Some(0.0),
                paused_requests: Some(0.0),
                ..*prev
            }
        } else {
            return;
        };
        let waiting = match (current.queued_requests, current.paused_requests) {
            (Some(q), Some(p)) => Some(q + p),
            (q, _) => q,
        };
        reading.requests_running = reading.requests_running.or(current.active_requests);
        reading.requests_waiting = reading.requests_waiting.or(waiting);
        if reading.kv_cache_usage_ratio.is_none()
            && let (Some(used), Some(max)) = (current.kv_used_blocks, current.kv_max_blocks)
            && max > 0.0
        {
            reading.kv_cache_usage_ratio = ratio(Some(used / max));
        }
        if reading.kv_capacity_tokens.is_none()
            && let (Some(max), Some(per)) = (current.kv_max_blocks, current.kv_tokens_per_block)
        {
            reading.kv_capacity_tokens = nonneg(Some(max * per));
        }
        if reading.batch_limit.is_none() {
            reading.batch_limit = current
                .max_active_requests
                .filter(|m| *m <= f64::from(u32::MAX))
                .map(|m| m.round() as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(text: &str) -> Exposition {
        Exposition::parse(text).unwrap()
    }

    #[test]
    fn a_missing_metric_is_none_not_zero() {
        let r = map_exposition(Framework::Vllm, &exp("vllm:num_requests_running 3\n"), None);
        assert_eq!(r.requests_running, Some(3.0));
        assert_eq!(r.requests_waiting, None);
        assert_eq!(r.kv_cache_usage_ratio, None);
        assert_eq!(r.ttft_seconds, None);
    }

    #[test]
    fn histograms_merge_over_label_sets() {
        let text = "h_bucket{engine=\"0\",le=\"0.1\"} 1\nh_bucket{engine=\"0\",le=\"+Inf\"} 2\n\
                    h_sum{engine=\"0\"} 0.5\nh_count{engine=\"0\"} 2\n\
                    h_bucket{engine=\"1\",le=\"0.1\"} 3\nh_bucket{engine=\"1\",le=\"+Inf\"} 3\n\
                    h_sum{engine=\"1\"} 0.2\nh_count{engine=\"1\"} 3\n";
        let h = histogram(&exp(text), "h", &any, 1.0).unwrap().unwrap();
        assert_eq!(h.count(), 5);
        assert_eq!(h.cumulative_counts(), &[4, 5]);
        assert!((h.sum() - 0.7).abs() < 1e-9);
    }

    #[test]
    fn an_inconsistent_histogram_is_left_out_with_a_reason() {
        // Buckets go down.
        let text = "vllm:time_to_first_token_seconds_bucket{le=\"0.1\"} 5\n\
                    vllm:time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n\
                    vllm:time_to_first_token_seconds_sum 1\n\
                    vllm:time_to_first_token_seconds_count 3\n";
        let r = map_exposition(Framework::Vllm, &exp(text), None);
        assert_eq!(r.ttft_seconds, None);
        assert_eq!(r.invalid_histograms.len(), 1, "{:?}", r.invalid_histograms);
    }

    #[test]
    fn millisecond_histograms_are_scaled_to_seconds() {
        let text = "nv_inference_first_response_histogram_ms_bucket{model=\"m\",le=\"100\"} 1\n\
                    nv_inference_first_response_histogram_ms_bucket{model=\"m\",le=\"+Inf\"} 1\n\
                    nv_inference_first_response_histogram_ms_sum{model=\"m\"} 50\n\
                    nv_inference_first_response_histogram_ms_count{model=\"m\"} 1\n";
        let r = map_exposition(Framework::TritonTrtllm, &exp(text), Some("m"));
        let h = r.ttft_seconds.unwrap();
        assert_eq!(h.bounds()[0], 0.1);
        assert!((h.sum() - 0.05).abs() < 1e-12);
    }
}
