//! The crate's error type.
//!
//! Every error has a short, bounded [`TelemetryError::kind`] for metric
//! labels (the agent exports errors counted by kind) and a message that names
//! what was wrong: the field or flag, the value, and what is allowed.

/// Everything that can go wrong in a telemetry source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    /// A configuration value or flag is invalid.
    #[error("invalid {field} `{value}`: {allowed}")]
    InvalidConfig {
        field: String,
        value: String,
        allowed: String,
    },
    /// The TCP (or unix) connection could not be made.
    #[error("{url}: connect failed: {message}")]
    Connect { url: String, message: String },
    /// No complete answer within the timeout.
    #[error("{url}: no complete response within {timeout_ms} ms")]
    Timeout { url: String, timeout_ms: u64 },
    /// An HTTP status other than 2xx.
    #[error("{url}: HTTP status {status}")]
    HttpStatus { url: String, status: u16 },
    /// The endpoint answered with something that is not Prometheus text
    /// (typically an HTML error or login page).
    #[error("{url}: content type `{content_type}` is not Prometheus text exposition")]
    ContentType { url: String, content_type: String },
    /// The response is larger than the configured cap.
    #[error("{url}: response larger than the cap of {limit_bytes} bytes")]
    TooLarge { url: String, limit_bytes: usize },
    /// Reading the body failed midway, or it is not UTF-8.
    #[error("{url}: reading the body failed: {message}")]
    Body { url: String, message: String },
    /// The connection ended before the whole body arrived (shorter than its
    /// `Content-Length`, or a chunked body without its last chunk).
    #[error("{url}: the body was cut off: {message}")]
    Truncated { url: String, message: String },
    /// A line of the exposition is not valid Prometheus text.
    #[error("exposition line {line_no}: {message}: `{line}`")]
    Parse {
        line_no: usize,
        message: String,
        line: String,
    },
    /// The kubelet PodResources API could not be reached or answered an error.
    #[error("pod-resources at {socket}: {message}")]
    PodResources { socket: String, message: String },
    /// A pushed value is out of range; `field` names it on the wire.
    #[error("{field}: {message}")]
    InvalidValue { field: String, message: String },
}

impl TelemetryError {
    /// A short, bounded class for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            TelemetryError::InvalidConfig { .. } => "config",
            TelemetryError::Connect { .. } => "connect",
            TelemetryError::Timeout { .. } => "timeout",
            TelemetryError::HttpStatus { .. } => "http_status",
            TelemetryError::ContentType { .. } => "content_type",
            TelemetryError::TooLarge { .. } => "too_large",
            TelemetryError::Body { .. } => "body",
            TelemetryError::Truncated { .. } => "truncated",
            TelemetryError::Parse { .. } => "parse",
            TelemetryError::PodResources { .. } => "unavailable",
            TelemetryError::InvalidValue { .. } => "invalid_value",
        }
    }

    pub(crate) fn config(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        TelemetryError::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}
