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
//!   as the engine sends them (not gathered up); a held stream whose
//!   deadline passes ends with an SSE error event.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

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
    Ok(r)
}

type EngineBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

async fn serve_engine(addr: SocketAddr, gap: Duration) -> JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
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
    })
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
    let addr = free_port();
    let admin = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .arg("activator")
        .arg(format!("--listen={addr}"))
        .arg(format!("--admin-addr={admin}"))
        .arg(format!("--scaler={scaler}"))
        .arg("--name=activator-0")
        .arg(format!("--workload=test/chat=http://{engine}"))
        .arg("--probe-interval=50ms")
        .args(extra)
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
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header(header::HOST, "chat.test")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"model\":\"chat\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        )))
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
    let held: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            let addr = act.addr;
            tokio::spawn(async move { chat(&c, addr).await })
        })
        .collect();
    // Wait until the activator holds all 100, then go past the bound.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while act
        .metric("gpuscale_activator_held_requests{namespace=\"test\",workload=\"chat\"}")
        .await
        != Some(100.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the activator never held 100"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let extra = chat(&c, act.addr).await.unwrap();
    assert_eq!(
        extra.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        extra.body
    );
    assert_eq!(extra.retry_after.as_deref(), Some("1"));
    let v: serde_json::Value = serde_json::from_str(&extra.body).unwrap();
    assert_eq!(v["error"]["code"], "queue_full");
    for _ in 0..9 {
        let extra = chat(&c, act.addr).await.unwrap();
        assert_eq!(extra.status, StatusCode::TOO_MANY_REQUESTS);
    }
    let mut ok = 0;
    for h in held {
        let a = h.await.unwrap().expect("an answer, not a connection error");
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.body.matches("\"content\"").count(), CHUNKS, "{}", a.body);
        assert!(a.body.ends_with("data: [DONE]\n\n"));
        ok += 1;
    }
    assert_eq!(ok, 100);
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
    let held: Vec<_> = (0..10)
        .map(|_| {
            let c = c.clone();
            let addr = act.addr;
            tokio::spawn(async move { chat(&c, addr).await })
        })
        .collect();
    // Held: the scaler has been told (it asked for a replica).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while target.asked.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the scaler was not told"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "no_ready_replica");
    let msg = v["error"]["message"].as_str().unwrap();
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
    let sent = std::time::Instant::now();
    let resp = c
        .request(
            Request::post(format!("http://{}/v1/chat/completions", act.addr))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(
                    b"{\"model\":\"chat\",\"stream\":true,\"messages\":[]}",
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    let head = sent.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
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
