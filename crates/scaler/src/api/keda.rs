//! `externalscaler.ExternalScaler`: gpuscale as a KEDA external scaler.
//!
//! A `ScaledObject` with an `external` trigger pointing at the scaler's
//! gRPC port makes KEDA create an HPA with one `External` metric whose
//! target type is `AverageValue`. For that path the HPA computes, with
//! `total` the metric's value and `N = status.replicas`:
//!
//! ```text
//! r = total / (target × N);   proposal = N            if 1 − tol ≤ r ≤ 1 + tol
//!                             proposal = ceil(total / target)   otherwise
//! ```
//!
//! gpuscale answers `GetMetricSpec` with the target [`KEDA_TARGET`] = 1 and
//! `GetMetrics` with the workload's desired replica count `D`, so the
//! proposal is `ceil(D / 1) = D` exactly, as soon as the ratio `D / N` is
//! outside the HPA's tolerance band (±10% by default). Inside the band
//! (e.g. 10 → 11 replicas) the HPA keeps `N`: set
//! `behavior.scaleUp.tolerance` and `behavior.scaleDown.tolerance` to 0 in
//! the ScaledObject's `horizontalPodAutoscalerConfig` (Kubernetes 1.33+,
//! feature `HPAConfigurableTolerance`, on by default from 1.35) and the HPA
//! lands on `D` for every `D ≠ N`. No choice of value and target can avoid
//! the band: the ratio is `D / N` whatever the scale. The README's "Use it
//! with KEDA" shows the whole ScaledObject.
//!
//! **Activity**: `IsActive` is true while the desired count is above zero
//! or the workload sees load (requests arriving, waiting or running):
//! KEDA scales a workload at zero to `minReplicaCount` (at least 1) when it
//! turns active and back to zero after `cooldownPeriod` of inactivity, and
//! leaves 1..N to the HPA.
//!
//! **Which workload**: the trigger's metadata key [`WORKLOAD_METADATA_KEY`]
//! (`workload: namespace/name`, or `workload: name` in the ScaledObject's
//! namespace); without it, the workload named like the ScaledObject in its
//! namespace. An unknown workload is `NOT_FOUND` naming it; before its
//! first decision, and through the scaler's warm-up after start or a change
//! of leader, `UNAVAILABLE` (KEDA counts a failure and, past the
//! ScaledObject's `fallback.failureThreshold`, applies its fallback; without
//! a fallback the HPA keeps the current replica count) — never a count
//! made from no data.
//!
//! KEDA calls `GetMetrics` then `IsActive` on every poll and HPA query.
//! `StreamIsActive` (trigger type `external-push`) sends the activity now
//! and again whenever it changes; it counts against `--max-keda-streams`, a
//! pool apart from the watchers', so watchers can never lock KEDA out.
//! `StreamMetricSpec` answers `UNIMPLEMENTED`: the spec never changes (the
//! target is always 1), and KEDA then uses `GetMetricSpec`.

use std::collections::HashMap;

use gpuscale_core::WorkloadRef;
use gpuscale_proto::externalscaler::external_scaler_server::{
    ExternalScaler, ExternalScalerServer,
};
use gpuscale_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use tonic::{Request, Response, Status};

use super::{ApiContext, ApiStream, bounded_stream, next_view, unknown_workload, workload_ref};
use crate::view::{StateView, WorkloadView};

/// The metric gpuscale reports to KEDA (the HPA's metric is `s<N>-` + this).
pub const KEDA_METRIC_NAME: &str = "gpuscale-desired-replicas";
/// The `AverageValue` target: one desired replica per replica.
pub const KEDA_TARGET: f64 = 1.0;
/// The trigger metadata key naming the workload.
pub const WORKLOAD_METADATA_KEY: &str = "workload";

/// The `ExternalScaler` implementation.
#[derive(Debug, Clone)]
pub struct KedaScaler {
    context: ApiContext,
}

impl KedaScaler {
    pub fn new(context: ApiContext) -> Self {
        Self { context }
    }

    pub fn into_server(self) -> ExternalScalerServer<Self> {
        ExternalScalerServer::new(self)
    }

    /// The view and the workload the ScaledObject names, which the caller
    /// (of a request with `extensions`) must be allowed to read and which
    /// must exist.
    async fn lookup(
        &self,
        extensions: &tonic::Extensions,
        r: Option<&ScaledObjectRef>,
    ) -> Result<(std::sync::Arc<StateView>, WorkloadRef), Status> {
        let r = r.ok_or_else(|| Status::invalid_argument("scaledObjectRef is missing"))?;
        let workload = scaled_workload(r)?;
        self.context.authorize(extensions, &workload).await?;
        let view = self.context.current();
        if !view.workloads.contains_key(&workload) {
            return Err(unknown_workload(&view, &workload));
        }
        Ok((view, workload))
    }
}

/// The workload a ScaledObject's trigger names (see the module docs).
pub(crate) fn scaled_workload(r: &ScaledObjectRef) -> Result<WorkloadRef, Status> {
    match r.scaler_metadata.get(WORKLOAD_METADATA_KEY) {
        Some(value) => {
            let value = value.trim();
            let field = format!("scalerMetadata.{WORKLOAD_METADATA_KEY}");
            match value.split_once('/') {
                Some((ns, name)) if !ns.is_empty() => workload_ref(&field, ns, name),
                Some(_) => Err(Status::invalid_argument(format!(
                    "{field} `{}`: expected `namespace/name` or `name`",
                    crate::edge::auth::quote(value)
                ))),
                None => workload_ref(&field, &r.namespace, value),
            }
        }
        None => workload_ref("scaledObjectRef", &r.namespace, &r.name),
    }
}

/// The desired replica count, or `UNAVAILABLE` before the first decision.
fn desired(w: &WorkloadView) -> Result<u32, Status> {
    w.decision.as_ref().map(|d| d.desired_replicas).ok_or_else(|| {
        Status::unavailable(match &w.warming_up {
            Some(warming) => format!("workload {}: {warming}; retry shortly", w.workload),
            None => format!(
                "workload {} has no decision yet (every workload is decided each tick); retry shortly",
                w.workload
            ),
        })
    })
}

/// Active iff the desired count is above zero or the workload has load.
pub fn is_active(w: &WorkloadView) -> Result<bool, Status> {
    let desired = desired(w)?;
    let load = w.observation.as_ref().is_some_and(|o| {
        [
            o.load.arrival_rate_rps,
            o.load.requests_waiting,
            o.load.requests_running,
        ]
        .iter()
        .any(|v| v.is_some_and(|v| v > 0.0))
    });
    Ok(desired > 0 || load)
}

/// Whether `name` (as KEDA passes it: with or without its `s<N>-` prefix)
/// is gpuscale's metric. An empty name is not.
fn is_our_metric(name: &str) -> bool {
    name == KEDA_METRIC_NAME
        || name
            .strip_suffix(KEDA_METRIC_NAME)
            .and_then(|prefix| prefix.strip_prefix('s'))
            .and_then(|rest| rest.strip_suffix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

const API: &str = "keda_stream_is_active";

#[tonic::async_trait]
impl ExternalScaler for KedaScaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let (view, workload) = self
            .lookup(request.extensions(), Some(request.get_ref()))
            .await?;
        let result = is_active(&view.workloads[&workload])?;
        Ok(Response::new(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = ApiStream<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let (_, workload) = self
            .lookup(request.extensions(), Some(request.get_ref()))
            .await?;
        let slot = self.context.keda_slot(API)?;
        let (tx, stream) = bounded_stream(
            1 + self.context.config.watch_buffer,
            slot,
            API,
            self.context.metrics.clone(),
        );
        let mut view = self.context.view.clone();
        let mut shutdown = self.context.shutdown.clone();
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let current = view.borrow_and_update().clone();
                // Unknown (removed) or undecided: nothing to say until it is.
                if let Some(active) = current
                    .workloads
                    .get(&workload)
                    .and_then(|w| is_active(w).ok())
                    && last != Some(active)
                {
                    last = Some(active);
                    if tx.send(IsActiveResponse { result: active }).is_err() {
                        return;
                    }
                }
                if let Some(end) = next_view(&mut view, &mut shutdown, &tx).await {
                    tx.finish(end);
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        self.lookup(request.extensions(), Some(request.get_ref()))
            .await?;
        // The deprecated integer fields too: older KEDA releases read only them.
        #[allow(deprecated)]
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: KEDA_METRIC_NAME.to_string(),
                target_size: KEDA_TARGET as i64,
                target_size_float: KEDA_TARGET,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let (_, extensions, r) = request.into_parts();
        if r.metric_name.is_empty() {
            return Err(Status::invalid_argument(format!(
                "metricName is empty: gpuscale reports `{KEDA_METRIC_NAME}` (KEDA sends it as `s<N>-{KEDA_METRIC_NAME}`)"
            )));
        }
        if !is_our_metric(&r.metric_name) {
            return Err(Status::invalid_argument(format!(
                "metricName `{}`: gpuscale reports only `{KEDA_METRIC_NAME}`, with or without KEDA's `s<N>-` prefix",
                crate::edge::auth::quote(&r.metric_name)
            )));
        }
        let (view, workload) = self
            .lookup(&extensions, r.scaled_object_ref.as_ref())
            .await?;
        let desired = desired(&view.workloads[&workload])?;
        // KEDA reads `metricValueFloat` when it is above 0, else `metricValue`:
        // both carry the count, so 0 is 0 either way.
        #[allow(deprecated)]
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: KEDA_METRIC_NAME.to_string(),
                metric_value: i64::from(desired),
                metric_value_float: f64::from(desired),
            }],
        }))
    }

    type StreamMetricSpecStream = ApiStream<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented(
            "gpuscale's metric spec never changes (target 1 per replica): use GetMetricSpec",
        ))
    }
}

/// Trigger metadata naming a workload, for tests and examples.
pub fn workload_metadata(workload: &WorkloadRef) -> HashMap<String, String> {
    HashMap::from([(
        WORKLOAD_METADATA_KEY.to_string(),
        format!("{}/{}", workload.namespace, workload.name),
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaled(name: &str, namespace: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: name.into(),
            namespace: namespace.into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_trigger_names_the_workload_or_the_scaled_object_does() {
        let w = |r: ScaledObjectRef| scaled_workload(&r).map(|w| w.to_string());
        assert_eq!(
            w(scaled("so", "prod", &[("workload", "llm/chat")])).ok(),
            Some(WorkloadRef::new("llm", "chat").to_string())
        );
        assert_eq!(
            w(scaled("so", "prod", &[("workload", "chat")])).ok(),
            Some(WorkloadRef::new("prod", "chat").to_string())
        );
        assert_eq!(
            w(scaled(
                "chat",
                "prod",
                &[("scalerAddress", "gpuscale:7070")]
            ))
            .ok(),
            Some(WorkloadRef::new("prod", "chat").to_string())
        );
        let e = w(scaled("so", "prod", &[("workload", "/chat")])).expect_err("no namespace");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("scalerMetadata.workload"), "{e:?}");
        let e = w(scaled("so", "prod", &[("workload", "llm/Chat")])).expect_err("uppercase");
        assert!(e.message().contains("`Chat`"), "{e:?}");
        let e = w(scaled("", "", &[])).expect_err("nothing named");
        assert!(e.message().contains("scaledObjectRef.name"), "{e:?}");
    }

    #[test]
    fn metric_names_with_and_without_the_hpa_prefix_are_ours() {
        assert!(!is_our_metric(""));
        assert!(is_our_metric(KEDA_METRIC_NAME));
        assert!(is_our_metric(&format!("s0-{KEDA_METRIC_NAME}")));
        assert!(is_our_metric(&format!("s12-{KEDA_METRIC_NAME}")));
        assert!(!is_our_metric("s0-queue-length"));
        assert!(!is_our_metric(&format!("x{KEDA_METRIC_NAME}")));
        assert!(!is_our_metric(&format!("x-{KEDA_METRIC_NAME}")));
        assert!(!is_our_metric(&format!("s-{KEDA_METRIC_NAME}")));
        assert!(!is_our_metric(&format!("sx1-{KEDA_METRIC_NAME}")));
    }
}
