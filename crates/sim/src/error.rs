//! The simulator's one error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the simulator: bad input (traces,
/// profiles, configuration) and failed output.
#[derive(Debug, Error)]
pub enum SimError {
    /// A trace row that cannot be read; names the file, line and column.
    #[error("{}:{line}:{column}: {message}", path.display())]
    TraceRow {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A trace that is readable but unusable (empty, unknown format, ...).
    #[error("{}: {message}", path.display())]
    Trace { path: PathBuf, message: String },
    /// A configuration value or flag out of its allowed range.
    #[error("invalid {field} `{value}`: {allowed}")]
    Config {
        field: String,
        value: String,
        allowed: String,
    },
    /// A performance profile that cannot be used.
    #[error("profile {name}: {message}")]
    Profile { name: String, message: String },
    /// The policy under test rejected its configuration.
    #[error("policy spec: {0}")]
    PolicySpec(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the report: {0}")]
    Report(String),
}

impl SimError {
    /// A configuration error naming the field, the value and what is allowed.
    pub fn config(
        field: impl Into<String>,
        value: impl ToString,
        allowed: impl Into<String>,
    ) -> Self {
        SimError::Config {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }

    /// Whether the error is the user's input (exit code 2) rather than a
    /// failure while running (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            SimError::Config { .. } | SimError::PolicySpec(_) | SimError::Profile { .. }
        )
    }
}
