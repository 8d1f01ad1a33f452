//! Per-workload metrics derived from the published view, and the metrics of
//! the public APIs.
//!
//! A task follows the [`StateView`] (like any reader: an `Arc` from a
//! `watch`, no lock, it can only skip versions) and, whenever a workload has
//! a new decision, updates that workload's series:
//!
//! * `gpuscale_scaler_ttft_seconds` / `gpuscale_scaler_tpot_seconds` (per
//!   request) / `gpuscale_scaler_itl_seconds` (per token):
//!   cumulative histograms of the workload's engines, built from each
//!   engine's counter deltas (an engine seen for the first time is a
//!   baseline; a counter reset counts the new process from zero; engines
//!   with another bucket layout than the workload's are skipped), so
//!   `histogram_quantile` over `rate(..._bucket[5m])` gives the workload's
//!   percentiles;
//! * SLO attainment: observations that met the threshold (interpolated in
//!   its bucket) as counters, for burn-rate alerts, and as ratios over the
//!   last 5 minutes and hour ([`crate::slo::AttainmentWindows`]), TPOT from
//!   the per-request histograms (token-level ITL only where no engine
//!   reports them); the objective's threshold and quantile; the status of
//!   the latest decision (the one the API streams and the custom resource
//!   shows);
//! * the forecast arrival rate, the performance model's confidence, the
//!   replica bounds and the current count the decision was made from;
//! * GPUs held by the workload's pods and GPU-seconds (per workload and for
//!   every GPU the scaler knows), so dashboards show GPU-hours.
//!
//! It also samples the ingest queue's depth at each view.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use gpuscale_core::slo::SloObjectives;
use gpuscale_core::{Histogram, PodRef, SloStatus, Timestamp, WorkloadRef};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::{mpsc, watch};

use crate::config::{DeciderConfig, WorkloadDef};
use crate::decide::WorkloadRegistry;
use crate::metrics::{ScalerMetrics, WorkloadLabels};
use crate::slo::{ATTAINMENT_WINDOWS, AttainmentWindows, SloKind, good_and_total, objectives_of};
use crate::state::Command;
use crate::view::{EngineView, StateView, WorkloadView};

type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SloLabels {
    namespace: String,
    workload: String,
    slo: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AttainmentLabels {
    namespace: String,
    workload: String,
    slo: &'static str,
    window: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    namespace: String,
    workload: String,
    status: &'static str,
}

/// A cumulative histogram whose buckets come from elsewhere (the engines'
/// own layout), encoded as a Prometheus histogram.
#[derive(Debug, Clone, Default)]
pub(crate) struct LatencyHistogram(Arc<Mutex<Option<Histogram>>>);

impl LatencyHistogram {
    /// Adds `delta`'s observations; `false` if its layout differs.
    fn add(&self, delta: &Histogram) -> bool {
        let mut h = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match h.as_mut() {
            None => {
                *h = Some(delta.clone());
                true
            }
            Some(h) => h.merge(delta).is_ok(),
        }
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(h) = h.as_ref() else {
            return Ok(());
        };
        let mut previous = 0;
        let buckets: Vec<(f64, u64)> = h
            .bounds()
            .iter()
            .zip(h.cumulative_counts())
            .map(|(b, c)| {
                let in_bucket = c.saturating_sub(previous);
                previous = *c;
                (*b, in_bucket)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum(), h.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The metrics this module and the public APIs keep; registered in the
/// scaler's registry by [`ScalerMetrics::new`].
#[derive(Debug)]
pub(crate) struct ViewMetrics {
    ingest_queue_depth: Gauge,
    ingest_queue_capacity: Gauge,
    api_streams: Family<ApiLabels, Gauge>,
    api_streams_dropped: Family<ApiLabels, Counter>,
    api_streams_refused: Family<ApiLabels, Counter>,
    current_replicas: Family<WorkloadLabels, Gauge>,
    min_replicas: Family<WorkloadLabels, Gauge>,
    max_replicas: Family<WorkloadLabels, Gauge>,
    forecast_arrival: Family<WorkloadLabels, GaugeF>,
    infeasible_share: Family<WorkloadLabels, GaugeF>,
    model_confidence: Family<WorkloadLabels, GaugeF>,
    ttft: Family<WorkloadLabels, LatencyHistogram>,
    tpot: Family<WorkloadLabels, LatencyHistogram>,
    itl: Family<WorkloadLabels, LatencyHistogram>,
    slo_objective: Family<SloLabels, GaugeF>,
    slo_target: Family<SloLabels, GaugeF>,
    slo_observations: Family<SloLabels, CounterF>,
    slo_good: Family<SloLabels, CounterF>,
    slo_attainment: Family<AttainmentLabels, GaugeF>,
    slo_status: Family<StatusLabels, Gauge>,
    workload_gpus: Family<WorkloadLabels, Gauge>,
    workload_gpu_seconds: Family<WorkloadLabels, CounterF>,
    gpu_seconds: CounterF,
    report_age: Family<NodeLabels, GaugeF>,
    clock_offset: Family<NodeLabels, GaugeF>,
}

impl ViewMetrics {
    /// Registers every metric in `r` (prefix `gpuscale_scaler`).
    pub(crate) fn register(r: &mut Registry) -> Self {
        r.register(
            "build",
            "Build of this scaler: version and the protocol package it speaks",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("proto", "gpuscale.v1"),
            ]),
        );
        let m = Self {
            ingest_queue_depth: Gauge::default(),
            ingest_queue_capacity: Gauge::default(),
            api_streams: Family::default(),
            api_streams_dropped: Family::default(),
            api_streams_refused: Family::default(),
            current_replicas: Family::default(),
            min_replicas: Family::default(),
            max_replicas: Family::default(),
            forecast_arrival: Family::default(),
            infeasible_share: Family::default(),
            model_confidence: Family::default(),
            ttft: Family::default(),
            tpot: Family::default(),
            itl: Family::default(),
            slo_objective: Family::default(),
            slo_target: Family::default(),
            slo_observations: Family::default(),
            slo_good: Family::default(),
            slo_attainment: Family::default(),
            slo_status: Family::default(),
            workload_gpus: Family::default(),
            workload_gpu_seconds: Family::default(),
            gpu_seconds: CounterF::default(),
            report_age: Family::default(),
            clock_offset: Family::default(),
        };
        r.register(
            "ingest_queue_depth_commands",
            "Commands waiting in the queue to the state task",
            m.ingest_queue_depth.clone(),
        );
        r.register(
            "ingest_queue_capacity_commands",
            "Capacity of the queue to the state task",
            m.ingest_queue_capacity.clone(),
        );
        r.register(
            "api_streams",
            "Open public API streams, by API",
            m.api_streams.clone(),
        );
        r.register(
            "api_streams_dropped",
            "Public API streams ended because the subscriber fell behind, by API",
            m.api_streams_dropped.clone(),
        );
        r.register(
            "api_streams_refused",
            "Public API streams refused at the concurrent-stream limit, by API",
            m.api_streams_refused.clone(),
        );
        r.register(
            "current_replicas",
            "The target's replica count the latest decision was made from",
            m.current_replicas.clone(),
        );
        r.register(
            "min_replicas",
            "The workload's lower replica bound",
            m.min_replicas.clone(),
        );
        r.register(
            "max_replicas",
            "The workload's upper replica bound",
            m.max_replicas.clone(),
        );
        r.register(
            "forecast_arrival_requests_per_second",
            "Arrival rate the forecaster expects one cold start ahead, requests per second (predictive policies)",
            m.forecast_arrival.clone(),
        );
        r.register_with_unit(
            "infeasible_requests",
            "Share of the workload's requests whose own prefill exceeds their TTFT objective: no replica count serves them, and the fleet is not sized for them (SLO policy)",
            Unit::Other("ratio".into()),
            m.infeasible_share.clone(),
        );
        r.register_with_unit(
            "model_confidence",
            "Confidence of the performance model behind the sizing, 0..=1",
            Unit::Other("ratio".into()),
            m.model_confidence.clone(),
        );
        r.register_with_unit(
            "ttft",
            "Time to first token of the workload's requests, all engines (from the engines' histograms)",
            Unit::Seconds,
            m.ttft.clone(),
        );
        r.register_with_unit(
            "tpot",
            "Time per output token of each of the workload's requests, all engines (from the engines' histograms)",
            Unit::Seconds,
            m.tpot.clone(),
        );
        r.register_with_unit(
            "itl",
            "Inter-token latency of the workload's tokens, all engines (from the engines' histograms)",
            Unit::Seconds,
            m.itl.clone(),
        );
        r.register_with_unit(
            "slo_objective",
            "Latency threshold of the workload's objective, by objective (ttft, tpot)",
            Unit::Seconds,
            m.slo_objective.clone(),
        );
        r.register_with_unit(
            "slo_target",
            "Fraction of observations that must meet the threshold (the objective's quantile), by objective",
            Unit::Other("ratio".into()),
            m.slo_target.clone(),
        );
        r.register(
            "slo_observations",
            "Latency observations counted against the objective, by objective",
            m.slo_observations.clone(),
        );
        r.register(
            "slo_good_observations",
            "Latency observations that met the objective's threshold, by objective",
            m.slo_good.clone(),
        );
        r.register_with_unit(
            "slo_attainment",
            "Fraction of observations that met the threshold, by objective and window (5m, 1h)",
            Unit::Other("ratio".into()),
            m.slo_attainment.clone(),
        );
        r.register(
            "slo_status",
            "1 for the workload's SLO status as its latest decision judged it (met, at_risk, breached, unknown), 0 for the others",
            m.slo_status.clone(),
        );
        r.register(
            "workload_gpus",
            "GPUs held by the workload's pods",
            m.workload_gpus.clone(),
        );
        r.register_with_unit(
            "workload_gpu",
            "GPU time held by the workload's pods",
            Unit::Seconds,
            m.workload_gpu_seconds.clone(),
        );
        r.register_with_unit(
            "gpu",
            "GPU time of every GPU the scaler knows",
            Unit::Seconds,
            m.gpu_seconds.clone(),
        );
        r.register_with_unit(
            "agent_report_age",
            "Time since the node's agent last reported, by node (until the node expires)",
            Unit::Seconds,
            m.report_age.clone(),
        );
        r.register_with_unit(
            "agent_clock_offset",
            "The agent's clock minus the scaler's as measured in its boot epoch, by node (its timestamps count for intervals only)",
            Unit::Seconds,
            m.clock_offset.clone(),
        );
        m
    }

    pub(crate) fn api_stream_opened(&self, api: &'static str) {
        self.api_streams.get_or_create(&ApiLabels { api }).inc();
    }
    pub(crate) fn api_stream_closed(&self, api: &'static str) {
        self.api_streams.get_or_create(&ApiLabels { api }).dec();
    }
    pub(crate) fn api_stream_dropped(&self, api: &'static str) {
        self.api_streams_dropped
            .get_or_create(&ApiLabels { api })
            .inc();
    }
    pub(crate) fn api_stream_refused(&self, api: &'static str) {
        self.api_streams_refused
            .get_or_create(&ApiLabels { api })
            .inc();
    }

    fn forget(&self, w: &WorkloadRef) {
        let l = WorkloadLabels::from(w);
        for f in [
            &self.current_replicas,
            &self.min_replicas,
            &self.max_replicas,
            &self.workload_gpus,
        ] {
            f.remove(&l);
        }
        self.forecast_arrival.remove(&l);
        self.infeasible_share.remove(&l);
        self.model_confidence.remove(&l);
        self.ttft.remove(&l);
        self.tpot.remove(&l);
        self.itl.remove(&l);
        self.workload_gpu_seconds.remove(&l);
        for kind in SloKind::ALL {
            let s = slo_labels(w, kind);
            self.slo_objective.remove(&s);
            self.slo_target.remove(&s);
            self.slo_observations.remove(&s);
            self.slo_good.remove(&s);
            for (window, _) in ATTAINMENT_WINDOWS {
                self.slo_attainment
                    .remove(&attainment_labels(w, kind, window));
            }
        }
        for status in SloStatus::ALL {
            self.slo_status.remove(&StatusLabels {
                namespace: w.namespace.clone(),
                workload: w.name.clone(),
                status: status.as_str(),
            });
        }
    }
}

fn slo_labels(w: &WorkloadRef, kind: SloKind) -> SloLabels {
    SloLabels {
        namespace: w.namespace.clone(),
        workload: w.name.clone(),
        slo: kind.as_str(),
    }
}

fn attainment_labels(w: &WorkloadRef, kind: SloKind, window: &'static str) -> AttainmentLabels {
    AttainmentLabels {
        namespace: w.namespace.clone(),
        workload: w.name.clone(),
        slo: kind.as_str(),
        window,
    }
}

fn set_opt(family: &Family<WorkloadLabels, GaugeF>, labels: &WorkloadLabels, v: Option<f64>) {
    match v.filter(|v| v.is_finite()) {
        Some(v) => {
            family.get_or_create(labels).set(v);
        }
        None => {
            family.remove(labels);
        }
    }
}

/// The replica bounds of a workload's decider.
fn bounds(def: &WorkloadDef) -> (u32, u32) {
    match &def.decider {
        DeciderConfig::Policy { config, .. } => (config.min_replicas, config.max_replicas),
        DeciderConfig::Proportional(p) => (p.min_replicas, p.max_replicas),
    }
}

/// The last cumulative latency histograms seen of one engine.
#[derive(Debug, Default)]
struct EngineLast {
    ttft: Option<Histogram>,
    tpot: Option<Histogram>,
    itl: Option<Histogram>,
}

/// The latency histograms an engine reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Series {
    Ttft,
    Tpot,
    Itl,
}

impl Series {
    const ALL: [Series; 3] = [Series::Ttft, Series::Tpot, Series::Itl];
}

/// The new observations of `current` since `last` (see the module docs).
fn new_observations(
    current: Option<&Histogram>,
    last: Option<&Histogram>,
    first_seen: bool,
) -> Option<Histogram> {
    let current = current?;
    match last {
        Some(last) => Some(
            current
                .delta_since(last)
                .unwrap_or_else(|_| current.clone()),
        ),
        None if first_seen => None,
        None => Some(current.clone()),
    }
}

#[derive(Debug, Default)]
struct WorkloadExport {
    decided_at: Option<Timestamp>,
    engines: HashMap<PodRef, EngineLast>,
    attainment: BTreeMap<SloKind, AttainmentWindows>,
    members: BTreeSet<PodRef>,
}

/// Follows the view and keeps the per-workload series (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ViewExporter {
    workloads: BTreeMap<WorkloadRef, WorkloadExport>,
    nodes: BTreeSet<String>,
    last_at: Option<Timestamp>,
}

/// A step between two views longer than this is a gap, not GPU time.
const MAX_GPU_TIME_STEP_S: f64 = 60.0;

impl ViewExporter {
    /// Updates every series from `view`.
    pub(crate) fn update(
        &mut self,
        view: &StateView,
        registry: &WorkloadRegistry,
        m: &ViewMetrics,
    ) {
        let now = view.published_at;
        let dt = self
            .last_at
            .map(|t| now.secs_since(t))
            .filter(|dt| *dt > 0.0 && *dt <= MAX_GPU_TIME_STEP_S);
        if self.last_at.is_none_or(|t| now > t) {
            self.last_at = Some(now);
        }
        let nodes: BTreeSet<String> = view.nodes.keys().map(|n| n.to_string()).collect();
        for gone in self.nodes.difference(&nodes) {
            m.report_age.remove(&NodeLabels { node: gone.clone() });
            m.clock_offset.remove(&NodeLabels { node: gone.clone() });
        }
        for (name, n) in &view.nodes {
            m.report_age
                .get_or_create(&NodeLabels {
                    node: name.to_string(),
                })
                .set(now.secs_since(n.received_at).max(0.0));
            m.clock_offset
                .get_or_create(&NodeLabels {
                    node: name.to_string(),
                })
                .set(n.clock_offset_ms as f64 / 1000.0);
        }
        self.nodes = nodes;
        let all_gpus = view.gpus().count();
        if let Some(dt) = dt {
            m.gpu_seconds.inc_by(all_gpus as f64 * dt);
        }
        let gone: Vec<WorkloadRef> = self
            .workloads
            .keys()
            .filter(|w| !view.workloads.contains_key(*w))
            .cloned()
            .collect();
        for w in gone {
            self.workloads.remove(&w);
            m.forget(&w);
        }
        let gpus_of_pod: HashMap<&PodRef, usize> = view
            .nodes
            .values()
            .flat_map(|n| n.pods.iter())
            .map(|p| (&p.pod, p.gpu_uuids().len()))
            .collect();
        for (workload, wv) in &view.workloads {
            let def = registry.get(workload);
            let state = self.workloads.entry(workload.clone()).or_default();
            let labels = WorkloadLabels::from(workload);
            if let Some(def) = def {
                let (lo, hi) = bounds(def);
                m.min_replicas.get_or_create(&labels).set(i64::from(lo));
                m.max_replicas.get_or_create(&labels).set(i64::from(hi));
            }
            let objectives = def.and_then(|d| objectives_of(d));
            let decided_at = wv.decision.as_ref().map(|d| d.at);
            if decided_at.is_some() && decided_at != state.decided_at {
                state.decided_at = decided_at;
                state.members = members(view, wv, def);
                Self::decided(state, view, wv, objectives.as_ref(), now, m);
            }
            let gpus: usize = state
                .members
                .iter()
                .filter_map(|p| gpus_of_pod.get(p))
                .sum();
            m.workload_gpus.get_or_create(&labels).set(gpus as i64);
            if let Some(dt) = dt {
                m.workload_gpu_seconds
                    .get_or_create(&labels)
                    .inc_by(gpus as f64 * dt);
            }
        }
    }

    /// A new decision of one workload: its latencies, SLO and decision series.
    fn decided(
        state: &mut WorkloadExport,
        view: &StateView,
        wv: &WorkloadView,
        objectives: Option<&SloObjectives>,
        now: Timestamp,
        m: &ViewMetrics,
    ) {
        let workload = &wv.workload;
        let labels = WorkloadLabels::from(workload);
        if let Some(d) = &wv.decision {
            m.current_replicas
                .get_or_create(&labels)
                .set(i64::from(d.current_replicas));
            let is_policy = objectives.is_some();
            set_opt(
                &m.model_confidence,
                &labels,
                is_policy.then_some(d.model_confidence),
            );
            set_opt(&m.forecast_arrival, &labels, d.inputs.forecast_rps());
            set_opt(
                &m.infeasible_share,
                &labels,
                d.inputs.slo().map(|i| i.infeasible_share),
            );
        }
        let status = wv
            .decision
            .as_ref()
            .map_or(SloStatus::Unknown, |d| d.slo.status);
        for s in SloStatus::ALL {
            m.slo_status
                .get_or_create(&StatusLabels {
                    namespace: workload.namespace.clone(),
                    workload: workload.name.clone(),
                    status: s.as_str(),
                })
                .set(i64::from(s == status));
        }
        // Latency deltas of the member engines since the last decision.
        let engines: Vec<&EngineView> = view
            .engines()
            .map(|e| e.as_ref())
            .filter(|e| state.members.contains(&e.sample.pod))
            .collect();
        let mut new: BTreeMap<Series, Histogram> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for e in engines {
            let pod = &e.sample.pod;
            seen.insert(pod.clone());
            let first_seen = !state.engines.contains_key(pod);
            let last = state.engines.entry(pod.clone()).or_default();
            for series in Series::ALL {
                let (current, previous) = match series {
                    Series::Ttft => (e.sample.ttft_seconds.as_ref(), &mut last.ttft),
                    Series::Tpot => (e.sample.tpot_seconds.as_ref(), &mut last.tpot),
                    Series::Itl => (e.sample.itl_seconds.as_ref(), &mut last.itl),
                };
                if let Some(delta) = new_observations(current, previous.as_ref(), first_seen) {
                    match new.get_mut(&series) {
                        Some(acc) => {
                            let _ = acc.merge(&delta);
                        }
                        None => {
                            new.insert(series, delta);
                        }
                    }
                }
                if current.is_some() {
                    *previous = current.cloned();
                }
            }
        }
        state.engines.retain(|pod, _| seen.contains(pod));
        for (series, delta) in &new {
            let family = match series {
                Series::Ttft => &m.ttft,
                Series::Tpot => &m.tpot,
                Series::Itl => &m.itl,
            };
            family.get_or_create(&labels).add(delta);
        }
        let Some(o) = objectives else { return };
        let mean_input = wv
            .observation
            .as_ref()
            .and_then(|obs| obs.load.mean_input_tokens);
        for kind in SloKind::ALL {
            let objective = kind.objective(o);
            let (delta, threshold_s) = match kind {
                SloKind::Ttft => (
                    new.get(&Series::Ttft),
                    o.ttft_threshold_s(mean_input.unwrap_or(0.0)),
                ),
                // Per request; token-level gaps only where no engine reports more.
                SloKind::Tpot => (
                    new.get(&Series::Tpot).or_else(|| new.get(&Series::Itl)),
                    objective.threshold_s,
                ),
            };
            let sl = slo_labels(workload, kind);
            m.slo_objective.get_or_create(&sl).set(threshold_s);
            m.slo_target.get_or_create(&sl).set(objective.quantile);
            let (good, total) = delta.map_or((0.0, 0.0), |d| good_and_total(d, threshold_s));
            m.slo_observations.get_or_create(&sl).inc_by(total);
            m.slo_good.get_or_create(&sl).inc_by(good);
            let windows = state.attainment.entry(kind).or_default();
            windows.record(now, good, total);
            for (window, ms) in ATTAINMENT_WINDOWS {
                let al = attainment_labels(workload, kind, window);
                match windows.attainment(now, ms) {
                    Some(a) => {
                        m.slo_attainment.get_or_create(&al).set(a);
                    }
                    None => {
                        m.slo_attainment.remove(&al);
                    }
                }
            }
        }
    }
}

/// The pods of a workload: its latest observation's replicas, matched to
/// the engines that report them (by the workload's engine selector, or in
/// the workload's namespace).
fn members(
    view: &StateView,
    wv: &WorkloadView,
    def: Option<&Arc<WorkloadDef>>,
) -> BTreeSet<PodRef> {
    let Some(o) = &wv.observation else {
        return BTreeSet::new();
    };
    let names: BTreeSet<&str> = o.replica_samples.iter().map(|r| r.id.as_str()).collect();
    let mut pods: BTreeSet<PodRef> = view
        .engines()
        .filter(|e| names.contains(e.sample.pod.name.as_str()))
        .filter(|e| {
            e.sample.pod.namespace == wv.workload.namespace
                || def.is_some_and(|d| d.selector.matches(&e.sample.model, &e.sample.pod.namespace))
        })
        .map(|e| e.sample.pod.clone())
        .collect();
    // Replicas without an engine yet (loading) still hold GPUs.
    for n in view.nodes.values() {
        for p in &n.pods {
            if p.pod.namespace == wv.workload.namespace && names.contains(p.pod.name.as_str()) {
                pods.insert(p.pod.clone());
            }
        }
    }
    pods
}

/// Shortest time between two updates: views are published after every
/// batch of agent reports, far more often than anything here changes.
const EXPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// The exporter task: an update for the newest view, at most every
/// [`EXPORT_INTERVAL`], until shutdown.
pub(crate) async fn run(
    mut view: watch::Receiver<Arc<StateView>>,
    registry: watch::Receiver<Arc<WorkloadRegistry>>,
    commands: mpsc::WeakSender<Command>,
    metrics: Arc<ScalerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut exporter = ViewExporter::default();
    loop {
        let current = view.borrow_and_update().clone();
        let reg = registry.borrow().clone();
        let m = metrics.views();
        exporter.update(&current, &reg, m);
        if let Some(tx) = commands.upgrade() {
            m.ingest_queue_depth
                .set((tx.max_capacity() - tx.capacity()) as i64);
            m.ingest_queue_capacity.set(tx.max_capacity() as i64);
        }
        tokio::select! {
            biased;
            _ = crate::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(EXPORT_INTERVAL) => {}
        }
        tokio::select! {
            biased;
            _ = crate::stopped(&mut shutdown) => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_observations_are_deltas_and_a_reset_counts_from_zero() {
        let mut a = Histogram::ttft();
        a.observe_n(0.1, 10);
        let mut b = a.clone();
        b.observe_n(0.2, 5);
        assert_eq!(new_observations(Some(&a), None, true), None, "baseline");
        assert_eq!(
            new_observations(Some(&b), Some(&a), false).map(|h| h.count()),
            Some(5)
        );
        let mut restarted = Histogram::ttft();
        restarted.observe_n(0.3, 2);
        assert_eq!(
            new_observations(Some(&restarted), Some(&b), false).map(|h| h.count()),
            Some(2)
        );
        assert_eq!(
            new_observations(Some(&a), None, false).map(|h| h.count()),
            Some(10),
            "a histogram that appears later counts whole"
        );
    }

    #[test]
    fn the_latency_histogram_encodes_per_bucket_counts_cumulatively() {
        let mut r = Registry::with_prefix("t");
        let family = Family::<WorkloadLabels, LatencyHistogram>::default();
        r.register_with_unit("ttft", "help", Unit::Seconds, family.clone());
        let mut h = Histogram::with_bounds(&[0.1, 1.0]).expect("bounds");
        h.observe_n(0.05, 3);
        h.observe_n(0.5, 2);
        family
            .get_or_create(&WorkloadLabels::from(&WorkloadRef::new("ns", "w")))
            .add(&h);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encodes");
        assert!(
            out.contains("t_ttft_seconds_bucket{le=\"0.1\",namespace=\"ns\",workload=\"w\"} 3")
                || out.contains(
                    "t_ttft_seconds_bucket{namespace=\"ns\",workload=\"w\",le=\"0.1\"} 3"
                ),
            "{out}"
        );
        assert!(
            out.contains("le=\"1.0\"} 5") || out.contains("le=\"1.0\""),
            "{out}"
        );
        assert!(
            out.contains("t_ttft_seconds_count{namespace=\"ns\",workload=\"w\"} 5"),
            "{out}"
        );
    }
}
