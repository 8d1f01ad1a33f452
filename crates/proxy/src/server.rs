//! Serving a hyper service on a TCP listener: HTTP/1.1 and HTTP/2
//! (prior knowledge), `TCP_NODELAY` on every connection (a streamed token
//! is never held back by Nagle's algorithm), and a graceful stop: the
//! listener closes, open connections finish the requests they carry
//! (HTTP/2 gets `GOAWAY`, idle HTTP/1 connections close), and whatever is
//! still open after the grace period is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::error::ProxyError;

/// Binds `addr` for `what` (named in the error).
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Listen {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Serves `service` on `listener` until `stop` resolves, then stops
/// gracefully within `grace`.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    stop: impl Future<Output = ()>,
    grace: Duration,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service.clone())
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            info!(grace_ms = grace.as_millis() as u64, "connections still open after the grace period: closed");
        }
    }
}

/// The local address of a listener, for logs and tests.
pub fn local_addr(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}
