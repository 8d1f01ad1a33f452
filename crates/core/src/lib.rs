//! gpuscale's vocabulary.
//!
//! The types every other crate speaks: identifiers ([`ids`]), points in time
//! ([`time`]), cumulative latency histograms ([`histogram`]), configuration
//! text checked before parsing ([`config_text`]) and bounded ranges for
//! its values ([`bounds`]), what a node
//! agent samples ([`sample`]), the SLO's one definition ([`slo`]),
//! Kubernetes label selectors ([`selector`]) and name rules ([`names`]), the
//! address of the agent's node-local API ([`serving`]) and backoff jitter
//! ([`jitter`]).
//!
//! **Architecture invariant:** this crate is pure. It has no async code, does
//! no I/O, never reads a clock or the environment, and does not log. Time is
//! always a value passed in.

pub mod bounds;
pub mod config_text;
pub mod histogram;
pub mod ids;
pub mod jitter;
pub mod names;
pub mod sample;
pub mod selector;
pub mod serving;
pub mod slo;
pub mod time;

pub use histogram::{Histogram, HistogramError};
pub use ids::{GpuUuid, NodeName, PodRef, WorkloadRef};
pub use selector::{LabelSelector, Requirement, SelectorError};
pub use serving::ServingAddr;
pub use slo::{LatencyObjective, SloAssessment, SloObjectives, SloStatus};
pub use time::Timestamp;
