//! The admin endpoints, on their own port so they never collide with the
//! engine's paths:
//!
//! * `GET /healthz`: 200 while the process serves.
//! * `GET /readyz`: 200 while admitting, 503 once draining (the pod's
//!   readiness probe: it leaves the Service's endpoints first).
//! * `GET|POST /drain`: drains for good and answers when the proxy is
//!   empty or `--drain-timeout` passed: 200 with `{"drained": true, ...}`,
//!   or 503 with what is still in flight. Meant for the engine container's
//!   `preStop` hook, so the engine is stopped only after its requests
//!   finished.
//! * `GET /metrics`: the proxy's own series in Prometheus text
//!   (`gpuscale_proxy_*`: requests by outcome, in flight, queued, limit,
//!   draining, TTFT, TPOT and queue-time histograms, tokens).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use gpuscale_core::Histogram;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{Shared, drain};

pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    Ok(
        match (req.uri().path(), get, req.method() == Method::POST) {
            ("/healthz", true, _) => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            ("/readyz", true, _) => {
                let load = shared.admission.load();
                let status = if load.draining {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                json(
                    status,
                    &serde_json::json!({ "ready": !load.draining, "draining": load.draining }),
                )
            }
            ("/drain", true, _) | ("/drain", _, true) => {
                let drained = drain(&shared).await;
                let load = shared.admission.load();
                json(
                    if drained {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    },
                    &serde_json::json!({
                        "drained": drained,
                        "in_flight": load.in_flight,
                        "queued": load.queued,
                    }),
                )
            }
            ("/metrics", true, _) => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics_text(&shared),
            ),
            (path, _, _) => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({ "error": format!("no admin endpoint {path}: /healthz, /readyz, /drain, /metrics") }),
            ),
        },
    )
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (b, c) in h.bounds().iter().zip(h.cumulative_counts()) {
        if b.is_infinite() {
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {c}");
        } else {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
    }
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum(), h.count());
}

/// The proxy's own series; see the module docs.
pub(super) fn metrics_text(shared: &Shared) -> String {
    let t = shared.stats.totals();
    let load = shared.admission.load();
    let mut out = String::with_capacity(8 * 1024);
    let name = "gpuscale_proxy_requests_total";
    let _ = writeln!(
        out,
        "# HELP {name} Requests that came to be admitted, by how they ended (in flight and queued ones not yet).\n# TYPE {name} counter"
    );
    for (outcome, n) in [
        ("finished", t.finished),
        ("failed", t.failed),
        ("client_gone", t.client_gone),
        ("queue_full", t.refused_queue_full),
        ("queue_timeout", t.refused_timeout),
        ("draining", t.refused_draining),
    ] {
        let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {n}");
    }
    metric(
        &mut out,
        "gpuscale_proxy_requests_arrived_total",
        "counter",
        "Requests that came to be admitted.",
        t.arrived as f64,
    );
    metric(
        &mut out,
        "gpuscale_proxy_in_flight",
        "gauge",
        "Requests admitted to the engine and not finished.",
        f64::from(load.in_flight),
    );
    metric(
        &mut out,
        "gpuscale_proxy_queued",
        "gauge",
        "Requests waiting in the admission queue.",
        load.queued as f64,
    );
    if let Some(limit) = load.limit.as_option() {
        metric(
            &mut out,
            "gpuscale_proxy_batch_limit",
            "gauge",
            "Most requests admitted at once (absent: unlimited).",
            f64::from(limit),
        );
    }
    metric(
        &mut out,
        "gpuscale_proxy_draining",
        "gauge",
        "1 while draining.",
        if load.draining { 1.0 } else { 0.0 },
    );
    metric(
        &mut out,
        "gpuscale_proxy_agent_connected",
        "gauge",
        "1 while the batch limit is followed from the node agent.",
        if shared.agent_connected.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        },
    );
    metric(
        &mut out,
        "gpuscale_proxy_prompt_tokens_total",
        "counter",
        "Prompt tokens of successful requests, as their responses state them.",
        t.prompt_tokens as f64,
    );
    metric(
        &mut out,
        "gpuscale_proxy_generation_tokens_total",
        "counter",
        "Output tokens of successful requests (stated, else counted stream events).",
        t.generation_tokens as f64,
    );
    histogram(
        &mut out,
        "gpuscale_proxy_ttft_seconds",
        "Time to first token of each request, from its arrival at the proxy (queue included).",
        &t.ttft,
    );
    histogram(
        &mut out,
        "gpuscale_proxy_tpot_seconds",
        "Time per output token of each streamed request: (end - first token) / (output tokens - 1).",
        &t.tpot,
    );
    histogram(
        &mut out,
        "gpuscale_proxy_queue_seconds",
        "Time each admitted request waited in the admission queue.",
        &t.queue,
    );
    out
}
