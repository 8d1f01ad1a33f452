//! gpuscale's wire protocol.
//!
//! This crate holds the code generated from the workspace's `proto/` files and
//! is the only place where wire (prost) types meet domain types
//! ([`gpuscale_core`]): every conversion from the wire is a `TryFrom` whose
//! error names the offending field.
//!
//! [`convert`] holds those conversions and the domain envelope of the agent
//! stream ([`convert::AgentReport`], [`convert::Directive`]).
//!
//! Not for: transport setup, retries or state. Those live in the agent and the
//! scaler.

pub mod convert;

pub use convert::{AgentReport, ConvertError, Directive, RejectedEngine, ReportBody};

/// `gpuscale.v1`: the agent stream, the node-local serving API and the
/// scaler's public API.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("gpuscale.v1");
}

/// Kubelet PodResources v1 (package `v1`), wire-compatible with the kubelet.
pub mod podresources {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("v1");
}

/// KEDA's external scaler protocol (package `externalscaler`).
pub mod externalscaler {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("externalscaler");
}

/// The encoded `FileDescriptorSet` of every service above, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gpuscale_descriptor");
