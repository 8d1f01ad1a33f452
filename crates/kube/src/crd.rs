//! The `InferenceAutoscaler` custom resource (`autoscaling.gpuscale.dev/v1alpha1`).
//!
//! `spec` is the policy's [`WorkloadSpec`] (flattened) plus how long a
//! scale-in may wait for a replica to drain; `status` is what the controller
//! last saw and decided, with standard `metav1.Condition`s. [`crd`] builds
//! the CustomResourceDefinition from these types and tightens the generated
//! schema with the ranges [`WorkloadSpec::validate`] enforces and CEL rules
//! for what a range cannot say (`minReplicas <= maxReplicas`, exactly one
//! performance-model source), so a real API server rejects most bad specs
//! at admission; the controller validates again and reports the rest as a
//! `Ready=False` condition.
//!
//! `kubectl get ias` shows target, min, max, desired, ready, SLO and age.
//! The resource has `status` and `scale` subresources; `/scale` maps to
//! `spec.minReplicas` (so `kubectl scale ias NAME --replicas=N` sets the
//! floor), `status.currentReplicas` and `status.selector` (the target's pods).

use gpuscale_policy::WorkloadSpec;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The API group.
pub(crate) const GROUP: &str = "autoscaling.gpuscale.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Default for `spec.drainTimeoutSeconds`.
pub(crate) const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 300;

/// Autoscales an inference workload (anything with a `/scale` subresource)
/// against latency SLOs, with readiness gating and drain-before-delete.
// Each printcolumn(...) repeats keys such as `type_ = "integer"`, which
// clippy reads as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "autoscaling.gpuscale.dev",
    version = "v1alpha1",
    kind = "InferenceAutoscaler",
    plural = "inferenceautoscalers",
    singular = "inferenceautoscaler",
    shortname = "ias",
    category = "gpuscale",
    namespaced,
    status = "InferenceAutoscalerStatus",
    scale(
        spec_replicas_path = ".spec.minReplicas",
        status_replicas_path = ".status.currentReplicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.target.name",
        description = "the scale target"
    ),
    printcolumn(
        name = "Kind",
        type_ = "string",
        json_path = ".spec.target.kind",
        priority = "1"
    ),
    printcolumn(name = "Min", type_ = "integer", json_path = ".spec.minReplicas"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxReplicas"),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Startup p90",
        type_ = "number",
        json_path = ".status.startup.p90Seconds",
        description = "the replicas' learned p90 start-up, seconds"
    ),
    printcolumn(
        name = "First Ready",
        type_ = "string",
        json_path = ".status.startup.firstReplicaExpectedTime",
        description = "scaling from zero: when the first replica is expected ready",
        priority = "1"
    ),
    printcolumn(
        name = "SLO",
        type_ = "string",
        json_path = ".status.sloStatus",
        description = "Met, AtRisk, Breached or Unknown"
    ),
    printcolumn(
        name = "Last Decision",
        type_ = "string",
        json_path = ".status.lastDecision",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "Autoscales an inference workload against latency SLOs"
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceAutoscalerSpec {
    /// The workload spec: target, SLOs, bounds, performance model, behaviour.
    #[serde(flatten)]
    pub workload: WorkloadSpec,
    /// Longest wait for a draining replica's engine to finish its running
    /// requests before the replica is removed anyway, seconds (1..=3600).
    /// Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_seconds: Option<u32>,
}

/// Where the workload stood against its latency SLOs (per-request TTFT and
/// TPOT at the objectives' percentiles) in the observation of the last
/// decision; the scaler's API and metrics publish the same status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SloStatus {
    /// Every objective with enough observations was met with room.
    Met,
    /// Met, but a measured percentile is close to its threshold.
    AtRisk,
    /// At least one objective was missed.
    Breached,
    /// Too few observations (or stale telemetry) to say.
    Unknown,
}

impl From<gpuscale_core::SloStatus> for SloStatus {
    fn from(s: gpuscale_core::SloStatus) -> Self {
        match s {
            gpuscale_core::SloStatus::Met => SloStatus::Met,
            gpuscale_core::SloStatus::AtRisk => SloStatus::AtRisk,
            gpuscale_core::SloStatus::Breached => SloStatus::Breached,
            gpuscale_core::SloStatus::Unknown => SloStatus::Unknown,
        }
    }
}

/// What the controller last saw and decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceAutoscalerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas the last decision asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// The target's `/scale` `spec.replicas` as last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// Replicas whose engine is warm (readiness gate True): the capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Per-replica batch limit published with the last decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_limit: Option<i32>,
    /// When gpuscale last changed the target's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The last decision and its reason, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<String>,
    /// When the last decision was made (rewritten at most every 15 s when
    /// nothing else changed). A scaler that starts or becomes leader holds
    /// scale-in below `desiredReplicas` until the scale-down stabilization
    /// window has passed since this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision_time: Option<Time>,
    /// Whether the SLOs were met over the scaler's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_status: Option<SloStatus>,
    /// The target's pod selector (label selector syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `ScalingActive`, `AbleToScale`, `Advisory`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The replicas' start-up as the scaler learned it (every workload the
    /// SLO policy decides; when the first replica is expected, for one
    /// scaling from zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<StartupStatus>,
}

/// The replicas' start-up (created → scheduled → engine up → warm) as the
/// scaler learned it from the last start-ups it saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartupStatus {
    /// Median start-up, seconds (`coldStartSeconds` before any was seen).
    pub p50_seconds: f64,
    /// 90th percentile start-up, seconds: the lead time scale-ups plan with.
    pub p90_seconds: f64,
    /// How many start-ups the figures come from (0: `coldStartSeconds`).
    pub samples: u32,
    /// While no replica is ready and one is asked for or starting: when the
    /// first is expected ready (written as null, and so removed, otherwise).
    #[serde(default)]
    pub first_replica_expected_time: Option<Time>,
}

/// The CustomResourceDefinition, schema tightened (see the module docs).
pub fn crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(InferenceAutoscaler::crd())
        .expect("invariant: a CustomResourceDefinition serializes");
    if let Some(schema) = value.pointer_mut("/spec/versions/0/schema/openAPIV3Schema") {
        let missing = tighten(schema);
        debug_assert!(missing.is_empty(), "schema paths not found: {missing:?}");
    }
    serde_json::from_value(value).expect("invariant: the tightened CRD is still a CRD")
}

/// The CRD as YAML, as `gpuscale crd` prints it and `deploy/base/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("invariant: a CRD serializes to YAML");
    format!("# Generated by `gpuscale crd`; do not edit (a test checks it is current).\n{body}")
}

/// Ranges, lengths and CEL rules added to the generated schema, by path of
/// property names from the root (`[]` steps into array items). Returns the
/// paths that are not in the schema (none: a test checks).
fn tighten(root: &mut Value) -> Vec<String> {
    let mut missing = Vec::new();
    let rules: &[(&str, Value)] = &[
        ("spec.target.apiVersion", json!({"minLength": 1})),
        ("spec.target.kind", json!({"minLength": 1})),
        (
            "spec.target.name",
            json!({"minLength": 1, "maxLength": 253}),
        ),
        ("spec.slo.ttft.thresholdSeconds", threshold()),
        (
            "spec.slo.ttft.perInputTokenSeconds",
            json!({"minimum": 0, "maximum": 0.01}),
        ),
        ("spec.slo.itl.thresholdSeconds", threshold()),
        ("spec.slo.ttft.percentile", percentile()),
        ("spec.slo.itl.percentile", percentile()),
        ("spec.minReplicas", json!({"minimum": 0})),
        ("spec.maxReplicas", json!({"minimum": 1})),
        ("spec.gpusPerReplica", json!({"minimum": 1, "maximum": 64})),
        (
            "spec.coldStartSeconds",
            json!({"minimum": 0, "maximum": 7200}),
        ),
        (
            "spec.cooldownSeconds",
            json!({"minimum": 0, "maximum": 3600}),
        ),
        ("spec.batchLimitMargin", margin()),
        ("spec.consolidationMargin", margin()),
        (
            "spec.reactive.stableWindowSeconds",
            json!({"minimum": 6, "maximum": 3600}),
        ),
        (
            "spec.telemetry.staleAfterSeconds",
            json!({"minimum": 1, "maximum": 3600}),
        ),
        (
            "spec.predictive.historyDays",
            json!({"minimum": 1, "maximum": 56}),
        ),
        (
            "spec.predictive.minHistoryHours",
            json!({"minimum": 1, "maximum": 1344}),
        ),
        (
            "spec.predictive.bucketSeconds",
            json!({"minimum": 60, "maximum": 3600}),
        ),
        (
            "spec.performanceModel.maxBatch",
            json!({"minimum": 1, "maximum": 65536}),
        ),
        (
            "spec.performanceModel.kvCapacityTokens",
            json!({"minimum": 1}),
        ),
        (
            "spec.drainTimeoutSeconds",
            json!({"minimum": 1, "maximum": 3600}),
        ),
        (
            "spec",
            cel(&[(
                "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                "minReplicas must be at most maxReplicas",
            )]),
        ),
        (
            "spec.performanceModel",
            cel(&[(
                "[has(self.preset), has(self.profileFile), has(self.profileCsv), has(self.coefficients)].filter(x, x).size() == 1",
                "set exactly one of preset, profileFile, profileCsv, coefficients",
            )]),
        ),
        (
            "spec.schedules[]",
            cel(&[(
                "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                "a schedule's minReplicas must be at most its maxReplicas",
            )]),
        ),
        (
            "status.conditions",
            json!({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
        ),
    ];
    for direction in ["scaleUp", "scaleDown"] {
        let base = format!("spec.behavior.{direction}");
        for (field, extra) in [
            (
                "stabilizationWindowSeconds",
                json!({"minimum": 0, "maximum": 3600}),
            ),
            (
                "policies[].periodSeconds",
                json!({"minimum": 1, "maximum": 1800}),
            ),
            ("policies[].value", json!({"minimum": 1})),
            ("tolerance", json!({"minimum": 0})),
        ] {
            let path = format!("{base}.{field}");
            if !merge_at(root, &path, &extra) {
                missing.push(path);
            }
        }
    }
    for (path, extra) in rules {
        if !merge_at(root, path, extra) {
            missing.push((*path).to_string());
        }
    }
    missing
}

fn threshold() -> Value {
    json!({"minimum": 0, "exclusiveMinimum": true, "maximum": 3600})
}
fn percentile() -> Value {
    json!({"minimum": 50, "maximum": 100, "exclusiveMaximum": true})
}
fn margin() -> Value {
    json!({"minimum": 0, "maximum": 0.9, "exclusiveMaximum": true})
}
fn cel(rules: &[(&str, &str)]) -> Value {
    json!({
        "x-kubernetes-validations": rules
            .iter()
            .map(|(rule, message)| json!({"rule": rule, "message": message}))
            .collect::<Vec<_>>()
    })
}

/// Merges `extra` into the schema at `path`; false when there is no such path.
fn merge_at(root: &mut Value, path: &str, extra: &Value) -> bool {
    let mut node = root;
    for step in path.split('.') {
        let (name, items) = match step.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (step, false),
        };
        let Some(next) = node.get_mut("properties").and_then(|p| p.get_mut(name)) else {
            return false;
        };
        node = next;
        if items {
            let Some(next) = node.get_mut("items") else {
                return false;
            };
            node = next;
        }
    }
    if let (Some(target), Some(extra)) = (node.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            target.insert(k.clone(), v.clone());
        }
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tightening_rule_applies() {
        let mut crd = serde_json::to_value(InferenceAutoscaler::crd()).unwrap();
        let schema = crd
            .pointer_mut("/spec/versions/0/schema/openAPIV3Schema")
            .unwrap();
        assert_eq!(tighten(schema), Vec::<String>::new());
    }

    #[test]
    fn the_schema_has_ranges_rules_and_subresources() {
        let crd = serde_json::to_value(crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["maxReplicas"]["minimum"].as_f64(),
            Some(1.0)
        );
        assert_eq!(
            spec["properties"]["slo"]["properties"]["ttft"]["properties"]["percentile"]["exclusiveMaximum"],
            true
        );
        let rules = spec["x-kubernetes-validations"].to_string();
        assert!(
            rules.contains("self.minReplicas <= self.maxReplicas"),
            "{rules}"
        );
        assert_eq!(
            v["subresources"]["scale"]["specReplicasPath"],
            ".spec.minReplicas"
        );
        assert!(v["subresources"]["status"].is_object());
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "ias");
        // The spec is the policy's workload spec, flattened.
        for field in [
            "target",
            "slo",
            "behavior",
            "performanceModel",
            "advisory",
            "drainTimeoutSeconds",
        ] {
            assert!(spec["properties"][field].is_object(), "{field}");
        }
    }

    #[test]
    fn crd_yaml_round_trips() {
        let yaml = crd_yaml();
        let back: CustomResourceDefinition = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back, crd());
    }
}
