//! The PodResources client against a fake kubelet: a tonic server on a real
//! unix socket in a temporary directory.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_core::ids::{GpuUuid, PodRef};
use gpuscale_core::sample::{GpuInfo, PodGpus};
use gpuscale_proto::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use gpuscale_proto::podresources::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use gpuscale_telemetry::{PodGpuSource, PodResourcesConfig, PodResourcesSource};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

const GPU0: &str = "GPU-11111111-0000-0000-0000-000000000000";
const GPU1: &str = "GPU-22222222-0000-0000-0000-000000000000";
const MIG1: &str = "MIG-33333333-0000-0000-0000-000000000000";

#[derive(Clone, Default)]
struct FakeKubelet {
    pods: Arc<Mutex<Vec<PodResources>>>,
    get_implemented: bool,
    list_calls: Arc<AtomicUsize>,
    get_calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl PodResourcesLister for FakeKubelet {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        self.list_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: self.pods.lock().unwrap().clone(),
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn get(
        &self,
        req: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        self.get_calls.fetch_add(1, Ordering::SeqCst);
        if !self.get_implemented {
            return Err(Status::unimplemented("KubeletPodResourcesGet is disabled"));
        }
        let req = req.into_inner();
        let pod = self
            .pods
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.name == req.pod_name && p.namespace == req.pod_namespace)
            .cloned();
        match pod {
            Some(p) => Ok(Response::new(GetPodResourcesResponse {
                pod_resources: Some(p),
            })),
            None => Err(Status::not_found("pod not found")),
        }
    }
}

fn pod(namespace: &str, name: &str, containers: Vec<(&str, &str, Vec<&str>)>) -> PodResources {
    PodResources {
        name: name.into(),
        namespace: namespace.into(),
        containers: containers
            .into_iter()
            .map(|(c, resource, ids)| ContainerResources {
                name: c.into(),
                devices: vec![ContainerDevices {
                    resource_name: resource.into(),
                    device_ids: ids.into_iter().map(String::from).collect(),
                    topology: None,
                }],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn two_pods() -> Vec<PodResources> {
    vec![
        pod(
            "llm",
            "vllm-0",
            vec![("vllm", "nvidia.com/gpu", vec![GPU0])],
        ),
        pod(
            "llm",
            "small-0",
            vec![("server", "nvidia.com/mig-3g.40gb", vec![MIG1])],
        ),
        // No GPU: left out.
        pod("kube-system", "coredns-1", vec![("coredns", "cpu", vec![])]),
    ]
}

fn inventory() -> Vec<GpuInfo> {
    let gpu = |uuid: &str, index: u32| GpuInfo {
        uuid: GpuUuid::new(uuid),
        index,
        model_name: "NVIDIA A100-SXM4-80GB".into(),
        memory_total_bytes: 80 << 30,
        pci_bus_id: String::new(),
        parent_uuid: None,
        mig_gpu_instance_id: None,
        gpm_supported: false,
        driver_version: "580.82.07".into(),
    };
    vec![
        gpu(GPU0, 0),
        gpu(GPU1, 1),
        GpuInfo {
            parent_uuid: Some(GpuUuid::new(GPU1)),
            mig_gpu_instance_id: Some(3),
            model_name: "NVIDIA A100-SXM4-80GB MIG 3g.40gb".into(),
            ..gpu(MIG1, 1)
        },
    ]
}

/// A fake kubelet in its own runtime on its own thread, so that stopping it
/// closes every connection, as a kubelet restart does.
struct Kubelet {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kubelet {
    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_at(socket: &Path, kubelet: FakeKubelet) -> Kubelet {
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind the socket");
    listener.set_nonblocking(true).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            let serve = tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(kubelet))
                .serve_with_incoming(UnixListenerStream::new(listener));
            tokio::select! {
                r = serve => r.expect("serve"),
                _ = rx => {}
            }
        });
        // Dropping the runtime drops every connection task.
    });
    Kubelet {
        stop: Some(tx),
        thread: Some(thread),
    }
}

struct Server {
    socket: PathBuf,
    kubelet: FakeKubelet,
    process: Kubelet,
    _dir: tempfile::TempDir,
}

fn start(kubelet: FakeKubelet) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    let process = serve_at(&socket, kubelet.clone());
    Server {
        _dir: dir,
        socket,
        kubelet,
        process,
    }
}

fn client(socket: &Path) -> PodResourcesSource {
    PodResourcesSource::new(PodResourcesConfig {
        socket_path: socket.to_path_buf(),
        min_refresh_interval: Duration::from_secs(5),
        call_timeout: Duration::from_secs(5),
        ..PodResourcesConfig::default()
    })
    .unwrap()
}

fn at(secs: f64) -> Timestamp {
    Timestamp::from_secs_f64(1_700_000_000.0 + secs)
}

fn gpus_of<'a>(pods: &'a [PodGpus], name: &str) -> Vec<&'a str> {
    pods.iter()
        .find(|p| p.pod.name == name)
        .unwrap_or_else(|| panic!("{name} not in {pods:#?}"))
        .containers
        .iter()
        .flat_map(|c| c.gpu_uuids.iter().map(|u| u.as_str()))
        .collect()
}

#[tokio::test]
async fn two_pods_are_mapped_to_their_gpus_one_through_a_mig_device() {
    let kubelet = FakeKubelet::default();
    *kubelet.pods.lock().unwrap() = two_pods();
    let server = start(kubelet);
    let mut src = client(&server.socket);
    src.set_inventory(&inventory());

    let pods = src.list_pod_gpus(at(0.0)).await.unwrap();
    assert_eq!(pods.len(), 2, "the pod without GPUs is left out: {pods:#?}");
    assert_eq!(gpus_of(&pods, "vllm-0"), vec![GPU0]);
    assert_eq!(gpus_of(&pods, "small-0"), vec![MIG1]);
    let small = pods.iter().find(|p| p.pod.name == "small-0").unwrap();
    assert_eq!(small.pod, PodRef::new("llm", "small-0"));
    assert_eq!(small.containers[0].container, "server");
    assert_eq!(small.containers[0].resource_name, "nvidia.com/mig-3g.40gb");
    assert!(src.available());
}

#[tokio::test]
async fn every_pod_sharing_a_gpu_keeps_it_and_gke_names_are_mapped() {
    let kubelet = FakeKubelet::default();
    *kubelet.pods.lock().unwrap() = vec![
        pod(
            "a",
            "ts-0",
            vec![(
                "c",
                "nvidia.com/gpu",
                vec!["GPU-11111111-0000-0000-0000-000000000000::0"],
            )],
        ),
        pod(
            "a",
            "ts-1",
            vec![(
                "c",
                "nvidia.com/gpu",
                vec!["GPU-11111111-0000-0000-0000-000000000000::1"],
            )],
        ),
        pod(
            "b",
            "gke-0",
            vec![("c", "nvidia.com/gpu", vec!["nvidia1/gi3"])],
        ),
        pod(
            "b",
            "gke-1",
            vec![("c", "nvidia.com/gpu", vec!["nvidia0/vgpu2", "nvidia9"])],
        ),
    ];
    let server = start(kubelet);
    let mut src = client(&server.socket);
    src.set_inventory(&inventory());
    let pods = src.list_pod_gpus(at(0.0)).await.unwrap();
    assert_eq!(gpus_of(&pods, "ts-0"), vec![GPU0]);
    assert_eq!(gpus_of(&pods, "ts-1"), vec![GPU0]);
    assert_eq!(gpus_of(&pods, "gke-0"), vec![MIG1]);
    // nvidia9 is not on this node: not mapped, counted.
    assert_eq!(gpus_of(&pods, "gke-1"), vec![GPU0]);
    assert_eq!(src.stats().unmapped_device_ids_total, 1);
}

#[tokio::test]
async fn list_is_called_at_most_once_per_interval_unless_invalidated() {
    let kubelet = FakeKubelet::default();
    *kubelet.pods.lock().unwrap() = two_pods();
    let server = start(kubelet);
    let mut src = client(&server.socket);
    let calls = || server.kubelet.list_calls.load(Ordering::SeqCst);

    src.list_pod_gpus(at(0.0)).await.unwrap();
    src.list_pod_gpus(at(1.0)).await.unwrap();
    src.list_pod_gpus(at(4.9)).await.unwrap();
    assert_eq!(calls(), 1, "cached within the interval");

    src.list_pod_gpus(at(5.0)).await.unwrap();
    assert_eq!(calls(), 2);

    // A new pod: the agent invalidates, the next call lists again.
    server.kubelet.pods.lock().unwrap().push(pod(
        "llm",
        "vllm-1",
        vec![("vllm", "nvidia.com/gpu", vec![GPU1])],
    ));
    src.invalidate();
    let pods = src.list_pod_gpus(at(5.5)).await.unwrap();
    assert_eq!(calls(), 3);
    assert_eq!(gpus_of(&pods, "vllm-1"), vec![GPU1]);
}

#[tokio::test]
async fn an_absent_socket_is_counted_and_the_mapping_stays_empty_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    let mut src = client(&socket);

    let pods = src.list_pod_gpus(at(0.0)).await.unwrap();
    assert!(pods.is_empty());
    assert!(!src.available());
    assert_eq!(src.stats().errors_by_kind.get("socket_absent"), Some(&1));

    let kubelet = FakeKubelet::default();
    *kubelet.pods.lock().unwrap() = two_pods();
    let _kubelet = serve_at(&socket, kubelet);
    let pods = src.list_pod_gpus(at(10.0)).await.unwrap();
    assert_eq!(pods.len(), 2);
    assert!(src.available());
}

#[tokio::test]
async fn a_refused_connection_keeps_the_last_known_mapping() {
    let kubelet = FakeKubelet::default();
    *kubelet.pods.lock().unwrap() = two_pods();
    let mut server = start(kubelet);
    let mut src = client(&server.socket);
    src.set_inventory(&inventory());
    assert_eq!(src.list_pod_gpus(at(0.0)).await.unwrap().len(), 2);

    // The kubelet goes away; the socket file stays: connections are refused.
    server.process.stop();
    let pods = src.list_pod_gpus(at(10.0)).await.unwrap();
    assert_eq!(pods.len(), 2, "last known mapping");
    assert!(!src.available());
    let errors: u64 = src.stats().errors_by_kind.values().sum();
    assert_eq!(errors, 1, "{:?}", src.stats());
}

#[tokio::test]
async fn get_is_used_when_the_kubelet_offers_it() {
    let kubelet = FakeKubelet {
        get_implemented: true,
        ..FakeKubelet::default()
    };
    *kubelet.pods.lock().unwrap() = two_pods();
    let server = start(kubelet);
    let mut src = client(&server.socket);
    src.set_inventory(&inventory());

    let p = src
        .pod(&PodRef::new("llm", "small-0"), at(0.0))
        .await
        .expect("pod with GPUs");
    assert_eq!(p.gpu_uuids(), vec![GpuUuid::new(MIG1)]);
    assert_eq!(src.get_supported(), Some(true));
    assert_eq!(server.kubelet.list_calls.load(Ordering::SeqCst), 0);
    assert!(
        src.pod(&PodRef::new("llm", "gone"), at(1.0))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn an_unimplemented_get_is_detected_once_and_list_is_used_instead() {
    let kubelet = FakeKubelet::default();
    *kubelet.pods.lock().unwrap() = two_pods();
    let server = start(kubelet);
    let mut src = client(&server.socket);
    src.set_inventory(&inventory());

    let p = src
        .pod(&PodRef::new("llm", "vllm-0"), at(0.0))
        .await
        .unwrap();
    assert_eq!(p.gpu_uuids(), vec![GpuUuid::new(GPU0)]);
    assert_eq!(src.get_supported(), Some(false));
    src.pod(&PodRef::new("llm", "small-0"), at(10.0))
        .await
        .unwrap();
    assert_eq!(
        server.kubelet.get_calls.load(Ordering::SeqCst),
        1,
        "not retried"
    );
    assert_eq!(server.kubelet.list_calls.load(Ordering::SeqCst), 2);
}

#[test]
fn config_rejects_a_refresh_interval_that_would_hammer_the_kubelet() {
    let err = PodResourcesConfig {
        min_refresh_interval: Duration::from_millis(1),
        ..PodResourcesConfig::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("pod_resources.min_refresh_interval"), "{err}");
}

#[tokio::test]
async fn a_listing_over_4_mib_is_read_as_kubernetes_own_client_reads_it() {
    // Many pods, most with CPU devices only (left out after reading), make
    // the reply larger than tonic's 4 MiB default; the kubelet's own client
    // takes up to 16 MiB.
    let kubelet = FakeKubelet::default();
    let long = "x".repeat(200);
    let mut pods: Vec<PodResources> = (0..30_000)
        .map(|i| {
            pod(
                "batch",
                &format!("job-{i}-{long}"),
                vec![("worker", "example.com/nic", vec!["nic-0"])],
            )
        })
        .collect();
    pods.push(pod(
        "llm",
        "vllm-0",
        vec![("vllm", "nvidia.com/gpu", vec![GPU0])],
    ));
    // The pod names alone are over 4 MiB (and the whole under 16 MiB).
    let names: usize = pods.iter().map(|p| p.name.len()).sum();
    assert!(
        names > 4 << 20 && names < 12 << 20,
        "{names} bytes of names"
    );
    *kubelet.pods.lock().unwrap() = pods;
    let server = start(kubelet);
    let mut src = client(&server.socket);
    src.set_inventory(&inventory());
    let mapped = src.list_pod_gpus(at(0.0)).await.unwrap();
    assert!(src.available(), "{:?}", src.last_error());
    assert_eq!(gpus_of(&mapped, "vllm-0"), vec![GPU0]);
    assert!(src.last_success().is_some());
}

#[tokio::test]
async fn a_gpu_that_is_not_on_this_node_is_counted_not_attributed() {
    let kubelet = FakeKubelet::default();
    *kubelet.pods.lock().unwrap() = vec![pod(
        "llm",
        "vllm-0",
        vec![(
            "vllm",
            "nvidia.com/gpu",
            vec![GPU0, "GPU-99999999-0000-0000-0000-000000000000"],
        )],
    )];
    let server = start(kubelet);
    let mut src = client(&server.socket);
    src.set_inventory(&inventory());
    let mapped = src.list_pod_gpus(at(0.0)).await.unwrap();
    assert_eq!(gpus_of(&mapped, "vllm-0"), vec![GPU0]);
    assert_eq!(src.stats().unmapped_device_ids_total, 1);
}
