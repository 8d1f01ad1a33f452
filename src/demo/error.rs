//! The demo's error type.

/// Everything that stops `gpuscale demo`.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A flag's value is invalid: names the flag, the value and what is
    /// allowed. Exit code 2.
    #[error("invalid {flag} `{value}`: {allowed}")]
    Config {
        flag: &'static str,
        value: String,
        allowed: String,
    },
    /// The trace could not be read or used. Exit code 2 when it is the
    /// user's file that is wrong.
    #[error("--trace: {0}")]
    Trace(#[from] gpuscale_sim::SimError),
    /// A part of the simulated cluster failed to start or stopped.
    #[error("{part}: {message}")]
    Part { part: &'static str, message: String },
    /// The chart could not be written.
    #[error("--chart {path}: {source}")]
    Chart {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl DemoError {
    pub(crate) fn config(
        flag: &'static str,
        value: impl ToString,
        allowed: impl Into<String>,
    ) -> Self {
        DemoError::Config {
            flag,
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }

    pub(crate) fn part(part: &'static str, e: impl ToString) -> Self {
        DemoError::Part {
            part,
            message: e.to_string(),
        }
    }

    /// Bad flags or input (exit code 2) rather than a runtime failure (1).
    pub fn is_config(&self) -> bool {
        match self {
            DemoError::Config { .. } => true,
            DemoError::Trace(e) => e.is_usage(),
            DemoError::Part { .. } | DemoError::Chart { .. } => false,
        }
    }
}
