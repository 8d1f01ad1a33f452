//! Scaler ingest benchmark: GPU samples per second on one core, and the
//! delay from a sample's send to its visibility in the scaler's state.
//!
//! Setup, per number of concurrent agent streams N (1, 8, 64; each node has
//! 8 GPUs and every report after the snapshot is a delta carrying all 8 GPUs'
//! metrics):
//!
//! * **scaler**: the real `gpuscale_scaler::Scaler` (gRPC server, stream
//!   tasks, the state task, view publication) on a `current_thread` tokio
//!   runtime in its own thread: one core;
//! * **bare**: a tonic server on the same kind of runtime whose
//!   `AgentService.Report` only decodes the messages and counts them;
//! * **clients**: N real gRPC clients (one HTTP/2 connection each) on a
//!   separate one-worker runtime, sending over loopback as fast as flow
//!   control allows (throughput), then paced at half the measured rate
//!   (delay). The delay is measured from the moment the client queued a
//!   report to the moment a reader of the published `StateView` sees its
//!   sequence number.
//!
//! Every case runs twice: over plaintext h2c, and **with TLS and
//! authentication** as deployed: the scaler serving TLS (a certificate made
//! at start) with every agent presenting its own bearer token from a static
//! token file (reviewed once, then cached) that binds its stream to its
//! node, against a bare tonic server with tonic's own TLS (same
//! certificate). The per-stream report-rate limit is off: the bench
//! measures what the ingest path can take.
//!
//! Run: `cargo bench --bench ingest` (`INGEST_BENCH_SECONDS` sets the
//! measured seconds per case, default 3; `INGEST_BENCH_STREAMS` the stream
//! counts, default `1,8,64`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gpuscale_core::sample::{
    AgentHealth, GpuHealth, GpuInfo, GpuMetrics, GpuSample, NodeDelta, NodeSnapshot,
};
use gpuscale_core::{GpuUuid, NodeName, Timestamp};
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_client::AgentServiceClient;
use gpuscale_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use gpuscale_proto::{AgentReport, ReportBody};
use gpuscale_scaler::edge::{AuthConfig, AuthMode, TlsConfig, Transport};
use gpuscale_scaler::{Scaler, ScalerConfig, StateView};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;

const GPUS: usize = 8;
const TEMPLATES: usize = 16;

fn gpu(node: usize, i: usize, util: f64) -> GpuSample {
    let uuid = GpuUuid::new(format!("GPU-{node:08x}-0000-0000-0000-{i:012x}"));
    GpuSample {
        info: GpuInfo {
            uuid: uuid.clone(),
            index: i as u32,
            model_name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i),
            parent_uuid: None,
            mig_gpu_instance_id: None,
            gpm_supported: true,
            driver_version: "570.86.15".into(),
        },
        metrics: GpuMetrics {
            uuid,
            memory_used_bytes: Some(70 << 30),
            memory_free_bytes: Some(10 << 30),
            utilization_gpu_ratio: Some(util),
            utilization_memory_ratio: Some(util / 2.0),
            power_watts: Some(300.0 + 300.0 * util),
            power_limit_watts: Some(700.0),
            temperature_celsius: Some(40.0 + 30.0 * util),
            sm_clock_mhz: Some(1980),
            throttle_reasons: Some(0),
            ecc_uncorrected_total: Some(0),
            energy_joules_total: Some(1e6),
            gpm: None,
            health: GpuHealth::Healthy,
            xid_totals: Default::default(),
        },
    }
}

fn snapshot(node: usize) -> v1::NodeReport {
    (&AgentReport {
        boot_epoch: 1 + node as u64,
        seq: 1,
        sent_at: Timestamp(0),
        body: ReportBody::Snapshot(NodeSnapshot {
            node: NodeName::new(format!("bench-{node}")),
            agent_version: "bench".into(),
            sampled_at: Timestamp(0),
            sample_interval_ms: 1000,
            gpus: (0..GPUS).map(|i| gpu(node, i, 0.5)).collect(),
            pods: vec![],
            engines: vec![],
            agent: AgentHealth::default(),
        }),
    })
        .into()
}

fn deltas(node: usize) -> Vec<v1::NodeReport> {
    (0..TEMPLATES)
        .map(|k| {
            (&AgentReport {
                boot_epoch: 1 + node as u64,
                seq: 0,
                sent_at: Timestamp(0),
                body: ReportBody::Delta(NodeDelta {
                    sampled_at: Timestamp(k as i64),
                    gpu_metrics: (0..GPUS)
                        .map(|i| gpu(node, i, (k as f64 + i as f64) / 32.0).metrics)
                        .collect(),
                    ..NodeDelta::default()
                }),
            })
                .into()
        })
        .collect()
}

fn window() -> Option<u32> {
    std::env::var("INGEST_BENCH_WINDOW")
        .ok()
        .and_then(|s| s.parse().ok())
}

/// When each sequence number was queued, in nanoseconds since the bench started.
struct SendLog(Vec<AtomicU64>);

impl SendLog {
    fn new(n: usize) -> Self {
        Self((0..n).map(|_| AtomicU64::new(0)).collect())
    }
    fn record(&self, seq: u64, at: u64) {
        if let Some(slot) = self.0.get(seq as usize) {
            slot.store(at, Ordering::Relaxed);
        }
    }
    fn get(&self, seq: u64) -> Option<u64> {
        self.0
            .get(seq as usize)
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| *v > 0)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Scaler,
    Bare,
}

/// TLS material and agent tokens for the TLS cases, made at start.
struct Tls {
    _dir: tempfile::TempDir,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    auth_file: std::path::PathBuf,
}

const MAX_NODES: usize = 64;

fn token(node: usize) -> String {
    format!("bench-agent-token-{node:04}-0123456789abcdef")
}

impl Tls {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("leaf");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_path, leaf.pem()).expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write");
        let auth_file = dir.path().join("auth.yaml");
        let agents: String = (0..MAX_NODES)
            .map(|i| format!("  - {{node: bench-{i}, token: {}}}\n", token(i)))
            .collect();
        std::fs::write(&auth_file, format!("agents:\n{agents}")).expect("write");
        Self {
            ca_pem: ca.pem(),
            cert_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
            cert: cert_path,
            key: key_path,
            auth_file,
            _dir: dir,
        }
    }
}

#[derive(Clone, Copy)]
enum Pace {
    Max,
    /// Reports per second, all clients together.
    Rate(f64),
}

struct Outcome {
    /// GPU samples applied (scaler) or decoded (bare) per wall-clock second.
    gpu_samples_per_second: f64,
    /// The same per CPU-second of the server's one thread: what one core
    /// does, whatever else the machine is running.
    gpu_samples_per_cpu_second: f64,
    delays_ms: Vec<f64>,
}

/// The bare server: decode and count.
#[derive(Clone)]
struct Bare(Arc<AtomicU64>);

type Empty = Pin<Box<dyn Stream<Item = Result<v1::ScalerDirective, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Bare {
    type ReportStream = Empty;
    async fn report(
        &self,
        request: tonic::Request<tonic::Streaming<v1::NodeReport>>,
    ) -> Result<tonic::Response<Empty>, tonic::Status> {
        let mut inbound = request.into_inner();
        let count = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let n = match r.body {
                    Some(v1::node_report::Body::Snapshot(s)) => s.gpus.len(),
                    Some(v1::node_report::Body::Delta(d)) => d.gpu_metrics.len(),
                    None => 0,
                };
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::pending())))
    }
}

struct Server {
    addr: SocketAddr,
    /// `/proc/self/task/<tid>/stat` of the server's thread.
    stat_path: String,
    view: Option<watch::Receiver<Arc<StateView>>>,
    bare_count: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the target on a current_thread runtime in its own thread.
    fn start(target: Target, tls: Option<&Tls>) -> Server {
        let tls_config = tls.map(|t| {
            (
                t.cert.clone(),
                t.key.clone(),
                t.auth_file.clone(),
                t.cert_pem.clone(),
                t.key_pem.clone(),
            )
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let bare_count = Arc::new(AtomicU64::new(0));
        let count = bare_count.clone();
        let thread = std::thread::spawn(move || {
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let stat_path = format!("/proc/self/task/{tid}/stat");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match target {
                    Target::Scaler => {
                        let mut config = ScalerConfig::new("127.0.0.1:0".parse().expect("addr"));
                        config.node_ttl = Duration::from_secs(600);
                        config.peers.agent_reports_per_second = None;
                        if let Some((cert, key, auth, _, _)) = tls_config {
                            config.transport = Transport::Tls(TlsConfig::new(cert, key));
                            config.auth = AuthConfig::with_mode(AuthMode::File(auth));
                        }
                        let running = Scaler::new(config).start().await.expect("scaler");
                        ready_tx
                            .send((running.grpc_addr(), Some(running.view()), stat_path))
                            .expect("ready");
                        let _ = stop_rx.await;
                        let _ = running.shutdown().await;
                    }
                    Target::Bare => {
                        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                            .await
                            .expect("bind");
                        ready_tx
                            .send((listener.local_addr().expect("addr"), None, stat_path))
                            .expect("ready");
                        let (stop_seen_tx, stop_seen_rx) = oneshot::channel::<()>();
                        let mut builder = tonic::transport::Server::builder();
                        if let Some((_, _, _, cert, key)) = tls_config {
                            builder = builder
                                .tls_config(
                                    tonic::transport::ServerTlsConfig::new()
                                        .identity(tonic::transport::Identity::from_pem(cert, key)),
                                )
                                .expect("TLS");
                        }
                        let server = builder
                            .tcp_nodelay(true)
                            .initial_stream_window_size(window())
                            .initial_connection_window_size(window())
                            .add_service(AgentServiceServer::new(Bare(count)))
                            .serve_with_incoming_shutdown(
                                // As the scaler does: Nagle off on accepted sockets.
                                TcpIncoming::from(listener).with_nodelay(Some(true)),
                                async move {
                                    let _ = stop_rx.await;
                                    let _ = stop_seen_tx.send(());
                                },
                            );
                        // Serve until stopped, then give connections 2 s to close.
                        tokio::select! {
                            _ = server => {}
                            _ = async {
                                let _ = stop_seen_rx.await;
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            } => {}
                        }
                    }
                }
            });
        });
        let (addr, view, stat_path) = ready_rx.recv().expect("server ready");
        Server {
            addr,
            stat_path,
            view,
            bare_count,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// CPU seconds the server's thread has used (user + system), from
    /// `/proc` in clock ticks of 10 ms.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(&self.stat_path).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        ticks as f64 / 100.0
    }

    fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn client(
    url: String,
    ca_pem: Option<String>,
    node: usize,
    log: Arc<SendLog>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    pace: Option<f64>,
) {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url).expect("url");
    if let Some(ca) = &ca_pem {
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
            .expect("TLS");
    }
    let mut client = AgentServiceClient::new(endpoint.connect().await.expect("connects"));
    let (tx, rx) = mpsc::channel(64);
    tx.send(snapshot(node)).await.expect("queued");
    log.record(1, epoch.elapsed().as_nanos() as u64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if ca_pem.is_some() {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token(node)).parse().expect("header"),
        );
    }
    let response = client.report(request).await.expect("stream opens");
    let mut inbound = response.into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    let templates = deltas(node);
    let started = Instant::now();
    let mut seq = 1u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    while !stop.load(Ordering::Relaxed) {
        let due = match pace {
            None => seq + 1,
            Some(rate) => {
                ticker.tick().await;
                1 + (started.elapsed().as_secs_f64() * rate) as u64
            }
        };
        while seq < due && !stop.load(Ordering::Relaxed) {
            seq += 1;
            let mut msg = templates[seq as usize % TEMPLATES].clone();
            msg.seq = seq;
            if tx.send(msg).await.is_err() {
                return;
            }
            log.record(seq, epoch.elapsed().as_nanos() as u64);
        }
    }
}

fn run_case(
    clients_rt: &tokio::runtime::Runtime,
    target: Target,
    tls: Option<&Tls>,
    n: usize,
    pace: Pace,
    seconds: f64,
) -> Outcome {
    let server = Server::start(target, tls);
    let (url, ca_pem) = match tls {
        Some(t) => (
            format!("https://localhost:{}", server.addr.port()),
            Some(t.ca_pem.clone()),
        ),
        None => (format!("http://{}", server.addr), None),
    };
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let per_client = (2_000_000 / n).max(10_000);
    let logs: Vec<Arc<SendLog>> = (0..n).map(|_| Arc::new(SendLog::new(per_client))).collect();
    let pace_each = match pace {
        Pace::Max => None,
        Pace::Rate(r) => Some(r / n as f64),
    };
    let outcome = clients_rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, log) in logs.iter().enumerate() {
            tasks.push(tokio::spawn(client(
                url.clone(),
                ca_pem.clone(),
                i,
                log.clone(),
                epoch,
                stop.clone(),
                pace_each,
            )));
        }
        let warmup = Duration::from_secs_f64((seconds / 3.0).max(0.5));
        tokio::time::sleep(warmup).await;
        let measure = Duration::from_secs_f64(seconds);
        let outcome = match &server.view {
            None => {
                let before = server.bare_count.load(Ordering::Relaxed);
                let cpu0 = server.cpu_seconds();
                let t0 = Instant::now();
                tokio::time::sleep(measure).await;
                let after = server.bare_count.load(Ordering::Relaxed);
                let samples = (after - before) as f64;
                Outcome {
                    gpu_samples_per_second: samples / t0.elapsed().as_secs_f64(),
                    gpu_samples_per_cpu_second: samples / (server.cpu_seconds() - cpu0).max(0.01),
                    delays_ms: Vec::new(),
                }
            }
            Some(view) => {
                let mut view = view.clone();
                let names: Vec<NodeName> = (0..n)
                    .map(|i| NodeName::new(format!("bench-{i}")))
                    .collect();
                let seqs = |v: &StateView| -> Vec<u64> {
                    names
                        .iter()
                        .map(|nm| v.nodes.get(nm).map_or(0, |x| x.last_seq))
                        .collect()
                };
                let mut prev = seqs(&view.borrow_and_update());
                let start_seqs = prev.clone();
                let cpu0 = server.cpu_seconds();
                let t0 = Instant::now();
                let mut delays = Vec::new();
                let mut last = prev.clone();
                while t0.elapsed() < measure {
                    let left = measure.saturating_sub(t0.elapsed());
                    if tokio::time::timeout(left, view.changed()).await.is_err() {
                        break;
                    }
                    let seen = epoch.elapsed().as_nanos() as u64;
                    let v = view.borrow_and_update().clone();
                    last = seqs(&v);
                    for (i, (&p, &l)) in prev.iter().zip(&last).enumerate() {
                        for s in p + 1..=l {
                            if let Some(sent) = logs[i].get(s) {
                                delays.push(seen.saturating_sub(sent) as f64 / 1e6);
                            }
                        }
                    }
                    prev = last.clone();
                }
                let applied: u64 = last.iter().zip(&start_seqs).map(|(l, s)| l - s).sum();
                let samples = (applied * GPUS as u64) as f64;
                Outcome {
                    gpu_samples_per_second: samples / t0.elapsed().as_secs_f64(),
                    gpu_samples_per_cpu_second: samples / (server.cpu_seconds() - cpu0).max(0.01),
                    delays_ms: delays,
                }
            }
        };
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        outcome
    });
    server.stop();
    outcome
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let seconds: f64 = std::env::var("INGEST_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");
    let repeats: usize = std::env::var("INGEST_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    println!(
        "ingest: {GPUS} GPUs per node, every report after the snapshot a delta with all {GPUS} GPUs' metrics; \
         server on a current_thread runtime (one thread), clients on a 1-worker runtime; \
         {seconds} s per case, best of {repeats} (scaler and bare interleaved)"
    );
    println!(
        "| transport | streams | scaler GPU samples/s (wall) | per server CPU-second | bare tonic GPU samples/s (wall) | per server CPU-second | scaler/bare (per CPU-second) | scaler/bare (wall) | paced at | delay p50 | delay p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let streams: Vec<usize> = std::env::var("INGEST_BENCH_STREAMS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 8, 64]);
    let tls = Tls::new();
    let best = |a: Option<Outcome>, b: Outcome| match a {
        Some(a) if a.gpu_samples_per_cpu_second >= b.gpu_samples_per_cpu_second => Some(a),
        _ => Some(b),
    };
    for (mode, tls) in [("h2c", None), ("TLS + auth", Some(&tls))] {
        for &n in streams.iter().filter(|n| (1..=MAX_NODES).contains(*n)) {
            let mut scaler: Option<Outcome> = None;
            let mut bare: Option<Outcome> = None;
            for _ in 0..repeats.max(1) {
                scaler = best(
                    scaler,
                    run_case(&clients_rt, Target::Scaler, tls, n, Pace::Max, seconds),
                );
                bare = best(
                    bare,
                    run_case(&clients_rt, Target::Bare, tls, n, Pace::Max, seconds),
                );
            }
            let (scaler, bare) = (
                scaler.expect("at least one run"),
                bare.expect("at least one run"),
            );
            let rate = scaler.gpu_samples_per_second / GPUS as f64 * 0.5;
            let paced = run_case(
                &clients_rt,
                Target::Scaler,
                tls,
                n,
                Pace::Rate(rate),
                seconds,
            );
            let mut d = paced.delays_ms;
            d.sort_by(f64::total_cmp);
            println!(
                "| {mode} | {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} samples/s | {:.2} ms | {:.2} ms |",
                scaler.gpu_samples_per_second,
                scaler.gpu_samples_per_cpu_second,
                bare.gpu_samples_per_second,
                bare.gpu_samples_per_cpu_second,
                scaler.gpu_samples_per_cpu_second / bare.gpu_samples_per_cpu_second,
                scaler.gpu_samples_per_second / bare.gpu_samples_per_second,
                rate * GPUS as f64,
                percentile(&d, 0.5),
                percentile(&d, 0.99),
            );
        }
    }
}
