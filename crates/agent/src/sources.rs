//! The node's sources as the sampling loop drives them: real (NVML, kubelet
//! PodResources, scraped and pushed engines) or simulated (`--fake-config`),
//! behind one type per trait.
//!
//! * [`NodeGpuSource`]: NVML or the fake node's GPUs. After each round it
//!   publishes the GPU inventory when it changed, for the PodResources
//!   mapping (device IDs → UUIDs, MIG devices included).
//! * [`NodePodSource`]: the kubelet's PodResources API (or the fake node's
//!   assignment, or nothing). The kubelet is called by a task of its own
//!   ([`Attribution`]): the sampling loop reads the last good mapping and
//!   never waits on the kubelet, however long it hangs. The task takes each
//!   new inventory and refreshes at once when a pod it has not seen appears
//!   on the node; the mapping's age is exported and staleness flagged.
//! * [`NodeEngineSource`]: engines scraped (static `--engine` flags, and pod
//!   annotations when the Kubernetes API is available), engines pushing to
//!   the node-local `ServingService`, and the fake node's engines. A pod the
//!   scaler drains is reported `Draining` (unless it failed). A pod both
//!   scraped and pushing (its `gpuscale proxy` sidecar) is one engine: the
//!   scraped sample enriched with what was pushed ([`enrich_with_pushed`]).
//!
//! Each keeps the crate-level invariant: a source reports problems inside
//! its samples and counts them in [`NodeStats`]; only the fake node returns
//! whole-source errors (its failure injection).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::sample::{EngineSample, EngineState, GpuInfo, GpuSample, PodGpus};
use gpuscale_core::{PodRef, Timestamp};
use gpuscale_telemetry::fake::{FakeEngineSource, FakeGpuSource, FakePodGpuSource};
use gpuscale_telemetry::{
    EngineSource, EngineTarget, GpuSource, LimitsHandle, NvmlSource, PodGpuSource,
    PodResourcesSource, PushEngineSource, ScrapeEngineSource, SourceError,
};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::discovery::NodePods;
use crate::exporter::{NodeStats, source};

/// Where GPUs come from.
#[derive(Debug)]
pub enum GpuBackend {
    Nvml(Box<NvmlSource>),
    Fake(FakeGpuSource),
}

/// GPUs of the node; see the module docs.
#[derive(Debug)]
pub struct NodeGpuSource {
    backend: GpuBackend,
    inventory: watch::Sender<Arc<Vec<GpuInfo>>>,
    stats: Arc<NodeStats>,
}

impl NodeGpuSource {
    pub fn new(backend: GpuBackend, stats: Arc<NodeStats>) -> Self {
        let initial = match &backend {
            GpuBackend::Nvml(n) => n.inventory(),
            GpuBackend::Fake(_) => Vec::new(),
        };
        let s = Self {
            backend,
            inventory: watch::channel(Arc::new(initial)).0,
            stats,
        };
        s.count();
        s
    }

    /// The GPU inventory: the current value, then every change.
    pub fn inventory(&self) -> watch::Receiver<Arc<Vec<GpuInfo>>> {
        self.inventory.subscribe()
    }

    /// Whether NVML is loaded (false in no-GPU mode and for the fake node).
    pub fn nvml_available(&self) -> bool {
        matches!(&self.backend, GpuBackend::Nvml(n) if n.nvml_available())
    }

    /// Why NVML is not available, when it is not.
    pub fn unavailable_reason(&self) -> Option<String> {
        match &self.backend {
            GpuBackend::Nvml(n) => n.unavailable_reason().map(str::to_string),
            GpuBackend::Fake(_) => None,
        }
    }

    fn count(&self) {
        if let GpuBackend::Nvml(n) = &self.backend {
            self.stats
                .set_errors(source::NVML, &n.stats().errors_by_kind);
            self.stats.set_up(source::NVML, n.nvml_available());
        }
    }

    fn publish(&self, samples: &[GpuSample]) {
        self.inventory.send_if_modified(|inv| {
            let same =
                inv.len() == samples.len() && inv.iter().zip(samples).all(|(a, b)| *a == b.info);
            if !same {
                *inv = Arc::new(samples.iter().map(|s| s.info.clone()).collect());
            }
            !same
        });
    }
}

impl GpuSource for NodeGpuSource {
    async fn sample_gpus(&mut self, now: Timestamp) -> Result<Vec<GpuSample>, SourceError> {
        let result = match &mut self.backend {
            GpuBackend::Nvml(n) => n.sample_now(now),
            GpuBackend::Fake(f) => f.sample_gpus(now).await,
        };
        self.count();
        if let Ok(samples) = &result {
            self.publish(samples);
        }
        result
    }
}

/// Where the GPU-to-pod assignment comes from.
#[derive(Debug)]
pub enum PodBackend {
    Kubelet(Box<PodResourcesSource>),
    Fake(FakePodGpuSource),
    /// `--pod-resources-socket off`: no attribution.
    Off,
}

/// The GPU-to-pod mapping as the attribution task last got it from the
/// kubelet.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    /// The last good mapping (empty until the kubelet first answers).
    pub pods: Vec<PodGpus>,
    /// Whether the last call answered.
    pub available: bool,
    /// When the kubelet last answered (`None`: never).
    pub answered_at: Option<Instant>,
    /// Calls made so far (answered or not).
    pub attempts: u64,
    /// Why the last call failed, while it does.
    pub error: Option<String>,
}

impl Attribution {
    /// Seconds since the kubelet last answered (`None`: never).
    pub fn age(&self) -> Option<Duration> {
        self.answered_at.map(|t| t.elapsed())
    }
}

/// The kubelet's side of [`NodePodSource`]: the task's output and a way to
/// wake it.
#[derive(Debug)]
struct KubeletAttribution {
    latest: watch::Receiver<Arc<Attribution>>,
    wake: Arc<Notify>,
}

/// Which pods hold which GPUs; see the module docs.
#[derive(Debug)]
pub struct NodePodSource {
    backend: PodSide,
    node_pods: Option<watch::Receiver<Arc<NodePods>>>,
    /// The pods of the last complete listing, and whether there was one.
    seen: BTreeSet<PodRef>,
    synced: bool,
}

#[derive(Debug)]
enum PodSide {
    Kubelet(KubeletAttribution),
    Fake(FakePodGpuSource),
    Off,
}

/// The attribution task: calls the kubelet at its own pace, never inside
/// the sampling loop, and publishes each result. Ends when the
/// [`NodePodSource`] is dropped.
async fn attribute(
    mut kubelet: PodResourcesSource,
    mut inventory: watch::Receiver<Arc<Vec<GpuInfo>>>,
    tx: watch::Sender<Arc<Attribution>>,
    wake: Arc<Notify>,
    stats: Arc<NodeStats>,
) {
    let clock = crate::Clock::start();
    // `refresh` calls the kubelet only when due (its minimum interval) or
    // when woken for a new pod; between calls this loop costs nothing.
    let tick = Duration::from_millis(250);
    let mut attempts = 0u64;
    let mut answered_at: Option<Instant> = None;
    loop {
        if inventory.has_changed().unwrap_or(false) {
            let inv = inventory.borrow_and_update().clone();
            kubelet.set_inventory(&inv);
        }
        let calls_before = kubelet.stats().list_calls_total + kubelet.stats().get_calls_total;
        let errors_before: u64 = kubelet.stats().errors_by_kind.values().sum();
        let pods = kubelet.refresh(clock.now()).await.to_vec();
        let calls = kubelet.stats().list_calls_total + kubelet.stats().get_calls_total;
        let errors: u64 = kubelet.stats().errors_by_kind.values().sum();
        if calls > calls_before || errors > errors_before {
            attempts += 1;
            if kubelet.available() {
                answered_at = Some(Instant::now());
            }
        }
        stats.set_errors(source::POD_RESOURCES, &kubelet.stats().errors_by_kind);
        stats.set_error_total(
            source::POD_RESOURCES,
            "unmapped_device",
            kubelet.stats().unmapped_device_ids_total,
        );
        stats.set_up(source::POD_RESOURCES, kubelet.available());
        // Stale: no answer for three refresh intervals and a call's deadline.
        let config = kubelet.config();
        stats.set_attribution(
            answered_at,
            config.min_refresh_interval * 3 + config.call_timeout,
        );
        let next = Arc::new(Attribution {
            pods,
            available: kubelet.available(),
            answered_at,
            attempts,
            error: kubelet.last_error().map(str::to_string),
        });
        tx.send_replace(next);
        tokio::select! {
            _ = tx.closed() => return,
            _ = wake.notified() => kubelet.invalidate(),
            changed = inventory.changed() => if changed.is_err() {
                // The GPU source is gone: the node is shutting down.
                return;
            },
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

impl NodePodSource {
    /// With the kubelet backend, spawns the attribution task on the current
    /// runtime (it ends when this source is dropped).
    pub fn new(
        backend: PodBackend,
        mut inventory: watch::Receiver<Arc<Vec<GpuInfo>>>,
        node_pods: Option<watch::Receiver<Arc<NodePods>>>,
        stats: Arc<NodeStats>,
    ) -> Self {
        let backend = match backend {
            PodBackend::Kubelet(mut k) => {
                k.set_inventory(&inventory.borrow_and_update());
                let (tx, latest) = watch::channel(Arc::new(Attribution::default()));
                let wake = Arc::new(Notify::new());
                tokio::spawn(attribute(*k, inventory, tx, wake.clone(), stats));
                PodSide::Kubelet(KubeletAttribution { latest, wake })
            }
            PodBackend::Fake(f) => PodSide::Fake(f),
            PodBackend::Off => PodSide::Off,
        };
        Self {
            backend,
            node_pods,
            seen: BTreeSet::new(),
            synced: false,
        }
    }

    /// Whether the kubelet answered the last call (false when off or fake).
    pub fn available(&self) -> bool {
        matches!(&self.backend, PodSide::Kubelet(k) if k.latest.borrow().available)
    }

    /// The kubelet attribution as it stands (`None` when off or fake).
    pub fn attribution(&self) -> Option<Arc<Attribution>> {
        match &self.backend {
            PodSide::Kubelet(k) => Some(k.latest.borrow().clone()),
            _ => None,
        }
    }

    /// Waits, at most `limit`, until the kubelet was called at least once
    /// (for `--once`; the sampling loop never waits).
    pub(crate) async fn first_attempt(&mut self, limit: Duration) {
        if let PodSide::Kubelet(k) = &mut self.backend {
            let _ = tokio::time::timeout(limit, k.latest.wait_for(|a| a.attempts > 0)).await;
        }
    }

    /// True when a pod appeared on the node that was not there before.
    fn new_pod_appeared(&mut self) -> bool {
        let Some(rx) = self.node_pods.as_mut() else {
            return false;
        };
        if !rx.has_changed().unwrap_or(false) {
            return false;
        }
        let pods = rx.borrow_and_update().clone();
        if !pods.synced {
            return false;
        }
        let now: BTreeSet<PodRef> = pods.pods.keys().cloned().collect();
        let appeared = now.iter().any(|p| !self.seen.contains(p));
        self.seen = now;
        // The first listing is what the first refresh reads anyway.
        let first = !self.synced;
        self.synced = true;
        appeared && !first
    }
}

impl PodGpuSource for NodePodSource {
    async fn list_pod_gpus(&mut self, now: Timestamp) -> Result<Vec<PodGpus>, SourceError> {
        let appeared = self.new_pod_appeared();
        match &mut self.backend {
            PodSide::Kubelet(k) => {
                if appeared {
                    k.wake.notify_one();
                }
                Ok(k.latest.borrow().pods.clone())
            }
            PodSide::Fake(f) => f.list_pod_gpus(now).await,
            PodSide::Off => Ok(Vec::new()),
        }
    }
}

/// Engines of the node; see the module docs.
#[derive(Debug)]
pub struct NodeEngineSource {
    scrape: ScrapeEngineSource,
    push: PushEngineSource,
    fake: Option<FakeEngineSource>,
    static_targets: Vec<EngineTarget>,
    node_pods: Option<watch::Receiver<Arc<NodePods>>>,
    targets: watch::Sender<Arc<Vec<EngineTarget>>>,
    limits: LimitsHandle,
    /// Pods whose annotations are invalid, with the error last logged.
    bad_annotations: BTreeMap<PodRef, String>,
    stats: Arc<NodeStats>,
}

impl NodeEngineSource {
    /// `static_targets` are scraped always; `node_pods` adds the annotated
    /// pods; `limits` tells which pods are drained.
    pub fn new(
        mut scrape: ScrapeEngineSource,
        push: PushEngineSource,
        fake: Option<FakeEngineSource>,
        static_targets: Vec<EngineTarget>,
        node_pods: Option<watch::Receiver<Arc<NodePods>>>,
        limits: LimitsHandle,
        stats: Arc<NodeStats>,
    ) -> Self {
        scrape.set_targets(static_targets.clone());
        let targets = watch::channel(Arc::new(static_targets.clone())).0;
        let mut s = Self {
            scrape,
            push,
            fake,
            static_targets,
            node_pods,
            targets,
            limits,
            bad_annotations: BTreeMap::new(),
            stats,
        };
        s.refresh_targets(true);
        s
    }

    /// The scrape targets: the current list, then every change (the
    /// readiness-gate writer sends warm-ups to them).
    pub fn targets(&self) -> watch::Receiver<Arc<Vec<EngineTarget>>> {
        self.targets.subscribe()
    }

    /// Why this pod's engine is not read well: its scrape's error (or why it
    /// reads no data), and problems inside a scrape that was read.
    pub fn problems(&self, pod: &PodRef) -> (Option<String>, Vec<String>) {
        let warnings = self
            .scrape
            .warnings(pod)
            .into_iter()
            .filter(|w| !w.starts_with("no data"))
            .collect();
        (self.scrape.problem(pod), warnings)
    }

    /// The HTTP client engines are scraped with (shared with warm-ups).
    pub(crate) fn http_client(&self) -> gpuscale_telemetry::engine::EngineHttpClient {
        self.scrape.client().clone()
    }

    /// Rebuilds the target list when the node's pods changed.
    fn refresh_targets(&mut self, force: bool) {
        let Some(rx) = self.node_pods.as_mut() else {
            return;
        };
        if !force && !rx.has_changed().unwrap_or(false) {
            return;
        }
        let pods = rx.borrow_and_update().clone();
        let (discovered, errors) = pods.engine_targets();
        let mut all = self.static_targets.clone();
        for t in discovered {
            if !all.iter().any(|s| s.pod == t.pod) {
                all.push(t);
            }
        }
        let mut still_bad = BTreeMap::new();
        for (pod, e) in errors {
            let message = e.to_string();
            if self.bad_annotations.get(&pod) != Some(&message) {
                tracing::warn!(pod = %pod, error = %message,
                    "engine annotations are invalid: this pod is not scraped until they are fixed");
                self.stats.count_error(source::DISCOVERY, "bad_annotation");
            }
            still_bad.insert(pod, message);
        }
        for pod in self.bad_annotations.keys() {
            if !still_bad.contains_key(pod) && pods.pods.contains_key(pod) {
                tracing::info!(pod = %pod, "engine annotations are valid again");
            }
        }
        self.bad_annotations = still_bad;
        let changed = self.targets.send_if_modified(|current| {
            if current.as_slice() == all.as_slice() {
                false
            } else {
                *current = Arc::new(all.clone());
                true
            }
        });
        if changed {
            self.scrape.set_targets(all);
        }
    }
}

impl EngineSource for NodeEngineSource {
    async fn sample_engines(
        &mut self,
        now: Timestamp,
        pods: &[PodGpus],
    ) -> Result<Vec<EngineSample>, SourceError> {
        self.refresh_targets(false);
        let mut engines = self.scrape.scrape_all(now, pods).await;
        let stats = self.scrape.stats();
        self.stats
            .set_errors(source::ENGINE_SCRAPE, &stats.errors_by_kind);
        self.stats
            .set_engine_scrapes(stats.scrapes_total, self.scrape.targets().count() as u64);
        for pushed in self.push.collect(now, pods) {
            match engines.iter_mut().find(|s| s.pod == pushed.pod) {
                Some(scraped) => enrich_with_pushed(scraped, pushed),
                None => engines.push(pushed),
            }
        }
        let push = self.push.stats();
        self.stats
            .set_error_total(source::ENGINE_PUSH, "invalid_value", push.rejected_total);
        self.stats
            .set_error_total(source::ENGINE_PUSH, "channel_full", push.dropped_full_total);
        self.stats.set_error_total(
            source::ENGINE_PUSH,
            "watcher_dropped",
            push.watchers_dropped_total,
        );
        if let Some(fake) = self.fake.as_mut() {
            for e in fake.sample_engines(now, pods).await? {
                if !engines.iter().any(|s| s.pod == e.pod) {
                    engines.push(e);
                }
            }
        }
        for e in &mut engines {
            if e.state != EngineState::Failed && self.limits.limits(&e.pod).draining {
                e.state = EngineState::Draining;
            }
        }
        Ok(engines)
    }
}

/// Enriches the scraped sample of a pod with what was pushed for the same
/// pod (by its request proxy, `gpuscale proxy`), so the pod stays one
/// engine:
///
/// * TTFT and TPOT histograms: the pushed ones when present. The proxy
///   measures each request as the SLO defines it (TTFT from the arrival at
///   the pod, its queue included); the engine's own are a second source.
///   Token-level ITL stays the engine's (the proxy does not push one).
/// * Waiting requests: the engine's plus the pushed ones (requests queued
///   at the proxy have not reached the engine); running: the engine's,
///   else the pushed in-flight count.
/// * Arrivals: the pushed counter (offered load at the pod's ingress,
///   refused requests included), else the engine's. Finished requests and
///   tokens: the engine's, else the pushed.
/// * Batch limit: the tighter of the two (the one the request path applies).
/// * Everything else (state, KV cache, model) stays the engine's, filled in
///   from the push where the scrape has nothing. A pusher gone silent
///   (state `Failed`, every metric missing) changes nothing.
pub fn enrich_with_pushed(scraped: &mut EngineSample, pushed: EngineSample) {
    if pushed.state == EngineState::Failed {
        return;
    }
    let e = scraped;
    let p = pushed;
    if p.ttft_seconds.is_some() {
        e.ttft_seconds = p.ttft_seconds;
    }
    if p.tpot_seconds.is_some() {
        e.tpot_seconds = p.tpot_seconds;
    }
    e.itl_seconds = e.itl_seconds.take().or(p.itl_seconds);
    e.requests_waiting = match (e.requests_waiting, p.requests_waiting) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
    e.requests_running = e.requests_running.or(p.requests_running);
    e.requests_arrived_total = p.requests_arrived_total.or(e.requests_arrived_total);
    e.requests_finished_total = e.requests_finished_total.or(p.requests_finished_total);
    e.prompt_tokens_total = e.prompt_tokens_total.or(p.prompt_tokens_total);
    e.generation_tokens_total = e.generation_tokens_total.or(p.generation_tokens_total);
    e.batch_limit = match (e.batch_limit, p.batch_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    e.kv_cache_usage_ratio = e.kv_cache_usage_ratio.or(p.kv_cache_usage_ratio);
    e.kv_capacity_tokens = e.kv_capacity_tokens.or(p.kv_capacity_tokens);
    e.queued_prompt_tokens = e.queued_prompt_tokens.or(p.queued_prompt_tokens);
    e.preemptions_total = e.preemptions_total.or(p.preemptions_total);
    e.mean_context_tokens = e.mean_context_tokens.or(p.mean_context_tokens);
    if e.model.is_empty() {
        e.model = p.model;
    }
}

#[cfg(test)]
mod tests {
    use gpuscale_core::Histogram;
    use gpuscale_core::sample::Framework;

    use super::*;

    fn scraped() -> EngineSample {
        let mut e = EngineSample::empty(
            PodRef::new("llm", "llama-0"),
            Framework::LlamaCpp,
            "llama",
            Timestamp::from_millis(1000),
        );
        e.state = EngineState::Warm;
        e.requests_waiting = Some(1.0);
        e.requests_running = Some(2.0);
        e.requests_arrived_total = None;
        e.generation_tokens_total = Some(500.0);
        e.kv_cache_usage_ratio = Some(0.4);
        e.batch_limit = Some(16);
        e
    }

    fn pushed() -> EngineSample {
        let mut p = EngineSample::empty(
            PodRef::new("llm", "llama-0"),
            Framework::Push,
            "",
            Timestamp::from_millis(1000),
        );
        let mut ttft = Histogram::ttft();
        ttft.observe(0.3);
        p.ttft_seconds = Some(ttft);
        let mut tpot = Histogram::tpot();
        tpot.observe(0.02);
        p.tpot_seconds = Some(tpot);
        p.requests_waiting = Some(6.0);
        p.requests_running = Some(2.0);
        p.requests_arrived_total = Some(40.0);
        p.generation_tokens_total = Some(480.0);
        p.batch_limit = Some(2);
        p
    }

    #[test]
    fn a_proxied_pod_is_one_engine_with_the_proxys_latencies_and_queue() {
        let mut e = scraped();
        let mut engine_ttft = Histogram::ttft();
        engine_ttft.observe(0.1);
        e.ttft_seconds = Some(engine_ttft);
        enrich_with_pushed(&mut e, pushed());
        assert_eq!(e.framework, Framework::LlamaCpp, "still the scraped engine");
        assert_eq!(e.state, EngineState::Warm);
        assert_eq!(e.model, "llama");
        let ttft = e.ttft_seconds.as_ref().unwrap();
        assert_eq!((ttft.count(), ttft.sum()), (1, 0.3), "the proxy's TTFT");
        assert_eq!(e.tpot_seconds.as_ref().map(Histogram::count), Some(1));
        assert_eq!(
            e.requests_waiting,
            Some(7.0),
            "the proxy's queue counts as waiting"
        );
        assert_eq!(e.requests_running, Some(2.0));
        assert_eq!(e.requests_arrived_total, Some(40.0));
        assert_eq!(
            e.generation_tokens_total,
            Some(500.0),
            "the engine's own count"
        );
        assert_eq!(e.kv_cache_usage_ratio, Some(0.4));
        assert_eq!(e.batch_limit, Some(2), "the limit the request path applies");
    }

    #[test]
    fn a_silent_pusher_changes_nothing() {
        let mut e = scraped();
        let before = e.clone();
        let mut p = pushed();
        p.state = EngineState::Failed;
        enrich_with_pushed(&mut e, p);
        assert_eq!(e, before);
    }
}
