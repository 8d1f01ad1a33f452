//! The manifests and the image agree. Every container of every workload in
//! every overlay (`kubectl kustomize deploy/overlays/*`):
//!
//! * runs the one gpuscale image (the production tag is the crate's
//!   version, the Containerfile's version label), as the image's user
//!   (65532, non-root) unless it names root with a reason here, with a
//!   read-only root filesystem, no privilege escalation, every capability
//!   dropped, the runtime's seccomp profile, and CPU and memory requests
//!   within its limits;
//! * passes args whose every flag and value the binary accepts (`gpuscale
//!   ARGS --help` parses all of them before it prints help);
//! * started as rendered (its args and env; listen addresses moved to free
//!   loopback ports, unix sockets into a temporary directory, in-cluster
//!   Service URLs to the listener behind the
//!   Service, the Kubernetes API a fake API server holding the rendered CRD
//!   and Namespace; mounted volumes as the kubelet fills them: the serving
//!   certificate's Secret and the CA ConfigMap from a test CA, the projected
//!   ServiceAccount token issued by the fake API server for the pod's
//!   account, audience and node), answers 200 on every probe's path and
//!   port, and the agent streams to the scaler over TLS with its token.
//!
//! And an `images:` override in an overlay of one's own (the README's
//! install path) reaches every container.

mod containerfile;
mod kustomize;
#[path = "../crates/scaler/tests/pki/mod.rs"]
mod pki;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuscale_fake_apiserver::{
    FakeApiServer, FakeApiServerConfig, FakeApiServerHandle, TokenRequest,
};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kustomize::strings;
use serde_json::Value;

/// Containers that run as root, and why (everything else runs as the
/// image's user).
const ROOT_CONTAINERS: &[(&str, &str, &str)] = &[(
    "gpuscale-agent",
    "agent",
    "the kubelet's PodResources socket is root's",
)];

/// The node the fake cluster has, for `spec.nodeName`.
const NODE: &str = "gpu-node-1";

/// One container of a workload, with the pod it is in.
#[derive(Debug, Clone)]
struct Container {
    kind: String,
    workload: String,
    namespace: String,
    pod_labels: Value,
    pod: Value,
    spec: Value,
}

impl Container {
    fn name(&self) -> &str {
        self.spec["name"].as_str().unwrap_or("?")
    }

    fn what(&self) -> String {
        format!("{} {}, container {}", self.kind, self.workload, self.name())
    }

    fn args(&self) -> Vec<String> {
        strings(&self.spec["args"])
    }

    /// The containerPort a probe's or Service's port names (a name or a
    /// number).
    fn container_port(&self, port: &Value) -> Option<u16> {
        let ports = self.spec["ports"].as_array()?;
        let found = match port {
            Value::String(name) => ports.iter().find(|p| p["name"] == name.as_str()),
            Value::Number(n) => ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == n.as_u64()),
            _ => None,
        }?;
        found["containerPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
    }

    fn probes(&self) -> Vec<(&'static str, &Value)> {
        ["startupProbe", "livenessProbe", "readinessProbe"]
            .into_iter()
            .filter(|k| self.spec[k].is_object())
            .map(|k| (k, &self.spec[k]))
            .collect()
    }
}

/// Every container of every workload (Deployment, DaemonSet, StatefulSet,
/// Job, CronJob), init containers included.
fn containers(objs: &[Value]) -> Vec<Container> {
    let mut out = Vec::new();
    for o in objs {
        let kind = o["kind"].as_str().unwrap_or("");
        let template = match kind {
            "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
                &o["spec"]["template"]
            }
            "CronJob" => &o["spec"]["jobTemplate"]["spec"]["template"],
            "Pod" => o,
            _ => continue,
        };
        let pod = &template["spec"];
        for list in ["initContainers", "containers"] {
            for c in pod[list].as_array().into_iter().flatten() {
                out.push(Container {
                    kind: kind.to_string(),
                    workload: o["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    namespace: o["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string(),
                    pod_labels: template["metadata"]["labels"].clone(),
                    pod: pod.clone(),
                    spec: c.clone(),
                });
            }
        }
    }
    out
}

/// The image name and tag the base kustomization gives `gpuscale`.
fn base_image_name() -> String {
    let base = std::fs::read_to_string(kustomize::root().join("deploy/base/kustomization.yaml"))
        .expect("deploy/base/kustomization.yaml");
    let k = &kustomize::docs(&base)[0];
    let images = k["images"].as_array().expect("the base sets images");
    let gpuscale = images
        .iter()
        .find(|i| i["name"] == "gpuscale")
        .expect("the base maps the image `gpuscale`");
    gpuscale["newName"].as_str().expect("a newName").to_string()
}

/// A Kubernetes quantity in base units (cores, bytes).
fn quantity(q: &Value) -> f64 {
    let s = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => panic!("not a quantity: {q}"),
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let n: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("not a quantity: {s}"));
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("quantity {s}: suffix {suffix} not understood by this test"),
    };
    n * scale
}

#[test]
fn every_container_runs_the_image_as_its_user_read_only_without_capabilities_with_requests() {
    let runtime = containerfile::runtime();
    let image_user = runtime.one("USER").to_string();
    let (uid, gid) = image_user.split_once(':').expect("USER uid:gid");
    let (uid, gid): (i64, i64) = (uid.parse().expect("uid"), gid.parse().expect("gid"));
    let version = runtime.labels()["org.opencontainers.image.version"].clone();
    let image_name = base_image_name();

    let overlays = kustomize::overlay_names();
    assert!(overlays.contains(&"production".to_string()) && overlays.contains(&"dev".to_string()));
    for overlay in &overlays {
        let objs = kustomize::overlay(overlay);
        let all = containers(&objs);
        assert!(
            all.len() >= 2,
            "{overlay}: the scaler and the agent at least: {all:?}"
        );
        for c in &all {
            let what = format!("{overlay}: {}", c.what());
            let sc = &c.spec["securityContext"];
            let psc = &c.pod["securityContext"];

            // The image: one for every role; production pins the release.
            let image = c.spec["image"].as_str().expect("an image");
            let (name, tag) = image.rsplit_once(':').expect("a tagged image");
            assert_eq!(name, image_name, "{what}");
            match overlay.as_str() {
                "production" => assert_eq!(tag, version, "{what}: the release's tag"),
                "dev" => assert_eq!(tag, "latest", "{what}"),
                _ => {}
            }
            assert!(
                c.spec["command"].is_null(),
                "{what}: runs the image's entrypoint (no `command`)"
            );

            // The user.
            let run_as = |k: &str| sc[k].as_i64().or_else(|| psc[k].as_i64());
            let non_root = sc["runAsNonRoot"]
                .as_bool()
                .or_else(|| psc["runAsNonRoot"].as_bool());
            match ROOT_CONTAINERS
                .iter()
                .find(|(w, n, _)| *w == c.workload && *n == c.name())
            {
                Some((_, _, why)) => {
                    assert_eq!(
                        run_as("runAsUser"),
                        Some(0),
                        "{what} runs as root ({why}), said explicitly"
                    );
                    assert_ne!(non_root, Some(true), "{what}");
                }
                None => {
                    assert_eq!(
                        run_as("runAsUser").unwrap_or(uid),
                        uid,
                        "{what}: the image's user"
                    );
                    assert_eq!(
                        run_as("runAsGroup").unwrap_or(gid),
                        gid,
                        "{what}: the image's group"
                    );
                    assert_eq!(non_root, Some(true), "{what}: runAsNonRoot");
                }
            }

            // Least privilege.
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_ne!(sc["privileged"], true, "{what}");
            assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{what}");
            assert!(
                sc["capabilities"]["add"].is_null(),
                "{what}: adds no capability"
            );
            let seccomp = if sc["seccompProfile"].is_object() {
                &sc["seccompProfile"]
            } else {
                &psc["seccompProfile"]
            };
            assert_eq!(seccomp["type"], "RuntimeDefault", "{what}");

            // Requests within limits.
            let res = &c.spec["resources"];
            for r in ["cpu", "memory"] {
                let request = &res["requests"][r];
                assert!(!request.is_null(), "{what}: requests {r}");
                assert!(quantity(request) > 0.0, "{what}: requests {r}");
                let limit = &res["limits"][r];
                if !limit.is_null() {
                    assert!(
                        quantity(request) <= quantity(limit),
                        "{what}: {r} request {request} above its limit {limit}"
                    );
                }
            }
            assert!(!res["limits"]["memory"].is_null(), "{what}: a memory limit");

            // Probes: HTTP on a declared port (the image has no shell for exec probes).
            assert!(
                c.probes().iter().any(|(k, _)| *k == "livenessProbe")
                    && c.probes().iter().any(|(k, _)| *k == "readinessProbe"),
                "{what}: liveness and readiness probes"
            );
            for (kind, probe) in c.probes() {
                assert!(
                    probe["exec"].is_null(),
                    "{what}: {kind} execs a command, but the image has no shell"
                );
                let get = &probe["httpGet"];
                assert!(
                    get.is_object(),
                    "{what}: {kind} is not an httpGet probe: {probe}"
                );
                assert!(
                    c.container_port(&get["port"]).is_some(),
                    "{what}: {kind} port {} is not a containerPort",
                    get["port"]
                );
            }
        }
    }
}

#[test]
fn every_flag_and_value_in_the_rendered_args_is_accepted_by_the_binary() {
    for overlay in kustomize::overlay_names() {
        for c in containers(&kustomize::overlay(&overlay)) {
            let args = c.args();
            assert!(!args.is_empty(), "{overlay}: {}: no args", c.what());
            // clap parses every argument before it acts on a trailing
            // --help: an unknown flag or a bad value fails with exit 2.
            let out = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
                .args(&args)
                .arg("--help")
                .env_clear()
                .output()
                .expect("the binary runs");
            assert!(
                out.status.success(),
                "{overlay}: {}: the binary refuses `{}`:\n{}",
                c.what(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn an_images_override_in_an_overlay_of_ones_own_reaches_every_container() {
    // The README's install path: an overlay next to the checkout that
    // points the production overlay at one's own registry.
    let dir = tempfile::tempdir().expect("tempdir");
    let production = kustomize::root().join("deploy/overlays/production");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\n\
             images:\n  - name: {}\n    newName: registry.example.com/platform/gpuscale\n    newTag: 0.1.0-abc123\n",
            relative(dir.path(), &production).display(),
            base_image_name(),
        ),
    )
    .expect("write kustomization.yaml");
    let objs = kustomize::kustomize(dir.path());
    let all = containers(&objs);
    assert!(!all.is_empty());
    for c in all {
        assert_eq!(
            c.spec["image"],
            "registry.example.com/platform/gpuscale:0.1.0-abc123",
            "{}",
            c.what()
        );
    }
}

/// `to` relative to `from` (both absolute): kustomize takes relative paths.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_containers_started_as_rendered_answer_their_probes() {
    start_as_rendered_and_probe("production").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_containers_started_as_rendered_answer_their_probes() {
    start_as_rendered_and_probe("dev").await;
}

/// A started container: killed when dropped; its output in `log`.
struct Running {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}) as rendered:\n{}",
                self.what,
                self.log()
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `GET path` on 127.0.0.1:port: the status code, or why there is none.
fn http_get(port: u16, path: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))
}

/// A listen address a container binds on every interface: `0.0.0.0:P`,
/// `[::]:P` or `:P`.
fn bind_port(value: &str) -> Option<u16> {
    let port = value
        .strip_prefix("0.0.0.0:")
        .or_else(|| value.strip_prefix("[::]:"))
        .or_else(|| value.strip_prefix(':'))?;
    port.parse().ok()
}

/// `scheme://NAME.NAMESPACE.svc[.cluster.local]:PORT[/…]`, split.
fn service_url(value: &str) -> Option<(String, String, String, u16, String)> {
    let (scheme, rest) = value.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (host, port) = authority.rsplit_once(':')?;
    let host = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))?;
    let (name, namespace) = host.split_once('.')?;
    Some((
        scheme.to_string(),
        name.to_string(),
        namespace.to_string(),
        port.parse().ok()?,
        path.to_string(),
    ))
}

/// The loopback port standing in for each container's containerPorts.
type Ports = BTreeMap<(String, String, u16), u16>;

fn local_port(ports: &Ports, c: &Container, port: u16) -> u16 {
    *ports
        .get(&(c.workload.clone(), c.name().to_string(), port))
        .unwrap_or_else(|| {
            panic!(
                "{}: binds port {port}, which it does not declare as a containerPort",
                c.what()
            )
        })
}

/// The container a Service port leads to: the one in a pod the selector
/// matches with a containerPort the targetPort names.
fn behind_service(
    objs: &[Value],
    all: &[Container],
    name: &str,
    namespace: &str,
    port: u16,
) -> (Container, u16) {
    let svc = objs
        .iter()
        .find(|o| {
            o["kind"] == "Service"
                && o["metadata"]["name"] == name
                && o["metadata"]["namespace"] == namespace
        })
        .unwrap_or_else(|| panic!("no Service {namespace}/{name} in the manifests"));
    let sp = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("Service {name} has no port {port}"));
    let target = if sp["targetPort"].is_null() {
        Value::from(port)
    } else {
        sp["targetPort"].clone()
    };
    let selector = svc["spec"]["selector"].as_object().expect("a selector");
    for c in all {
        let selected =
            c.namespace == namespace && selector.iter().all(|(k, v)| c.pod_labels[k] == *v);
        if let (true, Some(p)) = (selected, c.container_port(&target)) {
            return (c.clone(), p);
        }
    }
    panic!("Service {name} port {port} (targetPort {target}) leads to no container")
}

/// The value of a rendered env var; fieldRefs as the kubelet fills them.
fn env_value(c: &Container, e: &Value) -> String {
    if let Some(v) = e["value"].as_str() {
        return v.to_string();
    }
    let field = e["valueFrom"]["fieldRef"]["fieldPath"].as_str();
    match field {
        Some("metadata.name") => format!("{}-0", c.workload),
        Some("metadata.namespace") => c.namespace.clone(),
        Some("spec.nodeName") => NODE.to_string(),
        Some("status.podIP" | "status.hostIP") => "127.0.0.1".to_string(),
        Some("spec.serviceAccountName") => c.pod["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        _ => panic!(
            "{}: env {} comes from {}, which this test cannot provide yet: teach `env_value` \
             in tests/manifests.rs how (as the kubelet would fill it)",
            c.what(),
            e["name"],
            e["valueFrom"]
        ),
    }
}

/// The rendered objects the fake API server holds before anything starts:
/// what `kubectl apply` would create that it serves (Namespaces, CRDs).
async fn apply(server: &FakeApiServerHandle, objs: &[Value]) {
    let client = server.client().expect("a client for the fake API server");
    for o in objs {
        let (gvk, plural) = match o["kind"].as_str() {
            Some("Namespace") => (GroupVersionKind::gvk("", "v1", "Namespace"), "namespaces"),
            Some("CustomResourceDefinition") => (
                GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
                "customresourcedefinitions",
            ),
            _ => continue,
        };
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let obj: DynamicObject = serde_json::from_value(o.clone()).expect("a Kubernetes object");
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create {} {}: {e}", o["kind"], o["metadata"]["name"]));
    }
}

async fn start_as_rendered_and_probe(overlay: &str) {
    let objs = kustomize::overlay(overlay);
    let all = containers(&objs);
    let server = FakeApiServer::start(FakeApiServerConfig {
        nodes: vec![NODE.to_string()],
        ..FakeApiServerConfig::default()
    })
    .await
    .expect("the fake API server starts");
    apply(&server, &objs).await;

    // The cluster's API for every container, as the service account gives
    // it in a cluster.
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            server.url()
        ),
    )
    .expect("write kubeconfig");

    let mut ports = Ports::new();
    for c in &all {
        for p in c.spec["ports"].as_array().into_iter().flatten() {
            let port = p["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .expect("a port");
            ports.insert(
                (c.workload.clone(), c.name().to_string(), port),
                free_port(),
            );
        }
    }

    // The cluster's CA: the serving certificate's Secret and the CA
    // ConfigMap are made from it.
    let ca = pki::Pki::new();
    let mut running = Vec::new();
    for c in all.iter().filter(|c| c.spec["ports"].is_array()) {
        let what = format!("{overlay}: {}", c.what());
        // Where each mounted volume's files are (mount path → local directory).
        let mut mounted: Vec<(String, PathBuf)> = Vec::new();
        for m in c.spec["volumeMounts"].as_array().into_iter().flatten() {
            let volume = c.pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| {
                    panic!("{what}: mounts volume {}, which the pod lacks", m["name"])
                });
            if volume["hostPath"].is_object() || volume["emptyDir"].is_object() {
                continue;
            }
            let local = dir.path().join(format!(
                "{}-{}-{}",
                c.workload,
                c.name(),
                m["name"].as_str().unwrap_or("volume")
            ));
            std::fs::create_dir_all(&local).expect("a volume directory");
            if let Some(secret) = volume["secret"]["secretName"].as_str() {
                // The one Secret: the scaler's serving certificate, for the
                // Service's names and the loopback address the agent uses here.
                assert_eq!(secret, "gpuscale-scaler-tls", "{what}: an unknown Secret");
                ca.write_leaf(
                    &local.join("tls.crt"),
                    &local.join("tls.key"),
                    &[
                        "gpuscale-scaler.gpuscale-system.svc",
                        "gpuscale-scaler.gpuscale-system.svc.cluster.local",
                        "127.0.0.1",
                    ],
                    true,
                );
            } else if let Some(config_map) = volume["configMap"]["name"].as_str() {
                assert_eq!(config_map, "gpuscale-ca", "{what}: an unknown ConfigMap");
                for item in volume["configMap"]["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    assert_eq!(item["key"], "ca.crt");
                    let path = item["path"].as_str().expect("an item path");
                    std::fs::write(local.join(path), ca.ca_pem()).expect("write the CA");
                }
            } else if let Some(sources) = volume["projected"]["sources"].as_array() {
                for source in sources {
                    let t = &source["serviceAccountToken"];
                    assert!(
                        t.is_object(),
                        "{what}: projected {source} is not provided yet"
                    );
                    let token = server.issue_token(&TokenRequest {
                        namespace: c.namespace.clone(),
                        service_account: c.pod["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            .to_string(),
                        pod: Some(format!("{}-0", c.workload)),
                        node: Some(NODE.to_string()),
                        audiences: vec![t["audience"].as_str().expect("an audience").to_string()],
                        lifetime_seconds: t["expirationSeconds"].as_i64().unwrap_or(3600),
                    });
                    let path = t["path"].as_str().expect("a token path");
                    std::fs::write(local.join(path), token).expect("write the token");
                }
            } else {
                panic!(
                    "{what}: volume {} ({volume}) is one this test cannot provide yet: \
                     teach `start_as_rendered_and_probe` in tests/manifests.rs to",
                    m["name"]
                );
            }
            let mount_path = m["mountPath"].as_str().expect("a mount path").to_string();
            mounted.push((mount_path, local));
        }
        let args: Vec<String> = c
            .args()
            .into_iter()
            .map(|a| {
                let (flag, value) = match a.split_once('=') {
                    Some((f, v)) => (format!("{f}="), v.to_string()),
                    None => (String::new(), a.clone()),
                };
                if let Some(p) = bind_port(&value) {
                    return format!("{flag}127.0.0.1:{}", local_port(&ports, c, p));
                }
                // A unix socket (in a hostPath directory): one of this run's.
                if let Some(name) = value
                    .strip_prefix("unix:")
                    .and_then(|p| Path::new(p).file_name())
                {
                    return format!("{flag}unix:{}", dir.path().join(name).display());
                }
                if let Some((scheme, name, ns, port, path)) = service_url(&value) {
                    let (target, p) = behind_service(&objs, &all, &name, &ns, port);
                    return format!(
                        "{flag}{scheme}://127.0.0.1:{}{path}",
                        local_port(&ports, &target, p)
                    );
                }
                for (mount_path, local) in &mounted {
                    if let Some(rest) = value.strip_prefix(mount_path.as_str()) {
                        return format!("{flag}{}{rest}", local.display());
                    }
                }
                a
            })
            .collect();
        let mut env: Vec<(String, String)> = c.spec["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["name"].as_str().expect("an env name").to_string(),
                    env_value(c, e),
                )
            })
            .collect();
        assert!(
            c.spec["envFrom"].is_null(),
            "{what}: envFrom is not provided by this test yet"
        );
        env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        let log = dir.path().join(format!("{}-{}.log", c.workload, c.name()));
        let out = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
            .args(&args)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log file"))
            .stderr(out)
            .spawn()
            .expect("the binary starts");
        running.push((
            c.clone(),
            Running {
                what: format!("{what} ({})", args.join(" ")),
                child,
                log,
            },
        ));
    }
    assert!(running.len() >= 2, "{overlay}: the scaler and the agent");

    for (c, process) in &mut running {
        for (kind, probe) in c.probes() {
            let get = &probe["httpGet"];
            let path = get["path"].as_str().unwrap_or("/");
            let scheme = get["scheme"].as_str().unwrap_or("HTTP");
            assert_eq!(
                scheme, "HTTP",
                "{}: {kind} over {scheme} is not checked by this test yet",
                process.what
            );
            let port = c.container_port(&get["port"]).expect("a declared port");
            let local = local_port(&ports, c, port);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                process.assert_running();
                let got = http_get(local, path);
                if got == Ok(200) {
                    break;
                }
                // Not served at all: waiting will not change that.
                assert_ne!(
                    got,
                    Ok(404),
                    "{}: {kind} GET {path} on containerPort {port}: the binary does not serve {path}",
                    process.what
                );
                assert!(
                    Instant::now() < deadline,
                    "{}: {kind} GET {path} on containerPort {port} got {got:?} for 60 s:\n{}",
                    process.what,
                    process.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    // The scaler took the lease its flags name, as the identity its env
    // gives; and the agent reached it through the Service URL in its args.
    let scaler = all
        .iter()
        .find(|c| c.args().first().map(String::as_str) == Some("scaler"))
        .expect("a scaler container");
    let lease_name = scaler
        .args()
        .iter()
        .find_map(|a| a.strip_prefix("--lease-name=").map(str::to_string))
        .expect("the scaler names its lease");
    let lease = server
        .object(
            "coordination.k8s.io",
            "leases",
            &scaler.namespace,
            &lease_name,
        )
        .unwrap_or_else(|| panic!("no Lease {}/{lease_name}", scaler.namespace));
    assert_eq!(
        lease["spec"]["holderIdentity"],
        format!("{}-0", scaler.workload),
        "{lease}"
    );
    let metrics_port = scaler
        .probes()
        .first()
        .map(|(_, p)| {
            scaler
                .container_port(&p["httpGet"]["port"])
                .expect("a port")
        })
        .expect("a probe");
    let scaler_metrics = local_port(&ports, scaler, metrics_port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = metrics(scaler_metrics);
        if text
            .lines()
            .any(|l| l.starts_with("gpuscale_scaler_nodes ") && !l.ends_with(" 0"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{overlay}: no agent reached the scaler in 60 s:\n{}",
            running
                .iter()
                .map(|(_, r)| format!("{}:\n{}", r.what, r.log()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(running);
    server.stop().await;
}

/// The body of `GET /metrics` on 127.0.0.1:port.
fn metrics(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}
