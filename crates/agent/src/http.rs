//! The agent's HTTP endpoint: `/metrics` (OpenMetrics text) and `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::Clock;
use crate::metrics::AgentMetrics;
use crate::sampler::Sampled;

/// OpenMetrics text exposition content type.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) metrics: Arc<AgentMetrics>,
    pub(crate) latest: watch::Receiver<Option<Arc<Sampled>>>,
    pub(crate) interval: watch::Receiver<Duration>,
    pub(crate) clock: Clock,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics.encode(),
    )
}

/// Healthy while the sampler keeps sampling: the newest sample is younger
/// than three intervals (at least 5 s). The scaler link does not count: an
/// agent that cannot reach the scaler is still doing its job.
async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    let limit = (*state.interval.borrow() * 3).max(Duration::from_secs(5));
    let newest = state
        .latest
        .borrow()
        .as_ref()
        .map(|s| s.snapshot.sampled_at);
    match newest {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no sample yet\n".to_string(),
        ),
        Some(at) => {
            let age = state.clock.now().secs_since(at);
            if age <= limit.as_secs_f64() {
                (StatusCode::OK, "ok\n".to_string())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "newest sample is {age:.1} s old (limit {:.1} s)\n",
                        limit.as_secs_f64()
                    ),
                )
            }
        }
    }
}
