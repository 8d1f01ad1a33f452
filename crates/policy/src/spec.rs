//! The workload spec: what a user writes (the `spec` of an
//! `InferenceAutoscaler`), and its validation into a [`WorkloadConfig`].
//!
//! Field names are camelCase as in any Kubernetes resource. Every field but
//! `target` and `maxReplicas` has a default; the defaults are listed on each
//! field and tested (`documented_defaults_hold`). Unknown fields are accepted
//! (not denied) so that tools that add fields (`kubectl`, server-side apply,
//! newer CRD versions) do not break older controllers.
//!
//! ```yaml
//! target: {apiVersion: apps/v1, kind: Deployment, name: llama-8b}
//! slo:
//!   ttft: {thresholdSeconds: 2, percentile: 95}   # perInputTokenSeconds: 0.00004 for long prompts
//!   itl: {thresholdSeconds: 0.05, percentile: 95}
//! minReplicas: 1
//! maxReplicas: 20
//! gpuType: H200
//! performanceModel: {preset: h200-llama3-8b-bf16}
//! coldStartSeconds: 90
//! schedules:
//!   - {name: office, start: "0 8 * * MON-FRI", end: "0 18 * * MON-FRI",
//!      timeZone: Europe/Berlin, minReplicas: 10}
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{
    LatencyObjective, PerfModelSource, PredictiveConfig, ProtectionConfig, ReactiveConfig,
    WorkloadConfig,
};
use crate::cron::CronExpr;
use crate::error::SpecError;
use crate::hpa::{self, Behavior, ScalingPolicy, ScalingPolicyKind, ScalingRules, SelectPolicy};
use crate::perf::{self, PerfModel, ProfileFormat};
use crate::schedule::ScheduleRule;

/// The workload spec (the custom resource's `spec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The scale target: anything with a `/scale` subresource.
    pub target: TargetRef,
    /// Latency objectives. Default: p95 TTFT ≤ 2 s, p95 ITL ≤ 50 ms.
    #[serde(default)]
    pub slo: SloSpec,
    /// Fewest replicas. Default 1; 0 allows scale to zero.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
    /// The idle policy when `minReplicas` is 0 (docs/activator.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero: Option<crate::idle::ScaleToZeroSpec>,
    /// Most replicas (required, at least 1 and at least `minReplicas`).
    pub max_replicas: u32,
    /// GPU type of the replicas (e.g. `H200`); when set, it must match the
    /// performance model's GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// GPUs per replica. Default 1.
    #[serde(default = "default_gpus_per_replica")]
    pub gpus_per_replica: u32,
    /// Where the performance model comes from (one of preset, profileFile,
    /// profileCsv, coefficients).
    #[serde(default)]
    pub performance_model: PerformanceModelSpec,
    /// Expected time from creating a replica to it serving, seconds, until
    /// the replicas' own start-ups are learned (their p90 then replaces
    /// it): the forecast horizon and the time capacity in flight needs.
    /// Default 120.
    #[serde(default = "default_cold_start_seconds")]
    pub cold_start_seconds: f64,
    /// HPA-style scale-up and scale-down behaviour.
    #[serde(default)]
    pub behavior: BehaviorSpec,
    /// No scale-in until this long after the last scale event, seconds. Default 0.
    #[serde(default)]
    pub cooldown_seconds: u32,
    /// Cron windows setting min/max/desired while open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleSpec>,
    /// Predictive scaling (a seasonal forecast as a floor).
    #[serde(default)]
    pub predictive: PredictiveSpec,
    /// Which replicas may never be chosen for scale-in.
    #[serde(default)]
    pub scale_in_protection: ScaleInProtectionSpec,
    /// Compute and publish decisions, never act on them. Default false.
    #[serde(default)]
    pub advisory: bool,
    /// Fraction of the ITL SLO kept free when choosing the batch limit, and
    /// of both SLOs when sizing replicas (0 ≤ margin < 0.9). Default 0.1.
    #[serde(default = "default_batch_limit_margin")]
    pub batch_limit_margin: f64,
    /// Scale-in hysteresis (0 ≤ margin < 0.9): replicas are removed only
    /// down to a count that serves the load raised by this fraction within
    /// the SLOs reduced by it (on top of `batchLimitMargin`). Default 0.15.
    #[serde(default = "default_consolidation_margin")]
    pub consolidation_margin: f64,
    /// Reactive control windows.
    #[serde(default)]
    pub reactive: ReactiveSpec,
    /// Telemetry freshness.
    #[serde(default)]
    pub telemetry: TelemetrySpec,
}

/// A scale target by API version, kind and name (same namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Default `apps/v1`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Default `Deployment`.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub name: String,
}

/// Latency objectives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// Time to first token. Default p95 ≤ 2 s.
    #[serde(default = "default_ttft")]
    pub ttft: TtftSloSpec,
    /// Inter-token latency (time per output token of a request). Default p95 ≤ 50 ms.
    #[serde(default = "default_itl")]
    pub itl: LatencySloSpec,
}

/// The time-to-first-token objective: the `percentile`-th percentile at most
/// `thresholdSeconds`, plus `perInputTokenSeconds` for every prompt token
/// (the way long-prompt services state it: a prompt's prefill grows with its
/// length, so a flat threshold either fails long prompts or is loose for
/// short ones). Each request is judged against its own allowance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TtftSloSpec {
    /// Greater than 0 and at most 3600.
    pub threshold_seconds: f64,
    /// Allowance per prompt token, seconds (0 ≤ v ≤ 0.01, e.g. 0.00004 for
    /// 40 µs). Default 0: a flat threshold.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub per_input_token_seconds: f64,
    /// Percentile, 50 ≤ p < 100 (e.g. 95, 99, 99.9). Default 95.
    #[serde(default = "default_percentile")]
    pub percentile: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// One latency objective: the `percentile`-th percentile at most `thresholdSeconds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencySloSpec {
    /// Greater than 0 and at most 3600.
    pub threshold_seconds: f64,
    /// Percentile, 50 ≤ p < 100 (e.g. 95, 99, 99.9). Default 95.
    #[serde(default = "default_percentile")]
    pub percentile: f64,
}

/// Where the performance model comes from: exactly one of the four sources,
/// plus optional overrides of the replica's KV capacity and batch ceiling.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PerformanceModelSpec {
    /// A shipped preset (see `gpuscale_policy::perf::PRESET_NAMES`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A profile file in gpuscale's profile format, read by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_file: Option<String>,
    /// A profile in gpuscale's profile format, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_csv: Option<String>,
    /// The model's coefficients, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coefficients: Option<PerfCoefficientsSpec>,
    /// Override the replica's KV-cache capacity, tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_capacity_tokens: Option<f64>,
    /// Override the engine's batch ceiling (`max_num_seqs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
}

/// A performance model's coefficients (see `gpuscale_policy::PerfModel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PerfCoefficientsSpec {
    pub decode_base_seconds: f64,
    pub decode_per_seq_seconds: f64,
    pub decode_per_seq_token_seconds: f64,
    #[serde(default)]
    pub decode_per_seq_squared_seconds: f64,
    pub prefill_base_seconds: f64,
    pub prefill_per_token_seconds: f64,
    #[serde(default)]
    pub prefill_per_token_squared_seconds: f64,
    pub kv_capacity_tokens: f64,
    /// Default 256.
    #[serde(default = "default_max_batch")]
    pub max_batch: u32,
}

/// HPA `behavior`: rules per direction. Unset fields take gpuscale's defaults
/// (see [`Behavior::gpuscale_default`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BehaviorSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRulesSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRulesSpec>,
}

/// HPA `HPAScalingRules`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRulesSpec {
    /// 0..=3600 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stabilization_window_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_policy: Option<SelectPolicy>,
    /// At least one unless `selectPolicy` is `Disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<ScalingPolicySpec>>,
    /// 0 ≤ tolerance < 1 (scale-down) or ≤ 10 (scale-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
}

/// HPA `HPAScalingPolicy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicySpec {
    #[serde(rename = "type")]
    pub kind: ScalingPolicyKind,
    /// Greater than 0.
    pub value: u32,
    /// 1..=1800 seconds.
    pub period_seconds: u32,
}

/// A cron window. Open from a minute `start` matches until a minute `end`
/// matches, on the wall clock of `timeZone`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    pub name: String,
    /// Five-field cron expression (minute hour day-of-month month day-of-week).
    pub start: String,
    /// Five-field cron expression; must differ from `start`.
    pub end: String,
    /// IANA time zone, e.g. `Europe/Berlin`. Default `UTC`.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<u32>,
}

/// Whether the forecast acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
pub enum PredictiveMode {
    /// The forecast is a floor on replicas (never a reason to scale in).
    #[default]
    On,
    /// The forecast is computed and published, never acted on.
    ForecastOnly,
    /// No forecast.
    Off,
}

/// Predictive scaling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PredictiveSpec {
    /// Default `On`.
    #[serde(default)]
    pub mode: PredictiveMode,
    /// How far ahead the floor looks, seconds. Default: the learned p90
    /// start-up (`coldStartSeconds` until one is seen) plus 60 (one cold
    /// start and a minute of margin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon_seconds: Option<u32>,
    /// Arrival history kept, days (1..=56). Default 14.
    #[serde(default = "default_history_days")]
    pub history_days: u32,
    /// History needed before the forecast acts, hours (1..=history). Default 24.
    #[serde(default = "default_min_history_hours")]
    pub min_history_hours: u32,
    /// Width of one history bucket, seconds (60..=3600, dividing a day). Default 600.
    #[serde(default = "default_bucket_seconds")]
    pub bucket_seconds: u32,
}

/// Scale-in protection. Replicas annotated
/// `gpuscale.dev/scale-in-protection: "true"` are never victims.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleInProtectionSpec {
    /// Replicas younger than this are never victims either, seconds. Default 0.
    #[serde(default)]
    pub min_replica_age_seconds: u32,
}

/// Reactive control windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactiveSpec {
    /// Arrival rates are averaged over this window for sizing, and a panic
    /// lasts at least this long, seconds (6..=3600). Default 60.
    #[serde(default = "default_stable_window_seconds")]
    pub stable_window_seconds: u32,
}

/// Telemetry freshness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// Telemetry older than this is stale and the policy holds, seconds
    /// (1..=3600). Default 60.
    #[serde(default = "default_stale_after_seconds")]
    pub stale_after_seconds: u32,
}

fn default_min_replicas() -> u32 {
    1
}
fn default_gpus_per_replica() -> u32 {
    1
}
fn default_cold_start_seconds() -> f64 {
    120.0
}
fn default_batch_limit_margin() -> f64 {
    0.1
}
fn default_consolidation_margin() -> f64 {
    0.15
}
fn default_api_version() -> String {
    "apps/v1".into()
}
fn default_kind() -> String {
    "Deployment".into()
}
fn default_percentile() -> f64 {
    95.0
}
fn default_ttft() -> TtftSloSpec {
    TtftSloSpec {
        threshold_seconds: 2.0,
        per_input_token_seconds: 0.0,
        percentile: 95.0,
    }
}
fn default_itl() -> LatencySloSpec {
    LatencySloSpec {
        threshold_seconds: 0.05,
        percentile: 95.0,
    }
}
fn default_max_batch() -> u32 {
    256
}
fn default_time_zone() -> String {
    "UTC".into()
}
fn default_history_days() -> u32 {
    14
}
fn default_min_history_hours() -> u32 {
    24
}
fn default_bucket_seconds() -> u32 {
    600
}
fn default_stable_window_seconds() -> u32 {
    60
}
fn default_stale_after_seconds() -> u32 {
    60
}

impl Default for SloSpec {
    fn default() -> Self {
        Self {
            ttft: default_ttft(),
            itl: default_itl(),
        }
    }
}

impl Default for PredictiveSpec {
    fn default() -> Self {
        Self {
            mode: PredictiveMode::On,
            horizon_seconds: None,
            history_days: default_history_days(),
            min_history_hours: default_min_history_hours(),
            bucket_seconds: default_bucket_seconds(),
        }
    }
}

impl Default for ReactiveSpec {
    fn default() -> Self {
        Self {
            stable_window_seconds: default_stable_window_seconds(),
        }
    }
}

impl Default for TelemetrySpec {
    fn default() -> Self {
        Self {
            stale_after_seconds: default_stale_after_seconds(),
        }
    }
}

impl WorkloadSpec {
    /// A spec with every default, for `target` (a Deployment in the same
    /// namespace), `max_replicas` and a performance-model preset.
    pub fn new(target_name: &str, max_replicas: u32, preset: &str) -> Self {
        Self {
            target: TargetRef {
                api_version: default_api_version(),
                kind: default_kind(),
                name: target_name.into(),
            },
            slo: SloSpec::default(),
            min_replicas: default_min_replicas(),
            scale_to_zero: None,
            max_replicas,
            gpu_type: None,
            gpus_per_replica: default_gpus_per_replica(),
            performance_model: PerformanceModelSpec {
                preset: Some(preset.into()),
                ..Default::default()
            },
            cold_start_seconds: default_cold_start_seconds(),
            behavior: BehaviorSpec::default(),
            cooldown_seconds: 0,
            schedules: Vec::new(),
            predictive: PredictiveSpec::default(),
            scale_in_protection: ScaleInProtectionSpec::default(),
            advisory: false,
            batch_limit_margin: default_batch_limit_margin(),
            consolidation_margin: default_consolidation_margin(),
            reactive: ReactiveSpec::default(),
            telemetry: TelemetrySpec::default(),
        }
    }

    /// Validate every field, returning the validated configuration or the
    /// first error, which names the field path (from `spec.`), the value and
    /// what is allowed.
    pub fn validate(&self) -> Result<WorkloadConfig, SpecError> {
        let t = &self.target;
        if t.name.trim().is_empty() {
            return Err(SpecError::invalid(
                "spec.target.name",
                format!("{:?}", t.name),
                "a non-empty object name",
            ));
        }
        if t.kind.trim().is_empty() {
            return Err(SpecError::invalid(
                "spec.target.kind",
                format!("{:?}", t.kind),
                "a non-empty kind, e.g. Deployment",
            ));
        }
        if t.api_version.trim().is_empty() {
            return Err(SpecError::invalid(
                "spec.target.apiVersion",
                format!("{:?}", t.api_version),
                "a non-empty apiVersion, e.g. apps/v1",
            ));
        }
        let (ttft, per_token) = ttft_objective(&self.slo.ttft)?;
        let itl = latency_objective(&self.slo.itl, "spec.slo.itl")?;
        if self.max_replicas < 1 {
            return Err(SpecError::invalid(
                "spec.maxReplicas",
                self.max_replicas,
                "at least 1",
            ));
        }
        if self.min_replicas > self.max_replicas {
            return Err(SpecError::invalid(
                "spec.minReplicas",
                self.min_replicas,
                format!("at most maxReplicas ({})", self.max_replicas),
            ));
        }
        if !(1..=64).contains(&self.gpus_per_replica) {
            return Err(SpecError::invalid(
                "spec.gpusPerReplica",
                self.gpus_per_replica,
                "1..=64",
            ));
        }
        let perf_source = perf_source(&self.performance_model)?;
        if let (Some(gpu), PerfModelSource::Preset { name, .. }) = (&self.gpu_type, &perf_source)
            && let Some(model) = perf::preset(name)
        {
            if !model.gpu.eq_ignore_ascii_case(gpu) {
                return Err(SpecError::invalid(
                    "spec.gpuType",
                    gpu,
                    format!("{} (the GPU of preset {name})", model.gpu),
                ));
            }
            if model.gpus_per_replica != self.gpus_per_replica {
                return Err(SpecError::invalid(
                    "spec.gpusPerReplica",
                    self.gpus_per_replica,
                    format!(
                        "{} (the GPUs per replica of preset {name})",
                        model.gpus_per_replica
                    ),
                ));
            }
        }
        if !(self.cold_start_seconds.is_finite()
            && (0.0..=7200.0).contains(&self.cold_start_seconds))
        {
            return Err(SpecError::invalid(
                "spec.coldStartSeconds",
                self.cold_start_seconds,
                "0..=7200 seconds",
            ));
        }
        let behavior = behavior(&self.behavior)?;
        if self.cooldown_seconds > 3600 {
            return Err(SpecError::invalid(
                "spec.cooldownSeconds",
                self.cooldown_seconds,
                "0..=3600 seconds",
            ));
        }
        let mut schedules = Vec::with_capacity(self.schedules.len());
        for (i, s) in self.schedules.iter().enumerate() {
            schedules.push(schedule_rule(s, i, self.max_replicas)?);
        }
        let predictive = predictive(&self.predictive, self.cold_start_seconds)?;
        for (path, v) in [
            ("spec.batchLimitMargin", self.batch_limit_margin),
            ("spec.consolidationMargin", self.consolidation_margin),
        ] {
            if !(v.is_finite() && (0.0..0.9).contains(&v)) {
                return Err(SpecError::invalid(path, v, "0 ≤ margin < 0.9"));
            }
        }
        let sw = self.reactive.stable_window_seconds;
        if !(6..=3600).contains(&sw) {
            return Err(SpecError::invalid(
                "spec.reactive.stableWindowSeconds",
                sw,
                "6..=3600 seconds",
            ));
        }
        let stale = self.telemetry.stale_after_seconds;
        if !(1..=3600).contains(&stale) {
            return Err(SpecError::invalid(
                "spec.telemetry.staleAfterSeconds",
                stale,
                "1..=3600 seconds",
            ));
        }
        Ok(WorkloadConfig {
            target: self.target.clone(),
            ttft,
            ttft_per_input_token_s: per_token,
            itl,
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            gpu_type: self.gpu_type.clone(),
            gpus_per_replica: self.gpus_per_replica,
            perf_source,
            cold_start_s: self.cold_start_seconds,
            behavior,
            cooldown_s: f64::from(self.cooldown_seconds),
            schedules,
            predictive,
            protection: ProtectionConfig {
                min_replica_age_s: f64::from(self.scale_in_protection.min_replica_age_seconds),
            },
            advisory: self.advisory,
            batch_limit_margin: self.batch_limit_margin,
            consolidation_margin: self.consolidation_margin,
            reactive: ReactiveConfig {
                stable_window_s: f64::from(sw),
            },
            stale_after_s: f64::from(stale),
            scale_to_zero: self.scale_to_zero.clone().unwrap_or_default().validate()?,
        })
    }
}

/// The TTFT objective and its allowance per prompt token, seconds.
fn ttft_objective(t: &TtftSloSpec) -> Result<(LatencyObjective, f64), SpecError> {
    let ttft = latency_objective(
        &LatencySloSpec {
            threshold_seconds: t.threshold_seconds,
            percentile: t.percentile,
        },
        "spec.slo.ttft",
    )?;
    let per_token = t.per_input_token_seconds;
    if !(per_token.is_finite() && (0.0..=0.01).contains(&per_token)) {
        return Err(SpecError::invalid(
            "spec.slo.ttft.perInputTokenSeconds",
            per_token,
            "0 ≤ seconds per prompt token ≤ 0.01",
        ));
    }
    Ok((ttft, per_token))
}

fn latency_objective(s: &LatencySloSpec, path: &str) -> Result<LatencyObjective, SpecError> {
    if !(s.threshold_seconds.is_finite()
        && s.threshold_seconds > 0.0
        && s.threshold_seconds <= 3600.0)
    {
        return Err(SpecError::invalid(
            format!("{path}.thresholdSeconds"),
            s.threshold_seconds,
            "greater than 0 and at most 3600 seconds",
        ));
    }
    if !(s.percentile.is_finite() && (50.0..100.0).contains(&s.percentile)) {
        return Err(SpecError::invalid(
            format!("{path}.percentile"),
            s.percentile,
            "50 ≤ percentile < 100",
        ));
    }
    Ok(LatencyObjective {
        threshold_s: s.threshold_seconds,
        quantile: s.percentile / 100.0,
    })
}

fn perf_source(p: &PerformanceModelSpec) -> Result<PerfModelSource, SpecError> {
    let set = [
        p.preset.is_some(),
        p.profile_file.is_some(),
        p.profile_csv.is_some(),
        p.coefficients.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        return Err(SpecError::invalid(
            "spec.performanceModel",
            format!("{set} sources"),
            "exactly one of preset, profileFile, profileCsv, coefficients",
        ));
    }
    if let Some(kv) = p.kv_capacity_tokens
        && !(kv.is_finite() && kv >= 1.0)
    {
        return Err(SpecError::invalid(
            "spec.performanceModel.kvCapacityTokens",
            kv,
            "at least 1 token",
        ));
    }
    if let Some(b) = p.max_batch
        && !(1..=65_536).contains(&b)
    {
        return Err(SpecError::invalid(
            "spec.performanceModel.maxBatch",
            b,
            "1..=65536",
        ));
    }
    let overrides = crate::config::PerfOverrides {
        kv_capacity_tokens: p.kv_capacity_tokens,
        max_batch: p.max_batch,
    };
    if let Some(name) = &p.preset {
        if !perf::PRESET_NAMES.contains(&name.as_str()) {
            return Err(SpecError::UnknownPreset {
                path: "spec.performanceModel.preset".into(),
                name: name.clone(),
                known: perf::PRESET_NAMES.join(", "),
            });
        }
        return Ok(PerfModelSource::Preset {
            name: name.clone(),
            overrides,
        });
    }
    if let Some(path) = &p.profile_file {
        if path.trim().is_empty() {
            return Err(SpecError::invalid(
                "spec.performanceModel.profileFile",
                "\"\"",
                "a file path",
            ));
        }
        return Ok(PerfModelSource::ProfileFile {
            path: path.clone(),
            overrides,
        });
    }
    let mut model = match (&p.profile_csv, &p.coefficients) {
        (Some(csv), _) => PerfModel::from_profile_csv(csv, &ProfileFormat::Gpuscale)?,
        (None, Some(c)) => coefficients(c)?,
        (None, None) => {
            return Err(SpecError::invalid(
                "spec.performanceModel",
                "no source",
                "exactly one of preset, profileFile, profileCsv, coefficients",
            ));
        }
    };
    overrides.apply(&mut model);
    Ok(PerfModelSource::Inline(model))
}

fn coefficients(c: &PerfCoefficientsSpec) -> Result<PerfModel, SpecError> {
    let base = "spec.performanceModel.coefficients";
    for (name, v) in [
        ("decodeBaseSeconds", c.decode_base_seconds),
        ("decodePerSeqSeconds", c.decode_per_seq_seconds),
        ("decodePerSeqTokenSeconds", c.decode_per_seq_token_seconds),
        (
            "decodePerSeqSquaredSeconds",
            c.decode_per_seq_squared_seconds,
        ),
        ("prefillBaseSeconds", c.prefill_base_seconds),
        ("prefillPerTokenSeconds", c.prefill_per_token_seconds),
        (
            "prefillPerTokenSquaredSeconds",
            c.prefill_per_token_squared_seconds,
        ),
    ] {
        if !(v.is_finite() && (0.0..=60.0).contains(&v)) {
            return Err(SpecError::invalid(
                format!("{base}.{name}"),
                v,
                "0..=60 seconds",
            ));
        }
    }
    if c.decode_base_seconds + c.decode_per_seq_seconds + c.decode_per_seq_token_seconds <= 0.0 {
        return Err(SpecError::invalid(
            format!("{base}.decodeBaseSeconds"),
            c.decode_base_seconds,
            "a decode step that takes time (some decode coefficient > 0)",
        ));
    }
    if c.prefill_base_seconds + c.prefill_per_token_seconds <= 0.0 {
        return Err(SpecError::invalid(
            format!("{base}.prefillBaseSeconds"),
            c.prefill_base_seconds,
            "a prefill that takes time (some prefill coefficient > 0)",
        ));
    }
    if !(c.kv_capacity_tokens.is_finite() && c.kv_capacity_tokens >= 1.0) {
        return Err(SpecError::invalid(
            format!("{base}.kvCapacityTokens"),
            c.kv_capacity_tokens,
            "at least 1 token",
        ));
    }
    if !(1..=65_536).contains(&c.max_batch) {
        return Err(SpecError::invalid(
            format!("{base}.maxBatch"),
            c.max_batch,
            "1..=65536",
        ));
    }
    Ok(PerfModel {
        name: "inline".into(),
        gpu: String::new(),
        gpus_per_replica: 1,
        decode_base_s: c.decode_base_seconds,
        decode_per_seq_s: c.decode_per_seq_seconds,
        decode_per_seq_token_s: c.decode_per_seq_token_seconds,
        decode_per_seq_sq_s: c.decode_per_seq_squared_seconds,
        prefill_base_s: c.prefill_base_seconds,
        prefill_per_token_s: c.prefill_per_token_seconds,
        prefill_per_token_sq_s: c.prefill_per_token_squared_seconds,
        kv_capacity_tokens: c.kv_capacity_tokens,
        max_batch: c.max_batch,
    })
}

impl Behavior {
    /// gpuscale's default behaviour. Scale-up: no stabilization window,
    /// `Max` of 100 pods and 1000% per 15 s (a large shortfall is met in one
    /// step; `maxReplicas` is the real bound), tolerance 0 (the sizing
    /// already carries its margin). Scale-down: HPA's 300 s window and 100%
    /// per 15 s, tolerance 0 (the consolidation check is the hysteresis).
    pub fn gpuscale_default() -> Self {
        Self {
            scale_up: ScalingRules {
                stabilization_window_s: 0,
                select_policy: SelectPolicy::Max,
                policies: vec![
                    ScalingPolicy {
                        kind: ScalingPolicyKind::Pods,
                        value: 100,
                        period_s: 15,
                    },
                    ScalingPolicy {
                        kind: ScalingPolicyKind::Percent,
                        value: 1000,
                        period_s: 15,
                    },
                ],
                tolerance: 0.0,
            },
            scale_down: ScalingRules {
                stabilization_window_s: hpa::HPA_DOWNSCALE_STABILIZATION_S,
                select_policy: SelectPolicy::Max,
                policies: vec![ScalingPolicy {
                    kind: ScalingPolicyKind::Percent,
                    value: 100,
                    period_s: 15,
                }],
                tolerance: 0.0,
            },
        }
    }
}

fn behavior(b: &BehaviorSpec) -> Result<Behavior, SpecError> {
    let defaults = Behavior::gpuscale_default();
    Ok(Behavior {
        scale_up: rules(
            b.scale_up.as_ref(),
            defaults.scale_up,
            "spec.behavior.scaleUp",
            10.0,
        )?,
        scale_down: rules(
            b.scale_down.as_ref(),
            defaults.scale_down,
            "spec.behavior.scaleDown",
            0.999,
        )?,
    })
}

fn rules(
    spec: Option<&ScalingRulesSpec>,
    default: ScalingRules,
    path: &str,
    max_tolerance: f64,
) -> Result<ScalingRules, SpecError> {
    let Some(s) = spec else {
        return Ok(default);
    };
    let window = s
        .stabilization_window_seconds
        .unwrap_or(default.stabilization_window_s);
    if window > hpa::MAX_STABILIZATION_WINDOW_S {
        return Err(SpecError::invalid(
            format!("{path}.stabilizationWindowSeconds"),
            window,
            format!("0..={} seconds", hpa::MAX_STABILIZATION_WINDOW_S),
        ));
    }
    let select_policy = s.select_policy.unwrap_or(default.select_policy);
    let policies = match &s.policies {
        None => default.policies,
        Some(ps) => {
            if ps.is_empty() && select_policy != SelectPolicy::Disabled {
                return Err(SpecError::invalid(
                    format!("{path}.policies"),
                    "[]",
                    "at least one policy unless selectPolicy is Disabled",
                ));
            }
            let mut out = Vec::with_capacity(ps.len());
            for (i, p) in ps.iter().enumerate() {
                if p.value == 0 {
                    return Err(SpecError::invalid(
                        format!("{path}.policies[{i}].value"),
                        p.value,
                        "greater than 0",
                    ));
                }
                if !(1..=hpa::MAX_PERIOD_S).contains(&p.period_seconds) {
                    return Err(SpecError::invalid(
                        format!("{path}.policies[{i}].periodSeconds"),
                        p.period_seconds,
                        format!("1..={} seconds", hpa::MAX_PERIOD_S),
                    ));
                }
                out.push(ScalingPolicy {
                    kind: p.kind,
                    value: p.value,
                    period_s: p.period_seconds,
                });
            }
            out
        }
    };
    let tolerance = s.tolerance.unwrap_or(default.tolerance);
    if !(tolerance.is_finite() && tolerance >= 0.0 && tolerance <= max_tolerance) {
        return Err(SpecError::invalid(
            format!("{path}.tolerance"),
            tolerance,
            format!("0..={max_tolerance}"),
        ));
    }
    Ok(ScalingRules {
        stabilization_window_s: window,
        select_policy,
        policies,
        tolerance,
    })
}

fn schedule_rule(s: &ScheduleSpec, i: usize, max_replicas: u32) -> Result<ScheduleRule, SpecError> {
    let path = format!("spec.schedules[{i}]");
    if s.name.trim().is_empty() {
        return Err(SpecError::invalid(
            format!("{path}.name"),
            "\"\"",
            "a non-empty name",
        ));
    }
    let start = CronExpr::parse(&s.start)
        .map_err(|e| SpecError::invalid(format!("{path}.start"), format!("{:?}", s.start), e.0))?;
    let end = CronExpr::parse(&s.end)
        .map_err(|e| SpecError::invalid(format!("{path}.end"), format!("{:?}", s.end), e.0))?;
    if start == end {
        return Err(SpecError::invalid(
            format!("{path}.end"),
            format!("{:?}", s.end),
            "an expression different from start",
        ));
    }
    let time_zone: chrono_tz::Tz = s.time_zone.parse().map_err(|_| {
        SpecError::invalid(
            format!("{path}.timeZone"),
            format!("{:?}", s.time_zone),
            "an IANA time zone name, e.g. Europe/Berlin or UTC",
        )
    })?;
    if s.min_replicas.is_none() && s.max_replicas.is_none() && s.desired_replicas.is_none() {
        return Err(SpecError::invalid(
            path.clone(),
            "no replica setting",
            "at least one of minReplicas, maxReplicas, desiredReplicas",
        ));
    }
    if let (Some(lo), Some(hi)) = (s.min_replicas, s.max_replicas)
        && lo > hi
    {
        return Err(SpecError::invalid(
            format!("{path}.minReplicas"),
            lo,
            format!("at most this rule's maxReplicas ({hi})"),
        ));
    }
    if let Some(hi) = s.max_replicas
        && hi < 1
    {
        return Err(SpecError::invalid(
            format!("{path}.maxReplicas"),
            hi,
            "at least 1",
        ));
    }
    // A schedule may raise min above spec.maxReplicas only together with its own max.
    let ceiling = s.max_replicas.unwrap_or(max_replicas);
    for (field, v) in [
        ("minReplicas", s.min_replicas),
        ("desiredReplicas", s.desired_replicas),
    ] {
        if let Some(v) = v
            && v > ceiling
        {
            return Err(SpecError::invalid(
                format!("{path}.{field}"),
                v,
                format!("at most {ceiling} (the maxReplicas in force)"),
            ));
        }
    }
    Ok(ScheduleRule {
        name: s.name.clone(),
        start,
        end,
        time_zone,
        min_replicas: s.min_replicas,
        max_replicas: s.max_replicas,
        desired_replicas: s.desired_replicas,
    })
}

fn predictive(p: &PredictiveSpec, cold_start_s: f64) -> Result<PredictiveConfig, SpecError> {
    if !(1..=56).contains(&p.history_days) {
        return Err(SpecError::invalid(
            "spec.predictive.historyDays",
            p.history_days,
            "1..=56 days",
        ));
    }
    if !(1..=p.history_days * 24).contains(&p.min_history_hours) {
        return Err(SpecError::invalid(
            "spec.predictive.minHistoryHours",
            p.min_history_hours,
            format!("1..={} hours (historyDays × 24)", p.history_days * 24),
        ));
    }
    if !(60..=3600).contains(&p.bucket_seconds) || 86_400 % p.bucket_seconds != 0 {
        return Err(SpecError::invalid(
            "spec.predictive.bucketSeconds",
            p.bucket_seconds,
            "60..=3600 seconds dividing a day (e.g. 60, 300, 600, 900, 3600)",
        ));
    }
    if let Some(h) = p.horizon_seconds
        && h > 86_400
    {
        return Err(SpecError::invalid(
            "spec.predictive.horizonSeconds",
            h,
            "0..=86400 seconds",
        ));
    }
    Ok(PredictiveConfig {
        mode: p.mode,
        horizon_s: p
            .horizon_seconds
            .map(f64::from)
            .unwrap_or(cold_start_s + 60.0),
        horizon_from_startup: p.horizon_seconds.is_none(),
        history_s: f64::from(p.history_days) * 86_400.0,
        min_history_s: f64::from(p.min_history_hours) * 3600.0,
        bucket_s: f64::from(p.bucket_seconds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_yaml() -> &'static str {
        "target: {name: llama}\nmaxReplicas: 8\nperformanceModel: {preset: h200-llama3-8b-bf16}\n"
    }

    #[test]
    fn documented_defaults_hold() {
        let spec: WorkloadSpec = serde_yaml::from_str(minimal_yaml()).unwrap();
        assert_eq!(spec, {
            let mut s = WorkloadSpec::new("llama", 8, "h200-llama3-8b-bf16");
            s.max_replicas = 8;
            s
        });
        let c = spec.validate().unwrap();
        assert_eq!(c.target.api_version, "apps/v1");
        assert_eq!(c.target.kind, "Deployment");
        assert_eq!(c.ttft.threshold_s, 2.0);
        assert_eq!(c.ttft.quantile, 0.95);
        assert_eq!(c.itl.threshold_s, 0.05);
        assert_eq!(c.itl.quantile, 0.95);
        assert_eq!(c.min_replicas, 1);
        assert_eq!(c.gpus_per_replica, 1);
        assert_eq!(c.cold_start_s, 120.0);
        assert_eq!(c.behavior, Behavior::gpuscale_default());
        assert_eq!(c.behavior.scale_down.stabilization_window_s, 300);
        assert_eq!(c.cooldown_s, 0.0);
        assert_eq!(c.predictive.mode, PredictiveMode::On);
        assert_eq!(c.predictive.horizon_s, 180.0);
        assert_eq!(c.predictive.history_s, 14.0 * 86_400.0);
        assert_eq!(c.predictive.min_history_s, 86_400.0);
        assert_eq!(c.predictive.bucket_s, 600.0);
        assert_eq!(c.protection.min_replica_age_s, 0.0);
        assert!(!c.advisory);
        assert_eq!(c.batch_limit_margin, 0.1);
        assert_eq!(c.consolidation_margin, 0.15);
        assert_eq!(c.reactive.stable_window_s, 60.0);
        assert_eq!(c.stale_after_s, 60.0);
    }

    fn err_path(spec: &WorkloadSpec) -> (String, String) {
        match spec.validate().unwrap_err() {
            SpecError::InvalidField { path, value, .. } => (path, value),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn errors_name_the_field_path_value_and_range() {
        let yaml = r#"
target: {name: llama}
maxReplicas: 8
performanceModel: {preset: h200-llama3-8b-bf16}
behavior:
  scaleDown:
    policies:
      - {type: Pods, value: 1, periodSeconds: 60}
      - {type: Percent, value: 50, periodSeconds: 4000}
"#;
        let spec: WorkloadSpec = serde_yaml::from_str(yaml).unwrap();
        let e = spec.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.behavior.scaleDown.policies[1].periodSeconds: 4000 is not allowed; 1..=1800 seconds"
        );

        let mut s = WorkloadSpec::new("x", 4, "h200-llama3-8b-bf16");
        s.min_replicas = 5;
        assert_eq!(err_path(&s), ("spec.minReplicas".into(), "5".into()));
        let mut s = WorkloadSpec::new("x", 4, "h200-llama3-8b-bf16");
        s.slo.itl.percentile = 100.0;
        assert_eq!(err_path(&s).0, "spec.slo.itl.percentile");
        for bad in [-1e-6, 0.02, f64::NAN] {
            let mut s = WorkloadSpec::new("x", 4, "h200-llama3-8b-bf16");
            s.slo.ttft.per_input_token_seconds = bad;
            assert_eq!(err_path(&s).0, "spec.slo.ttft.perInputTokenSeconds");
        }
        let yaml = r#"
target: {name: llama}
maxReplicas: 8
performanceModel: {preset: h200-llama3-8b-bf16}
slo: {ttft: {thresholdSeconds: 0.5, perInputTokenSeconds: 0.00004}}
"#;
        let spec: WorkloadSpec = serde_yaml::from_str(yaml).unwrap();
        let c = spec.validate().unwrap();
        assert_eq!(
            (
                c.ttft.threshold_s,
                c.ttft_per_input_token_s,
                c.ttft.quantile
            ),
            (0.5, 0.00004, 0.95)
        );
        let mut s = WorkloadSpec::new("x", 4, "h200-llama3-8b-bf16");
        s.batch_limit_margin = 0.95;
        assert_eq!(err_path(&s).0, "spec.batchLimitMargin");
        let mut s = WorkloadSpec::new("x", 4, "h200-llama3-8b-bf16");
        s.gpu_type = Some("A100".into());
        assert_eq!(err_path(&s).0, "spec.gpuType");
        let s = WorkloadSpec::new("x", 4, "h300-nope");
        assert!(matches!(s.validate(), Err(SpecError::UnknownPreset { .. })));
    }

    #[test]
    fn schedules_are_checked() {
        let yaml = r#"
target: {name: llama}
maxReplicas: 20
performanceModel: {preset: h200-llama3-8b-bf16}
schedules:
  - {name: office, start: "0 8 * * MON-FRI", end: "0 18 * * MON-FRI", timeZone: Europe/Berlin, minReplicas: 10}
  - {name: bad, start: "0 8 * *", end: "0 18 * * *", minReplicas: 2}
"#;
        let spec: WorkloadSpec = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(err_path(&spec).0, "spec.schedules[1].start");
        let mut spec = spec;
        spec.schedules.pop();
        spec.schedules[0].time_zone = "Mars/Olympus".into();
        assert_eq!(err_path(&spec).0, "spec.schedules[0].timeZone");
        spec.schedules[0].time_zone = "Europe/Berlin".into();
        spec.schedules[0].min_replicas = Some(30);
        assert_eq!(err_path(&spec).0, "spec.schedules[0].minReplicas");
        spec.schedules[0].min_replicas = Some(10);
        let c = spec.validate().unwrap();
        assert_eq!(c.schedules.len(), 1);
    }

    #[test]
    fn exactly_one_performance_model_source() {
        let mut s = WorkloadSpec::new("x", 4, "h200-llama3-8b-bf16");
        s.performance_model.profile_file = Some("/etc/profile.csv".into());
        assert_eq!(err_path(&s).0, "spec.performanceModel");
        s.performance_model.preset = None;
        let c = s.validate().unwrap();
        assert!(matches!(c.perf_source, PerfModelSource::ProfileFile { .. }));
        assert!(matches!(
            c.perf_model(None),
            Err(SpecError::ProfileNotSupplied { .. })
        ));
    }

    #[test]
    fn json_schema_names_camel_case_fields() {
        let schema = schemars::schema_for!(WorkloadSpec);
        let text = serde_json::to_string(&schema).unwrap();
        for field in [
            "maxReplicas",
            "stabilizationWindowSeconds",
            "periodSeconds",
            "thresholdSeconds",
            "coldStartSeconds",
            "batchLimitMargin",
            "timeZone",
        ] {
            assert!(text.contains(field), "{field} missing from schema");
        }
    }
}
