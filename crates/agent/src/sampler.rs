//! The sampling loop: every interval, read the three sources and publish the
//! node's state as the newest [`Sampled`] value.
//!
//! Publication is a `watch` channel: the newest state replaces the previous
//! one, so however long the uplink is away, the agent holds exactly one
//! unsent state (bounded memory); the uplink counts the states it never sent
//! as coalesced. A source that fails keeps its previous items (so a delta does
//! not remove GPUs that could not be read this round), the error is counted by
//! source and kind, and it is logged once when the source's state changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gpuscale_core::sample::{AgentHealth, EngineSample, GpuSample, NodeSnapshot, PodGpus};
use gpuscale_telemetry::{EngineSource, GpuSource, PodGpuSource, SourceError};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::metrics::{AgentMetrics, SourceName};
use crate::{AgentConfig, Clock};

/// One sampled state of the node, numbered.
#[derive(Debug)]
pub struct Sampled {
    /// 1 for the first sample of the process, +1 per round.
    pub generation: u64,
    pub snapshot: NodeSnapshot,
    /// Set by whoever gets to it first: the uplink taking the state to send
    /// it, or the sampler replacing it unsent (which counts it as coalesced).
    claimed: AtomicBool,
}

impl Sampled {
    /// Marks the state as taken by the uplink.
    pub(crate) fn claim(&self) {
        self.claimed.store(true, Ordering::Relaxed);
    }
}

pub(crate) struct Sampler<G, P, E> {
    pub(crate) config: Arc<AgentConfig>,
    pub(crate) gpus: G,
    pub(crate) pods: P,
    pub(crate) engines: E,
    pub(crate) clock: Clock,
    pub(crate) metrics: Arc<AgentMetrics>,
    pub(crate) latest: watch::Sender<Option<Arc<Sampled>>>,
    pub(crate) interval: watch::Receiver<Duration>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// What each source last did, so that only changes are logged.
#[derive(Default)]
struct SourceHealth {
    failing: Option<&'static str>,
}

impl SourceHealth {
    fn ok(&mut self, source: SourceName) {
        if let Some(kind) = self.failing.take() {
            tracing::info!(
                source = source.as_str(),
                previous_error = kind,
                "source recovered"
            );
        }
    }
    fn failed(&mut self, source: SourceName, kind: &'static str, error: &dyn std::fmt::Display) {
        if self.failing != Some(kind) {
            tracing::warn!(source = source.as_str(), kind, %error, "source failed; keeping its previous values and retrying every interval");
        } else {
            tracing::debug!(source = source.as_str(), kind, %error, "source still failing");
        }
        self.failing = Some(kind);
    }
}

async fn read<T>(
    source: SourceName,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, SourceError>>,
    health: &mut SourceHealth,
    metrics: &AgentMetrics,
) -> Option<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => {
            health.ok(source);
            Some(v)
        }
        Ok(Err(e)) => {
            metrics.sample_error(source, e.kind);
            health.failed(source, e.kind, &e);
            None
        }
        Err(_) => {
            metrics.sample_error(source, "timeout");
            health.failed(
                source,
                "timeout",
                &format_args!("no answer within {timeout:?}"),
            );
            None
        }
    }
}

impl<G: GpuSource, P: PodGpuSource, E: EngineSource> Sampler<G, P, E> {
    pub(crate) async fn run(mut self) {
        let mut period = *self.interval.borrow_and_update();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut generation = 0u64;
        let mut gpus: Vec<GpuSample> = Vec::new();
        let mut pods: Vec<PodGpus> = Vec::new();
        let mut engines: Vec<EngineSample> = Vec::new();
        let mut health = [
            SourceHealth::default(),
            SourceHealth::default(),
            SourceHealth::default(),
        ];
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => return,
                changed = self.interval.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let new = *self.interval.borrow_and_update();
                    if new != period {
                        tracing::info!(interval_ms = new.as_millis() as u64, "sampling interval changed");
                        period = new;
                        ticker = tokio::time::interval_at(Instant::now() + period, period);
                        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                    continue;
                }
                _ = ticker.tick() => {}
            }
            let now = self.clock.now();
            let started = Instant::now();
            let timeout = self.config.source_timeout;
            let [pod_health, gpu_health, engine_health] = &mut health;
            if let Some(p) = read(
                SourceName::Pods,
                timeout,
                self.pods.list_pod_gpus(now),
                pod_health,
                &self.metrics,
            )
            .await
            {
                pods = p;
            }
            if let Some(g) = read(
                SourceName::Gpus,
                timeout,
                self.gpus.sample_gpus(now),
                gpu_health,
                &self.metrics,
            )
            .await
            {
                gpus = g;
            }
            if let Some(e) = read(
                SourceName::Engines,
                timeout,
                self.engines.sample_engines(now, &pods),
                engine_health,
                &self.metrics,
            )
            .await
            {
                engines = e;
            }
            self.metrics.sampled(started.elapsed().as_secs_f64());
            generation += 1;
            let snapshot = NodeSnapshot {
                node: self.config.node_name.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                sampled_at: now,
                sample_interval_ms: u32::try_from(period.as_millis()).unwrap_or(u32::MAX),
                gpus: gpus.clone(),
                pods: pods.clone(),
                engines: engines.clone(),
                agent: AgentHealth {
                    samples_total: self.metrics.samples_total(),
                    sample_errors_total: self.metrics.sample_errors_total(),
                    reconnects_total: self.metrics.reconnects_total(),
                    coalesced_total: self.metrics.coalesced_total(),
                    nvml_available: self.config.nvml_available,
                    pod_resources_available: self.config.pod_resources_available,
                },
            };
            tracing::trace!(
                generation,
                gpus = gpus.len(),
                engines = engines.len(),
                "sampled"
            );
            let replaced = self.latest.send_replace(Some(Arc::new(Sampled {
                generation,
                snapshot,
                claimed: AtomicBool::new(false),
            })));
            if let Some(old) = replaced
                && !old.claimed.swap(true, Ordering::Relaxed)
            {
                self.metrics.coalesced(1);
            }
        }
    }
}
