//! Engines that push: the agent's node-local `ServingService`
//! (`proto/gpuscale/v1/serving.proto`).
//!
//! Three parts, made together by [`push_source`]:
//!
//! * [`PushService`], the tonic service. Handlers validate each message
//!   (a NaN, a negative count, a ratio above 1 → `INVALID_ARGUMENT` naming the
//!   field), convert it, and hand it over through a bounded channel with
//!   `try_send`; no lock is held across an `.await`. When the channel is
//!   full the update is dropped and counted: counters are cumulative, so the
//!   engine's next message carries the whole truth again.
//! * [`PushEngineSource`], the [`EngineSource`] the agent's loop drives: it
//!   owns the pushed state, drains the channel each round, and reports an
//!   engine that stopped pushing as `Failed` (after
//!   [`PushConfig::stale_after`]) and then forgets it.
//! * [`LimitsHandle`], what the agent calls when the scaler sends a batch
//!   limit or a drain: `WatchLimits` subscribers get the current value first,
//!   then every change. A subscriber that does not keep up (its buffer is
//!   full) is dropped, never awaited; its stream ends with
//!   `RESOURCE_EXHAUSTED` and it may subscribe again.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use gpuscale_core::Histogram;
use gpuscale_core::Timestamp;
use gpuscale_core::ids::PodRef;
use gpuscale_core::sample::{EngineSample, EngineState, Framework, PodGpus};
use gpuscale_proto::v1;
use gpuscale_proto::v1::serving_service_server::{ServingService, ServingServiceServer};
use gpuscale_proto::v1::set_readiness_request::Readiness;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::error::TelemetryError;
use crate::source::{EngineSource, SourceError};

/// Largest value accepted for a count or a token total.
pub(crate) const MAX_PUSHED_VALUE: f64 = 1e15;
/// Largest batch limit accepted.
pub(crate) const MAX_BATCH_LIMIT: u32 = 1_000_000;
/// Longest model name accepted.
pub(crate) const MAX_MODEL_NAME_BYTES: usize = 512;

/// How the push source buffers and ages pushed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushConfig {
    /// Updates buffered between two sampling rounds (all engines together).
    pub channel_capacity: usize,
    /// Limit updates buffered per `WatchLimits` subscriber before it is dropped.
    pub watcher_buffer: usize,
    /// An engine with no stats for this long is reported `Failed`, metrics missing.
    pub stale_after: Duration,
    /// ... and after this long it is no longer reported.
    pub forget_after: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            channel_capacity: 1024,
            watcher_buffer: 16,
            stale_after: Duration::from_secs(10),
            forget_after: Duration::from_secs(300),
        }
    }
}

impl PushConfig {
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if !(1..=1_000_000).contains(&self.channel_capacity) {
            return Err(TelemetryError::config(
                "push.channel_capacity",
                self.channel_capacity,
                "between 1 and 1000000",
            ));
        }
        if !(1..=10_000).contains(&self.watcher_buffer) {
            return Err(TelemetryError::config(
                "push.watcher_buffer",
                self.watcher_buffer,
                "between 1 and 10000",
            ));
        }
        if self.stale_after.is_zero() || self.forget_after < self.stale_after {
            return Err(TelemetryError::config(
                "push.forget_after",
                format!(
                    "{:?} (stale_after {:?})",
                    self.forget_after, self.stale_after
                ),
                "stale_after > 0 and forget_after >= stale_after",
            ));
        }
        Ok(())
    }
}

/// Counters of the push service, for the agent's own metrics.
#[derive(Debug, Default)]
struct PushCounters {
    accepted: AtomicU64,
    rejected: AtomicU64,
    dropped_full: AtomicU64,
    watchers_dropped: AtomicU64,
}

/// A snapshot of the push service's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Stats and readiness messages accepted.
    pub accepted_total: u64,
    /// Messages rejected as invalid (`INVALID_ARGUMENT`).
    pub rejected_total: u64,
    /// Valid messages dropped because the source had not drained the channel.
    pub dropped_full_total: u64,
    /// `WatchLimits` subscribers dropped for falling behind.
    pub watchers_dropped_total: u64,
}

impl PushCounters {
    fn snapshot(&self) -> PushStats {
        PushStats {
            accepted_total: self.accepted.load(Ordering::Relaxed),
            rejected_total: self.rejected.load(Ordering::Relaxed),
            dropped_full_total: self.dropped_full.load(Ordering::Relaxed),
            watchers_dropped_total: self.watchers_dropped.load(Ordering::Relaxed),
        }
    }
}

/// What a handler hands to the source.
#[derive(Debug)]
enum PushUpdate {
    Stats(Box<EngineSample>),
    Readiness {
        pod: PodRef,
        state: EngineState,
        message: String,
    },
}

/// The limits the scaler set for one pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodLimits {
    pub batch_limit: Option<u32>,
    pub draining: bool,
}

#[derive(Debug)]
struct Watcher {
    tx: mpsc::Sender<Result<v1::EngineLimits, Status>>,
    dropped: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct PodEntry {
    limits: PodLimits,
    watchers: Vec<Watcher>,
}

/// Sets batch limits and drains; shared by the agent and the service.
#[derive(Debug, Clone)]
pub struct LimitsHandle {
    pods: Arc<Mutex<HashMap<PodRef, PodEntry>>>,
    watcher_buffer: usize,
    counters: Arc<PushCounters>,
}

fn wire_limits(pod: &PodRef, l: PodLimits) -> v1::EngineLimits {
    v1::EngineLimits {
        pod: Some(v1::PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        }),
        batch_limit: l.batch_limit,
        draining: l.draining,
    }
}

impl LimitsHandle {
    fn lock(&self) -> MutexGuard<'_, HashMap<PodRef, PodEntry>> {
        // Critical sections only copy values and try_send; a panic inside
        // one cannot leave the map inconsistent.
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the pod's batch limit (`None`: no limit) and tells its watchers.
    pub fn set_batch_limit(&self, pod: &PodRef, batch_limit: Option<u32>) {
        self.update(pod, |l| l.batch_limit = batch_limit);
    }

    /// Starts or stops draining the pod and tells its watchers.
    pub fn set_draining(&self, pod: &PodRef, draining: bool) {
        self.update(pod, |l| l.draining = draining);
    }

    /// The pod's current limits.
    pub fn limits(&self, pod: &PodRef) -> PodLimits {
        self.lock().get(pod).map(|e| e.limits).unwrap_or_default()
    }

    /// Subscribers watching this pod now.
    pub fn watcher_count(&self, pod: &PodRef) -> usize {
        self.lock().get(pod).map_or(0, |e| e.watchers.len())
    }

    /// Forgets a pod that left the node (its watchers' streams end).
    pub fn remove_pod(&self, pod: &PodRef) {
        self.lock().remove(pod);
    }

    fn update(&self, pod: &PodRef, change: impl FnOnce(&mut PodLimits)) {
        let mut pods = self.lock();
        let entry = pods.entry(pod.clone()).or_default();
        let before = entry.limits;
        change(&mut entry.limits);
        if entry.limits == before {
            return;
        }
        let msg = wire_limits(pod, entry.limits);
        let counters = &self.counters;
        entry
            .watchers
            .retain(|w| match w.tx.try_send(Ok(msg.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.dropped.store(true, Ordering::Relaxed);
                    counters.watchers_dropped.fetch_add(1, Ordering::Relaxed);
                    warn!(pod = %pod, "WatchLimits subscriber fell behind: dropped");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    fn subscribe(&self, pod: &PodRef) -> WatchStream {
        let (tx, rx) = mpsc::channel(self.watcher_buffer);
        let dropped = Arc::new(AtomicBool::new(false));
        {
            let mut pods = self.lock();
            let entry = pods.entry(pod.clone()).or_default();
            // The buffer holds at least one: the current value always fits.
            let _ = tx.try_send(Ok(wire_limits(pod, entry.limits)));
            entry.watchers.push(Watcher {
                tx,
                dropped: dropped.clone(),
            });
        }
        let ending = futures::stream::once(async move {
            dropped.load(Ordering::Relaxed).then(|| {
                Err(Status::resource_exhausted(
                    "this WatchLimits subscriber fell behind and was dropped; subscribe again",
                ))
            })
        })
        .filter_map(std::future::ready);
        Box::pin(ReceiverStream::new(rx).chain(ending))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::EngineLimits, Status>> + Send>>;

/// The `ServingService` implementation. See the module docs.
#[derive(Debug, Clone)]
pub struct PushService {
    tx: mpsc::Sender<PushUpdate>,
    limits: LimitsHandle,
    counters: Arc<PushCounters>,
}

/// Builds the three parts of the push path. Serve the service with
/// `tonic::transport::Server::builder().add_service(PushService::into_server(..))`.
pub fn push_source(
    config: PushConfig,
) -> Result<(PushService, PushEngineSource, LimitsHandle), TelemetryError> {
    config.validate()?;
    let (tx, rx) = mpsc::channel(config.channel_capacity);
    let counters = Arc::new(PushCounters::default());
    let limits = LimitsHandle {
        pods: Arc::default(),
        watcher_buffer: config.watcher_buffer,
        counters: counters.clone(),
    };
    let service = PushService {
        tx,
        limits: limits.clone(),
        counters: counters.clone(),
    };
    let source = PushEngineSource {
        rx,
        config,
        engines: BTreeMap::new(),
        limits: limits.clone(),
        counters,
    };
    Ok((service, source, limits))
}

impl PushService {
    /// The tonic server wrapping this service.
    pub fn into_server(self) -> ServingServiceServer<PushService> {
        ServingServiceServer::new(self)
    }

    fn hand_over(&self, update: PushUpdate) -> Result<(), Status> {
        match self.tx.try_send(update) {
            Ok(()) => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.dropped_full.fetch_add(1, Ordering::Relaxed);
                debug!("push channel full: update dropped (the next one carries the totals)");
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Status::unavailable("the agent is shutting down"))
            }
        }
    }

    fn reject(&self, e: TelemetryError) -> Status {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        Status::invalid_argument(e.to_string())
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> TelemetryError {
    TelemetryError::InvalidValue {
        field: field.into(),
        message: message.into(),
    }
}

fn pod_of(pod: Option<v1::PodRef>) -> Result<PodRef, TelemetryError> {
    let pod = pod.ok_or_else(|| invalid("pod", "missing: the pushing engine's pod"))?;
    PodRef::try_from(pod).map_err(|e| invalid(e.field().to_string(), e.to_string()))
}

fn count(field: &str, v: Option<f64>) -> Result<Option<f64>, TelemetryError> {
    match v {
        Some(x) if !x.is_finite() || !(0.0..=MAX_PUSHED_VALUE).contains(&x) => Err(invalid(
            field,
            format!("must be a finite number in 0..={MAX_PUSHED_VALUE:e}, got {x}"),
        )),
        other => Ok(other),
    }
}

fn histogram(field: &str, h: Option<v1::Histogram>) -> Result<Option<Histogram>, TelemetryError> {
    match h {
        None => Ok(None),
        Some(h) if h.upper_bounds.is_empty() && h.cumulative_counts.is_empty() => Ok(None),
        Some(h) => Histogram::from_parts(h.upper_bounds, h.cumulative_counts, h.sum, h.count)
            .map(Some)
            .map_err(|e| invalid(field, e.to_string())),
    }
}

/// Validates a pushed `EngineStats` and converts it; the error names the field.
pub(crate) fn engine_stats_to_sample(
    s: v1::EngineStats,
    at: Timestamp,
) -> Result<EngineSample, TelemetryError> {
    let pod = pod_of(s.pod)?;
    if s.model.len() > MAX_MODEL_NAME_BYTES {
        return Err(invalid(
            "model",
            format!(
                "at most {MAX_MODEL_NAME_BYTES} bytes, got {}",
                s.model.len()
            ),
        ));
    }
    let mut e = EngineSample::empty(pod, Framework::Push, s.model, at);
    e.requests_waiting = count("requests_waiting", s.requests_waiting)?;
    e.requests_running = count("requests_running", s.requests_running)?;
    e.kv_cache_usage_ratio = match s.kv_cache_usage_ratio {
        Some(r) if !(0.0..=1.0).contains(&r) => {
            return Err(invalid(
                "kv_cache_usage_ratio",
                format!("must be a fraction in 0..=1, got {r}"),
            ));
        }
        other => other,
    };
    e.kv_capacity_tokens = count("kv_capacity_tokens", s.kv_capacity_tokens)?;
    e.queued_prompt_tokens = count("queued_prompt_tokens", s.queued_prompt_tokens)?;
    e.prompt_tokens_total = count("prompt_tokens_total", s.prompt_tokens_total)?;
    e.generation_tokens_total = count("generation_tokens_total", s.generation_tokens_total)?;
    e.requests_arrived_total = count("requests_arrived_total", s.requests_arrived_total)?;
    e.requests_finished_total = count("requests_finished_total", s.requests_finished_total)?;
    e.preemptions_total = count("preemptions_total", s.preemptions_total)?;
    e.mean_context_tokens = count("mean_context_tokens", s.mean_context_tokens)?;
    e.ttft_seconds = histogram("ttft_seconds", s.ttft_seconds)?;
    e.itl_seconds = histogram("itl_seconds", s.itl_seconds)?;
    e.tpot_seconds = histogram("tpot_seconds", s.tpot_seconds)?;
    e.batch_limit = match s.batch_limit {
        Some(b) if b == 0 || b > MAX_BATCH_LIMIT => {
            return Err(invalid(
                "batch_limit",
                format!("must be in 1..={MAX_BATCH_LIMIT}, got {b}"),
            ));
        }
        other => other,
    };
    Ok(e)
}

#[tonic::async_trait]
impl ServingService for PushService {
    async fn report_engine_stats(
        &self,
        request: Request<Streaming<v1::EngineStats>>,
    ) -> Result<Response<v1::ReportEngineStatsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut accepted = 0u64;
        while let Some(stats) = stream.message().await? {
            // The source stamps the time when it drains the update.
            let sample =
                engine_stats_to_sample(stats, Timestamp::EPOCH).map_err(|e| self.reject(e))?;
            self.hand_over(PushUpdate::Stats(Box::new(sample)))?;
            accepted += 1;
        }
        Ok(Response::new(v1::ReportEngineStatsResponse { accepted }))
    }

    async fn set_readiness(
        &self,
        request: Request<v1::SetReadinessRequest>,
    ) -> Result<Response<v1::SetReadinessResponse>, Status> {
        let r = request.into_inner();
        let pod = pod_of(r.pod).map_err(|e| self.reject(e))?;
        let state = match Readiness::try_from(r.readiness) {
            Ok(Readiness::Loading) => EngineState::Loading,
            Ok(Readiness::Warm) => EngineState::Warm,
            Ok(Readiness::Failed) => EngineState::Failed,
            Ok(Readiness::Unspecified) | Err(_) => {
                return Err(self.reject(invalid(
                    "readiness",
                    format!(
                        "must be READINESS_LOADING, READINESS_WARM or READINESS_FAILED, got {}",
                        r.readiness
                    ),
                )));
            }
        };
        let message: String = r.message.chars().take(1024).collect();
        self.hand_over(PushUpdate::Readiness {
            pod,
            state,
            message,
        })?;
        Ok(Response::new(v1::SetReadinessResponse {}))
    }

    type WatchLimitsStream = WatchStream;

    async fn watch_limits(
        &self,
        request: Request<v1::WatchLimitsRequest>,
    ) -> Result<Response<Self::WatchLimitsStream>, Status> {
        let pod = pod_of(request.into_inner().pod).map_err(|e| self.reject(e))?;
        debug!(pod = %pod, "WatchLimits subscriber");
        Ok(Response::new(self.limits.subscribe(&pod)))
    }
}

#[derive(Debug)]
struct PushedEngine {
    /// The latest stats (sampled_at = the round that received them).
    stats: Option<EngineSample>,
    /// When anything (stats or readiness) last arrived.
    last_seen: Timestamp,
    readiness: EngineState,
}

/// Pushed engines, as an [`EngineSource`]. See the module docs.
#[derive(Debug)]
pub struct PushEngineSource {
    rx: mpsc::Receiver<PushUpdate>,
    config: PushConfig,
    engines: BTreeMap<PodRef, PushedEngine>,
    limits: LimitsHandle,
    counters: Arc<PushCounters>,
}

impl PushEngineSource {
    pub fn stats(&self) -> PushStats {
        self.counters.snapshot()
    }

    /// Drains what the handlers received and reports every known engine.
    pub fn collect(&mut self, now: Timestamp, pods: &[PodGpus]) -> Vec<EngineSample> {
        while let Ok(update) = self.rx.try_recv() {
            match update {
                PushUpdate::Stats(mut sample) => {
                    sample.sampled_at = now;
                    let pod = sample.pod.clone();
                    let e = self.engines.entry(pod.clone()).or_insert_with(|| {
                        info!(pod = %pod, "engine pushing stats");
                        PushedEngine {
                            stats: None,
                            last_seen: now,
                            readiness: EngineState::Unknown,
                        }
                    });
                    e.stats = Some(*sample);
                    e.last_seen = now;
                }
                PushUpdate::Readiness {
                    pod,
                    state,
                    message,
                } => {
                    let e = self.engines.entry(pod.clone()).or_insert(PushedEngine {
                        stats: None,
                        last_seen: now,
                        readiness: EngineState::Unknown,
                    });
                    if e.readiness != state {
                        info!(pod = %pod, state = state.as_str(), message, "engine readiness");
                    }
                    e.readiness = state;
                    e.last_seen = now;
                }
            }
        }
        let stale = self.config.stale_after.as_secs_f64();
        let forget = self.config.forget_after.as_secs_f64();
        self.engines.retain(|pod, e| {
            let keep = now.secs_since(e.last_seen) < forget;
            if !keep {
                info!(pod = %pod, "pushing engine silent too long: forgotten");
            }
            keep
        });
        self.engines
            .iter()
            .map(|(pod, e)| {
                let silent = now.secs_since(e.last_seen) >= stale;
                let mut s = match (&e.stats, silent) {
                    (Some(s), false) => s.clone(),
                    // Silent: every metric missing, the model kept.
                    (Some(s), true) => {
                        EngineSample::empty(pod.clone(), Framework::Push, s.model.clone(), now)
                    }
                    (None, _) => EngineSample::empty(pod.clone(), Framework::Push, "", now),
                };
                s.state = if silent {
                    EngineState::Failed
                } else if self.limits.limits(pod).draining {
                    EngineState::Draining
                } else {
                    e.readiness
                };
                s.gpu_uuids = pods
                    .iter()
                    .find(|p| &p.pod == pod)
                    .map(|p| p.gpu_uuids())
                    .unwrap_or_default();
                s
            })
            .collect()
    }
}

impl EngineSource for PushEngineSource {
    async fn sample_engines(
        &mut self,
        now: Timestamp,
        pods: &[PodGpus],
    ) -> Result<Vec<EngineSample>, SourceError> {
        Ok(self.collect(now, pods))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> v1::EngineStats {
        v1::EngineStats {
            pod: Some(v1::PodRef {
                namespace: "llm".into(),
                name: "e-0".into(),
            }),
            model: "m".into(),
            requests_waiting: Some(2.0),
            kv_cache_usage_ratio: Some(0.5),
            ..Default::default()
        }
    }

    #[test]
    fn valid_stats_convert() {
        let s = engine_stats_to_sample(stats(), Timestamp::EPOCH).unwrap();
        assert_eq!(s.framework, Framework::Push);
        assert_eq!(s.requests_waiting, Some(2.0));
        assert_eq!(s.requests_running, None, "absent stays missing");
    }

    #[test]
    fn bad_values_are_rejected_naming_the_field() {
        let cases: Vec<(v1::EngineStats, &str)> = vec![
            (
                v1::EngineStats {
                    requests_waiting: Some(f64::NAN),
                    ..stats()
                },
                "requests_waiting",
            ),
            (
                v1::EngineStats {
                    generation_tokens_total: Some(-1.0),
                    ..stats()
                },
                "generation_tokens_total",
            ),
            (
                v1::EngineStats {
                    kv_cache_usage_ratio: Some(1.5),
                    ..stats()
                },
                "kv_cache_usage_ratio",
            ),
            (
                v1::EngineStats {
                    batch_limit: Some(0),
                    ..stats()
                },
                "batch_limit",
            ),
            (
                v1::EngineStats {
                    ttft_seconds: Some(v1::Histogram {
                        upper_bounds: vec![0.1, 1.0],
                        cumulative_counts: vec![1, 2],
                        sum: 0.3,
                        count: 2,
                    }),
                    ..stats()
                },
                "ttft_seconds",
            ),
            (
                v1::EngineStats {
                    pod: None,
                    ..stats()
                },
                "pod",
            ),
        ];
        for (s, field) in cases {
            let err = engine_stats_to_sample(s, Timestamp::EPOCH).unwrap_err();
            assert!(err.to_string().starts_with(field), "{field}: {err}");
            assert_eq!(err.kind(), "invalid_value");
        }
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_dropped_not_awaited() {
        let (_service, source, limits) = push_source(PushConfig {
            watcher_buffer: 2,
            ..PushConfig::default()
        })
        .unwrap();
        let pod = PodRef::new("llm", "e-0");
        // Never polled while the limits change: the current value and one
        // change fill its buffer of 2.
        let stream = limits.subscribe(&pod);
        limits.set_batch_limit(&pod, Some(8));
        assert_eq!(limits.watcher_count(&pod), 1);
        limits.set_batch_limit(&pod, Some(16));
        assert_eq!(limits.watcher_count(&pod), 0, "dropped, not awaited");
        limits.set_batch_limit(&pod, Some(32));
        assert_eq!(limits.limits(&pod).batch_limit, Some(32));

        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 3, "{items:?}");
        assert_eq!(items[0].as_ref().unwrap().batch_limit, None);
        assert_eq!(items[1].as_ref().unwrap().batch_limit, Some(8));
        assert_eq!(
            items[2].as_ref().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(source.stats().watchers_dropped_total, 1);
    }
}
