//! The gpuscale simulator.
//!
//! Replays a request trace against a simulated fleet of GPU replicas
//! (continuous batching, KV capacity, cold starts), driven by gpuscale's own
//! policy or by faithful re-implementations of the autoscalers users would
//! otherwise pick, and reports SLO attainment and GPU-hours for each.
//!
//! What it is for: comparing autoscaling policies on real traces before
//! they touch a cluster, and the project's benchmark suite. What it is not:
//! a cycle-accurate engine model — one replica's speed comes from a fitted
//! performance model (`t(B, L)`, `p(T)`), and prefill is modelled as mixed
//! iterations rather than token-exact chunks.
//!
//! Map: [`trace`] reads and scales traces; [`fleet`] is the discrete-event
//! fleet (engine model, router, lifecycle); [`run`] replays one workload with
//! one [`autoscaler::Autoscaler`]; [`stats`] records attainment and latency;
//! [`zero`] compares scale to zero on a sparse multi-model workload.

pub mod agent;
pub mod autoscaler;
pub mod baselines;
pub mod bound;
pub mod ceiling;
pub mod chart;
pub mod cli;
pub mod compare;
pub mod error;
pub mod fleet;
pub mod gpuscale;
pub mod matrix;
pub mod profile;
pub mod prometheus;
pub mod report;
pub mod rng;
pub mod run;
pub mod stats;
pub mod suite;
pub mod trace;
pub mod zero;

pub use autoscaler::{Autoscaler, ClusterView, FixedReplicas, FleetSample, ScaleCommand};
pub use error::SimError;
pub use fleet::{ColdStart, Fleet, FleetConfig, Lifecycle, VictimOrder};
pub use run::{RunConfig, RunOutcome, run_policy};
pub use stats::{RunStats, Slo};
pub use trace::{Request, Trace, TraceFormat, Workload, WorkloadOptions};
