//! The gpuscale node agent.
//!
//! Samples its telemetry sources every interval, streams a snapshot and then
//! deltas to the scaler over one long-lived gRPC stream (reconnecting with
//! jittered backoff and coalescing while disconnected), publishes what the
//! scaler asks of the node (drain, batch limits, interval) for the
//! readiness-gate writer and the node-local ServingService, and exports its
//! own Prometheus metrics.
//!
//! Not for: reading GPUs or engines (the `gpuscale-telemetry` sources do
//! that), deciding anything (the scaler does).
//!
//! # Embedding
//!
//! The agent is a library first: [`Agent::new`] takes a validated
//! [`AgentConfig`] and any three sources implementing the telemetry traits,
//! so the demo and the tests run several agents in one process:
//!
//! ```no_run
//! # async fn example() -> Result<(), gpuscale_agent::AgentError> {
//! use gpuscale_agent::{Agent, AgentConfig};
//! use gpuscale_telemetry::fake::{FakeNode, FakeNodeConfig};
//!
//! let node = FakeNode::new(&FakeNodeConfig::default(), "node-a").expect("valid");
//! let config = AgentConfig::new("http://127.0.0.1:7070", "node-a");
//! let agent = Agent::new(config, node.gpu_source(), node.pod_source(), node.engine_source())?;
//! let running = agent.start().await?;
//! let mut directives = running.handle().directives(); // drain / batch limits
//! # let _ = directives.changed().await;
//! running.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! **Architecture invariants.** One sampler task owns the sources; one uplink
//! task owns the stream. They meet in a `watch` channel holding only the
//! newest state, so a stalled link never stalls sampling and never grows
//! memory. Timing math ([`backoff`]) and deltas ([`diff`]) are pure functions.

pub mod backoff;
pub mod config;
pub mod diff;
pub mod directives;
pub mod discovery;
pub mod error;
pub mod exporter;
mod http;
pub mod metrics;
pub mod node;
pub mod readiness;
mod sampler;
pub mod simulated;
pub mod sources;
mod uplink;

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::sample::{AgentHealth, NodeSnapshot};
use gpuscale_telemetry::{EngineSource, GpuSource, PodGpuSource};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use backoff::BackoffConfig;
pub use config::{AgentArgs, AgentConfig, UplinkSecurity, load_fake_config, parse_duration};
pub use directives::NodeDirectives;
pub use error::AgentError;
pub use exporter::{NodeExporter, NodeStats};
pub use gpuscale_rt::Clock;
pub use http::OPENMETRICS_CONTENT_TYPE;
pub use metrics::AgentMetrics;
pub use node::{
    NodeArgs, NodeConfig, OnceReport, RunningNode, render_once, sample_once, sample_once_report,
    start_node,
};
pub use readiness::{ReadinessConfig, WarmupConfig, WarmupMode};
pub use sampler::Sampled;
pub use simulated::{RunningSimulatedNode, start_simulated_node};
pub use uplink::LinkStatus;

/// A random non-zero number: the process's boot epoch, jitter seeds.
fn random_u64() -> u64 {
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        let v = h.finish();
        if v != 0 {
            return v;
        }
    }
}

/// A configured agent with its sources, ready to [`start`](Agent::start) or
/// [`run`](Agent::run).
#[derive(Debug)]
pub struct Agent<G, P, E> {
    config: Arc<AgentConfig>,
    gpus: G,
    pods: P,
    engines: E,
    epoch: u64,
    clock: Clock,
    metrics: Arc<AgentMetrics>,
    latest: watch::Sender<Option<Arc<Sampled>>>,
    directives: watch::Sender<NodeDirectives>,
    interval: watch::Sender<Duration>,
    link: watch::Sender<LinkStatus>,
}

/// Read access to a running (or not yet started) agent: what the scaler asks
/// of the node, the link's state, the newest sample, the metrics.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    config: Arc<AgentConfig>,
    epoch: u64,
    metrics: Arc<AgentMetrics>,
    latest: watch::Receiver<Option<Arc<Sampled>>>,
    directives: watch::Receiver<NodeDirectives>,
    link: watch::Receiver<LinkStatus>,
}

impl AgentHandle {
    /// The scaler's standing requests (drain, batch limits, interval): the
    /// current value, then every change.
    pub fn directives(&self) -> watch::Receiver<NodeDirectives> {
        self.directives.clone()
    }
    /// The link to the scaler: the current state, then every change.
    pub fn link(&self) -> watch::Receiver<LinkStatus> {
        self.link.clone()
    }
    /// Every sampled state as it is produced (only the newest is kept).
    pub fn samples(&self) -> watch::Receiver<Option<Arc<Sampled>>> {
        self.latest.clone()
    }
    /// The newest full snapshot of the node, if it was sampled yet.
    pub fn latest_snapshot(&self) -> Option<NodeSnapshot> {
        self.latest.borrow().as_ref().map(|s| s.snapshot.clone())
    }
    /// The agent's own counters.
    pub fn health(&self) -> AgentHealth {
        AgentHealth {
            samples_total: self.metrics.samples_total(),
            sample_errors_total: self.metrics.sample_errors_total(),
            reconnects_total: self.metrics.reconnects_total(),
            coalesced_total: self.metrics.coalesced_total(),
            nvml_available: self.config.nvml_available,
            pod_resources_available: self.config.pod_resources_available,
        }
    }
    /// The configuration the agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }
    pub fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.metrics
    }
    /// The process's boot epoch as sent on the wire.
    pub fn boot_epoch(&self) -> u64 {
        self.epoch
    }
}

impl<G, P, E> Agent<G, P, E>
where
    G: GpuSource + 'static,
    P: PodGpuSource + 'static,
    E: EngineSource + 'static,
{
    /// Validates `config` and takes the sources.
    pub fn new(config: AgentConfig, gpus: G, pods: P, engines: E) -> Result<Self, AgentError> {
        config.validate()?;
        let interval = config.sample_interval;
        Ok(Self {
            config: Arc::new(config),
            gpus,
            pods,
            engines,
            epoch: random_u64(),
            clock: Clock::start(),
            metrics: Arc::new(AgentMetrics::new()),
            latest: watch::channel(None).0,
            directives: watch::channel(NodeDirectives::default()).0,
            interval: watch::channel(interval).0,
            link: watch::channel(LinkStatus::Connecting).0,
        })
    }

    /// Use `clock` for sample times instead of the system clock (tests,
    /// simulations with their own epoch).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Serve `metrics` instead of a fresh [`AgentMetrics`] (to register
    /// collectors such as the [`NodeExporter`] first). Call it before
    /// [`handle`](Agent::handle): handles taken earlier keep the old metrics.
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = Arc::new(metrics);
        self
    }

    /// Every sampled state as it is produced (only the newest is kept),
    /// available before the agent starts (for collectors).
    pub fn samples(&self) -> watch::Receiver<Option<Arc<Sampled>>> {
        self.latest.subscribe()
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            config: self.config.clone(),
            epoch: self.epoch,
            metrics: self.metrics.clone(),
            latest: self.latest.subscribe(),
            directives: self.directives.subscribe(),
            link: self.link.subscribe(),
        }
    }

    /// Binds the metrics endpoint (if configured) and spawns the sampler, the
    /// uplink and the HTTP server on the current runtime.
    pub async fn start(self) -> Result<RunningAgent, AgentError> {
        let handle = self.handle();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks: Vec<(&'static str, JoinHandle<()>)> = Vec::new();
        let mut metrics_addr = None;
        if let Some(addr) = self.config.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind { addr, source })?;
            metrics_addr = listener.local_addr().ok();
            let router = http::router(http::HttpState {
                metrics: self.metrics.clone(),
                latest: self.latest.subscribe(),
                interval: self.interval.subscribe(),
                clock: self.clock,
            });
            let mut stop = shutdown_rx.clone();
            tasks.push((
                "metrics server",
                tokio::spawn(async move {
                    let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    });
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "metrics server failed");
                    }
                }),
            ));
        }
        tracing::info!(
            node = %self.config.node_name,
            scaler = %self.config.scaler_url,
            interval_ms = self.config.sample_interval.as_millis() as u64,
            epoch = self.epoch,
            metrics = ?metrics_addr,
            "agent starting"
        );
        let sampler = sampler::Sampler {
            config: self.config.clone(),
            gpus: self.gpus,
            pods: self.pods,
            engines: self.engines,
            clock: self.clock,
            metrics: self.metrics.clone(),
            latest: self.latest,
            interval: self.interval.subscribe(),
            shutdown: shutdown_rx.clone(),
        };
        tasks.push(("sampler", tokio::spawn(sampler.run())));
        let uplink = uplink::Uplink {
            config: self.config.clone(),
            epoch: self.epoch,
            clock: self.clock,
            metrics: self.metrics.clone(),
            latest: handle.latest.clone(),
            directives: self.directives,
            interval: self.interval,
            link: self.link,
            shutdown: shutdown_rx,
            seed: random_u64(),
        };
        tasks.push(("uplink", tokio::spawn(uplink.run())));
        Ok(RunningAgent {
            handle,
            metrics_addr,
            shutdown: shutdown_tx,
            tasks,
        })
    }

    /// Runs until `shutdown` completes, then stops every task.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let running = self.start().await?;
        shutdown.await;
        running.shutdown().await
    }
}

/// A started agent.
#[derive(Debug)]
pub struct RunningAgent {
    handle: AgentHandle,
    metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl RunningAgent {
    pub fn handle(&self) -> &AgentHandle {
        &self.handle
    }
    /// Where `/metrics` and `/healthz` are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// Stops sampling, closes the stream and the HTTP server, and waits for
    /// every task.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        self.shutdown.send_replace(true);
        let mut first_error = None;
        for (task, join) in self.tasks {
            if let Err(e) = join.await {
                first_error.get_or_insert(AgentError::Task {
                    task,
                    message: e.to_string(),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// `gpuscale agent`: builds the sources the flags name and runs until
/// `shutdown` completes; with `--once`, prints one node snapshot to stdout
/// and returns (see [`node`]).
pub async fn run_from_args(
    args: &AgentArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    node::run(args, shutdown).await
}
