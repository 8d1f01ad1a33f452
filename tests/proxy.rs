//! `gpuscale proxy` as it runs in a pod: the real binary in front of a real
//! inference engine, llama.cpp's `llama-server` (on the CPU, a tiny
//! random-weight model, more slots than the limit; see
//! `tests/support/llama_server.rs`), a real node agent (its ServingService
//! over TCP, the engine scraped as llama.cpp), and clients streaming chat
//! completions over real sockets.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gpuscale_agent::node::{KubernetesMode, ServingAddr};
use gpuscale_agent::{NodeConfig, RunningNode, start_node};
use gpuscale_core::sample::{EngineSample, EngineState, Framework};
use gpuscale_core::{Histogram, PodRef};
use gpuscale_telemetry::EngineTarget;
use http::header;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::eventually;
use support::llama_server::{self, LlamaServer, LlamaServerOptions};
use tokio::time::Instant;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A real `llama-server` with `slots` slots, started off the runtime (it
/// waits for the server's health).
async fn start_engine(slots: u32) -> (LlamaServer, tempfile::TempDir) {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let model = llama_server::tiny_model(dir.path());
        let options = LlamaServerOptions {
            slots,
            ..LlamaServerOptions::default()
        };
        let server = LlamaServer::start(
            &llama_server::binary(),
            &model,
            &options,
            &dir.path().join("llama-server.log"),
        );
        (server, dir)
    })
    .await
    .unwrap()
}

fn full(s: String) -> Body {
    BodyExt::boxed(Full::new(Bytes::from(s)))
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
    let addr: SocketAddr = format!("127.0.0.1:{}", llama_server::free_port())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", llama_server::free_port())
        .parse()
        .unwrap();
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
    tpot: f64,
    content: String,
    /// Events whose delta carried text.
    content_events: u64,
    usage_tokens: u64,
    finish_reason: Option<String>,
    done: bool,
    ended: Instant,
}

/// Streams one chat completion of exactly `max_tokens` tokens through the
/// proxy, measuring as a client: TTFT from the moment the request is sent to
/// the first event with content, TPOT from that event to the end of the
/// body over the stated output tokens after the first.
///
/// A blocking socket on its own thread, connected before the clock starts
/// (as a client with a kept-alive connection), timing each read as the
/// kernel hands it over; HTTP/1.0, so the body is the raw event stream up to
/// the connection's end.
async fn chat(proxy: SocketAddr, max_tokens: u64) -> Answer {
    tokio::task::spawn_blocking(move || chat_blocking(proxy, max_tokens))
        .await
        .unwrap()
}

fn chat_blocking(proxy: SocketAddr, max_tokens: u64) -> Answer {
    use std::io::{Read, Write};
    let body = format!(
        "{{\"model\":\"tiny-llama\",\"stream\":true,\"stream_options\":{{\"include_usage\":true}},\"ignore_eos\":true,\"max_tokens\":{max_tokens},\"messages\":[{{\"role\":\"user\",\"content\":\"Tell me a story.\"}}]}}"
    );
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: {proxy}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(proxy).unwrap();
    stream.set_nodelay(true).unwrap();
    let started = std::time::Instant::now();
    stream.write_all(request.as_bytes()).unwrap();
    let mut a = Answer {
        ttft: 0.0,
        tpot: 0.0,
        content: String::new(),
        content_events: 0,
        usage_tokens: 0,
        finish_reason: None,
        done: false,
        ended: Instant::now(),
    };
    let mut first = None;
    let mut head: Option<String> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        let at = std::time::Instant::now();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if head.is_none() {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let h: Vec<u8> = buf.drain(..end + 4).collect();
            head = Some(String::from_utf8(h).unwrap());
        }
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let event = String::from_utf8(event).unwrap();
            let payload = event.trim().strip_prefix("data: ").unwrap().to_string();
            if payload == "[DONE]" {
                a.done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
            if let Some(text) = v["choices"][0]["delta"]["content"].as_str()
                && !text.is_empty()
            {
                first.get_or_insert(at);
                a.content.push_str(text);
                a.content_events += 1;
            }
            if let Some(r) = v["choices"][0]["finish_reason"].as_str() {
                a.finish_reason = Some(r.to_string());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                a.usage_tokens = n;
            }
        }
    }
    let ended = std::time::Instant::now();
    let head = head.expect("a response head");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let first = first.expect("a token");
    a.ended = Instant::from_std(ended);
    a.ttft = (first - started).as_secs_f64();
    a.tpot = (ended - first).as_secs_f64() / (a.usage_tokens.max(2) - 1) as f64;
    a
}

/// The whole answer arrived: `max_tokens` tokens, the finish reason, the
/// usage and `[DONE]`.
fn assert_complete(a: &Answer, max_tokens: u64) {
    assert_eq!(a.usage_tokens, max_tokens, "{a:?}");
    assert_eq!(a.finish_reason.as_deref(), Some("length"), "{a:?}");
    assert!(a.done, "[DONE] arrived: {a:?}");
    assert!(
        a.content_events >= max_tokens / 2 && !a.content.is_empty(),
        "the tokens were streamed: {a:?}"
    );
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

/// The engine's own `llamacpp:requests_processing`, sampled every 10 ms:
/// `(when, value)` for as long as the task runs.
type Timeline = Arc<Mutex<Vec<(Instant, u64)>>>;

fn sample_processing(engine: SocketAddr) -> (Timeline, tokio::task::JoinHandle<()>) {
    let timeline = Timeline::default();
    let t = timeline.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Some((_, text)) = get(format!("http://{engine}/metrics")).await
                && let Some(v) = series(&text, "llamacpp:requests_processing")
            {
                t.lock().unwrap().push((Instant::now(), v as u64));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (timeline, task)
}

fn max_of(timeline: &Timeline) -> u64 {
    timeline
        .lock()
        .unwrap()
        .iter()
        .map(|(_, v)| *v)
        .max()
        .unwrap_or(0)
}

async fn wait_proxy_metric(p: &Proxy, name: &str, want: f64) {
    let mut last = None;
    for _ in 0..2000 {
        last = proxy_metric(p, name).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name}: {last:?}, wanted {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn llama_server_never_runs_more_than_the_limit_and_the_proxy_measures_what_clients_see() {
    // More slots than the limit: the engine alone would run all eight.
    let (engine, _dir) = start_engine(8).await;
    let node = start_agent(engine.addr()).await;
    let limits = node.limits().clone();
    limits.set_batch_limit(&pod(), Some(2));
    let proxy = start_proxy(engine.addr(), node.serving_addr().unwrap());
    wait_proxy_metric(&proxy, "gpuscale_proxy_batch_limit", 2.0).await;

    // Eight concurrent clients at limit 2.
    let (timeline, sampler) = sample_processing(engine.addr());
    let tokens = 64;
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(chat(proxy.addr, tokens)))
        .collect();
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    sampler.abort();
    let samples = timeline.lock().unwrap().len();
    let max = max_of(&timeline);
    assert!(max <= 2, "the engine's own gauge read {max} processing");
    assert_eq!(
        max, 2,
        "the limit was reached ({samples} samples), so it was exercised"
    );
    for a in &answers {
        assert_complete(a, tokens);
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
    let tpots: Vec<f64> = answers.iter().map(|a| a.tpot).collect();
    assert_matches(e.ttft_seconds.as_ref().unwrap(), &ttfts, 0.005, "TTFT");
    assert_matches(e.tpot_seconds.as_ref().unwrap(), &tpots, 0.005, "TPOT");
    // The queue counts in TTFT: the last pair waited for three pairs, each
    // decoding 63 tokens after its first.
    let slowest = ttfts.iter().cloned().fold(0.0, f64::max);
    let quickest_tpot = tpots.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        slowest > 2.0 * 63.0 * quickest_tpot,
        "TTFTs {ttfts:?}, TPOTs {tpots:?}"
    );

    // Raising the limit to 8 admits the queued requests at once: eight long
    // streams at limit 2, six queued; at limit 8 the engine runs all eight
    // before either of the first two has finished.
    let long = 600;
    let (timeline, sampler) = sample_processing(engine.addr());
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(chat(proxy.addr, long)))
        .collect();
    wait_proxy_metric(&proxy, "gpuscale_proxy_queued", 6.0).await;
    eventually("the agent counts the proxy's queue as waiting", || {
        engine_sample(&node).is_some_and(|e| e.requests_waiting == Some(6.0))
    })
    .await;
    assert!(max_of(&timeline) <= 2);
    limits.set_batch_limit(&pod(), Some(8));
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    sampler.abort();
    let first_done = answers.iter().map(|a| a.ended).min().unwrap();
    let eight_before = timeline
        .lock()
        .unwrap()
        .iter()
        .any(|(at, v)| *v == 8 && *at < first_done);
    assert!(
        eight_before,
        "the engine ran eight before the first stream ended: {:?}",
        timeline.lock().unwrap()
    );
    for a in &answers {
        assert_complete(a, long);
    }
    drop(proxy);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_finishes_llama_server_streams_refuses_new_requests_with_close_and_reports_empty() {
    let (engine, _dir) = start_engine(4).await;
    let node = start_agent(engine.addr()).await;
    let limits = node.limits().clone();
    let mut proxy = start_proxy(engine.addr(), node.serving_addr().unwrap());
    wait_proxy_metric(&proxy, "gpuscale_proxy_agent_connected", 1.0).await;
    let ready = get(format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!(ready.map(|r| r.0), Some(StatusCode::OK));

    let tokens = 400;
    let streams: Vec<_> = (0..3)
        .map(|_| tokio::spawn(chat(proxy.addr, tokens)))
        .collect();
    wait_proxy_metric(&proxy, "gpuscale_proxy_in_flight", 3.0).await;

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
                    "{\"stream\":true,\"max_tokens\":4,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}".into(),
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
    let mut ended = Vec::new();
    for s in streams {
        let a = s.await.unwrap();
        assert_complete(&a, tokens);
        ended.push(a.ended);
    }
    assert_eq!(
        proxy_metric(&proxy, "gpuscale_proxy_requests_arrived_total").await,
        Some(4.0)
    );
    assert_eq!(
        proxy_metric(
            &proxy,
            "gpuscale_proxy_requests_total{outcome=\"finished\"}"
        )
        .await,
        Some(3.0),
        "the refused request never reached the engine"
    );

    // Empty: the proxy says so to the preStop hook and to the agent.
    let (status, body) = get(format!("http://{}/drain", proxy.admin)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["drained"], true);
    eventually("the agent sees the pod draining and empty", || {
        engine_sample(&node).is_some_and(|e| {
            e.state == EngineState::Draining
                && e.requests_waiting == Some(0.0)
                && e.requests_running == Some(0.0)
                && e.requests_finished_total == Some(3.0)
        })
    })
    .await;

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
