//! Forwarding one request to an upstream HTTP/1.1 server, bodies streamed
//! both ways.
//!
//! * The request body is handed to the upstream as it arrives; the
//!   response body is handed to the client frame by frame as the upstream
//!   sends it (an SSE stream passes through unbuffered); trailers pass both
//!   ways (`TE: trailers` is forwarded so the upstream sends them).
//! * Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and the headers it
//!   names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `TE`
//!   other than `trailers`, `Upgrade`, `Proxy-Authorization`,
//!   `Proxy-Authenticate`) are not forwarded; everything else is, `Host`
//!   included.
//! * Upgrades (WebSocket, `CONNECT`) are refused cleanly with 501 and a
//!   JSON error ([`refuse_upgrade`]); an `Upgrade: h2c` offer is ignored as
//!   RFC 9113 allows.
//! * [`ObservedBody`] wraps a response body for an [`Observe`]r that sees
//!   each data frame and, exactly once, how the body ended.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::measure::End;
use crate::reply;

/// Bytes read from the upstream at a time.
const UPSTREAM_READ_BUFFER: usize = 4096;

/// How the forwarder connects to its upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Deadline of a new TCP connection to the upstream.
    pub connect_timeout: Duration,
    /// Send requests over kept-alive connections. Off, every request gets
    /// a new connection: llama.cpp's `llama-server` closes its connection
    /// after each streamed response without saying so, and a request sent
    /// on it then fails; a new loopback connection costs tens of
    /// microseconds.
    pub reuse_connections: bool,
    /// An idle kept-alive connection is closed after this long: shorter
    /// than the upstream's own keep-alive timeout (uvicorn's is 5 s), so the
    /// upstream never closes one as a request is sent on it.
    pub pool_idle_timeout: Duration,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            reuse_connections: false,
            pool_idle_timeout: Duration::from_secs(4),
        }
    }
}

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream}: {message}")]
pub struct ForwardError {
    pub upstream: String,
    pub message: String,
}

/// Forwards requests to one upstream; cloning shares its connection pool.
#[derive(Debug, Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, RequestBody>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

impl Forwarder {
    /// A forwarder to `upstream` (`http://host:port`, no path).
    pub fn new(upstream: &str, config: &ForwardConfig) -> Result<Self, ProxyError> {
        let bad = |why: &str| ProxyError::config("--upstream", upstream, why);
        let uri: Uri = upstream
            .parse()
            .map_err(|_| bad("an http://host:port URL"))?;
        if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
            return Err(bad("an http:// URL (the engine in the same pod)"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad("an http://host:port URL"))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("no path: requests keep their own"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            // One page per upstream connection: a streamed event is far
            // smaller, and a thousand open streams stay cheap.
            .http1_read_buf_exact_size(UPSTREAM_READ_BUFFER);
        if !config.reuse_connections {
            builder.pool_max_idle_per_host(0);
        }
        let client = builder.build(connector);
        Ok(Self {
            client,
            scheme: http::uri::Scheme::HTTP,
            authority,
        })
    }

    /// The upstream as `http://host:port`.
    pub fn upstream(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// Sends `req` upstream; resolves when the response head arrives.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ForwardError> {
        self.forward_body(req.map(RequestBody::Streamed)).await
    }

    /// As [`Forwarder::forward`], for a request whose body was read first.
    pub async fn forward_body(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let (mut parts, body) = req.into_parts();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(uri).map_err(|e| self.error(e))?;
        if parts.headers.get(header::HOST).is_none()
            && let Some(host) = original_authority(&parts)
        {
            parts.headers.insert(header::HOST, host);
        }
        strip_hop_by_hop(&mut parts.headers, true);
        parts.version = http::Version::HTTP_11;
        let resp = self
            .client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| self.error(e))?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, body))
    }

    fn error(&self, e: impl std::error::Error) -> ForwardError {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        ForwardError {
            upstream: self.upstream(),
            message,
        }
    }
}

/// An HTTP/2 request names its authority in the URI, not in `Host`.
fn original_authority(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes hop-by-hop headers; `TE: trailers` stays on requests.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, request: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if n != header::TE {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    let te_trailers = request
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A 501 for a request asking to switch protocols (WebSocket, `CONNECT`);
/// `None` for one that can be forwarded.
pub fn refuse_upgrade<B, O: Observe>(req: &Request<B>) -> Option<Response<ResponseBody<O>>> {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .map(|v| v.to_str().unwrap_or("?"))
        .filter(|v| !v.trim().eq_ignore_ascii_case("h2c"));
    if req.method() == Method::CONNECT || upgrade.is_some() {
        let what = upgrade.map_or_else(|| "CONNECT".to_string(), |u| format!("Upgrade: {u}"));
        return Some(reply::error(
            StatusCode::NOT_IMPLEMENTED,
            "upgrade_not_supported",
            &format!(
                "{what} is not supported by this proxy: only plain HTTP requests are forwarded"
            ),
            None,
            false,
        ));
    }
    None
}

/// Sees a response body as it passes; see [`ObservedBody`].
pub trait Observe: Send + Unpin + 'static {
    /// A data frame that arrived at `at`.
    fn on_data(&mut self, data: &Bytes, at: Instant);
    /// The body ended at `at`; called exactly once.
    fn on_end(&mut self, at: Instant, end: End);
}

/// A response body passed through frame by frame while an [`Observe`]r
/// watches. Dropped before its end, it reports [`End::ClientGone`].
#[derive(Debug)]
pub struct ObservedBody<O: Observe> {
    inner: Incoming,
    observer: Option<O>,
}

impl<O: Observe> ObservedBody<O> {
    pub fn new(inner: Incoming, observer: O) -> Self {
        Self {
            inner,
            observer: Some(observer),
        }
    }

    fn end(&mut self, end: End) {
        if let Some(mut o) = self.observer.take() {
            o.on_end(Instant::now(), end);
        }
    }
}

impl<O: Observe> Drop for ObservedBody<O> {
    fn drop(&mut self) {
        self.end(End::ClientGone);
    }
}

impl<O: Observe> Body for ObservedBody<O> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(o)) = (frame.data_ref(), this.observer.as_mut()) {
                    o.on_data(data, Instant::now());
                }
                // Trailers are always last; a server may not poll again
                // after them (nor after a frame that ends the body).
                if frame.is_trailers() || this.inner.is_end_stream() {
                    this.end(End::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(End::UpstreamError);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.end(End::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of a request sent upstream: passed through as it arrives, or
/// read whole first (the activator reads a held request's body to see
/// whether it asks for a stream).
#[derive(Debug)]
pub enum RequestBody {
    Streamed(Incoming),
    Read(Full<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Read(f) => match Pin::new(f).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(b) => b.is_end_stream(),
            RequestBody::Read(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(b) => b.size_hint(),
            RequestBody::Read(f) => f.size_hint(),
        }
    }
}

/// The body of every response the proxy sends.
#[derive(Debug)]
pub enum ResponseBody<O: Observe = NoObserver> {
    /// A body the proxy made (an error).
    Full(Full<Bytes>),
    /// The upstream's body, passed through as is.
    Upstream(Incoming),
    /// The upstream's body, observed.
    Observed(ObservedBody<O>),
    /// Frames sent by a task (the activator's keep-alives of a held
    /// stream, then the upstream's frames as they arrive).
    Channel(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, hyper::Error>>),
}

/// The observer of bodies nobody observes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observe for NoObserver {
    fn on_data(&mut self, _: &Bytes, _: Instant) {}
    fn on_end(&mut self, _: Instant, _: End) {}
}

impl<O: Observe> ResponseBody<O> {
    /// The same body as the response body of another observer type (only
    /// for bodies without an observer: made or passed through).
    pub fn into_unobserved<P: Observe>(self) -> Option<ResponseBody<P>> {
        match self {
            ResponseBody::Full(f) => Some(ResponseBody::Full(f)),
            ResponseBody::Upstream(b) => Some(ResponseBody::Upstream(b)),
            ResponseBody::Channel(c) => Some(ResponseBody::Channel(c)),
            ResponseBody::Observed(_) => None,
        }
    }
}

impl<O: Observe> Body for ResponseBody<O> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(f) => match Pin::new(f).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            ResponseBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Observed(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Channel(c) => c.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(f) => f.is_end_stream(),
            ResponseBody::Upstream(b) => b.is_end_stream(),
            ResponseBody::Observed(b) => b.is_end_stream(),
            ResponseBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(f) => f.size_hint(),
            ResponseBody::Upstream(b) => b.size_hint(),
            ResponseBody::Observed(b) => b.size_hint(),
            ResponseBody::Channel(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop, te"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h, true);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "trailer", "x-request-id"]);
        assert_eq!(h[header::TE], "trailers");
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get(header::TE).is_none(), "TE is a request header");
    }

    #[test]
    fn websocket_and_connect_are_refused_and_h2c_is_ignored() {
        let ws = Request::get("/v1/realtime")
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .body(())
            .unwrap();
        let r: Response<ResponseBody> = refuse_upgrade(&ws).unwrap();
        assert_eq!(r.status(), StatusCode::NOT_IMPLEMENTED);
        let connect = Request::connect("example:443").body(()).unwrap();
        assert!(refuse_upgrade::<_, NoObserver>(&connect).is_some());
        let h2c = Request::get("/")
            .header(header::UPGRADE, "h2c")
            .body(())
            .unwrap();
        assert!(refuse_upgrade::<_, NoObserver>(&h2c).is_none());
    }

    #[test]
    fn upstream_urls_are_checked() {
        let c = ForwardConfig::default();
        assert!(Forwarder::new("http://127.0.0.1:8000", &c).is_ok());
        assert!(Forwarder::new("http://127.0.0.1:8000/", &c).is_ok());
        for bad in ["https://x:1", "127.0.0.1:8000", "http://x:1/v1", "nonsense"] {
            let e = Forwarder::new(bad, &c).unwrap_err().to_string();
            assert!(e.contains("--upstream"), "{bad}: {e}");
        }
    }
}
