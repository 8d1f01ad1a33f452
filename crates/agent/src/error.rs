//! The agent's error type.

use std::net::SocketAddr;

/// Everything that stops the agent or rejects its configuration.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag or configuration value is invalid: names the flag or field, the
    /// value and what is allowed. The binary exits with code 2.
    #[error("invalid {field} `{value}`: {allowed}")]
    Config {
        field: String,
        value: String,
        allowed: String,
    },
    /// A file named by a flag could not be read or parsed.
    #[error("{flag} {path}: {message}")]
    ConfigFile {
        flag: &'static str,
        path: String,
        message: String,
    },
    /// The metrics endpoint could not listen.
    #[error("cannot listen on {addr} for metrics: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A node-local server (the ServingService) could not listen.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A server task failed.
    #[error("{task} failed: {message}")]
    Task { task: &'static str, message: String },
}

impl AgentError {
    pub(crate) fn config(
        field: impl Into<String>,
        value: impl Into<String>,
        allowed: impl Into<String>,
    ) -> Self {
        AgentError::Config {
            field: field.into(),
            value: value.into(),
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

    /// True for bad flags or configuration (exit code 2), false for runtime
    /// failures (exit code 1).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AgentError::Config { .. } | AgentError::ConfigFile { .. }
        )
    }
}
