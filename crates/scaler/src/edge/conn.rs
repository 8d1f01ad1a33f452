//! Connections on the scaler's gRPC port: accepted here (TLS handshakes in
//! their own tasks, bounded in time and number), then handed to tonic.
//!
//! Every connection is wrapped in an [`EdgeIo`], which closes it when
//! * the client has not sent the HTTP/2 connection preface within
//!   [`ConnLimits::preface_timeout`] of the connection being ready (a
//!   client that connects and says nothing, or speaks something else), or
//! * it has had no gRPC call open for [`ConnLimits::idle_timeout`] (HTTP/2
//!   keep-alive pings do not count as use).
//!
//! The connection's peer address and verified client certificates travel
//! to the request handlers as [`ConnInfo`] in the request extensions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::metrics::ScalerMetrics;

/// The HTTP/2 connection preface every gRPC client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Time limits of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// From the connection being ready (after TLS) to a complete HTTP/2 preface.
    pub preface_timeout: Duration,
    /// A connection with no call open for this long is closed.
    pub idle_timeout: Duration,
    /// TLS handshakes in progress at once; more connections are closed at once.
    pub max_handshakes: usize,
}

impl Default for ConnLimits {
    /// 10 s to start HTTP/2, 5 min idle, 256 handshakes at once.
    fn default() -> Self {
        Self {
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_handshakes: 256,
        }
    }
}

/// Calls open on one connection, and since when none has been.
#[derive(Debug)]
pub(crate) struct ConnState {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    /// Counts a call as open until the guard is dropped.
    pub(crate) fn open_call(self: &Arc<Self>) -> CallGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }
}

/// One open call on a connection.
#[derive(Debug)]
pub(crate) struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut since) = self.0.idle_since.lock()
        {
            *since = Instant::now();
        }
    }
}

/// What handlers learn about the connection a call came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, verified against the client CA.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    pub(crate) state: Arc<ConnState>,
}

/// A plaintext or TLS connection.
pub(crate) enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection as tonic sees it: closed when it never starts HTTP/2 or
/// stays idle (see the module docs).
pub(crate) struct EdgeIo {
    inner: Transport,
    info: ConnInfo,
    limits: ConnLimits,
    /// Bytes of the HTTP/2 preface seen so far (24: complete).
    preface: usize,
    timer: Pin<Box<Sleep>>,
    metrics: Arc<ScalerMetrics>,
}

impl EdgeIo {
    fn new(
        inner: Transport,
        info: ConnInfo,
        limits: ConnLimits,
        metrics: Arc<ScalerMetrics>,
    ) -> Self {
        Self {
            inner,
            info,
            limits,
            preface: 0,
            timer: Box::pin(tokio::time::sleep(limits.preface_timeout)),
            metrics,
        }
    }

    /// The timer fired: `Some(reason)` closes the connection, else the
    /// timer is set again.
    fn expired(&mut self) -> Option<&'static str> {
        if self.preface < PREFACE.len() {
            return Some("no_http2_preface");
        }
        let now = Instant::now();
        let state = &self.info.state;
        let next = if state.active.load(Ordering::Acquire) == 0 {
            let since = state.idle_since.lock().map(|s| *s).unwrap_or(now);
            let deadline = since + self.limits.idle_timeout;
            if deadline <= now {
                return Some("idle");
            }
            deadline
        } else {
            now + self.limits.idle_timeout
        };
        self.timer.as_mut().reset(next);
        None
    }

    fn observe(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.preface >= PREFACE.len() {
            return Ok(());
        }
        let want = &PREFACE[self.preface..];
        let n = want.len().min(bytes.len());
        if bytes[..n] != want[..n] {
            self.metrics.connection_closed("not_http2");
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 connection preface",
            ));
        }
        self.preface += n;
        if self.preface == PREFACE.len() {
            // From now on the timer watches for idleness.
            let idle = Instant::now() + self.limits.idle_timeout;
            self.timer.as_mut().reset(idle);
        }
        Ok(())
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.timer.as_mut().poll(cx).is_ready() {
            if let Some(reason) = this.expired() {
                this.metrics.connection_closed(reason);
                tracing::debug!(peer = ?this.info.remote, reason, "closing a connection");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, reason)));
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled()[before..].to_vec();
                this.observe(&filled)?;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for EdgeIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// The connections tonic serves: accepted, TLS done, wrapped.
pub(crate) type Incoming = ReceiverStream<Result<EdgeIo, io::Error>>;

/// Accepts on `listener` until shutdown; with `tls`, each handshake runs in
/// its own task, at most `limits.max_handshakes` at once and each within
/// `handshake_timeout`.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    limits: ConnLimits,
    metrics: Arc<ScalerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                a = listener.accept() => a,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little.
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let info = move |certs| ConnInfo {
                remote: Some(remote),
                certs,
                state: Arc::new(ConnState::new()),
            };
            match &tls {
                None => {
                    let io = EdgeIo::new(
                        Transport::Plain(stream),
                        info(None),
                        limits,
                        metrics.clone(),
                    );
                    if tx.send(Ok(io)).await.is_err() {
                        return;
                    }
                }
                Some((acceptor, timeout)) => {
                    let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                        metrics.connection_closed("too_many_handshakes");
                        continue;
                    };
                    let (acceptor, timeout, tx, metrics) =
                        (acceptor.clone(), *timeout, tx.clone(), metrics.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                let certs = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .map(|c| Arc::new(c.to_vec()));
                                let io = EdgeIo::new(
                                    Transport::Tls(Box::new(tls)),
                                    info(certs),
                                    limits,
                                    metrics,
                                );
                                let _ = tx.send(Ok(io)).await;
                            }
                            Ok(Err(e)) => {
                                metrics.connection_closed("tls_handshake_failed");
                                tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                metrics.connection_closed("tls_handshake_timeout");
                                tracing::debug!(peer = %remote, "TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
