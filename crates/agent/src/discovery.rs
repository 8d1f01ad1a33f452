//! The pods on this node, from the Kubernetes API.
//!
//! One node-scoped list/watch (`fieldSelector=spec.nodeName=<node>`, as
//! dcgm-exporter's informer does) keeps a small view of each pod — its IP,
//! its `gpuscale.dev/*` annotations, its container ports, the readiness
//! gates it declares and the state of those conditions — and publishes it
//! as [`NodePods`] on a `watch` channel. Three readers use it: the engine
//! source (scrape targets from the annotations, see
//! [`NodePods::engine_targets`]), the PodResources source (a new pod → an
//! early refresh) and the readiness-gate writer.
//!
//! The full `Pod` objects are dropped as soon as they are converted, so the
//! agent's memory does not grow with pod size. When the API cannot be
//! reached or the watch breaks, the last known view stays published, the
//! failure is logged once per change of kind and counted, and kube-runtime's
//! watcher retries with backoff.
//!
//! RBAC: `pods` get/list/watch (and `pods/status` patch for the writer).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gpuscale_core::{NodeName, PodRef};
use gpuscale_telemetry::TelemetryError;
use gpuscale_telemetry::engine::{ANNOTATION_METRICS_PORT, EngineTarget};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::exporter::{NodeStats, source};

/// The readiness gate the agent sets by default.
pub const DEFAULT_READINESS_GATE: &str = "gpuscale.dev/engine-warm";

/// One readiness-gate condition as the pod's status holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateCondition {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// RFC 3339.
    pub last_transition_time: Option<String>,
}

impl GateCondition {
    pub(crate) fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// What the agent keeps of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePod {
    pub pod: PodRef,
    pub uid: String,
    /// `status.podIP`, once the pod has one.
    pub ip: Option<String>,
    /// `status.phase` (`Pending`, `Running`, ...).
    pub phase: String,
    /// The `gpuscale.dev/*` annotations only.
    pub annotations: BTreeMap<String, String>,
    /// Container names with their declared ports, in spec order.
    pub containers: Vec<(String, Vec<u16>)>,
    /// `spec.readinessGates[].conditionType`.
    pub readiness_gates: Vec<String>,
    /// The conditions of those gates, by type.
    pub gate_conditions: BTreeMap<String, GateCondition>,
    /// `status.conditions[type=Ready]` is `True`.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl NodePod {
    /// The agent's view of `pod`; `None` without a name.
    pub(crate) fn from_pod(pod: &Pod) -> Option<NodePod> {
        let meta = &pod.metadata;
        let name = meta.name.clone()?;
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let annotations = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("gpuscale.dev/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let spec = pod.spec.as_ref();
        let containers = spec
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| {
                        let ports = c
                            .ports
                            .iter()
                            .flatten()
                            .filter_map(|p| u16::try_from(p.container_port).ok())
                            .collect();
                        (c.name.clone(), ports)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let readiness_gates: Vec<String> = spec
            .and_then(|s| s.readiness_gates.as_ref())
            .map(|g| g.iter().map(|g| g.condition_type.clone()).collect())
            .unwrap_or_default();
        let status = pod.status.as_ref();
        let conditions = status.and_then(|s| s.conditions.as_ref());
        let gate_conditions = conditions
            .iter()
            .flat_map(|c| c.iter())
            .filter(|c| readiness_gates.contains(&c.type_))
            .map(|c| {
                (
                    c.type_.clone(),
                    GateCondition {
                        status: c.status.clone(),
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                        last_transition_time: c
                            .last_transition_time
                            .as_ref()
                            .map(|t| t.0.to_string()),
                    },
                )
            })
            .collect();
        let ready = conditions
            .iter()
            .flat_map(|c| c.iter())
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Some(NodePod {
            pod: PodRef::new(namespace, name),
            uid: meta.uid.clone().unwrap_or_default(),
            ip: status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
            annotations,
            containers,
            readiness_gates,
            gate_conditions,
            ready,
            deleting: meta.deletion_timestamp.is_some(),
        })
    }

    /// Whether the pod declares `gate` in `spec.readinessGates`.
    pub(crate) fn has_gate(&self, gate: &str) -> bool {
        self.readiness_gates.iter().any(|g| g == gate)
    }

    /// The container that declares `port`, or the only container.
    fn container_for_port(&self, port: u16) -> String {
        self.containers
            .iter()
            .find(|(_, ports)| ports.contains(&port))
            .or_else(|| (self.containers.len() == 1).then(|| &self.containers[0]))
            .map(|(name, _)| name.clone())
            .unwrap_or_default()
    }
}

/// The pods on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePods {
    pub pods: BTreeMap<PodRef, NodePod>,
    /// True once a complete listing arrived (false before, or without the API).
    pub synced: bool,
}

impl NodePods {
    /// Scrape targets from the pods' annotations
    /// ([`EngineTarget::from_pod_annotations`]), and the pods whose
    /// annotations are invalid with the error naming the annotation. Pods
    /// without `gpuscale.dev/metrics-port` are not engines; pods without an
    /// IP yet, or being deleted, are left for later.
    pub fn engine_targets(&self) -> (Vec<EngineTarget>, Vec<(PodRef, TelemetryError)>) {
        let mut targets = Vec::new();
        let mut errors = Vec::new();
        for p in self.pods.values() {
            if !p.annotations.contains_key(ANNOTATION_METRICS_PORT) || p.deleting {
                continue;
            }
            let Some(ip) = &p.ip else { continue };
            match EngineTarget::from_pod_annotations(p.pod.clone(), ip, &p.annotations) {
                Ok(Some(mut t)) => {
                    let port = p
                        .annotations
                        .get(ANNOTATION_METRICS_PORT)
                        .and_then(|v| v.trim().parse().ok());
                    if let Some(port) = port {
                        t.container = p.container_for_port(port);
                    }
                    targets.push(t);
                }
                Ok(None) => {}
                Err(e) => errors.push((p.pod.clone(), e)),
            }
        }
        (targets, errors)
    }
}

/// The field selector of this node's pods.
fn node_selector(node: &NodeName) -> String {
    format!("spec.nodeName={}", node.as_str())
}

/// A bounded class of a Kubernetes client error, for metric labels.
pub(crate) fn kube_error_kind(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) => match s.code {
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            409 => "conflict",
            410 => "expired",
            422 | 400 => "rejected",
            429 => "throttled",
            500..=599 => "server_error",
            _ => "api_other",
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => "unreachable",
        kube::Error::SerdeError(_) => "decode",
        _ => "client",
    }
}

fn watcher_error_kind(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => kube_error_kind(e),
        watcher::Error::WatchError(s) if s.code == 410 => "expired",
        watcher::Error::WatchError(s) if s.code == 403 => "forbidden",
        _ => "watch_error",
    }
}

/// One listing of the pods on `node` (for `--once`).
pub(crate) async fn list_node_pods(
    client: kube::Client,
    node: &NodeName,
    timeout: Duration,
) -> Result<NodePods, kube::Error> {
    let api: Api<Pod> = Api::all(client);
    let params = ListParams::default().fields(&node_selector(node));
    let list = match tokio::time::timeout(timeout, api.list(&params)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(kube::Error::Service(
                format!("listing pods took longer than {timeout:?}").into(),
            ));
        }
    };
    Ok(NodePods {
        pods: list
            .items
            .iter()
            .filter_map(NodePod::from_pod)
            .map(|p| (p.pod.clone(), p))
            .collect(),
        synced: true,
    })
}

/// Starts the node-scoped pod watch; the view is published on the returned
/// channel (empty and not synced until the first listing).
pub(crate) fn watch_node_pods(
    client: kube::Client,
    node: NodeName,
    stats: Arc<NodeStats>,
    shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<NodePods>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(NodePods::default()));
    let task = tokio::spawn(run_watch(client, node, stats, tx, shutdown));
    (rx, task)
}

async fn run_watch(
    client: kube::Client,
    node: NodeName,
    stats: Arc<NodeStats>,
    tx: watch::Sender<Arc<NodePods>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&node_selector(&node));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut current: BTreeMap<PodRef, NodePod> = BTreeMap::new();
    let mut initial: Option<BTreeMap<PodRef, NodePod>> = None;
    let mut failing: Option<&'static str> = None;
    stats.set_up(source::KUBERNETES, false);
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            e = events.next() => match e {
                Some(e) => e,
                None => return,
            },
        };
        let changed = match event {
            Ok(watcher::Event::Init) => {
                initial = Some(BTreeMap::new());
                false
            }
            Ok(watcher::Event::InitApply(p)) => {
                if let (Some(buf), Some(v)) = (initial.as_mut(), NodePod::from_pod(&p)) {
                    buf.insert(v.pod.clone(), v);
                }
                false
            }
            Ok(watcher::Event::InitDone) => {
                current = initial.take().unwrap_or_default();
                if let Some(kind) = failing.take() {
                    tracing::info!(node = %node.as_str(), previous_error = kind, pods = current.len(),
                        "watching this node's pods again");
                } else {
                    tracing::info!(node = %node.as_str(), pods = current.len(), "watching this node's pods");
                }
                stats.set_up(source::KUBERNETES, true);
                true
            }
            Ok(watcher::Event::Apply(p)) => match NodePod::from_pod(&p) {
                Some(v) if current.get(&v.pod) != Some(&v) => {
                    current.insert(v.pod.clone(), v);
                    true
                }
                _ => false,
            },
            Ok(watcher::Event::Delete(p)) => NodePod::from_pod(&p)
                .map(|v| current.remove(&v.pod).is_some())
                .unwrap_or(false),
            Err(e) => {
                let kind = watcher_error_kind(&e);
                stats.count_error(source::KUBERNETES, kind);
                stats.set_up(source::KUBERNETES, false);
                if failing != Some(kind) {
                    tracing::warn!(node = %node.as_str(), kind, error = %e,
                        "cannot watch this node's pods: engine discovery and readiness gates keep \
                         the last known pods; retrying with backoff");
                }
                failing = Some(kind);
                false
            }
        };
        if changed {
            tx.send_replace(Arc::new(NodePods {
                pods: current.clone(),
                synced: true,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> NodePod {
        let pod: Pod = serde_json::from_value(value).expect("a pod");
        NodePod::from_pod(&pod).expect("named")
    }

    #[test]
    fn annotated_pods_become_targets_and_bad_annotations_are_named() {
        let good = pod(json!({
            "metadata": {"name": "vllm-0", "namespace": "llm", "uid": "u1",
                "annotations": {"gpuscale.dev/metrics-port": "8000", "gpuscale.dev/framework": "vllm",
                    "other.io/x": "dropped"}},
            "spec": {"containers": [{"name": "sidecar"}, {"name": "engine", "ports": [{"containerPort": 8000}]}],
                "readinessGates": [{"conditionType": "gpuscale.dev/engine-warm"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7",
                "conditions": [{"type": "gpuscale.dev/engine-warm", "status": "False", "reason": "WarmingUp"},
                               {"type": "Ready", "status": "False"}]}
        }));
        assert_eq!(good.annotations.len(), 2, "only gpuscale.dev/* kept");
        assert!(good.has_gate(DEFAULT_READINESS_GATE));
        assert_eq!(
            good.gate_conditions[DEFAULT_READINESS_GATE]
                .reason
                .as_deref(),
            Some("WarmingUp")
        );
        let bad = pod(json!({
            "metadata": {"name": "bad-0", "namespace": "llm",
                "annotations": {"gpuscale.dev/metrics-port": "http", "gpuscale.dev/framework": "vllm"}},
            "spec": {"containers": [{"name": "engine"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.8"}
        }));
        let pending = pod(json!({
            "metadata": {"name": "new-0", "namespace": "llm",
                "annotations": {"gpuscale.dev/metrics-port": "8000", "gpuscale.dev/framework": "vllm"}},
            "spec": {"containers": [{"name": "engine"}]},
            "status": {"phase": "Pending"}
        }));
        let pods = NodePods {
            pods: [good, bad, pending]
                .into_iter()
                .map(|p| (p.pod.clone(), p))
                .collect(),
            synced: true,
        };
        let (targets, errors) = pods.engine_targets();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].metrics_url, "http://10.0.0.7:8000/metrics");
        assert_eq!(
            targets[0].container, "engine",
            "the container declaring the port"
        );
        assert_eq!(errors.len(), 1);
        let message = errors[0].1.to_string();
        assert!(
            message.contains("gpuscale.dev/metrics-port") && message.contains("http"),
            "{message}"
        );
    }
}
