//! gpuscale's scaling policy.
//!
//! Given a workload's spec and an [`Observation`] at `now`, decide how many
//! replicas it needs and what batch limit each should run, and say why
//! ([`Decision`]). Used unchanged by the scaler and the simulator.
//!
//! * [`spec`]: the workload spec (the custom resource's `spec`) and its
//!   validation into a [`WorkloadConfig`].
//! * [`perf`]: the performance model, shipped presets, profile files.
//! * [`sizing`]: batch limit and replicas from a queueing model.
//! * [`forecast`], [`schedule`], [`cron`]: predictive and scheduled control.
//! * [`hpa`]: Kubernetes HPA behaviour, exact, for our policy and for the
//!   simulator's HPA/KEDA baselines.
//! * [`refine`]: online refinement of the model, with its confidence.
//! * [`victim`]: which replicas a scale-in removes.
//! * [`proportional`]: the proportional decider (replicas from tokens per
//!   second, for workloads without a performance model).
//! * [`startup`]: replicas' start-up time learned from observations
//!   (p50/p90 per phase) and when starting replicas are expected ready.
//! * [`idle`]: scale to zero: the idle period (ski rental against the
//!   learned start-up) and whether to go now.
//! * [`policy`]: [`Policy`], which combines all of the above per workload.
//!
//! Not here: talking to Kubernetes, engines or Prometheus, and any notion of
//! wall-clock time.
//!
//! **Architecture invariant:** pure. No async, no I/O, no clock, no
//! environment, no logging: `now` is an argument and every reason is data.
//! Identical inputs (including `now` and the policy's history) give identical
//! decisions.
//!
//! ```
//! use gpuscale_core::Timestamp;
//! use gpuscale_policy::{Observation, Policy, WorkloadSpec};
//!
//! let spec = WorkloadSpec::new("llama-8b", 20, "h200-llama3-8b-bf16");
//! let config = spec.validate().expect("valid spec");
//! let model = config.perf_model(None).expect("preset resolves");
//! let mut policy = Policy::new(config, model);
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! let mut obs = Observation::empty();
//! obs.telemetry_at = Some(now);
//! obs.replicas.current = 1;
//! obs.replicas.ready = 1;
//! obs.load.arrival_rate_rps = Some(40.0);
//! let decision = policy.decide(now, &obs);
//! assert!(decision.desired_replicas > 1);
//! println!("{}", decision.summary());
//! ```

pub mod config;
pub mod cron;
pub mod decision;
pub mod error;
pub mod forecast;
pub mod hpa;
pub mod idle;
mod limits;
pub mod observation;
pub mod perf;
pub mod policy;
pub mod proportional;
pub mod refine;
pub mod schedule;
pub mod sizing;
mod sources;
pub mod spec;
pub mod startup;
pub mod victim;
pub mod zero;

pub use config::{LatencyObjective, PerfModelSource, WorkloadConfig};
pub use decision::{
    Action, Decision, DecisionInputs, Direction, Limit, ProportionalInputs, Recommendation,
    ScaleToZeroInputs, SloInputs, Source,
};
pub use error::SpecError;
pub use forecast::RateSample;
pub use observation::{
    LatencyObservation, LoadObservation, Observation, ReplicaCounts, ReplicaObservation,
    ReplicaState,
};
pub use perf::{PerfModel, ProfileFormat};
pub use policy::Policy;
pub use spec::{PredictiveMode, WorkloadSpec};
