//! gpuscale's observation pipeline: from what agents publish to the
//! [`Observation`](gpuscale_policy::Observation) the policy decides from.
//!
//! **For:** the scaler (per engine of every node an agent reports) and the
//! simulator (per simulated replica, fed the samples an agent would
//! publish): both keep an [`EngineTracker`] per engine and build every
//! observation with [`assemble`] / [`assemble_target`], so a policy run in
//! the simulator sees exactly what it would see in production.
//! **Not for:** I/O, clocks, agent streams (the scaler's ingest), or
//! deciding anything (the policy).
//!
//! **Architecture invariant:** pure. No async, no I/O, no clock: times are
//! the samples' own.

pub mod assemble;
pub mod engine;
pub mod target;
pub mod window;

pub use assemble::{EngineInput, assemble, assemble_replicas, assemble_target};
pub use engine::{
    DEFAULT_WINDOW_MS, EnginePoint, EngineTracker, EngineWindowStats, MAX_WINDOW_POINTS,
};
pub use target::{ClusterReplica, TargetObservation};
