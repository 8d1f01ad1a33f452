//! Starting and stopping the server, and the handle tests drive it with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::auth::{Grant, Subject, TokenRequest};
use crate::error::FakeApiServerError;
use crate::fault::{Fault, RequestRecord};
use crate::kubelet;
use crate::resource::Registry;
use crate::store::{Clock, ObjectKey, Shared, SimSettings, State};

/// How the fake server starts. `Default` gives a loopback server on a free
/// port with one node, a 1 s pod start delay and the kubelet on.
#[derive(Debug, Clone)]
pub struct FakeApiServerConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub bind: SocketAddr,
    /// Nodes the scheduler assigns pods to, round-robin; each gets a Ready
    /// Node object. Empty: pods stay unscheduled and Pending (capacity that
    /// never arrives).
    pub nodes: Vec<String>,
    /// How long a scheduled pod stays Pending before its containers run and
    /// report ready (tokio time, so paused-time tests control it).
    pub pod_start_delay: Duration,
    /// Whether the scheduler and kubelet simulation run at all.
    pub kubelet: bool,
    /// How many changes the watch history keeps; a watch from an older
    /// resourceVersion gets 410 Gone.
    pub history_limit: usize,
    /// How often an idle watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Seed for generated names and uids (deterministic per seed).
    pub seed: u64,
    /// Wall time at start; timestamps then advance with tokio time.
    /// `None`: the real current time.
    pub wall_clock_start: Option<DateTime<Utc>>,
}

impl Default for FakeApiServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            nodes: vec!["node-a".to_string()],
            pod_start_delay: Duration::from_secs(1),
            kubelet: true,
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(60),
            seed: 1,
            wall_clock_start: None,
        }
    }
}

impl FakeApiServerConfig {
    /// Checks the values; the error names the field, the value and what is allowed.
    pub fn validate(&self) -> Result<(), FakeApiServerError> {
        if self.history_limit == 0 {
            return Err(FakeApiServerError::InvalidConfig {
                field: "history_limit",
                value: "0".to_string(),
                allowed: "at least 1",
            });
        }
        if self.bookmark_interval.is_zero() {
            return Err(FakeApiServerError::InvalidConfig {
                field: "bookmark_interval",
                value: "0s".to_string(),
                allowed: "greater than zero",
            });
        }
        if let Some(bad) = self.nodes.iter().find(|n| n.is_empty()) {
            return Err(FakeApiServerError::InvalidConfig {
                field: "nodes",
                value: format!("{bad:?}"),
                allowed: "non-empty node names",
            });
        }
        Ok(())
    }
}

/// The fake Kubernetes API server.
#[derive(Debug)]
pub struct FakeApiServer;

impl FakeApiServer {
    /// Binds, starts serving in the background and returns the handle.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        config: FakeApiServerConfig,
    ) -> Result<FakeApiServerHandle, FakeApiServerError> {
        config.validate()?;
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| FakeApiServerError::Bind {
                    addr: config.bind.to_string(),
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| FakeApiServerError::Bind {
                addr: config.bind.to_string(),
                source,
            })?;
        let clock = Clock::new(config.wall_clock_start.unwrap_or_else(Utc::now));
        let state = State::new(
            Registry::with_builtins(),
            config.history_limit,
            SimSettings {
                kubelet: config.kubelet,
                pod_start_delay: config.pod_start_delay,
                nodes: config.nodes.clone(),
                next_node: 0,
            },
            clock,
            config.seed,
        );
        let shared = Shared::new(state, config.bookmark_interval, config.seed);
        if config.kubelet {
            shared.mutate(kubelet::register_nodes);
        }
        let accept_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            let mut shutdown = accept_shared.shutdown.subscribe();
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let conn_shared = Arc::clone(&accept_shared);
                            connections.spawn(async move {
                                let service = service_fn(move |req| crate::http::handle(Arc::clone(&conn_shared), req));
                                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                                if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                                    tracing::debug!(error = %e, "fake API server connection ended with an error");
                                }
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "fake API server accept failed"),
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    () = crate::store::stopped(&mut shutdown) => break,
                }
            }
            connections.abort_all();
        });
        Ok(FakeApiServerHandle {
            addr,
            shared,
            task: Some(task),
        })
    }
}

/// A running fake server. Dropping it stops the server.
#[derive(Debug)]
pub struct FakeApiServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeApiServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client configuration pointing at this server (plain HTTP,
    /// default namespace `default`).
    pub fn client_config(&self) -> kube::Config {
        let uri: http::Uri = self
            .url()
            .parse()
            .expect("invariant: http://<socket address> is a valid URI");
        kube::Config::new(uri)
    }

    /// A kube client for this server.
    pub fn client(&self) -> Result<kube::Client, FakeApiServerError> {
        Ok(kube::Client::try_from(self.client_config())?)
    }

    /// Every request served so far, in order of completion.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    /// Forgets the request log.
    pub fn clear_request_log(&self) {
        self.shared.lock().log.clear();
    }

    /// Makes the next `fault.times` matching requests fail, hang or wait.
    pub fn inject_fault(&self, fault: Fault) {
        self.shared.lock().faults.push(fault);
    }

    /// Removes all pending faults.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Changes the start delay for pods created from now on.
    pub fn set_pod_start_delay(&self, delay: Duration) {
        self.shared.lock().sim.pod_start_delay = delay;
    }

    /// Changes the nodes pods created from now on are scheduled to (Node
    /// objects are created for new names; existing ones are kept).
    pub fn set_nodes(&self, nodes: Vec<String>) {
        self.shared.mutate(|state| {
            state.sim.nodes = nodes;
            state.sim.next_node = 0;
            if state.sim.kubelet {
                kubelet::register_nodes(state);
            }
        });
    }

    /// The objects of a resource (`group` `""` for core; `resource` the
    /// plural), in one namespace or all, sorted by namespace and name.
    pub fn objects(&self, group: &str, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        self.shared
            .lock()
            .list(group, resource, namespace)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// One object, if it exists (`namespace` `""` for cluster-scoped).
    pub fn object(
        &self,
        group: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        self.shared
            .lock()
            .get(&ObjectKey::new(group, resource, namespace, name))
            .cloned()
    }

    /// The current (newest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the watch history, as etcd compaction does: every
    /// resourceVersion handed out so far becomes too old, so every open watch
    /// and every watch from such a version gets 410 Gone (clients relist).
    pub fn compact_watch_history(&self) {
        self.shared.mutate(State::compact);
    }

    /// Marks all containers of a pod ready or not (an engine crash or
    /// recovery); the kubelet conditions follow.
    pub fn set_pod_containers_ready(
        &self,
        namespace: &str,
        name: &str,
        ready: bool,
    ) -> Result<(), FakeApiServerError> {
        let key = ObjectKey::new("", "pods", namespace, name);
        self.shared.mutate(|state| {
            let Some(mut pod) = state.get(&key).cloned() else {
                return Err(FakeApiServerError::NotFound {
                    resource: "pods".to_string(),
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                });
            };
            let now = state.clock.now_rfc3339();
            kubelet::set_containers_ready(&mut pod, ready, &now);
            if state.get(&key) != Some(&pod) {
                state.commit(key.clone(), pod);
            }
            Ok(())
        })
    }

    /// Issues a ServiceAccount token bound to `req.pod` (its uid is the
    /// stored pod's when it exists); see [`crate::auth`].
    pub fn issue_token(&self, req: &TokenRequest) -> String {
        let (now, pod_uid) = {
            let state = self.shared.lock();
            let uid = req.pod.as_ref().and_then(|pod| {
                state
                    .get(&ObjectKey::new("", "pods", &req.namespace, pod))
                    .and_then(|p| p.pointer("/metadata/uid"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
            (state.clock.now().timestamp(), uid)
        };
        self.shared.auth().issue(req, pod_uid, now)
    }

    /// A projected token of the pod `namespace/pod` as the kubelet mounts
    /// it: its ServiceAccount (`spec.serviceAccountName`, default
    /// `default`), bound to the pod and its node (`spec.nodeName`), for
    /// `audience`, valid for `lifetime_seconds`. `None` when there is no
    /// such pod.
    pub fn issue_pod_token(
        &self,
        namespace: &str,
        pod: &str,
        audience: &str,
        lifetime_seconds: i64,
    ) -> Option<String> {
        let stored = self.object("", "pods", namespace, pod)?;
        let account = stored
            .pointer("/spec/serviceAccountName")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let node = stored
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .map(str::to_string);
        Some(self.issue_token(&TokenRequest {
            namespace: namespace.to_string(),
            service_account: account,
            pod: Some(pod.to_string()),
            node,
            audiences: vec![audience.to_string()],
            lifetime_seconds,
        }))
    }

    /// A token of a plain user (and `groups`) for the API server's own
    /// audience, never expiring.
    pub fn issue_user_token(&self, user: &str, groups: &[&str]) -> String {
        self.shared.auth().issue_user(user, groups)
    }

    /// Allows `subject` to `verb` the `resource` of API `group` in
    /// `namespace` (`None`: everywhere), for SubjectAccessReviews.
    pub fn grant(
        &self,
        subject: Subject,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
    ) {
        self.shared.auth().grant(Grant {
            subject,
            verb: verb.to_string(),
            group: group.to_string(),
            resource: resource.to_string(),
            namespace: namespace.map(str::to_string),
        });
    }

    /// Stops serving: open watches end, new connections are refused.
    pub async fn stop(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeApiServerHandle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}
