//! `gpuscale demo --scenario scale-to-zero`: a few models go to zero and
//! come back through the activator, with nothing failed.
//!
//! ```text
//!  client ──HTTP──► activator (gpuscale-proxy) ──► each model's "Service" (a simulated
//!                     │ held at zero: wake                OpenAI-compatible engine that
//!                     ▼                                   listens once its replica is up)
//!  agent (simulated node) ──gRPC──► scaler (minReplicas 0, the ZeroRule) ──► Deployments
//! ```
//!
//! Everything but the engines is the real code, in one process on loopback
//! sockets: the activator holds requests for a model without a ready
//! replica and tells the scaler at once; the scaler (each model an
//! InferenceAutoscaler with `minReplicas: 0` and a short fixed idle
//! period) scales it from zero; the simulated Deployment starts the
//! model's engine after a start-up delay; the activator sees the model
//! ready and forwards what it held, in order; the engine's load reaches the
//! scaler through a real agent; once idle, the model is scaled to zero. A
//! scripted client sends bursts of streaming requests to three models with
//! idle gaps between them. Wall time about half a minute.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gpuscale_agent::{AgentConfig, ReadinessConfig};
use gpuscale_core::sample::{EngineSample, EngineState, Framework};
use gpuscale_core::{PodRef, Timestamp, WorkloadRef};
use gpuscale_policy::idle::ScaleToZeroSpec;
use gpuscale_policy::{ReplicaState, WorkloadSpec};
use gpuscale_proxy::{ActivatorConfig, WorkloadRoute};
use gpuscale_scaler::actuate::{ActuateFuture, Plan};
use gpuscale_scaler::config::{DeciderConfig, EngineSelector};
use gpuscale_scaler::{
    Actuator, ClusterReplica, Scaler, ScalerConfig, TargetObservation, WorkloadDef,
};
use gpuscale_telemetry::fake::{FakeNode, FakeNodeConfig, FakeNodeHandle};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;

use super::{DemoError, NAMESPACE};

/// The models behind the activator.
const MODELS: [&str; 3] = ["chat", "code", "summarize"];
/// A replica's start-up: created → engine listening and warm.
const STARTUP: Duration = Duration::from_secs(2);
/// The models' fixed idle period (`scaleToZero.idleSeconds`).
const IDLE_S: f64 = 4.0;
/// Events of a streamed answer and the gap between them.
const CHUNKS: usize = 6;
const CHUNK_GAP: Duration = Duration::from_millis(40);
/// The client's script: (wall seconds, model, requests).
const SCRIPT: [(f64, &str, usize); 6] = [
    (0.0, "chat", 4),
    (0.5, "code", 3),
    (3.5, "chat", 2),
    (13.0, "chat", 4),
    (14.0, "summarize", 3),
    (20.0, "code", 3),
];
/// Longest the scenario waits for every model to be back at zero.
const END_BY: Duration = Duration::from_secs(60);

/// What happened, printed as it happens.
struct Log {
    started: Instant,
    lines: Mutex<Vec<String>>,
}

impl Log {
    fn say(&self, line: String) {
        let line = format!("[{:5.1}s] {line}\n", self.started.elapsed().as_secs_f64());
        // A closed stdout fails the summary at the end; the events are
        // also kept for it.
        let _ = crate::write_stdout(&line);
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }
}

/// One model: its simulated Deployment (at most one replica) and engine.
struct Model {
    name: &'static str,
    workload: WorkloadRef,
    addr: SocketAddr,
    replicas: AtomicU32,
    ready: Arc<AtomicBool>,
    pod: Mutex<Option<(PodRef, Timestamp)>>,
    engine: Mutex<Option<JoinHandle<()>>>,
    seq: AtomicU32,
    in_flight: Arc<AtomicU32>,
    generated: Arc<AtomicU64>,
    from_zero: AtomicU32,
    to_zero: AtomicU32,
}

/// The models' Deployments as the scaler's actuator sees them.
struct Deployments {
    models: Vec<Arc<Model>>,
    node: FakeNodeHandle,
    log: Arc<Log>,
}

impl Deployments {
    fn model(&self, w: &WorkloadRef) -> Option<&Arc<Model>> {
        self.models.iter().find(|m| m.workload == *w)
    }

    fn start_replica(&self, m: &Arc<Model>, why: &str) {
        let n = m.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let pod = PodRef::new(NAMESPACE, format!("{}-{n}", m.name));
        let created = now();
        *m.pod.lock().unwrap_or_else(|p| p.into_inner()) = Some((pod.clone(), created));
        let mut sample = EngineSample::empty(pod.clone(), Framework::Vllm, m.name, created);
        sample.state = EngineState::Loading;
        sample.gpu_uuids = self.node.free_gpus().into_iter().take(1).collect();
        self.node.upsert_engine(sample);
        m.from_zero.fetch_add(1, Ordering::SeqCst);
        self.log.say(format!(
            "{}: 0 → 1, pod {} created ({why})",
            m.name, pod.name
        ));
        let (model, node, log) = (m.clone(), self.node.clone(), self.log.clone());
        let task = tokio::spawn(async move {
            tokio::time::sleep(STARTUP).await;
            let listener = match tokio::net::TcpListener::bind(model.addr).await {
                Ok(l) => l,
                Err(e) => {
                    log.say(format!("{}: the engine cannot listen: {e}", model.name));
                    return;
                }
            };
            node.update_engine(&pod, |e| e.state = EngineState::Warm);
            model.ready.store(true, Ordering::SeqCst);
            log.say(format!(
                "{}: pod {} ready after {:.1} s; the activator forwards what it holds",
                model.name,
                pod.name,
                now().secs_since(created)
            ));
            serve_engine(listener, model).await;
        });
        *m.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    fn stop_replica(&self, m: &Model, why: &str) {
        if let Some(task) = m.engine.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        m.ready.store(false, Ordering::SeqCst);
        if let Some((pod, _)) = m.pod.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.node.remove_engine(&pod);
        }
        m.to_zero.fetch_add(1, Ordering::SeqCst);
        self.log.say(format!("{}: 1 → 0 ({why})", m.name));
    }
}

fn now() -> Timestamp {
    Timestamp::from_millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0),
    )
}

impl Actuator for Deployments {
    fn observe<'a>(&'a self, w: &'a WorkloadRef) -> ActuateFuture<'a, TargetObservation> {
        Box::pin(async move {
            let Some(m) = self.model(w) else {
                return Ok(TargetObservation {
                    current: Some(0),
                    replicas: Some(Vec::new()),
                });
            };
            let state = if m.ready.load(Ordering::SeqCst) {
                ReplicaState::Ready
            } else {
                ReplicaState::Loading
            };
            let pod = m.pod.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Ok(TargetObservation {
                current: Some(m.replicas.load(Ordering::SeqCst)),
                replicas: Some(
                    pod.into_iter()
                        .map(|(pod, created)| ClusterReplica {
                            pod,
                            state,
                            protected: false,
                            created_at: Some(created),
                        })
                        .collect(),
                ),
            })
        })
    }

    fn apply<'a>(&'a self, w: &'a WorkloadRef, plan: &'a Plan) -> ActuateFuture<'a, ()> {
        Box::pin(async move {
            let Some(m) = self.model(w) else {
                return Ok(());
            };
            let want = plan.decision.desired_replicas.min(1);
            let before = m.replicas.swap(want, Ordering::SeqCst);
            let why = plan
                .decision
                .limits_applied()
                .into_iter()
                .find(|l| l.starts_with("scale from zero") || l.starts_with("scale to zero"))
                .unwrap_or_else(|| plan.decision.summary());
            match (before, want) {
                (0, 1) => self.start_replica(m, &why),
                (1, 0) => self.stop_replica(m, &why),
                _ => {}
            }
            Ok(())
        })
    }
}

type EngineBody =
    StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// The simulated engine: `/health`, and a streamed chat completion.
async fn engine(req: Request<Incoming>, m: Arc<Model>) -> Result<Response<EngineBody>, Infallible> {
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS + 1);
    let mut resp = Response::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    if req.uri().path() == "/health" {
        let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"ok"))));
        return Ok(resp);
    }
    let _ = req.into_body().collect().await;
    m.in_flight.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        for i in 0..CHUNKS {
            tokio::time::sleep(CHUNK_GAP).await;
            let event = format!(
                "data: {{\"model\":\"{}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n",
                m.name
            );
            m.generated.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(Ok(Frame::data(Bytes::from(event)))).await;
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
            .await;
        m.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    Ok(resp)
}

async fn serve_engine(listener: tokio::net::TcpListener, m: Arc<Model>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let m = m.clone();
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| engine(req, m.clone())),
                )
                .await;
        });
    }
}

/// The engines' load as the agent reports it, every 100 ms.
async fn report_load(models: Vec<Arc<Model>>, node: FakeNodeHandle) {
    loop {
        for m in &models {
            let pod = m.pod.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some((pod, _)) = pod {
                let running = f64::from(m.in_flight.load(Ordering::SeqCst));
                let generated = m.generated.load(Ordering::SeqCst) as f64;
                node.update_engine(&pod, |e| {
                    e.requests_running = Some(running);
                    e.requests_waiting = Some(0.0);
                    e.kv_cache_usage_ratio = Some(0.0);
                    e.generation_tokens_total = Some(generated);
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request's outcome.
struct Outcome {
    ok: bool,
    first_byte_s: f64,
}

async fn send(
    client: Client<HttpConnector, Full<Bytes>>,
    activator: SocketAddr,
    model: &'static str,
) -> Outcome {
    let sent = Instant::now();
    let req = Request::post(format!("http://{activator}/v1/chat/completions"))
        .header("x-gpuscale-workload", format!("{NAMESPACE}/{model}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(format!(
            "{{\"model\":\"{model}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}"
        ))));
    let Ok(req) = req else {
        return Outcome {
            ok: false,
            first_byte_s: 0.0,
        };
    };
    let Ok(resp) = client.request(req).await else {
        return Outcome {
            ok: false,
            first_byte_s: sent.elapsed().as_secs_f64(),
        };
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut first_byte_s = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            let s = String::from_utf8_lossy(&data);
            // The activator's keep-alive comments are not the model's tokens.
            if first_byte_s.is_none() && s.starts_with("data:") {
                first_byte_s = Some(sent.elapsed().as_secs_f64());
            }
            text.push_str(&s);
        }
    }
    Outcome {
        ok: status == StatusCode::OK
            && text.matches("\"content\"").count() == CHUNKS
            && text.ends_with("data: [DONE]\n\n"),
        first_byte_s: first_byte_s.unwrap_or_else(|| sent.elapsed().as_secs_f64()),
    }
}

fn free_addr() -> Result<SocketAddr, DemoError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| DemoError::part("reserving a port for an engine", e))?;
    l.local_addr()
        .map_err(|e| DemoError::part("reserving a port for an engine", e))
}

fn workload_def(model: &str, perf: &gpuscale_policy::PerfModel) -> Result<WorkloadDef, DemoError> {
    let mut spec = WorkloadSpec::new(model, 1, "h200-llama3-8b-bf16");
    spec.min_replicas = 0;
    spec.cold_start_seconds = STARTUP.as_secs_f64();
    spec.scale_to_zero = Some(ScaleToZeroSpec {
        idle_seconds: Some(IDLE_S),
        min_idle_seconds: 0.0,
        ..ScaleToZeroSpec::default()
    });
    let config = spec
        .validate()
        .map_err(|e| DemoError::part("the models' spec", e))?;
    Ok(WorkloadDef {
        workload: WorkloadRef::new(NAMESPACE, model),
        labels: Default::default(),
        selector: EngineSelector {
            model: Some(model.into()),
            namespace: Some(NAMESPACE.into()),
        },
        decider: DeciderConfig::Policy {
            config: Box::new(config),
            model: Box::new(perf.clone()),
        },
        last_decision: None,
    })
}

/// Runs the scenario and prints what happens, then a summary.
pub(crate) async fn run(
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DemoError> {
    let log = Arc::new(Log {
        started: Instant::now(),
        lines: Mutex::new(Vec::new()),
    });
    let perf = gpuscale_sim::profile::resolve_profile("h200-llama3-8b-bf16")
        .map_err(|e| DemoError::part("the models' profile", e))?;
    let mut models = Vec::new();
    for name in MODELS {
        models.push(Arc::new(Model {
            name,
            workload: WorkloadRef::new(NAMESPACE, name),
            addr: free_addr()?,
            replicas: AtomicU32::new(0),
            ready: Arc::default(),
            pod: Mutex::new(None),
            engine: Mutex::new(None),
            seq: AtomicU32::new(0),
            in_flight: Arc::default(),
            generated: Arc::default(),
            from_zero: AtomicU32::new(0),
            to_zero: AtomicU32::new(0),
        }));
    }
    let fake = FakeNode::new(&FakeNodeConfig::default(), "node-0")
        .map_err(|e| DemoError::part("building the simulated node", e))?;
    let node = fake.handle();
    let mut config = ScalerConfig::new(
        "127.0.0.1:0"
            .parse()
            .map_err(|e| DemoError::part("the scaler's address", e))?,
    );
    config.tick = Duration::from_millis(500);
    config.warmup = Duration::ZERO;
    for m in &models {
        config.workloads.push(workload_def(m.name, &perf)?);
    }
    let deployments = Arc::new(Deployments {
        models: models.clone(),
        node: node.clone(),
        log: log.clone(),
    });
    let scaler = Scaler::new(config)
        .with_actuator(deployments.clone())
        .start()
        .await
        .map_err(|e| DemoError::part("starting the scaler", e))?;
    let scaler_url = format!("http://{}", scaler.grpc_addr());
    let mut agent_config = AgentConfig::new(scaler_url.clone(), "node-0");
    agent_config.sample_interval = Duration::from_millis(200);
    let agent = gpuscale_agent::start_simulated_node(
        agent_config,
        &fake,
        ReadinessConfig::default(),
        gpuscale_agent::Clock::start(),
        None,
    )
    .await
    .map_err(|e| DemoError::part("starting the agent", e))?;
    let mut act_config = ActivatorConfig::new(
        "127.0.0.1:0"
            .parse()
            .map_err(|e| DemoError::part("the activator's address", e))?,
        models
            .iter()
            .map(|m| WorkloadRoute {
                workload: m.workload.clone(),
                upstream: format!("http://{}", m.addr),
            })
            .collect(),
    );
    act_config.scaler = Some(scaler_url);
    act_config.probe_interval = Duration::from_millis(50);
    act_config.report_interval = Duration::from_millis(200);
    act_config.hold_timeout = Duration::from_secs(30);
    let activator = gpuscale_proxy::activator::start(act_config)
        .await
        .map_err(|e| DemoError::part("starting the activator", e))?;
    let load = tokio::spawn(report_load(models.clone(), node.clone()));
    log.say(format!(
        "{} models behind the activator at {}, all at zero; start-up {:.0} s, idle period {IDLE_S:.0} s",
        MODELS.len(),
        activator.addr(),
        STARTUP.as_secs_f64()
    ));

    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let script = async {
        let mut batches = Vec::new();
        for (at, model, n) in SCRIPT {
            let wait = Duration::from_secs_f64(at).saturating_sub(log.started.elapsed());
            tokio::time::sleep(wait).await;
            let ready = models
                .iter()
                .find(|m| m.name == model)
                .is_some_and(|m| m.ready.load(Ordering::SeqCst));
            log.say(format!(
                "{model}: {n} streaming requests{}",
                if ready {
                    ""
                } else {
                    " (no ready replica: held)"
                }
            ));
            let reqs: Vec<_> = (0..n)
                .map(|_| tokio::spawn(send(client.clone(), activator.addr(), model)))
                .collect();
            let log = log.clone();
            batches.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for r in reqs {
                    outcomes.push(r.await.unwrap_or(Outcome {
                        ok: false,
                        first_byte_s: 0.0,
                    }));
                }
                let ok = outcomes.iter().filter(|o| o.ok).count();
                let slowest = outcomes.iter().map(|o| o.first_byte_s).fold(0.0, f64::max);
                log.say(format!(
                    "{model}: {ok}/{} answered in full, first token within {slowest:.1} s",
                    outcomes.len()
                ));
                outcomes
            }));
        }
        let mut all = Vec::new();
        for b in batches {
            all.extend(b.await.unwrap_or_default());
        }
        // Then every model back at zero.
        let end = Instant::now() + END_BY;
        while models.iter().any(|m| m.replicas.load(Ordering::SeqCst) > 0) && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        all
    };
    let outcomes = tokio::select! {
        o = script => Some(o),
        () = shutdown => None,
    };
    load.abort();
    let _ = activator.shutdown().await;
    let _ = agent.shutdown().await;
    let _ = scaler.shutdown().await;
    let text = summary(&models, &outcomes.unwrap_or_default());
    crate::write_stdout(&text).map_err(|e| DemoError::part("writing the summary to stdout", e))
}

/// The summary: requests and, per model, how often it went to zero and back.
fn summary(models: &[Arc<Model>], outcomes: &[Outcome]) -> String {
    let per_model: BTreeMap<&str, (u32, u32)> = models
        .iter()
        .map(|m| {
            (
                m.name,
                (
                    m.from_zero.load(Ordering::SeqCst),
                    m.to_zero.load(Ordering::SeqCst),
                ),
            )
        })
        .collect();
    let ok = outcomes.iter().filter(|o| o.ok).count();
    let mut text = format!(
        "\nscale-to-zero demo: {} models behind the activator\n  requests         {} sent, {ok} answered in full, {} failed\n",
        MODELS.len(),
        outcomes.len(),
        outcomes.len() - ok
    );
    for (name, (up, down)) in &per_model {
        text.push_str(&format!(
            "  {name:<16} scaled from zero {up}, to zero {down}\n"
        ));
    }
    let (up, down) = per_model
        .values()
        .fold((0, 0), |(a, b), (u, d)| (a + u, b + d));
    text.push_str(&format!(
        "  total            scaled from zero {up}, to zero {down}\n"
    ));
    text
}
