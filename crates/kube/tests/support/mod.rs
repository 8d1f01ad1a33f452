//! Test support: a fake cluster (the fake API server with the CRD
//! installed), scalers running the real controller code against it, and a
//! fleet of simulated engines whose node agents stream to the scaler over
//! real gRPC and set the readiness gate the way the agent does.
//!
//! The test's own requests carry the field manager `test`, the simulated
//! agents' `gpuscale-agent`; everything else in the request log is the
//! scaler's. The test reads objects straight from the server's store (no
//! request), so the log shows only what the scaler asked.

#![allow(dead_code)]
// Test support: a setup step that fails should stop the test right there.
#![allow(clippy::unwrap_used)]

pub mod rbac;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuscale_core::sample::{
    AgentHealth, ContainerGpus, EngineSample, EngineState, Framework, GpuHealth, GpuInfo,
    GpuMetrics, GpuSample, NodeSnapshot, PodGpus,
};
use gpuscale_core::{Histogram, NodeName, PodRef, Timestamp};
use gpuscale_fake_apiserver::{
    FakeApiServer, FakeApiServerConfig, FakeApiServerHandle, RequestRecord, Verb,
};
use gpuscale_kube::{KubeConfig, KubeScaler, LeaseConfig, RunningKubeScaler};
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_client::AgentServiceClient;
use gpuscale_proto::{AgentReport, Directive, ReportBody};
use gpuscale_scaler::edge::{AuthConfig, AuthMode};
use gpuscale_scaler::{Clock, ScalerConfig};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub const NS: &str = "default";
pub const LEASE_NS: &str = "gpuscale-system";
pub const GATE: &str = "gpuscale.dev/engine-warm";
/// Field manager of the test's own writes.
pub const TEST: &str = "test";
/// Field manager of the simulated agents' gate writes.
pub const AGENT: &str = "gpuscale-agent";

pub fn post() -> PostParams {
    PostParams {
        field_manager: Some(TEST.into()),
        ..PostParams::default()
    }
}

pub fn patch_params(manager: &str) -> PatchParams {
    PatchParams {
        field_manager: Some(manager.into()),
        ..PatchParams::default()
    }
}

/// The fake API server with the InferenceAutoscaler CRD installed.
pub struct Cluster {
    pub server: Arc<FakeApiServerHandle>,
    pub client: kube::Client,
}

impl Cluster {
    pub async fn start(nodes: &[&str], pod_start_delay: Duration) -> Self {
        let server = FakeApiServer::start(FakeApiServerConfig {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            pod_start_delay,
            ..FakeApiServerConfig::default()
        })
        .await
        .unwrap();
        let client = server.client().unwrap();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.create(&post(), &gpuscale_kube::crd::crd())
            .await
            .unwrap();
        Self {
            server: Arc::new(server),
            client,
        }
    }

    /// A Deployment `name` whose pods (`app=<name>`) declare the readiness gate.
    pub async fn create_deployment(&self, name: &str, replicas: i32) {
        let d: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name},
                                 "annotations": {"gpuscale.dev/metrics-port": "8000", "gpuscale.dev/framework": "vllm"}},
                    "spec": {
                        "readinessGates": [{"conditionType": GATE}],
                        "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.9.2"}]
                    }
                }
            }
        }))
        .unwrap();
        Api::<Deployment>::namespaced(self.client.clone(), NS)
            .create(&post(), &d)
            .await
            .unwrap();
    }

    /// A StatefulSet `name` whose pods (`app=<name>`) declare the readiness gate.
    pub async fn create_statefulset(&self, name: &str, replicas: i32) {
        let sts: k8s_openapi::api::apps::v1::StatefulSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "replicas": replicas,
                "serviceName": name,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "readinessGates": [{"conditionType": GATE}],
                        "containers": [{"name": "sglang", "image": "lmsysorg/sglang:v0.5"}]
                    }
                }
            }
        }))
        .unwrap();
        Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(self.client.clone(), NS)
            .create(&post(), &sts)
            .await
            .unwrap();
    }

    /// An InferenceAutoscaler `name` with `spec`.
    pub async fn create_ias(&self, name: &str, spec: Value) {
        self.ias_api()
            .create(
                &post(),
                &serde_json::from_value(json!({
                    "apiVersion": "autoscaling.gpuscale.dev/v1alpha1",
                    "kind": "InferenceAutoscaler",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": spec,
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }

    pub async fn patch_ias(&self, name: &str, spec: Value) {
        self.ias_api()
            .patch(
                name,
                &patch_params(TEST),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await
            .unwrap();
    }

    /// Writes `status` on the InferenceAutoscaler `name`, as a scaler
    /// that ran before would have.
    pub async fn set_ias_status(&self, name: &str, status: Value) {
        self.ias_api()
            .patch_status(
                name,
                &patch_params(TEST),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .unwrap();
    }

    /// Deletes the InferenceAutoscaler `name` (as `kubectl delete` does).
    pub async fn delete_ias(&self, name: &str) {
        self.ias_api()
            .delete(name, &kube::api::DeleteParams::default())
            .await
            .unwrap();
    }

    fn ias_api(&self) -> Api<DynamicObject> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                "autoscaling.gpuscale.dev",
                "v1alpha1",
                "InferenceAutoscaler",
            ),
            "inferenceautoscalers",
        );
        Api::namespaced_with(self.client.clone(), NS, &ar)
    }

    pub fn ias(&self, name: &str) -> Value {
        self.server
            .object("autoscaling.gpuscale.dev", "inferenceautoscalers", NS, name)
            .unwrap_or(Value::Null)
    }

    /// `(status, reason, message)` of a condition of an InferenceAutoscaler.
    pub fn condition(&self, name: &str, type_: &str) -> Option<(String, String, String)> {
        let ias = self.ias(name);
        let c = ias
            .pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)?
            .clone();
        Some((
            c["status"].as_str()?.to_string(),
            c["reason"].as_str()?.to_string(),
            c["message"].as_str().unwrap_or("").to_string(),
        ))
    }

    pub fn status_i64(&self, name: &str, field: &str) -> Option<i64> {
        self.ias(name)
            .pointer(&format!("/status/{field}"))?
            .as_i64()
    }

    /// The live pods of `app` (not being deleted), by name.
    pub fn pods(&self, app: &str) -> BTreeMap<String, Value> {
        self.server
            .objects("", "pods", Some(NS))
            .into_iter()
            .filter(|p| p.pointer("/metadata/labels/app").and_then(Value::as_str) == Some(app))
            .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
            .map(|p| (p["metadata"]["name"].as_str().unwrap().to_string(), p))
            .collect()
    }

    pub fn pod_names(&self, app: &str) -> BTreeSet<String> {
        self.pods(app).into_keys().collect()
    }

    /// Pods of `app` whose readiness gate is True.
    pub fn warm_pods(&self, app: &str) -> BTreeSet<String> {
        self.pods(app)
            .into_iter()
            .filter(|(_, p)| gate_of(p) == Some("True"))
            .map(|(n, _)| n)
            .collect()
    }

    pub fn spec_replicas(&self, deployment: &str) -> i64 {
        self.server
            .object("apps", "deployments", NS, deployment)
            .and_then(|d| d.pointer("/spec/replicas").and_then(Value::as_i64))
            .unwrap_or(-1)
    }

    /// events.k8s.io Events with `reason`, about InferenceAutoscaler `name`.
    pub fn events(&self, name: &str, reason: &str) -> Vec<Value> {
        self.server
            .objects("events.k8s.io", "events", Some(NS))
            .into_iter()
            .filter(|e| e["reason"] == reason && e["regarding"]["name"] == name)
            .collect()
    }

    /// Sets the target's replicas as a user would (`kubectl scale`).
    pub async fn user_scales(&self, deployment: &str, replicas: i32) {
        Api::<Deployment>::namespaced(self.client.clone(), NS)
            .patch_scale(
                deployment,
                &patch_params(TEST),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .unwrap();
    }

    pub async fn annotate_pod(&self, pod: &str, key: &str, value: &str) {
        Api::<Pod>::namespaced(self.client.clone(), NS)
            .patch(
                pod,
                &patch_params(TEST),
                &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
            )
            .await
            .unwrap();
    }

    /// The scaler's requests: everything but the test's and the agents'.
    pub fn scaler_requests(&self) -> Vec<RequestRecord> {
        scaler_requests(&self.server.request_log())
    }

    /// The scaler's writes to a `/scale` subresource.
    pub fn scale_writes(&self) -> Vec<RequestRecord> {
        self.scaler_requests()
            .into_iter()
            .filter(|r| {
                r.subresource.as_deref() == Some("scale")
                    && matches!(r.verb, Verb::Patch | Verb::Update)
            })
            .collect()
    }
}

pub fn scaler_requests(log: &[RequestRecord]) -> Vec<RequestRecord> {
    log.iter()
        .filter(|r| !matches!(r.field_manager.as_deref(), Some(TEST) | Some(AGENT)))
        .cloned()
        .collect()
}

pub fn gate_of(pod: &Value) -> Option<&str> {
    pod.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == GATE)?
        .get("status")?
        .as_str()
}

/// A scaler configuration for tests: loopback, 1 s ticks, callers
/// authenticated and authorised by the API server (TokenReview,
/// SubjectAccessReview), as deployed.
pub fn scaler_config() -> ScalerConfig {
    let mut c = ScalerConfig::new("127.0.0.1:0".parse().unwrap());
    c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    c.tick = Duration::from_secs(1);
    c.auth = AuthConfig::with_mode(AuthMode::Kubernetes);
    c
}

/// Kubernetes mode with leader election under `identity`, writing as
/// `gpuscale-scaler-<identity>`.
pub fn kube_config(identity: &str) -> KubeConfig {
    let mut c = KubeConfig::new();
    c.identity = identity.into();
    c.field_manager = format!("gpuscale-scaler-{identity}");
    c.lease = Some(LeaseConfig::new(LEASE_NS, "gpuscale-scaler", identity));
    c
}

/// The time the scalers' clocks start at ([`start_scaler`]), milliseconds.
pub const CLOCK_START_MS: i64 = 1_750_000_000_000;

pub async fn start_scaler(cluster: &Cluster, identity: &str) -> RunningKubeScaler {
    start_scaler_with(cluster, identity, scaler_config()).await
}

/// [`start_scaler`] with `config`.
pub async fn start_scaler_with(
    cluster: &Cluster,
    identity: &str,
    config: ScalerConfig,
) -> RunningKubeScaler {
    KubeScaler::new(cluster.client.clone(), kube_config(identity), config)
        .with_clock(Clock::starting_at(Timestamp::from_millis(CLOCK_START_MS)))
        .start()
        .await
        .unwrap()
}

/// The status code of the scaler's `GET /readyz`.
pub async fn readyz(s: &RunningKubeScaler) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.scaler().http_addr().unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap()
}

/// Waits (tokio time, in 250 ms steps) until `check` holds; panics after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if check() {
            return;
        }
        if start.elapsed() > limit {
            panic!("not within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Lets `d` of tokio time pass.
pub async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

/// A valid spec for `target` with the H200 Llama-3 8B preset, reacting fast
/// (no scale-down stabilization) unless `extra` says otherwise.
pub fn spec(target: &str, min: u32, max: u32, extra: Value) -> Value {
    let mut s = json!({
        "target": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
        "minReplicas": min,
        "maxReplicas": max,
        "performanceModel": {"preset": "h200-llama3-8b-bf16"},
        "coldStartSeconds": 30,
        "drainTimeoutSeconds": 60,
        "reactive": {"stableWindowSeconds": 10},
        "telemetry": {"staleAfterSeconds": 10},
        "predictive": {"mode": "Off"},
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}},
    });
    merge(&mut s, extra);
    s
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

// ---------------------------------------------------------------------------
// The fleet: simulated engines and their node agents.

/// What happened to a pod, as the simulated agents saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The scaler asked to drain the pod.
    Drain(String),
    Undrain(String),
}

#[derive(Debug)]
struct EngineSim {
    running_since: Instant,
    drained_at: Option<Instant>,
    arrived: f64,
    prompt: f64,
    generated: f64,
    /// Per-request TTFT and TPOT histograms, when the fleet reports latencies.
    ttft: Histogram,
    tpot: Histogram,
}

impl EngineSim {
    fn new(now: Instant) -> Self {
        Self {
            running_since: now,
            drained_at: None,
            arrived: 0.0,
            prompt: 0.0,
            generated: 0.0,
            ttft: Histogram::ttft(),
            tpot: Histogram::tpot(),
        }
    }

    /// What the engine's agent reports for it.
    fn sample(
        &self,
        name: &str,
        state: EngineState,
        running: f64,
        latency: bool,
        at: Timestamp,
    ) -> EngineSample {
        let mut s = EngineSample::empty(PodRef::new(NS, name), Framework::Fake, "llama-3-8b", at);
        s.state = state;
        s.requests_running = Some(running);
        s.requests_waiting = Some(0.0);
        s.requests_arrived_total = Some(self.arrived);
        s.requests_finished_total = Some(self.arrived);
        s.prompt_tokens_total = Some(self.prompt);
        s.generation_tokens_total = Some(self.generated);
        if latency {
            s.ttft_seconds = Some(self.ttft.clone());
            s.tpot_seconds = Some(self.tpot.clone());
        }
        s
    }
}

#[derive(Debug)]
struct FleetState {
    /// Offered load over the workload's warm engines, requests per second.
    rps: f64,
    input_tokens: f64,
    output_tokens: f64,
    /// Running → warm (gate True).
    warmup: Duration,
    /// A draining engine keeps this many requests running for this long.
    drain_work: (f64, Duration),
    /// Requests running on a pod while it serves (default: its share × 2 s).
    running: HashMap<String, f64>,
    engines: HashMap<String, EngineSim>,
    drained: BTreeSet<String>,
    log: Vec<AgentEvent>,
    /// Pods seen with running > 0 when their gate was False (should not receive traffic).
    last_tick: Option<Instant>,
    /// Every warm engine's requests take this TTFT and TPOT, seconds
    /// (`None`: the engines report no latency histograms).
    latency: Option<(f64, f64)>,
    /// Pods whose GPU the agent reports unhealthy, with the reason (every
    /// other pod's GPUs are not reported).
    gpu_faults: HashMap<String, String>,
    /// Nodes whose agent sends nothing (its stream stays open).
    silent: BTreeSet<String>,
    /// Nodes whose agent's clock is off by this many milliseconds.
    skew_ms: HashMap<String, i64>,
}

/// Simulated engines of every pod in `default`, with one agent per node.
pub struct Fleet {
    state: Arc<Mutex<FleetState>>,
    task: JoinHandle<()>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fleet {
    /// Agents for `nodes`, streaming to the first of `scalers` (gRPC
    /// addresses) that accepts, like agents behind the scaler's Service.
    pub fn start(
        cluster: &Cluster,
        nodes: &[&str],
        scalers: Vec<String>,
        rps: f64,
        warmup: Duration,
    ) -> Self {
        let state = Arc::new(Mutex::new(FleetState {
            rps,
            input_tokens: 500.0,
            output_tokens: 200.0,
            warmup,
            drain_work: (2.0, Duration::from_secs(5)),
            running: HashMap::new(),
            engines: HashMap::new(),
            drained: BTreeSet::new(),
            log: Vec::new(),
            last_tick: None,
            latency: None,
            gpu_faults: HashMap::new(),
            silent: BTreeSet::new(),
            skew_ms: HashMap::new(),
        }));
        let task = tokio::spawn(run_fleet(
            cluster.server.clone(),
            cluster.client.clone(),
            nodes.iter().map(|n| n.to_string()).collect(),
            scalers,
            state.clone(),
        ));
        Self { state, task }
    }

    pub fn set_rps(&self, rps: f64) {
        self.state.lock().unwrap().rps = rps;
    }

    /// Warm engines report per-request TTFT and TPOT histograms, every
    /// request at these latencies, seconds.
    pub fn set_latency(&self, ttft_s: f64, tpot_s: f64) {
        self.state.lock().unwrap().latency = Some((ttft_s, tpot_s));
    }

    /// Requests running on `pod` while it serves.
    pub fn set_running(&self, pod: &str, running: f64) {
        self.state
            .lock()
            .unwrap()
            .running
            .insert(pod.to_string(), running);
    }

    /// The agent of `pod`'s node reports the pod's GPU unhealthy for `reason`.
    pub fn set_gpu_fault(&self, pod: &str, reason: &str) {
        self.state
            .lock()
            .unwrap()
            .gpu_faults
            .insert(pod.to_string(), reason.to_string());
    }

    /// `node`'s agent stamps its reports `ms` off the true time.
    pub fn set_clock_skew(&self, node: &str, ms: i64) {
        self.state
            .lock()
            .unwrap()
            .skew_ms
            .insert(node.to_string(), ms);
    }

    /// `node`'s agent sends nothing while `silent` (a partition, a hung
    /// agent), without closing its stream.
    pub fn set_silent(&self, node: &str, silent: bool) {
        let mut st = self.state.lock().unwrap();
        if silent {
            st.silent.insert(node.to_string());
        } else {
            st.silent.remove(node);
        }
    }

    /// A draining engine keeps `running` requests for `busy_for` after the drain.
    pub fn set_drain_work(&self, running: f64, busy_for: Duration) {
        self.state.lock().unwrap().drain_work = (running, busy_for);
    }

    pub fn events(&self) -> Vec<AgentEvent> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn drained(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().drained.clone()
    }
}

/// Wall time advancing with tokio time (the agents' clock), from `epoch`.
fn wall(epoch: Instant) -> Timestamp {
    Timestamp::from_millis(1_750_000_000_000 + i64::try_from(epoch.elapsed().as_millis()).unwrap())
}

struct Link {
    tx: mpsc::Sender<v1::NodeReport>,
    seq: u64,
    task: JoinHandle<()>,
}

/// The simulated agents' streams to the scalers, one per node.
#[derive(Default)]
struct Uplinks {
    links: HashMap<String, Link>,
    tokens: HashMap<String, String>,
    next_scaler: usize,
    seq: u64,
}

impl Uplinks {
    /// Sends `report` on the node's stream; a node without a live stream
    /// opens one (with the report as its snapshot) to the next scaler that
    /// takes it.
    async fn send(
        &mut self,
        server: &FakeApiServerHandle,
        scalers: &[String],
        state: &Arc<Mutex<FleetState>>,
        node: &str,
        mut report: AgentReport,
    ) {
        let alive = self.links.get(node).is_some_and(|l| !l.task.is_finished());
        if alive {
            let link = self.links.get_mut(node).unwrap();
            link.seq += 1;
            report.seq = link.seq;
            if link.tx.try_send((&report).into()).is_err() {
                self.links.remove(node);
            }
            return;
        }
        self.links.remove(node);
        self.seq += 1;
        report.seq = self.seq;
        for _ in 0..scalers.len() {
            let url = &scalers[self.next_scaler % scalers.len()];
            self.next_scaler += 1;
            let token = self
                .tokens
                .entry(node.to_string())
                .or_insert_with(|| agent_token(server, node));
            if let Some(mut link) = connect(url, token, &report, state.clone()).await {
                link.seq = self.seq;
                self.links.insert(node.to_string(), link);
                break;
            }
        }
    }

    /// A new stream's sequence starts above every stream's so far.
    fn settle(&mut self) {
        for link in self.links.values() {
            self.seq = self.seq.max(link.seq);
        }
    }
}

/// An unhealthy GPU held by pod `name`, and the pod's claim on it.
fn faulty_gpu(name: &str, index: usize, reason: &str) -> (GpuSample, PodGpus) {
    let uuid = gpuscale_core::GpuUuid::new(format!("GPU-{name}"));
    let gpu = GpuSample {
        info: GpuInfo {
            uuid: uuid.clone(),
            index: u32::try_from(index).unwrap(),
            model_name: "NVIDIA H200".into(),
            memory_total_bytes: 141 << 30,
            pci_bus_id: String::new(),
            parent_uuid: None,
            mig_gpu_instance_id: None,
            gpm_supported: false,
            driver_version: String::new(),
        },
        metrics: GpuMetrics {
            uuid: uuid.clone(),
            health: GpuHealth::Unhealthy {
                reason: reason.to_string(),
            },
            ..GpuMetrics::default()
        },
    };
    let held = PodGpus {
        pod: PodRef::new(NS, name),
        containers: vec![ContainerGpus {
            container: "engine".into(),
            resource_name: "nvidia.com/gpu".into(),
            gpu_uuids: vec![uuid],
        }],
    };
    (gpu, held)
}

/// The agents' readiness-gate writes: up when warm, down when draining.
async fn write_gates(pods_api: &Api<Pod>, gate_writes: Vec<(String, bool)>) {
    for (pod, up) in gate_writes {
        let (reason, status) = if up {
            ("EngineWarm", "True")
        } else {
            ("Draining", "False")
        };
        let patch = json!({"status": {"conditions": [{
            "type": GATE, "status": status, "reason": reason,
            "lastTransitionTime": "2025-06-15T00:00:00Z"}]}});
        let _ = pods_api
            .patch_status(&pod, &patch_params(AGENT), &Patch::Strategic(patch))
            .await;
    }
}

async fn run_fleet(
    server: Arc<FakeApiServerHandle>,
    client: kube::Client,
    nodes: Vec<String>,
    scalers: Vec<String>,
    state: Arc<Mutex<FleetState>>,
) {
    let pods_api: Api<Pod> = Api::namespaced(client, NS);
    let mut uplinks = Uplinks::default();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let epoch = Instant::now();
    let now_ts = || wall(epoch);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let pods: Vec<Value> = server
            .objects("", "pods", Some(NS))
            .into_iter()
            .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
            .collect();
        let mut gate_writes: Vec<(String, bool)> = Vec::new();
        let mut samples: HashMap<String, Vec<EngineSample>> = HashMap::new();
        let mut faults: HashMap<String, (Vec<GpuSample>, Vec<PodGpus>)> = HashMap::new();
        {
            let mut st = state.lock().unwrap();
            let dt = st
                .last_tick
                .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
            st.last_tick = Some(now);
            let running: Vec<&Value> = pods
                .iter()
                .filter(|p| p.pointer("/status/phase").and_then(Value::as_str) == Some("Running"))
                .collect();
            let names: BTreeSet<String> = running
                .iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
                .collect();
            st.engines.retain(|n, _| names.contains(n));
            for n in &names {
                st.engines
                    .entry(n.clone())
                    .or_insert_with(|| EngineSim::new(now));
            }
            let drained = st.drained.clone();
            let warmup = st.warmup;
            let warm: Vec<String> = names
                .iter()
                .filter(|n| {
                    !drained.contains(*n)
                        && now.saturating_duration_since(st.engines[*n].running_since) >= warmup
                })
                .cloned()
                .collect();
            let share = if warm.is_empty() {
                0.0
            } else {
                st.rps / warm.len() as f64
            };
            let (input, output) = (st.input_tokens, st.output_tokens);
            let (drain_running, drain_for) = st.drain_work;
            let latency = st.latency;
            for p in running {
                let name = p["metadata"]["name"].as_str().unwrap().to_string();
                let node = p
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let is_warm = warm.contains(&name);
                let is_drained = drained.contains(&name);
                let custom = st.running.get(&name).copied();
                let e = st.engines.get_mut(&name).unwrap();
                if is_drained && e.drained_at.is_none() {
                    e.drained_at = Some(now);
                }
                if !is_drained {
                    e.drained_at = None;
                }
                let (engine_state, running) = if is_drained {
                    let busy = e
                        .drained_at
                        .is_some_and(|t| now.saturating_duration_since(t) < drain_for);
                    (
                        EngineState::Draining,
                        if busy { drain_running } else { 0.0 },
                    )
                } else if is_warm {
                    if let Some((ttft, tpot)) = latency {
                        let before = e.arrived.floor();
                        let after = (e.arrived + share * dt).floor();
                        let n = (after - before).max(0.0) as u64;
                        e.ttft.observe_n(ttft, n);
                        e.tpot.observe_n(tpot, n);
                    }
                    e.arrived += share * dt;
                    e.prompt += share * dt * input;
                    e.generated += share * dt * output;
                    (EngineState::Warm, custom.unwrap_or((share * 2.0).round()))
                } else {
                    (EngineState::Loading, 0.0)
                };
                let s = e.sample(&name, engine_state, running, latency.is_some(), now_ts());
                samples.entry(node.to_string()).or_default().push(s);
                if let Some(reason) = st.gpu_faults.get(&name) {
                    let (gpus, held) = faults.entry(node.to_string()).or_default();
                    let (gpu, pod_gpus) = faulty_gpu(&name, gpus.len(), reason);
                    gpus.push(gpu);
                    held.push(pod_gpus);
                }
                let want_up = is_warm;
                if (gate_of(p) == Some("True")) != want_up {
                    gate_writes.push((name, want_up));
                }
            }
        }
        write_gates(&pods_api, gate_writes).await;
        let (silent, skew_ms) = {
            let st = state.lock().unwrap();
            (st.silent.clone(), st.skew_ms.clone())
        };
        for node in &nodes {
            if silent.contains(node) {
                continue;
            }
            let engines = samples.remove(node).unwrap_or_default();
            let (gpus, held) = faults.remove(node).unwrap_or_default();
            let report = AgentReport {
                boot_epoch: 7,
                seq: 0,
                sent_at: now_ts(),
                body: ReportBody::Snapshot(NodeSnapshot {
                    node: NodeName::new(node),
                    agent_version: "test".into(),
                    sampled_at: Timestamp::from_millis(
                        now_ts().as_millis() + skew_ms.get(node).copied().unwrap_or(0),
                    ),
                    sample_interval_ms: 1000,
                    gpus,
                    pods: held,
                    engines,
                    agent: AgentHealth::default(),
                }),
            };
            uplinks.send(&server, &scalers, &state, node, report).await;
        }
        uplinks.settle();
    }
}

/// `message` as an API client allowed to read the test namespace's
/// InferenceAutoscalers sends it (a user token; `get` granted through the
/// fake API server, as an RBAC Role would).
pub fn as_reader<T>(cluster: &Cluster, message: T) -> tonic::Request<T> {
    cluster.server.grant(
        gpuscale_fake_apiserver::Subject::User("test-reader".into()),
        "get",
        "autoscaling.gpuscale.dev",
        "inferenceautoscalers",
        Some(NS),
    );
    let token = cluster.server.issue_user_token("test-reader", &[]);
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The projected token an agent on `node` presents (audience `gpuscale`,
/// bound to the node), as the fake API server issues it.
pub fn agent_token(server: &FakeApiServerHandle, node: &str) -> String {
    server.issue_token(&gpuscale_fake_apiserver::TokenRequest {
        namespace: LEASE_NS.into(),
        service_account: "gpuscale-agent".into(),
        pod: Some(format!("gpuscale-agent-{node}")),
        node: Some(node.into()),
        audiences: vec!["gpuscale".into()],
        // Longer than any test runs, in tokio time.
        lifetime_seconds: 7 * 86_400,
    })
}

/// Opens a stream to the scaler at `url` with `first` as its first report
/// and the agent's `token`; `None` when it refuses (a standby).
async fn connect(
    url: &str,
    token: &str,
    first: &AgentReport,
    state: Arc<Mutex<FleetState>>,
) -> Option<Link> {
    let mut client = AgentServiceClient::connect(url.to_string()).await.ok()?;
    let (tx, rx) = mpsc::channel(16);
    tx.try_send(first.into()).ok()?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().ok()?);
    let mut inbound = client.report(request).await.ok()?.into_inner();
    let task = tokio::spawn(async move {
        while let Ok(Some(d)) = inbound.message().await {
            let Ok(d) = Directive::try_from(d) else {
                continue;
            };
            let mut st = state.lock().unwrap();
            match d {
                Directive::DrainPod { pod, .. } if st.drained.insert(pod.name.clone()) => {
                    st.log.push(AgentEvent::Drain(pod.name));
                }
                Directive::UndrainPod { pod } if st.drained.remove(&pod.name) => {
                    st.log.push(AgentEvent::Undrain(pod.name));
                }
                _ => {}
            }
        }
    });
    Some(Link { tx, seq: 0, task })
}
