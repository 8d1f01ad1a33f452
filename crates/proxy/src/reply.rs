//! Responses the proxy makes itself: JSON errors in the OpenAI shape
//! (`{"error": {"message", "type", "code"}}`, which OpenAI-compatible
//! clients already parse), with `Retry-After` where retrying helps and
//! `Connection: close` where the client should go to another replica.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::admission::Refusal;
use crate::forward::{Observe, ResponseBody};

/// A JSON error response; `retry_after` is rounded up to whole seconds.
pub fn error<O: Observe>(
    status: StatusCode,
    code: &str,
    message: &str,
    retry_after: Option<Duration>,
    close: bool,
) -> Response<ResponseBody<O>> {
    let body = error_json(status, code, message);
    let mut resp = Response::new(ResponseBody::Full(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(after) = retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn error_json(status: StatusCode, code: &str, message: &str) -> serde_json::Value {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    serde_json::json!({
        "error": { "message": message, "type": kind, "code": code }
    })
}

/// The same error as an SSE event (`data: {"error": ...}`), for a stream
/// whose 200 was already sent (OpenAI's clients raise it as an API error).
pub fn sse_error(status: StatusCode, code: &str, message: &str) -> Bytes {
    Bytes::from(format!("data: {}\n\n", error_json(status, code, message)))
}

/// The response to a request the admission refused: 429 when the queue is
/// full, 503 when its deadline passed or the replica drains (then with
/// `Connection: close` on HTTP/1, so the client reconnects elsewhere).
pub fn refusal<O: Observe>(
    r: &Refusal,
    retry_after: Duration,
    http1: bool,
) -> Response<ResponseBody<O>> {
    let status = match r {
        Refusal::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
        Refusal::Timeout { .. } | Refusal::Draining => StatusCode::SERVICE_UNAVAILABLE,
    };
    let close = http1 && *r == Refusal::Draining;
    error(status, r.code(), &r.to_string(), Some(retry_after), close)
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::forward::NoObserver;

    #[tokio::test]
    async fn a_refusal_is_json_with_retry_after() {
        let r: Response<ResponseBody<NoObserver>> = refusal(
            &Refusal::QueueFull { max_queue: 8 },
            Duration::from_millis(1500),
            true,
        );
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert!(r.headers().get(header::CONNECTION).is_none());
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "queue_full");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("8 requests")
        );

        let d: Response<ResponseBody<NoObserver>> =
            refusal(&Refusal::Draining, Duration::from_secs(1), true);
        assert_eq!(d.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(d.headers()[header::CONNECTION], "close");
        let d2: Response<ResponseBody<NoObserver>> =
            refusal(&Refusal::Draining, Duration::from_secs(1), false);
        assert!(
            d2.headers().get(header::CONNECTION).is_none(),
            "HTTP/2 has no Connection"
        );
    }
}
