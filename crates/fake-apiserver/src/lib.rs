//! A fake Kubernetes API server for tests and the demo.
//!
//! An in-process HTTP/1.1 (and h2c) server that speaks the real Kubernetes
//! API for the slice gpuscale uses, so the code under test is the same
//! kube-rs code that runs against a real cluster:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gpuscale_fake_apiserver::{FakeApiServer, FakeApiServerConfig};
//! let server = FakeApiServer::start(FakeApiServerConfig::default()).await?;
//! let client = server.client()?; // a kube::Client for http://127.0.0.1:<port>
//! # Ok(()) }
//! ```
//!
//! # What it implements
//!
//! * **Discovery**: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<g>`,
//!   `/apis/<g>/<v>` (APIResourceList with verbs, short names and the
//!   `status`/`scale` subresources); `kube::Discovery::run()` works.
//!   Aggregated discovery is not served.
//! * **Resources**: core/v1 pods, services, events, nodes, namespaces,
//!   configmaps, serviceaccounts; apps/v1 deployments, replicasets,
//!   statefulsets, daemonsets (stored, no controller);
//!   rbac.authorization.k8s.io/v1 roles, rolebindings, clusterroles,
//!   clusterrolebindings and networking.k8s.io/v1 networkpolicies (stored
//!   as written, never enforced); coordination.k8s.io/v1 leases; events.k8s.io/v1 events
//!   (stored apart from core/v1 events); apiextensions.k8s.io/v1
//!   customresourcedefinitions; and every custom resource a CRD registers
//!   (served once the CRD is created, with its `status` and `scale`
//!   subresources as declared, gone with the CRD).
//! * **Verbs**: get; list with label selectors (`a=b`, `a!=b`, `a in (..)`,
//!   `a notin (..)`, `a`, `!a`), field selectors (`metadata.name`,
//!   `metadata.namespace`, `spec.nodeName`, `status.phase`, a few event
//!   fields) and `limit`/`continue`; watch (`?watch=true`, JSON lines of
//!   ADDED/MODIFIED/DELETED/BOOKMARK/ERROR from a `resourceVersion`,
//!   `allowWatchBookmarks`, `sendInitialEvents`, `timeoutSeconds`; a
//!   resourceVersion older than the bounded history gets an ERROR event
//!   410 `Expired`, as the real server sends it; objects that stop matching
//!   a selector are sent as DELETED); create (with `generateName`; 409
//!   AlreadyExists); update (409 Conflict on a stale
//!   `metadata.resourceVersion`); delete (with `preconditions`; owned
//!   objects are garbage-collected at once); deletecollection; patch as
//!   JSON merge (RFC 7386), JSON patch (RFC 6902), strategic merge (the
//!   patch merge keys of the fields gpuscale touches: conditions by `type`,
//!   containers/env/volumes by `name`, ports, ownerReferences, finalizers;
//!   `$patch: replace|delete`, `$deleteFromPrimitiveList`; 415 for custom
//!   resources, like the real server) and server-side apply (field ownership
//!   in `metadata.managedFields`, conflicts → 409 unless `force`, fields a
//!   manager stops applying are removed). `dryRun=All` is honoured.
//!   Metadata-only requests (`as=PartialObjectMetadata`) are answered.
//! * **Semantics**: one global resourceVersion counter; `uid`,
//!   `creationTimestamp` and `generation` set by the server; `generation`
//!   bumps when anything outside metadata/status changes; a write that
//!   changes nothing stores nothing; writes to the main resource never change
//!   `status` (for types with a status subresource) and writes to `/status`
//!   change only `status`; pod spec updates are limited as on a real
//!   server; the `pod-deletion-cost` annotation must be an int32; custom
//!   resources are defaulted, pruned and checked against the CRD's
//!   structural schema (types, enums, ranges, lengths, required; not CEL).
//! * **Subresources**: `/scale` (autoscaling/v1 Scale, `status.selector` as a
//!   selector string) for deployments, replicasets, statefulsets and custom
//!   resources that declare it (404 otherwise): get, update (409 on a stale
//!   resourceVersion) and patch (merge, JSON, strategic, apply); `/status`;
//!   `pods/<name>/eviction` (deletes the pod; no disruption budgets).
//! * **Errors** as `metav1.Status` with the real code and reason.
//! * **Controllers**, run synchronously after every write, so the change a
//!   request causes is visible as soon as it returns: Deployment → one
//!   ReplicaSet per pod template (`<deploy>-<hash>`, `pod-template-hash`
//!   label; a template change scales the old ReplicaSet to zero and the new
//!   one up at once, not a rolling update); ReplicaSet → pods
//!   `<rs>-<suffix>` deleting victims in the real `ActivePodsWithRanks`
//!   order (unassigned, Pending < Unknown < Running, not-Ready, lower
//!   `controller.kubernetes.io/pod-deletion-cost`, more co-located, shorter
//!   time Ready in log buckets, more restarts, newer); StatefulSet → pods
//!   `<sts>-<ordinal>` (OrderedReady or Parallel; highest ordinal removed
//!   first); status counts kept up to date. Pod deletion is immediate (no
//!   graceful termination).
//! * **Scheduler and kubelet**: pods are assigned to the configured nodes (each
//!   served as a Ready Node object)
//!   round-robin, go Pending → Running after a configurable delay (tokio
//!   time), report containers ready, and get `Ready` by the kubelet's rule:
//!   all containers ready and every `spec.readinessGates` condition `"True"`
//!   (a missing one counts as False).
//! * **Authentication and authorization reviews**: `tokenreviews`
//!   (`authentication.k8s.io/v1`) of tokens the server issues per pod and
//!   node ([`FakeApiServerHandle::issue_pod_token`], with audience, expiry
//!   and the bound pod and node claims) and `subjectaccessreviews`
//!   (`authorization.k8s.io/v1`) answered from grants the test makes
//!   ([`FakeApiServerHandle::grant`]); see [`auth`].
//! * **For tests**: the request log in RBAC terms ([`RequestRecord`]), fault
//!   injection ([`Fault`]: status codes, hangs, delays for the next N
//!   matching requests), direct reads of stored objects, watch-history
//!   compaction, container readiness flips.
//!
//! # What it deliberately does not do
//!
//! Authentication and authorization of its own clients (every request is
//! allowed; check RBAC against the request log), admission webhooks, CEL validation rules,
//! aggregated discovery, protobuf and table output, namespaces lifecycle
//! (objects may be created in any namespace), graceful pod termination and
//! finalizers (deletion is immediate), rolling updates, EndpointSlices,
//! field ownership for non-apply writes, multiple stored versions with
//! conversion, and list/watch consistency at an old resourceVersion (lists
//! are always served from the newest state).

pub mod auth;
mod error;
mod fault;
mod http;
mod kubelet;
mod patch;
mod resource;
mod schema;
mod selector;
mod server;
mod store;
mod workload;
mod write;

pub use auth::{Grant, Subject, TokenRequest};
pub use error::FakeApiServerError;
pub use fault::{Fault, FaultKind, RequestRecord, Verb};
pub use resource::{ResourceType, ScalePaths};
pub use server::{FakeApiServer, FakeApiServerConfig, FakeApiServerHandle};
