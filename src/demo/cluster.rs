//! The demo's Kubernetes objects, created through the real API (kube-rs
//! against the embedded fake API server), as a user would apply them: the
//! InferenceAutoscaler CRD, a namespace, a vLLM-like Deployment whose pods
//! declare the readiness gate, and the InferenceAutoscaler for it.

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::error::DemoError;
use super::{DEPLOYMENT, GATE, NAMESPACE};

fn post() -> PostParams {
    PostParams {
        field_manager: Some("gpuscale-demo".into()),
        ..PostParams::default()
    }
}

fn api(
    client: &kube::Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(client.clone(), NAMESPACE, &ar)
}

async fn create(
    api: &Api<DynamicObject>,
    object: Value,
    what: &'static str,
) -> Result<(), DemoError> {
    let object: DynamicObject =
        serde_json::from_value(object).map_err(|e| DemoError::part(what, e))?;
    api.create(&post(), &object)
        .await
        .map_err(|e| DemoError::part(what, e))?;
    Ok(())
}

/// The CRD and the namespace.
pub(crate) async fn install(client: &kube::Client) -> Result<(), DemoError> {
    let crds = Api::all(client.clone());
    crds.create(&post(), &gpuscale_kube::crd::crd())
        .await
        .map_err(|e| DemoError::part("installing the InferenceAutoscaler CRD", e))?;
    let namespaces: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("", "v1", "Namespace"),
            "namespaces",
        ),
    );
    let ns: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}
    }))
    .map_err(|e| DemoError::part("creating the namespace", e))?;
    namespaces
        .create(&post(), &ns)
        .await
        .map_err(|e| DemoError::part("creating the namespace", e))?;
    Ok(())
}

/// The Deployment: `replicas` vLLM-like pods on `gpus_per_replica` GPUs
/// each, with the readiness gate the agent sets once the engine is warm.
pub(crate) async fn create_deployment(
    client: &kube::Client,
    replicas: u32,
    gpus_per_replica: u32,
    model: &str,
) -> Result<(), DemoError> {
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": DEPLOYMENT}},
            "template": {
                "metadata": {"labels": {"app": DEPLOYMENT}},
                "spec": {
                    "readinessGates": [{"conditionType": GATE}],
                    "containers": [{
                        "name": "vllm",
                        "image": "vllm/vllm-openai:v0.9.2",
                        "args": [format!("--model={model}"), "--port=8000"],
                        "ports": [{"name": "http", "containerPort": 8000}],
                        "resources": {"limits": {"nvidia.com/gpu": gpus_per_replica.to_string()}}
                    }]
                }
            }
        }
    });
    create(
        &api(client, "apps", "v1", "Deployment", "deployments"),
        deployment,
        "creating the Deployment",
    )
    .await
}

/// What the InferenceAutoscaler asks for.
#[derive(Debug, Clone)]
pub(crate) struct AutoscalerSpec {
    pub profile: String,
    pub gpus_per_replica: u32,
    pub max_replicas: u32,
    pub cold_start_s: f64,
    pub scale_down_window_s: u32,
}

/// The InferenceAutoscaler for the Deployment: p95 TTFT 2 s, p95 ITL 50 ms,
/// the profile as the performance-model preset, acting (not advisory).
pub(crate) async fn create_autoscaler(
    client: &kube::Client,
    spec: &AutoscalerSpec,
) -> Result<(), DemoError> {
    let ias = json!({
        "apiVersion": "autoscaling.gpuscale.dev/v1alpha1",
        "kind": "InferenceAutoscaler",
        "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE},
        "spec": {
            "target": {"apiVersion": "apps/v1", "kind": "Deployment", "name": DEPLOYMENT},
            "slo": {
                "ttft": {"thresholdSeconds": super::TTFT_SLO_S, "percentile": 95},
                "itl": {"thresholdSeconds": super::ITL_SLO_S, "percentile": 95}
            },
            "minReplicas": 1,
            "maxReplicas": spec.max_replicas,
            "gpusPerReplica": spec.gpus_per_replica,
            "performanceModel": {"preset": spec.profile},
            "coldStartSeconds": spec.cold_start_s,
            "drainTimeoutSeconds": 300,
            // One hour of trace is no history for the seasonal forecast.
            "predictive": {"mode": "Off"},
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": spec.scale_down_window_s}},
            "advisory": false
        }
    });
    create(
        &api(
            client,
            "autoscaling.gpuscale.dev",
            "v1alpha1",
            "InferenceAutoscaler",
            "inferenceautoscalers",
        ),
        ias,
        "creating the InferenceAutoscaler",
    )
    .await
}
