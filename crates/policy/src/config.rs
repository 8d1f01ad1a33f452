//! The validated configuration of one workload ([`WorkloadConfig`]), made by
//! [`crate::WorkloadSpec::validate`]. Times are seconds as `f64`, percentiles
//! are quantiles in 0..1, cron expressions are parsed and time zones resolved.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::hpa::Behavior;
use crate::perf::{self, PerfModel, ProfileFormat};
use crate::schedule::ScheduleRule;
use crate::spec::{PredictiveMode, TargetRef, WorkloadSpec};

pub use gpuscale_core::slo::LatencyObjective;
use gpuscale_core::slo::SloObjectives;

/// Overrides of a performance model's capacities.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PerfOverrides {
    pub kv_capacity_tokens: Option<f64>,
    pub max_batch: Option<u32>,
}

impl PerfOverrides {
    pub fn apply(&self, model: &mut PerfModel) {
        if let Some(kv) = self.kv_capacity_tokens {
            model.kv_capacity_tokens = kv;
        }
        if let Some(b) = self.max_batch {
            model.max_batch = b;
        }
    }
}

/// Where the performance model comes from, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PerfModelSource {
    /// A shipped preset (the name is known to [`perf::preset`]).
    Preset {
        name: String,
        overrides: PerfOverrides,
    },
    /// A profile file in gpuscale's format; the caller reads it.
    ProfileFile {
        path: String,
        overrides: PerfOverrides,
    },
    /// Parsed from an inline profile or given as coefficients (overrides applied).
    Inline(PerfModel),
}

/// Predictive scaling, validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PredictiveConfig {
    pub mode: PredictiveMode,
    /// How far ahead the floor looks.
    pub horizon_s: f64,
    /// The spec leaves the horizon out: it is the learned p90 start-up
    /// plus 60 s (`horizon_s` holds `coldStartSeconds` + 60 s, used until
    /// a start-up is seen).
    #[serde(default)]
    pub horizon_from_startup: bool,
    /// History kept.
    pub history_s: f64,
    /// History needed before the forecast is used.
    pub min_history_s: f64,
    /// Width of one history bucket (divides a day).
    pub bucket_s: f64,
}

/// Scale-in protection, validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProtectionConfig {
    /// Replicas younger than this are never victims.
    pub min_replica_age_s: f64,
}

/// Reactive control, validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReactiveConfig {
    /// Arrival-rate averaging window; also the shortest panic.
    pub stable_window_s: f64,
}

/// One workload's validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadConfig {
    pub target: TargetRef,
    pub ttft: LatencyObjective,
    /// Extra TTFT allowed per prompt token (a length-aware objective), seconds.
    pub ttft_per_input_token_s: f64,
    /// The time per output token of each request (the spec's `itl`).
    pub itl: LatencyObjective,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub gpu_type: Option<String>,
    /// The idle policy, used when `min_replicas` is 0.
    pub scale_to_zero: crate::idle::ScaleToZeroConfig,
    pub gpus_per_replica: u32,
    pub perf_source: PerfModelSource,
    pub cold_start_s: f64,
    pub behavior: Behavior,
    pub cooldown_s: f64,
    pub schedules: Vec<ScheduleRule>,
    pub predictive: PredictiveConfig,
    pub protection: ProtectionConfig,
    pub advisory: bool,
    pub batch_limit_margin: f64,
    pub consolidation_margin: f64,
    pub reactive: ReactiveConfig,
    pub stale_after_s: f64,
}

impl WorkloadConfig {
    /// The workload's SLO, as every surface judges it.
    pub fn slo_objectives(&self) -> SloObjectives {
        SloObjectives {
            ttft: self.ttft,
            ttft_per_input_token_s: self.ttft_per_input_token_s,
            tpot: self.itl,
        }
    }

    /// The spec's `profileFile`, when its performance model is read from one.
    pub fn profile_file(&self) -> Option<&str> {
        match &self.perf_source {
            PerfModelSource::ProfileFile { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Resolve the performance model. `profile_file_text` is the content of
    /// the spec's `profileFile` (the caller reads it; ignored for other
    /// sources).
    pub fn perf_model(&self, profile_file_text: Option<&str>) -> Result<PerfModel, SpecError> {
        match &self.perf_source {
            PerfModelSource::Preset { name, overrides } => {
                let mut m = perf::preset(name).ok_or_else(|| SpecError::UnknownPreset {
                    path: "spec.performanceModel.preset".into(),
                    name: name.clone(),
                    known: perf::PRESET_NAMES.join(", "),
                })?;
                overrides.apply(&mut m);
                Ok(m)
            }
            PerfModelSource::ProfileFile { path, overrides } => {
                let text = profile_file_text.ok_or_else(|| SpecError::ProfileNotSupplied {
                    path: "spec.performanceModel.profileFile".into(),
                    file: path.clone(),
                })?;
                let mut m = PerfModel::from_profile_csv(text, &ProfileFormat::Gpuscale)?;
                overrides.apply(&mut m);
                Ok(m)
            }
            PerfModelSource::Inline(m) => Ok(m.clone()),
        }
    }
}

/// Why a spec could not be resolved into a configuration and a model.
#[derive(Debug)]
pub enum ResolveError<E> {
    /// The spec itself (or the profile's content) is invalid.
    Spec(SpecError),
    /// The caller could not read the spec's `profileFile`.
    Profile { file: String, error: E },
}

impl WorkloadSpec {
    /// The one path from a spec to what a decider needs: validate it, read
    /// its `profileFile` (if it names one) through `read_profile` (the
    /// caller's I/O: the standalone scaler reads relative to its config
    /// file, the Kubernetes controller from the scaler's file system), and
    /// resolve the performance model.
    pub fn resolve<E>(
        &self,
        read_profile: impl FnOnce(&str) -> Result<String, E>,
    ) -> Result<(WorkloadConfig, PerfModel), ResolveError<E>> {
        let config = self.validate().map_err(ResolveError::Spec)?;
        let text = match config.profile_file() {
            Some(file) => Some(read_profile(file).map_err(|error| ResolveError::Profile {
                file: file.to_string(),
                error,
            })?),
            None => None,
        };
        let model = config
            .perf_model(text.as_deref())
            .map_err(ResolveError::Spec)?;
        Ok((config, model))
    }
}
