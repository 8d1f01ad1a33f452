//! The scaler's gRPC edge: what stands between the network and the
//! handlers.
//!
//! * [`tls`]: TLS with certificate reload on rotation ([`TlsConfig`]);
//!   plaintext only when asked for ([`Transport::Plaintext`]);
//! * [`conn`]: accepting connections, closing those that never start
//!   HTTP/2 or stay idle ([`ConnLimits`]);
//! * [`auth`]: who is calling (tokens via TokenReview or a static file,
//!   client certificates), agents bound to their node, per-workload reads
//!   authorised ([`AuthConfig`]);
//! * this module: the layer in front of every service, which authenticates
//!   each call (its [`Caller`] goes into the request's extensions), applies
//!   the per-peer limits ([`PeerLimitConfig`]: open streams, unary requests
//!   per second), and answers an oversized request with
//!   `RESOURCE_EXHAUSTED`; and gRPC health whose `Watch` of an unknown
//!   service streams `SERVICE_UNKNOWN`.
//!
//! Health (`grpc.health.v1.Health`) is open to everyone (probes and load
//! balancers); reflection needs an authenticated caller when
//! authentication is on.

pub mod auth;
pub mod conn;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

pub use auth::{
    AuthBackend, AuthConfig, AuthFile, AuthMode, Authenticator, Caller, Credential, FileBackend,
    Offender, TokenReview,
};
pub use conn::{ConnInfo, ConnLimits};
pub use tls::TlsConfig;

use crate::error::ScalerError;
use crate::metrics::ScalerMetrics;
use auth::{CallKind, quote};

/// How the port is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// h2c: for local use, tests and the demo only.
    Plaintext,
    Tls(TlsConfig),
}

/// Per-peer (client IP address) limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerLimitConfig {
    /// Streams (agent streams, watches, KEDA push streams, health watches)
    /// one peer may have open at once; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_streams: usize,
    /// Unary calls per second one peer may make (a token bucket of
    /// `burst`); more are refused with `RESOURCE_EXHAUSTED`.
    pub requests_per_second: f64,
    pub burst: f64,
    /// Reports per second one agent stream may send (a token bucket of
    /// twice as many); a faster agent is slowed down by HTTP/2 flow
    /// control. `None`: no limit.
    pub agent_reports_per_second: Option<f64>,
}

impl Default for PeerLimitConfig {
    /// 128 streams and 200 requests per second (bursts of 400) per peer,
    /// 50 reports per second per agent stream (agents send one per interval,
    /// 1 s by default).
    fn default() -> Self {
        Self {
            max_streams: 128,
            requests_per_second: 200.0,
            burst: 400.0,
            agent_reports_per_second: Some(50.0),
        }
    }
}

impl PeerLimitConfig {
    pub fn validate(&self) -> Result<(), ScalerError> {
        gpuscale_core::bounds::within(self.max_streams, 1, 1_000_000)
            .map_err(|e| ScalerError::out_of_range("--max-streams-per-peer", e))?;
        let rate_ok = |r: f64| r.is_finite() && r > 0.0 && r <= 1e9;
        if !rate_ok(self.requests_per_second) || !rate_ok(self.burst) || self.burst < 1.0 {
            return Err(ScalerError::config(
                "--requests-per-second-per-peer",
                self.requests_per_second.to_string(),
                "more than 0 and at most 1e9 (burst at least 1)",
            ));
        }
        if let Some(r) = self.agent_reports_per_second
            && !rate_ok(r)
        {
            return Err(ScalerError::config(
                "--agent-reports-per-second",
                r.to_string(),
                "more than 0 and at most 1e9",
            ));
        }
        Ok(())
    }
}

/// A token bucket (`rate` per second, at most `burst`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn full(burst: f64) -> Self {
        Self {
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, rate: f64, burst: f64) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
    }

    /// Takes a token, or says how long until one is there.
    pub(crate) fn take(&mut self, rate: f64, burst: f64) -> Result<(), Duration> {
        self.refill(rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[derive(Debug)]
struct PeerState {
    streams: usize,
    bucket: Bucket,
}

/// Open streams and request rates by peer.
#[derive(Debug)]
pub(crate) struct PeerLimits {
    config: PeerLimitConfig,
    peers: Mutex<HashMap<IpAddr, PeerState>>,
}

/// Most peers tracked; beyond, idle ones are forgotten.
const PEERS_TRACKED: usize = 100_000;

/// One open stream of a peer.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    limits: Arc<PeerLimits>,
    peer: IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut peers) = self.limits.peers.lock()
            && let Some(p) = peers.get_mut(&self.peer)
        {
            p.streams = p.streams.saturating_sub(1);
        }
    }
}

impl PeerLimits {
    pub(crate) fn new(config: PeerLimitConfig) -> Self {
        Self {
            config,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one call of `peer`: a stream slot, or a token of its bucket.
    fn admit(
        self: &Arc<Self>,
        peer: Option<IpAddr>,
        streaming: bool,
    ) -> Result<Option<StreamSlot>, Status> {
        let Some(ip) = peer else { return Ok(None) };
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| Status::internal("peer limits unavailable"))?;
        if peers.len() >= PEERS_TRACKED && !peers.contains_key(&ip) {
            let burst = self.config.burst;
            peers.retain(|_, p| p.streams > 0 || p.bucket.tokens < burst);
        }
        let c = self.config;
        let state = peers.entry(ip).or_insert_with(|| PeerState {
            streams: 0,
            bucket: Bucket::full(c.burst),
        });
        if streaming {
            if state.streams >= c.max_streams {
                return Err(Status::resource_exhausted(format!(
                    "{ip} has {} streams open, the most one client may (--max-streams-per-peer); close one",
                    state.streams
                )));
            }
            state.streams += 1;
            return Ok(Some(StreamSlot {
                limits: self.clone(),
                peer: ip,
            }));
        }
        state
            .bucket
            .take(c.requests_per_second, c.burst)
            .map(|()| None)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "too many requests from {ip}: at most {} per second (--requests-per-second-per-peer); slow down",
                    c.requests_per_second
                ))
            })
    }
}

/// Which check a call gets, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Health: anyone.
    Open,
    Agent,
    Client,
}

fn check_of(path: &str) -> Check {
    if path.starts_with("/grpc.health.v1.Health/") {
        Check::Open
    } else if path.starts_with("/gpuscale.v1.AgentService/") {
        Check::Agent
    } else {
        // ScalerService, KEDA, reflection, and anything unknown (which
        // tonic answers UNIMPLEMENTED once the caller is known).
        Check::Client
    }
}

fn is_stream(path: &str) -> bool {
    matches!(
        path,
        "/gpuscale.v1.AgentService/Report"
            | "/gpuscale.v1.ScalerService/WatchRecommendations"
            | "/externalscaler.ExternalScaler/StreamIsActive"
            | "/externalscaler.ExternalScaler/StreamMetricSpec"
            | "/grpc.health.v1.Health/Watch"
    ) || path.ends_with("/ServerReflectionInfo")
}

/// The bearer token of `authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// What the layer shares.
#[derive(Debug)]
pub(crate) struct Edge {
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) peers: Arc<PeerLimits>,
    pub(crate) max_message_bytes: usize,
}

/// The layer in front of the scaler's routes.
#[derive(Debug, Clone)]
pub(crate) struct EdgeLayer(pub(crate) Arc<Edge>);

impl tower::Layer<Routes> for EdgeLayer {
    type Service = EdgeService;
    fn layer(&self, inner: Routes) -> EdgeService {
        EdgeService {
            inner,
            edge: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct EdgeService {
    inner: Routes,
    edge: Arc<Edge>,
}

type EdgeFuture =
    Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

fn refuse(status: Status) -> Result<http::Response<Body>, Infallible> {
    Ok(status.into_http())
}

/// tonic answers a request over the decoding limit with `OUT_OF_RANGE`;
/// gRPC's convention (and docs/api.md) is `RESOURCE_EXHAUSTED`.
fn oversized(response: &http::Response<Body>) -> bool {
    let h = response.headers();
    h.get("grpc-status").is_some_and(|s| s == "11")
        && h.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("too large") || m.contains("too%20large"))
}

impl tower::Service<http::Request<Body>> for EdgeService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = EdgeFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let edge = self.edge.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let info = request.extensions().get::<ConnInfo>().cloned();
            let peer = info.as_ref().and_then(|i| i.remote);
            let call = info.as_ref().map(|i| i.state.open_call());
            let slot = match edge.peers.admit(peer.map(|p| p.ip()), is_stream(&path)) {
                Ok(slot) => slot,
                Err(status) => {
                    edge.auth.metrics().peer_limited(if is_stream(&path) {
                        "streams"
                    } else {
                        "requests"
                    });
                    return refuse(status);
                }
            };
            let caller = match check_of(&path) {
                Check::Open => Caller::anonymous(peer),
                check => {
                    let kind = if check == Check::Agent {
                        CallKind::Agent
                    } else {
                        CallKind::Client
                    };
                    let names = info
                        .as_ref()
                        .and_then(|i| i.certs.as_ref())
                        .and_then(|c| c.first())
                        .map(tls::certificate_names);
                    let token = bearer(request.headers());
                    match edge.auth.authenticate(kind, token, names, peer).await {
                        Ok(caller) => caller,
                        Err(refusal) => return refuse(refusal.status()),
                    }
                }
            };
            request.extensions_mut().insert(caller);
            let response = match tower::Service::call(&mut inner, request).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if oversized(&response) {
                return refuse(Status::resource_exhausted(format!(
                    "the request is larger than the scaler's limit of {} bytes",
                    edge.max_message_bytes
                )));
            }
            Ok(response.map(|body| {
                Body::new(Guarded {
                    inner: body,
                    _guards: (call, slot),
                })
            }))
        })
    }
}

/// A response body that holds the call's guards until it is dropped (the
/// call is over).
struct Guarded {
    inner: Body,
    _guards: (Option<conn::CallGuard>, Option<StreamSlot>),
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The caller of a request (anonymous when the edge put none there).
pub(crate) fn caller_of(extensions: &http::Extensions) -> Caller {
    extensions
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| Caller::anonymous(None))
}

// ---------------------------------------------------------------------------
// Health.

/// gRPC health: `Check` as tonic-health answers it; `Watch` of a service
/// nobody registered streams `SERVICE_UNKNOWN` (as the health protocol
/// says) and stays open, instead of failing with `NOT_FOUND`.
pub(crate) struct EdgeHealth {
    inner: tonic_health::server::HealthService,
    shutdown: watch::Receiver<bool>,
}

impl EdgeHealth {
    pub(crate) fn new(
        reporter: tonic_health::server::HealthReporter,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: tonic_health::server::HealthService::from_health_reporter(reporter),
            shutdown,
        }
    }
}

type HealthStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for EdgeHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, Status> {
        let service = request.get_ref().service.clone();
        self.inner.check(request).await.map_err(|s| {
            if s.code() == tonic::Code::NotFound {
                Status::not_found(format!("service `{}` is not served here", quote(&service)))
            } else {
                s
            }
        })
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthStream>, Status> {
        let mut shutdown = self.shutdown.clone();
        let stop = Box::pin(async move { crate::stopped(&mut shutdown).await });
        match self.inner.watch(request).await {
            Ok(stream) => Ok(tonic::Response::new(Box::pin(Until {
                inner: stream.into_inner(),
                until: stop,
            }))),
            Err(s) if s.code() == tonic::Code::NotFound => {
                let unknown = HealthCheckResponse {
                    status: ServingStatus::ServiceUnknown as i32,
                };
                Ok(tonic::Response::new(Box::pin(Until {
                    inner: tokio_stream::StreamExt::chain(
                        tokio_stream::once(Ok(unknown)),
                        tokio_stream::pending(),
                    ),
                    until: stop,
                })))
            }
            Err(s) => Err(s),
        }
    }
}

/// The items of `inner` until `until` resolves (the scaler shuts down).
struct Until<S> {
    inner: S,
    until: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl<S: tokio_stream::Stream + Unpin> tokio_stream::Stream for Until<S> {
    type Item = S::Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Builds the edge: the authenticator's backend comes from the mode (the
/// static file is read here; Kubernetes supplies its own).
pub(crate) fn authenticator(
    config: &AuthConfig,
    backend: Option<Arc<dyn AuthBackend>>,
    clock: crate::Clock,
    metrics: Arc<ScalerMetrics>,
) -> Result<Authenticator, ScalerError> {
    let backend = match (&config.mode, backend) {
        (AuthMode::None | AuthMode::Certificates, _) => None,
        (AuthMode::File(path), _) => {
            Some(Arc::new(FileBackend::new(AuthFile::load(path)?)) as Arc<dyn AuthBackend>)
        }
        (AuthMode::Kubernetes, Some(b)) => Some(b),
        (AuthMode::Kubernetes, None) => {
            return Err(ScalerError::config(
                "--auth",
                "kubernetes",
                "only with --kubernetes (TokenReview needs the API server); standalone, use --auth-file or client certificates",
            ));
        }
    };
    Ok(Authenticator::new(config.clone(), backend, clock, metrics))
}
