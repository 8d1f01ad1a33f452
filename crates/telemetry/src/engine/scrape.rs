//! [`ScrapeEngineSource`]: every engine target scraped concurrently.
//!
//! Each round, every target's metrics endpoint (and health endpoint, when it
//! has one) is fetched at the same time, each under its own deadline, so a
//! hanging engine delays the round by at most its timeout and never blocks
//! the others. A failed scrape is counted by kind ([`ScrapeStats`]), logged
//! once per change for that target, and reported as the engine in state
//! `Failed` (or `Loading` while its health endpoint says it is loading) with
//! every metric missing.

use std::collections::BTreeMap;
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_core::sample::{EngineSample, EngineState, PodGpus};
use tracing::{debug, info, warn};

use super::EngineTarget;
use super::client::{
    EngineHttpClient, HealthOutcome, HttpClientConfig, WarmupOutcome, WarmupProbe, classify_health,
};
use super::counters::CounterTracker;
use super::mapping::{EngineReading, map_exposition, metric_prefixes};
use crate::error::TelemetryError;
use crate::prom_text::Exposition;
use crate::source::{EngineSource, SourceError};

/// How engines are scraped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeConfig {
    /// Deadline of one target's scrape (metrics and health together), unless
    /// the target sets its own.
    pub default_timeout: Duration,
    /// Check each target's health endpoint every round.
    pub health_checks: bool,
    pub http: HttpClientConfig,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(2),
            health_checks: true,
            http: HttpClientConfig::default(),
        }
    }
}

impl ScrapeConfig {
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if self.default_timeout < Duration::from_millis(10)
            || self.default_timeout > Duration::from_secs(60)
        {
            return Err(TelemetryError::config(
                "engines.scrape_timeout",
                format!("{:?}", self.default_timeout),
                "between 10 ms and 60 s",
            ));
        }
        self.http.validate()
    }
}

/// Counters of the engine scrapes, for the agent's own metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrapeStats {
    /// Scrape attempts (one per target per round).
    pub scrapes_total: u64,
    /// Failed scrapes by kind: `connect`, `timeout`, `http_status`,
    /// `content_type`, `too_large`, `body`, `truncated`, `parse`, and
    /// `health` (a failing health endpoint).
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// Engine restarts seen (counters went down).
    pub counter_resets_total: u64,
    /// Histograms left out because they were inconsistent.
    pub invalid_histograms_total: u64,
}

impl ScrapeStats {
    fn count(&mut self, kind: &'static str) {
        *self.errors_by_kind.entry(kind).or_default() += 1;
    }
}

#[derive(Debug)]
struct TargetState {
    target: EngineTarget,
    counters: CounterTracker,
    ever_warm: bool,
    last_error: Option<TelemetryError>,
}

/// What one target's round produced, before state is updated.
struct Fetched {
    metrics: Result<String, TelemetryError>,
    health: Option<HealthOutcome>,
}

/// Engines read through their Prometheus endpoints. See the module docs.
#[derive(Debug)]
pub struct ScrapeEngineSource {
    client: EngineHttpClient,
    config: ScrapeConfig,
    targets: Vec<TargetState>,
    stats: ScrapeStats,
}

impl ScrapeEngineSource {
    pub fn new(config: ScrapeConfig) -> Result<Self, TelemetryError> {
        config.validate()?;
        Ok(Self {
            client: EngineHttpClient::new(config.http.clone())?,
            config,
            targets: Vec::new(),
            stats: ScrapeStats::default(),
        })
    }

    /// Replaces the target list (discovery ran again). Targets that stay
    /// (same pod and metrics URL) keep their counter offsets and state.
    pub fn set_targets(&mut self, targets: Vec<EngineTarget>) {
        let mut old: Vec<TargetState> = std::mem::take(&mut self.targets);
        for target in targets {
            let kept = old
                .iter()
                .position(|s| {
                    s.target.pod == target.pod && s.target.metrics_url == target.metrics_url
                })
                .map(|i| old.swap_remove(i));
            let state = match kept {
                Some(mut s) => {
                    s.target = target;
                    s
                }
                None => {
                    info!(pod = %target.pod, framework = target.framework.as_str(),
                        url = %target.metrics_url, "engine target added");
                    TargetState {
                        target,
                        counters: CounterTracker::default(),
                        ever_warm: false,
                        last_error: None,
                    }
                }
            };
            self.targets.push(state);
        }
        for gone in old {
            info!(pod = %gone.target.pod, url = %gone.target.metrics_url, "engine target removed");
        }
    }

    pub fn targets(&self) -> impl Iterator<Item = &EngineTarget> {
        self.targets.iter().map(|t| &t.target)
    }

    pub fn stats(&self) -> &ScrapeStats {
        &self.stats
    }

    /// The last scrape error of the target of this pod, if its last scrape failed.
    pub fn last_error(&self, pod: &gpuscale_core::ids::PodRef) -> Option<&TelemetryError> {
        self.targets
            .iter()
            .find(|t| &t.target.pod == pod)
            .and_then(|t| t.last_error.as_ref())
    }

    /// The HTTP client, shared with the readiness-gate writer.
    pub fn client(&self) -> &EngineHttpClient {
        &self.client
    }

    /// Sends a warm-up request to a target (see [`WarmupProbe`]).
    pub async fn warm_up(
        &self,
        target: &EngineTarget,
        probe: &WarmupProbe,
    ) -> Result<WarmupOutcome, TelemetryError> {
        self.client.warm_up(target, probe).await
    }

    /// One round over every target; see [`EngineSource::sample_engines`].
    pub async fn scrape_all(&mut self, now: Timestamp, pods: &[PodGpus]) -> Vec<EngineSample> {
        let health_checks = self.config.health_checks;
        let rounds = self.targets.iter().map(|t| {
            let client = self.client.clone();
            let target = t.target.clone();
            let timeout = target.timeout.unwrap_or(self.config.default_timeout);
            async move {
                let metrics = client.fetch_metrics(&target.metrics_url, timeout);
                let health = async {
                    match (&target.health_url, health_checks) {
                        (Some(url), true) => Some(client.check_health(url, timeout).await),
                        _ => None,
                    }
                };
                let (metrics, health) = tokio::join!(metrics, health);
                Fetched { metrics, health }
            }
        });
        let fetched = futures::future::join_all(rounds).await;
        let mut samples = Vec::with_capacity(fetched.len());
        for (state, f) in self.targets.iter_mut().zip(fetched) {
            samples.push(apply(state, f, now, pods, &mut self.stats));
        }
        samples
    }
}

fn apply(
    state: &mut TargetState,
    fetched: Fetched,
    now: Timestamp,
    pods: &[PodGpus],
    stats: &mut ScrapeStats,
) -> EngineSample {
    stats.scrapes_total += 1;
    let target = &state.target;
    let prefixes = metric_prefixes(target.framework);
    let keep = |name: &str| prefixes.iter().any(|p| name.starts_with(p));
    let reading: Result<EngineReading, TelemetryError> = fetched.metrics.and_then(|text| {
        let exp = Exposition::parse_filtered(&text, &keep)?;
        Ok(map_exposition(
            target.framework,
            &exp,
            target.model.as_deref(),
        ))
    });
    let health_state = fetched
        .health
        .as_ref()
        .map(|h| classify_health(target.framework, h, state.ever_warm));

    let mut sample = EngineSample::empty(
        target.pod.clone(),
        target.framework,
        target.model.clone().unwrap_or_default(),
        now,
    );
    sample.container = target.container.clone();
    sample.gpu_uuids = pods
        .iter()
        .find(|p| p.pod == target.pod)
        .map(|p| p.gpu_uuids())
        .unwrap_or_default();

    let error = match reading {
        Ok(mut r) => {
            for why in r.invalid_histograms.drain(..) {
                stats.invalid_histograms_total += 1;
                debug!(pod = %target.pod, why, "histogram left out");
            }
            if state.counters.apply(&mut r) {
                stats.counter_resets_total += 1;
                info!(pod = %target.pod, resets = state.counters.resets(),
                    "engine counters went down (restart): totals continue from the previous values");
            }
            if sample.model.is_empty() {
                sample.model = r.model.clone().unwrap_or_default();
            }
            fill(&mut sample, r);
            None
        }
        Err(e) => Some(e),
    };
    sample.counter_resets_total = state.counters.resets();
    sample.state = match (&error, health_state) {
        (_, Some(EngineState::Loading)) => EngineState::Loading,
        (Some(_), _) => EngineState::Failed,
        (None, Some(s)) => s,
        (None, None) => EngineState::Warm,
    };
    if sample.state == EngineState::Warm {
        state.ever_warm = true;
    }
    if let Some(e) = &error {
        stats.count(e.kind());
    } else if sample.state == EngineState::Failed {
        stats.count("health");
    }

    // Log once per change of the target's error.
    match (&state.last_error, &error) {
        (None, Some(e)) => {
            if sample.state == EngineState::Loading {
                debug!(pod = %target.pod, error = %e, "engine loading: metrics not served yet");
            } else {
                warn!(pod = %target.pod, kind = e.kind(), error = %e,
                    "engine scrape failed; reported as failed with metrics missing");
            }
        }
        (Some(old), Some(e)) if old.kind() != e.kind() => {
            warn!(pod = %target.pod, kind = e.kind(), error = %e, "engine scrape still failing");
        }
        (Some(_), None) => info!(pod = %target.pod, "engine scrape recovered"),
        _ => {}
    }
    state.last_error = error;
    sample
}

fn fill(s: &mut EngineSample, r: EngineReading) {
    s.requests_waiting = r.requests_waiting;
    s.requests_running = r.requests_running;
    s.kv_cache_usage_ratio = r.kv_cache_usage_ratio;
    s.kv_capacity_tokens = r.kv_capacity_tokens;
    s.queued_prompt_tokens = r.queued_prompt_tokens;
    s.prompt_tokens_total = r.prompt_tokens_total;
    s.generation_tokens_total = r.generation_tokens_total;
    s.requests_arrived_total = r.requests_arrived_total;
    s.requests_finished_total = r.requests_finished_total;
    s.preemptions_total = r.preemptions_total;
    s.ttft_seconds = r.ttft_seconds;
    s.itl_seconds = r.itl_seconds;
    s.tpot_seconds = r.tpot_seconds;
    s.batch_limit = r.batch_limit;
    s.mean_context_tokens = r.mean_context_tokens;
}

impl EngineSource for ScrapeEngineSource {
    async fn sample_engines(
        &mut self,
        now: Timestamp,
        pods: &[PodGpus],
    ) -> Result<Vec<EngineSample>, SourceError> {
        Ok(self.scrape_all(now, pods).await)
    }
}
