//! Shared parts of the agent's integration tests: a fake inference engine
//! over HTTP, the project's fake `libnvidia-ml.so.1`, a scripted scaler, and
//! small helpers. Each test binary uses a different subset.
#![allow(dead_code)]

pub mod engine;
pub mod fake_nvml;
pub mod scaler;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Polls `f` until it holds. A liveness bound (5 minutes), not a timing
/// assertion: machines running the suite may be slow.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..30_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// GETs `path` over plain HTTP/1.1 and returns the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8(response).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample line that starts with `series` (name and labels).
pub fn sample_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
