//! [`ScrapeEngineSource`]: every engine target scraped concurrently.
//!
//! Each round, every target's metrics endpoint (and health endpoint, when it
//! has one; and trtllm-serve's JSON iteration stats) is fetched at the same
//! time, each under its own deadline, so a hanging engine delays the round by
//! at most its timeout and never blocks the others. A failed scrape is
//! counted by kind ([`ScrapeStats`]), logged once per change for that
//! target, and reported as the engine in state `Failed` (or `Loading` while
//! its health endpoint says it is loading) with every metric missing; its
//! reason stays readable ([`ScrapeEngineSource::problem`]).
//!
//! A scrape that succeeds but reads nothing at all (an empty body, a 204,
//! another framework's names) is state `NoData`: healthy perhaps, but not
//! capacity anyone can see. Problems inside a good scrape are counted by
//! kind and logged once per change: values that are NaN or infinite
//! (`non_finite`), repeated series (`duplicate_series`), histograms left out
//! (`invalid_histogram`), names cut to the protocol's size (`label_truncated`).

use std::collections::BTreeMap;
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_core::sample::{EngineSample, EngineState, PodGpus};
use tracing::{debug, info, warn};

use gpuscale_proto::convert::{MAX_HISTOGRAM_BUCKETS, MAX_NAME_BYTES};

use super::client::{
    EngineHttpClient, HealthOutcome, HttpClientConfig, WarmupOutcome, WarmupProbe, classify_health,
};
use super::counters::CounterTracker;
use super::mapping::{EngineReading, TrtllmIterationStats, keeps, map_exposition};
use super::{EngineTarget, origin};
use crate::error::TelemetryError;
use crate::prom_text::Exposition;
use crate::source::{EngineSource, SourceError};
use gpuscale_core::Histogram;
use gpuscale_core::sample::Framework;

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
    /// `health` (a failing health endpoint); problems inside a scrape that
    /// was read: `non_finite` (a value read was NaN or infinite: missing),
    /// `duplicate_series` (a repeated series, kept once), `invalid_histogram`
    /// (left out), `label_truncated` (a name cut to the protocol's size),
    /// `no_data` (nothing read at all), `iteration_stats` (trtllm-serve's
    /// JSON stats could not be read).
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// Engine restarts seen (counters went down).
    pub counter_resets_total: u64,
    /// Histograms left out because they were inconsistent.
    pub invalid_histograms_total: u64,
}

impl ScrapeStats {
    fn count(&mut self, kind: &'static str) {
        self.count_n(kind, 1);
    }

    fn count_n(&mut self, kind: &'static str, n: u64) {
        if n > 0 {
            *self.errors_by_kind.entry(kind).or_default() += n;
        }
    }
}

#[derive(Debug)]
struct TargetState {
    target: EngineTarget,
    counters: CounterTracker,
    ever_warm: bool,
    last_error: Option<TelemetryError>,
    /// What was wrong inside the last scrape that was read (logged on change).
    last_notes: Vec<String>,
    /// trtllm-serve: the last iteration stats that held iterations.
    iteration_stats: Option<TrtllmIterationStats>,
    iteration_stats_error: Option<String>,
}

impl TargetState {
    fn new(target: EngineTarget) -> Self {
        Self {
            target,
            counters: CounterTracker::default(),
            ever_warm: false,
            last_error: None,
            last_notes: Vec::new(),
            iteration_stats: None,
            iteration_stats_error: None,
        }
    }
}

/// What one target's round produced, before state is updated.
struct Fetched {
    metrics: Result<String, TelemetryError>,
    health: Option<HealthOutcome>,
    /// trtllm-serve's JSON iteration stats, when the target has them.
    iteration_stats: Option<Result<String, TelemetryError>>,
}

/// trtllm-serve serves its iteration stats as JSON at `/metrics` beside its
/// Prometheus text (at `/prometheus/metrics`).
fn iteration_stats_url(target: &EngineTarget) -> Option<String> {
    if target.framework != Framework::TrtllmServe {
        return None;
    }
    let origin = origin(&target.metrics_url)?;
    let path = &target.metrics_url[origin.len()..];
    (path.split('?').next() != Some("/metrics")).then(|| format!("{origin}/metrics"))
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
                    TargetState::new(target)
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

    /// What is wrong with the target of this pod now, in words: its last
    /// scrape's error, or why it reads no data; `None` when it reads well.
    pub fn problem(&self, pod: &gpuscale_core::ids::PodRef) -> Option<String> {
        let t = self.targets.iter().find(|t| &t.target.pod == pod)?;
        if let Some(e) = &t.last_error {
            return Some(e.to_string());
        }
        t.last_notes
            .iter()
            .find(|n| n.starts_with("no data"))
            .cloned()
    }

    /// Problems inside this pod's last scrape that was read (values missing
    /// as NaN, repeated series, histograms left out, names cut).
    pub fn warnings(&self, pod: &gpuscale_core::ids::PodRef) -> Vec<String> {
        self.targets
            .iter()
            .find(|t| &t.target.pod == pod)
            .map(|t| t.last_notes.clone())
            .unwrap_or_default()
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
                let stats = async {
                    match iteration_stats_url(&target) {
                        Some(url) => Some(client.fetch_json(&url, timeout).await),
                        None => None,
                    }
                };
                let (metrics, health, iteration_stats) = tokio::join!(metrics, health, stats);
                Fetched {
                    metrics,
                    health,
                    iteration_stats,
                }
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

/// Cuts `s` to at most `max` bytes at a character boundary; true if it did.
fn truncate_name(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

/// Leaves out a histogram with more buckets than the protocol carries.
fn bounded(h: &mut Option<Histogram>, name: &str, notes: &mut Vec<String>) -> u64 {
    match h {
        Some(x) if x.bounds().len() > MAX_HISTOGRAM_BUCKETS => {
            notes.push(format!(
                "histogram {name} left out: {} buckets, more than the {MAX_HISTOGRAM_BUCKETS} carried",
                x.bounds().len()
            ));
            *h = None;
            1
        }
        _ => 0,
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
    let framework = state.target.framework;
    let keep = |name: &str| keeps(framework, name);
    let reading: Result<EngineReading, TelemetryError> = fetched.metrics.and_then(|text| {
        let exp = Exposition::parse_filtered(&text, &keep)?;
        Ok(map_exposition(
            framework,
            &exp,
            state.target.model.as_deref(),
        ))
    });
    let health_state = fetched
        .health
        .as_ref()
        .map(|h| classify_health(framework, h, state.ever_warm));

    let target = state.target.clone();
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

    let mut notes: Vec<String> = Vec::new();
    let mut no_data = false;
    let error = match reading {
        Ok(mut r) => {
            if let Some(body) = fetched.iteration_stats {
                apply_iteration_stats(state, body, &mut r, stats);
            }
            note_reading_problems(&mut r, stats, &mut notes);
            no_data = r.has_no_data();
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
    // Names travel to the scaler, which takes at most MAX_NAME_BYTES: a
    // longer one is cut here rather than costing the engine its report.
    let mut truncated = 0;
    for name in [&mut sample.model, &mut sample.container] {
        if truncate_name(name, MAX_NAME_BYTES) {
            truncated += 1;
        }
    }
    if truncated > 0 {
        stats.count_n("label_truncated", truncated);
        notes.push(format!(
            "{truncated} name(s) longer than {MAX_NAME_BYTES} bytes cut"
        ));
    }
    sample.counter_resets_total = state.counters.resets();
    sample.state = match (&error, health_state) {
        (_, Some(EngineState::Loading)) => EngineState::Loading,
        (Some(_), _) => EngineState::Failed,
        (None, Some(EngineState::Warm)) | (None, None) if no_data => EngineState::NoData,
        (None, Some(s)) => s,
        (None, None) => EngineState::Warm,
    };
    if sample.state == EngineState::Warm {
        state.ever_warm = true;
    }
    if sample.state == EngineState::NoData {
        stats.count("no_data");
        notes.insert(
            0,
            format!(
                "no data: {} answered but no {} metric was read (an empty body, or another framework's names)",
                target.metrics_url,
                framework.as_str()
            ),
        );
    }
    if let Some(e) = &error {
        stats.count(e.kind());
    } else if sample.state == EngineState::Failed {
        stats.count("health");
    }

    log_changes(state, error, notes, sample.state);
    sample
}

/// trtllm-serve's JSON iteration statistics into the reading; an unreadable
/// body is counted and logged once per change of its error.
fn apply_iteration_stats(
    state: &mut TargetState,
    body: Result<String, TelemetryError>,
    r: &mut EngineReading,
    stats: &mut ScrapeStats,
) {
    let pod = &state.target.pod;
    let parsed = body
        .map_err(|e| e.to_string())
        .and_then(|b| TrtllmIterationStats::parse(&b));
    match parsed {
        Ok(it) => {
            it.fill(state.iteration_stats.as_ref(), r);
            if state.iteration_stats_error.take().is_some() {
                info!(pod = %pod, "trtllm-serve iteration stats readable again");
            }
            if it.iterations > 0 {
                state.iteration_stats = Some(it);
            }
        }
        Err(why) => {
            stats.count("iteration_stats");
            if state.iteration_stats_error.as_deref() != Some(why.as_str()) {
                warn!(pod = %pod, error = %why,
                    "trtllm-serve iteration stats (JSON /metrics) unreadable: running, waiting and KV use from the Prometheus text only");
            }
            state.iteration_stats_error = Some(why);
        }
    }
}

/// What the reading left out or repaired, counted and noted: invalid or
/// oversized histograms, non-finite values, repeated series.
fn note_reading_problems(r: &mut EngineReading, stats: &mut ScrapeStats, notes: &mut Vec<String>) {
    stats.count_n("invalid_histogram", r.invalid_histograms.len() as u64);
    stats.invalid_histograms_total += r.invalid_histograms.len() as u64;
    for why in r.invalid_histograms.drain(..) {
        notes.push(format!("histogram left out: {why}"));
    }
    stats.count_n("non_finite", r.non_finite.len() as u64);
    for name in r.non_finite.drain(..) {
        notes.push(format!("{name} is NaN or infinite: missing"));
    }
    stats.count_n("duplicate_series", r.duplicate_series as u64);
    if r.duplicate_series > 0 {
        notes.push(format!("{} repeated series kept once", r.duplicate_series));
    }
    let mut cut = 0;
    cut += bounded(&mut r.ttft_seconds, "ttft", notes);
    cut += bounded(&mut r.itl_seconds, "itl", notes);
    cut += bounded(&mut r.tpot_seconds, "tpot", notes);
    stats.count_n("invalid_histogram", cut);
    stats.invalid_histograms_total += cut;
}

/// Logs once per change of the target's error, and of its notes.
fn log_changes(
    state: &mut TargetState,
    error: Option<TelemetryError>,
    notes: Vec<String>,
    engine_state: EngineState,
) {
    let pod = &state.target.pod;
    match (&state.last_error, &error) {
        (None, Some(e)) => {
            if engine_state == EngineState::Loading {
                debug!(pod = %pod, error = %e, "engine loading: metrics not served yet");
            } else {
                warn!(pod = %pod, kind = e.kind(), error = %e,
                    "engine scrape failed; reported as failed with metrics missing");
            }
        }
        (Some(old), Some(e)) if old.kind() != e.kind() => {
            warn!(pod = %pod, kind = e.kind(), error = %e, "engine scrape still failing");
        }
        (Some(_), None) => info!(pod = %pod, "engine scrape recovered"),
        _ => {}
    }
    if error.is_none() && notes != state.last_notes {
        if notes.is_empty() {
            info!(pod = %pod, "engine metrics read cleanly again");
        } else {
            warn!(pod = %pod, state = engine_state.as_str(), problems = %notes.join("; "),
                "engine metrics read with problems");
        }
        state.last_notes = notes;
    }
    state.last_error = error;
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
