//! Each framework's exposition (fixtures written from REFERENCE §6) mapped
//! to one engine model.

use gpuscale_core::sample::Framework;
use gpuscale_telemetry::engine::mapping::{EngineReading, TrtllmIterationStats, map_exposition};
use gpuscale_telemetry::prom_text::Exposition;

fn map(framework: Framework, file: &str) -> EngineReading {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let exp = Exposition::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    let r = map_exposition(framework, &exp, None);
    assert!(
        r.invalid_histograms.is_empty(),
        "{file}: {:?}",
        r.invalid_histograms
    );
    r
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9 * b.abs().max(1.0))
}

#[test]
fn vllm_0_33_sums_data_parallel_engines() {
    let r = map(Framework::Vllm, "vllm-0.33.txt");
    assert_eq!(r.model.as_deref(), Some("meta-llama/Llama-3.1-8B-Instruct"));
    assert_eq!(r.requests_running, Some(22.0));
    assert_eq!(r.requests_waiting, Some(5.0));
    assert!(
        close(r.kv_cache_usage_ratio, 0.42),
        "{:?}",
        r.kv_cache_usage_ratio
    );
    assert_eq!(r.kv_capacity_tokens, Some(2.0 * 27_000.0 * 16.0));
    assert_eq!(r.preemptions_total, Some(5.0));
    assert_eq!(r.prompt_tokens_total, Some(2_334_500.0));
    assert_eq!(r.generation_tokens_total, Some(856_789.0));
    assert_eq!(r.requests_finished_total, Some(5_500.0));
    assert_eq!(
        r.requests_arrived_total, None,
        "vLLM exports no arrival counter"
    );
    let ttft = r.ttft_seconds.expect("TTFT");
    assert_eq!(ttft.count(), 5_500);
    assert!((ttft.sum() - 385.3).abs() < 1e-9);
    assert_eq!(ttft.bounds().len(), 11);
    let itl = r.itl_seconds.expect("ITL");
    assert_eq!(itl.count(), 453_789 + 397_500);
    let tpot = r.tpot_seconds.expect("request-level TPOT");
    assert_eq!(
        tpot.count(),
        5_500,
        "one per finished request, both engines"
    );
    assert_eq!(tpot.cumulative_counts()[..4], [150, 4_800, 5_380, 5_500]);
    assert_eq!(r.batch_limit, None);
}

#[test]
fn vllm_0_10_legacy_names_are_read() {
    let r = map(Framework::Vllm, "vllm-0.10-legacy.txt");
    assert_eq!(r.model.as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));
    assert_eq!(r.requests_running, Some(7.0));
    assert_eq!(
        r.requests_waiting,
        Some(0.0),
        "zero is a value, not missing"
    );
    assert_eq!(r.kv_cache_usage_ratio, Some(0.125), "gpu_cache_usage_perc");
    let itl = r
        .itl_seconds
        .expect("ITL from time_per_output_token_seconds");
    assert_eq!(itl.count(), 25_400);
    assert_eq!(r.kv_capacity_tokens, Some(480_000.0));
    assert_eq!(r.requests_finished_total, Some(200.0));
}

#[test]
fn sglang_0_5_counts_tensor_parallel_rank_zero_only() {
    let r = map(Framework::Sglang, "sglang-0.5.txt");
    assert_eq!(r.model.as_deref(), Some("Qwen/Qwen3-32B"));
    assert_eq!(r.requests_running, Some(24.0));
    assert_eq!(r.requests_waiting, Some(6.0));
    assert_eq!(r.kv_cache_usage_ratio, Some(0.61));
    assert_eq!(r.kv_capacity_tokens, Some(330_000.0));
    assert_eq!(r.prompt_tokens_total, Some(5.5e6));
    assert_eq!(r.generation_tokens_total, Some(1.8e6));
    assert_eq!(r.requests_finished_total, Some(9_100.0));
    assert_eq!(r.ttft_seconds.expect("TTFT").count(), 9_100);
    assert_eq!(r.itl_seconds.expect("ITL").count(), 1_790_000);
    assert_eq!(
        r.preemptions_total, None,
        "retractions are a gauge, not a counter"
    );
}

#[test]
fn tgi_3_3_derives_kv_use_and_tokens_from_histograms() {
    let r = map(Framework::Tgi, "tgi-3.3.txt");
    assert_eq!(r.model, None, "TGI has no model label");
    assert_eq!(r.requests_waiting, Some(9.0));
    assert_eq!(r.requests_running, Some(32.0));
    assert_eq!(r.kv_cache_usage_ratio, Some(61_440.0 / 163_840.0));
    assert_eq!(r.kv_capacity_tokens, Some(163_840.0));
    assert_eq!(r.prompt_tokens_total, Some(702_100.0));
    assert_eq!(r.generation_tokens_total, Some(238_000.0));
    assert_eq!(r.requests_arrived_total, Some(1_250.0));
    assert_eq!(r.requests_finished_total, Some(1_190.0));
    assert_eq!(r.ttft_seconds, None, "TGI has no TTFT histogram");
    assert_eq!(r.itl_seconds, None, "TGI has no token-level ITL");
    let tpot = r.tpot_seconds.expect("per-request mean time per token");
    assert_eq!(tpot.count(), 1_190, "one observation per finished request");
}

#[test]
fn triton_with_trtllm_reads_the_ensemble_and_the_batcher() {
    let r = map(Framework::TritonTrtllm, "triton-trtllm.txt");
    assert_eq!(r.model.as_deref(), Some("ensemble"));
    assert_eq!(r.requests_waiting, Some(4.0));
    assert_eq!(r.requests_running, Some(30.0));
    assert_eq!(r.batch_limit, Some(64));
    assert_eq!(r.kv_cache_usage_ratio, Some(0.5));
    assert_eq!(r.kv_capacity_tokens, Some(4_096.0 * 64.0));
    assert_eq!(r.prompt_tokens_total, Some(2_150_400.0));
    assert_eq!(r.generation_tokens_total, Some(537_600.0));
    assert_eq!(
        r.requests_finished_total,
        Some(4_200.0),
        "the ensemble's steps are not counted again"
    );
    let ttft = r.ttft_seconds.expect("first-response histogram");
    assert_eq!(ttft.count(), 4_200);
    assert_eq!(ttft.bounds(), &[0.1, 0.5, 2.0, f64::INFINITY]);
    assert!((ttft.sum() - 336.0).abs() < 1e-9);
    assert_eq!(r.itl_seconds, None);
}

#[test]
fn trtllm_serve_maps_its_own_names() {
    let r = map(Framework::TrtllmServe, "trtllm-serve.txt");
    assert_eq!(
        r.model.as_deref(),
        Some("meta-llama/Llama-3.1-70B-Instruct")
    );
    assert_eq!(r.requests_running, Some(48.0));
    assert_eq!(r.requests_waiting, Some(11.0));
    assert_eq!(r.kv_cache_usage_ratio, Some(0.875));
    assert_eq!(r.kv_capacity_tokens, Some(8_192.0 * 32.0));
    assert_eq!(r.prompt_tokens_total, Some(9.8e6));
    assert_eq!(r.generation_tokens_total, Some(2.45e6));
    assert_eq!(r.requests_finished_total, Some(10_240.0));
    assert_eq!(r.ttft_seconds.expect("TTFT").count(), 10_240);
    assert_eq!(r.itl_seconds, None, "no token-level ITL");
    assert_eq!(r.tpot_seconds.expect("TPOT").count(), 10_240);
}

#[test]
fn llama_cpp_reports_queue_batch_and_tokens_only() {
    let r = map(Framework::LlamaCpp, "llamacpp.txt");
    assert_eq!(r.requests_running, Some(4.0));
    assert_eq!(r.requests_waiting, Some(1.0));
    assert_eq!(r.prompt_tokens_total, Some(48_213.0));
    assert_eq!(r.generation_tokens_total, Some(19_877.0));
    assert_eq!(
        r.kv_cache_usage_ratio, None,
        "removed from llama.cpp in PR #13660"
    );
    assert_eq!(r.ttft_seconds, None);
    assert_eq!(r.requests_finished_total, None);
}

#[test]
fn a_framework_reads_nothing_from_another_frameworks_text() {
    let r = map(Framework::Sglang, "vllm-0.33.txt");
    assert_eq!(r, EngineReading::default());
}

// Bodies of the shapes users published (written for these tests; see
// fixtures/README.md), each a case the scraper once read wrongly.

#[test]
fn sglang_with_dp_attention_sums_every_scheduler() {
    // Eight DP ranks, each its own scheduler (dp_rank = tp_rank = k): the
    // scraper once kept only tp_rank 0 and read 11 running instead of 85.
    let r = map(Framework::Sglang, "sglang-dp-attention.txt");
    assert_eq!(r.model.as_deref(), Some("deepseek-ai/DeepSeek-V3"));
    assert_eq!(r.requests_running, Some(85.0));
    assert_eq!(r.requests_waiting, Some(6.0));
    assert_eq!(r.generation_tokens_total, Some(8_110.0));
    assert_eq!(r.prompt_tokens_total, Some(42_800.0));
    assert_eq!(r.requests_finished_total, Some(348.0));
    assert_eq!(
        r.kv_capacity_tokens,
        Some(8.0 * 120_000.0),
        "one KV pool per DP rank"
    );
    assert!(
        close(r.kv_cache_usage_ratio, 0.395),
        "{:?}",
        r.kv_cache_usage_ratio
    );
    let ttft = r.ttft_seconds.expect("TTFT of every scheduler");
    assert_eq!(ttft.count(), 348);
}

#[test]
fn sglang_tensor_parallel_replicas_of_one_scheduler_count_once() {
    // Two DP groups of four TP ranks each, every rank reporting
    // (`--enable-metrics-for-all-schedulers`): each group counts once.
    let mut text = String::new();
    for tp in 0..8 {
        let dp = tp / 4;
        let running = if dp == 0 { 7 } else { 5 };
        text.push_str(&format!(
            "sglang:num_running_reqs{{dp_rank=\"{dp}\",model_name=\"m\",moe_ep_rank=\"{tp}\",pp_rank=\"0\",tp_rank=\"{tp}\"}} {running}\n"
        ));
    }
    let r = map_exposition(Framework::Sglang, &Exposition::parse(&text).unwrap(), None);
    assert_eq!(r.requests_running, Some(12.0));
}

#[test]
fn llama_cpp_before_its_first_request_is_read_despite_nan() {
    // Builds from late 2024 print `-nan` for busy slots per decode until
    // the first request; a value nobody reads must not fail the scrape.
    let r = map(Framework::LlamaCpp, "llamacpp-2024-idle.txt");
    assert_eq!(r.requests_running, Some(0.0));
    assert_eq!(r.requests_waiting, Some(0.0));
    assert_eq!(r.generation_tokens_total, Some(0.0));
    assert_eq!(r.kv_cache_usage_ratio, Some(0.0));
    assert!(r.non_finite.is_empty(), "{:?}", r.non_finite);
    assert!(!r.has_no_data());
}

#[test]
fn older_llama_cpp_reports_its_kv_cache_ratio() {
    let r = map(Framework::LlamaCpp, "llamacpp-2024-busy.txt");
    assert_eq!(r.kv_cache_usage_ratio, Some(0.3125));
    assert_eq!(r.requests_running, Some(3.0));
    assert_eq!(r.requests_waiting, Some(2.0));
    assert_eq!(r.generation_tokens_total, Some(6_408.0));
}

#[test]
fn nan_in_a_series_that_is_read_is_missing_and_named() {
    let text = "llamacpp:requests_processing nan\nllamacpp:requests_deferred 2\n\
                llamacpp:tokens_predicted_total +Inf\n";
    let r = map_exposition(Framework::LlamaCpp, &Exposition::parse(text).unwrap(), None);
    assert_eq!(r.requests_running, None);
    assert_eq!(r.requests_waiting, Some(2.0));
    assert_eq!(r.generation_tokens_total, None);
    assert_eq!(
        r.non_finite,
        vec![
            "llamacpp:requests_processing".to_string(),
            "llamacpp:tokens_predicted_total".to_string()
        ]
    );
}

#[test]
fn trtllm_serve_own_unprefixed_names_are_read() {
    let r = map(Framework::TrtllmServe, "trtllm-serve-unprefixed.txt");
    assert_eq!(r.model.as_deref(), Some("Qwen/Qwen3-8B"));
    assert_eq!(
        r.requests_finished_total,
        Some(700.0),
        "every finished reason"
    );
    let ttft = r.ttft_seconds.expect("time_to_first_token_seconds");
    assert_eq!(ttft.count(), 700);
    assert!((ttft.sum() - 98.0).abs() < 1e-9);
    let tpot = r
        .tpot_seconds
        .expect("time_per_output_token_seconds is TPOT");
    assert_eq!(tpot.count(), 700);
    assert_eq!(tpot.bounds()[..3], [0.01, 0.025, 0.05]);
    assert_eq!(r.itl_seconds, None, "no token-level ITL");
    assert_eq!(r.requests_running, None, "not in this text: JSON fills it");
}

#[test]
fn trtllm_serve_iteration_stats_fill_what_the_text_lacks() {
    let path = format!(
        "{}/tests/fixtures/trtllm-serve-iteration-stats.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let stats = TrtllmIterationStats::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(stats.iterations, 2);
    let mut r = map(Framework::TrtllmServe, "trtllm-serve-unprefixed.txt");
    stats.fill(None, &mut r);
    assert_eq!(r.requests_running, Some(31.0), "the newest iteration");
    assert_eq!(r.requests_waiting, Some(4.0), "queued and paused");
    assert_eq!(r.kv_cache_usage_ratio, Some(0.4));
    assert_eq!(r.kv_capacity_tokens, Some(4_000.0 * 32.0));
    assert_eq!(r.batch_limit, Some(64));

    // No iteration since the last call: nothing running or waiting, the
    // cache's size carried over.
    let empty = TrtllmIterationStats::parse("[]").unwrap();
    let mut r = map(Framework::TrtllmServe, "trtllm-serve-unprefixed.txt");
    empty.fill(Some(&stats), &mut r);
    assert_eq!(r.requests_running, Some(0.0));
    assert_eq!(r.requests_waiting, Some(0.0));
    assert_eq!(r.kv_capacity_tokens, Some(128_000.0));
    // Before any iteration was seen, an empty answer says nothing.
    let mut r = map(Framework::TrtllmServe, "trtllm-serve-unprefixed.txt");
    empty.fill(None, &mut r);
    assert_eq!(r.requests_running, None);

    // The text's own value wins where it has one.
    let mut r = map(Framework::TrtllmServe, "trtllm-serve.txt");
    stats.fill(None, &mut r);
    assert_eq!(r.requests_running, Some(48.0));

    for bad in ["{}", "not json", "[1, 2]"] {
        assert!(TrtllmIterationStats::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn triton_before_2025_derives_kv_use_from_used_and_max_blocks() {
    let r = map(Framework::TritonTrtllm, "triton-trtllm-2024.txt");
    assert_eq!(r.model.as_deref(), Some("ensemble"));
    assert_eq!(r.kv_cache_usage_ratio, Some(0.3));
    assert_eq!(r.kv_capacity_tokens, Some(2_000.0 * 128.0));
    assert_eq!(r.requests_running, Some(12.0));
    assert_eq!(
        r.requests_waiting,
        Some(3.0),
        "the ensemble's pending count"
    );
    assert_eq!(r.requests_finished_total, Some(812.0));
}

#[test]
fn triton_nan_scheduled_is_missing_not_active() {
    let text = "nv_trt_llm_request_metrics{model=\"m\",request_type=\"scheduled\"} NaN\n\
                nv_trt_llm_request_metrics{model=\"m\",request_type=\"active\"} 9\n";
    let r = map_exposition(
        Framework::TritonTrtllm,
        &Exposition::parse(text).unwrap(),
        Some("m"),
    );
    assert_eq!(r.requests_running, None);
    assert_eq!(r.non_finite, vec!["nv_trt_llm_request_metrics".to_string()]);
}

#[test]
fn a_repeated_series_is_read_once() {
    let line = "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 162\n";
    let text = format!("{line}{line}");
    let r = map_exposition(Framework::Vllm, &Exposition::parse(&text).unwrap(), None);
    assert_eq!(r.requests_running, Some(162.0));
    assert_eq!(r.duplicate_series, 1);
}

#[test]
fn nothing_read_is_no_data() {
    for (framework, text) in [
        (Framework::Vllm, ""),
        (Framework::Vllm, "# only comments\n"),
        (
            Framework::Sglang,
            "vllm:num_requests_running{model_name=\"m\"} 3\n",
        ),
    ] {
        let r = map_exposition(framework, &Exposition::parse(text).unwrap(), None);
        assert!(r.has_no_data(), "{framework:?}: {text:?}");
    }
    assert!(!map(Framework::Vllm, "vllm-0.33.txt").has_no_data());
}
