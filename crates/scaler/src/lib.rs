//! The gpuscale scaler.
//!
//! Ingests the agents' streams (handlers validate, convert and hand over to
//! one task that owns all state), keeps short windows per node, GPU, pod and
//! model, asks a decider for each configured workload every tick, acts on
//! non-advisory decisions through an [`Actuator`], and publishes a read-only
//! [`StateView`] for every reader, plus `/metrics`, `/healthz`, `/readyz`,
//! gRPC health and reflection, and the public APIs ([`api`]: the
//! `ScalerService` recommendations and KEDA's external scaler).
//!
//! Not for: talking to Kubernetes (an [`Actuator`] implementation does),
//! reading GPUs or engines (agents do), the decision math (the policy crate).
//!
//! # Running one in-process
//!
//! ```no_run
//! # async fn example() -> Result<(), gpuscale_scaler::ScalerError> {
//! use gpuscale_scaler::{Scaler, ScalerConfig};
//!
//! let config = ScalerConfig::new("127.0.0.1:0".parse().expect("address"));
//! let running = Scaler::new(config).start().await?;
//! let url = format!("http://{}", running.grpc_addr()); // for agents
//! let mut view = running.handle().view();              // watch::Receiver<Arc<StateView>>
//! view.changed().await.ok();
//! println!("{} nodes", view.borrow().nodes.len());
//! running.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! **Architecture invariants.** One task owns all state ([`state`]); it
//! applies commands from one bounded queue and never awaits an agent. gRPC
//! stream tasks own only their stream ([`ingest`]). Readers get
//! `Arc<StateView>` through a `watch` channel: no lock is held across an
//! `.await`. Windows ([`window`]), observation assembly ([`observe`]) and the
//! proportional decider are pure and take time as an argument.

pub mod actuate;
pub mod api;
pub mod complete;
pub mod config;
pub mod config_file;
pub mod decide;
pub mod edge;
pub mod error;
mod export;
mod http;
pub mod ingest;
pub mod metrics;
pub mod observe;
pub mod seed;
pub mod slo;
mod state;
pub mod view;
pub mod zero;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use gpuscale_core::WorkloadRef;
use gpuscale_proto::v1::agent_service_server::AgentServiceServer;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::service::Routes;

pub use actuate::{ActuateFuture, Actuator, DrainSink, LoggingActuator, Plan};
pub use config::{PersistedDecision, ScalerArgs, ScalerConfig, ScalerFile, WorkloadDef};
pub use decide::{Decider, build_decider};
pub use error::ScalerError;
pub use gpuscale_observe::{ClusterReplica, TargetObservation};
pub use gpuscale_policy::proportional::ProportionalDecider;
pub use gpuscale_rt::Clock;
pub use http::OPENMETRICS_CONTENT_TYPE;
pub use metrics::ScalerMetrics;
pub use view::{EngineView, GpuView, NodeView, StateView, WorkloadView};

/// An agent whose clock is further than this from the scaler's (as measured
/// per boot epoch) is reported as skewed; a report further than this from
/// its receive time is clamped. Milliseconds.
pub const AGENT_CLOCK_SKEW_BOUND_MS: i64 = state::SKEW_BOUND_MS;

use crate::decide::WorkloadRegistry;
use crate::ingest::Ingest;
use crate::state::{Command, State, StateConfig};

/// Adds extra gRPC services (the public APIs) to the scaler's port: gets the
/// handle and the scaler's own routes, returns them with its services added
/// (`routes.add_service(...)`).
pub(crate) type ServiceBuilder = Box<dyn FnOnce(&ScalerHandle, Routes) -> Routes + Send>;

/// A scaler to start: configuration, actuator, optional extra services.
///
/// Its channels exist from [`Scaler::new`] on, so what an actuator needs is
/// there before the actuator is built: [`Scaler::handle`] and
/// [`Scaler::drain_sink`].
pub struct Scaler {
    config: ScalerConfig,
    handle: ScalerHandle,
    commands_rx: mpsc::Receiver<Command>,
    view_tx: watch::Sender<Arc<StateView>>,
    actuator: Option<Arc<dyn Actuator>>,
    clock: Option<Clock>,
    services: Option<ServiceBuilder>,
    active: Option<watch::Receiver<bool>>,
    auth_backend: Option<Arc<dyn edge::AuthBackend>>,
}

impl std::fmt::Debug for Scaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaler")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Scaler {
    /// A scaler acting through a [`LoggingActuator`] (standalone) unless
    /// [`Scaler::with_actuator`] gives another.
    pub fn new(config: ScalerConfig) -> Self {
        // A zero-sized queue is refused by `start` (validation); the channel
        // itself needs one slot.
        let (commands_tx, commands_rx) = mpsc::channel(config.ingest_queue.max(1));
        let (view_tx, view_rx) = watch::channel(Arc::new(StateView::default()));
        let registry: WorkloadRegistry = config
            .workloads
            .iter()
            .map(|w| (w.workload.clone(), Arc::new(w.clone())))
            .collect();
        let (registry_tx, _) = watch::channel(Arc::new(registry));
        let handle = ScalerHandle {
            activators: zero::Activators::default(),
            commands: commands_tx,
            view: view_rx,
            metrics: Arc::new(ScalerMetrics::new()),
            registry: Arc::new(registry_tx),
        };
        Self {
            config,
            handle,
            commands_rx,
            view_tx,
            actuator: None,
            clock: None,
            services: None,
            active: None,
            auth_backend: None,
        }
    }

    /// Where identities and permissions come from in
    /// [`edge::AuthMode::Kubernetes`] (TokenReview, SubjectAccessReview).
    pub fn with_auth_backend(mut self, backend: Arc<dyn edge::AuthBackend>) -> Self {
        self.auth_backend = Some(backend);
        self
    }

    /// Act only while `active` is true (leader election: only the leader
    /// acts). While it is false the scaler is a standby: nothing is decided
    /// and in-flight actuations stop, `/readyz` answers 503 (so a Service
    /// routes agents to the active replica only), new agent streams are
    /// refused and open ones are ended with `UNAVAILABLE` (the agents
    /// reconnect, through the Service, to the active replica).
    pub fn with_active(mut self, active: watch::Receiver<bool>) -> Self {
        self.active = Some(active);
        self
    }

    /// Act through `actuator` (the Kubernetes controller), built with
    /// [`Scaler::drain_sink`] and [`Scaler::handle`].
    pub fn with_actuator(mut self, actuator: Arc<dyn Actuator>) -> Self {
        self.actuator = Some(actuator);
        self
    }

    /// The scaler's handle, usable before [`Scaler::start`] (requests queue
    /// until the state task runs).
    pub fn handle(&self) -> &ScalerHandle {
        &self.handle
    }

    /// Where an actuator sends its drains (see [`actuate`]): to be given to
    /// the actuator when it is built.
    pub fn drain_sink(&self) -> DrainSink {
        DrainSink::new(self.handle.commands.clone(), self.handle.view.clone())
    }

    /// Use `clock` instead of the system clock (simulations).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Serve more gRPC services on the scaler's port: `build` gets the
    /// handle (for the state view) and the scaler's [`Routes`], and returns
    /// them with its own services added.
    pub fn with_services(
        mut self,
        build: impl FnOnce(&ScalerHandle, Routes) -> Routes + Send + 'static,
    ) -> Self {
        self.services = Some(Box::new(build));
        self
    }

    /// Binds the listeners and starts every task on the current runtime.
    pub async fn start(self) -> Result<RunningScaler, ScalerError> {
        let actuator = match self.actuator.clone() {
            Some(a) => a,
            None => Arc::new(LoggingActuator::new(self.drain_sink())),
        };
        let config = self.config;
        config.validate()?;
        let clock = self.clock.unwrap_or_else(Clock::start);
        let handle = self.handle;
        let metrics = handle.metrics.clone();
        let auth = Arc::new(edge::authenticator(
            &config.auth,
            self.auth_backend.clone(),
            clock,
            metrics.clone(),
        )?);
        let tls = match &config.transport {
            edge::Transport::Tls(tls) => Some((edge::tls::server_tls(tls)?, tls.clone())),
            edge::Transport::Plaintext => None,
        };
        let (listener, grpc_addr, http_listener, http_addr) = bind(&config).await?;

        let commands_tx = handle.commands.clone();
        let commands_rx = self.commands_rx;
        let view_tx = self.view_tx;
        view_tx.send_replace(Arc::new(StateView {
            published_at: clock.now(),
            ..StateView::default()
        }));
        let view_rx = handle.view.clone();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (serving_tx, serving_rx) = watch::channel(false);
        let registry_rx = handle.registry.subscribe();
        let mut tasks: Vec<(&'static str, JoinHandle<()>)> = Vec::new();

        tasks.push((
            "state",
            spawn_state(&config, &metrics, commands_rx, view_tx, clock, &shutdown_rx),
        ));
        let decide = decide::DecideLoop::new(
            registry_rx,
            self.active.clone(),
            view_rx.clone(),
            commands_tx.clone(),
            actuator,
            clock,
            config.tick,
            metrics.clone(),
            shutdown_rx.clone(),
        )
        .with_warmup(config.warmup)
        .with_min_reporting_share(config.min_reporting_share)
        .with_expected_nodes(config.expected_nodes.clone())
        .with_replica_horizon((config.node_ttl * 10).max(Duration::from_secs(300)))
        .with_activators(handle.activators.clone());
        tasks.push(("decide", tokio::spawn(decide.run())));
        tasks.push((
            "workload metrics",
            tokio::spawn(export::run(
                view_rx.clone(),
                handle.registry.subscribe(),
                commands_tx.downgrade(),
                metrics.clone(),
                shutdown_rx.clone(),
            )),
        ));
        if let Some(task) = active_gauge(self.active.clone(), &metrics, &shutdown_rx) {
            tasks.push(("active gauge", task));
        }

        let ingest = Ingest {
            commands: commands_tx,
            metrics: metrics.clone(),
            ingest_wait: config.ingest_wait,
            stream_outbound: config.stream_outbound,
            max_message_bytes: config.max_message_bytes,
            next_stream: Arc::new(AtomicU64::new(1)),
            shutdown: shutdown_rx.clone(),
            active: self.active.clone(),
            auth: auth.clone(),
            clock,
            report_rate: config.peers.agent_reports_per_second,
        };
        let health = tonic_health::server::HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            edge::EdgeHealth::new(health.clone(), shutdown_rx.clone()),
        );
        health.set_serving::<AgentServiceServer<Ingest>>().await;
        let (reflection, reflection_v1alpha) = reflection()?;
        let mut routes = Routes::new(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                AgentServiceServer::new(ingest).max_decoding_message_size(config.max_message_bytes),
            );
        routes = api::serve(
            routes,
            &handle,
            config.api,
            shutdown_rx.clone(),
            &health,
            auth.clone(),
            config.max_message_bytes,
        )
        .await;
        if let Some(build) = self.services {
            routes = build(&handle, routes);
        }
        tasks.extend(serve_grpc(
            routes,
            listener,
            tls,
            &config,
            auth.clone(),
            &metrics,
            &shutdown_rx,
        ));
        serving_tx.send_replace(true);

        if let Some(listener) = http_listener {
            let state = http::HttpState {
                metrics: metrics.clone(),
                view: view_rx.clone(),
                serving: serving_rx,
                active: self.active.clone(),
                clock,
            };
            tasks.push((
                "metrics server",
                serve_http(listener, state, shutdown_rx.clone()),
            ));
        }
        tracing::info!(grpc = %grpc_addr, tls = matches!(config.transport, edge::Transport::Tls(_)), auth = ?config.auth.mode, metrics = ?http_addr, workloads = config.workloads.len(), node_ttl_s = config.node_ttl.as_secs_f64(), "scaler serving");
        Ok(RunningScaler {
            grpc_addr,
            http_addr,
            handle,
            health,
            serving: serving_tx,
            shutdown: shutdown_tx,
            tasks,
        })
    }
}

/// The gRPC listener and its address, and the metrics listener and its
/// address when one is configured.
async fn bind(
    config: &ScalerConfig,
) -> Result<
    (
        tokio::net::TcpListener,
        SocketAddr,
        Option<tokio::net::TcpListener>,
        Option<SocketAddr>,
    ),
    ScalerError,
> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ScalerError::Bind {
            what: "gRPC",
            addr: config.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| ScalerError::Bind {
        what: "gRPC",
        addr: config.listen,
        source,
    })?;
    let http_listener = match config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ScalerError::Bind {
                    what: "metrics",
                    addr,
                    source,
                })?,
        ),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    Ok((listener, grpc_addr, http_listener, http_addr))
}

/// Keeps the active gauge equal to `active` (none to keep: always active).
fn active_gauge(
    active: Option<watch::Receiver<bool>>,
    metrics: &Arc<ScalerMetrics>,
    shutdown: &watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    let Some(mut active) = active else {
        metrics.set_active(true);
        return None;
    };
    let metrics = metrics.clone();
    let mut stop = shutdown.clone();
    Some(tokio::spawn(async move {
        loop {
            metrics.set_active(*active.borrow_and_update());
            tokio::select! {
                _ = stopped(&mut stop) => break,
                changed = active.changed() => if changed.is_err() { break },
            }
        }
    }))
}

/// gRPC reflection, v1 and v1alpha (older grpcurl and grpcio-reflection
/// clients speak only v1alpha): it advertises what the port serves (the
/// descriptor set also holds the agent's ServingService and the kubelet's
/// API).
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ScalerError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(gpuscale_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(gpuscale_proto::v1::agent_service_server::SERVICE_NAME)
            .with_service_name(gpuscale_proto::v1::scaler_service_server::SERVICE_NAME)
            .with_service_name(gpuscale_proto::v1::activator_service_server::SERVICE_NAME)
            .with_service_name(gpuscale_proto::externalscaler::external_scaler_server::SERVICE_NAME)
            .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
            .with_service_name(
                tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
            )
    };
    let v1 = builder()
        .build_v1()
        .map_err(|e| ScalerError::Serve(format!("reflection: {e}")))?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| ScalerError::Serve(format!("reflection: {e}")))?;
    Ok((v1, v1alpha))
}

/// Serves `routes` on `listener` behind the edge (authentication, per-peer
/// limits, TLS when configured, its certificate reloaded) until `shutdown`:
/// the server's task and the reload's.
fn serve_grpc(
    routes: Routes,
    listener: tokio::net::TcpListener,
    tls: Option<(edge::tls::ServerTls, edge::tls::TlsConfig)>,
    config: &ScalerConfig,
    auth: Arc<edge::Authenticator>,
    metrics: &Arc<ScalerMetrics>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<(&'static str, JoinHandle<()>)> {
    let mut tasks = Vec::new();
    let edge = Arc::new(edge::Edge {
        auth,
        peers: Arc::new(edge::PeerLimits::new(config.peers)),
        max_message_bytes: config.max_message_bytes,
    });
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Headers are small; a client cannot make the scaler buffer more.
        .http2_max_header_list_size(Some(16 * 1024))
        .max_concurrent_streams(Some(
            u32::try_from(config.peers.max_streams.saturating_add(64)).unwrap_or(u32::MAX),
        ))
        .layer(edge::EdgeLayer(edge))
        .add_routes(routes);
    let mut stop = shutdown.clone();
    let acceptor = tls
        .as_ref()
        .map(|(t, c)| (t.acceptor.clone(), c.handshake_timeout));
    let incoming = edge::conn::incoming(
        listener,
        acceptor,
        config.conn,
        metrics.clone(),
        shutdown.clone(),
    );
    if let Some((t, c)) = tls {
        tasks.push((
            "certificate reload",
            tokio::spawn(edge::tls::watch_files(
                c,
                t.store,
                metrics.clone(),
                shutdown.clone(),
            )),
        ));
    }
    tasks.push((
        "gRPC server",
        tokio::spawn(async move {
            let serve = router.serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }),
    ));
    tasks
}

/// The task that owns all state, its first view (the configured workloads,
/// so a request right after start is `UNAVAILABLE`, never `NOT_FOUND`)
/// already published.
fn spawn_state(
    config: &ScalerConfig,
    metrics: &Arc<ScalerMetrics>,
    commands: mpsc::Receiver<Command>,
    view_tx: watch::Sender<Arc<StateView>>,
    clock: Clock,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut state = State::new(
        StateConfig {
            window: config.window,
            node_ttl: config.node_ttl,
        },
        metrics.clone(),
        config
            .workloads
            .iter()
            .map(|w| (w.workload.clone(), w.labels.clone())),
    );
    view_tx.send_replace(state.publish(clock.now()));
    tokio::spawn(state::run(
        state,
        commands,
        view_tx,
        clock,
        shutdown.clone(),
    ))
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
fn serve_http(
    listener: tokio::net::TcpListener,
    state: http::HttpState,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let router = http::router(state);
    tokio::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "metrics server failed");
        }
    })
}

/// A started scaler.
#[derive(Debug)]
pub struct RunningScaler {
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    handle: ScalerHandle,
    health: tonic_health::server::HealthReporter,
    serving: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

/// How long shutdown waits for the servers to close their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl RunningScaler {
    /// The bound gRPC address (agents connect to `http://{grpc_addr}`).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }
    /// The bound `/metrics` address, if served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }
    pub fn handle(&self) -> &ScalerHandle {
        &self.handle
    }
    /// The state view: the current value, then every publication.
    pub fn view(&self) -> watch::Receiver<Arc<StateView>> {
        self.handle.view()
    }

    /// Ends every agent stream with `UNAVAILABLE`, stops the servers and the
    /// tasks, and waits for them (servers at most a few seconds).
    pub async fn shutdown(self) -> Result<(), ScalerError> {
        self.serving.send_replace(false);
        self.health
            .set_not_serving::<AgentServiceServer<Ingest>>()
            .await;
        self.shutdown.send_replace(true);
        let mut first_error = None;
        for (task, mut join) in self.tasks {
            let joined = match tokio::time::timeout(SHUTDOWN_GRACE, &mut join).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(task, "did not stop within the grace period; aborting");
                    join.abort();
                    join.await
                }
            };
            if let Err(e) = joined
                && !e.is_cancelled()
            {
                first_error.get_or_insert(ScalerError::Task {
                    task,
                    message: e.to_string(),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone). Holds no
/// borrow of the channel when it returns, so it can sit in a `select!`
/// whose other branches await.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// What readers and actuators use: the state view, requests to agents and
/// the workload registry.
#[derive(Debug, Clone)]
pub struct ScalerHandle {
    activators: zero::Activators,
    commands: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<StateView>>,
    metrics: Arc<ScalerMetrics>,
    registry: Arc<watch::Sender<Arc<WorkloadRegistry>>>,
}

impl ScalerHandle {
    /// Decide for `def` from the next tick on. Registering a workload that
    /// is already registered replaces its definition and gives it a new
    /// decider (its history starts again).
    pub fn register_workload(&self, def: WorkloadDef) {
        let def = Arc::new(def);
        self.registry.send_modify(|r| {
            Arc::make_mut(r).insert(def.workload.clone(), def);
        });
    }

    /// Stop deciding for `workload`; returns whether it was registered.
    pub fn unregister_workload(&self, workload: &WorkloadRef) -> bool {
        let mut removed = false;
        self.registry.send_if_modified(|r| {
            removed = Arc::make_mut(r).remove(workload).is_some();
            removed
        });
        removed
    }

    /// The registered workloads.
    pub fn workloads(&self) -> Vec<WorkloadRef> {
        self.registry.borrow().keys().cloned().collect()
    }

    /// The registered definition of `workload` (labels, engines, decider).
    pub fn workload(&self, workload: &WorkloadRef) -> Option<Arc<WorkloadDef>> {
        self.registry.borrow().get(workload).cloned()
    }

    /// The state view: the current value, then every publication. Borrow
    /// briefly (`view.borrow().clone()`); never hold the borrow across `.await`.
    pub fn view(&self) -> watch::Receiver<Arc<StateView>> {
        self.view.clone()
    }
    /// The newest published view.
    pub fn current(&self) -> Arc<StateView> {
        self.view.borrow().clone()
    }
    pub fn metrics(&self) -> &Arc<ScalerMetrics> {
        &self.metrics
    }
    /// What the activators hold (scale from zero).
    pub fn activators(&self) -> &zero::Activators {
        &self.activators
    }
}

/// `gpuscale scaler`: runs until `shutdown` completes.
pub async fn run_from_args(
    args: &ScalerArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ScalerError> {
    let config = args.to_config()?;
    let running = Scaler::new(config).start().await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await
}
