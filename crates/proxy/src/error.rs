//! The crate's error type.

/// Everything that can stop the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A flag or configuration value is invalid.
    #[error("invalid {field} `{value}`: {allowed}")]
    InvalidConfig {
        field: String,
        value: String,
        allowed: String,
    },
    /// A listening socket could not be opened.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    /// A task of the proxy failed.
    #[error("{task} failed: {message}")]
    Task { task: &'static str, message: String },
}

impl ProxyError {
    pub fn config(field: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.to_string(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }

    /// A configuration error (exit code 2), not a runtime failure.
    pub fn is_config(&self) -> bool {
        matches!(self, ProxyError::InvalidConfig { .. })
    }
}
