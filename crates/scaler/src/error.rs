//! The scaler's error type.

use std::net::SocketAddr;

use gpuscale_core::{PodRef, WorkloadRef};

/// Everything that stops the scaler, rejects its configuration, or fails a
/// request made through its handle or its actuator.
#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    /// A flag or configuration value is invalid: names the flag or field, the
    /// value and what is allowed. The binary exits with code 2.
    #[error("invalid {field} `{value}`: {allowed}")]
    Config {
        field: String,
        value: String,
        allowed: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("--config {path}: {message}")]
    ConfigFile { path: String, message: String },
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(String),
    /// A task of the scaler ended unexpectedly.
    #[error("{task} failed: {message}")]
    Task { task: &'static str, message: String },
    /// The state task is gone (the scaler is shutting down).
    #[error("the scaler is shutting down")]
    ShuttingDown,
    /// No connected node reports this pod.
    #[error("no node reports pod {0}")]
    UnknownPod(PodRef),
    /// The actuator could not apply a decision.
    #[error("actuating {workload}: {message}")]
    Actuation {
        workload: WorkloadRef,
        message: String,
    },
}

impl ScalerError {
    pub(crate) fn config(
        field: impl Into<String>,
        value: impl Into<String>,
        allowed: impl Into<String>,
    ) -> Self {
        ScalerError::Config {
            field: field.into(),
            value: crate::config_file::bounded(&value.into()),
            allowed: allowed.into(),
        }
    }

    /// A value outside its bounded range (a flag, a configuration field).
    pub(crate) fn out_of_range(
        field: impl Into<String>,
        e: gpuscale_core::bounds::OutOfRange,
    ) -> Self {
        Self::config(field, e.value, e.allowed)
    }

    /// An actuation failure, for [`crate::Actuator`] implementations.
    pub fn actuation(workload: &WorkloadRef, message: impl Into<String>) -> Self {
        ScalerError::Actuation {
            workload: workload.clone(),
            message: message.into(),
        }
    }

    /// True for bad flags or configuration (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ScalerError::Config { .. } | ScalerError::ConfigFile { .. }
        )
    }
}
