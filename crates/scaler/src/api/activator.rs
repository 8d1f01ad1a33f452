//! `gpuscale.v1.ActivatorService`: the activators' link to the scaler.
//!
//! Each activator replica keeps one `Activate` stream open. Its reports
//! (what it holds per workload) go to [`crate::zero::Activators`], where
//! the decide loop reads them as demand, and a report with `wake` set makes
//! the decide loop decide at once (scale from zero does not wait for the
//! next tick). Every report is answered with an update per workload named
//! in it: known or not, ready and desired replicas, and when the first
//! replica is expected (the learned start-up time). When the stream ends,
//! what the activator held counts for nothing.
//!
//! A workload is authorised for the caller (read) the first time its
//! stream names it; a workload name that is not a valid reference is
//! `INVALID_ARGUMENT`.

use std::collections::BTreeSet;
use std::pin::Pin;

use gpuscale_core::WorkloadRef;
use gpuscale_proto::v1;
use gpuscale_proto::v1::activator_service_server::{ActivatorService, ActivatorServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::ApiContext;
use crate::zero::Activators;

/// Updates buffered per activator stream.
const BUFFER: usize = 16;
/// Most workloads in one report.
const MAX_WORKLOADS: usize = 10_000;

/// The `ActivatorService` implementation.
#[derive(Debug, Clone)]
pub(crate) struct ActivatorLink {
    context: ApiContext,
    activators: Activators,
}

impl ActivatorLink {
    pub fn new(context: ApiContext, activators: Activators) -> Self {
        Self {
            context,
            activators,
        }
    }

    pub fn into_server(self) -> ActivatorServiceServer<Self> {
        ActivatorServiceServer::new(self)
    }

    fn update(&self, workload: &WorkloadRef) -> v1::ActivatorUpdate {
        let view = self.context.current();
        let wv = view.workloads.get(workload);
        let startup = self.activators.startup(workload);
        v1::ActivatorUpdate {
            workload: Some(v1::WorkloadRef {
                namespace: workload.namespace.clone(),
                name: workload.name.clone(),
            }),
            known: wv.is_some(),
            ready_replicas: wv
                .and_then(|w| w.observation.as_ref())
                .map_or(0, |o| o.replicas.ready),
            desired_replicas: wv
                .and_then(|w| w.decision.as_ref())
                .map_or(0, |d| d.desired_replicas),
            first_ready_expected_unix_ms: startup
                .and_then(|s| s.first_ready_expected)
                .map_or(0, |t| t.as_millis()),
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::ActivatorUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ActivatorService for ActivatorLink {
    type ActivateStream = UpdateStream;

    async fn activate(
        &self,
        request: Request<Streaming<v1::ActivatorReport>>,
    ) -> Result<Response<Self::ActivateStream>, Status> {
        let (_, extensions, mut inbound) = request.into_parts();
        let (tx, rx) = mpsc::channel::<Result<v1::ActivatorUpdate, Status>>(BUFFER);
        let me = self.clone();
        let mut shutdown = self.context.shutdown.clone();
        tokio::spawn(async move {
            let mut allowed: BTreeSet<WorkloadRef> = BTreeSet::new();
            let mut name: Option<String> = None;
            let outcome: Result<(), Status> = async {
                loop {
                    let report = tokio::select! {
                        _ = crate::stopped(&mut shutdown) => {
                            return Err(Status::unavailable("the scaler is shutting down"));
                        }
                        r = inbound.next() => match r {
                            None => return Ok(()),
                            Some(r) => r?,
                        },
                    };
                    if report.activator.is_empty() || report.activator.len() > 253 {
                        return Err(Status::invalid_argument(
                            "activator: name the activator replica (1 to 253 characters, its pod name)",
                        ));
                    }
                    if report.workloads.len() > MAX_WORKLOADS {
                        return Err(Status::invalid_argument(format!(
                            "workloads: {} in one report, at most {MAX_WORKLOADS}",
                            report.workloads.len()
                        )));
                    }
                    match &name {
                        Some(n) if *n != report.activator => {
                            return Err(Status::invalid_argument(
                                "activator: one stream per activator; the name changed",
                            ));
                        }
                        _ => name = Some(report.activator.clone()),
                    }
                    let mut updates = Vec::with_capacity(report.workloads.len());
                    for h in &report.workloads {
                        let w = h.workload.as_ref().ok_or_else(|| {
                            Status::invalid_argument("workloads[].workload is missing")
                        })?;
                        let workload = super::workload_ref("workloads[].workload", &w.namespace, &w.name)?;
                        if !allowed.contains(&workload) {
                            me.context.authorize(&extensions, &workload).await?;
                            allowed.insert(workload.clone());
                        }
                        me.activators.report(
                            &report.activator,
                            &workload,
                            h.held,
                            h.arrivals_total,
                            h.oldest_held_seconds,
                            h.wake,
                        );
                        updates.push(workload);
                    }
                    for w in updates {
                        if tx.send(Ok(me.update(&w))).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            .await;
            if let Some(n) = &name {
                me.activators.forget(n);
            }
            if let Err(status) = outcome {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
