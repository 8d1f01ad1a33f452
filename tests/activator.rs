//! `gpuscale activator` (the real binary) in front of a workload at zero,
//! with a real scaler (gRPC over a socket) whose actuator starts a
//! simulated OpenAI-compatible engine after a start-up delay, the way a
//! Deployment's pod would become ready behind its Service:
//!
//! * 100 concurrent streaming requests at zero are held, the scaler is
//!   told at once (its tick is a minute: only the wake-up can scale it in
//!   time), all 100 are answered in full once the replica is warm; past the
//!   hold bound the extra requests get 429 with `Retry-After`.
//! * An activator killed while holding requests: each of its clients gets
//!   an error at once (its connection closes), none hangs.
//! * No scaler: held requests time out with a clear 503.
//! * A held streaming request is answered 200 `text/event-stream` at once,
//!   receives SSE keep-alive comments while held, then the engine's events
//!   as the engine sends them (not gathered up), under the activator's
//!   head (not the engine's headers); one sent with
//!   `X-Gpuscale-Keep-Alive: off` waits and gets the engine's head; a held
//!   stream whose deadline passes ends with an SSE error event.
//!
//! And the whole path, with nothing in process but the engines: the fake
//! API server (Deployments at zero, InferenceAutoscalers `minReplicas: 0`),
//! the scaler with its Kubernetes controller acting on `/scale`, the fake
//! kubelet running the pods, a real agent reporting their simulated
//! OpenAI-compatible engines and setting the readiness gate, a Service per
//! workload reaching its Ready pods only, and two activator processes
//! authenticated to the scaler by API server tokens:
//!
//! * 100 concurrent requests at zero all answered in full once the first
//!   replica is warm; past the hold bound, 429 with `Retry-After`.
//! * An activator replica restarted (SIGTERM) while holding: its held
//!   requests get 503 `draining` with `Retry-After` at once, the other
//!   replica's held requests are answered, the restarted one serves.
//! * The scaler down: held requests time out with a 503 saying the scaler
//!   is unreachable.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

/// The kube crate's fake cluster: the fake API server with the CRD, its
/// objects and the scaler's configuration for it.
#[path = "../crates/kube/tests/support/mod.rs"]
mod cluster;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gpuscale_core::{PodRef, Timestamp, WorkloadRef};
use gpuscale_policy::ReplicaState;
use gpuscale_policy::proportional::ProportionalConfig;
use gpuscale_scaler::actuate::{ActuateFuture, ClusterReplica, Plan, TargetObservation};
use gpuscale_scaler::config::{DeciderConfig, EngineSelector};
use gpuscale_scaler::{Actuator, RunningScaler, Scaler, ScalerConfig, WorkloadDef};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

const CHUNKS: usize = 5;

fn workload() -> WorkloadRef {
    WorkloadRef::new("test", "chat")
}

/// A free local port (bound, then released for the engine to take later).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The simulated engine: `/health` and a streamed chat completion of
/// `CHUNKS` events and `[DONE]`, `gap` apart.
async fn engine(req: Request<Incoming>, gap: Duration) -> Result<Response<EngineBody>, Infallible> {
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS + 1);
    let mut r = Response::new(StreamBody::new(ReceiverStream::new(rx)));
    if req.uri().path() == "/health" {
        let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"ok"))));
        return Ok(r);
    }
    let _ = req.into_body().collect().await;
    tokio::spawn(async move {
        for i in 0..CHUNKS {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            let event = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            );
            let _ = tx.send(Ok(Frame::data(Bytes::from(event)))).await;
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
            .await;
    });
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
    r.headers_mut()
        .insert("x-request-id", "engine-1".parse().unwrap());
    Ok(r)
}

type EngineBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

async fn serve_engine(addr: SocketAddr, gap: Duration) -> JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(serve_engine_on(listener, gap))
}

/// The engine's accept loop on `listener`.
async fn serve_engine_on(listener: tokio::net::TcpListener, gap: Duration) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| engine(req, gap)),
                )
                .await;
        });
    }
}

/// The scale target: a Deployment whose pod becomes ready `startup` after
/// the scaler asks for it (the engine starts listening then).
struct FakeTarget {
    engine_addr: SocketAddr,
    startup: Duration,
    start_engines: bool,
    chunk_gap: Duration,
    replicas: AtomicU32,
    created: Mutex<Option<Timestamp>>,
    asked: Mutex<Vec<(u32, std::time::Instant, String)>>,
    engine: Mutex<Option<JoinHandle<()>>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeTarget {
    fn new(engine_addr: SocketAddr, startup: Duration, start_engines: bool) -> Arc<Self> {
        Self::with_gap(engine_addr, startup, start_engines, Duration::ZERO)
    }

    /// As `new`, the engine's events `chunk_gap` apart.
    fn with_gap(
        engine_addr: SocketAddr,
        startup: Duration,
        start_engines: bool,
        chunk_gap: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine_addr,
            startup,
            start_engines,
            chunk_gap,
            replicas: AtomicU32::new(0),
            created: Mutex::new(None),
            asked: Mutex::new(Vec::new()),
            engine: Mutex::new(None),
            ready: Arc::default(),
        })
    }
}

fn now() -> Timestamp {
    Timestamp::from_millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    )
}

impl Actuator for FakeTarget {
    fn observe<'a>(&'a self, _: &'a WorkloadRef) -> ActuateFuture<'a, TargetObservation> {
        Box::pin(async move {
            let n = self.replicas.load(Ordering::SeqCst);
            let created = *self.created.lock().unwrap();
            let state = if self.ready.load(Ordering::SeqCst) {
                ReplicaState::Ready
            } else {
                ReplicaState::Loading
            };
            Ok(TargetObservation {
                current: Some(n),
                replicas: Some(
                    (0..n)
                        .map(|i| ClusterReplica {
                            pod: PodRef::new("test", format!("chat-{i}")),
                            state,
                            protected: false,
                            created_at: created,
                        })
                        .collect(),
                ),
            })
        })
    }

    fn apply<'a>(&'a self, _: &'a WorkloadRef, plan: &'a Plan) -> ActuateFuture<'a, ()> {
        Box::pin(async move {
            let replicas = plan.decision.desired_replicas;
            self.asked.lock().unwrap().push((
                replicas,
                std::time::Instant::now(),
                plan.decision.limits_applied().join("; "),
            ));
            let before = self.replicas.swap(replicas, Ordering::SeqCst);
            if before == 0 && replicas > 0 {
                *self.created.lock().unwrap() = Some(now());
                if self.start_engines {
                    let (addr, startup, ready, gap) = (
                        self.engine_addr,
                        self.startup,
                        self.ready.clone(),
                        self.chunk_gap,
                    );
                    let handle = tokio::spawn(async move {
                        tokio::time::sleep(startup).await;
                        let serving = serve_engine(addr, gap).await;
                        ready.store(true, Ordering::SeqCst);
                        let _ = serving.await;
                    });
                    *self.engine.lock().unwrap() = Some(handle);
                }
            }
            Ok(())
        })
    }
}

async fn start_scaler(target: Arc<FakeTarget>) -> RunningScaler {
    let mut config = ScalerConfig::new("127.0.0.1:0".parse().unwrap());
    // A minute: a scale from zero that waited for the tick would not come
    // before the held requests' deadline.
    config.tick = Duration::from_secs(60);
    config.workloads.push(WorkloadDef {
        workload: workload(),
        labels: Default::default(),
        selector: EngineSelector {
            model: None,
            namespace: Some("test".into()),
        },
        decider: DeciderConfig::Proportional(ProportionalConfig {
            capacity_tokens_per_second: 1_000.0,
            target_utilization: 0.8,
            min_replicas: 0,
            max_replicas: 2,
            scale_down_stabilization: Duration::from_secs(300),
            tolerance: 0.1,
            stale_after: Duration::from_secs(60),
            advisory: false,
        }),
        last_decision: None,
    });
    Scaler::new(config)
        .with_actuator(target)
        .start()
        .await
        .unwrap()
}

struct Activator {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Activator {
    /// A series of the activator's `/metrics`.
    async fn metric(&self, series: &str) -> Option<f64> {
        let c: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let resp = c
            .get(format!("http://{}/metrics", self.admin).parse().unwrap())
            .await
            .ok()?;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_activator(scaler: &str, engine: SocketAddr, extra: &[&str]) -> Activator {
    let workload = format!("--workload=test/chat=http://{engine}");
    let args = [&["--name=activator-0", workload.as_str()], extra].concat();
    start_activator_at(free_port(), free_port(), scaler, &args).await
}

/// The activator listening on `addr` (admin on `admin`); `args` name its
/// workloads and anything else.
async fn start_activator_at(
    addr: SocketAddr,
    admin: SocketAddr,
    scaler: &str,
    args: &[&str],
) -> Activator {
    let child = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .arg("activator")
        .arg(format!("--listen={addr}"))
        .arg(format!("--admin-addr={admin}"))
        .arg(format!("--scaler={scaler}"))
        .arg("--probe-interval=50ms")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let a = Activator { child, addr, admin };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the activator did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: String,
}

async fn chat(c: &Client<HttpConnector, Full<Bytes>>, addr: SocketAddr) -> Result<Answer, String> {
    ask(c, addr, "chat.test", true).await
}

/// A chat completion for the workload of `host`, a stream or not.
async fn ask(
    c: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    host: &str,
    stream: bool,
) -> Result<Answer, String> {
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(format!(
            "{{\"model\":\"chat\",\"stream\":{stream},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
        ))))
        .unwrap();
    let resp = c.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        retry_after,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `n` requests for `host` through `addr`, concurrently.
fn send_all(
    c: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    host: &'static str,
    stream: bool,
    n: usize,
) -> Vec<JoinHandle<Result<Answer, String>>> {
    (0..n)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { ask(&c, addr, host, stream).await })
        })
        .collect()
}

/// Each answered 200 with the engine's whole stream.
async fn all_answered(what: &str, requests: Vec<JoinHandle<Result<Answer, String>>>) {
    for r in requests {
        let a = r
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: a connection error: {e}"));
        assert_eq!(a.status, StatusCode::OK, "{what}: {}", a.body);
        assert_eq!(
            a.body.matches("\"content\"").count(),
            CHUNKS,
            "{what}: {}",
            a.body
        );
        assert!(a.body.ends_with("data: [DONE]\n\n"), "{what}: {}", a.body);
    }
}

impl Activator {
    /// Waits until the activator's `series` reads `value`.
    async fn reads(&self, series: &str, value: f64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.metric(series).await != Some(value) {
            assert!(
                std::time::Instant::now() < deadline,
                "the activator's {series} never read {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the activator holds `n` requests of `workload`.
    async fn holds(&self, workload: &WorkloadRef, n: f64) {
        self.reads(
            &format!(
                "gpuscale_activator_held_requests{{namespace=\"{}\",workload=\"{}\"}}",
                workload.namespace, workload.name
            ),
            n,
        )
        .await;
    }
}

/// A refusal: `status`, `Retry-After: 1` and the JSON error `code`; its
/// message.
fn refused(a: &Answer, status: StatusCode, code: &str) -> String {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workload_at_zero_answers_100_held_requests_once_warm_and_refuses_past_the_bound() {
    let engine = free_port();
    let target = FakeTarget::new(engine, Duration::from_secs(5), true);
    let scaler = start_scaler(target.clone()).await;
    // Let the first tick pass (at zero, nothing held: stays at zero).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(target.asked.lock().unwrap().is_empty());
    let act = start_activator(
        &format!("http://{}", scaler.grpc_addr()),
        engine,
        &["--max-held-per-workload=100", "--hold-timeout=30s"],
    )
    .await;
    let c = client();
    let sent = std::time::Instant::now();
    let held = send_all(&c, act.addr, "chat.test", true, 100);
    // Wait until the activator holds all 100, then go past the bound.
    act.holds(&workload(), 100.0).await;
    for _ in 0..10 {
        let extra = chat(&c, act.addr).await.unwrap();
        refused(&extra, StatusCode::TOO_MANY_REQUESTS, "queue_full");
    }
    all_answered("held at zero", held).await;
    let asked = target.asked.lock().unwrap().clone();
    let (n, at, why) = asked.first().cloned().expect("the scaler scaled from zero");
    assert_eq!(n, 1);
    // Woken by the activator: long before the next tick (60 s).
    assert!(
        at.duration_since(sent) < Duration::from_secs(30),
        "scale from zero came {:?} after the first request",
        at.duration_since(sent)
    );
    assert!(why.contains("scale from zero:"), "{why}");
    assert!(why.contains("requests held at the activator"), "{why}");
    // The decision log carries the in-flight replica at its expected time
    // (a later decision, while it loads, at the next wake-up or tick).
    let view = scaler.handle().current();
    let d = view.workloads[&workload()].decision.clone().unwrap();
    assert!(
        d.scale_to_zero
            .as_ref()
            .is_some_and(|z| z.startup.p50_s.is_finite())
    );
    drop(act);
    scaler.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_activator_fails_what_it_held_at_once_and_no_scaler_gives_a_clear_503() {
    // No engine ever starts.
    let engine = free_port();
    let target = FakeTarget::new(engine, Duration::from_secs(3600), false);
    let scaler = start_scaler(target.clone()).await;
    let mut act = start_activator(
        &format!("http://{}", scaler.grpc_addr()),
        engine,
        &["--hold-timeout=60s"],
    )
    .await;
    let c = client();
    let held = send_all(&c, act.addr, "chat.test", true, 10);
    // Held: the scaler has been told (it asked for a replica).
    support::eventually("the scaler was told", || {
        !target.asked.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    act.child.kill().unwrap();
    let killed = std::time::Instant::now();
    for h in held {
        // A hang would outlive this bound by far (the hold is 60 s).
        let r = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("a held request hung after the activator died")
            .unwrap();
        assert!(r.is_err(), "a connection error, not an answer");
    }
    assert!(killed.elapsed() < Duration::from_secs(10));
    drop(act);

    // No scaler behind the activator: held requests time out with a 503
    // that says so.
    scaler.shutdown().await.unwrap();
    let act = start_activator(
        &format!("http://{}", free_port()),
        engine,
        &["--hold-timeout=1s", "--keep-alive-interval=off"],
    )
    .await;
    let a = chat(&c, act.addr).await.unwrap();
    let msg = refused(&a, StatusCode::SERVICE_UNAVAILABLE, "no_ready_replica");
    assert!(
        msg.contains("test/chat") && msg.contains("the scaler is unreachable"),
        "{msg}"
    );
}

/// A streamed response read frame by frame: each frame's text and when it
/// arrived after `since`.
async fn frames(resp: Response<Incoming>, since: std::time::Instant) -> Vec<(Duration, String)> {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(data) = f.unwrap().into_data() {
            out.push((since.elapsed(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_stream_gets_keep_alives_then_the_engines_events_as_they_come() {
    let engine = free_port();
    // Ready 3 s after the scaler asks; its 5 events 400 ms apart.
    let target = FakeTarget::with_gap(
        engine,
        Duration::from_secs(3),
        true,
        Duration::from_millis(400),
    );
    let scaler = start_scaler(target.clone()).await;
    let act = start_activator(
        &format!("http://{}", scaler.grpc_addr()),
        engine,
        &["--hold-timeout=30s", "--keep-alive-interval=500ms"],
    )
    .await;
    let c = client();
    let stream_request = |keep_alive: Option<&str>| {
        let mut r = Request::post(format!("http://{}/v1/chat/completions", act.addr))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(v) = keep_alive {
            r = r.header("x-gpuscale-keep-alive", v);
        }
        r.body(Full::new(Bytes::from_static(
            b"{\"model\":\"chat\",\"stream\":true,\"messages\":[]}",
        )))
        .unwrap()
    };
    let sent = std::time::Instant::now();
    // Beside it, a held stream that asks for no keep-alive.
    let waits = {
        let (c, req) = (c.clone(), stream_request(Some("off")));
        tokio::spawn(async move {
            let resp = c.request(req).await.unwrap();
            (sent.elapsed(), resp)
        })
    };
    let resp = c.request(stream_request(None)).await.unwrap();
    let head = sent.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    // Sent before the engine answered: the activator's head, not the
    // engine's (its `x-request-id` is not there).
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-cache");
    assert!(resp.headers().get("x-request-id").is_none());
    // The 200 comes while the request is held, long before the engine is up.
    assert!(head < Duration::from_secs(2), "head after {head:?}");
    let got = frames(resp, sent).await;
    let first_event = got
        .iter()
        .position(|(_, t)| t.starts_with("data:"))
        .expect("the engine's events");
    let keep_alives = &got[..first_event];
    // Held ≥ 3 s at one comment per 500 ms (the first at once).
    assert!(keep_alives.len() >= 5, "{got:?}");
    assert!(
        keep_alives.iter().all(|(_, t)| t == ": keep-alive\n\n"),
        "{got:?}"
    );
    let text: String = got[first_event..].iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(text.matches("\"content\"").count(), CHUNKS, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Passed through as the engine sent them: the first event reached the
    // client well before the last was sent (4 gaps of 400 ms).
    let (first_at, last_at) = (got[first_event].0, got[got.len() - 1].0);
    assert!(
        last_at - first_at >= Duration::from_millis(1200),
        "events gathered up: first at {first_at:?}, last at {last_at:?}"
    );
    assert_eq!(
        act.metric(
            "gpuscale_activator_requests_total{namespace=\"test\",workload=\"chat\",outcome=\"kept_alive\"}"
        )
        .await,
        Some(1.0)
    );
    // The one without keep-alive: its head is the engine's, once it is up.
    let (head, resp) = waits.await.unwrap();
    assert!(head >= Duration::from_secs(3), "head after {head:?}");
    assert_eq!(resp.headers()["x-request-id"], "engine-1");
    let got = frames(resp, sent).await;
    assert!(got.iter().all(|(_, t)| t.starts_with("data:")), "{got:?}");
    drop(act);
    scaler.shutdown().await.unwrap();

    // No scaler and a short deadline: the held stream's 200 is followed by
    // keep-alives and an SSE error event saying why.
    let act = start_activator(
        &format!("http://{}", free_port()),
        free_port(),
        &["--hold-timeout=1s", "--keep-alive-interval=200ms"],
    )
    .await;
    let sent = std::time::Instant::now();
    let resp = c
        .request(
            Request::post(format!("http://{}/v1/chat/completions", act.addr))
                .header(header::ACCEPT, "text/event-stream")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = frames(resp, sent).await;
    let (last, comments) = got.split_last().expect("frames");
    assert!(comments.len() >= 3, "{got:?}");
    let v: serde_json::Value =
        serde_json::from_str(last.1.strip_prefix("data: ").unwrap().trim()).unwrap();
    assert_eq!(v["error"]["code"], "no_ready_replica", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the scaler is unreachable")
    );
}

// ---------------------------------------------------------------------------
// The whole path: the fake API server, the scaler with its Kubernetes
// controller, an agent, simulated engines and the activator binary.

/// A model of the fake cluster: its Deployment's pods start an engine
/// once `release` is true, `startup` after their container runs.
struct Model {
    app: &'static str,
    startup: Duration,
    release: tokio::sync::watch::Sender<bool>,
}

/// What stands in for the kubelet's containers and the Services: each
/// Running pod of a model gets a simulated engine on the fake node (loading
/// at once, listening and warm after the model's start-up, for the agent to
/// report and gate), and each model's "Service" forwards a connection to
/// one of its Ready pods' engines or, with none, closes it (no endpoints).
struct Pods {
    server: Arc<gpuscale_fake_apiserver::FakeApiServerHandle>,
    node: gpuscale_telemetry::fake::FakeNodeHandle,
    models: Vec<Model>,
    engines: Mutex<std::collections::HashMap<String, SocketAddr>>,
}

fn ready(pod: &serde_json::Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

impl Pods {
    /// Live pods (not being deleted): name → app.
    fn pods(&self) -> Vec<(String, String, serde_json::Value)> {
        self.server
            .objects("", "pods", Some(cluster::NS))
            .into_iter()
            .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
            .filter_map(|p| {
                let name = p["metadata"]["name"].as_str()?.to_string();
                let app = p.pointer("/metadata/labels/app")?.as_str()?.to_string();
                Some((name, app, p))
            })
            .collect()
    }

    /// Starts and stops engines as pods run and go, every 50 ms.
    async fn run(self: Arc<Self>) {
        let mut started: std::collections::HashMap<String, JoinHandle<()>> = Default::default();
        loop {
            let pods = self.pods();
            for (name, app, p) in &pods {
                let running =
                    p.pointer("/status/phase").and_then(|v| v.as_str()) == Some("Running");
                if !running || started.contains_key(name) {
                    continue;
                }
                let Some(model) = self.models.iter().find(|m| m.app == app) else {
                    continue;
                };
                let pod = PodRef::new(cluster::NS, name.clone());
                let mut sample = gpuscale_core::sample::EngineSample::empty(
                    pod.clone(),
                    gpuscale_core::sample::Framework::Vllm,
                    app.clone(),
                    now(),
                );
                sample.state = gpuscale_core::sample::EngineState::Loading;
                sample.gpu_uuids = self.node.free_gpus().into_iter().take(1).collect();
                self.node.upsert_engine(sample);
                let (me, startup, mut release) =
                    (self.clone(), model.startup, model.release.subscribe());
                let name = name.clone();
                started.insert(
                    name.clone(),
                    tokio::spawn(async move {
                        let _ = release.wait_for(|r| *r).await;
                        tokio::time::sleep(startup).await;
                        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                        let addr = listener.local_addr().unwrap();
                        me.engines.lock().unwrap().insert(name, addr);
                        me.node.update_engine(&pod, |e| {
                            e.state = gpuscale_core::sample::EngineState::Warm;
                            e.requests_running = Some(0.0);
                            e.requests_waiting = Some(0.0);
                            e.kv_cache_usage_ratio = Some(0.0);
                        });
                        serve_engine_on(listener, Duration::ZERO).await;
                    }),
                );
            }
            started.retain(|name, task| {
                let live = pods.iter().any(|(n, _, _)| n == name);
                if !live {
                    task.abort();
                    self.node
                        .remove_engine(&PodRef::new(cluster::NS, name.clone()));
                    self.engines.lock().unwrap().remove(name);
                }
                live
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The engine of a Ready pod of `app`.
    fn endpoint(&self, app: &str) -> Option<SocketAddr> {
        let engines = self.engines.lock().unwrap().clone();
        self.pods()
            .into_iter()
            .filter(|(_, a, p)| a == app && ready(p))
            .find_map(|(n, _, _)| engines.get(&n).copied())
    }

    /// `app`'s Service on `listener`.
    async fn service(self: Arc<Self>, app: &'static str, listener: tokio::net::TcpListener) {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            // No endpoint: the connection is closed, as with a Service
            // without ready pods.
            let Some(engine) = self.endpoint(app) else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(engine).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_the_cluster_a_workload_at_zero_answers_what_was_held_and_refusals_are_clean() {
    // The fake API server with three Deployments at zero, each with an
    // InferenceAutoscaler `minReplicas: 0`.
    let c = cluster::Cluster::start(&["node-0"], Duration::from_millis(200)).await;
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(c.client.clone(), cluster::NS);
    for app in ["chat", "code", "summarize"] {
        c.create_deployment(app, 0).await;
        // The engines are simulated on the fake node: no metrics port to
        // scrape at the pod's address.
        deployments
            .patch(
                app,
                &cluster::patch_params(cluster::TEST),
                &kube::api::Patch::Merge(serde_json::json!({"spec": {"template": {"metadata": {
                    "annotations": {"gpuscale.dev/metrics-port": null}}}}})),
            )
            .await
            .unwrap();
        c.create_ias(
            app,
            cluster::spec(
                app,
                0,
                1,
                serde_json::json!({"scaleToZero": {"idleSeconds": 3600}}),
            ),
        )
        .await;
    }
    // The scaler in Kubernetes mode: callers authenticated and authorised
    // by the API server.
    let mut config = cluster::scaler_config();
    config.tick = Duration::from_secs(2);
    let scaler =
        gpuscale_kube::KubeScaler::new(c.client.clone(), gpuscale_kube::KubeConfig::new(), config)
            .start()
            .await
            .unwrap();
    let scaler_url = format!("http://{}", scaler.scaler().grpc_addr());
    let tokens = tempfile::tempdir().unwrap();
    let agent_token = tokens.path().join("agent");
    std::fs::write(&agent_token, cluster::agent_token(&c.server, "node-0")).unwrap();
    let activator_user = "system:serviceaccount:gpuscale-system:gpuscale-activator";
    c.server.grant(
        gpuscale_fake_apiserver::Subject::User(activator_user.into()),
        "get",
        "autoscaling.gpuscale.dev",
        "inferenceautoscalers",
        Some(cluster::NS),
    );
    let activator_token = tokens.path().join("activator");
    std::fs::write(
        &activator_token,
        c.server.issue_user_token(activator_user, &[]),
    )
    .unwrap();

    // The node: engines of the pods that run there, its agent reporting
    // them and setting their readiness gate.
    let fake = gpuscale_telemetry::fake::FakeNode::new(&Default::default(), "node-0").unwrap();
    let mut agent_config = support::fast_agent_config(&scaler_url, "node-0");
    agent_config.uplink_security.token_file = Some(agent_token);
    let agent = gpuscale_agent::start_simulated_node(
        agent_config,
        &fake,
        gpuscale_agent::ReadinessConfig::default(),
        gpuscale_agent::Clock::start(),
        Some(c.client.clone()),
    )
    .await
    .unwrap();
    let model = |app, startup, released| Model {
        app,
        startup,
        release: tokio::sync::watch::channel(released).0,
    };
    let pods = Arc::new(Pods {
        server: c.server.clone(),
        node: fake.handle(),
        // chat starts 1 s after its pod runs; code and summarize when the
        // test says.
        models: vec![
            model("chat", Duration::from_secs(1), true),
            model("code", Duration::ZERO, false),
            model("summarize", Duration::ZERO, false),
        ],
        engines: Mutex::default(),
    });
    let driver = tokio::spawn(pods.clone().run());
    let mut routes = Vec::new();
    let mut services = vec![driver];
    for app in ["chat", "code", "summarize"] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        routes.push(format!(
            "--workload={}/{app}=http://{}",
            cluster::NS,
            l.local_addr().unwrap()
        ));
        services.push(tokio::spawn(pods.clone().service(app, l)));
    }
    cluster::eventually(
        "the scaler resolved the targets",
        Duration::from_secs(30),
        || {
            ["chat", "code", "summarize"]
                .iter()
                .all(|a| c.condition(a, "Ready").is_some_and(|(s, _, _)| s == "True"))
        },
    )
    .await;
    let token_arg = format!("--token-file={}", activator_token.display());
    let activator_args = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = routes.clone();
        args.push(format!("--name={name}"));
        args.push(token_arg.clone());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let start = |addr, admin, args: Vec<String>| {
        let scaler_url = scaler_url.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            start_activator_at(addr, admin, &scaler_url, &args).await
        }
    };
    let a_addr = (free_port(), free_port());
    let a = start(
        a_addr.0,
        a_addr.1,
        activator_args(
            "activator-a",
            &["--max-held-per-workload=100", "--hold-timeout=30s"],
        ),
    )
    .await;
    let http = client();

    // 1. 100 concurrent streaming requests at zero: all held, the scaler
    // told; past the bound, 429 with Retry-After; then all 100 answered
    // in full once the first replica is warm.
    let held = send_all(&http, a.addr, "chat.default", true, 100);
    a.holds(&WorkloadRef::new(cluster::NS, "chat"), 100.0).await;
    for _ in 0..10 {
        let extra = ask(&http, a.addr, "chat.default", true).await.unwrap();
        refused(&extra, StatusCode::TOO_MANY_REQUESTS, "queue_full");
    }
    all_answered("held at zero", held).await;
    // Scaled from zero by the scaler through `/scale`, the replica warm
    // through the agent's gate, and the reason in the scaler's Event.
    assert_eq!(c.spec_replicas("chat"), 1);
    assert_eq!(c.warm_pods("chat").len(), 1);
    let scaled: Vec<String> = c
        .server
        .objects("events.k8s.io", "events", Some(cluster::NS))
        .into_iter()
        .filter(|e| e["regarding"]["name"] == "chat")
        .filter_map(|e| e["note"].as_str().map(str::to_string))
        .collect();
    assert!(
        scaled
            .iter()
            .any(|n| n.contains("requests held at the activator")),
        "{scaled:?}"
    );
    // The start-up the scaler learned, in the InferenceAutoscaler's status
    // (`kubectl get ias` shows its p90): the pod's 200 ms and the engine's
    // 1 s and the gate, not the spec's 30 s prior; no first replica is
    // expected any more.
    cluster::eventually(
        "chat's start-up learned, in its status",
        Duration::from_secs(30),
        || {
            c.ias("chat")
                .pointer("/status/startup/samples")
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|n| n >= 1)
        },
    )
    .await;
    let startup = c.ias("chat")["status"]["startup"].clone();
    for q in ["p50Seconds", "p90Seconds"] {
        let s = startup[q].as_f64().unwrap();
        assert!((1.0..30.0).contains(&s), "{startup}");
    }
    assert!(
        startup.get("firstReplicaExpectedTime").is_none(),
        "{startup}"
    );

    // 2. A second activator replica; both hold requests of `code` (its
    // engine not started yet). The first is restarted (SIGTERM, as a
    // rollout does): its held requests get a clean 503 at once, the
    // second's are untouched and answered once `code` is warm, and the
    // restarted one serves new requests.
    let b = start(
        free_port(),
        free_port(),
        activator_args("activator-b", &["--hold-timeout=30s"]),
    )
    .await;
    let on_a = send_all(&http, a.addr, "code.default", false, 10);
    let on_b = send_all(&http, b.addr, "code.default", false, 10);
    let code = WorkloadRef::new(cluster::NS, "code");
    a.holds(&code, 10.0).await;
    b.holds(&code, 10.0).await;
    cluster::eventually(
        "the scaler scaled code from zero",
        Duration::from_secs(30),
        || c.spec_replicas("code") == 1,
    )
    .await;
    // While its first replica starts, the status says when it is expected.
    let expected = || {
        c.ias("code")
            .pointer("/status/startup/firstReplicaExpectedTime")
            .cloned()
    };
    cluster::eventually(
        "code's first replica expected, in its status",
        Duration::from_secs(30),
        || expected().is_some_and(|t| t.is_string()),
    )
    .await;
    let mut a = a;
    let terminated = Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let signalled = std::time::Instant::now();
    for r in on_a {
        // A hang would outlive this bound by far (the hold is 30 s).
        let answer = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("a held request hung while its activator stopped")
            .unwrap()
            .expect("an answer, not a connection error");
        refused(&answer, StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    assert!(signalled.elapsed() < Duration::from_secs(10));
    support::eventually("the activator exits", || {
        a.child.try_wait().unwrap().is_some()
    })
    .await;
    drop(a);
    // The restarted replica, at the same address; a short hold for the
    // scaler-down part below.
    let a = start(
        a_addr.0,
        a_addr.1,
        activator_args("activator-a", &["--hold-timeout=2s"]),
    )
    .await;
    assert_eq!(
        b.metric(&format!(
            "gpuscale_activator_held_requests{{namespace=\"{}\",workload=\"code\"}}",
            cluster::NS
        ))
        .await,
        Some(10.0),
        "the other replica lost what it held"
    );
    pods.models[1].release.send_replace(true);
    all_answered("held by the other replica", on_b).await;
    cluster::eventually(
        "code's expected time gone once it is ready",
        Duration::from_secs(30),
        || expected().is_none(),
    )
    .await;
    all_answered(
        "the restarted replica",
        send_all(&http, a.addr, "code.default", true, 5),
    )
    .await;
    all_answered(
        "the restarted replica",
        send_all(&http, a.addr, "chat.default", false, 5),
    )
    .await;

    // 3. The scaler down: held requests time out with a clear 503.
    scaler.shutdown().await.unwrap();
    a.reads("gpuscale_activator_scaler_connected", 0.0).await;
    let answers = send_all(&http, a.addr, "summarize.default", false, 3);
    for r in answers {
        let answer = r.await.unwrap().expect("an answer");
        let msg = refused(&answer, StatusCode::SERVICE_UNAVAILABLE, "no_ready_replica");
        assert!(
            msg.contains("default/summarize") && msg.contains("the scaler is unreachable"),
            "{msg}"
        );
    }
    assert_eq!(c.spec_replicas("summarize"), 0);
    drop((a, b));
    agent.shutdown().await.unwrap();
    for s in services {
        s.abort();
    }
}
