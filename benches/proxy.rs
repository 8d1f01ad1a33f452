//! Request proxy overhead: the real `gpuscale proxy` process against a
//! direct connection to the same upstream, in the same run.
//!
//! * **upstream**: an HTTP/1.1 server in this process (the project's
//!   `server::serve`): `POST /v1/completions` answers a ~300-byte JSON
//!   completion at once; `POST /v1/chat/completions?chunks=K&every_us=U`
//!   streams K server-sent events U µs apart, each carrying the instant it
//!   was written (nanoseconds since the run started).
//! * **proxy**: `gpuscale proxy` as a child process (no agent, unlimited
//!   batch limit: every request still passes the admission queue, is
//!   measured and streamed through), so its CPU time and memory are its own
//!   (`/proc/<pid>/stat`, `/proc/<pid>/status`).
//! * **clients**: hyper clients in this process, `TCP_NODELAY`.
//!
//! Cases:
//! 1. *Per request*: sequential small completions, alternating direct and
//!    proxied; latency from send to the end of the response.
//! 2. *Per chunk*: 64 concurrent streams of 100 events 10 ms apart, direct
//!    then proxied; latency of each event from its write at the upstream
//!    to its arrival at the client. Once in step (all 64 events of a round
//!    written at once, as a decode step of a batch of 64 produces them),
//!    once out of step (phases spread over the period).
//! 3. *Requests per core*: 64 clients in a closed loop for
//!    `PROXY_BENCH_SECONDS` (default 3), direct then proxied; requests
//!    per CPU-second of the proxy process.
//!
//! Cases 1 and 3 run two proxies: the default (a new connection to the
//! upstream per request) and `--reuse-upstream-connections`.
//! 4. *Memory*: a fresh proxy process, 1,000 concurrent streams (one event
//!    every 100 ms) all open; its resident memory then.
//!
//! 5. *Activator*: `gpuscale activator` (no scaler, its workload ready)
//!    in front of the same upstream: sequential completions interleaved
//!    with direct ones (added p50/p99), and the closed loop's requests
//!    per activator CPU-second. `PROXY_BENCH_CASES=activator` runs only
//!    this case.
//!
//! Run: `cargo bench --bench proxy`. `PROXY_BENCH_PROXY_THREADS` sets the
//! proxy's worker threads (default 1, a sidecar's core),
//! `PROXY_BENCH_CLIENT_THREADS` this process's (default 1).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

const COMPLETION: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1700000000,"model":"bench","choices":[{"index":0,"text":" a short answer of a few tokens","finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#;

fn full(s: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(s.into()))
}

fn query(uri: &http::Uri, key: &str, default: u64) -> u64 {
    uri.query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        })
        .unwrap_or(default)
}

async fn upstream(req: Request<Incoming>, epoch: Instant) -> Response<Body> {
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    // Read the request body first, as an engine does.
    let _ = req.into_body().collect().await;
    if path == "/health" {
        return Response::new(full("ok"));
    }
    if path == "/v1/completions" {
        let mut r = Response::new(full(COMPLETION));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    let chunks = query(&uri, "chunks", 100);
    let every = Duration::from_micros(query(&uri, "every_us", 10_000));
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        for i in 0..chunks {
            if i > 0 {
                next += every;
                tokio::time::sleep_until(next).await;
            }
            let t = epoch.elapsed().as_nanos();
            let event = format!(
                "data: {{\"t\":{t},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok\"}}}}]}}\n\n"
            );
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
            .await;
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    r
}

async fn start_upstream(epoch: Instant) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let addr = listener.local_addr().expect("local address");
    let service =
        service_fn(move |req| async move { Ok::<_, Infallible>(upstream(req, epoch).await) });
    tokio::spawn(gpuscale_proxy::server::serve(
        listener,
        service,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `gpuscale proxy` in front of `upstream`; killed when dropped.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyProcess {
    async fn start(upstream: SocketAddr, reuse: bool) -> Self {
        let args = [
            "proxy".to_string(),
            "--agent=off".into(),
            format!("--upstream=http://{upstream}"),
            "--max-queue=100000".into(),
        ];
        Self::spawn(&args, reuse).await
    }

    /// `gpuscale activator` with one workload at `upstream` (no scaler).
    async fn activator(upstream: SocketAddr) -> Self {
        let args = [
            "activator".to_string(),
            "--scaler=off".into(),
            format!("--workload=bench/m=http://{upstream}"),
            "--max-held=100000".into(),
        ];
        Self::spawn(&args, false).await
    }

    async fn spawn(args: &[String], reuse: bool) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let child = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
            .args(args)
            .args(["--listen", &addr.to_string(), "--admin-addr", "off"])
            .args(reuse.then_some("--reuse-upstream-connections"))
            .env("RUST_LOG", "warn")
            .env("TOKIO_WORKER_THREADS", proxy_threads().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gpuscale proxy");
        let proxy = Self { child, addr };
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return proxy;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("gpuscale {} did not listen on {addr}", args[0]);
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Worker threads of the proxy's runtime (`PROXY_BENCH_PROXY_THREADS`,
/// default 1: one core, as a sidecar gets).
fn proxy_threads() -> usize {
    std::env::var("PROXY_BENCH_PROXY_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let after = stat.rsplit_once(')').expect("stat has (comm)").1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields; `after` starts at the 3rd.
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `(VmRSS, VmHWM)` in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

fn client() -> Client<HttpConnector, Body> {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(c)
}

async fn complete(c: &Client<HttpConnector, Body>, to: SocketAddr) -> Duration {
    let req = Request::post(format!("http://{to}/v1/completions"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(r#"{"model":"bench","prompt":"hello","max_tokens":8}"#))
        .expect("a request");
    let start = Instant::now();
    let resp = c.request(req).await.expect("a response");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.into_body().collect().await.expect("the body");
    start.elapsed()
}

/// Streams one request; the latency of each event, and when the first came.
async fn stream(
    c: Client<HttpConnector, Body>,
    to: SocketAddr,
    chunks: u64,
    every_us: u64,
    epoch: Instant,
    first: Option<Arc<AtomicU64>>,
) -> Vec<Duration> {
    let req = Request::post(format!(
        "http://{to}/v1/chat/completions?chunks={chunks}&every_us={every_us}"
    ))
    .header(header::CONTENT_TYPE, "application/json")
    .body(full(r#"{"model":"bench","stream":true,"messages":[]}"#))
    .expect("a request");
    let resp = c.request(req).await.expect("a response");
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut lat = Vec::with_capacity(chunks as usize);
    while let Some(frame) = body.frame().await {
        let now = epoch.elapsed().as_nanos();
        let Ok(data) = frame.expect("a frame").into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event).expect("utf-8");
            if let Some(t) = text
                .strip_prefix("data: {\"t\":")
                .and_then(|r| r.split(',').next())
                .and_then(|t| t.parse::<u128>().ok())
            {
                if lat.is_empty()
                    && let Some(f) = &first
                {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                lat.push(Duration::from_nanos((now.saturating_sub(t)) as u64));
            }
        }
    }
    assert_eq!(lat.len() as u64, chunks, "every event arrived");
    lat
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Dist {
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

fn dist(mut v: Vec<Duration>) -> Dist {
    v.sort();
    Dist {
        p50: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
        p999: percentile(&v, 0.999),
    }
}

fn added(p: Duration, d: Duration) -> f64 {
    us(p) - us(d)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

async fn closed_loop(
    c: &Client<HttpConnector, Body>,
    to: SocketAddr,
    clients: usize,
    for_: Duration,
) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + for_;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, done) = (c.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    complete(&c, to).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client");
    }
    done.load(Ordering::Relaxed)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Requests per second and per proxy CPU-second of a closed loop.
async fn throughput(
    c: &Client<HttpConnector, Body>,
    to: SocketAddr,
    pid: Option<u32>,
    window: Duration,
) -> (f64, Option<f64>) {
    let cpu0 = pid.map(cpu_seconds);
    let t0 = Instant::now();
    let n = closed_loop(c, to, 64, window).await as f64;
    let wall = t0.elapsed().as_secs_f64();
    let per_cpu = pid.zip(cpu0).map(|(p, c0)| n / (cpu_seconds(p) - c0));
    (n / wall, per_cpu)
}

/// Case 5: the activator against a direct connection, in the same run.
async fn activator_case(c: &Client<HttpConnector, Body>, up: SocketAddr, window: Duration) {
    let act = ProxyProcess::activator(up).await;
    // Ready once its probe found the upstream's /health.
    for _ in 0..500 {
        let req = Request::post(format!("http://{}/v1/completions", act.addr))
            .body(full("{}"))
            .expect("a request");
        if let Ok(r) = c.request(req).await
            && r.status().is_success()
        {
            let _ = r.into_body().collect().await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let n = 5000;
    for _ in 0..500 {
        complete(c, up).await;
        complete(c, act.addr).await;
    }
    let (mut d, mut a) = (Vec::new(), Vec::new());
    let cpu0 = cpu_seconds(act.pid());
    for _ in 0..n {
        d.push(complete(c, up).await);
        a.push(complete(c, act.addr).await);
    }
    let cpu_per_request = (cpu_seconds(act.pid()) - cpu0) / n as f64;
    let (d, a) = (dist(d), dist(a));
    let (direct_rps, _) = throughput(c, up, None, window).await;
    let (act_rps, act_cpu) = throughput(c, act.addr, Some(act.pid()), window).await;
    println!(
        "\ngpuscale activator (workload ready, no scaler; a new upstream connection per request), load average {}\n",
        load_average()
    );
    println!("| path | p50 | p99 | p99.9 | added p50 | added p99 |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| request, direct | {:.0} µs | {:.0} µs | {:.0} µs | | |",
        us(d.p50),
        us(d.p99),
        us(d.p999)
    );
    println!(
        "| request, through the activator | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
        us(a.p50),
        us(a.p99),
        us(a.p999),
        added(a.p50, d.p50),
        added(a.p99, d.p99)
    );
    println!(
        "\nactivator CPU time {:.0} µs per request; closed loop, 64 clients, {:.0} s each: direct {direct_rps:.0} requests/s; through the activator {act_rps:.0} requests/s, {:.0} per activator CPU-second",
        cpu_per_request * 1e6,
        window.as_secs_f64(),
        act_cpu.unwrap_or(f64::NAN)
    );
}

async fn run() {
    let epoch = Instant::now();
    if std::env::var("PROXY_BENCH_CASES").is_ok_and(|c| c == "activator") {
        let seconds: f64 = std::env::var("PROXY_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0);
        let up = start_upstream(epoch).await;
        activator_case(&client(), up, Duration::from_secs_f64(seconds)).await;
        return;
    }
    let seconds: f64 = std::env::var("PROXY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let load_before = load_average();
    let up = start_upstream(epoch).await;
    let fresh = ProxyProcess::start(up, false).await;
    let reuse = ProxyProcess::start(up, true).await;
    let c = client();
    println!(
        "gpuscale proxy benchmark: {} CPUs, upstream and clients in this process (1 thread), each proxy a child process ({} worker thread{})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        proxy_threads(),
        if proxy_threads() == 1 { "" } else { "s" },
    );

    // 1. Per request, the three paths interleaved.
    let n = 5000;
    for _ in 0..500 {
        complete(&c, up).await;
        complete(&c, fresh.addr).await;
        complete(&c, reuse.addr).await;
    }
    let (mut d, mut f, mut r) = (Vec::new(), Vec::new(), Vec::new());
    let cpu0 = (cpu_seconds(fresh.pid()), cpu_seconds(reuse.pid()));
    for _ in 0..n {
        d.push(complete(&c, up).await);
        f.push(complete(&c, fresh.addr).await);
        r.push(complete(&c, reuse.addr).await);
    }
    let cpu_per_request = (
        (cpu_seconds(fresh.pid()) - cpu0.0) / n as f64,
        (cpu_seconds(reuse.pid()) - cpu0.1) / n as f64,
    );
    let (d, f, r) = (dist(d), dist(f), dist(r));

    // 2. Per streamed chunk: 64 streams in step (every stream's event in
    // the same instant, as one decode step of a batch of 64 produces
    // them), then out of step (phases spread over the 10 ms).
    let chunk_case = |to: SocketAddr, in_step: bool| {
        let c = c.clone();
        async move {
            let tasks: Vec<_> = (0..64u64)
                .map(|i| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        if !in_step {
                            tokio::time::sleep(Duration::from_micros(i * 10_000 / 64)).await;
                        }
                        stream(c, to, 100, 10_000, epoch, None).await
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.expect("a stream"));
            }
            all
        }
    };
    let dc = dist(chunk_case(up, true).await);
    let cpu0 = cpu_seconds(fresh.pid());
    let fc = chunk_case(fresh.addr, true).await;
    let cpu_per_chunk = (cpu_seconds(fresh.pid()) - cpu0) / fc.len() as f64;
    let fc = dist(fc);
    let dc_spread = dist(chunk_case(up, false).await);
    let fc_spread = dist(chunk_case(fresh.addr, false).await);

    // 3. Requests per core.
    let window = Duration::from_secs_f64(seconds);
    let (direct_rps, _) = throughput(&c, up, None, window).await;
    let (fresh_rps, fresh_cpu) = throughput(&c, fresh.addr, Some(fresh.pid()), window).await;
    let (reuse_rps, reuse_cpu) = throughput(&c, reuse.addr, Some(reuse.pid()), window).await;
    drop((fresh, reuse));

    // 4. Memory at 1,000 concurrent streams, on a fresh proxy.
    let proxy = ProxyProcess::start(up, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (idle_rss, _) = memory_mib(proxy.pid());
    let first = Arc::new(AtomicU64::new(0));
    let streams = 1000;
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(stream(
                c.clone(),
                proxy.addr,
                60,
                100_000,
                epoch,
                Some(first.clone()),
            ))
        })
        .collect();
    while first.load(Ordering::SeqCst) < streams {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, _) = memory_mib(proxy.pid());
    for t in tasks {
        t.await.expect("a stream");
    }
    let (_, hwm) = memory_mib(proxy.pid());

    println!(
        "load average before {load_before}, after {}\n",
        load_average()
    );
    println!("| path | p50 | p99 | p99.9 | added p50 | added p99 | target (added p99) |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    let row = |what: &str, x: &Dist, base: &Dist, target: f64| {
        let added99 = added(x.p99, base.p99);
        println!(
            "| {what} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {added99:.0} µs | < {target:.0} µs: {} |",
            us(x.p50),
            us(x.p99),
            us(x.p999),
            added(x.p50, base.p50),
            verdict(added99 < target)
        );
    };
    println!(
        "| request, direct | {:.0} µs | {:.0} µs | {:.0} µs | | | |",
        us(d.p50),
        us(d.p99),
        us(d.p999)
    );
    row("request, proxied (new upstream connection)", &f, &d, 1000.0);
    row(
        "request, proxied (--reuse-upstream-connections)",
        &r,
        &d,
        1000.0,
    );
    for (what, direct, proxied) in [
        ("in step", &dc, &fc),
        ("out of step", &dc_spread, &fc_spread),
    ] {
        println!(
            "| chunk, 64 streams {what}, direct | {:.0} µs | {:.0} µs | {:.0} µs | | | |",
            us(direct.p50),
            us(direct.p99),
            us(direct.p999)
        );
        row(
            &format!("chunk, 64 streams {what}, proxied"),
            proxied,
            direct,
            100.0,
        );
    }
    println!(
        "\n({n} sequential completions per path; 64 streams x 100 events 10 ms apart per path)"
    );
    println!(
        "\nproxy CPU time: {:.0} µs per request (new upstream connection), {:.0} µs (--reuse-upstream-connections), {:.1} µs per streamed chunk (the streams in step; includes the streams' requests)",
        cpu_per_request.0 * 1e6,
        cpu_per_request.1 * 1e6,
        cpu_per_chunk * 1e6,
    );
    println!(
        "\nclosed loop, 64 clients, {seconds} s each: direct {direct_rps:.0} requests/s; \
         proxied {fresh_rps:.0} requests/s, {:.0} per proxy CPU-second (new upstream connections); \
         {reuse_rps:.0} requests/s, {:.0} per proxy CPU-second (--reuse-upstream-connections)",
        fresh_cpu.unwrap_or(f64::NAN),
        reuse_cpu.unwrap_or(f64::NAN),
    );
    println!(
        "\nmemory: idle {idle_rss:.1} MiB; {streams} concurrent streams open: RSS {rss:.1} MiB (peak VmHWM {hwm:.1} MiB), target < 50 MiB: {}",
        verdict(rss < 50.0 && hwm < 50.0)
    );
    drop(proxy);

    // 5. The activator.
    activator_case(&c, up, window).await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("PROXY_BENCH_CLIENT_THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1),
        )
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}
