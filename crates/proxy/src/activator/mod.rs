//! `gpuscale activator`: holds requests for workloads scaled to zero and
//! forwards them once a replica is warm.
//!
//! ```text
//!  clients ──► :8080 ──► route (Host / X-Gpuscale-Workload) ──► admission ──► workload's Service
//!                │         limit 0 while no replica is ready: held, in order     (ready pods only)
//!                │         unlimited once the Service answers its ready path
//!                └─ held requests ──► scaler ActivatorService (wake at once, then every second)
//!  kubelet ──► :9092 /healthz /readyz /metrics
//! ```
//!
//! Built on the proxy core: [`Forwarder`] (streams pass through
//! unbuffered), [`Admission`] (a FIFO queue with per-request deadlines; at
//! limit 0 it holds everything, raising the limit admits the held requests
//! in arrival order at once), a [`QueueBudget`] over all workloads, and the
//! JSON refusals with `Retry-After` of [`reply`].
//!
//! * A workload is *ready* while its Service answers `--ready-path` with a
//!   2xx (probed every `--probe-interval` while not ready, and at once
//!   when the scaler says a replica is ready); a forward that cannot reach
//!   the Service makes it not ready again.
//! * A request for a workload that is not ready is held (at most
//!   `--max-held-per-workload` per workload and `--max-held` in all:
//!   beyond, 429 with `Retry-After`) for at most `--hold-timeout` (then 503
//!   `no_ready_replica`, saying whether the scaler is reachable), and the
//!   scaler is told at once. A held streaming request (`"stream": true`
//!   or `Accept: text/event-stream`) is answered 200 `text/event-stream`
//!   at once and receives `: keep-alive` SSE comments every
//!   `--keep-alive-interval` while held; the workload's stream follows
//!   frame by frame, and a refusal after the 200 is an SSE error event.
//! * Stateless: several replicas can run; the scaler adds their reports
//!   up. A restarted activator loses the requests it held (their
//!   connections close: the clients see an error at once, not a hang).

pub mod config;
mod link;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gpuscale_core::WorkloadRef;
use http::header;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::admission::{Admission, Limit, Permit, QueueBudget, Refusal};
use crate::error::ProxyError;
use crate::forward::{Forwarder, NoObserver, RequestBody, ResponseBody, refuse_upgrade};
use crate::sidecar::admin::{json, respond};
use crate::{reply, server};
pub use config::{ActivatorArgs, ActivatorConfig, WorkloadRoute};

/// How long open connections get to finish once the servers stop.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Bounds of the hold-time histogram, seconds.
const HOLD_BOUNDS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One workload behind the activator.
#[derive(Debug)]
pub(crate) struct Route {
    workload: WorkloadRef,
    forwarder: Forwarder,
    probe_uri: http::Uri,
    admission: Admission,
    ready: AtomicBool,
    arrivals: AtomicU64,
    held_total: AtomicU64,
    refused_full: AtomicU64,
    refused_timeout: AtomicU64,
    upstream_failed: AtomicU64,
    /// Held streams answered 200 at once and kept alive.
    kept_alive: AtomicU64,
    /// A request arrived while not ready since the last report.
    wake: AtomicBool,
    probe_now: Notify,
    /// When the scaler expects the first replica (unix ms; 0: unknown).
    expected_ready_ms: AtomicI64,
    /// Arrival times of the requests held now, by id.
    holding: Mutex<BTreeMap<u64, Instant>>,
    hold_seconds: Mutex<(Vec<u64>, f64, u64)>,
}

impl Route {
    fn set_ready(&self, ready: bool) {
        if self.ready.swap(ready, Ordering::SeqCst) != ready {
            let load = self.admission.load();
            info!(workload = %self.workload, ready, held = load.queued, "workload readiness");
        }
        self.admission.set_limit(if ready {
            Limit::Unlimited
        } else {
            Limit::At(0)
        });
    }

    /// The oldest held request's wait, seconds.
    fn oldest_held_s(&self) -> f64 {
        let h = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        h.values().next().map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// The request `id` is no longer held.
    fn unhold(&self, id: u64) {
        self.holding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn observe_hold(&self, s: f64) {
        let mut h = self.hold_seconds.lock().unwrap_or_else(|p| p.into_inner());
        if h.0.is_empty() {
            h.0 = vec![0; HOLD_BOUNDS.len() + 1];
        }
        let i = HOLD_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(HOLD_BOUNDS.len());
        h.0[i] += 1;
        h.1 += s;
        h.2 += 1;
    }
}

/// State shared by the handlers, the probes, the admin server and the link.
#[derive(Debug)]
pub(crate) struct Shared {
    config: ActivatorConfig,
    routes: Vec<Arc<Route>>,
    budget: QueueBudget,
    scaler_connected: AtomicBool,
    report_now: Notify,
    next_hold: AtomicU64,
    unrouted: AtomicU64,
}

impl Shared {
    /// The route of a request: `X-Gpuscale-Workload`, else its host, else
    /// the only workload.
    fn route<B>(&self, req: &Request<B>) -> Result<Arc<Route>, String> {
        if let Some(v) = req.headers().get("x-gpuscale-workload") {
            let v = v.to_str().unwrap_or("");
            return self
                .routes
                .iter()
                .find(|r| {
                    v.split_once('/')
                        .is_some_and(|(ns, n)| r.workload.namespace == ns && r.workload.name == n)
                })
                .cloned()
                .ok_or_else(|| format!("no workload {v:.100} behind this activator"));
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host())
            .unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let mut labels = host.split('.');
        let (first, second) = (labels.next().unwrap_or(""), labels.next());
        if let Some(r) = self.routes.iter().find(|r| {
            r.workload.name == first && second.is_none_or(|ns| ns == r.workload.namespace)
        }) {
            return Ok(r.clone());
        }
        if self.routes.len() == 1 {
            return Ok(self.routes[0].clone());
        }
        Err(format!(
            "no workload for host {host:.100}: name one with X-Gpuscale-Workload: namespace/name"
        ))
    }
}

type ActivatorResponse = Response<ResponseBody<NoObserver>>;

/// The longest request body the activator reads to see whether a held
/// request asks for a stream (a longer one is held like any other).
const MAX_INSPECTED_BODY: u64 = 8 << 20;

/// The SSE comment a held stream receives while it waits.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Why a request got no permit: its status, code and message.
type Refused = (StatusCode, &'static str, String);

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<ActivatorResponse, Infallible> {
    if let Some(refused) = refuse_upgrade(&req) {
        return Ok(refused);
    }
    let retry_after = shared.config.retry_after;
    let http1 = req.version() < http::Version::HTTP_2;
    let route = match shared.route(&req) {
        Ok(r) => r,
        Err(why) => {
            shared.unrouted.fetch_add(1, Ordering::Relaxed);
            return Ok(reply::error(
                StatusCode::NOT_FOUND,
                "unknown_workload",
                &why,
                None,
                false,
            ));
        }
    };
    route.arrivals.fetch_add(1, Ordering::Relaxed);
    let arrived = Instant::now();
    let mut req = req.map(RequestBody::Streamed);
    if route.ready.load(Ordering::SeqCst) {
        return Ok(forward(&route, req, retry_after).await);
    }
    route.wake.store(true, Ordering::SeqCst);
    shared.report_now.notify_one();
    route.probe_now.notify_one();
    let id = shared.next_hold.fetch_add(1, Ordering::Relaxed);
    route
        .holding
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, arrived);
    let deadline = arrived + shared.config.hold_timeout;
    let keep_alive = match shared.config.keep_alive_interval {
        Some(every) if !refuses_keep_alive(&req) => {
            let (read, streaming) = match wants_stream(req).await {
                Ok(r) => r,
                Err(why) => {
                    route.unhold(id);
                    return Ok(reply::error(
                        StatusCode::BAD_REQUEST,
                        "bad_request_body",
                        &why,
                        None,
                        false,
                    ));
                }
            };
            req = read;
            streaming.then_some(every)
        }
        _ => None,
    };
    let r = route.clone();
    let mut acquire = Box::pin(async move { r.admission.acquire(deadline).await });
    if let Some(every) = keep_alive {
        // Polled once: a full queue is refused with a status, a held
        // stream is answered 200 at once and kept alive.
        let first = tokio::select! {
            biased;
            a = &mut acquire => Some(a),
            () = std::future::ready(()) => None,
        };
        let Some(admitted) = first else {
            route.kept_alive.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(hold_stream(
                shared.clone(),
                route.clone(),
                id,
                acquire,
                req,
                every,
                tx,
            ));
            let mut resp = Response::new(ResponseBody::Channel(rx));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            h.insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-cache"),
            );
            return Ok(resp);
        };
        return Ok(match settle(&shared, &route, id, admitted) {
            Ok(()) => forward(&route, req, retry_after).await,
            Err(refused) => refusal_response(refused, retry_after, http1),
        });
    }
    let admitted = acquire.await;
    Ok(match settle(&shared, &route, id, admitted) {
        Ok(()) => forward(&route, req, retry_after).await,
        Err(refused) => refusal_response(refused, retry_after, http1),
    })
}

fn refusal_response(
    (status, code, message): Refused,
    retry_after: Duration,
    http1: bool,
) -> ActivatorResponse {
    let close = http1 && code == Refusal::Draining.code();
    reply::error(status, code, &message, Some(retry_after), close)
}

/// A client that needs the workload's own response head (a request id, a
/// session cookie: a kept-alive stream's 200 is sent before the workload
/// answers, so it has the activator's headers only) asks for none with
/// `X-Gpuscale-Keep-Alive: off`; held, it waits for the first byte.
fn refuses_keep_alive<B>(req: &Request<B>) -> bool {
    req.headers()
        .get("x-gpuscale-keep-alive")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"off"))
}

/// Whether a held request asks for a stream: `Accept: text/event-stream`,
/// or `"stream": true` in a JSON body (read whole, when it says its
/// length and that is at most [`MAX_INSPECTED_BODY`]).
async fn wants_stream(req: Request<RequestBody>) -> Result<(Request<RequestBody>, bool), String> {
    let accepts = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/event-stream")));
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if accepts || !json || length.is_none_or(|l| l > MAX_INSPECTED_BODY) {
        return Ok((req, accepts));
    }
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("reading the request body: {e}"))?
        .to_bytes();
    #[derive(serde::Deserialize)]
    struct StreamFlag {
        #[serde(default)]
        stream: bool,
    }
    let streaming = serde_json::from_slice::<StreamFlag>(&bytes).is_ok_and(|f| f.stream);
    Ok((
        Request::from_parts(parts, RequestBody::Read(Full::new(bytes))),
        streaming,
    ))
}

/// Ends a hold: the request is no longer held, and a refusal says why.
fn settle(
    shared: &Shared,
    route: &Route,
    id: u64,
    admitted: Result<Permit, Refusal>,
) -> Result<(), Refused> {
    route.unhold(id);
    let permit = match admitted {
        Ok(p) => p,
        Err(r @ Refusal::QueueFull { .. }) => {
            route.refused_full.fetch_add(1, Ordering::Relaxed);
            return Err((StatusCode::TOO_MANY_REQUESTS, r.code(), r.to_string()));
        }
        Err(Refusal::Timeout { waited_ms }) => {
            route.refused_timeout.fetch_add(1, Ordering::Relaxed);
            let scaler = if shared.config.scaler.is_none() {
                "no scaler is configured"
            } else if shared.scaler_connected.load(Ordering::SeqCst) {
                "the scaler was told"
            } else {
                "the scaler is unreachable"
            };
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "no_ready_replica",
                format!(
                    "no ready replica of {} within {waited_ms} ms ({scaler})",
                    route.workload
                ),
            ));
        }
        Err(r @ Refusal::Draining) => {
            return Err((StatusCode::SERVICE_UNAVAILABLE, r.code(), r.to_string()));
        }
    };
    route.held_total.fetch_add(1, Ordering::Relaxed);
    route.observe_hold(permit.queued_for().as_secs_f64());
    // Ready workloads have no limit at the activator (each pod's proxy
    // enforces its batch limit): the slot is not held while streaming.
    drop(permit);
    Ok(())
}

/// Sends a request to the workload's Service; unreachable, the workload
/// is not ready any more.
async fn forward_upstream(
    route: &Route,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, String> {
    route.forwarder.forward_body(req).await.map_err(|e| {
        route.upstream_failed.fetch_add(1, Ordering::Relaxed);
        warn!(workload = %route.workload, error = %e, "the workload's Service is unreachable: holding new requests");
        route.set_ready(false);
        route.probe_now.notify_one();
        e.to_string()
    })
}

async fn forward(
    route: &Route,
    req: Request<RequestBody>,
    retry_after: Duration,
) -> ActivatorResponse {
    match forward_upstream(route, req).await {
        Ok(resp) => resp.map(ResponseBody::Upstream),
        Err(e) => reply::error(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            &e,
            Some(retry_after),
            false,
        ),
    }
}

type FrameSender = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, hyper::Error>>;

/// A held stream already answered 200: SSE comments every `every` until
/// the request is admitted, then the workload's stream frame by frame as
/// it arrives (or an SSE error event). A client that goes away gives its
/// place in the queue back.
async fn hold_stream(
    shared: Arc<Shared>,
    route: Arc<Route>,
    id: u64,
    mut acquire: std::pin::Pin<Box<impl Future<Output = Result<Permit, Refusal>>>>,
    req: Request<RequestBody>,
    every: Duration,
    tx: FrameSender,
) {
    let mut tick = tokio::time::interval(every);
    let admitted = loop {
        tokio::select! {
            a = &mut acquire => break a,
            () = tx.closed() => {
                route.unhold(id);
                return;
            }
            _ = tick.tick() => {
                if tx.send(Ok(Frame::data(Bytes::from_static(KEEP_ALIVE)))).await.is_err() {
                    route.unhold(id);
                    return;
                }
            }
        }
    };
    let error = match settle(&shared, &route, id, admitted) {
        Err((status, code, message)) => reply::sse_error(status, code, &message),
        Ok(()) => match forward_upstream(&route, req).await {
            Ok(resp) if resp.status().is_success() => {
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
                return;
            }
            Ok(resp) => {
                let status = resp.status();
                let body = http_body_util::Limited::new(resp.into_body(), 4096)
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                reply::sse_error(
                    status,
                    "upstream_status",
                    &format!("the workload answered {status}: {body:.1000}"),
                )
            }
            Err(e) => reply::sse_error(StatusCode::BAD_GATEWAY, "upstream_unavailable", &e),
        },
    };
    let _ = tx.send(Ok(Frame::data(error))).await;
}

/// Probes a route's Service until stopped.
async fn probe(shared: Arc<Shared>, route: Arc<Route>, mut stop: watch::Receiver<bool>) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    loop {
        let req = Request::get(route.probe_uri.clone()).body(Empty::new());
        let ok = match req {
            Ok(req) => matches!(
                tokio::time::timeout(Duration::from_secs(2), client.request(req)).await,
                Ok(Ok(resp)) if resp.status().is_success()
            ),
            Err(_) => false,
        };
        route.set_ready(ok);
        let wait = if ok {
            shared.config.probe_interval * 5
        } else {
            shared.config.probe_interval
        };
        tokio::select! {
            () = crate::sidecar::link::stopped(&mut stop) => return,
            () = tokio::time::sleep(wait) => {}
            () = route.probe_now.notified() => {}
        }
    }
}

fn admin_metrics(shared: &Shared) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP gpuscale_activator_held_requests Requests held now (no ready replica)\n# TYPE gpuscale_activator_held_requests gauge"
    );
    for r in &shared.routes {
        let _ = writeln!(
            o,
            "gpuscale_activator_held_requests{{namespace=\"{}\",workload=\"{}\"}} {}",
            r.workload.namespace,
            r.workload.name,
            r.admission.load().queued
        );
    }
    let _ = writeln!(
        o,
        "# HELP gpuscale_activator_ready Whether the workload's Service answers its ready path\n# TYPE gpuscale_activator_ready gauge"
    );
    for r in &shared.routes {
        let _ = writeln!(
            o,
            "gpuscale_activator_ready{{namespace=\"{}\",workload=\"{}\"}} {}",
            r.workload.namespace,
            r.workload.name,
            u8::from(r.ready.load(Ordering::SeqCst))
        );
    }
    let _ = writeln!(
        o,
        "# HELP gpuscale_activator_requests_total Requests by outcome at the activator\n# TYPE gpuscale_activator_requests_total counter"
    );
    for r in &shared.routes {
        for (outcome, v) in [
            ("arrived", &r.arrivals),
            ("held", &r.held_total),
            ("queue_full", &r.refused_full),
            ("no_ready_replica", &r.refused_timeout),
            ("upstream_failed", &r.upstream_failed),
            ("kept_alive", &r.kept_alive),
        ] {
            let _ = writeln!(
                o,
                "gpuscale_activator_requests_total{{namespace=\"{}\",workload=\"{}\",outcome=\"{outcome}\"}} {}",
                r.workload.namespace,
                r.workload.name,
                v.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP gpuscale_activator_hold_seconds How long held requests waited for a ready replica\n# TYPE gpuscale_activator_hold_seconds histogram"
    );
    for r in &shared.routes {
        let h = r.hold_seconds.lock().unwrap_or_else(|p| p.into_inner());
        let labels = format!(
            "namespace=\"{}\",workload=\"{}\"",
            r.workload.namespace, r.workload.name
        );
        let mut cum = 0;
        for (i, b) in HOLD_BOUNDS.iter().enumerate() {
            cum += h.0.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "gpuscale_activator_hold_seconds_bucket{{{labels},le=\"{b}\"}} {cum}"
            );
        }
        let _ = writeln!(
            o,
            "gpuscale_activator_hold_seconds_bucket{{{labels},le=\"+Inf\"}} {}\ngpuscale_activator_hold_seconds_sum{{{labels}}} {}\ngpuscale_activator_hold_seconds_count{{{labels}}} {}",
            h.2, h.1, h.2
        );
    }
    let _ = writeln!(
        o,
        "# HELP gpuscale_activator_held_requests_all Requests held now over all workloads (bounded by --max-held)\n# TYPE gpuscale_activator_held_requests_all gauge\ngpuscale_activator_held_requests_all {}\n# HELP gpuscale_activator_unrouted_requests_total Requests for no workload behind this activator (404)\n# TYPE gpuscale_activator_unrouted_requests_total counter\ngpuscale_activator_unrouted_requests_total {}",
        shared.budget.used(),
        shared.unrouted.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP gpuscale_activator_scaler_connected Whether the stream to the scaler is open\n# TYPE gpuscale_activator_scaler_connected gauge\ngpuscale_activator_scaler_connected {}",
        u8::from(shared.scaler_connected.load(Ordering::SeqCst))
    );
    o
}

async fn admin(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    Ok(match (req.uri().path(), get) {
        ("/healthz", true) | ("/readyz", true) => {
            respond(StatusCode::OK, "text/plain", "ok\n".into())
        }
        ("/metrics", true) => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            admin_metrics(&shared),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "GET /healthz, /readyz or /metrics"}),
        ),
    })
}

/// A started activator. Dropping it does not stop it: call
/// [`RunningActivator::shutdown`].
#[derive(Debug)]
pub struct RunningActivator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

/// What the activator holds for one workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLoad {
    pub ready: bool,
    pub held: usize,
    pub arrivals: u64,
}

impl RunningActivator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Whether the stream to the scaler is open.
    pub fn scaler_connected(&self) -> bool {
        self.shared.scaler_connected.load(Ordering::SeqCst)
    }

    /// Ready, held and arrivals of `workload`.
    pub fn load(&self, workload: &WorkloadRef) -> Option<RouteLoad> {
        self.shared
            .routes
            .iter()
            .find(|r| r.workload == *workload)
            .map(|r| RouteLoad {
                ready: r.ready.load(Ordering::SeqCst),
                held: r.admission.load().queued,
                arrivals: r.arrivals.load(Ordering::Relaxed),
            })
    }

    /// Stops the servers, the probes and the link; held requests are
    /// refused at once with 503 `draining` and `Retry-After` (a held
    /// stream with an SSE error event) first, so that their clients retry
    /// on another replica; forwarded requests have the close grace.
    pub async fn shutdown(self) -> Result<(), ProxyError> {
        for r in &self.shared.routes {
            r.admission.drain_queued();
        }
        self.stop.send_replace(true);
        let mut first_error = None;
        for (task, join) in self.tasks {
            if let Err(e) = join.await {
                first_error.get_or_insert(ProxyError::Task {
                    task,
                    message: e.to_string(),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Starts the activator: the listener, the admin server, a probe per
/// workload and the link to the scaler.
pub async fn start(config: ActivatorConfig) -> Result<RunningActivator, ProxyError> {
    config.validate()?;
    let budget = QueueBudget::new(config.max_held);
    let mut routes = Vec::with_capacity(config.workloads.len());
    for w in &config.workloads {
        let forwarder = Forwarder::new(&w.upstream, &config.forward)
            .map_err(|e| ProxyError::config("--workload", &w.upstream, e.to_string()))?;
        let probe_uri: http::Uri = format!("{}{}", forwarder.upstream(), config.ready_path)
            .parse()
            .map_err(|_| ProxyError::config("--ready-path", &config.ready_path, "a URL path"))?;
        routes.push(Arc::new(Route {
            workload: w.workload.clone(),
            forwarder,
            probe_uri,
            admission: Admission::with_budget(
                Limit::At(0),
                config.max_held_per_workload,
                Some(budget.clone()),
            ),
            ready: AtomicBool::new(false),
            arrivals: AtomicU64::new(0),
            held_total: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            refused_timeout: AtomicU64::new(0),
            upstream_failed: AtomicU64::new(0),
            kept_alive: AtomicU64::new(0),
            wake: AtomicBool::new(false),
            probe_now: Notify::new(),
            expected_ready_ms: AtomicI64::new(0),
            holding: Mutex::new(BTreeMap::new()),
            hold_seconds: Mutex::new((Vec::new(), 0.0, 0)),
        }));
    }
    let listener = server::bind(config.listen, "clients (--listen)").await?;
    let admin_listener = match config.admin {
        Some(a) => Some(server::bind(a, "the admin endpoints (--admin-addr)").await?),
        None => None,
    };
    let addr = server::local_addr(&listener, config.listen);
    let admin_addr = admin_listener
        .as_ref()
        .zip(config.admin)
        .map(|(l, a)| server::local_addr(l, a));
    let shared = Arc::new(Shared {
        routes,
        budget,
        scaler_connected: AtomicBool::new(false),
        report_now: Notify::new(),
        next_hold: AtomicU64::new(0),
        unrouted: AtomicU64::new(0),
        config,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let s = shared.clone();
    tasks.push((
        "activator server",
        tokio::spawn(server::serve(
            listener,
            service_fn(move |req| handle(s.clone(), req)),
            stopped(stop_rx.clone()),
            CLOSE_GRACE,
        )),
    ));
    if let Some(l) = admin_listener {
        let s = shared.clone();
        tasks.push((
            "admin server",
            tokio::spawn(server::serve(
                l,
                service_fn(move |req| admin(s.clone(), req)),
                stopped(stop_rx.clone()),
                CLOSE_GRACE,
            )),
        ));
    }
    for r in &shared.routes {
        tasks.push((
            "probe",
            tokio::spawn(probe(shared.clone(), r.clone(), stop_rx.clone())),
        ));
    }
    if let Some(url) = shared.config.scaler.clone() {
        let channel = link::channel(&url, &shared.config)?;
        tasks.push((
            "scaler link",
            tokio::spawn(link::run(shared.clone(), channel, stop_rx)),
        ));
    }
    info!(
        %addr,
        admin = ?admin_addr,
        workloads = shared.routes.len(),
        scaler = ?shared.config.scaler,
        "activator listening"
    );
    Ok(RunningActivator {
        shared,
        addr,
        admin_addr,
        stop: stop_tx,
        tasks,
    })
}

/// Runs the activator from its flags until `shutdown` resolves.
pub async fn run_from_args(
    args: &ActivatorArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let activator = start(args.to_config()?).await?;
    shutdown.await;
    info!("stopping");
    activator.shutdown().await
}
