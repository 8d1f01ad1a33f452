//! The scaler's HTTP endpoint: `/metrics` (OpenMetrics text), `/healthz`
//! (the state task is alive: it publishes at least once a second) and
//! `/readyz` (healthy, serving gRPC, not shutting down, and active: a
//! standby replica is not ready, so the Service routes to the leader).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::ScalerMetrics;
use crate::view::StateView;
use gpuscale_rt::Clock;

/// OpenMetrics text exposition content type.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The state task publishes at least every second; older than this is dead.
const STALE_VIEW: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) metrics: Arc<ScalerMetrics>,
    pub(crate) view: watch::Receiver<Arc<StateView>>,
    pub(crate) serving: watch::Receiver<bool>,
    /// `None`: always active; else ready only while true (the leader).
    pub(crate) active: Option<watch::Receiver<bool>>,
    pub(crate) clock: Clock,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics.encode(),
    )
}

fn live(state: &HttpState) -> Result<(), String> {
    let published = state.view.borrow().published_at;
    let age = state.clock.now().secs_since(published);
    if age <= STALE_VIEW.as_secs_f64() {
        Ok(())
    } else {
        Err(format!("the state task last published {age:.1} s ago\n"))
    }
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    match live(&state) {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if let Err(e) = live(&state) {
        return (StatusCode::SERVICE_UNAVAILABLE, e);
    }
    if let Some(active) = &state.active
        && !*active.borrow()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "standby: not the leader\n".to_string(),
        );
    }
    if *state.serving.borrow() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not serving gRPC\n".to_string(),
        )
    }
}
