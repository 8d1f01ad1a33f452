//! `gpuscale proxy`: the per-pod sidecar in front of an inference engine.
//!
//! ```text
//!  clients ──► :8080 ──► admission (limit, FIFO queue, deadlines) ──► engine (127.0.0.1:8000)
//!                │            ▲ limit, drain                              │ streamed back, measured
//!                │     node agent ServingService ◄── stats (TTFT, TPOT, queue, counters) every second
//!  kubelet ──► :9091 /healthz /readyz /drain /metrics
//! ```
//!
//! * POST requests (inference) pass the [`Admission`]; GET, HEAD and
//!   OPTIONS requests and the `--unlimited-path`s are forwarded at once and
//!   not measured.
//! * The batch limit comes from the agent (`WatchLimits`), else
//!   `--batch-limit`; the agent's `draining` flag drains the proxy, and so
//!   do `/drain` (the engine container's `preStop` hook) and SIGTERM.
//! * Draining: readiness (`/readyz`) turns false first, new requests get
//!   503 with `Retry-After` and `Connection: close`, queued and in-flight
//!   requests finish (up to `--drain-timeout`), and the proxy reports
//!   itself empty to the agent the moment it is.

pub(crate) mod admin;
pub mod config;
pub(crate) mod link;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::admission::{Admission, Limit, Load, Permit};
use crate::error::ProxyError;
use crate::forward::{
    ForwardError, Forwarder, Observe, ObservedBody, ResponseBody, refuse_upgrade,
};
use crate::measure::{End, Exchange, RequestStats, Totals};
use crate::{reply, server};
pub use config::{ProxyArgs, ProxyConfig};

/// How long open connections get to finish once the servers stop.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// State shared by the request handlers, the admin server and the agent link.
#[derive(Debug)]
struct Shared {
    config: ProxyConfig,
    admission: Admission,
    stats: RequestStats,
    forwarder: Forwarder,
    /// The agent asked this pod to drain.
    agent_draining: AtomicBool,
    /// `/drain` or shutdown asked; never undone.
    local_draining: AtomicBool,
    agent_connected: AtomicBool,
    /// Report to the agent now rather than at the next interval.
    report_now: Notify,
}

impl Shared {
    fn limited<B>(&self, req: &Request<B>) -> bool {
        if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
            return false;
        }
        let path = req.uri().path();
        !self
            .config
            .unlimited_paths
            .iter()
            .any(|p| path == p || (p.ends_with('/') && path.starts_with(p.as_str())))
    }

    /// Applies both drain sources to the admission.
    fn update_drain(self: &Arc<Self>) {
        let draining = self.agent_draining.load(Ordering::SeqCst)
            || self.local_draining.load(Ordering::SeqCst);
        let was = self.admission.is_draining();
        if draining == was {
            return;
        }
        if draining {
            self.admission.drain();
            let load = self.admission.load();
            info!(
                in_flight = load.in_flight,
                queued = load.queued,
                "draining: not ready, new requests refused, in-flight ones finish"
            );
            let me = self.clone();
            tokio::spawn(async move {
                me.admission.wait_empty().await;
                if me.admission.is_draining() {
                    info!("drained: nothing in flight or queued");
                    me.report_now.notify_one();
                }
            });
        } else {
            self.admission.resume();
            info!("drain cancelled: admitting requests again");
        }
        self.report_now.notify_one();
    }

    fn set_limit(&self, limit: Limit) {
        let before = self.admission.load().limit;
        if before != limit {
            info!(from = %before, to = %limit, "batch limit");
            self.admission.set_limit(limit);
        }
    }
}

/// Measures one admitted request and holds its slot until its body ends.
#[derive(Debug)]
struct Measure {
    exchange: Option<Exchange>,
    permit: Option<Permit>,
    stats: RequestStats,
}

impl Observe for Measure {
    fn on_data(&mut self, data: &Bytes, at: Instant) {
        if let Some(x) = self.exchange.as_mut() {
            x.on_data(data, at);
        }
    }

    fn on_end(&mut self, at: Instant, end: End) {
        if let Some(x) = self.exchange.take() {
            self.stats.record(&x.finish(at, end));
        }
        self.permit.take();
    }
}

type ProxyResponse = Response<ResponseBody<Measure>>;

fn bad_gateway(e: &ForwardError, retry_after: std::time::Duration) -> ProxyResponse {
    warn!(error = %e, "upstream unavailable");
    reply::error(
        StatusCode::BAD_GATEWAY,
        "upstream_unavailable",
        &e.to_string(),
        Some(retry_after),
        false,
    )
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<ProxyResponse, Infallible> {
    if let Some(refused) = refuse_upgrade(&req) {
        return Ok(refused);
    }
    let http1 = req.version() < http::Version::HTTP_2;
    let retry_after = shared.config.retry_after;
    if !shared.limited(&req) {
        return Ok(match shared.forwarder.forward(req).await {
            Ok(resp) => resp.map(ResponseBody::Upstream),
            Err(e) => bad_gateway(&e, retry_after),
        });
    }
    let arrived = Instant::now();
    shared.stats.arrived();
    let permit = match shared
        .admission
        .acquire(arrived + shared.config.queue_timeout)
        .await
    {
        Ok(p) => p,
        Err(r) => {
            shared.stats.refused(&r);
            return Ok(reply::refusal(&r, retry_after, http1));
        }
    };
    let queued_for = permit.queued_for();
    match shared.forwarder.forward(req).await {
        Err(e) => {
            shared.stats.upstream_failed(queued_for);
            drop(permit);
            Ok(bad_gateway(&e, retry_after))
        }
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            let streaming = is_event_stream(&parts.headers);
            let exchange = Exchange::new(arrived, queued_for, parts.status.is_success(), streaming);
            if http1 && shared.admission.is_draining() {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let measure = Measure {
                exchange: Some(exchange),
                permit: Some(permit),
                stats: shared.stats.clone(),
            };
            Ok(Response::from_parts(
                parts,
                ResponseBody::Observed(ObservedBody::new(body, measure)),
            ))
        }
    }
}

/// A started proxy. Dropping it does not stop it: call [`RunningProxy::shutdown`].
#[derive(Debug)]
pub struct RunningProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl RunningProxy {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/healthz`, `/readyz`, `/drain` and `/metrics` are served.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// In flight, queued, the limit and the drain flag.
    pub fn load(&self) -> Load {
        self.shared.admission.load()
    }

    /// Everything counted so far.
    pub fn totals(&self) -> Totals {
        self.shared.stats.totals()
    }

    /// Whether the last `WatchLimits` stream to the agent is open.
    pub fn agent_connected(&self) -> bool {
        self.shared.agent_connected.load(Ordering::SeqCst)
    }

    /// Sets the limit now (the agent's next word replaces it).
    pub fn set_limit(&self, limit: Limit) {
        self.shared.set_limit(limit);
    }

    /// Drains (for good) and waits until empty or `--drain-timeout`;
    /// true when empty.
    pub async fn drain(&self) -> bool {
        drain(&self.shared).await
    }

    /// Drains, then stops the servers and the agent link (a last report).
    pub async fn shutdown(self) -> Result<(), ProxyError> {
        let drained = drain(&self.shared).await;
        if !drained {
            let load = self.shared.admission.load();
            warn!(
                in_flight = load.in_flight,
                queued = load.queued,
                "drain timeout: stopping with requests in flight"
            );
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

async fn drain(shared: &Arc<Shared>) -> bool {
    shared.local_draining.store(true, Ordering::SeqCst);
    shared.update_drain();
    tokio::time::timeout(shared.config.drain_timeout, shared.admission.wait_empty())
        .await
        .is_ok()
}

/// Starts the proxy: the client listener, the admin server, the agent link.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, ProxyError> {
    config.validate()?;
    let forwarder = Forwarder::new(&config.upstream, &config.forward)?;
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
        admission: Admission::new(config.default_limit, config.max_queue),
        stats: RequestStats::default(),
        forwarder,
        agent_draining: AtomicBool::new(false),
        local_draining: AtomicBool::new(false),
        agent_connected: AtomicBool::new(false),
        report_now: Notify::new(),
        config,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    let s = shared.clone();
    let service = service_fn(move |req| handle(s.clone(), req));
    tasks.push((
        "proxy server",
        tokio::spawn(server::serve(
            listener,
            service,
            stopped(stop_rx.clone()),
            CLOSE_GRACE,
        )),
    ));
    if let Some(l) = admin_listener {
        let s = shared.clone();
        let service = service_fn(move |req| admin::handle(s.clone(), req));
        tasks.push((
            "admin server",
            tokio::spawn(server::serve(
                l,
                service,
                stopped(stop_rx.clone()),
                CLOSE_GRACE,
            )),
        ));
    }
    if let (Some(agent), Some(pod)) = (shared.config.agent.clone(), shared.config.pod.clone()) {
        let channel = link::channel(&agent)?;
        tasks.push((
            "limits watch",
            tokio::spawn(link::watch_limits(
                shared.clone(),
                channel.clone(),
                pod.clone(),
                stop_rx.clone(),
            )),
        ));
        tasks.push((
            "stats report",
            tokio::spawn(link::report_stats(shared.clone(), channel, pod, stop_rx)),
        ));
    }
    info!(
        %addr,
        admin = ?admin_addr,
        upstream = %shared.forwarder.upstream(),
        agent = ?shared.config.agent.as_ref().map(ToString::to_string),
        pod = ?shared.config.pod.as_ref().map(ToString::to_string),
        limit = %shared.config.default_limit,
        "proxy listening"
    );
    Ok(RunningProxy {
        shared,
        addr,
        admin_addr,
        stop: stop_tx,
        tasks,
    })
}

/// Runs the proxy from its flags until `shutdown` resolves (SIGTERM), then
/// drains and stops.
pub async fn run_from_args(
    args: &ProxyArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let config = args.to_config(|k| std::env::var(k).ok())?;
    let proxy = start(config).await?;
    shutdown.await;
    info!("stopping: draining first");
    proxy.shutdown().await
}
