//! The scaler's Prometheus metrics (`gpuscale_scaler_*`).
//!
//! Units are in the names, counters end in `_total` (added by the
//! encoder), every metric has HELP text, and labels have bounded values:
//! report kinds, rejection reasons and engine states are closed sets, and
//! workload labels come from the configuration, never from agents.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use gpuscale_core::WorkloadRef;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    /// `agent` (the telemetry stream) or `api` (ScalerService, KEDA, reflection).
    api: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct WorkloadLabels {
    namespace: String,
    workload: String,
}

impl From<&WorkloadRef> for WorkloadLabels {
    fn from(w: &WorkloadRef) -> Self {
        Self {
            namespace: w.namespace.clone(),
            workload: w.name.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    namespace: String,
    workload: String,
    action: &'static str,
    /// The recommendation that won (reactive, burst, panic, slo_feedback,
    /// predictive, scheduled, hold): a closed set.
    winner: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ActuationLabels {
    namespace: String,
    workload: String,
    result: &'static str,
}

/// Every metric of one scaler (its own registry: several scalers may run in
/// one process).
#[derive(Debug)]
pub struct ScalerMetrics {
    registry: Registry,
    reports: Family<KindLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    engines_rejected: Counter,
    gpu_samples: Counter,
    superseded: Counter,
    clock_clamped: Counter,
    clock_skewed: Counter,
    streams: Gauge,
    active: Gauge,
    ingest_queue_full: Counter,
    directives_dropped: Counter,
    nodes: Gauge,
    gpus: Gauge,
    engines: Family<StateLabels, Gauge>,
    node_expirations: Counter,
    apply_batch: Histogram,
    decisions: Family<DecisionLabels, Counter>,
    desired_replicas: Family<WorkloadLabels, Gauge>,
    replicas_expected: Family<WorkloadLabels, Gauge>,
    replicas_reporting: Family<WorkloadLabels, Gauge>,
    ready_replicas: Family<WorkloadLabels, Gauge>,
    in_flight_replicas: Family<WorkloadLabels, Gauge>,
    batch_limit: Family<WorkloadLabels, Gauge>,
    arrival_rate: Family<WorkloadLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    generation_rate: Family<WorkloadLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    decide_duration: Histogram,
    actuations: Family<ActuationLabels, Counter>,
    views: crate::export::ViewMetrics,
    zero: crate::zero::ZeroMetrics,
    auth_refused: Family<RefusalLabels, Counter>,
    repeat_offenders: Counter,
    connections_closed: Family<ReasonLabels, Counter>,
    certificate_reloads: Family<ResultLabels, Counter>,
    peer_limited: Family<KindLabels, Counter>,
}

impl Default for ScalerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalerMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("gpuscale_scaler");
        let reports = Family::<KindLabels, Counter>::default();
        r.register(
            "reports",
            "Agent reports applied to the state, by kind (snapshot, delta)",
            reports.clone(),
        );
        let rejected = Family::<ReasonLabels, Counter>::default();
        r.register(
            "reports_rejected",
            "Agent streams ended because of a bad report, by reason",
            rejected.clone(),
        );
        let engines_rejected = Counter::default();
        r.register(
            "engine_entries_rejected",
            "Engine entries left out of an agent's report because they did not convert (a value out of range, a name too long, a pod listed twice); the rest of the node's report is applied",
            engines_rejected.clone(),
        );
        let gpu_samples = Counter::default();
        r.register(
            "gpu_samples",
            "Per-GPU metric samples applied to the state",
            gpu_samples.clone(),
        );
        let superseded = Counter::default();
        r.register(
            "reports_superseded",
            "Reports ignored because a newer stream of the same node took over",
            superseded.clone(),
        );
        let clock_clamped = Counter::default();
        r.register(
            "agent_clock_clamped",
            "Reports whose timestamp lay more than 10 s from their receive time (after the agent's measured clock offset) and were taken as received-now",
            clock_clamped.clone(),
        );
        let clock_skewed = Counter::default();
        r.register(
            "agent_clock_skewed",
            "Agent boot epochs whose clock was more than 10 s off the scaler's (see gpuscale_scaler_agent_clock_offset_seconds)",
            clock_skewed.clone(),
        );
        let streams = Gauge::default();
        r.register("agent_streams", "Open agent streams", streams.clone());
        let active = Gauge::default();
        r.register(
            "active",
            "1 while this scaler acts (the leader, or no leader election), 0 while it is a standby",
            active.clone(),
        );
        let ingest_queue_full = Counter::default();
        r.register(
            "ingest_queue_full",
            "Times a stream found the ingest queue full and had to wait",
            ingest_queue_full.clone(),
        );
        let directives_dropped = Counter::default();
        r.register(
            "directives_dropped",
            "Directives or acknowledgements not queued because the agent was not reading (resent later)",
            directives_dropped.clone(),
        );
        let nodes = Gauge::default();
        r.register("nodes", "Nodes known to the scaler", nodes.clone());
        let gpus = Gauge::default();
        r.register(
            "gpus",
            "GPUs (and MIG devices) known to the scaler",
            gpus.clone(),
        );
        let engines = Family::<StateLabels, Gauge>::default();
        r.register(
            "engines",
            "Engines known to the scaler, by state",
            engines.clone(),
        );
        let node_expirations = Counter::default();
        r.register(
            "node_expirations",
            "Nodes forgotten after reporting nothing for the node TTL",
            node_expirations.clone(),
        );
        let apply_batch = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        r.register(
            "apply_batch_commands",
            "Commands the state task applied between two publications of its view",
            apply_batch.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        r.register(
            "decisions",
            "Decisions made, by workload, action and the recommendation that won",
            decisions.clone(),
        );
        let replicas_expected = Family::<WorkloadLabels, Gauge>::default();
        r.register(
            "workload_replicas_expected",
            "Replicas the workload expects to hear from (Kubernetes: the target's ready pods; standalone: those heard recently)",
            replicas_expected.clone(),
        );
        let replicas_reporting = Family::<WorkloadLabels, Gauge>::default();
        r.register(
            "workload_replicas_reporting",
            "Expected replicas that reported within the freshness bound; fewer than expected holds scale-in",
            replicas_reporting.clone(),
        );
        let desired_replicas = Family::<WorkloadLabels, Gauge>::default();
        r.register(
            "desired_replicas",
            "Replicas the latest decision asks for",
            desired_replicas.clone(),
        );
        let ready_replicas = Family::<WorkloadLabels, Gauge>::default();
        r.register(
            "ready_replicas",
            "Warm replicas (engine ready and warmed up)",
            ready_replicas.clone(),
        );
        let in_flight_replicas = Family::<WorkloadLabels, Gauge>::default();
        r.register(
            "in_flight_replicas",
            "Replicas pending or loading: capacity on its way",
            in_flight_replicas.clone(),
        );
        let batch_limit = Family::<WorkloadLabels, Gauge>::default();
        r.register(
            "batch_limit",
            "Per-replica batch limit of the latest decision (absent when none)",
            batch_limit.clone(),
        );
        let arrival_rate =
            Family::<WorkloadLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "arrival_requests_per_second",
            "Offered load over the window, requests per second",
            arrival_rate.clone(),
        );
        let generation_rate =
            Family::<WorkloadLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "generation_tokens_per_second",
            "Generated tokens per second over the window, all replicas",
            generation_rate.clone(),
        );
        let decide_duration = Histogram::new(exponential_buckets(0.000_01, 2.0, 18));
        r.register_with_unit(
            "decide_duration",
            "Time to assemble one workload's observation and decide",
            Unit::Seconds,
            decide_duration.clone(),
        );
        let actuations = Family::<ActuationLabels, Counter>::default();
        r.register(
            "actuations",
            "Replica changes handed to the actuator, by workload and result",
            actuations.clone(),
        );
        let views = crate::export::ViewMetrics::register(&mut r);
        let zero = crate::zero::ZeroMetrics::register(&mut r);
        let auth_refused = Family::<RefusalLabels, Counter>::default();
        r.register(
            "auth_refused",
            "Calls refused by authentication or authorisation, by API (agent, api) and reason",
            auth_refused.clone(),
        );
        let repeat_offenders = Counter::default();
        r.register(
            "auth_repeat_offenders",
            "Peers reported for repeated refusals (once per window each)",
            repeat_offenders.clone(),
        );
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        r.register(
            "connections_closed",
            "gRPC connections the scaler closed, by reason (no_http2_preface, idle, not_http2, tls_handshake_failed, tls_handshake_timeout, too_many_handshakes)",
            connections_closed.clone(),
        );
        let certificate_reloads = Family::<ResultLabels, Counter>::default();
        r.register(
            "certificate_reloads",
            "Serving certificate reloads after the files changed, by result (ok, error)",
            certificate_reloads.clone(),
        );
        let peer_limited = Family::<KindLabels, Counter>::default();
        r.register(
            "peer_limited",
            "Calls refused by a per-peer limit, by kind (streams, requests)",
            peer_limited.clone(),
        );
        Self {
            registry: r,
            reports,
            rejected,
            engines_rejected,
            gpu_samples,
            superseded,
            clock_clamped,
            clock_skewed,
            streams,
            active,
            ingest_queue_full,
            directives_dropped,
            nodes,
            gpus,
            engines,
            node_expirations,
            apply_batch,
            decisions,
            desired_replicas,
            replicas_expected,
            replicas_reporting,
            ready_replicas,
            in_flight_replicas,
            batch_limit,
            arrival_rate,
            generation_rate,
            decide_duration,
            actuations,
            views,
            zero,
            auth_refused,
            repeat_offenders,
            connections_closed,
            certificate_reloads,
            peer_limited,
        }
    }

    /// The per-workload series derived from the view and the public APIs' metrics.
    pub(crate) fn zero(&self) -> &crate::zero::ZeroMetrics {
        &self.zero
    }

    pub(crate) fn views(&self) -> &crate::export::ViewMetrics {
        &self.views
    }

    /// The registry, for callers that add metrics of their own before serving it.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn report(&self, snapshot: bool, gpu_samples: usize) {
        let kind = if snapshot { "snapshot" } else { "delta" };
        self.reports.get_or_create(&KindLabels { kind }).inc();
        self.gpu_samples.inc_by(gpu_samples as u64);
    }
    pub(crate) fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }
    pub(crate) fn engines_rejected(&self, n: usize) {
        self.engines_rejected.inc_by(n as u64);
    }
    /// Engine entries left out of reports so far.
    pub fn engines_rejected_total(&self) -> u64 {
        self.engines_rejected.get()
    }
    pub(crate) fn auth_refused(&self, api: &'static str, reason: &'static str) {
        self.auth_refused
            .get_or_create(&RefusalLabels { api, reason })
            .inc();
    }
    pub(crate) fn repeat_offender(&self) {
        self.repeat_offenders.inc();
    }
    pub(crate) fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
    pub(crate) fn certificate_reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.certificate_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
    pub(crate) fn peer_limited(&self, kind: &'static str) {
        self.peer_limited.get_or_create(&KindLabels { kind }).inc();
    }
    pub(crate) fn clock_clamped(&self) {
        self.clock_clamped.inc();
    }
    pub(crate) fn clock_skewed(&self) {
        self.clock_skewed.inc();
    }
    /// Reports clamped so far (their timestamp was too far off).
    pub fn clock_clamped_total(&self) -> u64 {
        self.clock_clamped.get()
    }
    /// Agent epochs seen with a clock off by more than the bound.
    pub fn clock_skewed_total(&self) -> u64 {
        self.clock_skewed.get()
    }
    pub(crate) fn superseded(&self) {
        self.superseded.inc();
    }
    pub(crate) fn set_active(&self, active: bool) {
        self.active.set(i64::from(active));
    }
    pub(crate) fn stream_opened(&self) {
        self.streams.inc();
    }
    pub(crate) fn stream_closed(&self) {
        self.streams.dec();
    }
    pub(crate) fn ingest_queue_full(&self) {
        self.ingest_queue_full.inc();
    }
    pub(crate) fn directive_dropped(&self) {
        self.directives_dropped.inc();
    }
    pub(crate) fn node_expired(&self) {
        self.node_expirations.inc();
    }
    pub(crate) fn applied_batch(&self, commands: usize) {
        self.apply_batch.observe(commands as f64);
    }
    pub(crate) fn inventory(&self, nodes: usize, gpus: usize, engines: &[(&'static str, i64)]) {
        self.nodes.set(nodes as i64);
        self.gpus.set(gpus as i64);
        for (state, n) in engines {
            self.engines.get_or_create(&StateLabels { state }).set(*n);
        }
    }
    pub(crate) fn completeness(&self, workload: &WorkloadRef, c: &crate::complete::Completeness) {
        let labels = WorkloadLabels::from(workload);
        self.replicas_expected
            .get_or_create(&labels)
            .set(i64::from(c.expected));
        self.replicas_reporting
            .get_or_create(&labels)
            .set(i64::from(c.reporting));
    }

    pub(crate) fn decided(
        &self,
        workload: &WorkloadRef,
        decision: &gpuscale_policy::Decision,
        observation: &gpuscale_policy::Observation,
        seconds: f64,
    ) {
        let labels = WorkloadLabels::from(workload);
        // The learned start-up (a workload that may scale to zero publishes
        // it per phase from its decider instead).
        if decision.scale_to_zero.is_none()
            && let Some(s) = decision.inputs.slo().and_then(|i| i.startup)
        {
            self.zero.publish_total(workload, &s);
        }
        let action = match decision.action {
            gpuscale_policy::Action::Hold => "hold",
            gpuscale_policy::Action::ScaleUp => "scale_up",
            gpuscale_policy::Action::ScaleDown => "scale_down",
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                namespace: labels.namespace.clone(),
                workload: labels.workload.clone(),
                action,
                winner: decision.winner.as_str(),
            })
            .inc();
        self.desired_replicas
            .get_or_create(&labels)
            .set(i64::from(decision.desired_replicas));
        self.ready_replicas
            .get_or_create(&labels)
            .set(i64::from(observation.replicas.ready));
        self.in_flight_replicas
            .get_or_create(&labels)
            .set(i64::from(observation.replicas.in_flight()));
        match decision.batch_limit {
            Some(b) => {
                self.batch_limit.get_or_create(&labels).set(i64::from(b));
            }
            None => {
                self.batch_limit.remove(&labels);
            }
        }
        match observation.load.arrival_rate_rps {
            Some(r) => {
                self.arrival_rate.get_or_create(&labels).set(r);
            }
            None => {
                self.arrival_rate.remove(&labels);
            }
        }
        match observation.load.generation_tokens_per_second {
            Some(r) => {
                self.generation_rate.get_or_create(&labels).set(r);
            }
            None => {
                self.generation_rate.remove(&labels);
            }
        }
        self.decide_duration.observe(seconds);
    }
    pub(crate) fn actuated(&self, workload: &WorkloadRef, ok: bool) {
        let labels = WorkloadLabels::from(workload);
        self.actuations
            .get_or_create(&ActuationLabels {
                namespace: labels.namespace,
                workload: labels.workload,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }
}
