//! The engine scraper against local fake HTTP servers: fixtures through the
//! real hyper client, every bad input, restarts, health and warm-up.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

#[path = "support/http_fake.rs"]
mod http_fake;

use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_core::ids::{GpuUuid, PodRef};
use gpuscale_core::sample::{ContainerGpus, EngineSample, EngineState, Framework, PodGpus};
use gpuscale_telemetry::engine::client::{HttpClientConfig, WarmupProbe};
use gpuscale_telemetry::{EngineSource, EngineTarget, ScrapeConfig, ScrapeEngineSource};
use http_fake::{FakeHttp, Reply};

fn fixture(file: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn target(server: &FakeHttp, name: &str, framework: Framework, path: &str) -> EngineTarget {
    EngineTarget {
        pod: PodRef::new("llm", name),
        container: "server".into(),
        framework,
        metrics_url: server.url(path),
        health_url: None,
        model: None,
        timeout: None,
    }
}

fn source(max_body_bytes: usize) -> ScrapeEngineSource {
    ScrapeEngineSource::new(ScrapeConfig {
        default_timeout: Duration::from_secs(10),
        health_checks: true,
        http: HttpClientConfig {
            max_body_bytes,
            ..HttpClientConfig::default()
        },
    })
    .unwrap()
}

fn at(secs: f64) -> Timestamp {
    Timestamp::from_secs_f64(1_700_000_000.0 + secs)
}

fn by_pod<'a>(samples: &'a [EngineSample], name: &str) -> &'a EngineSample {
    samples.iter().find(|s| s.pod.name == name).unwrap()
}

fn all_metrics_missing(s: &EngineSample) -> bool {
    s.requests_waiting.is_none()
        && s.requests_running.is_none()
        && s.kv_cache_usage_ratio.is_none()
        && s.generation_tokens_total.is_none()
        && s.ttft_seconds.is_none()
}

#[tokio::test]
async fn every_framework_is_scraped_over_http_and_attributed_to_its_gpus() {
    let server = FakeHttp::start().await;
    let cases = [
        ("vllm", Framework::Vllm, "vllm-0.33.txt", "/v/metrics"),
        ("sglang", Framework::Sglang, "sglang-0.5.txt", "/s/metrics"),
        ("tgi", Framework::Tgi, "tgi-3.3.txt", "/t/metrics"),
        (
            "triton",
            Framework::TritonTrtllm,
            "triton-trtllm.txt",
            "/tr/metrics",
        ),
        (
            "trt",
            Framework::TrtllmServe,
            "trtllm-serve.txt",
            "/prometheus/metrics",
        ),
        ("llama", Framework::LlamaCpp, "llamacpp.txt", "/l/metrics"),
    ];
    let mut targets = Vec::new();
    for (name, fw, file, path) in cases {
        server.route(path, Reply::text(fixture(file)));
        targets.push(target(&server, name, fw, path));
    }
    // trtllm-serve's JSON iteration stats beside its Prometheus text.
    server.route("/metrics", Reply::status(200, "[]"));
    let mut src = source(4 << 20);
    src.set_targets(targets);
    let pods = vec![PodGpus {
        pod: PodRef::new("llm", "vllm"),
        containers: vec![ContainerGpus {
            container: "server".into(),
            resource_name: "nvidia.com/gpu".into(),
            gpu_uuids: vec![GpuUuid::new("GPU-1"), GpuUuid::new("GPU-0")],
        }],
    }];
    let samples = src.sample_engines(at(0.0), &pods).await.unwrap();
    assert_eq!(samples.len(), 6);
    for s in &samples {
        assert_eq!(
            s.state,
            EngineState::Warm,
            "{}: {:?}",
            s.pod,
            src.last_error(&s.pod)
        );
        assert!(s.requests_running.is_some(), "{}", s.pod);
        assert_eq!(s.sampled_at, at(0.0));
    }
    let v = by_pod(&samples, "vllm");
    assert_eq!(v.framework, Framework::Vllm);
    assert_eq!(v.model, "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(v.container, "server");
    assert_eq!(v.requests_running, Some(22.0));
    assert_eq!(
        v.gpu_uuids,
        vec![GpuUuid::new("GPU-0"), GpuUuid::new("GPU-1")]
    );
    assert_eq!(
        by_pod(&samples, "tgi").model,
        "",
        "no model label, none configured"
    );
    assert_eq!(by_pod(&samples, "triton").batch_limit, Some(64));
    assert!(src.stats().errors_by_kind.is_empty(), "{:?}", src.stats());
    assert_eq!(src.stats().scrapes_total, 6);
}

/// One good engine beside each bad one: the bad one is failed with its
/// metrics missing and its error counted by kind; the good one reports.
async fn bad_input_case(reply: Reply, kind: &str, timeout: Option<Duration>, cap: usize) {
    let server = FakeHttp::start().await;
    server.route("/good/metrics", Reply::text(fixture("vllm-0.33.txt")));
    server.route("/bad/metrics", reply);
    let mut bad = target(&server, "bad", Framework::Vllm, "/bad/metrics");
    bad.timeout = timeout;
    let mut src = source(cap);
    src.set_targets(vec![
        target(&server, "good", Framework::Vllm, "/good/metrics"),
        bad,
    ]);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();

    let good = by_pod(&samples, "good");
    assert_eq!(good.state, EngineState::Warm, "{kind}");
    assert_eq!(good.requests_running, Some(22.0), "{kind}");

    let bad = by_pod(&samples, "bad");
    assert_eq!(bad.state, EngineState::Failed, "{kind}");
    assert!(all_metrics_missing(bad), "{kind}: {bad:?}");
    assert_eq!(
        src.stats().errors_by_kind.get(kind),
        Some(&1),
        "{kind}: {:?}",
        src.stats()
    );
    let err = src.last_error(&PodRef::new("llm", "bad")).unwrap();
    assert_eq!(err.kind(), kind);
}

#[tokio::test]
async fn garbage_text_is_a_parse_error_and_the_other_engine_keeps_reporting() {
    bad_input_case(
        Reply::text("vllm:num_requests_running{engine=\"0\" 3\n%%%% not prometheus\n"),
        "parse",
        None,
        4 << 20,
    )
    .await;
}

#[tokio::test]
async fn a_body_cut_off_by_the_transport_is_truncated() {
    // Fewer bytes than the Content-Length, then the connection closes.
    bad_input_case(
        Reply::CutOff {
            declared: 10_000,
            body: "vllm:num_requests_running 3\n".into(),
        },
        "truncated",
        None,
        4 << 20,
    )
    .await;
}

#[tokio::test]
async fn a_complete_body_whose_last_line_lacks_its_newline_is_read() {
    let server = FakeHttp::start().await;
    let full = fixture("vllm-0.33.txt");
    server.route("/metrics", Reply::text(full.trim_end()));
    let mut src = source(4 << 20);
    src.set_targets(vec![target(&server, "v", Framework::Vllm, "/metrics")]);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(samples[0].state, EngineState::Warm);
    assert_eq!(samples[0].requests_running, Some(22.0));
    assert!(src.stats().errors_by_kind.is_empty(), "{:?}", src.stats());
}

#[tokio::test]
async fn an_engine_that_answers_but_reads_nothing_is_no_data_not_warm() {
    let server = FakeHttp::start().await;
    server.route("/empty", Reply::text(""));
    server.route(
        "/nocontent",
        Reply::Ok {
            status: 204,
            content_type: "text/plain",
            body: String::new(),
        },
    );
    // `--engine sglang=...` pointed at a vLLM server.
    server.route("/wrong", Reply::text(fixture("vllm-0.33.txt")));
    server.route("/health", Reply::status(200, "{}"));
    let mut targets = vec![
        target(&server, "empty", Framework::Vllm, "/empty"),
        target(&server, "nocontent", Framework::Vllm, "/nocontent"),
        target(&server, "wrong", Framework::Sglang, "/wrong"),
    ];
    for t in &mut targets {
        t.health_url = Some(server.url("/health"));
    }
    let mut src = source(4 << 20);
    src.set_targets(targets);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();
    for name in ["empty", "nocontent", "wrong"] {
        let s = by_pod(&samples, name);
        assert_eq!(s.state, EngineState::NoData, "{name}");
        assert!(all_metrics_missing(s), "{name}");
        let why = src.problem(&PodRef::new("llm", name)).expect("a reason");
        assert!(why.starts_with("no data"), "{name}: {why}");
        assert!(why.contains(s.framework.as_str()), "{name}: {why}");
    }
    assert_eq!(src.stats().errors_by_kind.get("no_data"), Some(&3));
    assert_eq!(EngineState::NoData.as_str(), "no_data");
}

#[tokio::test]
async fn llama_cpp_printing_nan_before_its_first_request_is_warm() {
    let server = FakeHttp::start().await;
    server.route("/metrics", Reply::text(fixture("llamacpp-2024-idle.txt")));
    server.route("/health", Reply::status(200, r#"{"status":"ok"}"#));
    let mut t = target(&server, "llama", Framework::LlamaCpp, "/metrics");
    t.health_url = Some(server.url("/health"));
    let mut src = source(4 << 20);
    src.set_targets(vec![t]);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(
        samples[0].state,
        EngineState::Warm,
        "{:?}",
        src.problem(&samples[0].pod)
    );
    assert_eq!(samples[0].requests_running, Some(0.0));
    assert_eq!(samples[0].kv_cache_usage_ratio, Some(0.0));
    assert!(src.stats().errors_by_kind.is_empty(), "{:?}", src.stats());
}

#[tokio::test]
async fn nan_and_repeated_series_are_counted_and_the_rest_reads() {
    let server = FakeHttp::start().await;
    let line = "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 162\n";
    server.route(
        "/metrics",
        Reply::text(format!(
            "{line}{line}vllm:num_requests_waiting{{model_name=\"m\"}} NaN\n"
        )),
    );
    let mut src = source(4 << 20);
    src.set_targets(vec![target(&server, "v", Framework::Vllm, "/metrics")]);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(samples[0].state, EngineState::Warm);
    assert_eq!(samples[0].requests_running, Some(162.0), "not 324");
    assert_eq!(samples[0].requests_waiting, None);
    let kinds = &src.stats().errors_by_kind;
    assert_eq!(kinds.get("duplicate_series"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("non_finite"), Some(&1), "{kinds:?}");
    let warnings = src.warnings(&samples[0].pod);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("vllm:num_requests_waiting")),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn an_incomplete_histogram_is_counted_and_named() {
    let server = FakeHttp::start().await;
    server.route(
        "/metrics",
        Reply::text(
            "vllm:num_requests_running 1\n\
             vllm:time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n\
             vllm:time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n",
        ),
    );
    let mut src = source(4 << 20);
    src.set_targets(vec![target(&server, "v", Framework::Vllm, "/metrics")]);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(samples[0].ttft_seconds, None);
    assert_eq!(
        src.stats().errors_by_kind.get("invalid_histogram"),
        Some(&1)
    );
    let warnings = src.warnings(&samples[0].pod);
    assert!(
        warnings.iter().any(|w| w.contains("without `_sum`")),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn a_huge_model_name_is_cut_to_what_the_protocol_carries() {
    let server = FakeHttp::start().await;
    let huge = "m".repeat(1 << 20);
    server.route(
        "/metrics",
        Reply::text(format!(
            "vllm:num_requests_running{{model_name=\"{huge}\"}} 4\n"
        )),
    );
    let mut src = source(4 << 20);
    src.set_targets(vec![target(&server, "v", Framework::Vllm, "/metrics")]);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();
    let s = &samples[0];
    assert_eq!(s.state, EngineState::Warm);
    assert_eq!(s.requests_running, Some(4.0));
    assert_eq!(s.model.len(), gpuscale_proto::convert::MAX_NAME_BYTES);
    assert_eq!(src.stats().errors_by_kind.get("label_truncated"), Some(&1));
    // What the agent sends now converts on the scaler's side.
    let wire = gpuscale_proto::v1::EngineSample::from(s);
    let report = gpuscale_proto::v1::NodeReport {
        boot_epoch: 7,
        seq: 1,
        sent_at_unix_ms: 1_700_000_000_000,
        body: Some(gpuscale_proto::v1::node_report::Body::Snapshot(
            gpuscale_proto::v1::NodeSnapshot {
                node_name: "n".into(),
                sampled_at_unix_ms: 1_700_000_000_000,
                engines: vec![wire],
                ..Default::default()
            },
        )),
    };
    gpuscale_proto::AgentReport::try_from(report).expect("accepted");
}

#[tokio::test]
async fn trtllm_serve_is_read_from_its_text_and_its_iteration_stats() {
    let server = FakeHttp::start().await;
    server.route(
        "/prometheus/metrics",
        Reply::text(fixture("trtllm-serve-unprefixed.txt")),
    );
    server.route(
        "/metrics",
        Reply::status(200, fixture("trtllm-serve-iteration-stats.json")),
    );
    let mut src = source(4 << 20);
    src.set_targets(vec![target(
        &server,
        "trt",
        Framework::TrtllmServe,
        "/prometheus/metrics",
    )]);
    let s = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(s[0].state, EngineState::Warm);
    assert_eq!(s[0].model, "Qwen/Qwen3-8B");
    assert_eq!(s[0].requests_running, Some(31.0));
    assert_eq!(s[0].requests_waiting, Some(4.0));
    assert_eq!(s[0].kv_cache_usage_ratio, Some(0.4));
    assert_eq!(s[0].requests_finished_total, Some(700.0));
    assert_eq!(s[0].tpot_seconds.as_ref().map(|h| h.count()), Some(700));

    // The stats queue was drained and no iteration ran since: idle.
    server.route("/metrics", Reply::status(200, "[]"));
    let s = src.sample_engines(at(1.0), &[]).await.unwrap();
    assert_eq!(s[0].requests_running, Some(0.0));
    assert_eq!(s[0].kv_capacity_tokens, Some(128_000.0));

    // Stats that cannot be read are counted; the text still reads.
    server.route("/metrics", Reply::text("not json"));
    let s = src.sample_engines(at(2.0), &[]).await.unwrap();
    assert_eq!(s[0].state, EngineState::Warm);
    assert_eq!(s[0].requests_finished_total, Some(700.0));
    assert_eq!(src.stats().errors_by_kind.get("iteration_stats"), Some(&1));
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_without_holding_up_the_others() {
    bad_input_case(
        Reply::Hang,
        "timeout",
        Some(Duration::from_millis(300)),
        4 << 20,
    )
    .await;
}

#[tokio::test]
async fn an_html_page_is_rejected_by_content_type() {
    bad_input_case(
        Reply::Ok {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: "<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>".into(),
        },
        "content_type",
        None,
        4 << 20,
    )
    .await;
}

#[tokio::test]
async fn a_huge_streamed_response_is_cut_at_the_size_cap() {
    bad_input_case(
        Reply::Endless { bytes: 8 << 20 },
        "too_large",
        None,
        256 << 10,
    )
    .await;
}

#[tokio::test]
async fn a_huge_declared_length_is_rejected_before_reading() {
    bad_input_case(
        Reply::text("x".repeat(300 << 10)),
        "too_large",
        None,
        256 << 10,
    )
    .await;
}

#[tokio::test]
async fn an_error_status_is_counted() {
    bad_input_case(Reply::status(500, "{}"), "http_status", None, 4 << 20).await;
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let server = FakeHttp::start().await;
    server.route("/metrics", Reply::text(fixture("llamacpp.txt")));
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut dead = target(&server, "dead", Framework::LlamaCpp, "/metrics");
    dead.metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let mut src = source(4 << 20);
    src.set_targets(vec![
        target(&server, "alive", Framework::LlamaCpp, "/metrics"),
        dead,
    ]);
    let samples = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(by_pod(&samples, "alive").requests_running, Some(4.0));
    assert_eq!(by_pod(&samples, "dead").state, EngineState::Failed);
    assert_eq!(src.stats().errors_by_kind.get("connect"), Some(&1));
}

#[tokio::test]
async fn totals_stay_monotonic_when_an_engine_restarts() {
    let server = FakeHttp::start().await;
    let text = |generated: f64, ttft_count: u64| {
        format!(
            "vllm:generation_tokens_total{{engine=\"0\",model_name=\"m\"}} {generated}\n\
             vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"0.1\",model_name=\"m\"}} {ttft_count}\n\
             vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"+Inf\",model_name=\"m\"}} {ttft_count}\n\
             vllm:time_to_first_token_seconds_sum{{engine=\"0\",model_name=\"m\"}} 0.5\n\
             vllm:time_to_first_token_seconds_count{{engine=\"0\",model_name=\"m\"}} {ttft_count}\n"
        )
    };
    let mut src = source(4 << 20);
    src.set_targets(vec![target(&server, "v", Framework::Vllm, "/metrics")]);

    server.route("/metrics", Reply::text(text(1000.0, 10)));
    let s = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(s[0].generation_tokens_total, Some(1000.0));

    // Restart: counters from zero.
    server.route("/metrics", Reply::text(text(50.0, 2)));
    let s = src.sample_engines(at(1.0), &[]).await.unwrap();
    assert_eq!(s[0].generation_tokens_total, Some(1050.0));
    assert_eq!(s[0].ttft_seconds.as_ref().unwrap().count(), 12);
    assert_eq!(s[0].counter_resets_total, 1);
    assert_eq!(src.stats().counter_resets_total, 1);

    server.route("/metrics", Reply::text(text(80.0, 3)));
    let s = src.sample_engines(at(2.0), &[]).await.unwrap();
    assert_eq!(s[0].generation_tokens_total, Some(1080.0));
    assert_eq!(s[0].counter_resets_total, 1);

    // Discovery runs again with the same target: the offsets stay.
    let same = src.targets().cloned().collect();
    src.set_targets(same);
    let s = src.sample_engines(at(3.0), &[]).await.unwrap();
    assert_eq!(s[0].generation_tokens_total, Some(1080.0));
}

#[tokio::test]
async fn health_endpoints_tell_loading_from_warm_from_failed() {
    let server = FakeHttp::start().await;
    let mut t = target(&server, "llama", Framework::LlamaCpp, "/metrics");
    t.health_url = Some(server.url("/health"));
    let mut src = source(4 << 20);
    src.set_targets(vec![t]);

    // Loading: /health says so; /metrics is not served yet.
    server.route(
        "/health",
        Reply::status(
            503,
            r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
        ),
    );
    let s = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(s[0].state, EngineState::Loading);
    assert!(all_metrics_missing(&s[0]));

    server.route("/health", Reply::status(200, r#"{"status":"ok"}"#));
    server.route("/metrics", Reply::text(fixture("llamacpp.txt")));
    let s = src.sample_engines(at(1.0), &[]).await.unwrap();
    assert_eq!(s[0].state, EngineState::Warm);

    // Metrics still served, health failing: failed.
    server.route("/health", Reply::status(500, "{}"));
    let s = src.sample_engines(at(2.0), &[]).await.unwrap();
    assert_eq!(s[0].state, EngineState::Failed);
    assert_eq!(s[0].requests_running, Some(4.0), "metrics still reported");
    assert_eq!(src.stats().errors_by_kind.get("health"), Some(&1));
}

#[tokio::test]
async fn a_closed_port_is_loading_before_the_first_warm_and_failed_after() {
    let server = FakeHttp::start().await;
    let addr = server.addr;
    let t = EngineTarget::parse_flag(&format!("vllm=http://{addr}/metrics")).unwrap();
    assert_eq!(t.health_url, Some(format!("http://{addr}/health")));
    let mut src = source(4 << 20);
    src.set_targets(vec![t]);
    // vLLM answers 503 on /health only when its engine died.
    server.route("/health", Reply::status(503, ""));
    let s = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(
        s[0].state,
        EngineState::Failed,
        "vLLM's 503 means the engine died"
    );

    server.route("/health", Reply::status(200, ""));
    server.route("/metrics", Reply::text(fixture("vllm-0.10-legacy.txt")));
    let s = src.sample_engines(at(1.0), &[]).await.unwrap();
    assert_eq!(s[0].state, EngineState::Warm);

    drop(server);
    tokio::task::yield_now().await;
    let s = src.sample_engines(at(2.0), &[]).await.unwrap();
    assert_eq!(s[0].state, EngineState::Failed, "closed after being warm");
}

#[tokio::test]
async fn a_closed_port_before_the_first_warm_is_loading() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let t = EngineTarget::parse_flag(&format!("vllm=http://127.0.0.1:{port}/metrics")).unwrap();
    let mut src = source(4 << 20);
    src.set_targets(vec![t]);
    let s = src.sample_engines(at(0.0), &[]).await.unwrap();
    assert_eq!(
        s[0].state,
        EngineState::Loading,
        "vLLM does not listen while loading"
    );
}

#[tokio::test]
async fn the_warm_up_probe_sends_one_short_completion() {
    let server = FakeHttp::start().await;
    server.route(
        "/v1/completions",
        Reply::status(200, r#"{"choices":[{"text":"!"}]}"#),
    );
    let mut t = target(&server, "v", Framework::Vllm, "/metrics");
    t.model = Some("meta-llama/Llama-3.1-8B-Instruct".into());
    let src = source(4 << 20);
    let probe =
        WarmupProbe::for_framework(t.framework, t.model.as_deref(), Duration::from_secs(10));
    let outcome = src.warm_up(&t, &probe).await.unwrap();
    assert_eq!(outcome.status, 200);
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/v1/completions");
    let body: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["model"], "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(body["max_tokens"], 1);

    // An engine that cannot generate yet fails the probe.
    server.route("/v1/completions", Reply::status(503, "{}"));
    let err = src.warm_up(&t, &probe).await.unwrap_err();
    assert_eq!(err.kind(), "http_status");
}
