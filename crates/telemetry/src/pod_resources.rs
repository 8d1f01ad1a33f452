//! Which pods hold which GPUs, from the kubelet PodResources v1 API.
//!
//! [`PodResourcesSource`] calls `List` on the kubelet's unix socket
//! (`/var/lib/kubelet/pod-resources/kubelet.sock` by default; mount the
//! *directory*, the kubelet recreates the socket on restart), keeps the GPU
//! devices of each container, and maps their IDs to NVML UUIDs with the
//! node's inventory ([`crate::device_id`]). Every pod of a shared GPU is kept
//! (one-to-many), unlike dcgm-exporter's last-one-wins map.
//!
//! # Rate
//!
//! The kubelet rate-limits this API (100 QPS, burst 10). The source caches
//! the last listing and calls `List` at most once per
//! [`PodResourcesConfig::min_refresh_interval`], or sooner after
//! [`PodResourcesSource::invalidate`] (the agent calls it when it sees a new
//! pod). `Get` (beta since Kubernetes 1.34) answers for one pod; a kubelet
//! without it answers `Unimplemented`, which the source notices once and then
//! uses `List` only.
//!
//! # Failures
//!
//! An absent socket, a refused connection, a timeout or an RPC error is
//! counted by kind, logged once per change (warn when it starts failing,
//! info when it recovers), and the last known mapping (empty at first) is
//! returned: attribution degrades, the agent keeps reporting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_core::ids::PodRef;
use gpuscale_core::sample::{ContainerGpus, GpuInfo, PodGpus};
use gpuscale_proto::podresources::pod_resources_lister_client::PodResourcesListerClient;
use gpuscale_proto::podresources::{GetPodResourcesRequest, ListPodResourcesRequest, PodResources};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{info, warn};

use crate::device_id::{parse_device_id, resolve_device_id};
use crate::error::TelemetryError;
use crate::source::{PodGpuSource, SourceError};

/// Largest `List` reply accepted: Kubernetes' own client takes 16 MiB
/// (`podresources.DefaultMaxMsgSize`); a node with many pods and devices
/// exceeds tonic's 4 MiB default.
pub(crate) const MAX_REPLY_BYTES: usize = 16 << 20;

/// The kubelet's PodResources socket.
pub const DEFAULT_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// Resource names whose devices are GPUs, besides every `nvidia.com/mig-*`.
pub(crate) const DEFAULT_GPU_RESOURCE_NAMES: &[&str] = &["nvidia.com/gpu", "nvidia.com/gpu.shared"];

/// How the PodResources client connects and refreshes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodResourcesConfig {
    pub socket_path: PathBuf,
    /// Calls `List` at most this often (unless invalidated).
    pub min_refresh_interval: Duration,
    /// Deadline of one RPC, connection included.
    pub call_timeout: Duration,
    /// Resource names counted as GPUs (every `nvidia.com/mig-*` is too).
    pub gpu_resource_names: Vec<String>,
}

impl Default for PodResourcesConfig {
    fn default() -> Self {
        Self {
            socket_path: PathBuf::from(DEFAULT_POD_RESOURCES_SOCKET),
            min_refresh_interval: Duration::from_secs(5),
            call_timeout: Duration::from_secs(5),
            gpu_resource_names: DEFAULT_GPU_RESOURCE_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

impl PodResourcesConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if self.socket_path.as_os_str().is_empty() {
            return Err(TelemetryError::config(
                "pod_resources.socket_path",
                "",
                "the path of the kubelet's pod-resources socket",
            ));
        }
        if self.min_refresh_interval < Duration::from_millis(100)
            || self.min_refresh_interval > Duration::from_secs(600)
        {
            return Err(TelemetryError::config(
                "pod_resources.min_refresh_interval",
                format!("{:?}", self.min_refresh_interval),
                "between 100 ms and 10 min (the kubelet allows 100 calls/s)",
            ));
        }
        if self.call_timeout < Duration::from_millis(10)
            || self.call_timeout > Duration::from_secs(60)
        {
            return Err(TelemetryError::config(
                "pod_resources.call_timeout",
                format!("{:?}", self.call_timeout),
                "between 10 ms and 60 s",
            ));
        }
        if self.gpu_resource_names.iter().any(|n| n.trim().is_empty()) {
            return Err(TelemetryError::config(
                "pod_resources.gpu_resource_names",
                format!("{:?}", self.gpu_resource_names),
                "non-empty resource names such as nvidia.com/gpu",
            ));
        }
        Ok(())
    }

    fn is_gpu_resource(&self, name: &str) -> bool {
        name.starts_with("nvidia.com/mig-") || self.gpu_resource_names.iter().any(|n| n == name)
    }
}

/// Counters of the PodResources client, for the agent's own metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodResourcesStats {
    pub list_calls_total: u64,
    pub get_calls_total: u64,
    /// Failures by kind: `socket_absent`, `unavailable`, `timeout`, `rpc`.
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// Device IDs that could not be mapped to a GPU of this node (an
    /// unknown form, or a GPU that NVML does not list here).
    pub unmapped_device_ids_total: u64,
}

/// A container's GPU devices as the kubelet listed them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListedContainer {
    container: String,
    resource_name: String,
    device_ids: Vec<String>,
}

/// GPU-to-pod attribution from the kubelet. See the module docs.
#[derive(Debug)]
pub struct PodResourcesSource {
    config: PodResourcesConfig,
    client: Option<PodResourcesListerClient<Channel>>,
    inventory: Vec<GpuInfo>,
    /// The last listing, GPU devices only, by pod.
    listed: BTreeMap<PodRef, Vec<ListedContainer>>,
    mapped: Vec<PodGpus>,
    last_refresh: Option<Timestamp>,
    invalidated: bool,
    /// `Some(false)` once the kubelet answered `Get` with `Unimplemented`.
    get_supported: Option<bool>,
    /// The kind of the current failure, `None` while healthy.
    failing: Option<&'static str>,
    /// Why the last call failed, while it does.
    last_error: Option<String>,
    /// When the kubelet last answered.
    last_success: Option<Timestamp>,
    available: bool,
    /// Device IDs last found unmapped (logged when they change).
    unmapped: Vec<String>,
    stats: PodResourcesStats,
}

impl PodResourcesSource {
    /// Validates the config. Connects lazily, on the first refresh.
    pub fn new(config: PodResourcesConfig) -> Result<Self, TelemetryError> {
        config.validate()?;
        Ok(Self {
            config,
            client: None,
            inventory: Vec::new(),
            listed: BTreeMap::new(),
            mapped: Vec::new(),
            last_refresh: None,
            invalidated: false,
            get_supported: None,
            failing: None,
            last_error: None,
            last_success: None,
            available: false,
            unmapped: Vec::new(),
            stats: PodResourcesStats::default(),
        })
    }

    /// Sets the node's GPUs (from the NVML source) used to map device IDs;
    /// the cached listing is re-mapped at once.
    pub fn set_inventory(&mut self, inventory: &[GpuInfo]) {
        if self.inventory.as_slice() != inventory {
            self.inventory = inventory.to_vec();
            self.remap();
        }
    }

    /// Forces a refresh on the next call (a pod appeared, a pod went away).
    pub fn invalidate(&mut self) {
        self.invalidated = true;
    }

    /// Whether the last call to the kubelet succeeded.
    pub fn available(&self) -> bool {
        self.available
    }

    /// Whether the kubelet offers `Get` (unknown until tried).
    pub fn get_supported(&self) -> Option<bool> {
        self.get_supported
    }

    pub fn stats(&self) -> &PodResourcesStats {
        &self.stats
    }

    pub fn config(&self) -> &PodResourcesConfig {
        &self.config
    }

    /// When the kubelet last answered (`now` of that refresh); `None` if
    /// it never did.
    pub fn last_success(&self) -> Option<Timestamp> {
        self.last_success
    }

    /// Why the last call failed, while the kubelet is unavailable.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The current mapping, without refreshing.
    pub fn cached(&self) -> &[PodGpus] {
        &self.mapped
    }

    fn client(&mut self) -> PodResourcesListerClient<Channel> {
        if let Some(c) = &self.client {
            return c.clone();
        }
        let path = self.config.socket_path.clone();
        // The URI is a placeholder: every connection goes to the socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(self.config.call_timeout)
            .timeout(self.config.call_timeout)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        let client =
            PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_REPLY_BYTES);
        self.client = Some(client.clone());
        client
    }

    fn refresh_due(&self, now: Timestamp) -> bool {
        self.invalidated
            || self.last_refresh.is_none_or(|t| {
                now.secs_since(t) >= self.config.min_refresh_interval.as_secs_f64() || now < t
            })
    }

    /// The mapping, refreshed with `List` when due.
    pub async fn refresh(&mut self, now: Timestamp) -> &[PodGpus] {
        if !self.refresh_due(now) {
            return &self.mapped;
        }
        self.last_refresh = Some(now);
        self.invalidated = false;
        if !self.config.socket_path.exists() {
            self.record_failure(
                "socket_absent",
                "the socket does not exist (is /var/lib/kubelet/pod-resources mounted?)".into(),
            );
            return &self.mapped;
        }
        let mut client = self.client();
        self.stats.list_calls_total += 1;
        let call = client.list(ListPodResourcesRequest {});
        match tokio::time::timeout(self.config.call_timeout, call).await {
            Ok(Ok(resp)) => {
                self.listed = resp
                    .into_inner()
                    .pod_resources
                    .iter()
                    .filter_map(|p| self.gpu_containers(p))
                    .collect();
                self.record_success(now);
                self.remap();
            }
            Ok(Err(status)) => {
                let kind = status_kind(&status);
                self.record_failure(kind, format!("List: {}", status.message()));
            }
            Err(_) => self.record_failure(
                "timeout",
                format!("List: no answer within {:?}", self.config.call_timeout),
            ),
        }
        &self.mapped
    }

    /// The GPUs of one pod: through `Get` when the kubelet offers it,
    /// otherwise a fresh `List`. `None` when the pod holds no GPU or is
    /// unknown to the kubelet.
    pub async fn pod(&mut self, pod: &PodRef, now: Timestamp) -> Option<PodGpus> {
        if self.get_supported != Some(false) && self.config.socket_path.exists() {
            let mut client = self.client();
            self.stats.get_calls_total += 1;
            let call = client.get(GetPodResourcesRequest {
                pod_name: pod.name.clone(),
                pod_namespace: pod.namespace.clone(),
            });
            match tokio::time::timeout(self.config.call_timeout, call).await {
                Ok(Ok(resp)) => {
                    self.get_supported = Some(true);
                    self.record_success(now);
                    let listed = resp
                        .into_inner()
                        .pod_resources
                        .and_then(|p| self.gpu_containers(&p));
                    match listed {
                        Some((r, containers)) => {
                            self.listed.insert(r, containers);
                        }
                        None => {
                            self.listed.remove(pod);
                        }
                    }
                    self.remap();
                    return self.mapped.iter().find(|p| &p.pod == pod).cloned();
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    info!(socket = %self.config.socket_path.display(),
                        "the kubelet does not offer PodResources Get; using List only");
                    self.get_supported = Some(false);
                }
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                    self.get_supported = Some(true);
                    self.record_success(now);
                    if self.listed.remove(pod).is_some() {
                        self.remap();
                    }
                    return None;
                }
                Ok(Err(status)) => {
                    let kind = status_kind(&status);
                    self.record_failure(kind, format!("Get: {}", status.message()));
                    return self.mapped.iter().find(|p| &p.pod == pod).cloned();
                }
                Err(_) => {
                    self.record_failure(
                        "timeout",
                        format!("Get: no answer within {:?}", self.config.call_timeout),
                    );
                    return self.mapped.iter().find(|p| &p.pod == pod).cloned();
                }
            }
        }
        self.invalidate();
        self.refresh(now).await;
        self.mapped.iter().find(|p| &p.pod == pod).cloned()
    }

    fn gpu_containers(&self, p: &PodResources) -> Option<(PodRef, Vec<ListedContainer>)> {
        let containers: Vec<ListedContainer> = p
            .containers
            .iter()
            .flat_map(|c| {
                c.devices
                    .iter()
                    .filter(|d| self.config.is_gpu_resource(&d.resource_name))
                    .filter(|d| !d.device_ids.is_empty())
                    .map(|d| ListedContainer {
                        container: c.name.clone(),
                        resource_name: d.resource_name.clone(),
                        device_ids: d.device_ids.clone(),
                    })
            })
            .collect();
        if containers.is_empty() {
            return None;
        }
        Some((PodRef::new(p.namespace.clone(), p.name.clone()), containers))
    }

    fn remap(&mut self) {
        let mut unmapped: Vec<String> = Vec::new();
        self.mapped = self
            .listed
            .iter()
            .map(|(pod, containers)| PodGpus {
                pod: pod.clone(),
                containers: containers
                    .iter()
                    .map(|c| {
                        let mut gpu_uuids = Vec::new();
                        for raw in &c.device_ids {
                            match resolve_device_id(&parse_device_id(raw), &self.inventory) {
                                Some(u) => {
                                    if !gpu_uuids.contains(&u) {
                                        gpu_uuids.push(u);
                                    }
                                }
                                None => unmapped.push(format!("{pod}: {raw}")),
                            }
                        }
                        ContainerGpus {
                            container: c.container.clone(),
                            resource_name: c.resource_name.clone(),
                            gpu_uuids,
                        }
                    })
                    .collect(),
            })
            .collect();
        self.stats.unmapped_device_ids_total += unmapped.len() as u64;
        if unmapped != self.unmapped {
            if !unmapped.is_empty() {
                warn!(socket = %self.config.socket_path.display(), devices = ?unmapped,
                    gpus_on_node = self.inventory.len(),
                    "device IDs the kubelet lists that are not GPUs of this node: not attributed");
            }
            self.unmapped = unmapped;
        }
    }

    fn record_success(&mut self, now: Timestamp) {
        if let Some(kind) = self.failing.take() {
            info!(socket = %self.config.socket_path.display(), previous_error = kind,
                "pod-resources reachable again");
        }
        self.available = true;
        self.last_error = None;
        self.last_success = Some(now);
    }

    fn record_failure(&mut self, kind: &'static str, message: String) {
        *self.stats.errors_by_kind.entry(kind).or_default() += 1;
        if self.failing != Some(kind) {
            warn!(socket = %self.config.socket_path.display(), kind, error = %message,
                pods_kept = self.mapped.len(),
                "pod-resources unavailable: GPU-to-pod attribution keeps the last known mapping");
        }
        self.failing = Some(kind);
        self.last_error = Some(format!("{kind}: {message}"));
        self.available = false;
        // A dead channel is rebuilt on the next attempt.
        if kind != "rpc" {
            self.client = None;
        }
    }
}

fn status_kind(status: &tonic::Status) -> &'static str {
    match status.code() {
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => "timeout",
        _ => "rpc",
    }
}

impl PodGpuSource for PodResourcesSource {
    async fn list_pod_gpus(&mut self, now: Timestamp) -> Result<Vec<PodGpus>, SourceError> {
        Ok(self.refresh(now).await.to_vec())
    }
}
