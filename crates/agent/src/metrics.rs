//! The agent's own Prometheus metrics (`gpuscale_agent_*`).
//!
//! Each agent has its own [`Registry`], so several agents can run in one
//! process (the demo, the tests) without sharing counters. Labels are small
//! typed sets with bounded values: the source (`gpus`, `pods`, `engines`),
//! the error kind a source reports (a `&'static str` class), the report kind
//! and the gRPC code name.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Which of the three sources a sample error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SourceName {
    Gpus,
    Pods,
    Engines,
}

impl SourceName {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceName::Gpus => "gpus",
            SourceName::Pods => "pods",
            SourceName::Engines => "engines",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SampleErrorLabels {
    source: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReportLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

/// Counters and histograms of one agent.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    samples: Counter,
    sample_errors: Family<SampleErrorLabels, Counter>,
    sample_errors_total: AtomicU64,
    collection_duration: Histogram,
    reports_sent: Family<ReportLabels, Counter>,
    reconnects: Counter,
    coalesced: Counter,
    uplink_failures: Family<FailureLabels, Counter>,
    uplink_connected: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gpuscale_agent");
        let samples = Counter::default();
        registry.register(
            "samples",
            "Sampling rounds completed (all sources read, successfully or not)",
            samples.clone(),
        );
        let sample_errors = Family::<SampleErrorLabels, Counter>::default();
        registry.register(
            "sample_errors",
            "Sampling rounds in which a whole source failed, by source and error kind",
            sample_errors.clone(),
        );
        // 100 µs .. ~3.3 s: fake sources take microseconds, NVML milliseconds.
        let collection_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.000_1, 2.0, 16),
        );
        registry.register_with_unit(
            "collection_duration",
            "Time to read every source in one sampling round",
            Unit::Seconds,
            collection_duration.clone(),
        );
        let reports_sent = Family::<ReportLabels, Counter>::default();
        registry.register(
            "reports_sent",
            "Reports handed to the uplink stream, by kind (snapshot, delta)",
            reports_sent.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "Uplink streams opened again after the previous one was lost",
            reconnects.clone(),
        );
        let coalesced = Counter::default();
        registry.register(
            "coalesced",
            "Sampled states replaced by a newer one before they could be sent",
            coalesced.clone(),
        );
        let uplink_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "uplink_failures",
            "Uplink connection attempts or streams that failed, by reason",
            uplink_failures.clone(),
        );
        let uplink_connected = Gauge::default();
        registry.register(
            "uplink_connected",
            "1 while a stream to the scaler is open, else 0",
            uplink_connected.clone(),
        );
        Self {
            registry,
            samples,
            sample_errors,
            sample_errors_total: AtomicU64::new(0),
            collection_duration,
            reports_sent,
            reconnects,
            coalesced,
            uplink_failures,
            uplink_connected,
        }
    }

    /// The registry, for callers that add metrics of their own (per-GPU
    /// exporters) before serving it.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Adds a collector, rendered on every scrape after the metrics above
    /// (the [`crate::NodeExporter`]: per-GPU and per-engine series).
    pub fn register_collector(
        &mut self,
        collector: Box<dyn prometheus_client::collector::Collector>,
    ) {
        self.registry.register_collector(collector);
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn sampled(&self, seconds: f64) {
        self.samples.inc();
        self.collection_duration.observe(seconds);
    }
    pub(crate) fn sample_error(&self, source: SourceName, kind: &'static str) {
        self.sample_errors
            .get_or_create(&SampleErrorLabels {
                source: source.as_str(),
                kind,
            })
            .inc();
        self.sample_errors_total.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn report_sent(&self, snapshot: bool) {
        let kind = if snapshot { "snapshot" } else { "delta" };
        self.reports_sent
            .get_or_create(&ReportLabels { kind })
            .inc();
    }
    pub(crate) fn reconnected(&self) {
        self.reconnects.inc();
    }
    pub(crate) fn coalesced(&self, n: u64) {
        self.coalesced.inc_by(n);
    }
    pub(crate) fn uplink_failed(&self, reason: &'static str) {
        self.uplink_failures
            .get_or_create(&FailureLabels { reason })
            .inc();
    }
    pub(crate) fn set_connected(&self, connected: bool) {
        self.uplink_connected.set(i64::from(connected));
    }

    pub fn samples_total(&self) -> u64 {
        self.samples.get()
    }
    pub fn sample_errors_total(&self) -> u64 {
        self.sample_errors_total.load(Ordering::Relaxed)
    }
    pub fn reconnects_total(&self) -> u64 {
        self.reconnects.get()
    }
    pub fn coalesced_total(&self) -> u64 {
        self.coalesced.get()
    }
}
