//! What every part of the Kubernetes mode shares: the client, the
//! configuration, leadership, the clock, the Event publisher, the scaler's
//! handle and drain sink (both given at construction) and the registered
//! workloads.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuscale_core::WorkloadRef;
use gpuscale_scaler::{Clock, DrainSink, ScalerHandle};
use tokio::sync::Notify;

use crate::config::KubeConfig;
use crate::error::KubeError;
use crate::events::EventPublisher;
use crate::lease::Leadership;
use crate::workload::WorkloadEntry;

pub(crate) struct Shared {
    pub(crate) client: kube::Client,
    pub(crate) config: KubeConfig,
    pub(crate) leadership: Leadership,
    pub(crate) clock: Clock,
    pub(crate) events: EventPublisher,
    /// The scaler: its view and workload registry.
    pub(crate) scaler: ScalerHandle,
    /// The only way this crate asks agents to drain or undrain a pod.
    pub(crate) drains: DrainSink,
    pub(crate) workloads: Mutex<BTreeMap<WorkloadRef, Arc<WorkloadEntry>>>,
    /// Status writes of the controller and the status writer, one at a time.
    pub(crate) status_lock: tokio::sync::Mutex<()>,
    /// Wakes the status writer (a condition changed).
    pub(crate) status_wake: Notify,
    /// Set when this replica was killed: nothing may be written any more.
    pub(crate) killed: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("leadership", &self.leadership)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        client: kube::Client,
        config: KubeConfig,
        leadership: Leadership,
        clock: Clock,
        scaler: ScalerHandle,
        drains: DrainSink,
    ) -> Self {
        let events = EventPublisher::new(
            client.clone(),
            &config.identity,
            &config.field_manager,
            clock,
        );
        Self {
            client,
            config,
            leadership,
            clock,
            events,
            scaler,
            drains,
            workloads: Mutex::new(BTreeMap::new()),
            status_lock: tokio::sync::Mutex::new(()),
            status_wake: Notify::new(),
            killed: AtomicBool::new(false),
        }
    }

    pub(crate) fn entry(&self, workload: &WorkloadRef) -> Option<Arc<WorkloadEntry>> {
        self.lock_workloads().get(workload).cloned()
    }

    pub(crate) fn entries(&self) -> Vec<Arc<WorkloadEntry>> {
        self.lock_workloads().values().cloned().collect()
    }

    pub(crate) fn lock_workloads(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<WorkloadRef, Arc<WorkloadEntry>>> {
        self.workloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Longest a write may take: it must land before a standby could take
    /// over (the lease's write budget), and never more than the request timeout.
    pub(crate) fn write_budget(&self) -> Duration {
        match &self.config.lease {
            Some(l) => l.write_budget().min(self.config.request_timeout),
            None => self.config.request_timeout,
        }
    }

    /// Whether this replica may write now.
    pub(crate) fn may_write(&self) -> Result<(), KubeError> {
        if self.killed.load(Ordering::SeqCst) {
            return Err(KubeError::NotLeader("this replica was stopped".into()));
        }
        self.leadership.may_write()
    }

    /// Runs the write `f` if this replica may write, bounded by the write budget.
    pub(crate) async fn write<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, KubeError>>,
    ) -> Result<T, KubeError> {
        self.may_write()?;
        match tokio::time::timeout(self.write_budget(), f).await {
            Ok(r) => r,
            Err(_) => Err(KubeError::Client(format!(
                "{what}: no answer within {:?}",
                self.write_budget()
            ))),
        }
    }

    /// Runs the read `f`, bounded by the request timeout.
    pub(crate) async fn read<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, KubeError>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(self.config.request_timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(KubeError::Client(format!(
                "{what}: no answer within {:?}",
                self.config.request_timeout
            ))),
        }
    }
}
