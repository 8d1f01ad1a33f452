//! A tiny HTTP/1.1 server for engine tests: canned replies per path, each
//! able to misbehave (hang, send too much, send HTML, cut the body off).
//! One request per connection (`Connection: close`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the server answers a path.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response.
    Ok {
        status: u16,
        content_type: &'static str,
        body: String,
    },
    /// Accepts the request and never answers.
    Hang,
    /// Streams `bytes` of filler (no Content-Length, chunked).
    Endless { bytes: usize },
    /// Declares `declared` bytes, sends `body`, closes the connection.
    CutOff { declared: usize, body: String },
}

impl Reply {
    pub fn text(body: impl Into<String>) -> Reply {
        Reply::Ok {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn status(status: u16, body: impl Into<String>) -> Reply {
        Reply::Ok {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

/// A received request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub body: String,
}

#[derive(Clone)]
pub struct FakeHttp {
    pub addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    received: Arc<Mutex<Vec<Received>>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

impl FakeHttp {
    pub async fn start() -> FakeHttp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (r, rec) = (routes.clone(), received.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, rec) = (r.clone(), rec.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, r, rec).await;
                });
            }
        });
        FakeHttp {
            addr,
            routes,
            received,
            task: Arc::new(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn route(&self, path: &str, reply: Reply) {
        self.routes
            .lock()
            .expect("routes")
            .insert(path.to_string(), reply);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    received: Arc<Mutex<Vec<Received>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let content_length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < content_length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    received.lock().expect("received").push(Received {
        method,
        path: path.clone(),
        body: String::from_utf8_lossy(&body).to_string(),
    });
    let reply = routes.lock().expect("routes").get(&path).cloned();
    match reply {
        None => {
            let msg = "not found";
            let resp = format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{msg}",
                msg.len()
            );
            stream.write_all(resp.as_bytes()).await?;
        }
        Some(Reply::Ok {
            status,
            content_type,
            body,
        }) => {
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(resp.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
        }
        Some(Reply::CutOff { declared, body }) => {
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {declared}\r\nconnection: close\r\n\r\n{body}"
            );
            stream.write_all(resp.as_bytes()).await?;
        }
        Some(Reply::Hang) => {
            std::future::pending::<()>().await;
        }
        Some(Reply::Endless { bytes }) => {
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
                )
                .await?;
            let line = "vllm:num_requests_running 1\n".repeat(1024);
            let mut sent = 0;
            while sent < bytes {
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    return Ok(());
                }
                sent += line.len();
            }
            stream.write_all(b"0\r\n\r\n").await?;
        }
    }
    stream.shutdown().await?;
    Ok(())
}
