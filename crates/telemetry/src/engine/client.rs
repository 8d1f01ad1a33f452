//! HTTP to engines: metrics, health, warm-up.
//!
//! One pooled hyper client (keep-alive, plain HTTP: engines are scraped on
//! the node) with guards for every bad answer an engine can give: a deadline
//! over the whole exchange (connect, headers and body), a cap on the body
//! (checked against `Content-Length` and while reading), a 2xx status, and a
//! content type that is Prometheus text (an HTML error or login page is
//! rejected before parsing).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gpuscale_core::sample::{EngineState, Framework};
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::EngineTarget;
use crate::error::TelemetryError;

/// What the client accepts from engines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpClientConfig {
    /// Responses larger than this are rejected (vLLM's /metrics is ~100 KiB).
    pub max_body_bytes: usize,
    /// TCP connect deadline (the whole exchange has its own, per call).
    pub connect_timeout: Duration,
}

impl Default for HttpClientConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            connect_timeout: Duration::from_secs(1),
        }
    }
}

impl HttpClientConfig {
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if !(1024..=(256 << 20)).contains(&self.max_body_bytes) {
            return Err(TelemetryError::config(
                "engines.max_body_bytes",
                self.max_body_bytes,
                "between 1 KiB and 256 MiB",
            ));
        }
        if self.connect_timeout < Duration::from_millis(10)
            || self.connect_timeout > Duration::from_secs(60)
        {
            return Err(TelemetryError::config(
                "engines.connect_timeout",
                format!("{:?}", self.connect_timeout),
                "between 10 ms and 60 s",
            ));
        }
        Ok(())
    }
}

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// The result of a health or ready check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthOutcome {
    /// 2xx.
    Ok,
    /// Another status, with the start of the body (e.g. llama.cpp's
    /// "Loading model").
    Status { status: u16, body: String },
    /// No answer: refused, timed out, or broken; the error's kind.
    Unreachable { kind: &'static str },
}

/// A warm-up request: one short completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupProbe {
    /// Path on the engine's host and port, e.g. `/v1/completions`.
    pub path: String,
    /// JSON body.
    pub body: String,
    pub timeout: Duration,
}

/// What a successful warm-up took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmupOutcome {
    pub status: u16,
    pub elapsed: Duration,
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl WarmupProbe {
    /// The framework's smallest generation: one token of "Hello".
    /// OpenAI-compatible `/v1/completions` for vLLM, SGLang, trtllm-serve
    /// and llama.cpp; `/generate` for TGI; Triton's generate extension for
    /// Triton (model `ensemble` unless named).
    pub fn for_framework(framework: Framework, model: Option<&str>, timeout: Duration) -> Self {
        let (path, body) = match framework {
            Framework::Tgi => (
                "/generate".to_string(),
                r#"{"inputs":"Hello","parameters":{"max_new_tokens":1}}"#.to_string(),
            ),
            Framework::TritonTrtllm => (
                format!("/v2/models/{}/generate", model.unwrap_or("ensemble")),
                r#"{"text_input":"Hello","max_tokens":1}"#.to_string(),
            ),
            _ => (
                "/v1/completions".to_string(),
                match model {
                    Some(m) => format!(
                        r#"{{"model":{},"prompt":"Hello","max_tokens":1}}"#,
                        json_string(m)
                    ),
                    None => r#"{"prompt":"Hello","max_tokens":1}"#.to_string(),
                },
            ),
        };
        Self {
            path,
            body,
            timeout,
        }
    }
}

/// Maps a health check to an engine state (REFERENCE §6.8). `ever_warm`:
/// whether this engine was seen warm before, which tells a loading engine
/// (port closed or 503 while loading) from a failed one.
pub(crate) fn classify_health(
    framework: Framework,
    outcome: &HealthOutcome,
    ever_warm: bool,
) -> EngineState {
    let not_yet = if ever_warm {
        EngineState::Failed
    } else {
        EngineState::Loading
    };
    match outcome {
        HealthOutcome::Ok => EngineState::Warm,
        // vLLM and TGI do not listen until loaded.
        HealthOutcome::Unreachable { .. } => not_yet,
        HealthOutcome::Status { status: 503, body } => match framework {
            Framework::LlamaCpp if body.contains("Loading model") => EngineState::Loading,
            // SGLang answers 503 while Starting; Triton while not ready.
            Framework::Sglang | Framework::TritonTrtllm | Framework::TrtllmServe => not_yet,
            // vLLM: 503 only on EngineDeadError; TGI: unhealthy.
            _ => EngineState::Failed,
        },
        HealthOutcome::Status { .. } => EngineState::Failed,
    }
}

/// Whether a body error is the connection ending before the body did
/// (hyper reports an `UnexpectedEof` I/O error as its cause).
fn ended_early(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::UnexpectedEof
        {
            return true;
        }
        cause = err.source();
    }
    false
}

/// The client. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct EngineHttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    config: HttpClientConfig,
}

impl EngineHttpClient {
    pub fn new(config: HttpClientConfig) -> Result<Self, TelemetryError> {
        config.validate()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(2)
            .build(connector);
        Ok(Self { client, config })
    }

    pub fn config(&self) -> &HttpClientConfig {
        &self.config
    }

    /// One request, the whole exchange under `timeout`, the body capped.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
        accept: &str,
        timeout: Duration,
    ) -> Result<HttpResponse, TelemetryError> {
        let exchange = self.exchange(method, url, body, accept);
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(TelemetryError::Timeout {
                url: url.to_string(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
        accept: &str,
    ) -> Result<HttpResponse, TelemetryError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(url)
            .header(ACCEPT, accept)
            .header(
                USER_AGENT,
                concat!("gpuscale-agent/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| TelemetryError::config("engine URL", url, format!("a valid URL ({e})")))?;
        let response = self.client.request(request).await.map_err(|e| {
            let message = match std::error::Error::source(&e) {
                Some(inner) => format!("{e}: {inner}"),
                None => e.to_string(),
            };
            TelemetryError::Connect {
                url: url.to_string(),
                message,
            }
        })?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let cap = self.config.max_body_bytes;
        let too_large = || TelemetryError::TooLarge {
            url: url.to_string(),
            limit_bytes: cap,
        };
        if let Some(len) = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > cap as u64
        {
            return Err(too_large());
        }
        let mut body = response.into_body();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                // The transport tells a cut-off body (fewer bytes than the
                // Content-Length, no terminating chunk) from other failures.
                if e.is_incomplete_message() || ended_early(&e) {
                    TelemetryError::Truncated {
                        url: url.to_string(),
                        message: e.to_string(),
                    }
                } else {
                    TelemetryError::Body {
                        url: url.to_string(),
                        message: e.to_string(),
                    }
                }
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > cap {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(HttpResponse {
            status,
            content_type,
            body: buf.freeze(),
        })
    }

    /// Prometheus text from `url`: 2xx, a text content type, UTF-8.
    pub(crate) async fn fetch_metrics(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<String, TelemetryError> {
        self.fetch_text(
            url,
            timeout,
            "text/plain;version=0.0.4;q=1,*/*;q=0.1",
            &["text/plain", "application/openmetrics-text"],
        )
        .await
    }

    /// A JSON document from `url` (trtllm-serve's iteration stats): 2xx,
    /// a JSON content type, UTF-8.
    pub(crate) async fn fetch_json(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<String, TelemetryError> {
        self.fetch_text(url, timeout, "application/json", &["application/json"])
            .await
    }

    async fn fetch_text(
        &self,
        url: &str,
        timeout: Duration,
        accept: &str,
        mimes: &[&str],
    ) -> Result<String, TelemetryError> {
        let resp = self
            .request(Method::GET, url, None, accept, timeout)
            .await?;
        if !(200..300).contains(&resp.status) {
            return Err(TelemetryError::HttpStatus {
                url: url.to_string(),
                status: resp.status,
            });
        }
        if let Some(ct) = &resp.content_type {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if !mimes.contains(&mime.as_str()) {
                return Err(TelemetryError::ContentType {
                    url: url.to_string(),
                    content_type: ct.clone(),
                });
            }
        }
        String::from_utf8(resp.body.to_vec()).map_err(|e| TelemetryError::Body {
            url: url.to_string(),
            message: format!("not UTF-8: {e}"),
        })
    }

    /// GETs a health or ready endpoint.
    pub async fn check_health(&self, url: &str, timeout: Duration) -> HealthOutcome {
        match self.request(Method::GET, url, None, "*/*", timeout).await {
            Ok(r) if (200..300).contains(&r.status) => HealthOutcome::Ok,
            Ok(r) => {
                let n = r.body.len().min(512);
                HealthOutcome::Status {
                    status: r.status,
                    body: String::from_utf8_lossy(&r.body[..n]).into_owned(),
                }
            }
            Err(e) => HealthOutcome::Unreachable { kind: e.kind() },
        }
    }

    /// Sends the warm-up request to the engine's host and port; Ok on 2xx.
    pub async fn warm_up(
        &self,
        target: &EngineTarget,
        probe: &WarmupProbe,
    ) -> Result<WarmupOutcome, TelemetryError> {
        let origin = super::origin(&target.metrics_url).ok_or_else(|| {
            TelemetryError::config("engine URL", &target.metrics_url, "an http:// URL")
        })?;
        let url = format!("{origin}{}", probe.path);
        let started = tokio::time::Instant::now();
        let resp = self
            .request(
                Method::POST,
                &url,
                Some(probe.body.clone()),
                "application/json",
                probe.timeout,
            )
            .await?;
        if !(200..300).contains(&resp.status) {
            return Err(TelemetryError::HttpStatus {
                url,
                status: resp.status,
            });
        }
        Ok(WarmupOutcome {
            status: resp.status,
            elapsed: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_loading_until_the_engine_was_warm_once() {
        let refused = HealthOutcome::Unreachable { kind: "connect" };
        assert_eq!(
            classify_health(Framework::Vllm, &refused, false),
            EngineState::Loading
        );
        assert_eq!(
            classify_health(Framework::Vllm, &refused, true),
            EngineState::Failed
        );
    }

    #[test]
    fn a_503_means_what_each_framework_says_it_means() {
        let s503 = |body: &str| HealthOutcome::Status {
            status: 503,
            body: body.into(),
        };
        let loading =
            r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;
        assert_eq!(
            classify_health(Framework::LlamaCpp, &s503(loading), true),
            EngineState::Loading
        );
        assert_eq!(
            classify_health(Framework::Vllm, &s503(""), false),
            EngineState::Failed
        );
        assert_eq!(
            classify_health(Framework::Sglang, &s503(""), false),
            EngineState::Loading
        );
        assert_eq!(
            classify_health(Framework::Tgi, &s503("unhealthy"), false),
            EngineState::Failed
        );
        assert_eq!(
            classify_health(Framework::Vllm, &HealthOutcome::Ok, false),
            EngineState::Warm
        );
    }

    #[test]
    fn warmup_probes_use_each_frameworks_generate_api() {
        let t = Duration::from_secs(30);
        let p = WarmupProbe::for_framework(Framework::Vllm, Some("meta/llama \"8b\""), t);
        assert_eq!(p.path, "/v1/completions");
        let body: serde_json::Value = serde_json::from_str(&p.body).unwrap();
        assert_eq!(body["model"], "meta/llama \"8b\"");
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(
            WarmupProbe::for_framework(Framework::Tgi, None, t).path,
            "/generate"
        );
        assert_eq!(
            WarmupProbe::for_framework(Framework::TritonTrtllm, None, t).path,
            "/v2/models/ensemble/generate"
        );
    }
}
