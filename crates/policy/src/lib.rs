//! gpuscale's scaling policy.
//!
//! Given a workload's spec and an [`Observation`] at `now`, decide how many
//! replicas it needs and what batch limit each should run, and say why
//! ([`Decision`]). Used unchanged by the scaler and the simulator.
//!
//! **Architecture invariant:** pure. No async, no I/O, no clock, no
//! environment, no logging: `now` is an argument and every reason is data.
//! Identical inputs (including `now` and the policy's history) give identical
//! decisions.

pub mod decision;
pub mod observation;
pub mod perf;

pub use decision::{Action, Decision, Recommendation, Source};
pub use observation::{
    LatencyObservation, LoadObservation, Observation, ReplicaCounts, ReplicaObservation,
    ReplicaState,
};
pub use perf::PerfModel;
