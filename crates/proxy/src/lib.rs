//! gpuscale's request proxy.
//!
//! **For** putting gpuscale in the request path of an inference engine: a
//! reusable core and the per-pod sidecar built on it.
//!
//! The core, shared by every proxy gpuscale runs (the per-pod sidecar
//! here, the scale-to-zero activator in front of a workload):
//!
//! * [`forward`]: forwarding to an HTTP/1.1 upstream with bodies streamed
//!   both ways (SSE unbuffered), headers and trailers passed through,
//!   hop-by-hop headers dropped, upgrades refused cleanly; a response body
//!   wrapper that lets an observer see each frame and how the body ended.
//! * [`admission`]: a bounded FIFO queue in front of a concurrency limit
//!   that can change at run time (0 holds everything), per-request
//!   deadlines, drain, "empty" notification, a queue budget shared by
//!   several admissions.
//! * [`measure`]: TTFT, TPOT and queue time of each request as the SLO
//!   defines them, read from the bytes passing through.
//! * [`reply`]: 429/503/502/501 JSON errors with `Retry-After`.
//! * [`server`]: serving a hyper service (HTTP/1.1 and HTTP/2) with a
//!   graceful stop.
//!
//! [`sidecar`] is `gpuscale proxy`: the limit from the node agent's
//! `ServingService/WatchLimits`, the measurements reported with
//! `ReportEngineStats`, drain on the agent's word, `/drain` or SIGTERM.
//!
//! [`activator`] is `gpuscale activator`: it holds requests for workloads
//! with no ready replica (scaled to zero), tells the scaler at once, and
//! forwards them in order once a replica is warm.
//!
//! **Not for** load balancing between replicas (the Service or the
//! activator picks the pod), TLS termination, or retries: a request is
//! forwarded once, and a refusal tells the client when to retry.

pub mod activator;
pub mod admission;
pub mod error;
pub mod forward;
pub mod measure;
pub mod reply;
pub mod server;
pub mod sidecar;

pub use activator::{ActivatorArgs, ActivatorConfig, RunningActivator, WorkloadRoute};
pub use admission::{Admission, Limit, Load, Permit, QueueBudget, Refusal};
pub use error::ProxyError;
pub use forward::{ForwardConfig, Forwarder, Observe, ObservedBody, ResponseBody};
pub use measure::{Exchange, Measured, RequestStats, Totals};
pub use sidecar::{ProxyArgs, ProxyConfig, RunningProxy, run_from_args, start};
