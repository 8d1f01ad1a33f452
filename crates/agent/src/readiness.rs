//! The readiness-gate writer.
//!
//! A pod that declares the readiness gate (`gpuscale.dev/engine-warm` by
//! default) in `spec.readinessGates` is Ready only when that condition is
//! `True` (REFERENCE §7.1). The writer sets it, for the pods on this node:
//!
//! * **`True`** once the pod's engine is healthy (state `Warm` in the newest
//!   sample) **and** a warm-up probe succeeded since it became healthy:
//!   one short completion request ([`WarmupMode::Completion`], the default,
//!   through telemetry's [`EngineHttpClient::warm_up`]), the engine's ready
//!   endpoint ([`WarmupMode::Health`]), or nothing ([`WarmupMode::None`]).
//!   Engines without an HTTP target (pushing engines, the fake node) are
//!   warm when they say so.
//! * **`False`** while the scaler drains the pod (a `DrainPod` directive),
//!   when the engine fails, loads or restarts (the warm-up is then needed
//!   again), and while the warm-up has not succeeded yet; the `reason`
//!   (`Draining`, `EngineFailed`, `EngineLoading`, `EngineUnknown`,
//!   `WarmingUp`, `WarmupFailed`, `EngineWarm`) and `message` say why.
//!
//! # How it writes
//!
//! A strategic-merge patch on the `pods/status` subresource (REFERENCE
//! §7.2): it upserts the one condition by `type` and leaves the kubelet's
//! conditions alone; a JSON merge patch would replace the whole array.
//! `lastTransitionTime` changes only when the status flips. A write happens
//! only when the pod's condition (as the node-scoped watch last saw it)
//! differs from the desired status or reason, and not again for the same
//! value until the watch had [`ReadinessConfig::resync_after`] to catch up:
//! idempotent, and cheap on the API server.
//!
//! Failed writes (409, 5xx, timeouts, and also 403/422, which need a human
//! but may be fixed while the agent runs) are counted by kind, logged once
//! per change of kind, and retried after a jittered exponential backoff.
//! (kube-rs' client already retries 429, 503 and 504 a few times itself;
//! what still fails after that lands here.) Warm-ups and writes run as their own tasks, at most one of each
//! per pod; the writer itself never waits on them, and sampling never waits
//! on the writer.

use gpuscale_core::jitter::Jitter;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::sample::{EngineSample, EngineState};
use gpuscale_core::{PodRef, Timestamp};
use gpuscale_telemetry::EngineTarget;
use gpuscale_telemetry::engine::client::HealthOutcome;
use gpuscale_telemetry::engine::{EngineHttpClient, WarmupProbe};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Clock;
use crate::backoff::BackoffConfig;
use crate::directives::NodeDirectives;
use crate::discovery::{GateCondition, NodePod, NodePods, kube_error_kind};
use crate::error::AgentError;
use crate::exporter::{NodeStats, source};
use crate::sampler::Sampled;

/// How an engine proves it is warm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WarmupMode {
    /// One short completion request (the framework's smallest generation).
    Completion,
    /// The engine's health or ready endpoint answers 2xx.
    Health,
    /// Healthy is warm enough.
    None,
}

/// The warm-up probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupConfig {
    pub mode: WarmupMode,
    /// Deadline of one probe.
    pub timeout: Duration,
    /// Replaces the framework's completion path (e.g. `/v1/chat/completions`).
    pub path: Option<String>,
    /// Replaces the framework's completion body (JSON).
    pub body: Option<String>,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        Self {
            mode: WarmupMode::Completion,
            timeout: Duration::from_secs(30),
            path: None,
            body: None,
        }
    }
}

/// How the writer behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadinessConfig {
    /// The condition type (the gate's `conditionType`).
    pub gate: String,
    pub warmup: WarmupConfig,
    /// Delays between failed writes, and between failed warm-ups.
    pub retry: BackoffConfig,
    /// Deadline of one pods/status write.
    pub write_timeout: Duration,
    /// After a successful write, the same value is not written again for
    /// this long while the watch has not shown it yet.
    pub resync_after: Duration,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        Self {
            gate: crate::discovery::DEFAULT_READINESS_GATE.to_string(),
            warmup: WarmupConfig::default(),
            retry: BackoffConfig {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(60),
                jitter: 0.5,
            },
            write_timeout: Duration::from_secs(10),
            resync_after: Duration::from_secs(30),
        }
    }
}

impl ReadinessConfig {
    /// Checks every field; the error names the flag, the value and what is allowed.
    pub fn validate(&self) -> Result<(), AgentError> {
        let gate = self.gate.as_str();
        if !gpuscale_core::names::is_label_key(gate) {
            return Err(AgentError::config(
                "--readiness-gate",
                gate,
                "a condition type in label-key form, e.g. gpuscale.dev/engine-warm",
            ));
        }
        gpuscale_core::bounds::duration_within(
            self.warmup.timeout,
            Duration::from_millis(10),
            Duration::from_secs(600),
        )
        .map_err(|e| AgentError::out_of_range("--warmup-timeout", e))?;
        if let Some(p) = &self.warmup.path
            && !p.starts_with('/')
        {
            return Err(AgentError::config(
                "--warmup-path",
                p,
                "a path starting with `/`, e.g. /v1/completions",
            ));
        }
        if let Some(b) = &self.warmup.body
            && serde_json::from_str::<serde_json::Value>(b).is_err()
        {
            return Err(AgentError::config(
                "--warmup-body",
                b,
                "a JSON request body, e.g. {\"prompt\":\"Hello\",\"max_tokens\":1}",
            ));
        }
        self.retry.validate()?;
        for (field, d) in [
            ("readiness.write_timeout", self.write_timeout),
            ("readiness.resync_after", self.resync_after),
        ] {
            if d.is_zero() || d > Duration::from_secs(3600) {
                return Err(AgentError::config(
                    field,
                    format!("{d:?}"),
                    "more than 0 and at most 1h",
                ));
            }
        }
        Ok(())
    }
}

/// Where the pod's engine is on its way to serving.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Warmth {
    /// Not healthy yet, or healthy and no probe sent yet.
    Cold,
    /// Probe number `attempt` (0-based) is in flight; earlier ones failed.
    Probing { attempt: u32 },
    /// The last probe failed; probe number `attempt` is due at `at`.
    Retry {
        at: Instant,
        attempt: u32,
        last_error: String,
    },
    /// A probe succeeded since the engine became healthy.
    Warm { elapsed_ms: u64 },
}

/// The condition the writer wants the pod to have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Desired {
    pub(crate) status: bool,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl Desired {
    fn no(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: false,
            reason,
            message: message.into(),
        }
    }
}

/// What the gate should say, from the pod's engine, the scaler's drain and
/// the warm-up. Pure.
pub(crate) fn desired(
    engine: Option<&EngineSample>,
    draining: Option<&str>,
    warmth: &Warmth,
) -> Desired {
    if let Some(why) = draining {
        return Desired::no("Draining", format!("the scaler drains this pod: {why}"));
    }
    match engine.map(|e| e.state) {
        None => Desired::no(
            "EngineUnknown",
            "no engine is known for this pod: annotate it with gpuscale.dev/metrics-port and \
             gpuscale.dev/framework, name it with --engine, or push to the node's ServingService",
        ),
        Some(EngineState::Failed) => Desired::no(
            "EngineFailed",
            "the engine's health or metrics endpoint fails",
        ),
        Some(EngineState::Loading | EngineState::Unknown) => {
            Desired::no("EngineLoading", "the engine is loading")
        }
        Some(EngineState::Draining) => Desired::no("Draining", "the engine is draining"),
        Some(EngineState::NoData) => Desired::no(
            "EngineNoData",
            "the engine answers but its metrics read nothing (an empty body, or the framework \
             named by --engine or gpuscale.dev/framework is not the engine's): its load cannot \
             be seen",
        ),
        Some(EngineState::Warm) => match warmth {
            Warmth::Warm { elapsed_ms } => Desired {
                status: true,
                reason: "EngineWarm",
                message: format!("engine healthy; warm-up succeeded in {elapsed_ms} ms"),
            },
            Warmth::Retry { last_error, .. } => Desired::no(
                "WarmupFailed",
                format!("engine healthy; warm-up failed, retrying: {last_error}"),
            ),
            Warmth::Probing { attempt } if *attempt > 0 => {
                Desired::no("WarmupFailed", "engine healthy; warm-up failed, retrying")
            }
            Warmth::Cold | Warmth::Probing { .. } => Desired::no(
                "WarmingUp",
                "engine healthy; waiting for the warm-up request",
            ),
        },
    }
}

/// Whether the pod already shows `want`.
fn in_sync(observed: Option<&GateCondition>, want: &Desired) -> bool {
    observed.is_some_and(|c| c.is_true() == want.status && c.reason.as_deref() == Some(want.reason))
}

/// `lastTransitionTime` for a write: kept when the status does not flip.
fn transition_time(observed: Option<&GateCondition>, want: &Desired, now: Timestamp) -> String {
    match observed {
        Some(c) if c.is_true() == want.status && (c.status == "True" || c.status == "False") => c
            .last_transition_time
            .clone()
            .unwrap_or_else(|| rfc3339(now)),
        _ => rfc3339(now),
    }
}

/// RFC 3339 with whole seconds, as Kubernetes writes times.
pub(crate) fn rfc3339(t: Timestamp) -> String {
    k8s_openapi::jiff::Timestamp::from_second(t.as_millis().div_euclid(1000))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// The strategic-merge patch that upserts one condition.
pub(crate) fn condition_patch(gate: &str, want: &Desired, transition: &str) -> serde_json::Value {
    serde_json::json!({
        "status": {
            "conditions": [{
                "type": gate,
                "status": if want.status { "True" } else { "False" },
                "reason": want.reason,
                "message": want.message,
                "lastTransitionTime": transition,
            }]
        }
    })
}

#[derive(Debug)]
struct Written {
    status: bool,
    reason: &'static str,
    at: Instant,
}

/// What the writer keeps per gated pod.
#[derive(Debug)]
struct PodState {
    uid: String,
    warmth: Warmth,
    written: Option<Written>,
    writing: bool,
    failed_writes: u32,
    retry_write_at: Option<Instant>,
    write_failing: Option<&'static str>,
    warmup_failing: Option<&'static str>,
}

impl PodState {
    fn new(uid: String) -> Self {
        Self {
            uid,
            warmth: Warmth::Cold,
            written: None,
            writing: false,
            failed_writes: 0,
            retry_write_at: None,
            write_failing: None,
            warmup_failing: None,
        }
    }
}

/// A finished warm-up or write.
enum Done {
    Warmup {
        pod: PodRef,
        uid: String,
        result: Result<Duration, (&'static str, String)>,
    },
    Write {
        pod: PodRef,
        uid: String,
        want: Desired,
        result: Result<(), (&'static str, String)>,
    },
}

/// The writer task; see the module docs.
pub(crate) struct ReadinessWriter {
    pub(crate) config: ReadinessConfig,
    pub(crate) client: kube::Client,
    pub(crate) http: EngineHttpClient,
    pub(crate) pods: watch::Receiver<Arc<NodePods>>,
    pub(crate) samples: watch::Receiver<Option<Arc<Sampled>>>,
    pub(crate) directives: watch::Receiver<NodeDirectives>,
    pub(crate) targets: watch::Receiver<Arc<Vec<EngineTarget>>>,
    pub(crate) clock: Clock,
    pub(crate) stats: Arc<NodeStats>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) seed: u64,
}

impl ReadinessWriter {
    pub(crate) async fn run(mut self) {
        let mut states: BTreeMap<PodRef, PodState> = BTreeMap::new();
        let mut tasks: JoinSet<Done> = JoinSet::new();
        let mut jitter = Jitter::new(self.seed);
        tracing::info!(gate = %self.config.gate, warmup = ?self.config.warmup.mode, "readiness-gate writer started");
        loop {
            self.reconcile(&mut states, &mut tasks);
            let due = states
                .values()
                .filter_map(|s| {
                    let warm = match &s.warmth {
                        Warmth::Retry { at, .. } => Some(*at),
                        _ => None,
                    };
                    match (warm, s.retry_write_at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                })
                .min();
            let done = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => {
                    tasks.abort_all();
                    return;
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => done.ok(),
                r = self.pods.changed() => if r.is_err() { return } else { None },
                r = self.samples.changed() => if r.is_err() { return } else { None },
                r = self.directives.changed() => if r.is_err() { return } else { None },
                _ = tokio::time::sleep_until(due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if due.is_some() => None,
            };
            if let Some(done) = done {
                self.finished(done, &mut states, &mut jitter);
            }
        }
    }

    fn reconcile(&mut self, states: &mut BTreeMap<PodRef, PodState>, tasks: &mut JoinSet<Done>) {
        let pods = self.pods.borrow_and_update().clone();
        let sampled = self.samples.borrow_and_update().clone();
        let directives = self.directives.borrow_and_update().clone();
        let gate = self.config.gate.clone();
        let engines: &[EngineSample] = sampled
            .as_ref()
            .map(|s| s.snapshot.engines.as_slice())
            .unwrap_or_default();
        states.retain(|pod, s| {
            pods.pods
                .get(pod)
                .is_some_and(|p| p.uid == s.uid && p.has_gate(&gate))
        });
        if !pods.synced {
            return;
        }
        let now = Instant::now();
        for p in pods.pods.values().filter(|p| p.has_gate(&gate)) {
            let state = states
                .entry(p.pod.clone())
                .or_insert_with(|| PodState::new(p.uid.clone()));
            let engine = engines.iter().find(|e| e.pod == p.pod);
            self.advance_warmth(p, engine, state, now, tasks);
            let want = desired(
                engine,
                directives.draining.get(&p.pod).map(String::as_str),
                &state.warmth,
            );
            let observed = p.gate_conditions.get(&gate);
            if in_sync(observed, &want) {
                continue;
            }
            if state.writing || state.retry_write_at.is_some_and(|at| now < at) {
                continue;
            }
            if let Some(w) = &state.written
                && w.status == want.status
                && w.reason == want.reason
                && now.duration_since(w.at) < self.config.resync_after
            {
                continue;
            }
            state.writing = true;
            state.retry_write_at = None;
            let transition = transition_time(observed, &want, self.clock.now());
            let patch = condition_patch(&gate, &want, &transition);
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &p.pod.namespace);
            let (pod, uid, timeout) = (p.pod.clone(), p.uid.clone(), self.config.write_timeout);
            tasks.spawn(async move {
                let (params, patch) = (PatchParams::default(), Patch::Strategic(patch));
                let call = api.patch_status(&pod.name, &params, &patch);
                let result = match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err((kube_error_kind(&e), e.to_string())),
                    Err(_) => Err(("timeout", format!("no answer within {timeout:?}"))),
                };
                Done::Write {
                    pod,
                    uid,
                    want,
                    result,
                }
            });
        }
    }

    /// Moves the pod's warm-up along with its engine's state.
    fn advance_warmth(
        &self,
        p: &NodePod,
        engine: Option<&EngineSample>,
        state: &mut PodState,
        now: Instant,
        tasks: &mut JoinSet<Done>,
    ) {
        match engine.map(|e| e.state) {
            Some(EngineState::Warm) => {}
            // Drained engines keep their warmth: undrained, they serve at once.
            Some(EngineState::Draining) => return,
            _ => {
                if !matches!(state.warmth, Warmth::Cold) {
                    tracing::info!(pod = %p.pod, state = engine.map_or("absent", |e| e.state.as_str()),
                        "engine no longer healthy: it must warm up again");
                }
                state.warmth = Warmth::Cold;
                return;
            }
        }
        let attempt = match &state.warmth {
            Warmth::Cold => 0,
            Warmth::Retry { at, attempt, .. } if now >= *at => *attempt,
            _ => return,
        };
        let target = self
            .targets
            .borrow()
            .iter()
            .find(|t| t.pod == p.pod)
            .cloned();
        let model = engine.map(|e| e.model.clone()).unwrap_or_default();
        let (http, warmup) = (self.http.clone(), self.config.warmup.clone());
        let (pod, uid) = (p.pod.clone(), p.uid.clone());
        state.warmth = Warmth::Probing { attempt };
        tasks.spawn(async move {
            let result = warm_up(&http, target.as_ref(), &model, &warmup).await;
            Done::Warmup { pod, uid, result }
        });
    }

    fn finished(
        &mut self,
        done: Done,
        states: &mut BTreeMap<PodRef, PodState>,
        jitter: &mut Jitter,
    ) {
        match done {
            Done::Warmup { pod, uid, result } => {
                let Some(state) = states.get_mut(&pod).filter(|s| s.uid == uid) else {
                    return;
                };
                let Warmth::Probing { attempt } = state.warmth else {
                    // The engine failed meanwhile: this result is stale.
                    return;
                };
                match result {
                    Ok(elapsed) => {
                        self.stats.warmup(true);
                        state.warmup_failing = None;
                        let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
                        tracing::info!(pod = %pod, elapsed_ms, "engine warm-up succeeded");
                        state.warmth = Warmth::Warm { elapsed_ms };
                    }
                    Err((kind, message)) => {
                        self.stats.warmup(false);
                        self.stats.count_error(source::WARMUP, kind);
                        let delay = self.config.retry.delay(attempt, jitter.draw());
                        if state.warmup_failing != Some(kind) {
                            tracing::warn!(pod = %pod, kind, error = %message, retry_in_ms = delay.as_millis() as u64,
                                "engine warm-up failed; the pod stays not ready, retrying with backoff");
                        }
                        state.warmup_failing = Some(kind);
                        state.warmth = Warmth::Retry {
                            at: Instant::now() + delay,
                            attempt: attempt.saturating_add(1),
                            last_error: truncate(&message, 256),
                        };
                    }
                }
            }
            Done::Write {
                pod,
                uid,
                want,
                result,
            } => {
                let Some(state) = states.get_mut(&pod).filter(|s| s.uid == uid) else {
                    return;
                };
                state.writing = false;
                match result {
                    Ok(()) => {
                        self.stats.gate_written(want.status);
                        if let Some(kind) = state.write_failing.take() {
                            tracing::info!(pod = %pod, previous_error = kind, "pod status writable again");
                        }
                        tracing::info!(pod = %pod, gate = %self.config.gate, status = want.status,
                            reason = want.reason, message = %want.message, "readiness gate set");
                        state.failed_writes = 0;
                        state.written = Some(Written {
                            status: want.status,
                            reason: want.reason,
                            at: Instant::now(),
                        });
                    }
                    Err(("not_found", _)) => {
                        tracing::debug!(pod = %pod, "pod gone before its readiness gate was written");
                        states.remove(&pod);
                    }
                    Err((kind, message)) => {
                        self.stats.count_error(source::READINESS_GATE, kind);
                        let delay = self.config.retry.delay(state.failed_writes, jitter.draw());
                        state.failed_writes = state.failed_writes.saturating_add(1);
                        state.retry_write_at = Some(Instant::now() + delay);
                        if state.write_failing != Some(kind) {
                            let level_error =
                                matches!(kind, "forbidden" | "unauthorized" | "rejected");
                            if level_error {
                                tracing::error!(pod = %pod, kind, error = %message, retry_in_ms = delay.as_millis() as u64,
                                    "cannot write the readiness gate (check RBAC: pods/status patch); retrying with backoff");
                            } else {
                                tracing::warn!(pod = %pod, kind, error = %message, retry_in_ms = delay.as_millis() as u64,
                                    "cannot write the readiness gate; retrying with backoff");
                            }
                        }
                        state.write_failing = Some(kind);
                    }
                }
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Sends the configured warm-up to the engine; the time it took, or the
/// error's kind and message.
async fn warm_up(
    http: &EngineHttpClient,
    target: Option<&EngineTarget>,
    model: &str,
    config: &WarmupConfig,
) -> Result<Duration, (&'static str, String)> {
    let Some(target) = target else {
        // Pushing and simulated engines report their own readiness.
        return Ok(Duration::ZERO);
    };
    match config.mode {
        WarmupMode::None => Ok(Duration::ZERO),
        WarmupMode::Completion => {
            let model = target
                .model
                .as_deref()
                .or(Some(model).filter(|m| !m.is_empty()));
            let mut probe = WarmupProbe::for_framework(target.framework, model, config.timeout);
            if let Some(path) = &config.path {
                probe.path = path.clone();
            }
            if let Some(body) = &config.body {
                probe.body = body.clone();
            }
            http.warm_up(target, &probe)
                .await
                .map(|o| o.elapsed)
                .map_err(|e| (e.kind(), e.to_string()))
        }
        WarmupMode::Health => {
            let Some(url) = &target.health_url else {
                return Ok(Duration::ZERO);
            };
            let started = Instant::now();
            match http.check_health(url, config.timeout).await {
                HealthOutcome::Ok => Ok(started.elapsed()),
                HealthOutcome::Status { status, body } => Err((
                    "http_status",
                    format!("{url}: HTTP status {status}: {}", truncate(&body, 120)),
                )),
                HealthOutcome::Unreachable { kind } => Err((kind, format!("{url}: {kind}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuscale_core::sample::Framework;

    fn engine(state: EngineState) -> EngineSample {
        let mut e = EngineSample::empty(
            PodRef::new("llm", "p"),
            Framework::Vllm,
            "m",
            Timestamp::EPOCH,
        );
        e.state = state;
        e
    }

    #[test]
    fn true_only_when_healthy_and_warmed_up_and_not_drained() {
        let warm = Warmth::Warm { elapsed_ms: 12 };
        let healthy = engine(EngineState::Warm);
        assert!(desired(Some(&healthy), None, &warm).status);
        assert_eq!(
            desired(Some(&healthy), None, &Warmth::Cold).reason,
            "WarmingUp"
        );
        assert_eq!(
            desired(Some(&healthy), Some("scale-in"), &warm),
            Desired::no("Draining", "the scaler drains this pod: scale-in")
        );
        assert_eq!(
            desired(Some(&engine(EngineState::Failed)), None, &warm).reason,
            "EngineFailed"
        );
        assert_eq!(desired(None, None, &warm).reason, "EngineUnknown");
        assert_eq!(
            desired(Some(&engine(EngineState::Loading)), None, &warm).reason,
            "EngineLoading"
        );
        let nodata = desired(Some(&engine(EngineState::NoData)), None, &warm);
        assert!(
            !nodata.status,
            "an engine whose load cannot be seen is not capacity"
        );
        assert_eq!(nodata.reason, "EngineNoData");
        let retry = Warmth::Retry {
            at: Instant::now(),
            attempt: 1,
            last_error: "HTTP status 503".into(),
        };
        let d = desired(Some(&healthy), None, &retry);
        assert!(!d.status && d.reason == "WarmupFailed" && d.message.contains("503"));
        assert_eq!(
            desired(Some(&healthy), None, &Warmth::Probing { attempt: 2 }).reason,
            "WarmupFailed",
            "no flapping between WarmingUp and WarmupFailed while retrying"
        );
    }

    #[test]
    fn the_transition_time_changes_only_when_the_status_flips() {
        let now = Timestamp::from_millis(1_700_000_000_500);
        let was_false = GateCondition {
            status: "False".into(),
            reason: Some("WarmingUp".into()),
            message: None,
            last_transition_time: Some("2023-11-14T22:00:00Z".into()),
        };
        let still_false = Desired::no("WarmupFailed", "x");
        assert_eq!(
            transition_time(Some(&was_false), &still_false, now),
            "2023-11-14T22:00:00Z"
        );
        let flip = Desired {
            status: true,
            reason: "EngineWarm",
            message: String::new(),
        };
        assert_eq!(
            transition_time(Some(&was_false), &flip, now),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            transition_time(None, &still_false, now),
            "2023-11-14T22:13:20Z"
        );
        assert!(in_sync(
            Some(&was_false),
            &Desired::no("WarmingUp", "other message")
        ));
        assert!(!in_sync(Some(&was_false), &still_false), "reason differs");
    }

    #[test]
    fn the_patch_upserts_one_condition_by_type() {
        let p = condition_patch(
            "gpuscale.dev/engine-warm",
            &Desired::no("Draining", "scale-in"),
            "2023-11-14T22:13:20Z",
        );
        let c = &p["status"]["conditions"][0];
        assert_eq!(c["type"], "gpuscale.dev/engine-warm");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "Draining");
        assert_eq!(c["lastTransitionTime"], "2023-11-14T22:13:20Z");
        assert_eq!(p["status"]["conditions"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn gate_names_are_checked() {
        let mut c = ReadinessConfig::default();
        c.validate().expect("default valid");
        c.gate = "Bad Gate/x".into();
        let e = c.validate().expect_err("space").to_string();
        assert!(e.contains("--readiness-gate"), "{e}");
        c.gate = "example.com/warm".into();
        c.warmup.body = Some("{not json".into());
        assert!(
            c.validate()
                .expect_err("json")
                .to_string()
                .contains("--warmup-body")
        );
    }
}
