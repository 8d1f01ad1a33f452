//! The scaler's public gRPC APIs, served on its gRPC port beside the
//! agents' stream, gRPC health and reflection:
//!
//! * [`recommend`]: `gpuscale.v1.ScalerService` — `WatchRecommendations`
//!   (a label selector, [`gpuscale_core::selector`], over workload labels;
//!   first the current state of every matching workload, then each
//!   change), `Explain` (the last
//!   decision in full), `ListWorkloads`;
//! * [`keda`]: `externalscaler.ExternalScaler`, wire-compatible with KEDA,
//!   so a `ScaledObject` with an `external` trigger drives a stock HPA to
//!   gpuscale's recommendation.
//!
//! Every handler reads the published [`StateView`] (an `Arc` from a `watch`
//! channel, no lock) and never sends anything to the state task: nothing a
//! client does can slow the scaler. Streams are bounded twice: at most
//! [`ApiConfig::max_watchers`] `WatchRecommendations` and, in a pool of their
//! own so that watchers can never lock KEDA out,
//! [`ApiConfig::max_keda_streams`] `StreamIsActive` streams open at once
//! (more are refused with `RESOURCE_EXHAUSTED`), and per stream a bounded
//! buffer filled with `try_send` only; a subscriber that lets it fill up is
//! dropped, its stream ending with `RESOURCE_EXHAUSTED` (it may subscribe
//! again and gets the current state first).
//!
//! **Who may read what**: every workload a caller names or is shown is
//! authorised for that caller ([`crate::edge::Authenticator`]: a
//! SubjectAccessReview on Kubernetes): `Explain` and KEDA's calls answer
//! `PERMISSION_DENIED` for a workload the caller may not read (before
//! looking it up, so nothing is revealed about it), `ListWorkloads` and
//! `WatchRecommendations` leave such workloads out. Error messages quote at
//! most [`crate::edge::auth::QUOTE_LIMIT`] characters of what the caller sent.
//!
//! Not for: deciding (the decide loop) or acting (the actuator).

pub mod activator;
pub mod keda;
pub mod recommend;

use gpuscale_core::bounds::within;
use gpuscale_core::names::is_dns_label;
use std::pin::Pin;
use std::sync::Arc;

use gpuscale_core::WorkloadRef;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::edge::{Authenticator, Caller};
use crate::error::ScalerError;
use crate::metrics::ScalerMetrics;
use crate::view::StateView;

pub use gpuscale_core::selector::{LabelSelector, SelectorError};
pub use keda::{KEDA_METRIC_NAME, KEDA_TARGET, KedaScaler, WORKLOAD_METADATA_KEY};
pub use recommend::RecommendationService;

/// Limits of the public APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiConfig {
    /// `WatchRecommendations` streams open at once.
    pub max_watchers: usize,
    /// KEDA `StreamIsActive` streams open at once (a pool of their own).
    pub max_keda_streams: usize,
    /// Messages buffered per stream beyond its initial state before the
    /// subscriber counts as slow and is dropped.
    pub watch_buffer: usize,
}

impl Default for ApiConfig {
    /// 256 watchers, 256 KEDA streams, 64 buffered changes each.
    fn default() -> Self {
        Self {
            max_watchers: 256,
            max_keda_streams: 256,
            watch_buffer: 64,
        }
    }
}

impl ApiConfig {
    /// Checks every field; the error names the field, the value and what is allowed.
    pub fn validate(&self) -> Result<(), ScalerError> {
        within(self.max_watchers, 1, 100_000)
            .map_err(|e| ScalerError::out_of_range("--max-watchers", e))?;
        within(self.max_keda_streams, 1, 100_000)
            .map_err(|e| ScalerError::out_of_range("--max-keda-streams", e))?;
        within(self.watch_buffer, 1, 100_000)
            .map_err(|e| ScalerError::out_of_range("api.watch_buffer", e))?;
        Ok(())
    }
}

/// What every API handler shares: the view, the stream limits and the
/// scaler's shutdown signal.
#[derive(Clone)]
pub struct ApiContext {
    pub(crate) view: watch::Receiver<Arc<StateView>>,
    pub(crate) config: ApiConfig,
    pub(crate) watchers: Arc<Semaphore>,
    pub(crate) keda_streams: Arc<Semaphore>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) metrics: Arc<ScalerMetrics>,
    pub(crate) auth: Arc<Authenticator>,
}

impl std::fmt::Debug for ApiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiContext")
            .field("config", &self.config)
            .field("watchers_free", &self.watchers.available_permits())
            .field("keda_streams_free", &self.keda_streams.available_permits())
            .finish_non_exhaustive()
    }
}

impl ApiContext {
    /// A context over `view`; streams end when `shutdown` turns true.
    pub fn new(
        view: watch::Receiver<Arc<StateView>>,
        config: ApiConfig,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<ScalerMetrics>,
    ) -> Self {
        Self {
            view,
            watchers: Arc::new(Semaphore::new(config.max_watchers)),
            keda_streams: Arc::new(Semaphore::new(config.max_keda_streams)),
            config,
            shutdown,
            auth: Arc::new(Authenticator::disabled(metrics.clone())),
            metrics,
        }
    }

    /// Authorise reads with `auth` (the default allows everyone).
    pub(crate) fn with_auth(mut self, auth: Arc<Authenticator>) -> Self {
        self.auth = auth;
        self
    }

    /// `PERMISSION_DENIED` unless the caller of a request with `extensions`
    /// may read `workload`.
    pub(crate) async fn authorize(
        &self,
        extensions: &tonic::Extensions,
        workload: &WorkloadRef,
    ) -> Result<(), Status> {
        if !self.auth.enabled() {
            return Ok(());
        }
        let caller = crate::edge::caller_of(extensions);
        self.auth.require_read(&caller, workload).await
    }

    /// The caller of a request, for filtering what it is shown.
    pub(crate) fn caller(&self, extensions: &tonic::Extensions) -> Caller {
        crate::edge::caller_of(extensions)
    }

    /// The newest view.
    pub(crate) fn current(&self) -> Arc<StateView> {
        self.view.borrow().clone()
    }

    /// A slot for one more watcher, or `RESOURCE_EXHAUSTED` at the limit.
    pub(crate) fn watcher_slot(&self, api: &'static str) -> Result<OwnedSemaphorePermit, Status> {
        self.watchers.clone().try_acquire_owned().map_err(|_| {
            self.metrics.views().api_stream_refused(api);
            Status::resource_exhausted(format!(
                "too many concurrent streams: the limit is {} (--max-watchers); close one or retry later",
                self.config.max_watchers
            ))
        })
    }

    /// A slot for one more KEDA push stream (a pool apart from the
    /// watchers), or `RESOURCE_EXHAUSTED` at the limit.
    pub(crate) fn keda_slot(&self, api: &'static str) -> Result<OwnedSemaphorePermit, Status> {
        self.keda_streams.clone().try_acquire_owned().map_err(|_| {
            self.metrics.views().api_stream_refused(api);
            Status::resource_exhausted(format!(
                "too many concurrent KEDA streams: the limit is {} (--max-keda-streams); close one or retry later",
                self.config.max_keda_streams
            ))
        })
    }
}

/// A server stream of `T`.
pub(crate) type ApiStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Why a stream's producer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// The client went away.
    Closed,
    /// The client did not keep up: its buffer was full.
    Slow,
    /// The scaler is shutting down.
    Shutdown,
}

/// The sending half of a bounded stream: `try_send` only.
pub(crate) struct StreamSender<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    end: Arc<std::sync::OnceLock<StreamEnd>>,
    api: &'static str,
    metrics: Arc<ScalerMetrics>,
    _slot: OwnedSemaphorePermit,
}

impl<T> StreamSender<T> {
    /// Queues `item`; `Err` when the stream must end (the reason is recorded).
    pub(crate) fn send(&self, item: T) -> Result<(), StreamEnd> {
        match self.tx.try_send(Ok(item)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.finish(StreamEnd::Slow);
                Err(StreamEnd::Slow)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.finish(StreamEnd::Closed);
                Err(StreamEnd::Closed)
            }
        }
    }

    /// Records why the stream ends (the first reason wins).
    pub(crate) fn finish(&self, end: StreamEnd) {
        if self.end.set(end).is_ok() && end == StreamEnd::Slow {
            self.metrics.views().api_stream_dropped(self.api);
            tracing::info!(
                api = self.api,
                "a stream subscriber fell behind (its buffer was full): dropped with RESOURCE_EXHAUSTED"
            );
        }
    }

    /// Resolves when the client has gone away.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl<T> Drop for StreamSender<T> {
    fn drop(&mut self) {
        self.metrics.views().api_stream_closed(self.api);
    }
}

/// A bounded stream of `capacity` messages: the producer's sender and the
/// response stream, which ends with `RESOURCE_EXHAUSTED` when the producer
/// dropped a slow subscriber and `UNAVAILABLE` at shutdown.
pub(crate) fn bounded_stream<T: Send + 'static>(
    capacity: usize,
    slot: OwnedSemaphorePermit,
    api: &'static str,
    metrics: Arc<ScalerMetrics>,
) -> (StreamSender<T>, ApiStream<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let end = Arc::new(std::sync::OnceLock::new());
    let ending_end = end.clone();
    let ending = tokio_stream::once(()).filter_map(move |()| match ending_end.get() {
        Some(StreamEnd::Slow) => Some(Err(Status::resource_exhausted(
            "this subscriber fell behind (its buffer was full) and was dropped; subscribe again to get the current state",
        ))),
        Some(StreamEnd::Shutdown) => Some(Err(Status::unavailable(
            "the scaler is shutting down; reconnect",
        ))),
        _ => None,
    });
    metrics.views().api_stream_opened(api);
    let sender = StreamSender {
        tx,
        end,
        api,
        metrics,
        _slot: slot,
    };
    (sender, Box::pin(ReceiverStream::new(rx).chain(ending)))
}

/// Adds the public APIs to the scaler's routes and marks them serving in
/// gRPC health.
pub(crate) async fn serve(
    routes: tonic::service::Routes,
    handle: &crate::ScalerHandle,
    config: ApiConfig,
    shutdown: watch::Receiver<bool>,
    health: &tonic_health::server::HealthReporter,
    auth: Arc<Authenticator>,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    let context =
        ApiContext::new(handle.view(), config, shutdown, handle.metrics().clone()).with_auth(auth);
    health
        .set_serving::<gpuscale_proto::v1::scaler_service_server::ScalerServiceServer<RecommendationService>>()
        .await;
    health
        .set_serving::<gpuscale_proto::externalscaler::external_scaler_server::ExternalScalerServer<KedaScaler>>()
        .await;
    health
        .set_serving::<gpuscale_proto::v1::activator_service_server::ActivatorServiceServer<
            activator::ActivatorLink,
        >>()
        .await;
    routes
        .add_service(
            activator::ActivatorLink::new(context.clone(), handle.activators().clone())
                .into_server()
                .max_decoding_message_size(max_message_bytes),
        )
        .add_service(
            RecommendationService::new(context.clone())
                .into_server()
                .max_decoding_message_size(max_message_bytes),
        )
        .add_service(
            KedaScaler::new(context)
                .into_server()
                .max_decoding_message_size(max_message_bytes),
        )
}

/// Most workloads named in a "not found" message.
const NAMED_IN_ERRORS: usize = 10;

/// `NOT_FOUND` naming `workload` and the workloads that exist.
pub(crate) fn unknown_workload(view: &StateView, workload: &WorkloadRef) -> Status {
    let known: Vec<String> = view
        .workloads
        .keys()
        .take(NAMED_IN_ERRORS)
        .map(|w| w.to_string())
        .collect();
    let more = view.workloads.len().saturating_sub(NAMED_IN_ERRORS);
    let known = if known.is_empty() {
        "none".to_string()
    } else if more > 0 {
        format!("{} and {more} more", known.join(", "))
    } else {
        known.join(", ")
    };
    Status::not_found(format!(
        "no workload {workload}; gpuscale decides for: {known}"
    ))
}

/// Longest label selector accepted, bytes.
pub const MAX_SELECTOR_BYTES: usize = 1024;

/// A request's label selector, parsed; `INVALID_ARGUMENT` quoting at most a
/// bounded prefix of it.
pub(crate) fn parse_selector(selector: &str) -> Result<LabelSelector, Status> {
    if selector.len() > MAX_SELECTOR_BYTES {
        return Err(Status::invalid_argument(format!(
            "selector `{}` is longer than {MAX_SELECTOR_BYTES} bytes",
            crate::edge::auth::quote(selector)
        )));
    }
    LabelSelector::parse(selector).map_err(|e| Status::invalid_argument(format!("selector: {e}")))
}

/// A workload reference from the wire: `name` required, `namespace`
/// defaulting to `default`; both DNS labels. `field` names the request field.
pub(crate) fn workload_ref(
    field: &str,
    namespace: &str,
    name: &str,
) -> Result<WorkloadRef, Status> {
    let namespace = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    if name.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}.name is empty: name the workload (namespace defaults to `default`)"
        )));
    }
    for (part, value) in [("namespace", namespace), ("name", name)] {
        if !is_dns_label(value) {
            return Err(Status::invalid_argument(format!(
                "{field}.{part} `{}` is not a DNS label (1..=63 lowercase letters, digits and '-')",
                crate::edge::auth::quote(value)
            )));
        }
    }
    Ok(WorkloadRef::new(namespace.to_string(), name.to_string()))
}

/// Waits for the next view or the end of the stream.
pub(crate) async fn next_view<T>(
    view: &mut watch::Receiver<Arc<StateView>>,
    shutdown: &mut watch::Receiver<bool>,
    sender: &StreamSender<T>,
) -> Option<StreamEnd> {
    tokio::select! {
        biased;
        _ = crate::stopped(shutdown) => Some(StreamEnd::Shutdown),
        _ = sender.closed() => Some(StreamEnd::Closed),
        changed = view.changed() => match changed {
            Ok(()) => None,
            Err(_) => Some(StreamEnd::Shutdown),
        },
    }
}
