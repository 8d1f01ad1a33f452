//! The Kubernetes crate's error type.

use gpuscale_scaler::ScalerError;

/// Everything that goes wrong talking to the cluster, configuring the
/// controller, or acting on a target.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A flag or configuration value is invalid: names the flag, the value
    /// and what is allowed. The binary exits with code 2.
    #[error("invalid {field} `{value}`: {allowed}")]
    Config {
        field: String,
        value: String,
        allowed: String,
    },
    /// No client could be built (no kubeconfig, no in-cluster service account).
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(String),
    /// An API request failed.
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// This replica does not hold the lease (or its lease may have expired):
    /// it must not act.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// The target's replica count changed outside gpuscale; the new count
    /// was adopted and nothing was applied.
    #[error("{0}")]
    ExternalChange(String),
    /// A drain was cancelled, or its pod is protected or gone.
    #[error("drain of pod {pod}: {message}")]
    Drain { pod: String, message: String },
    /// The scaler failed.
    #[error(transparent)]
    Scaler(#[from] ScalerError),
}

impl KubeError {
    pub(crate) fn config(
        field: impl Into<String>,
        value: impl Into<String>,
        allowed: impl Into<String>,
    ) -> Self {
        KubeError::Config {
            field: field.into(),
            value: value.into(),
            allowed: allowed.into(),
        }
    }

    pub(crate) fn api(what: impl Into<String>, source: kube::Error) -> Self {
        KubeError::Api {
            what: what.into(),
            source: Box::new(source),
        }
    }

    /// True for bad flags or configuration (exit code 2).
    pub fn is_config(&self) -> bool {
        match self {
            KubeError::Config { .. } => true,
            KubeError::Scaler(e) => e.is_config(),
            _ => false,
        }
    }

    /// The HTTP status of an API error, if the server answered.
    pub(crate) fn status_code(&self) -> Option<u16> {
        match self {
            KubeError::Api { source, .. } => api_status(source),
            _ => None,
        }
    }
}

/// The HTTP status code of a `kube::Error` the server answered with.
pub(crate) fn api_status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
