//! `gpuscale proxy` as it runs in a pod: the real binary in front of an
//! OpenAI-compatible streaming engine with more slots than the limit, a
//! real node agent (its ServingService over TCP, the engine scraped as
//! llama.cpp), clients over real sockets.
//!
//! The engine is a stand-in written here that speaks llama.cpp's
//! `llama-server` dialect (`/v1/chat/completions` streaming with `usage` in
//! the last chunk, `llamacpp:requests_processing` on `/metrics`). The
//! acceptance test of issue #15 names the real `llama-server`; it runs
//! against it once the cached build of the engine tests lands.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gpuscale_agent::node::{KubernetesMode, ServingAddr};
use gpuscale_agent::{NodeConfig, RunningNode, start_node};
use gpuscale_core::sample::{EngineSample, Framework};
use gpuscale_core::{Histogram, PodRef};
use gpuscale_telemetry::EngineTarget;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::eventually;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// How the stand-in engine generates.
#[derive(Debug, Clone, Copy)]
struct Pace {
    slots: usize,
    prefill: Duration,
    per_token: Duration,
}

#[derive(Debug, Default)]
struct EngineCounters {
    processing: AtomicU64,
    max_processing: AtomicU64,
    prompt_tokens: AtomicU64,
    predicted: AtomicU64,
}

/// The stand-in `llama-server`; see the module docs.
async fn start_engine(pace: Pace) -> (SocketAddr, Arc<EngineCounters>) {
    let counters = Arc::new(EngineCounters::default());
    let slots = Arc::new(Semaphore::new(pace.slots));
    let c = counters.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let (c, slots) = (c.clone(), slots.clone());
        async move { Ok::<_, Infallible>(engine(req, pace, c, slots).await) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gpuscale_proxy::server::serve(
        listener,
        service,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    (addr, counters)
}

fn full(s: String) -> Body {
    BodyExt::boxed(Full::new(Bytes::from(s)))
}

/// Decrements the processing gauge when the stream ends or its client goes.
struct Processing(Arc<EngineCounters>);

impl Drop for Processing {
    fn drop(&mut self) {
        self.0.processing.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn engine(
    req: Request<Incoming>,
    pace: Pace,
    c: Arc<EngineCounters>,
    slots: Arc<Semaphore>,
) -> Response<Body> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/health") => Response::new(full("{\"status\":\"ok\"}".into())),
        ("GET", "/metrics") => Response::new(full(format!(
            "# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total {}\n\
             # TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total {}\n\
             # TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {}\n\
             # TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 0\n",
            c.prompt_tokens.load(Ordering::SeqCst),
            c.predicted.load(Ordering::SeqCst),
            c.processing.load(Ordering::SeqCst),
        ))),
        ("POST", "/v1/chat/completions") => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let n = v["max_tokens"].as_u64().unwrap();
            let permit = slots.acquire_owned().await.unwrap();
            let now = c.processing.fetch_add(1, Ordering::SeqCst) + 1;
            c.max_processing.fetch_max(now, Ordering::SeqCst);
            let guard = Processing(c.clone());
            c.prompt_tokens.fetch_add(3, Ordering::SeqCst);
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                let _slot = (permit, guard);
                let send = |s: String| {
                    let tx = tx.clone();
                    async move { tx.send(Ok(Frame::data(Bytes::from(s)))).await.is_ok() }
                };
                let chunk = |delta: &str, extra: &str| {
                    format!(
                        "data: {{\"choices\":[{{\"finish_reason\":null,\"index\":0,\"delta\":{delta}}}],\"object\":\"chat.completion.chunk\"{extra}}}\n\n"
                    )
                };
                tokio::time::sleep(pace.prefill).await;
                if !send(chunk("{\"role\":\"assistant\",\"content\":null}", "")).await {
                    return;
                }
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(pace.per_token).await;
                    }
                    c.predicted.fetch_add(1, Ordering::SeqCst);
                    if !send(chunk(&format!("{{\"content\":\"t{i} \"}}"), "")).await {
                        return;
                    }
                }
                let usage = format!(
                    ",\"usage\":{{\"completion_tokens\":{n},\"prompt_tokens\":3,\"total_tokens\":{}}}",
                    n + 3
                );
                let last = chunk("{}", &usage).replace("null", "\"length\"");
                let _ = send(format!("{last}data: [DONE]\n\n")).await;
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
                .unwrap()
        }
        _ => {
            let mut r = Response::new(full(String::new()));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn pod() -> PodRef {
    PodRef::new("llm", "llama-0")
}

/// A real agent: no GPUs, the engine scraped as llama.cpp for the pod,
/// the ServingService on TCP. It has no scaler to talk to: the test reads
/// its samples and sets the limits the scaler would.
async fn start_agent(engine: SocketAddr) -> RunningNode {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeConfig::nvml(dir.path().join("libnvidia-ml.so.1"));
    node.pod_resources = None;
    node.kubernetes = KubernetesMode::Off;
    node.serving = Some(ServingAddr::Tcp("127.0.0.1:0".parse().unwrap()));
    node.engines = vec![
        EngineTarget::parse_flag(&format!("llm/llama-0=llama-cpp=http://{engine}/metrics"))
            .unwrap(),
    ];
    let config = support::fast_agent_config("http://127.0.0.1:1", "node-a");
    start_node(config, node, None).await.unwrap()
}

/// `gpuscale proxy` as a child process; killed when dropped.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(engine: SocketAddr, agent: SocketAddr) -> Proxy {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .args(["proxy", "--listen", &addr.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--upstream", &format!("http://{engine}")])
        .args(["--agent", &agent.to_string(), "--pod", "llm/llama-0"])
        .args(["--report-interval", "100ms", "--model", "tiny-llama"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proxy { child, addr, admin }
}

fn client() -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn get(url: String) -> Option<(StatusCode, String)> {
    let resp = client()
        .request(Request::get(url).body(full(String::new())).unwrap())
        .await
        .ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A gauge or counter of a Prometheus text body.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn proxy_metric(p: &Proxy, name: &str) -> Option<f64> {
    let (_, text) = get(format!("http://{}/metrics", p.admin)).await?;
    series(&text, name)
}

/// What one client saw of its streamed answer.
#[derive(Debug, Clone)]
struct Answer {
    ttft: f64,
    tpot: Option<f64>,
    content: String,
    usage_tokens: u64,
    finished: bool,
    done: bool,
    started: Instant,
    ended: Instant,
}

/// Streams one chat completion through the proxy, measuring as a client:
/// TTFT from before the request is sent to the first content chunk, TPOT
/// from the first content chunk to the end of the body over the stated
/// output tokens after the first.
async fn chat(proxy: SocketAddr, max_tokens: u64) -> Answer {
    let body = format!(
        "{{\"model\":\"tiny-llama\",\"stream\":true,\"max_tokens\":{max_tokens},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
    );
    let req = Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .unwrap();
    let c = client();
    let started = Instant::now();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut first = None;
    let (mut content, mut usage_tokens, mut finished, mut done) = (String::new(), 0, false, false);
    while let Some(frame) = body.frame().await {
        let at = Instant::now();
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        buf.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let payload = event.trim().strip_prefix("data: ").unwrap().to_string();
            if payload == "[DONE]" {
                done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
            if let Some(text) = v["choices"][0]["delta"]["content"].as_str()
                && !text.is_empty()
            {
                first.get_or_insert(at);
                content.push_str(text);
            }
            finished |= v["choices"][0]["finish_reason"].is_string();
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage_tokens = n;
            }
        }
    }
    let ended = Instant::now();
    let first = first.expect("a token");
    Answer {
        ttft: (first - started).as_secs_f64(),
        tpot: (usage_tokens >= 2)
            .then(|| (ended - first).as_secs_f64() / (usage_tokens - 1) as f64),
        content,
        usage_tokens,
        finished,
        done,
        started,
        ended,
    }
}

fn expected_content(n: u64) -> String {
    (0..n).map(|i| format!("t{i} ")).collect()
}

/// The histogram holds the measured values, each within `tol`: its count is
/// theirs, its mean within `tol` of theirs, and every cumulative bucket lies
/// between the values `tol` below and `tol` above its bound.
fn assert_matches(h: &Histogram, measured: &[f64], tol: f64, what: &str) {
    assert_eq!(h.count(), measured.len() as u64, "{what}: count");
    let n = measured.len() as f64;
    let mean_gap = (h.sum() - measured.iter().sum::<f64>()).abs() / n;
    assert!(mean_gap <= tol, "{what}: means differ by {mean_gap} s");
    for (b, c) in h.bounds().iter().zip(h.cumulative_counts()) {
        let lo = measured.iter().filter(|v| **v <= b - tol).count() as u64;
        let hi = measured.iter().filter(|v| **v <= b + tol).count() as u64;
        assert!(
            lo <= *c && *c <= hi,
            "{what}: bucket le={b} holds {c}, the clients' values put it in {lo}..={hi}: {measured:?}"
        );
    }
}

/// The agent's one engine sample for the pod.
fn engine_sample(node: &RunningNode) -> Option<EngineSample> {
    let snapshot = node.handle().latest_snapshot()?;
    let mine: Vec<_> = snapshot
        .engines
        .iter()
        .filter(|e| e.pod == pod())
        .cloned()
        .collect();
    assert!(mine.len() <= 1, "one engine per pod: {mine:#?}");
    mine.into_iter().next()
}

/// Samples the engine's own `llamacpp:requests_processing` every 5 ms.
fn sample_processing(engine: SocketAddr) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let max = Arc::new(AtomicU64::new(0));
    let m = max.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Some((_, text)) = get(format!("http://{engine}/metrics")).await
                && let Some(v) = series(&text, "llamacpp:requests_processing")
            {
                m.fetch_max(v as u64, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (max, task)
}

const PACE: Pace = Pace {
    slots: 16,
    prefill: Duration::from_millis(20),
    per_token: Duration::from_millis(15),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_engine_never_runs_more_than_the_limit_and_the_proxy_measures_what_clients_see() {
    let (engine, counters) = start_engine(PACE).await;
    let node = start_agent(engine).await;
    let limits = node.limits().clone();
    limits.set_batch_limit(&pod(), Some(2));
    let proxy = start_proxy(engine, node.serving_addr().unwrap());
    let mut limit = None;
    for _ in 0..1000 {
        limit = proxy_metric(&proxy, "gpuscale_proxy_batch_limit").await;
        if limit == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(limit, Some(2.0), "the proxy follows the agent's limit");

    // Eight concurrent clients at limit 2.
    let (max_sampled, sampler) = sample_processing(engine);
    let tokens = 12;
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(chat(proxy.addr, tokens)))
        .collect();
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    sampler.abort();
    let sampled = max_sampled.load(Ordering::SeqCst);
    assert!(sampled <= 2, "the engine's gauge read {sampled} processing");
    assert_eq!(sampled, 2, "the limit was reached, so it was exercised");
    assert_eq!(
        counters.max_processing.load(Ordering::SeqCst),
        2,
        "never more than 2, exactly"
    );
    for a in &answers {
        assert_eq!(a.content, expected_content(tokens), "the full answer");
        assert_eq!(a.usage_tokens, tokens);
        assert!(a.finished && a.done, "finish_reason and [DONE] arrived");
    }

    // The proxy's histograms, as the agent holds them for the pod's one
    // engine (the scraped llama.cpp sample, enriched by the proxy).
    let mut sample = None;
    eventually("the proxy's stats for 8 requests at the agent", || {
        sample = engine_sample(&node)
            .filter(|e| e.ttft_seconds.as_ref().is_some_and(|h| h.count() == 8));
        sample.is_some()
    })
    .await;
    let e = sample.unwrap();
    assert_eq!(
        e.framework,
        Framework::LlamaCpp,
        "the scraped engine, not a second one"
    );
    assert_eq!(e.batch_limit, Some(2));
    assert_eq!(e.requests_arrived_total, Some(8.0));
    let ttfts: Vec<f64> = answers.iter().map(|a| a.ttft).collect();
    let tpots: Vec<f64> = answers.iter().map(|a| a.tpot.unwrap()).collect();
    assert_matches(e.ttft_seconds.as_ref().unwrap(), &ttfts, 0.005, "TTFT");
    assert_matches(e.tpot_seconds.as_ref().unwrap(), &tpots, 0.005, "TPOT");
    // Queueing counted in TTFT: the last admitted waited for three rounds.
    let slowest = ttfts.iter().cloned().fold(0.0, f64::max);
    assert!(
        slowest > 3.0 * (PACE.per_token * 11).as_secs_f64(),
        "{ttfts:?}"
    );

    // Raising the limit to 8 admits the queued requests at once: eight long
    // streams at limit 2, six queued; at limit 8 all eight run before any
    // of the first two has finished.
    let long = 100;
    let (max_sampled, sampler) = sample_processing(engine);
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(chat(proxy.addr, long)))
        .collect();
    eventually("six requests queued at the proxy", || {
        engine_sample(&node).is_some_and(|e| e.requests_waiting == Some(6.0))
    })
    .await;
    assert_eq!(
        proxy_metric(&proxy, "gpuscale_proxy_queued").await,
        Some(6.0)
    );
    assert!(max_sampled.load(Ordering::SeqCst) <= 2);
    let raised = Instant::now();
    limits.set_batch_limit(&pod(), Some(8));
    eventually("eight processing at the engine", || {
        counters.processing.load(Ordering::SeqCst) == 8
    })
    .await;
    let all_running = Instant::now();
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    sampler.abort();
    assert_eq!(
        max_sampled.load(Ordering::SeqCst),
        8,
        "the engine's gauge saw 8"
    );
    let first_done = answers.iter().map(|a| a.ended).min().unwrap();
    assert!(
        all_running < first_done,
        "the six were admitted while the first two still ran"
    );
    let waited_for_limit = answers.iter().filter(|a| a.started < raised).count();
    assert_eq!(waited_for_limit, 8);
    for a in &answers {
        assert_eq!(a.content, expected_content(long));
    }
    drop(proxy);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_finishes_streams_refuses_new_requests_with_close_and_reports_empty() {
    let (engine, counters) = start_engine(PACE).await;
    let node = start_agent(engine).await;
    let limits = node.limits().clone();
    let mut proxy = start_proxy(engine, node.serving_addr().unwrap());
    let mut ready = None;
    for _ in 0..1000 {
        ready = get(format!("http://{}/readyz", proxy.admin)).await;
        if ready.is_some()
            && proxy_metric(&proxy, "gpuscale_proxy_agent_connected").await == Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready.map(|r| r.0), Some(StatusCode::OK));

    let tokens = 60;
    let streams: Vec<_> = (0..3)
        .map(|_| tokio::spawn(chat(proxy.addr, tokens)))
        .collect();
    eventually("three streams at the engine", || {
        counters.processing.load(Ordering::SeqCst) == 3
    })
    .await;

    // The scaler drains the pod (through the agent).
    limits.set_draining(&pod(), true);
    let mut readiness = None;
    for _ in 0..1000 {
        readiness = get(format!("http://{}/readyz", proxy.admin))
            .await
            .map(|r| r.0);
        if readiness == Some(StatusCode::SERVICE_UNAVAILABLE) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        readiness,
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "not ready first"
    );
    let refused = client()
        .request(
            Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(
                    "{\"stream\":true,\"max_tokens\":4,\"messages\":[]}".into(),
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[header::CONNECTION], "close");
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let v: serde_json::Value =
        serde_json::from_slice(&refused.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "draining");
    assert!(
        counters.processing.load(Ordering::SeqCst) == 3,
        "the refused one never reached the engine"
    );

    for s in streams {
        let a = s.await.unwrap();
        assert_eq!(
            a.content,
            expected_content(tokens),
            "in-flight streams complete"
        );
        assert!(a.finished && a.done);
    }
    // Empty: the proxy says so to the preStop hook and to the agent.
    let (status, body) = get(format!("http://{}/drain", proxy.admin)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["drained"], true);
    eventually("the agent sees the pod draining and empty", || {
        engine_sample(&node).is_some_and(|e| {
            e.state == gpuscale_core::sample::EngineState::Draining
                && e.requests_waiting == Some(0.0)
                && e.requests_running == Some(0.0)
                && e.requests_finished_total.is_some()
        })
    })
    .await;
    assert_eq!(
        proxy_metric(&proxy, "gpuscale_proxy_in_flight").await,
        Some(0.0)
    );

    // SIGTERM: the process stops cleanly (it is already empty).
    let pid = proxy.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut code = None;
    for _ in 0..1000 {
        if let Some(s) = proxy.child.try_wait().unwrap() {
            code = s.code();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(code, Some(0), "exits 0 after SIGTERM");
    node.shutdown().await.unwrap();
}
