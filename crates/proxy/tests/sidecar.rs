//! The sidecar over real sockets: a client, the proxy, and an upstream
//! that the test steers chunk by chunk; and the link to a real agent
//! `ServingService` over a unix socket.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gpuscale_core::{PodRef, ServingAddr, Timestamp};
use gpuscale_proxy::{Limit, ProxyConfig, RunningProxy};
use gpuscale_telemetry::{PushConfig, push_source};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type Frames = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type FrameRx = mpsc::Receiver<Result<Frame<Bytes>, Infallible>>;

/// What the upstream saw of one request.
#[derive(Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    /// The request body frames as they arrived, and its trailers.
    body: mpsc::Receiver<Frame<Bytes>>,
    /// Send the response frames here (headers first through `respond`).
    respond: oneshot::Sender<(Response<()>, FrameRx)>,
}

/// An upstream that hands every request to the test.
async fn steered_upstream() -> (SocketAddr, mpsc::Receiver<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(64);
    let service = service_fn(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, mut body) = req.into_parts();
            let (frames_tx, frames_rx) = mpsc::channel(64);
            tokio::spawn(async move {
                while let Some(Ok(f)) = body.frame().await {
                    if frames_tx.send(f).await.is_err() {
                        break;
                    }
                }
            });
            let (respond, wait) = oneshot::channel();
            tx.send(Seen {
                path: parts.uri.path().to_string(),
                headers: parts.headers,
                body: frames_rx,
                respond,
            })
            .await
            .unwrap();
            let (head, frames) = wait.await.unwrap();
            let (parts, ()) = head.into_parts();
            Ok::<_, Infallible>(Response::from_parts(
                parts,
                StreamBody::new(ReceiverStream::new(frames)),
            ))
        }
    });
    let listener = tokio::net::TcpListener::from_std(listener.into_std().unwrap()).unwrap();
    tokio::spawn(gpuscale_proxy::server::serve(
        listener,
        service,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    (addr, rx)
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

fn streamed_body() -> (Frames, Body) {
    let (tx, rx) = mpsc::channel(16);
    (tx, BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
}

fn full(s: &str) -> Body {
    BodyExt::boxed(Full::new(Bytes::from(s.to_string())))
}

fn data(s: &str) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from(s.to_string())))
}

async fn proxy(upstream: SocketAddr, edit: impl FnOnce(&mut ProxyConfig)) -> RunningProxy {
    let mut c = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), format!("http://{upstream}"));
    c.admin = Some("127.0.0.1:0".parse().unwrap());
    edit(&mut c);
    gpuscale_proxy::start(c).await.unwrap()
}

fn post(p: &RunningProxy, path: &str, body: Body) -> Request<Body> {
    Request::post(format!("http://{}{path}", p.addr()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap()
}

async fn next_data(body: &mut Incoming) -> Bytes {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame within 10 s")
            .unwrap()
            .unwrap();
        if let Ok(d) = f.into_data() {
            return d;
        }
    }
}

/// Polls `cond` every 10 ms for up to 5 s (the assertion after it says what failed).
async fn eventually(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sse_head() -> Response<()> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(())
        .unwrap()
}

#[tokio::test]
async fn streams_pass_through_unbuffered_both_ways_with_headers_and_trailers() {
    let (up, mut seen) = steered_upstream().await;
    let p = proxy(up, |_| {}).await;
    let (req_tx, req_body) = streamed_body();
    let mut req = post(&p, "/v1/chat/completions?x=1", req_body);
    req.headers_mut()
        .insert("x-request-id", HeaderValue::from_static("r-1"));
    req.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    req.headers_mut()
        .insert("keep-alive", HeaderValue::from_static("timeout=5"));
    // HTTP/1.1 sends only the trailer fields declared up front.
    req.headers_mut()
        .insert(header::TRAILER, HeaderValue::from_static("x-req-trailer"));
    let c = client();
    let call = tokio::spawn(async move { c.request(req).await.unwrap() });

    // The request body: the upstream reads the first part before the
    // client has sent the second.
    req_tx.send(data("{\"stream\":")).await.unwrap();
    let mut s = seen.recv().await.unwrap();
    assert_eq!(s.path, "/v1/chat/completions");
    assert_eq!(s.headers["x-request-id"], "r-1");
    assert_eq!(s.headers[header::TE], "trailers");
    assert!(s.headers.get("keep-alive").is_none(), "hop-by-hop dropped");
    assert_eq!(
        s.body.recv().await.unwrap().into_data().unwrap(),
        "{\"stream\":"
    );
    req_tx.send(data("true}")).await.unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-req-trailer", HeaderValue::from_static("t"));
    req_tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
    drop(req_tx);
    assert_eq!(s.body.recv().await.unwrap().into_data().unwrap(), "true}");
    let t = s.body.recv().await.unwrap().into_trailers().unwrap();
    assert_eq!(t["x-req-trailer"], "t");

    // The response: each SSE chunk reaches the client before the next
    // one is sent.
    let (resp_tx, resp_rx) = mpsc::channel(16);
    let mut head = sse_head();
    head.headers_mut()
        .insert("x-engine", HeaderValue::from_static("e"));
    head.headers_mut()
        .insert(header::TRAILER, HeaderValue::from_static("x-resp-trailer"));
    s.respond.send((head, resp_rx)).unwrap();
    let resp = call.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-engine"], "e");
    let mut body = resp.into_body();
    for i in 0..3 {
        let chunk = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n");
        resp_tx.send(data(&chunk)).await.unwrap();
        assert_eq!(next_data(&mut body).await, chunk, "chunk {i} arrived alone");
    }
    let mut t = HeaderMap::new();
    t.insert("x-resp-trailer", HeaderValue::from_static("done"));
    resp_tx.send(Ok(Frame::trailers(t))).await.unwrap();
    drop(resp_tx);
    let rest = body.collect().await.unwrap();
    assert_eq!(rest.trailers().unwrap()["x-resp-trailer"], "done");

    let totals = p.totals();
    assert_eq!((totals.arrived, totals.finished), (1, 1));
    assert_eq!(totals.ttft.count(), 1);
    assert_eq!(totals.tpot.count(), 1, "three tokens: a TPOT");
    assert_eq!(totals.generation_tokens, 3);
    assert!(p.load().is_empty());
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_limit_queues_in_order_and_refuses_past_the_bound() {
    let (up, mut seen) = steered_upstream().await;
    let p = proxy(up, |c| {
        c.default_limit = Limit::At(1);
        c.max_queue = 2;
        c.queue_timeout = Duration::from_millis(300);
        c.retry_after = Duration::from_secs(2);
    })
    .await;
    let c = client();
    let mut calls = Vec::new();
    for i in 0..3 {
        let req = post(&p, &format!("/v1/completions/{i}"), full("{}"));
        let c = c.clone();
        calls.push(tokio::spawn(async move { c.request(req).await.unwrap() }));
        // Arrive in order.
        while p.totals().arrived < i + 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let first = seen.recv().await.unwrap();
    assert_eq!(first.path, "/v1/completions/0");
    assert_eq!((p.load().in_flight, p.load().queued), (1, 2));
    // A fourth: the queue is full.
    let resp = c
        .request(post(&p, "/v1/completions", full("{}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "queue_full");
    // The queued two pass their deadline while the first holds the slot.
    for call in calls.drain(1..) {
        let resp = call.await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }
    let (tx, rx) = mpsc::channel(1);
    first.respond.send((Response::new(()), rx)).unwrap();
    tx.send(data("{\"usage\":{\"completion_tokens\":5}}"))
        .await
        .unwrap();
    drop(tx);
    let resp = calls.pop().unwrap().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    let t = p.totals();
    assert_eq!(
        (
            t.arrived,
            t.finished,
            t.refused_queue_full,
            t.refused_timeout
        ),
        (4, 1, 1, 2)
    );
    assert_eq!(t.generation_tokens, 5, "read from the end of a plain body");
    assert_eq!(t.tpot.count(), 0, "no TPOT without a stream");

    // Raising the limit admits queued requests at once, in order.
    let mut waiting = Vec::new();
    for i in 0..2 {
        let req = post(&p, &format!("/v1/completions/q{i}"), full("{}"));
        let c = c.clone();
        waiting.push(tokio::spawn(async move { c.request(req).await.unwrap() }));
    }
    let held = p.load();
    assert!(held.queued + held.in_flight as usize <= 2);
    let s = seen.recv().await.unwrap();
    // The first one is in flight and holds the slot; the second waits.
    while p.load().queued < 1 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    p.set_limit(Limit::At(2));
    let s2 = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("admitted when the limit rose, with the first still in flight")
        .unwrap();
    assert_ne!(s.path, s2.path);
    for s in [s, s2] {
        let (tx, rx) = mpsc::channel(1);
        s.respond.send((Response::new(()), rx)).unwrap();
        drop(tx);
    }
    for w in waiting {
        assert_eq!(w.await.unwrap().status(), StatusCode::OK);
    }
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn gets_pass_by_the_queue_and_upgrades_and_dead_upstreams_get_json_errors() {
    let (up, mut seen) = steered_upstream().await;
    let p = proxy(up, |c| c.default_limit = Limit::At(1)).await;
    let c = client();
    // The slot is taken...
    let req = post(&p, "/v1/completions", full("{}"));
    let c1 = c.clone();
    let busy = tokio::spawn(async move { c1.request(req).await.unwrap() });
    let hold = seen.recv().await.unwrap();
    // ... yet GET /metrics of the engine passes at once, unmeasured.
    let c2 = c.clone();
    let addr = p.addr();
    let get = tokio::spawn(async move {
        c2.request(
            Request::get(format!("http://{addr}/metrics"))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap()
    });
    let m = seen.recv().await.unwrap();
    assert_eq!(m.path, "/metrics");
    let (tx, rx) = mpsc::channel(1);
    m.respond.send((Response::new(()), rx)).unwrap();
    tx.send(data("engine_metric 1\n")).await.unwrap();
    drop(tx);
    assert_eq!(get.await.unwrap().status(), StatusCode::OK);
    let (tx, rx) = mpsc::channel(1);
    hold.respond.send((Response::new(()), rx)).unwrap();
    drop(tx);
    busy.await.unwrap();
    assert_eq!(p.totals().arrived, 1);

    let ws = Request::get(format!("http://{}/v1/realtime", p.addr()))
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(full(""))
        .unwrap();
    let resp = c.request(ws).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "upgrade_not_supported");

    // An upstream nobody listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let p2 = proxy(dead_addr, |_| {}).await;
    let resp = c
        .request(post(&p2, "/v1/completions", full("{}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(p2.totals().failed, 1);
    assert!(p2.load().is_empty(), "the slot was given back");
    p.shutdown().await.unwrap();
    p2.shutdown().await.unwrap();
}

async fn admin_get(p: &RunningProxy, path: &str) -> (StatusCode, String) {
    let resp = client()
        .request(
            Request::get(format!("http://{}{path}", p.admin_addr().unwrap()))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn drain_lets_streams_finish_refuses_new_requests_with_close_and_reports_empty() {
    let (up, mut seen) = steered_upstream().await;
    let p = proxy(up, |_| {}).await;
    assert_eq!(admin_get(&p, "/readyz").await.0, StatusCode::OK);
    let c = client();
    let req = post(&p, "/v1/chat/completions", full("{\"stream\":true}"));
    let c1 = c.clone();
    let call = tokio::spawn(async move { c1.request(req).await.unwrap() });
    let s = seen.recv().await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    s.respond.send((sse_head(), rx)).unwrap();
    let mut body = call.await.unwrap().into_body();
    tx.send(data("data: {\"content\":\"a\"}\n\n"))
        .await
        .unwrap();
    next_data(&mut body).await;

    // /drain (the engine's preStop hook) waits for the stream.
    let p = Arc::new(p);
    let p2 = p.clone();
    let drained = tokio::spawn(async move { admin_get(&p2, "/drain").await });
    while !p.load().draining {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        admin_get(&p, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let resp = c
        .request(post(&p, "/v1/chat/completions", full("{}")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()[header::CONNECTION], "close");
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    assert!(!drained.is_finished(), "a stream is still in flight");

    tx.send(data("data: {\"content\":\"b\"}\n\ndata: [DONE]\n\n"))
        .await
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(
        rest.ends_with(b"data: [DONE]\n\n"),
        "the stream finished whole"
    );
    let (status, text) = drained.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["drained"].as_bool(), v["in_flight"].as_u64()),
        (Some(true), Some(0))
    );
    let (_, metrics) = admin_get(&p, "/metrics").await;
    assert!(
        metrics.contains("gpuscale_proxy_requests_total{outcome=\"draining\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gpuscale_proxy_draining 1"));
    assert!(metrics.contains("gpuscale_proxy_ttft_seconds_count 1"));
    Arc::into_inner(p).unwrap().shutdown().await.unwrap();
}

#[tokio::test]
async fn the_agent_sets_the_limit_and_the_drain_and_receives_the_stats() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("serving.sock");
    let (service, mut source, limits) = push_source(PushConfig::default()).unwrap();
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let agent = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    let pod = PodRef::new("llm", "llama-0");
    limits.set_batch_limit(&pod, Some(3));
    let (up, mut seen) = steered_upstream().await;
    let p = proxy(up, |c| {
        c.agent = Some(ServingAddr::Unix(socket.clone()));
        c.pod = Some(pod.clone());
        c.model = "m".into();
        c.report_interval = Duration::from_millis(100);
    })
    .await;
    eventually(|| p.load().limit == Limit::At(3)).await;
    assert_eq!(p.load().limit, Limit::At(3), "the agent's limit applies");
    assert!(p.agent_connected());
    limits.set_batch_limit(&pod, Some(5));
    eventually(|| p.load().limit == Limit::At(5)).await;
    assert_eq!(
        p.load().limit,
        Limit::At(5),
        "and changes without a restart"
    );

    // One streamed request, then the agent's sample shows it.
    let c = client();
    let req = post(&p, "/v1/chat/completions", full("{}"));
    let call = tokio::spawn(async move { c.request(req).await.unwrap() });
    let s = seen.recv().await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    s.respond.send((sse_head(), rx)).unwrap();
    let body = call.await.unwrap().into_body();
    tx.send(data(
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
    ))
    .await
    .unwrap();
    tx.send(data("data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":4}}\n\n")).await.unwrap();
    drop(tx);
    body.collect().await.unwrap();
    let mut sample = None;
    for i in 0..500 {
        let engines = source.collect(Timestamp::from_millis(i), &[]);
        if let Some(e) = engines
            .into_iter()
            .find(|e| e.pod == pod && e.ttft_seconds.as_ref().is_some_and(|h| h.count() == 1))
        {
            sample = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = sample.expect("the stats reached the agent");
    assert_eq!(e.model, "m");
    assert_eq!(e.batch_limit, Some(5));
    assert_eq!(e.requests_arrived_total, Some(1.0));
    assert_eq!(e.generation_tokens_total, Some(2.0));
    assert_eq!(e.prompt_tokens_total, Some(4.0));
    assert_eq!(e.tpot_seconds.as_ref().map(|h| h.count()), Some(1));
    assert_eq!(e.requests_running, Some(0.0));

    // The agent drains the pod: the proxy refuses new requests.
    limits.set_draining(&pod, true);
    eventually(|| p.load().draining).await;
    assert!(p.load().draining);
    limits.set_draining(&pod, false);
    eventually(|| !p.load().draining).await;
    assert!(!p.load().draining, "the agent may cancel its drain");
    p.shutdown().await.unwrap();
    agent.abort();
}

/// An upstream that, like llama.cpp's server after a streamed response,
/// closes its connection just after the response is written, without
/// saying so (no `Connection: close`). Counts the connections it accepted.
async fn closing_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let event = "data: {\"content\":\"a\"}\n\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n{:x}\r\n{event}\r\n0\r\n\r\n",
                    event.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
                // Closed a moment later (as llama-server's connection
                // thread ends), the keep-alive header notwithstanding.
                tokio::time::sleep(Duration::from_millis(5)).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn an_upstream_that_closes_after_each_stream_fails_no_request() {
    for reuse in [false, true] {
        let (up, accepted) = closing_upstream().await;
        let p = proxy(up, |c| {
            c.default_limit = Limit::At(1);
            c.forward.reuse_connections = reuse;
        })
        .await;
        // Queued behind one slot: each is sent the moment the one before
        // it ends, as the upstream closes that one's connection.
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let (c, req) = (client(), post(&p, "/v1/chat/completions", full("{}")));
                tokio::spawn(async move {
                    let resp = c.request(req).await.unwrap();
                    let status = resp.status();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    (status, body)
                })
            })
            .collect();
        let mut ok = 0;
        for call in calls {
            let (status, body) = call.await.unwrap();
            if status == StatusCode::OK {
                assert_eq!(body, "data: {\"content\":\"a\"}\n\n");
                ok += 1;
            }
        }
        if reuse {
            // What the default avoids: some were sent on a closing connection.
            assert!(ok < 20, "the race did not show; this test proves nothing");
        } else {
            assert_eq!(ok, 20, "every request answered");
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 20);
        }
        p.shutdown().await.unwrap();
    }
}
