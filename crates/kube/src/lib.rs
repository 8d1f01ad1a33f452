//! gpuscale on Kubernetes.
//!
//! The `InferenceAutoscaler` custom resource ([`crd`]), the controller that
//! watches it and the pods of its target ([`controller`]), the scaler's
//! [`Actuator`](gpuscale_scaler::Actuator) on Kubernetes ([`KubeActuator`]):
//! `/scale` with readiness gating and drain-before-delete ([`drain`]), never
//! fighting a user's edit of the replica count, status and Events
//! ([`status`], [`events`]), a finalizer so that drains never outlive a
//! deleted autoscaler ([`FINALIZER`]), and leader election over a
//! `coordination.k8s.io/v1` Lease ([`lease`]).
//!
//! Not for: deciding (the policy crate), ingesting agent streams (the
//! scaler crate), setting readiness gates (the agent does, on the scaler's
//! drain directives).
//!
//! # Running it
//!
//! [`KubeScaler`] composes a scaler with this crate: the scaler acts through
//! the [`KubeActuator`] and only while this replica leads; the controller
//! runs on the leader. `gpuscale scaler --kubernetes` is
//! [`run_from_args`].
//!
//! ```no_run
//! # async fn example(client: kube::Client) -> Result<(), gpuscale_kube::KubeError> {
//! use gpuscale_kube::{KubeConfig, KubeScaler, LeaseConfig};
//! use gpuscale_scaler::ScalerConfig;
//!
//! let mut config = KubeConfig::new();
//! config.lease = Some(LeaseConfig::new("gpuscale-system", "gpuscale-scaler", "scaler-0"));
//! let scaler = ScalerConfig::new("0.0.0.0:7070".parse().expect("address"));
//! let running = KubeScaler::new(client, config, scaler).start().await?;
//! // ... until shutdown:
//! running.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! **Architecture invariants.** Only the leader writes: every write checks
//! [`Leadership`] first and is bounded by the lease's write budget.
//! Per target, `/scale` is read and written under one lock, and every
//! write carries the resourceVersion it read. Drain state lives on the pods
//! (annotations), so it survives restarts and leader changes.

pub mod actuator;
mod auth;
pub mod config;
mod context;
pub mod controller;
pub mod crd;
pub mod drain;
pub mod error;
pub mod events;
mod finalizer;
pub mod lease;
pub mod pods;
pub mod status;
pub mod target;
mod workload;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gpuscale_scaler::{Clock, RunningScaler, Scaler, ScalerArgs, ScalerConfig, ScalerHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use actuator::KubeActuator;
pub use config::{KubeArgs, KubeConfig};
pub use crd::{
    InferenceAutoscaler, InferenceAutoscalerSpec, InferenceAutoscalerStatus, SloStatus,
    StartupStatus, crd_yaml,
};
pub use error::KubeError;
pub use finalizer::FINALIZER;
pub use lease::{LeaderElector, Leadership, LeaseConfig};

use crate::context::Shared;

/// A scaler acting on a Kubernetes cluster.
pub struct KubeScaler {
    client: kube::Client,
    config: KubeConfig,
    scaler: ScalerConfig,
    clock: Option<Clock>,
}

impl std::fmt::Debug for KubeScaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeScaler")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KubeScaler {
    pub fn new(client: kube::Client, config: KubeConfig, scaler: ScalerConfig) -> Self {
        Self {
            client,
            config,
            scaler,
            clock: None,
        }
    }

    /// Use `clock` instead of the system clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Starts the scaler, the leader election (when configured) and the
    /// controller (while leading).
    pub async fn start(self) -> Result<RunningKubeScaler, KubeError> {
        self.config.validate()?;
        let clock = self.clock.unwrap_or_else(Clock::start);
        let (elector, leadership) = match &self.config.lease {
            Some(lease) => {
                let (elector, leadership) = LeaderElector::new(
                    self.client.clone(),
                    lease.clone(),
                    clock,
                    &self.config.field_manager,
                );
                (Some(elector), leadership)
            }
            None => (None, Leadership::always()),
        };
        let namespace = self.config.lease.as_ref().map_or_else(
            || self.scaler.auth.agent_service_account.0.clone(),
            |l| l.namespace.clone(),
        );
        let scaler = Scaler::new(self.scaler);
        let shared = Arc::new(Shared::new(
            self.client,
            self.config,
            leadership.clone(),
            clock,
            scaler.handle().clone(),
            scaler.drain_sink(),
        ));
        let scaler = scaler
            .with_auth_backend(Arc::new(auth::KubeAuthBackend::new(
                shared.clone(),
                namespace,
            )))
            .with_actuator(Arc::new(KubeActuator::new(shared.clone())))
            .with_clock(clock)
            .with_active(leadership.active())
            .start()
            .await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        if let Some(elector) = elector {
            tasks.push(tokio::spawn(elector.run(shutdown_rx.clone())));
        }
        tasks.push(tokio::spawn(controller::supervise(
            shared.clone(),
            shutdown_rx,
        )));
        Ok(RunningKubeScaler {
            scaler,
            shared,
            leadership,
            shutdown,
            tasks,
        })
    }
}

/// A started [`KubeScaler`].
#[derive(Debug)]
pub struct RunningKubeScaler {
    scaler: RunningScaler,
    shared: Arc<Shared>,
    leadership: Leadership,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningKubeScaler {
    /// The scaler (addresses, view).
    pub fn scaler(&self) -> &RunningScaler {
        &self.scaler
    }
    pub fn handle(&self) -> &ScalerHandle {
        self.scaler.handle()
    }
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }
    /// Whether this replica acts now.
    pub fn is_leading(&self) -> bool {
        self.leadership.is_leading()
    }

    /// Stops acting, releases the lease, stops the scaler.
    pub async fn shutdown(self) -> Result<(), KubeError> {
        self.shutdown.send_replace(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.scaler.shutdown().await?;
        Ok(())
    }

    /// Stops at once, as a crashed process would: nothing more is written,
    /// the lease is not released (a standby takes over once it expires).
    pub async fn kill(self) {
        self.shared.killed.store(true, Ordering::SeqCst);
        for task in &self.tasks {
            task.abort();
        }
        self.shared.lock_workloads().clear();
        let _ = self.scaler.shutdown().await;
    }
}

/// `gpuscale scaler --kubernetes`: runs until `shutdown` completes.
pub async fn run_from_args(
    scaler: &ScalerArgs,
    kube: &KubeArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), KubeError> {
    let scaler_config = scaler.to_config_for(true)?;
    let config = kube.to_config()?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| KubeError::Client(e.to_string()))?;
    let running = KubeScaler::new(client, config, scaler_config)
        .start()
        .await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await
}
