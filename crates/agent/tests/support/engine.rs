//! A fake inference engine: vLLM-style Prometheus text on `/metrics`,
//! `/health`, and `/v1/completions` for warm-ups, each switchable to
//! misbehave (HTML, an error status, a hang, garbage, too much text).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

/// What `/metrics` answers.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricsReply {
    /// vLLM 0.x exposition with this many running requests.
    Vllm {
        running: f64,
    },
    /// A login page, as a misconfigured ingress or proxy serves it.
    Html,
    /// Not Prometheus text at all.
    Garbage,
    /// An exposition cut off mid-line by the connection.
    Truncated,
    /// `bytes` of valid-looking comments (over the size cap).
    Huge {
        bytes: usize,
    },
    Status(u16),
    /// Never answers.
    Hang,
    /// 200 with an empty body (as a server with metrics off may answer).
    Empty,
}

/// How the engine behaves now.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub metrics: MetricsReply,
    /// Status of `/health`.
    pub health: u16,
    /// Whether `/v1/completions` fails (503).
    pub completions_fail: bool,
    /// Completion requests received, failed or not.
    pub completions: u32,
}

#[derive(Clone)]
pub struct FakeEngine {
    pub addr: SocketAddr,
    pub model: String,
    behaviour: Arc<Mutex<Behaviour>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

type Shared = (Arc<Mutex<Behaviour>>, String);

impl FakeEngine {
    pub async fn start(model: &str) -> FakeEngine {
        FakeEngine::with(
            model,
            Behaviour {
                metrics: MetricsReply::Vllm { running: 3.0 },
                health: 200,
                completions_fail: false,
                completions: 0,
            },
        )
        .await
    }

    pub async fn with(model: &str, behaviour: Behaviour) -> FakeEngine {
        let behaviour = Arc::new(Mutex::new(behaviour));
        let state: Shared = (behaviour.clone(), model.to_string());
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .route("/v1/completions", post(completions))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeEngine {
            addr,
            model: model.to_string(),
            behaviour,
            task: Arc::new(task),
        }
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().expect("behaviour"));
    }

    pub fn behaviour(&self) -> Behaviour {
        self.behaviour.lock().expect("behaviour").clone()
    }
}

/// vLLM's names (0.10+ and current), one engine, one model.
pub fn vllm_text(model: &str, running: f64) -> String {
    let l = format!("{{model_name=\"{model}\"}}");
    let b = |le: &str, n: u64| {
        format!(
            "vllm:time_to_first_token_seconds_bucket{{le=\"{le}\",model_name=\"{model}\"}} {n}.0\n"
        )
    };
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{l} {running}\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{l} 2.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{l} 0.25\n\
         # HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
         # TYPE vllm:prompt_tokens_total counter\n\
         vllm:prompt_tokens_total{l} 12345.0\n\
         # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
         # TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{l} 6789.0\n\
         # HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n\
         # TYPE vllm:time_to_first_token_seconds histogram\n\
         {}{}{}\
         vllm:time_to_first_token_seconds_sum{l} 3.5\n\
         vllm:time_to_first_token_seconds_count{l} 20.0\n",
        b("0.1", 5),
        b("1.0", 18),
        b("+Inf", 20),
    )
}

const PROM: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State((b, model)): State<Shared>) -> Response {
    let reply = b.lock().expect("behaviour").metrics.clone();
    match reply {
        MetricsReply::Vllm { running } => {
            ([(header::CONTENT_TYPE, PROM)], vllm_text(&model, running)).into_response()
        }
        MetricsReply::Html => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>",
        )
            .into_response(),
        MetricsReply::Garbage => (
            [(header::CONTENT_TYPE, PROM)],
            "vllm:num_requests_running{model_name=\"m\" 3\n{{{ not prometheus\n",
        )
            .into_response(),
        MetricsReply::Truncated => {
            // A chunked body whose stream fails midway: the connection is
            // cut before the last chunk.
            use futures::StreamExt;
            let first = futures::stream::once(async {
                Ok::<_, std::io::Error>(
                    "vllm:num_requests_running{model_name=\"m\"} 3.0\nvllm:num_requests_wai",
                )
            });
            let cut = futures::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                Err(std::io::Error::other("the engine went away"))
            });
            (
                [(header::CONTENT_TYPE, PROM)],
                axum::body::Body::from_stream(first.chain(cut)),
            )
                .into_response()
        }
        MetricsReply::Huge { bytes } => {
            let line = "# HELP filler padding padding padding padding padding padding\n";
            let body = line.repeat(bytes / line.len() + 1);
            ([(header::CONTENT_TYPE, PROM)], body).into_response()
        }
        MetricsReply::Status(s) => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "error\n",
        )
            .into_response(),
        MetricsReply::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        MetricsReply::Empty => ([(header::CONTENT_TYPE, PROM)], "").into_response(),
    }
}

async fn health(State((b, _)): State<Shared>) -> Response {
    let status = b.lock().expect("behaviour").health;
    StatusCode::from_u16(status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}

async fn completions(State((b, model)): State<Shared>) -> Response {
    let fail = {
        let mut b = b.lock().expect("behaviour");
        b.completions += 1;
        b.completions_fail
    };
    if fail {
        (StatusCode::SERVICE_UNAVAILABLE, "compiling CUDA graphs\n").into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/json")],
            format!(
                "{{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"!\"}}]}}"
            ),
        )
            .into_response()
    }
}
