//! The InferenceAutoscaler controller (kube-runtime), run by the leader.
//!
//! `reconcile` validates the spec (the policy's validation, then the
//! performance model), resolves the target through discovery and `/scale`,
//! and registers the workload with the scaler (a [`WorkloadEntry`] with its
//! pod reflector and drainer). From then on the scaler's decide loop
//! decides every tick and acts through the [`crate::KubeActuator`]; the status
//! writer writes status. An autoscaler that cannot act (invalid spec,
//! unknown performance model, missing target, target without `/scale` or
//! selector) is unregistered and gets `Ready=False` with the reason, in its
//! status and in one Warning Event; it is looked at again when its spec
//! changes (or, for a missing target, every 30 s). Acting on an autoscaler
//! starts with gpuscale's finalizer on it; its deletion is finished by
//! [`crate::finalizer`] (drains cancelled, then the finalizer removed), even
//! when no scaler ran at the moment it was deleted. API errors go to
//! `error_policy`: per-object exponential backoff (1 s doubling to 5 min),
//! never a crash loop. Lost watches resume or relist (kube-runtime's watcher,
//! with its backoff).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gpuscale_core::WorkloadRef;
use gpuscale_policy::config::ResolveError;
use gpuscale_policy::{PerfModel, SpecError, WorkloadConfig};
use gpuscale_scaler::WorkloadDef;
use gpuscale_scaler::config::{DeciderConfig, EngineSelector};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use crate::context::Shared;
use crate::crd::{DEFAULT_DRAIN_TIMEOUT_SECONDS, InferenceAutoscaler, InferenceAutoscalerSpec};
use crate::error::KubeError;
use crate::events::{EventSpec, EventType};
use crate::finalizer;
use crate::status;
use crate::target::ScaleTarget;
use crate::workload::{EntryParts, WorkloadEntry};

/// A valid autoscaler is looked at again this often (target re-resolution).
const RESYNC: Duration = Duration::from_secs(60);
/// An autoscaler whose target is missing is looked at again this often.
const TARGET_RETRY: Duration = Duration::from_secs(30);
/// Longest backoff after repeated API errors.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub(crate) struct Ctx {
    shared: Arc<Shared>,
    failures: Mutex<HashMap<ObjectRef<InferenceAutoscaler>, u32>>,
}

/// Why an autoscaler cannot act: the condition reason and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// The validated decider configuration, performance model and drain
/// timeout of `spec`, or why it cannot act.
pub fn validate(
    spec: &InferenceAutoscalerSpec,
) -> Result<(WorkloadConfig, PerfModel, u32), Problem> {
    let invalid = |e: SpecError| Problem {
        reason: match e {
            SpecError::UnknownPreset { .. } => "UnknownPerformanceModel",
            _ => "InvalidSpec",
        },
        message: e.to_string(),
    };
    let (config, model) = spec
        .workload
        .resolve(|path| std::fs::read_to_string(path))
        .map_err(|e| match e {
            ResolveError::Spec(e) => invalid(e),
            ResolveError::Profile { file, error } => Problem {
                reason: "UnknownPerformanceModel",
                message: format!(
                    "spec.performanceModel.profileFile: cannot read {file:?} on the scaler ({error}); mount it into the scaler or use profileCsv"
                ),
            },
        })?;
    let drain = spec
        .drain_timeout_seconds
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECONDS);
    if !(1..=3600).contains(&drain) {
        return Err(Problem {
            reason: "InvalidSpec",
            message: format!("spec.drainTimeoutSeconds: {drain} is not allowed; 1..=3600 seconds"),
        });
    }
    Ok((config, model, drain))
}

async fn reconcile(ias: Arc<InferenceAutoscaler>, ctx: Arc<Ctx>) -> Result<Action, KubeError> {
    let shared = &ctx.shared;
    shared.may_write()?;
    let namespace = ias.namespace().unwrap_or_default();
    let name = ias.name_any();
    let workload = WorkloadRef::new(&namespace, &name);
    let generation = ias.metadata.generation.unwrap_or(0);
    let advisory = ias.spec.workload.advisory;
    if ias.metadata.deletion_timestamp.is_some() {
        finalizer::finish(shared, &ias, &workload).await?;
        ctx.succeeded(&ias);
        return Ok(Action::await_change());
    }

    let (config, model, drain_timeout_s) = match validate(&ias.spec) {
        Ok(v) => v,
        Err(p) => {
            cannot_act(shared, &ias, &workload, generation, advisory, &p).await?;
            ctx.succeeded(&ias);
            return Ok(Action::await_change());
        }
    };
    let resolved = shared
        .read(
            "resolving the target",
            ScaleTarget::resolve(&shared.client, &namespace, &ias.spec.workload.target),
        )
        .await?;
    let (target, reading) = match resolved {
        Ok(t) => t,
        Err(p) => {
            let p = Problem {
                reason: p.reason,
                message: p.message,
            };
            cannot_act(shared, &ias, &workload, generation, advisory, &p).await?;
            ctx.succeeded(&ias);
            return Ok(Action::requeue(TARGET_RETRY));
        }
    };
    // Before any drain can be written: drains never outlive the autoscaler.
    finalizer::ensure(shared, &ias).await?;
    let selector = reading.selector.clone().unwrap_or_default();
    if let Some(existing) = shared.entry(&workload)
        && existing.generation == generation
        && existing.selector == selector
        && existing.target.resource == target.resource
        && existing.target.name == target.name
    {
        ctx.succeeded(&ias);
        return Ok(Action::requeue(RESYNC));
    }
    let describe = target.describe();
    let entry = WorkloadEntry::start(
        EntryParts {
            workload: workload.clone(),
            ias: ias.object_ref(&()),
            generation,
            spec: ias.spec.clone(),
            target,
            reading,
            selector: selector.clone(),
            drain_timeout_s,
            hold_down: Duration::from_secs(u64::from(
                config.behavior.scale_down.stabilization_window_s,
            )),
            hold_up: Duration::from_secs(u64::from(
                config.behavior.scale_up.stabilization_window_s,
            )),
        },
        shared,
    );
    let previous = shared.lock_workloads().insert(workload.clone(), entry);
    shared.scaler.register_workload(WorkloadDef {
        workload: workload.clone(),
        labels: ias.labels().clone().into_iter().collect(),
        selector: EngineSelector {
            model: None,
            namespace: Some(namespace.clone()),
        },
        decider: DeciderConfig::Policy {
            config: Box::new(config),
            model: Box::new(model),
        },
        last_decision: status::persisted_decision(ias.status.as_ref(), generation),
    });
    drop(previous);
    shared.status_wake.notify_one();
    tracing::info!(%workload, target = %describe, %selector, generation, advisory, "acting on an InferenceAutoscaler");
    let was_ready = ias
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::READY))
        .is_some_and(|c| c.status == "True" && c.observed_generation == Some(generation));
    if !was_ready {
        shared
            .events
            .publish(
                &ias.object_ref(&()),
                EventSpec {
                    type_: EventType::Normal,
                    reason: "TargetResolved",
                    action: "Resolve",
                    note: format!(
                        "{} {describe} (pods: {selector}){}",
                        if advisory { "advising on" } else { "scaling" },
                        if advisory {
                            "; advisory: nothing is applied"
                        } else {
                            ""
                        }
                    ),
                    related: None,
                },
            )
            .await;
    }
    ctx.succeeded(&ias);
    Ok(Action::requeue(RESYNC))
}

/// Unregisters the autoscaler and reports why it cannot act (status and,
/// when the reason is new, a Warning Event).
async fn cannot_act(
    shared: &Arc<Shared>,
    ias: &InferenceAutoscaler,
    workload: &WorkloadRef,
    generation: i64,
    advisory: bool,
    problem: &Problem,
) -> Result<(), KubeError> {
    remove(shared, workload, "the InferenceAutoscaler cannot act").await;
    let prev = ias.status.as_ref();
    let same = prev
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::READY))
        .is_some_and(|c| {
            c.status == "False"
                && c.reason == problem.reason
                && c.message == problem.message
                && c.observed_generation == Some(generation)
        });
    if same {
        return Ok(());
    }
    tracing::warn!(%workload, reason = problem.reason, message = %problem.message, "InferenceAutoscaler cannot act");
    let status = status::invalid(
        prev,
        generation,
        problem.reason,
        &problem.message,
        advisory,
        shared.clock.now(),
    );
    {
        let _writes = shared.status_lock.lock().await;
        status::patch_status(shared, &workload.namespace, &workload.name, &status).await?;
    }
    shared
        .events
        .publish(
            &ias.object_ref(&()),
            EventSpec {
                type_: EventType::Warning,
                reason: problem.reason,
                action: "Validate",
                note: problem.message.clone(),
                related: None,
            },
        )
        .await;
    Ok(())
}

/// Stops acting on `workload`: unregisters it from the scaler and cancels
/// its drains (best effort).
pub(crate) async fn remove(shared: &Arc<Shared>, workload: &WorkloadRef, why: &str) {
    let entry = {
        let _writes = shared.status_lock.lock().await;
        shared.lock_workloads().remove(workload)
    };
    shared.scaler.unregister_workload(workload);
    if let Some(entry) = entry {
        tracing::info!(%workload, why, "no longer acting on the InferenceAutoscaler");
        entry.cancel_all_drains(shared, why).await;
    }
}

fn error_policy(ias: Arc<InferenceAutoscaler>, error: &KubeError, ctx: Arc<Ctx>) -> Action {
    let key = ObjectRef::from_obj(ias.as_ref());
    let n = {
        let mut failures = ctx
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(ias = %ias.name_any(), error = %error, attempt = n, retry_in_s = delay.as_secs_f64(), "reconcile failed; retrying with backoff");
    Action::requeue(delay)
}

/// 1 s after the first failure, doubling, at most 5 minutes.
pub(crate) fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

impl Ctx {
    fn succeeded(&self, ias: &InferenceAutoscaler) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&ObjectRef::from_obj(ias));
    }
}

/// Runs the controller, the status writer and the sweep of deleted
/// autoscalers while this replica leads; stops them (and forgets every
/// workload) when it stops leading; returns when `shutdown` turns true.
pub(crate) async fn supervise(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut active = shared.leadership.active();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = active.wait_for(|a| *a) => if r.is_err() { return },
        }
        tracing::info!("starting the InferenceAutoscaler controller");
        let (stop_tx, stop_rx) = watch::channel(false);
        let run = run_controller(shared.clone(), stop_rx);
        tokio::pin!(run);
        let stopping = tokio::select! {
            _ = &mut run => false,
            _ = shutdown.wait_for(|s| *s) => true,
            _ = active.wait_for(|a| !*a) => false,
        };
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut run).await;
        let workloads: Vec<WorkloadRef> = shared.lock_workloads().keys().cloned().collect();
        for w in workloads {
            shared.scaler.unregister_workload(&w);
            shared.lock_workloads().remove(&w);
        }
        tracing::info!("stopped the InferenceAutoscaler controller");
        if stopping {
            return;
        }
    }
}

async fn run_controller(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let api: Api<InferenceAutoscaler> = Api::all(shared.client.clone());
    let controller = Controller::new(api, watcher::Config::default());
    let store = controller.store();
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        failures: Mutex::new(HashMap::new()),
    });
    let mut graceful = stop.clone();
    let reconciles = controller
        .graceful_shutdown_on(async move {
            let _ = graceful.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller");
            }
            futures::future::ready(())
        });
    let writer = status::run_writer(shared.clone(), store.clone());
    let sweep = async {
        let mut ticker = tokio::time::interval(shared.config.sync_period * 5);
        loop {
            ticker.tick().await;
            if store.wait_until_ready().await.is_err() {
                return;
            }
            let gone: Vec<WorkloadRef> = shared
                .lock_workloads()
                .keys()
                .filter(|w| {
                    store
                        .get(&ObjectRef::new(&w.name).within(&w.namespace))
                        .is_none()
                })
                .cloned()
                .collect();
            for w in gone {
                remove(&shared, &w, "the InferenceAutoscaler was deleted").await;
            }
        }
    };
    tokio::select! {
        _ = reconciles => {}
        _ = writer => {}
        _ = sweep => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

#[cfg(test)]
mod tests {
    use gpuscale_policy::WorkloadSpec;

    use super::*;

    fn spec(f: impl FnOnce(&mut WorkloadSpec)) -> InferenceAutoscalerSpec {
        let mut w = WorkloadSpec::new("vllm", 8, "h200-llama3-8b-bf16");
        f(&mut w);
        InferenceAutoscalerSpec {
            workload: w,
            drain_timeout_seconds: None,
        }
    }

    #[test]
    fn each_bad_spec_has_its_reason() {
        assert!(validate(&spec(|_| {})).is_ok());
        let p = validate(&spec(|w| w.min_replicas = 9)).unwrap_err();
        assert_eq!(p.reason, "InvalidSpec");
        assert!(p.message.contains("spec.minReplicas"), "{}", p.message);
        let p = validate(&spec(|w| {
            w.performance_model.preset = Some("tpu-v9".into())
        }))
        .unwrap_err();
        assert_eq!(p.reason, "UnknownPerformanceModel");
        assert!(p.message.contains("tpu-v9"), "{}", p.message);
        let p = validate(&spec(|w| {
            w.performance_model.preset = None;
            w.performance_model.profile_file = Some("/nonexistent/profile.csv".into());
        }))
        .unwrap_err();
        assert_eq!(p.reason, "UnknownPerformanceModel");
        assert!(
            p.message.contains("/nonexistent/profile.csv") && p.message.contains("cannot read"),
            "{}",
            p.message
        );
        let p = validate(&spec(|w| w.gpu_type = Some("A10".into()))).unwrap_err();
        assert!(p.message.contains("spec.gpuType"), "{}", p.message);
        let mut s = spec(|_| {});
        s.drain_timeout_seconds = Some(0);
        assert!(
            validate(&s)
                .unwrap_err()
                .message
                .contains("spec.drainTimeoutSeconds")
        );
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
