//! Each framework's metric names mapped to one model (REFERENCE §6.1–6.7).
//!
//! | concept | vLLM | SGLang | TGI | llama.cpp | Triton + TRT-LLM | trtllm-serve |
//! |---|---|---|---|---|---|---|
//! | waiting | `num_requests_waiting` | `num_queue_reqs` | `tgi_queue_size` | `requests_deferred` | `request_type="waiting"`, else `nv_inference_pending_request_count` | `num_requests_waiting` |
//! | running | `num_requests_running` | `num_running_reqs` | `tgi_batch_current_size` | `requests_processing` | `request_type="scheduled"`, else `"active"` | `num_requests_running` |
//! | KV 0–1 | `kv_cache_usage_perc` (was `gpu_cache_usage_perc`) | `token_usage` | `current_max_tokens / max_total_tokens` | – | `kv_cache_block_type="fraction"` | `kv_cache_utilization` |
//! | KV tokens | `cache_config_info` blocks × block size | `max_total_num_tokens` | `tgi_batch_max_total_tokens` | – | max blocks × tokens per block | max blocks × tokens per block |
//! | prompt tokens | `prompt_tokens_total` | `prompt_tokens_total` | `tgi_request_input_length_sum` | `prompt_tokens_total` | `nv_llm_input_token_len_sum` | `prompt_tokens_total` |
//! | generated tokens | `generation_tokens_total` | `generation_tokens_total` | `tgi_request_generated_tokens_sum` | `tokens_predicted_total` | `nv_llm_output_token_len_sum` | `generation_tokens_total` |
//! | arrived | – | – | `tgi_request_count` | – | – | – |
//! | finished | `request_success_total` | `num_requests_total` | `tgi_request_success` | – | `nv_inference_request_success` | `request_success_total` |
//! | preemptions | `num_preemptions_total` | – (a gauge only) | – | – | – (a gauge only) | – |
//! | TTFT | `time_to_first_token_seconds` | same | – | – | `nv_inference_first_response_histogram_ms` (opt-in) | same |
//! | ITL (token-level) | `inter_token_latency_seconds` (was `time_per_output_token_seconds`) | same (older: `time_per_output_token_seconds`) | – | – | – | – |
//! | TPOT (request-level) | `request_time_per_output_token_seconds` | same | `tgi_request_mean_time_per_token_duration` (includes prefill) | – | – | `time_per_output_token_seconds` |
//! | batch limit | – | – | – | – | `request_type="max"` | – |
//!
//! Aggregation over labels: vLLM data-parallel `engine`s are summed (their
//! KV ratios averaged); SGLang keeps only `tp_rank="0"` (and `pp_rank="0"`),
//! since other ranks repeat the same counts; Triton's `nv_inference_*` series
//! are taken for the served model (the `ensemble` when there is one), so an
//! ensemble's steps are not counted twice. A metric the engine does not
//! export is `None`, never zero. Pure code.

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
}

/// Name prefixes a framework's mapping reads; everything else is skipped
/// while parsing.
pub fn metric_prefixes(framework: Framework) -> &'static [&'static str] {
    match framework {
        Framework::Vllm => &["vllm:"],
        Framework::Sglang => &["sglang:"],
        Framework::Tgi => &["tgi_"],
        Framework::TritonTrtllm => &["nv_trt_llm_", "nv_llm_", "nv_inference_"],
        Framework::TrtllmServe => &["trtllm_"],
        Framework::LlamaCpp => &["llamacpp:"],
        Framework::Push | Framework::Fake => &[],
    }
}

type Filter<'a> = &'a dyn Fn(&PromSample) -> bool;

fn any(_: &PromSample) -> bool {
    true
}

/// Sum of the matching samples; `None` when there is none (or one is not finite).
fn sum(exp: &Exposition, name: &str, filter: Filter<'_>) -> Option<f64> {
    let mut total = None;
    for s in exp.samples(name).filter(|s| filter(s)) {
        if !s.value.is_finite() {
            return None;
        }
        *total.get_or_insert(0.0) += s.value;
    }
    total
}

fn mean(exp: &Exposition, name: &str, filter: Filter<'_>) -> Option<f64> {
    let mut n = 0usize;
    let mut total = 0.0;
    for s in exp.samples(name).filter(|s| filter(s)) {
        if !s.value.is_finite() {
            return None;
        }
        n += 1;
        total += s.value;
    }
    (n > 0).then(|| total / n as f64)
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
    match framework {
        Framework::Vllm => map_vllm(exp),
        Framework::Sglang => map_sglang(exp),
        Framework::Tgi => map_tgi(exp),
        Framework::TritonTrtllm => map_triton(exp, model_hint),
        Framework::TrtllmServe => map_trtllm_serve(exp),
        Framework::LlamaCpp => map_llamacpp(exp),
        Framework::Push | Framework::Fake => EngineReading::default(),
    }
}

fn map_vllm(exp: &Exposition) -> EngineReading {
    let mut r = EngineReading {
        model: first_label(
            exp,
            &["vllm:num_requests_running", "vllm:generation_tokens_total"],
            "model_name",
            &any,
        ),
        requests_waiting: nonneg(sum(exp, "vllm:num_requests_waiting", &any)),
        requests_running: nonneg(sum(exp, "vllm:num_requests_running", &any)),
        kv_cache_usage_ratio: ratio(
            mean(exp, "vllm:kv_cache_usage_perc", &any)
                .or_else(|| mean(exp, "vllm:gpu_cache_usage_perc", &any)),
        ),
        prompt_tokens_total: nonneg(sum(exp, "vllm:prompt_tokens_total", &any)),
        generation_tokens_total: nonneg(sum(exp, "vllm:generation_tokens_total", &any)),
        requests_finished_total: nonneg(sum(exp, "vllm:request_success_total", &any)),
        preemptions_total: nonneg(sum(exp, "vllm:num_preemptions_total", &any)),
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
    r.kv_capacity_tokens = capacity;
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

/// SGLang: only the first tensor- (and pipeline-) parallel rank reports
/// request-level numbers; other ranks (with
/// `--enable-metrics-for-all-schedulers`) repeat them.
fn sglang_rank0(s: &PromSample) -> bool {
    s.label("tp_rank").is_none_or(|r| r == "0") && s.label("pp_rank").is_none_or(|r| r == "0")
}

fn map_sglang(exp: &Exposition) -> EngineReading {
    let f: Filter<'_> = &sglang_rank0;
    let mut r = EngineReading {
        model: first_label(
            exp,
            &["sglang:num_running_reqs", "sglang:generation_tokens_total"],
            "model_name",
            f,
        ),
        requests_waiting: nonneg(sum(exp, "sglang:num_queue_reqs", f)),
        requests_running: nonneg(sum(exp, "sglang:num_running_reqs", f)),
        kv_cache_usage_ratio: ratio(mean(exp, "sglang:token_usage", f)),
        kv_capacity_tokens: nonneg(sum(exp, "sglang:max_total_num_tokens", f)),
        prompt_tokens_total: nonneg(sum(exp, "sglang:prompt_tokens_total", f)),
        generation_tokens_total: nonneg(sum(exp, "sglang:generation_tokens_total", f)),
        requests_finished_total: nonneg(sum(exp, "sglang:num_requests_total", f)),
        ..EngineReading::default()
    };
    r.ttft_seconds = read_histogram(&mut r, exp, &["sglang:time_to_first_token_seconds"], f, 1.0);
    r.itl_seconds = read_histogram(
        &mut r,
        exp,
        &[
            "sglang:inter_token_latency_seconds",
            "sglang:time_per_output_token_seconds",
        ],
        f,
        1.0,
    );
    r.tpot_seconds = read_histogram(
        &mut r,
        exp,
        &["sglang:request_time_per_output_token_seconds"],
        f,
        1.0,
    );
    r
}

fn map_tgi(exp: &Exposition) -> EngineReading {
    let current = sum(exp, "tgi_batch_current_max_tokens", &any);
    let max_total = sum(exp, "tgi_batch_max_total_tokens", &any);
    let mut r = EngineReading {
        requests_waiting: nonneg(sum(exp, "tgi_queue_size", &any)),
        requests_running: nonneg(sum(exp, "tgi_batch_current_size", &any)),
        kv_cache_usage_ratio: match (current, max_total) {
            (Some(c), Some(m)) if m > 0.0 => ratio(Some(c / m)),
            _ => None,
        },
        kv_capacity_tokens: nonneg(max_total),
        prompt_tokens_total: nonneg(sum(exp, "tgi_request_input_length_sum", &any)),
        generation_tokens_total: nonneg(sum(exp, "tgi_request_generated_tokens_sum", &any)),
        requests_arrived_total: nonneg(sum(exp, "tgi_request_count", &any)),
        requests_finished_total: nonneg(sum(exp, "tgi_request_success", &any)),
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

fn map_triton(exp: &Exposition, model_hint: Option<&str>) -> EngineReading {
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
    let max_blocks = sum(exp, trt_kv, &block("max"));
    let tokens_per = sum(exp, trt_kv, &block("tokens_per"));
    let mut r = EngineReading {
        model: model.clone(),
        requests_waiting: nonneg(
            sum(exp, trt_req, &request("waiting"))
                .or_else(|| sum(exp, "nv_inference_pending_request_count", &served)),
        ),
        requests_running: nonneg(
            sum(exp, trt_req, &request("scheduled"))
                .or_else(|| sum(exp, trt_req, &request("active"))),
        ),
        batch_limit: sum(exp, trt_req, &request("max"))
            .filter(|m| *m >= 0.0 && *m <= f64::from(u32::MAX))
            .map(|m| m.round() as u32),
        kv_cache_usage_ratio: ratio(mean(exp, trt_kv, &block("fraction"))),
        kv_capacity_tokens: match (max_blocks, tokens_per) {
            (Some(b), Some(t)) => nonneg(Some(b * t)),
            _ => None,
        },
        prompt_tokens_total: nonneg(sum(exp, "nv_llm_input_token_len_sum", &any)),
        generation_tokens_total: nonneg(sum(exp, "nv_llm_output_token_len_sum", &any)),
        requests_finished_total: nonneg(sum(exp, "nv_inference_request_success", &served)),
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

fn map_trtllm_serve(exp: &Exposition) -> EngineReading {
    let max_blocks = sum(exp, "trtllm_kv_cache_max_blocks", &any);
    let tokens_per = sum(exp, "trtllm_kv_cache_tokens_per_block", &any);
    let mut r = EngineReading {
        model: first_label(exp, &["trtllm_num_requests_running"], "model_name", &any),
        requests_waiting: nonneg(sum(exp, "trtllm_num_requests_waiting", &any)),
        requests_running: nonneg(sum(exp, "trtllm_num_requests_running", &any)),
        kv_cache_usage_ratio: ratio(mean(exp, "trtllm_kv_cache_utilization", &any)),
        kv_capacity_tokens: match (max_blocks, tokens_per) {
            (Some(b), Some(t)) => nonneg(Some(b * t)),
            _ => None,
        },
        prompt_tokens_total: nonneg(sum(exp, "trtllm_prompt_tokens_total", &any)),
        generation_tokens_total: nonneg(sum(exp, "trtllm_generation_tokens_total", &any)),
        requests_finished_total: nonneg(sum(exp, "trtllm_request_success_total", &any)),
        ..EngineReading::default()
    };
    r.ttft_seconds = read_histogram(
        &mut r,
        exp,
        &["trtllm_time_to_first_token_seconds"],
        &any,
        1.0,
    );
    // Recorded per finished request (its decode time over its output tokens).
    r.tpot_seconds = read_histogram(
        &mut r,
        exp,
        &["trtllm_time_per_output_token_seconds"],
        &any,
        1.0,
    );
    r
}

fn map_llamacpp(exp: &Exposition) -> EngineReading {
    EngineReading {
        requests_waiting: nonneg(sum(exp, "llamacpp:requests_deferred", &any)),
        requests_running: nonneg(sum(exp, "llamacpp:requests_processing", &any)),
        prompt_tokens_total: nonneg(sum(exp, "llamacpp:prompt_tokens_total", &any)),
        generation_tokens_total: nonneg(sum(exp, "llamacpp:tokens_predicted_total", &any)),
        ..EngineReading::default()
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
