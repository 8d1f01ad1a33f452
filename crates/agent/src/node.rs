//! `gpuscale agent` on a node: which sources it reads, from its flags, and
//! how they are wired around the sampling loop.
//!
//! ```text
//!  NVML / fake GPUs ──► NodeGpuSource ──inventory──► NodePodSource ◄── kubelet PodResources
//!                                                      ▲ new pod → refresh
//!  Kubernetes API ──► pod watch (this node) ──NodePods─┼──► NodeEngineSource ◄── --engine flags
//!                                              │       │      (scrape + push + fake)   ▲
//!                                              │       │                                │ drained → Draining
//!  scaler directives ──► LimitsHandle ─────────┼───────┴────────────────────────────────┘
//!        (uplink)    └─► readiness-gate writer ◄┘ ◄── samples, scrape targets (warm-ups)
//!                              │ pods/status (strategic merge)
//!                              ▼
//!                        Kubernetes API
//! ```
//!
//! Everything optional degrades on its own: without the NVML library the
//! node reports no GPUs (a logged no-GPU mode); without the PodResources
//! socket GPUs are not attributed to pods; without the Kubernetes API
//! engines come from `--engine` flags only and no readiness gate is written;
//! each is logged once per change and counted
//! (`gpuscale_agent_source_errors_total`, `gpuscale_agent_source_up`).

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use gpuscale_core::sample::{AgentHealth, NodeSnapshot};
use gpuscale_core::{NodeName, PodRef};
use gpuscale_telemetry::fake::{FakeNode, FakeNodeConfig};
use gpuscale_telemetry::nvml::DEFAULT_NVML_LIBRARY;
use gpuscale_telemetry::pod_resources::DEFAULT_POD_RESOURCES_SOCKET;
use gpuscale_telemetry::{
    EngineSource, EngineTarget, GpuSource, LimitsHandle, NvmlConfig, NvmlSource, PodGpuSource,
    PodResourcesConfig, PodResourcesSource, PushConfig, PushService, ScrapeConfig,
    ScrapeEngineSource, TelemetryError, push_source,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{AgentArgs, AgentConfig, parse_duration};
use crate::directives::NodeDirectives;
use crate::discovery::{DEFAULT_READINESS_GATE, NodePods, list_node_pods, watch_node_pods};
use crate::error::AgentError;
use crate::exporter::{NodeExporter, NodeStats};
use crate::readiness::{ReadinessConfig, ReadinessWriter, WarmupConfig, WarmupMode};
use crate::sources::{GpuBackend, NodeEngineSource, NodeGpuSource, NodePodSource, PodBackend};
use crate::{Agent, AgentHandle, AgentMetrics, Clock, RunningAgent};

/// Whether the agent talks to the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    /// In-cluster (service account) or kubeconfig, when either is found.
    Auto,
    /// Never: engines come from `--engine` flags, no readiness gates.
    Off,
}

/// How `--once` prints the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Json,
    Yaml,
}

/// The node's sources: `gpuscale agent` flags beside the common ones of
/// [`AgentArgs`].
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// The NVML library: a file name searched the usual way, or a path.
    /// Without it the agent runs in a logged no-GPU mode.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_NVML_LIBRARY, env = "GPUSCALE_NVML_LIBRARY")]
    pub nvml_library: PathBuf,
    /// Period of the slow NVML calls (energy, inventory, MIG) and of retries
    /// to load the library in no-GPU mode (1s..=1h).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub nvml_slow_interval: Duration,
    /// The kubelet PodResources socket (mount its directory); `off`: GPUs
    /// are not attributed to pods.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_POD_RESOURCES_SOCKET, env = "GPUSCALE_POD_RESOURCES_SOCKET")]
    pub pod_resources_socket: String,
    /// Kubernetes API: `auto` uses the service account or a kubeconfig when
    /// found (engine discovery from pod annotations, readiness gates).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value = "auto",
        env = "GPUSCALE_KUBERNETES"
    )]
    pub kubernetes: KubernetesMode,
    /// An engine to scrape, repeatable: `[namespace/pod=]framework=http://host:port/path`
    /// (frameworks: vllm, sglang, tgi, triton-trtllm, trtllm-serve, llama-cpp).
    #[arg(long = "engine", value_name = "SPEC")]
    pub engines: Vec<String>,
    /// Deadline of one engine scrape (10ms..=60s).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub scrape_timeout: Duration,
    /// Largest engine metrics response accepted, bytes (1024..=268435456).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    pub scrape_max_bytes: usize,
    /// Serve the node-local ServingService (engines that push stats and watch
    /// their batch limit): `unix:/path`, `host:port`, or `off`.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "off",
        env = "GPUSCALE_SERVING_ADDR"
    )]
    pub serving_addr: String,
    /// The readiness-gate condition type the agent sets on pods declaring it.
    #[arg(long, value_name = "TYPE", default_value = DEFAULT_READINESS_GATE)]
    pub readiness_gate: String,
    /// How an engine proves it is warm before its gate turns True.
    #[arg(long, value_enum, value_name = "MODE", default_value = "completion")]
    pub warmup: WarmupMode,
    /// Deadline of one warm-up probe.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub warmup_timeout: Duration,
    /// Warm-up request path instead of the framework's (e.g. /v1/chat/completions).
    #[arg(long, value_name = "PATH")]
    pub warmup_path: Option<String>,
    /// Warm-up request body (JSON) instead of the framework's one-token completion.
    #[arg(long, value_name = "JSON")]
    pub warmup_body: Option<String>,
    /// Sample every source once, print one node snapshot to stdout and exit.
    #[arg(long)]
    pub once: bool,
    /// Format of the `--once` snapshot.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "json")]
    pub output: OutputFormat,
}

pub use gpuscale_core::ServingAddr;

/// Where GPUs come from.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuConfig {
    Nvml(NvmlConfig),
    /// A simulated node: its GPUs, GPU assignment and engines.
    Fake(FakeNodeConfig),
}

/// The validated configuration of the node's sources.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub gpus: GpuConfig,
    /// `None`: no GPU-to-pod attribution from the kubelet (off, or the fake
    /// node's own assignment).
    pub pod_resources: Option<PodResourcesConfig>,
    /// Engines scraped always.
    pub engines: Vec<EngineTarget>,
    pub scrape: ScrapeConfig,
    pub push: PushConfig,
    pub serving: Option<ServingAddr>,
    pub kubernetes: KubernetesMode,
    pub readiness: ReadinessConfig,
}

impl NodeConfig {
    /// NVML from `library_path`, the default PodResources socket, no static
    /// engines, no ServingService, Kubernetes `auto`.
    pub fn nvml(library_path: impl Into<PathBuf>) -> Self {
        Self {
            gpus: GpuConfig::Nvml(NvmlConfig {
                library_path: library_path.into(),
                ..NvmlConfig::default()
            }),
            pod_resources: Some(PodResourcesConfig::default()),
            engines: Vec::new(),
            scrape: ScrapeConfig::default(),
            push: PushConfig::default(),
            serving: None,
            kubernetes: KubernetesMode::Auto,
            readiness: ReadinessConfig::default(),
        }
    }

    /// A simulated node (the fake node's GPU assignment replaces PodResources).
    pub fn fake(config: FakeNodeConfig) -> Self {
        Self {
            gpus: GpuConfig::Fake(config),
            pod_resources: None,
            ..Self::nvml(DEFAULT_NVML_LIBRARY)
        }
    }

    pub fn validate(&self) -> Result<(), AgentError> {
        match &self.gpus {
            GpuConfig::Nvml(n) => n.validate().map_err(flag_error)?,
            GpuConfig::Fake(f) => f.validate().map_err(|e| AgentError::ConfigFile {
                flag: "--fake-config",
                path: String::new(),
                message: e.message,
            })?,
        }
        if let Some(p) = &self.pod_resources {
            p.validate().map_err(flag_error)?;
        }
        self.scrape.validate().map_err(flag_error)?;
        self.push.validate().map_err(flag_error)?;
        self.readiness.validate()
    }
}

/// A telemetry configuration error, naming the flag where there is one.
fn flag_error(e: TelemetryError) -> AgentError {
    match e {
        TelemetryError::InvalidConfig {
            field,
            value,
            allowed,
        } => {
            let flag = match field.as_str() {
                "nvml.library_path" => "--nvml-library",
                "nvml.slow_interval" => "--nvml-slow-interval",
                "pod_resources.socket_path" => "--pod-resources-socket",
                "engines.scrape_timeout" => "--scrape-timeout",
                "engines.max_body_bytes" => "--scrape-max-bytes",
                other => other,
            };
            AgentError::config(flag, value, allowed)
        }
        other => AgentError::config("node", other.to_string(), "a valid node configuration"),
    }
}

impl NodeArgs {
    /// The validated node configuration these flags describe; `fake` from
    /// `--fake-config` replaces NVML and PodResources.
    pub(crate) fn to_node_config(
        &self,
        fake: Option<FakeNodeConfig>,
    ) -> Result<NodeConfig, AgentError> {
        let mut config = match fake {
            Some(f) => NodeConfig::fake(f),
            None => {
                let mut c = NodeConfig::nvml(self.nvml_library.clone());
                if let GpuConfig::Nvml(n) = &mut c.gpus {
                    n.slow_interval = self.nvml_slow_interval;
                }
                c.pod_resources = match self.pod_resources_socket.trim() {
                    "off" => None,
                    path => Some(PodResourcesConfig {
                        socket_path: PathBuf::from(path),
                        ..PodResourcesConfig::default()
                    }),
                };
                c
            }
        };
        config.engines = self
            .engines
            .iter()
            .map(|e| EngineTarget::parse_flag(e).map_err(flag_error))
            .collect::<Result<_, _>>()?;
        for (i, t) in config.engines.iter().enumerate() {
            if config.engines[..i].iter().any(|o| o.pod == t.pod) {
                return Err(AgentError::config(
                    "--engine",
                    format!("{}", t.pod),
                    "one --engine per pod (or per host:port)",
                ));
            }
        }
        config.scrape.default_timeout = self.scrape_timeout;
        config.scrape.http.max_body_bytes = self.scrape_max_bytes;
        config.serving = ServingAddr::parse(&self.serving_addr).map_err(|allowed| {
            AgentError::config("--serving-addr", self.serving_addr.trim(), allowed)
        })?;
        config.kubernetes = self.kubernetes;
        config.readiness.gate = self.readiness_gate.clone();
        config.readiness.warmup = WarmupConfig {
            mode: self.warmup,
            timeout: self.warmup_timeout,
            path: self.warmup_path.clone(),
            body: self.warmup_body.clone(),
        };
        config.validate()?;
        Ok(config)
    }
}

/// The sources of one node, built and wired.
struct NodeSources {
    gpus: NodeGpuSource,
    pods: NodePodSource,
    engines: NodeEngineSource,
    push: PushService,
    limits: LimitsHandle,
}

fn build_sources(
    config: &NodeConfig,
    node_name: &str,
    node_pods: Option<watch::Receiver<Arc<NodePods>>>,
    stats: &Arc<NodeStats>,
) -> Result<NodeSources, AgentError> {
    let (gpu_backend, pod_backend, fake_engines) = match &config.gpus {
        GpuConfig::Nvml(n) => {
            let nvml = NvmlSource::new(n.clone()).map_err(flag_error)?;
            let pods = match &config.pod_resources {
                Some(p) => PodBackend::Kubelet(Box::new(
                    PodResourcesSource::new(p.clone()).map_err(flag_error)?,
                )),
                None => PodBackend::Off,
            };
            (GpuBackend::Nvml(Box::new(nvml)), pods, None)
        }
        GpuConfig::Fake(f) => {
            let node = FakeNode::new(f, node_name).map_err(|e| AgentError::ConfigFile {
                flag: "--fake-config",
                path: String::new(),
                message: e.message,
            })?;
            tracing::warn!(
                "GPUs, their assignment to pods and the fake engines are simulated (--fake-config)"
            );
            (
                GpuBackend::Fake(node.gpu_source()),
                PodBackend::Fake(node.pod_source()),
                Some(node.engine_source()),
            )
        }
    };
    let gpus = NodeGpuSource::new(gpu_backend, stats.clone());
    let pods = NodePodSource::new(
        pod_backend,
        gpus.inventory(),
        node_pods.clone(),
        stats.clone(),
    );
    let (push, push_engines, limits) = push_source(config.push.clone()).map_err(flag_error)?;
    let scrape = ScrapeEngineSource::new(config.scrape.clone()).map_err(flag_error)?;
    let engines = NodeEngineSource::new(
        scrape,
        push_engines,
        fake_engines,
        config.engines.clone(),
        node_pods,
        limits.clone(),
        stats.clone(),
    );
    Ok(NodeSources {
        gpus,
        pods,
        engines,
        push,
        limits,
    })
}

/// A Kubernetes client when `mode` allows and a configuration is found.
pub(crate) async fn connect_kubernetes(mode: KubernetesMode) -> Option<kube::Client> {
    if mode == KubernetesMode::Off {
        tracing::info!(
            "Kubernetes API off (--kubernetes off): engines from --engine flags only, no readiness gates"
        );
        return None;
    }
    match kube::Config::infer().await {
        Ok(config) => match kube::Client::try_from(config) {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build a Kubernetes client: engine discovery from pod annotations and readiness gates are off");
                None
            }
        },
        Err(e) => {
            tracing::info!(reason = %e, "no Kubernetes API configuration (not in a cluster, no kubeconfig): engines from --engine flags only, no readiness gates");
            None
        }
    }
}

/// A started node agent: the agent itself and the node's own tasks.
#[derive(Debug)]
pub struct RunningNode {
    agent: RunningAgent,
    stats: Arc<NodeStats>,
    limits: LimitsHandle,
    serving_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl RunningNode {
    pub fn handle(&self) -> &AgentHandle {
        self.agent.handle()
    }
    /// Where `/metrics` and `/healthz` are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.agent.metrics_addr()
    }
    /// The bound TCP address of the ServingService, when it listens on TCP.
    pub fn serving_addr(&self) -> Option<SocketAddr> {
        self.serving_addr
    }
    /// The counters of the node's sources.
    pub fn stats(&self) -> &Arc<NodeStats> {
        &self.stats
    }
    /// Batch limits and drains as the scaler set them.
    pub fn limits(&self) -> &LimitsHandle {
        &self.limits
    }
    /// Stops the node's tasks and the agent, and waits for all of them.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        self.shutdown.send_replace(true);
        let mut first_error = None;
        for (task, join) in self.tasks {
            if let Err(e) = join.await
                && !e.is_cancelled()
            {
                first_error.get_or_insert(AgentError::Task {
                    task,
                    message: e.to_string(),
                });
            }
        }
        let agent = self.agent.shutdown().await;
        match first_error {
            Some(e) => Err(e),
            None => agent,
        }
    }
}

/// Starts the agent on a node: the sources of `node`, the exporter, the
/// ServingService, and, with a Kubernetes client, the pod watch and the
/// readiness-gate writer.
pub async fn start_node(
    mut config: AgentConfig,
    node: NodeConfig,
    kube: Option<kube::Client>,
) -> Result<RunningNode, AgentError> {
    node.validate()?;
    config.validate()?;
    let stats = Arc::new(NodeStats::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks: Vec<(&'static str, JoinHandle<()>)> = Vec::new();
    let node_pods = kube.as_ref().map(|client| {
        let (rx, task) = watch_node_pods(
            client.clone(),
            config.node_name.clone(),
            stats.clone(),
            shutdown_rx.clone(),
        );
        tasks.push(("pod watch", task));
        rx
    });
    let sources = build_sources(&node, config.node_name.as_str(), node_pods.clone(), &stats)?;
    config.nvml_available = sources.gpus.nvml_available();
    config.pod_resources_available = node
        .pod_resources
        .as_ref()
        .is_some_and(|p| p.socket_path.exists());
    let mut serving_addr = None;
    if let Some(addr) = &node.serving {
        let (bound, task) = serve_push(addr, sources.push.clone(), shutdown_rx.clone()).await?;
        serving_addr = bound;
        tasks.push(("serving", task));
    }
    let targets = sources.engines.targets();
    let http = sources.engines.http_client();
    let limits = sources.limits.clone();
    let hostname = config.node_name.as_str().to_string();
    let agent = Agent::new(config, sources.gpus, sources.pods, sources.engines)?;
    let mut metrics = AgentMetrics::new();
    metrics.register_collector(Box::new(NodeExporter::new(
        agent.samples(),
        hostname,
        stats.clone(),
    )));
    let agent = agent.with_metrics(metrics);
    let running = agent.start().await?;
    let handle = running.handle().clone();
    tasks.push((
        "directives",
        tokio::spawn(apply_directives(
            handle.directives(),
            limits.clone(),
            BatchLimits::Apply,
            shutdown_rx.clone(),
        )),
    ));
    if let (Some(client), Some(pods)) = (kube, node_pods) {
        let writer = ReadinessWriter {
            config: node.readiness.clone(),
            client,
            http,
            pods,
            samples: handle.samples(),
            directives: handle.directives(),
            targets,
            clock: Clock::start(),
            stats: stats.clone(),
            shutdown: shutdown_rx.clone(),
            seed: handle.boot_epoch(),
        };
        tasks.push(("readiness-gate writer", tokio::spawn(writer.run())));
    }
    Ok(RunningNode {
        agent: running,
        stats,
        limits,
        serving_addr,
        shutdown: shutdown_tx,
        tasks,
    })
}

/// Whether [`apply_directives`] applies batch limits too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchLimits {
    /// Engines that push read their limit from the ServingService.
    Apply,
    /// A simulated engine's batch limits are its driver's to apply.
    Skip,
}

/// Keeps the push path's limits (WatchLimits subscribers, the Draining
/// state of engines) equal to what the scaler asked.
pub(crate) async fn apply_directives(
    mut directives: watch::Receiver<NodeDirectives>,
    limits: LimitsHandle,
    batch_limits: BatchLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut applied = NodeDirectives::default();
    loop {
        let current = directives.borrow_and_update().clone();
        for pod in applied.draining.keys() {
            if !current.draining.contains_key(pod) {
                limits.set_draining(pod, false);
            }
        }
        for pod in current.draining.keys() {
            limits.set_draining(pod, true);
        }
        if batch_limits == BatchLimits::Apply {
            for pod in applied.batch_limits.keys() {
                if !current.batch_limits.contains_key(pod) {
                    limits.set_batch_limit(pod, None);
                }
            }
            for (pod, limit) in &current.batch_limits {
                limits.set_batch_limit(pod, Some(*limit));
            }
        }
        applied = current;
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            changed = directives.changed() => if changed.is_err() { return },
        }
    }
}

/// Serves the ServingService on a unix socket or TCP.
async fn serve_push(
    addr: &ServingAddr,
    service: PushService,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(Option<SocketAddr>, JoinHandle<()>), AgentError> {
    let listen_error = |addr: String, source: std::io::Error| AgentError::Listen {
        what: "the ServingService (--serving-addr)",
        addr,
        source,
    };
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let router = tonic::transport::Server::builder().add_service(service.into_server());
    match addr {
        ServingAddr::Unix(path) => {
            use std::os::unix::fs::FileTypeExt;
            let shown = format!("unix:{}", path.display());
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(listen_error(
                        shown,
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "the path exists and is not a socket",
                        ),
                    ));
                }
                // A socket left by an earlier run.
                std::fs::remove_file(path).map_err(|e| listen_error(shown.clone(), e))?;
            }
            let listener =
                tokio::net::UnixListener::bind(path).map_err(|e| listen_error(shown.clone(), e))?;
            // Request proxies in inference pods run as other users: who may
            // connect is decided by who may mount the socket's directory.
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                    .map_err(|e| listen_error(shown.clone(), e))?;
            }
            tracing::info!(addr = %shown, "ServingService listening");
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let task = tokio::spawn(async move {
                if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                    tracing::error!(error = %e, "ServingService failed");
                }
            });
            Ok((None, task))
        }
        ServingAddr::Tcp(a) => {
            let listener = tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| listen_error(a.to_string(), e))?;
            let bound = listener.local_addr().ok();
            tracing::info!(addr = ?bound, "ServingService listening");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let task = tokio::spawn(async move {
                if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                    tracing::error!(error = %e, "ServingService failed");
                }
            });
            Ok((bound, task))
        }
    }
}

/// Samples every source of `node` once: GPUs (twice, `gpm_gap` apart, when
/// a GPU reports GPM metrics, which need two samples), the GPU-to-pod
/// assignment, then the engines. With a Kubernetes client, engines are
/// also discovered from one listing of the node's pods.
pub async fn sample_once(
    node_name: &NodeName,
    node: &NodeConfig,
    kube: Option<kube::Client>,
    gpm_gap: Duration,
) -> Result<NodeSnapshot, AgentError> {
    sample_once_report(node_name, node, kube, gpm_gap)
        .await
        .map(|r| r.snapshot)
}

/// What `--once` prints: the snapshot, and beside it what the snapshot
/// cannot say: why each engine failed or reads no data (or what was wrong
/// inside its scrape), and how old the GPU-to-pod attribution is.
#[derive(Debug, Clone, PartialEq)]
pub struct OnceReport {
    pub snapshot: NodeSnapshot,
    pub engines: BTreeMap<PodRef, EngineReport>,
    /// `None` when attribution comes from no kubelet (off, or simulated).
    pub attribution: Option<AttributionReport>,
}

/// Why an engine is not read well.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct EngineReport {
    /// Why its scrape failed, or why it reads no data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Problems inside a scrape that was read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The GPU-to-pod attribution as `--once` got it from the kubelet.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AttributionReport {
    pub source: &'static str,
    /// Whether the kubelet answered.
    pub available: bool,
    /// Seconds since the kubelet answered (`None`: it did not).
    pub age_seconds: Option<f64>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// [`sample_once`], with what the snapshot cannot carry ([`OnceReport`]).
/// The kubelet gets one call's deadline to answer.
pub async fn sample_once_report(
    node_name: &NodeName,
    node: &NodeConfig,
    kube: Option<kube::Client>,
    gpm_gap: Duration,
) -> Result<OnceReport, AgentError> {
    node.validate()?;
    let stats = Arc::new(NodeStats::default());
    let mut pods_tx = None;
    if let Some(client) = kube {
        match list_node_pods(client, node_name, Duration::from_secs(10)).await {
            Ok(pods) => {
                tracing::info!(pods = pods.pods.len(), "listed this node's pods");
                pods_tx = Some(watch::channel(Arc::new(pods)));
            }
            Err(e) => tracing::warn!(error = %e,
                "cannot list this node's pods: engines from --engine flags only"),
        }
    }
    let node_pods = pods_tx.as_ref().map(|(_, rx)| rx.clone());
    let mut sources = build_sources(node, node_name.as_str(), node_pods, &stats)?;
    let clock = Clock::start();
    let mut errors = 0u64;
    let mut gpus = first_or_log(
        "gpus",
        sources.gpus.sample_gpus(clock.now()).await,
        &mut errors,
    );
    if sources.gpus.nvml_available() && gpus.iter().any(|g| g.info.gpm_supported) {
        tokio::time::sleep(gpm_gap).await;
        gpus = first_or_log(
            "gpus",
            sources.gpus.sample_gpus(clock.now()).await,
            &mut errors,
        );
    }
    if let Some(reason) = sources.gpus.unavailable_reason() {
        tracing::warn!(reason = %reason, "no-GPU mode: the snapshot has no GPUs");
    }
    let now = clock.now();
    if let Some(p) = &node.pod_resources {
        sources
            .pods
            .first_attempt(p.call_timeout + Duration::from_millis(500))
            .await;
    }
    let pods = first_or_log("pods", sources.pods.list_pod_gpus(now).await, &mut errors);
    let engines = first_or_log(
        "engines",
        sources.engines.sample_engines(clock.now(), &pods).await,
        &mut errors,
    );
    let snapshot = NodeSnapshot {
        node: node_name.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        sampled_at: now,
        sample_interval_ms: u32::try_from(gpm_gap.as_millis()).unwrap_or(u32::MAX),
        gpus,
        pods,
        engines,
        agent: AgentHealth {
            samples_total: 1,
            sample_errors_total: errors,
            reconnects_total: 0,
            coalesced_total: 0,
            nvml_available: sources.gpus.nvml_available(),
            pod_resources_available: sources.pods.available(),
        },
    };
    let engine_reports = snapshot
        .engines
        .iter()
        .filter_map(|e| {
            let (error, warnings) = sources.engines.problems(&e.pod);
            (error.is_some() || !warnings.is_empty())
                .then(|| (e.pod.clone(), EngineReport { error, warnings }))
        })
        .collect();
    let attribution = sources.pods.attribution().map(|a| AttributionReport {
        source: "kubelet",
        available: a.available,
        age_seconds: a.age().map(|d| d.as_secs_f64()),
        error: if a.attempts == 0 {
            Some("no call finished within the deadline".into())
        } else {
            a.error.clone()
        },
    });
    drop(pods_tx);
    Ok(OnceReport {
        snapshot,
        engines: engine_reports,
        attribution,
    })
}

/// The `--once` report as `--output` asks: the snapshot's fields, each
/// engine with its `error` and `warnings` where it has any, and
/// `attribution` (see [`render_snapshot`] for histogram bounds).
pub fn render_once(report: &OnceReport, format: OutputFormat) -> Result<String, AgentError> {
    let task = "rendering the snapshot";
    let fail = |message: String| AgentError::Task { task, message };
    let engine_extras: Vec<(&PodRef, serde_json::Value)> = report
        .engines
        .iter()
        .map(|(pod, r)| serde_json::to_value(r).map(|v| (pod, v)))
        .collect::<Result<_, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let attribution = serde_json::to_value(&report.attribution).map_err(|e| fail(e.to_string()))?;
    match format {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(&report.snapshot).map_err(|e| fail(e.to_string()))?;
            infinite_bounds_as_text(&mut v);
            if let Some(engines) = v.get_mut("engines").and_then(|e| e.as_array_mut()) {
                for e in engines {
                    let pod: Option<PodRef> = serde_json::from_value(e["pod"].clone()).ok();
                    let extra = engine_extras.iter().find(|(p, _)| Some(*p) == pod.as_ref());
                    if let (Some(obj), Some((_, extra))) = (e.as_object_mut(), extra)
                        && let Some(fields) = extra.as_object()
                    {
                        obj.extend(fields.clone());
                    }
                }
            }
            if let Some(obj) = v.as_object_mut() {
                obj.insert("attribution".into(), attribution);
            }
            serde_json::to_string_pretty(&v).map_err(|e| fail(e.to_string()))
        }
        OutputFormat::Yaml => {
            let mut v = serde_yaml::to_value(&report.snapshot).map_err(|e| fail(e.to_string()))?;
            let to_yaml = |j: &serde_json::Value| serde_yaml::to_value(j);
            if let Some(engines) = v.get_mut("engines").and_then(|e| e.as_sequence_mut()) {
                for e in engines {
                    let pod: Option<PodRef> = e
                        .get("pod")
                        .cloned()
                        .and_then(|p| serde_yaml::from_value(p).ok());
                    let extra = engine_extras.iter().find(|(p, _)| Some(*p) == pod.as_ref());
                    if let (Some(map), Some((_, extra))) = (e.as_mapping_mut(), extra)
                        && let Ok(serde_yaml::Value::Mapping(fields)) = to_yaml(extra)
                    {
                        map.extend(fields);
                    }
                }
            }
            if let Some(map) = v.as_mapping_mut() {
                map.insert(
                    "attribution".into(),
                    to_yaml(&attribution).map_err(|e| fail(e.to_string()))?,
                );
            }
            serde_yaml::to_string(&v).map_err(|e| fail(e.to_string()))
        }
    }
}

fn first_or_log<T: Default>(
    source: &str,
    r: Result<T, gpuscale_telemetry::SourceError>,
    errors: &mut u64,
) -> T {
    r.unwrap_or_else(|e| {
        *errors += 1;
        tracing::warn!(source, kind = e.kind, error = %e, "source failed; reported empty");
        T::default()
    })
}

/// The snapshot as `--output` asks.
///
/// JSON has no infinity, and serde writes `f64::INFINITY` as `null`: the
/// last bound of every histogram (always `+Inf`) is written as the string
/// `"+Inf"`, as Prometheus spells it. YAML writes `.inf`.
pub fn render_snapshot(
    snapshot: &NodeSnapshot,
    format: OutputFormat,
) -> Result<String, AgentError> {
    let rendered = match format {
        OutputFormat::Json => serde_json::to_value(snapshot)
            .and_then(|mut v| {
                infinite_bounds_as_text(&mut v);
                serde_json::to_string_pretty(&v)
            })
            .map_err(|e| e.to_string()),
        OutputFormat::Yaml => serde_yaml::to_string(snapshot).map_err(|e| e.to_string()),
    };
    rendered.map_err(|message| AgentError::Task {
        task: "rendering the snapshot",
        message,
    })
}

/// Replaces the `null`s of histogram `bounds` arrays (infinite bounds;
/// histograms never hold NaN bounds) with `"+Inf"`.
fn infinite_bounds_as_text(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    serde_json::Value::Array(items) if key == "bounds" => {
                        for b in items.iter_mut().filter(|b| b.is_null()) {
                            *b = serde_json::Value::from("+Inf");
                        }
                    }
                    other => infinite_bounds_as_text(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(infinite_bounds_as_text),
        _ => {}
    }
}

/// `gpuscale agent`: with `--once`, prints one snapshot and returns;
/// otherwise runs until `shutdown` completes.
pub async fn run(
    args: &AgentArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    if args.node.once {
        let fake = args
            .fake_config
            .as_ref()
            .map(|p| crate::config::load_fake_config(p))
            .transpose()?;
        let node_name = args.resolved_node_name()?;
        let node = args.node.to_node_config(fake)?;
        let kube = connect_kubernetes(node.kubernetes).await;
        let gap = args
            .interval
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        let report = sample_once_report(&node_name, &node, kube, gap).await?;
        let mut text = render_once(&report, args.node.output)?;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let mut out = std::io::stdout().lock();
        return match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            // The reader went away (`| head`): the rest is not wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
        .map_err(|e| AgentError::Task {
            task: "writing the snapshot to stdout",
            message: e.to_string(),
        });
    }
    let (config, fake) = args.to_config()?;
    let node = args.node.to_node_config(fake)?;
    let kube = connect_kubernetes(node.kubernetes).await;
    let running = start_node(config, node, kube).await?;
    shutdown.await;
    running.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(args: &[&str]) -> Result<AgentArgs, clap::Error> {
        let mut all = vec!["gpuscale-agent"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.agent)
    }

    #[test]
    fn once_needs_no_scaler_and_the_stream_does() {
        let a = parse(&["--once", "--node-name", "n1"]).expect("valid");
        assert!(a.node.once && a.scaler.is_none());
        let e = parse(&["--node-name", "n1"]).expect_err("no scaler");
        assert!(e.to_string().contains("--scaler"), "{e}");
    }

    #[test]
    fn node_flags_become_a_validated_config() {
        let a = parse(&[
            "--scaler",
            "http://s:7070",
            "--engine",
            "llm/v-0=vllm=http://127.0.0.1:8000/metrics",
            "--engine",
            "sglang=http://127.0.0.1:30000/metrics",
            "--pod-resources-socket",
            "off",
            "--serving-addr",
            "unix:/run/gpuscale/serving.sock",
            "--warmup",
            "health",
        ])
        .expect("valid");
        let c = a.node.to_node_config(None).expect("valid");
        assert_eq!(c.engines.len(), 2);
        assert_eq!(c.pod_resources, None);
        assert_eq!(
            c.serving,
            Some(ServingAddr::Unix(PathBuf::from(
                "/run/gpuscale/serving.sock"
            )))
        );
        assert_eq!(c.readiness.warmup.mode, WarmupMode::Health);
    }

    #[test]
    fn bad_node_flags_name_the_flag_the_value_and_what_is_allowed() {
        let cases: &[(&[&str], &str)] = &[
            (&["--engine", "vllm=ftp://x/metrics"], "--engine"),
            (&["--scrape-timeout", "5m"], "--scrape-timeout"),
            (&["--scrape-max-bytes", "12"], "--scrape-max-bytes"),
            (&["--serving-addr", "unix:relative.sock"], "--serving-addr"),
            (&["--serving-addr", "nowhere"], "--serving-addr"),
            (&["--nvml-slow-interval", "10ms"], "--nvml-slow-interval"),
            (&["--readiness-gate", "not a gate"], "--readiness-gate"),
            (&["--warmup-path", "v1/completions"], "--warmup-path"),
            (
                &[
                    "--engine",
                    "vllm=http://127.0.0.1:1/metrics",
                    "--engine",
                    "vllm=http://127.0.0.1:1/other",
                ],
                "--engine",
            ),
        ];
        for (flags, flag) in cases {
            let mut all = vec!["--once"];
            all.extend_from_slice(flags);
            let a = parse(&all).expect("parses");
            let e = a.node.to_node_config(None).expect_err("invalid");
            assert!(e.is_config(), "{e}");
            assert!(e.to_string().contains(flag), "{flags:?}: {e}");
        }
        let e = parse(&["--once", "--warmup", "sometimes"]).expect_err("not a mode");
        assert!(e.to_string().contains("completion"), "{e}");
    }

    #[tokio::test]
    async fn the_serving_socket_admits_other_users() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serving.sock");
        let (service, _source, _limits) = push_source(PushConfig::default()).expect("valid");
        let (stop, rx) = watch::channel(false);
        let (_, task) = serve_push(&ServingAddr::Unix(path.clone()), service, rx)
            .await
            .expect("listens");
        let mode = std::fs::metadata(&path)
            .expect("the socket")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o666,
            "a proxy running as another user may connect"
        );
        stop.send_replace(true);
        task.await.expect("stops");
    }
}
