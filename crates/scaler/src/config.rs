//! The scaler's configuration: flags ([`ScalerArgs`]), the configuration file
//! ([`ScalerFile`], YAML or JSON), and the validated [`ScalerConfig`].
//!
//! The file names the workloads the scaler decides for when it runs without
//! Kubernetes (standalone), which engines belong to each, and how to decide:
//!
//! ```yaml
//! tick: 2s            # how often every workload is decided (default 2s)
//! window: 30s         # span of the rate and latency windows (default 30s)
//! completeness:
//!   minReportingShare: 1.0   # share of expected replicas that must report
//!                            # for a scale-in (0.5..=1, default 1: all)
//! # Standalone: the nodes whose agents the scaler expects. The warm-up after
//! # start ends as soon as each has reported and every engine of a workload
//! # has a rate, instead of waiting the whole --warmup (default: none listed).
//! expectedNodes: [node-a, node-b]
//! workloads:
//!   - name: chat
//!     namespace: default          # default "default"
//!     labels: {tier: prod}        # for selectors of the public API
//!     engines: {model: llama-3-8b, namespace: default}   # at least one of the two
//!     # Either the full policy (the InferenceAutoscaler spec, camelCase):
//!     policy:
//!       target: {name: chat}
//!       maxReplicas: 8
//!       performanceModel: {preset: h200-llama3-8b-bf16}
//!   - name: batch
//!     engines: {model: mistral-7b}
//!     # or a proportional rule on generated tokens per second:
//!     proportional:
//!       capacityTokensPerSecond: 2500    # per replica
//!       targetUtilization: 0.8           # default 0.8
//!       minReplicas: 1                   # default 1
//!       maxReplicas: 8
//!       scaleDownStabilization: 60s      # default 60s
//!       tolerance: 0.1                   # default 0.1
//!       staleAfter: 30s                  # default 30s
//!       advisory: false                  # default false
//! ```
//!
//! A `policy.performanceModel.profileFile` path is read relative to the
//! configuration file.
//!
//! Reading is bounded ([`crate::config_file`]): at most 1 MiB is read, more
//! than 64 unclosed `[`/`{` is refused in one linear pass before the YAML
//! parser runs, an unknown field anywhere (under `policy:` too) is an error
//! naming its path and closest known name, every error names the file, and
//! a bad value is echoed as at most a 120-character prefix. A standalone
//! scaler with no workloads starts with a warning.

use gpuscale_core::bounds::{duration_within, within};
use gpuscale_core::names::is_dns_label;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpuscale_core::WorkloadRef;
use gpuscale_policy::config::ResolveError;
use gpuscale_policy::{PerfModel, WorkloadConfig, WorkloadSpec};
use serde::{Deserialize, Deserializer};

use crate::config_file;
use crate::edge::auth::{DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_AUDIENCE, parse_service_account};
use crate::edge::{AuthConfig, AuthMode, ConnLimits, PeerLimitConfig, TlsConfig, Transport};
use crate::error::ScalerError;

/// Largest agent report the scaler decodes, bytes. The largest realistic
/// snapshot (8 GPUs as 56 MIG devices, 64 engines with two 26-bucket
/// histograms each) encodes to about 100 KiB; 1 MiB leaves a tenfold margin
/// and bounds what one stream can make the scaler allocate.
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Everything the scaler runs with, validated.
#[derive(Debug, Clone)]
pub struct ScalerConfig {
    /// gRPC listen address (agents, health, reflection, public APIs).
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// A node that has not reported for this long is forgotten.
    pub node_ttl: Duration,
    /// How often every workload is decided.
    pub tick: Duration,
    /// Longest warm-up after start or a change of leader (see
    /// `--warmup`); zero: none (the library's default, for tests and
    /// embedders that feed the state themselves).
    pub warmup: Duration,
    /// Span of the rate and latency windows.
    pub window: Duration,
    /// Share of a workload's expected replicas that must report for a
    /// decision to scale in (see [`crate::complete`]); 1: all of them.
    pub min_reporting_share: f64,
    /// Standalone: the nodes whose agents are expected; once each has
    /// reported (and every engine of a workload has a rate) the warm-up
    /// ends. Empty: the warm-up waits the whole `warmup`.
    pub expected_nodes: BTreeSet<gpuscale_core::NodeName>,
    /// Capacity of the queue from the gRPC handlers to the state task.
    pub ingest_queue: usize,
    /// How long a stream waits for room in a full ingest queue before it is
    /// ended with `UNAVAILABLE` (the agent backs off and coalesces).
    pub ingest_wait: Duration,
    /// Directives (and acknowledgements) queued per stream before the
    /// scaler stops queuing for that agent.
    pub stream_outbound: usize,
    /// Largest report decoded, bytes.
    pub max_message_bytes: usize,
    /// The workloads decided in standalone mode.
    pub workloads: Vec<WorkloadDef>,
    /// Limits of the public APIs (streams open at once, buffer per stream).
    pub api: crate::api::ApiConfig,
    /// TLS or plaintext (h2c). The library defaults to plaintext; the
    /// command line asks for TLS unless `--insecure-plaintext`.
    pub transport: Transport,
    /// Who may stream and read.
    pub auth: AuthConfig,
    /// Connections that never start HTTP/2 or stay idle are closed.
    pub conn: ConnLimits,
    /// Open streams and request rates per peer.
    pub peers: PeerLimitConfig,
}

impl ScalerConfig {
    /// Defaults: node TTL 30 s, tick 2 s, window 30 s, ingest queue 1024,
    /// 5 s ingest wait, 64 directives per stream, 1 MiB reports, no workloads.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            metrics_addr: None,
            node_ttl: Duration::from_secs(30),
            tick: Duration::from_secs(2),
            warmup: Duration::ZERO,
            window: Duration::from_secs(30),
            min_reporting_share: crate::complete::DEFAULT_MIN_REPORTING_SHARE,
            expected_nodes: BTreeSet::new(),
            ingest_queue: 1024,
            ingest_wait: Duration::from_secs(5),
            stream_outbound: 64,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            workloads: Vec::new(),
            api: crate::api::ApiConfig::default(),
            transport: Transport::Plaintext,
            auth: AuthConfig::none(),
            conn: ConnLimits::default(),
            peers: PeerLimitConfig::default(),
        }
    }

    /// Checks every field; the error names the field, the value and what is allowed.
    pub fn validate(&self) -> Result<(), ScalerError> {
        self.validate_file_fields()?;
        let ranges: [(&str, Duration, Duration, Duration); 3] = [
            (
                "--node-ttl",
                self.node_ttl,
                Duration::from_millis(100),
                Duration::from_secs(86_400),
            ),
            (
                "--warmup",
                self.warmup,
                Duration::ZERO,
                Duration::from_secs(600),
            ),
            (
                "ingest_wait",
                self.ingest_wait,
                Duration::from_millis(1),
                Duration::from_secs(600),
            ),
        ];
        for (field, value, lo, hi) in ranges {
            duration_within(value, lo, hi).map_err(|e| ScalerError::out_of_range(field, e))?;
        }
        within(self.ingest_queue, 1, 1_000_000)
            .map_err(|e| ScalerError::out_of_range("ingest_queue", e))?;
        within(self.stream_outbound, 1, 100_000)
            .map_err(|e| ScalerError::out_of_range("stream_outbound", e))?;
        if !(1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(ScalerError::config(
                "max_message_bytes",
                self.max_message_bytes.to_string(),
                "1 KiB..=64 MiB",
            ));
        }
        self.api.validate()?;
        self.peers.validate()?;
        for (field, d) in [
            ("--idle-timeout", self.conn.idle_timeout),
            ("preface_timeout", self.conn.preface_timeout),
        ] {
            duration_within(d, Duration::from_millis(10), Duration::from_secs(86_400))
                .map_err(|e| ScalerError::out_of_range(field, e))?;
        }
        if let Transport::Tls(tls) = &self.transport
            && (tls.reload_interval.is_zero() || tls.handshake_timeout.is_zero())
        {
            return Err(ScalerError::config(
                "tls.reload_interval",
                format!("{:?}", tls.reload_interval),
                "more than 0",
            ));
        }
        if self.auth.mode == AuthMode::Certificates
            && !matches!(&self.transport, Transport::Tls(t) if t.client_ca.is_some())
        {
            return Err(ScalerError::config(
                "--auth",
                "certificates",
                "with TLS and --tls-client-ca (client certificates are verified against it)",
            ));
        }
        Ok(())
    }

    /// Checks the fields the configuration file sets (tick, window,
    /// workloads), so that their errors can name the file.
    pub(crate) fn validate_file_fields(&self) -> Result<(), ScalerError> {
        for (field, value, lo, hi) in [
            (
                "tick",
                self.tick,
                Duration::from_millis(10),
                Duration::from_secs(3600),
            ),
            (
                "window",
                self.window,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ),
        ] {
            duration_within(value, lo, hi).map_err(|e| ScalerError::out_of_range(field, e))?;
        }
        let lowest = crate::complete::LOWEST_MIN_REPORTING_SHARE;
        if !(self.min_reporting_share >= lowest && self.min_reporting_share <= 1.0) {
            return Err(ScalerError::config(
                "completeness.minReportingShare",
                self.min_reporting_share.to_string(),
                format!("{lowest}..=1 (the share of expected replicas that must report)"),
            ));
        }
        let mut seen = BTreeSet::new();
        for w in &self.workloads {
            if !seen.insert(w.workload.clone()) {
                return Err(ScalerError::config(
                    "workloads[].name",
                    w.workload.to_string(),
                    "each workload once",
                ));
            }
        }
        Ok(())
    }

    /// What is worth a warning in a valid configuration: a standalone
    /// scaler with no workloads decides for nothing; `expectedNodes` means
    /// nothing in Kubernetes mode.
    pub fn warnings(&self, kubernetes: bool, file: Option<&Path>) -> Vec<String> {
        let mut out = Vec::new();
        if kubernetes && !self.expected_nodes.is_empty() {
            out.push(
                "expectedNodes is ignored in Kubernetes mode: the warm-up expects each target's ready pods"
                    .to_string(),
            );
        }
        if !kubernetes && self.workloads.is_empty() {
            out.push(match file {
                Some(path) => format!(
                    "--config {}: no workloads: the scaler will decide for none (add `workloads:`)",
                    path.display()
                ),
                None => {
                    "no --config: the standalone scaler has no workloads and will decide for none"
                        .to_string()
                }
            });
        }
        out
    }
}

/// Which engines belong to a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSelector {
    /// The engine's served model name, when set.
    pub model: Option<String>,
    /// The pod's namespace, when set.
    pub namespace: Option<String>,
}

impl EngineSelector {
    pub fn matches(&self, model: &str, namespace: &str) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
            && self.namespace.as_deref().is_none_or(|n| n == namespace)
    }
}

/// A workload the scaler decides for in standalone mode.
#[derive(Debug, Clone)]
pub struct WorkloadDef {
    pub workload: WorkloadRef,
    pub labels: BTreeMap<String, String>,
    pub selector: EngineSelector,
    pub decider: DeciderConfig,
    /// The last decision a previous scaler made for it, as persisted (in
    /// Kubernetes mode: the InferenceAutoscaler's status): the decider's
    /// history starts from it (see [`crate::seed`]).
    pub last_decision: Option<PersistedDecision>,
}

/// A decision as persisted: the count it asked for and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistedDecision {
    pub desired_replicas: u32,
    pub at: gpuscale_core::Timestamp,
}

/// How a workload is decided.
#[derive(Debug, Clone)]
pub enum DeciderConfig {
    /// The full policy (`gpuscale_policy::Policy`).
    Policy {
        config: Box<WorkloadConfig>,
        model: Box<PerfModel>,
    },
    /// Replicas proportional to generated tokens per second.
    Proportional(ProportionalConfig),
}

/// The proportional rule's parameters (validated); the rule is the policy
/// crate's ([`gpuscale_policy::proportional`]).
pub use gpuscale_policy::proportional::ProportionalConfig;

// ---------------------------------------------------------------------------
// The file.

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// The configuration file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScalerFile {
    #[serde(default, deserialize_with = "opt_duration")]
    pub tick: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub window: Option<Duration>,
    #[serde(default)]
    pub completeness: Option<CompletenessFile>,
    #[serde(default)]
    pub expected_nodes: Option<Vec<String>>,
    #[serde(default)]
    pub workloads: Vec<WorkloadFile>,
}

/// `completeness:` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CompletenessFile {
    #[serde(default)]
    pub min_reporting_share: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadFile {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub engines: EngineSelectorFile,
    #[serde(default)]
    pub policy: Option<Box<WorkloadSpec>>,
    #[serde(default)]
    pub proportional: Option<ProportionalFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EngineSelectorFile {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProportionalFile {
    pub capacity_tokens_per_second: f64,
    #[serde(default = "default_target_utilization")]
    pub target_utilization: f64,
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
    pub max_replicas: u32,
    #[serde(default = "default_stabilization", deserialize_with = "duration")]
    pub scale_down_stabilization: Duration,
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    #[serde(default = "default_stale_after", deserialize_with = "duration")]
    pub stale_after: Duration,
    #[serde(default)]
    pub advisory: bool,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_target_utilization() -> f64 {
    0.8
}
fn default_min_replicas() -> u32 {
    1
}
fn default_stabilization() -> Duration {
    Duration::from_secs(60)
}
fn default_tolerance() -> f64 {
    0.1
}
fn default_stale_after() -> Duration {
    Duration::from_secs(30)
}

impl ScalerFile {
    /// Reads and parses a YAML or JSON file.
    ///
    /// The file is read up to [`config_file::MAX_CONFIG_BYTES`], its nesting
    /// checked in one pass before parsing, and any unknown field (under
    /// `policy:` too) is an error naming it and its closest known name.
    pub fn load(path: &Path) -> Result<Self, ScalerError> {
        let fail = |message: String| ScalerError::ConfigFile {
            path: path.display().to_string(),
            message,
        };
        let text = config_file::read_bounded(path, config_file::MAX_CONFIG_BYTES).map_err(fail)?;
        Self::parse(&text).map_err(fail)
    }

    /// Parses the file's text (see [`ScalerFile::load`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        config_file::parse(text)
    }

    /// Validated workloads; profile files are read relative to `base_dir`.
    pub fn workloads(&self, base_dir: &Path) -> Result<Vec<WorkloadDef>, ScalerError> {
        self.workloads
            .iter()
            .enumerate()
            .map(|(i, w)| w.validate(i, base_dir))
            .collect()
    }

    /// Applies the file's settings to `config`.
    pub fn apply(&self, config: &mut ScalerConfig, base_dir: &Path) -> Result<(), ScalerError> {
        if let Some(t) = self.tick {
            config.tick = t;
        }
        if let Some(w) = self.window {
            config.window = w;
        }
        if let Some(share) = self
            .completeness
            .as_ref()
            .and_then(|c| c.min_reporting_share)
        {
            config.min_reporting_share = share;
        }
        if let Some(nodes) = &self.expected_nodes {
            config.expected_nodes = expected_nodes(nodes)?;
        }
        config.workloads = self.workloads(base_dir)?;
        config.validate_file_fields()
    }
}

/// Most nodes `expectedNodes` may list.
pub(crate) const MAX_EXPECTED_NODES: usize = 10_000;

/// `expectedNodes`, checked: node names (DNS subdomains), each once.
fn expected_nodes(nodes: &[String]) -> Result<BTreeSet<gpuscale_core::NodeName>, ScalerError> {
    if nodes.len() > MAX_EXPECTED_NODES {
        return Err(ScalerError::config(
            "expectedNodes",
            format!("{} nodes", nodes.len()),
            format!("at most {MAX_EXPECTED_NODES}"),
        ));
    }
    let mut out = BTreeSet::new();
    for (i, n) in nodes.iter().enumerate() {
        let valid = !n.is_empty()
            && n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(ScalerError::config(
                format!("expectedNodes[{i}]"),
                n,
                "a node name: 1..=253 lowercase letters, digits, '-' and '.'",
            ));
        }
        if !out.insert(gpuscale_core::NodeName::new(n.as_str())) {
            return Err(ScalerError::config(
                format!("expectedNodes[{i}]"),
                n,
                "each node once",
            ));
        }
    }
    Ok(out)
}

impl WorkloadFile {
    fn validate(&self, i: usize, base_dir: &Path) -> Result<WorkloadDef, ScalerError> {
        let at = |f: &str| format!("workloads[{i}].{f}");
        if !is_dns_label(&self.name) {
            return Err(ScalerError::config(
                at("name"),
                &self.name,
                "a DNS label: 1..=63 lowercase letters, digits and '-'",
            ));
        }
        if !is_dns_label(&self.namespace) {
            return Err(ScalerError::config(
                at("namespace"),
                &self.namespace,
                "a DNS label: 1..=63 lowercase letters, digits and '-'",
            ));
        }
        let selector = EngineSelector {
            model: self.engines.model.clone().filter(|m| !m.is_empty()),
            namespace: self.engines.namespace.clone().filter(|n| !n.is_empty()),
        };
        if selector.model.is_none() && selector.namespace.is_none() {
            return Err(ScalerError::config(
                at("engines"),
                "{}",
                "at least one of `model` and `namespace`",
            ));
        }
        let decider = match (&self.policy, &self.proportional) {
            (Some(spec), None) => {
                let (config, model) = spec
                    .resolve(|path| {
                        let file = base_dir.join(path);
                        config_file::read_bounded(&file, config_file::MAX_CONFIG_BYTES)
                            .map_err(|e| (file, e))
                    })
                    .map_err(|e| match e {
                        ResolveError::Spec(e) => {
                            ScalerError::config(at("policy"), "", e.to_string())
                        }
                        ResolveError::Profile {
                            error: (file, e), ..
                        } => ScalerError::config(
                            at("policy.performanceModel.profileFile"),
                            file.display().to_string(),
                            format!("a readable profile file ({e})"),
                        ),
                    })?;
                DeciderConfig::Policy {
                    config: Box::new(config),
                    model: Box::new(model),
                }
            }
            (None, Some(p)) => DeciderConfig::Proportional(p.validate(&at)?),
            _ => {
                return Err(ScalerError::config(
                    at("policy"),
                    if self.policy.is_some() {
                        "policy and proportional"
                    } else {
                        "neither"
                    },
                    "exactly one of `policy` and `proportional`",
                ));
            }
        };
        Ok(WorkloadDef {
            workload: WorkloadRef::new(self.namespace.clone(), self.name.clone()),
            labels: self.labels.clone(),
            selector,
            decider,
            last_decision: None,
        })
    }
}

impl ProportionalFile {
    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<ProportionalConfig, ScalerError> {
        let p = |f: &str| at(&format!("proportional.{f}"));
        if !(self.capacity_tokens_per_second.is_finite()
            && self.capacity_tokens_per_second > 0.0
            && self.capacity_tokens_per_second <= 1e9)
        {
            return Err(ScalerError::config(
                p("capacityTokensPerSecond"),
                self.capacity_tokens_per_second.to_string(),
                "more than 0 and at most 1e9",
            ));
        }
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            return Err(ScalerError::config(
                p("targetUtilization"),
                self.target_utilization.to_string(),
                "more than 0 and at most 1",
            ));
        }
        within(self.max_replicas, 1, 10_000)
            .map_err(|e| ScalerError::out_of_range(p("maxReplicas"), e))?;
        if self.min_replicas > self.max_replicas {
            return Err(ScalerError::config(
                p("minReplicas"),
                self.min_replicas.to_string(),
                format!("at most maxReplicas ({})", self.max_replicas),
            ));
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return Err(ScalerError::config(
                p("tolerance"),
                self.tolerance.to_string(),
                "0 <= tolerance < 1",
            ));
        }
        if self.scale_down_stabilization > Duration::from_secs(3600) {
            return Err(ScalerError::config(
                p("scaleDownStabilization"),
                format!("{:?}", self.scale_down_stabilization),
                "at most 1h",
            ));
        }
        if self.stale_after.is_zero() || self.stale_after > Duration::from_secs(3600) {
            return Err(ScalerError::config(
                p("staleAfter"),
                format!("{:?}", self.stale_after),
                "more than 0 and at most 1h",
            ));
        }
        Ok(ProportionalConfig {
            capacity_tokens_per_second: self.capacity_tokens_per_second,
            target_utilization: self.target_utilization,
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            scale_down_stabilization: self.scale_down_stabilization,
            tolerance: self.tolerance,
            stale_after: self.stale_after,
            advisory: self.advisory,
        })
    }
}

pub use gpuscale_core::time::parse_duration;

/// `gpuscale scaler` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ScalerArgs {
    /// gRPC listen address: the agents' stream, gRPC health and reflection.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:7070",
        env = "GPUSCALE_LISTEN"
    )]
    pub listen: String,
    /// Serve /metrics, /healthz and /readyz on this address; `off` disables it.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:9090",
        env = "GPUSCALE_METRICS_ADDR"
    )]
    pub metrics_addr: String,
    /// After start and after becoming leader, decide, publish and act for a
    /// workload only once every replica it expects has reported (Kubernetes:
    /// the target's ready pods; standalone: the config file's
    /// `expectedNodes`, else it waits the whole of it) or this long has
    /// passed (0s..=10m). Meanwhile the APIs answer UNAVAILABLE.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration, env = "GPUSCALE_WARMUP")]
    pub warmup: Duration,
    /// Forget a node that has not reported for this long (100ms..=24h).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, env = "GPUSCALE_NODE_TTL")]
    pub node_ttl: Duration,
    /// YAML or JSON file: tick, window, and the workloads to decide for.
    #[arg(long, value_name = "FILE", env = "GPUSCALE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public API streams (WatchRecommendations, KEDA StreamIsActive) open
    /// at once; more are refused with RESOURCE_EXHAUSTED (1..=100000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        env = "GPUSCALE_MAX_WATCHERS"
    )]
    pub max_watchers: usize,
    /// KEDA StreamIsActive streams open at once, a pool apart from the
    /// watchers so KEDA is never locked out by them (1..=100000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        env = "GPUSCALE_MAX_KEDA_STREAMS"
    )]
    pub max_keda_streams: usize,
    /// The serving certificate (PEM chain), e.g. a mounted Secret's tls.crt;
    /// re-read when it changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "GPUSCALE_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The serving certificate's private key (PEM), e.g. tls.key.
    #[arg(
        long,
        value_name = "FILE",
        env = "GPUSCALE_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA bundle (PEM); a verified
    /// certificate's DNS name identifies the caller (an agent's: its node).
    #[arg(long, value_name = "FILE", env = "GPUSCALE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext h2c without TLS: for local use only (no
    /// authentication unless --auth says otherwise).
    #[arg(long, env = "GPUSCALE_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// How callers authenticate: kubernetes (TokenReview and
    /// SubjectAccessReview; the default with --kubernetes), file
    /// (--auth-file), certificates (--tls-client-ca only), none.
    /// Default: from the other flags.
    #[arg(long, value_name = "MODE", env = "GPUSCALE_AUTH")]
    pub auth: Option<String>,
    /// Standalone tokens and grants (YAML): `agents: [{node, token}]`,
    /// `clients: [{name, token, namespaces}]`.
    #[arg(long, value_name = "FILE", env = "GPUSCALE_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// The audience agents' tokens must carry.
    #[arg(long, value_name = "AUDIENCE", default_value = DEFAULT_AUDIENCE, env = "GPUSCALE_TOKEN_AUDIENCE")]
    pub token_audience: String,
    /// The agents' ServiceAccount (namespace/name): only its tokens may stream.
    #[arg(long, value_name = "NAMESPACE/NAME", default_value = DEFAULT_AGENT_SERVICE_ACCOUNT, env = "GPUSCALE_AGENT_SERVICE_ACCOUNT")]
    pub agent_service_account: String,
    /// Streams one client address may have open at once (1..=1000000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 128,
        env = "GPUSCALE_MAX_STREAMS_PER_PEER"
    )]
    pub max_streams_per_peer: usize,
    /// Unary calls per second one client address may make (bursts of twice as many).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 200.0,
        env = "GPUSCALE_REQUESTS_PER_SECOND_PER_PEER"
    )]
    pub requests_per_second_per_peer: f64,
    /// Close connections with no call open for this long (10ms..=24h).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration, env = "GPUSCALE_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,
}

impl ScalerArgs {
    /// The validated configuration these flags (and the file) describe,
    /// for the standalone scaler.
    pub fn to_config(&self) -> Result<ScalerConfig, ScalerError> {
        self.to_config_for(false)
    }

    /// The same, for the standalone scaler or (`kubernetes`) the Kubernetes mode.
    pub fn to_config_for(&self, kubernetes: bool) -> Result<ScalerConfig, ScalerError> {
        let listen = self.listen.parse().map_err(|_| {
            ScalerError::config("--listen", &self.listen, "an IP:port such as 0.0.0.0:7070")
        })?;
        let mut config = ScalerConfig::new(listen);
        config.metrics_addr = match self.metrics_addr.as_str() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|_| {
                ScalerError::config(
                    "--metrics-addr",
                    addr,
                    "an IP:port such as 0.0.0.0:9090, or `off`",
                )
            })?),
        };
        config.node_ttl = self.node_ttl;
        config.warmup = self.warmup;
        config.api.max_watchers = self.max_watchers;
        config.api.max_keda_streams = self.max_keda_streams;
        config.peers.max_streams = self.max_streams_per_peer;
        config.peers.requests_per_second = self.requests_per_second_per_peer;
        config.peers.burst = (2.0 * self.requests_per_second_per_peer).max(1.0);
        config.conn.idle_timeout = self.idle_timeout;
        if let Some(path) = &self.config {
            let file = ScalerFile::load(path)?;
            let base = path.parent().unwrap_or(Path::new("."));
            file.apply(&mut config, base).map_err(|e| match e {
                ScalerError::Config {
                    field,
                    value,
                    allowed,
                } => ScalerError::ConfigFile {
                    path: path.display().to_string(),
                    message: format!("invalid {field} `{value}`: {allowed}"),
                },
                other => other,
            })?;
        }
        config.transport = self.transport()?;
        config.auth = self.auth_config(kubernetes)?;
        config.validate()?;
        for warning in config.warnings(kubernetes, self.config.as_deref()) {
            tracing::warn!("{warning}");
        }
        Ok(config)
    }

    fn transport(&self) -> Result<Transport, ScalerError> {
        match (&self.tls_cert, &self.tls_key, self.insecure_plaintext) {
            (Some(_), _, true) | (_, Some(_), true) => Err(ScalerError::config(
                "--insecure-plaintext",
                "true",
                "not together with --tls-cert/--tls-key",
            )),
            (Some(cert), Some(key), false) => {
                let mut tls = TlsConfig::new(cert, key);
                tls.client_ca = self.tls_client_ca.clone();
                Ok(Transport::Tls(tls))
            }
            (None, None, true) => {
                if self.tls_client_ca.is_some() {
                    return Err(ScalerError::config(
                        "--tls-client-ca",
                        self.tls_client_ca
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        "only with TLS (--tls-cert and --tls-key)",
                    ));
                }
                Ok(Transport::Plaintext)
            }
            _ => Err(ScalerError::config(
                "--tls-cert",
                "(not given)",
                "the gRPC port serves TLS: pass --tls-cert and --tls-key (PEM files, e.g. a mounted Secret's tls.crt and tls.key), or --insecure-plaintext for local use",
            )),
        }
    }

    fn auth_config(&self, kubernetes: bool) -> Result<AuthConfig, ScalerError> {
        let mode = match self.auth.as_deref() {
            Some("kubernetes") => AuthMode::Kubernetes,
            Some("file") | None if self.auth_file.is_some() => {
                AuthMode::File(self.auth_file.clone().unwrap_or_default())
            }
            Some("file") => {
                return Err(ScalerError::config(
                    "--auth",
                    "file",
                    "with --auth-file FILE",
                ));
            }
            Some("certificates") => AuthMode::Certificates,
            Some("none") => AuthMode::None,
            Some(other) => {
                return Err(ScalerError::config(
                    "--auth",
                    crate::edge::auth::quote(other),
                    "kubernetes, file, certificates or none",
                ));
            }
            None if kubernetes => AuthMode::Kubernetes,
            None if self.tls_client_ca.is_some() => AuthMode::Certificates,
            None if self.insecure_plaintext => AuthMode::None,
            None => {
                return Err(ScalerError::config(
                    "--auth",
                    "(not given)",
                    "a way to authenticate agents and clients: --auth-file FILE, --tls-client-ca FILE, or --auth none",
                ));
            }
        };
        if mode == AuthMode::Kubernetes && !kubernetes {
            return Err(ScalerError::config(
                "--auth",
                "kubernetes",
                "only with --kubernetes; standalone, use --auth-file or --tls-client-ca",
            ));
        }
        let mut auth = AuthConfig::with_mode(mode);
        if self.token_audience.is_empty() {
            return Err(ScalerError::config(
                "--token-audience",
                "",
                "a non-empty audience",
            ));
        }
        auth.audience = self.token_audience.clone();
        auth.agent_service_account = parse_service_account(&self.agent_service_account)
            .map_err(|e| ScalerError::config("--agent-service-account", "", e))?;
        Ok(auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Vec<WorkloadDef>, ScalerError> {
        let file = ScalerFile::parse(yaml).map_err(|message| ScalerError::ConfigFile {
            path: "test".into(),
            message,
        })?;
        file.workloads(Path::new("."))
    }

    #[test]
    fn documented_example_parses() {
        let doc = include_str!("config.rs");
        let start = doc.find("//! ```yaml").expect("example") + "//! ```yaml".len();
        let end = start + doc[start..].find("//! ```").expect("end");
        let yaml: String = doc[start..end]
            .lines()
            .map(|l| {
                l.strip_prefix("//! ")
                    .or_else(|| l.strip_prefix("//!"))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let file = ScalerFile::parse(&yaml).expect("example parses");
        assert_eq!(file.tick, Some(Duration::from_secs(2)));
        assert_eq!(
            file.completeness
                .as_ref()
                .and_then(|c| c.min_reporting_share),
            Some(1.0)
        );
        let workloads = file.workloads(Path::new(".")).expect("example is valid");
        assert_eq!(workloads.len(), 2);
        assert!(matches!(workloads[0].decider, DeciderConfig::Policy { .. }));
        match &workloads[1].decider {
            DeciderConfig::Proportional(p) => {
                assert_eq!(p.capacity_tokens_per_second, 2500.0);
                assert_eq!(p.target_utilization, 0.8);
                assert_eq!(p.scale_down_stabilization, Duration::from_secs(60));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field_and_what_is_allowed() {
        let e = parse("workloads: [{name: Chat, engines: {model: m}, proportional: {capacityTokensPerSecond: 1, maxReplicas: 2}}]")
            .expect_err("uppercase");
        assert!(e.to_string().contains("workloads[0].name"), "{e}");
        let e = parse("workloads: [{name: chat, engines: {}, proportional: {capacityTokensPerSecond: 1, maxReplicas: 2}}]")
            .expect_err("no selector");
        assert!(e.to_string().contains("workloads[0].engines"), "{e}");
        let e = parse("workloads: [{name: chat, engines: {model: m}, proportional: {capacityTokensPerSecond: -1, maxReplicas: 2}}]")
            .expect_err("negative capacity");
        assert!(
            e.to_string()
                .contains("proportional.capacityTokensPerSecond"),
            "{e}"
        );
        let e = parse("workloads: [{name: chat, engines: {model: m}}]").expect_err("no decider");
        assert!(e.to_string().contains("exactly one of"), "{e}");
        let e = parse("workloads: [{name: chat, engines: {model: m}, proportional: {capacityTokensPerSecond: 1, maxReplicas: 2, colour: red}}]")
            .expect_err("unknown field");
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse("tick: soon").expect_err("bad duration");
        assert!(e.to_string().contains("soon"), "{e}");
    }

    fn file_error(yaml: &str) -> String {
        ScalerFile::parse(yaml).expect_err("rejected")
    }

    #[test]
    fn unknown_fields_are_named_with_their_closest_known_name() {
        let err = file_error(
            "workloads:\n- name: chat\n  engines: {model: m}\n  policy:\n    target: {name: chat}\n    maxReplicas: 8\n    minReplica: 2\n",
        );
        assert!(
            err.contains("unknown field `minReplica` at workloads[0].policy.minReplica")
                && err.contains("did you mean `minReplicas`?"),
            "{err}"
        );
        // Nested below the policy's top level.
        let err = file_error(
            "workloads:\n- name: chat\n  engines: {model: m}\n  policy:\n    target: {name: chat}\n    maxReplicas: 8\n    slo: {ttft: {thresholdSeconds: 1, percentil: 0.9}}\n",
        );
        assert!(
            err.contains("workloads[0].policy.slo.ttft.percentil")
                && err.contains("did you mean `percentile`?"),
            "{err}"
        );
        let err = file_error("tik: 2s\n");
        assert!(
            err.contains("unknown field `tik`") && err.contains("did you mean `tick`?"),
            "{err}"
        );
        let err = file_error(
            "workloads: [{name: chat, engines: {model: m}, proportional: {capacityTokensPerSecond: 1, maxReplica: 2}}]\n",
        );
        assert!(
            err.contains("did you mean `maxReplicas`?") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_is_rejected_with_a_depth_error() {
        let text = format!("workloads: {}", "[".repeat(200 * 1024));
        let err = file_error(&text);
        assert!(err.contains("nesting depth exceeds 64"), "{err}");
    }

    #[test]
    fn bad_values_are_echoed_as_a_bounded_prefix() {
        let huge = "x".repeat(10 * 1024 * 1024);
        let err = file_error(&format!("tick: {huge}\n"));
        assert!(
            err.len() < 1024 && err.contains("tick"),
            "{} bytes: {}",
            err.len(),
            &err[..err.len().min(300)]
        );
        let err = parse(&format!(
            "workloads: [{{name: {huge}, engines: {{model: m}}, proportional: {{capacityTokensPerSecond: 1, maxReplicas: 2}}}}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.len() < 1024 && err.contains("workloads[0].name"),
            "{} bytes",
            err.len()
        );
    }

    #[test]
    fn file_errors_name_the_file_and_its_size_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scaler.yaml");
        let path_s = path.to_str().expect("utf-8");
        let to_config = |yaml: &[u8]| {
            std::fs::write(&path, yaml).expect("write");
            args(&["--config", path_s, "--insecure-plaintext", "--auth", "none"])
                .expect("flags")
                .to_config()
                .expect_err("rejected")
                .to_string()
        };
        for (yaml, what) in [
            (&b"tick: 1ms\n"[..], "invalid tick"),
            (&b"window: 2h\n"[..], "invalid window"),
            (
                &b"workloads: [{name: a, engines: {model: m}, proportional: {capacityTokensPerSecond: 1, maxReplicas: 2}}, {name: a, engines: {model: m}, proportional: {capacityTokensPerSecond: 1, maxReplicas: 2}}]\n"[..],
                "each workload once",
            ),
            (&b"tick: [\n"[..], "line"),
            (&b"\xff\xfe\n"[..], "not UTF-8"),
        ] {
            let err = to_config(yaml);
            assert!(err.starts_with(&format!("--config {path_s}: ")) && err.contains(what), "{err}");
        }
        let mut big = b"# padding\n".repeat(110 * 1024);
        big.extend_from_slice(b"tick: 2s\n");
        let err = to_config(&big);
        assert!(
            err.contains(path_s) && err.contains("larger than 1048576 bytes"),
            "{err}"
        );
        let err = args(&["--config", "/nonexistent/scaler.yaml"])
            .expect("flags")
            .to_config()
            .expect_err("missing")
            .to_string();
        assert!(err.contains("/nonexistent/scaler.yaml"), "{err}");
    }

    #[test]
    fn the_reporting_share_is_read_from_the_file_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scaler.yaml");
        let path_s = path.to_str().expect("utf-8");
        let to_config = |yaml: &str| {
            std::fs::write(&path, yaml).expect("write");
            args(&["--config", path_s, "--insecure-plaintext", "--auth", "none"])
                .expect("flags")
                .to_config()
        };
        let config = to_config("").expect("no completeness section");
        assert_eq!(
            config.min_reporting_share, 1.0,
            "the default holds on any missing replica"
        );
        let config = to_config("completeness: {minReportingShare: 0.9}\n").expect("valid");
        assert_eq!(config.min_reporting_share, 0.9);
        for bad in ["0.3", "1.5", "0", ".nan"] {
            let err = to_config(&format!("completeness: {{minReportingShare: {bad}}}\n"))
                .expect_err(bad)
                .to_string();
            assert!(
                err.starts_with(&format!("--config {path_s}: "))
                    && err.contains("completeness.minReportingShare")
                    && err.contains("0.5..=1"),
                "{bad}: {err}"
            );
        }
        let err = to_config("completeness: {minReportingShares: 0.9}\n")
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("did you mean `minReportingShare`?"), "{err}");
    }

    #[test]
    fn expected_nodes_are_read_from_the_file_and_checked() {
        let parse_nodes = |yaml: &str| {
            let file = ScalerFile::parse(yaml).expect("parses");
            let mut config = ScalerConfig::new("127.0.0.1:0".parse().expect("addr"));
            file.apply(&mut config, Path::new(".")).map(|()| config)
        };
        let config = parse_nodes("expectedNodes: [node-a, gpu-1.example]\n").expect("valid");
        assert_eq!(
            config.expected_nodes,
            BTreeSet::from([
                gpuscale_core::NodeName::new("node-a"),
                gpuscale_core::NodeName::new("gpu-1.example")
            ])
        );
        assert!(parse_nodes("").expect("valid").expected_nodes.is_empty());
        for (yaml, what) in [
            ("expectedNodes: [node-a, Node_B]\n", "expectedNodes[1]"),
            ("expectedNodes: [node-a, node-a]\n", "each node once"),
            ("expectedNodes: ['']\n", "expectedNodes[0]"),
        ] {
            let err = parse_nodes(yaml).expect_err(yaml).to_string();
            assert!(err.contains(what), "{yaml}: {err}");
        }
        // Meaningless in Kubernetes mode: said so.
        let config = parse_nodes("expectedNodes: [node-a]\n").expect("valid");
        let warnings = config.warnings(true, None);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("expectedNodes is ignored")),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_standalone_config_with_no_workloads_is_warned_about() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.yaml");
        std::fs::write(&path, "").expect("write");
        let a = args(&[
            "--config",
            path.to_str().expect("utf-8"),
            "--insecure-plaintext",
            "--auth",
            "none",
        ])
        .expect("flags");
        let config = a.to_config().expect("an empty file is valid");
        let warnings = config.warnings(false, Some(&path));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("no workloads") && warnings[0].contains("empty.yaml"),
            "{warnings:?}"
        );
        // In Kubernetes mode the workloads come from custom resources.
        assert!(config.warnings(true, Some(&path)).is_empty());
    }

    fn args(extra: &[&str]) -> Result<ScalerArgs, clap::Error> {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            scaler: ScalerArgs,
        }
        let mut all = vec!["test"];
        all.extend_from_slice(extra);
        Cli::try_parse_from(all).map(|c| c.scaler)
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let a = args(&[
            "--listen",
            "7070",
            "--metrics-addr",
            "off",
            "--insecure-plaintext",
        ])
        .expect("parse");
        let e = a.to_config().expect_err("no host").to_string();
        assert!(e.contains("--listen") && e.contains("IP:port"), "{e}");
        let a = args(&[
            "--listen",
            "127.0.0.1:0",
            "--node-ttl",
            "1ms",
            "--insecure-plaintext",
        ])
        .expect("parse");
        let e = a.to_config().expect_err("ttl").to_string();
        assert!(e.contains("--node-ttl"), "{e}");
        let a = args(&[
            "--listen",
            "127.0.0.1:0",
            "--max-watchers",
            "0",
            "--insecure-plaintext",
        ])
        .expect("parse");
        let e = a.to_config().expect_err("no watchers").to_string();
        assert!(
            e.contains("--max-watchers") && e.contains("1..=100000"),
            "{e}"
        );
    }

    #[test]
    fn plaintext_and_no_authentication_need_to_be_asked_for() {
        let e = args(&["--listen", "127.0.0.1:0"])
            .expect("parse")
            .to_config()
            .expect_err("no TLS")
            .to_string();
        assert!(
            e.contains("--tls-cert") && e.contains("--insecure-plaintext"),
            "{e}"
        );
        let c = args(&["--insecure-plaintext"])
            .expect("parse")
            .to_config()
            .expect("plaintext");
        assert_eq!(c.transport, Transport::Plaintext);
        assert_eq!(c.auth.mode, AuthMode::None);
        let e = args(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .expect("parse")
            .to_config()
            .expect_err("no auth")
            .to_string();
        assert!(e.contains("--auth") && e.contains("--auth-file"), "{e}");
        let c = args(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
        ])
        .expect("parse")
        .to_config()
        .expect("certificates");
        assert_eq!(c.auth.mode, AuthMode::Certificates);
        let c = args(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .expect("parse")
            .to_config_for(true)
            .expect("kubernetes");
        assert_eq!(c.auth.mode, AuthMode::Kubernetes);
        assert_eq!(
            c.auth.agent_user(),
            "system:serviceaccount:gpuscale-system:gpuscale-agent"
        );
        let e = args(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--auth",
            "kubernetes",
        ])
        .expect("parse")
        .to_config()
        .expect_err("standalone kubernetes")
        .to_string();
        assert!(e.contains("--kubernetes"), "{e}");
        assert!(
            args(&["--tls-cert", "c.pem"]).is_err(),
            "a certificate needs its key"
        );
        let e = args(&["--insecure-plaintext", "--auth", "sometimes"])
            .expect("parse")
            .to_config()
            .expect_err("mode")
            .to_string();
        assert!(e.contains("--auth") && e.contains("sometimes"), "{e}");
    }

    #[test]
    fn selector_matches_model_and_namespace() {
        let s = EngineSelector {
            model: Some("m".into()),
            namespace: None,
        };
        assert!(s.matches("m", "any"));
        assert!(!s.matches("other", "any"));
        let s = EngineSelector {
            model: Some("m".into()),
            namespace: Some("prod".into()),
        };
        assert!(!s.matches("m", "dev"));
    }
}
