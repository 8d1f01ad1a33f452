//! The node agent's overhead: CPU time and resident memory per second of
//! operation of the real `gpuscale agent` process, sampling 8 GPUs and 8
//! engines every second and streaming to a scaler.
//!
//! * GPUs: the real NVML source (nvml-wrapper) against the project's fake
//!   `libnvidia-ml.so.1` (crates/fake-nvml) describing 8 H100s with GPM.
//! * Engines: 8 local HTTP servers serving vLLM-style Prometheus text (~30
//!   KiB each, the families and histograms vLLM exports, counters moving
//!   every scrape), scraped by the real engine source.
//! * Scaler: a local gRPC sink that acknowledges every report.
//! * Prometheus: `/metrics` of the agent scraped every 15 s, as a
//!   ServiceMonitor would.
//!
//! The agent runs as its own process (the `gpuscale` binary this bench is
//! built with), so the figures are its own: CPU from `/proc/<pid>/stat`
//! (user + system, all threads) over the measured window after a warm-up,
//! resident memory from `/proc/<pid>/status` (`VmRSS` at the end, `VmHWM`
//! peak). The same run without GPUs and engines gives the idle baseline,
//! and the fake NVML library's own cost per 8-GPU round is measured in
//! process, to show how much of the figure is the fake's.
//!
//! Run: `cargo bench --bench agent` (60 s per configuration; set
//! `AGENT_BENCH_SECONDS` to change it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gpuscale_core::Timestamp;
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use gpuscale_proto::{AgentReport, Directive};
use gpuscale_telemetry::{NvmlConfig, NvmlSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const GPUS: usize = 8;
const ENGINES: usize = 8;
const INTERVAL: &str = "1s";
const WARMUP: Duration = Duration::from_secs(5);
const PROMETHEUS_EVERY: Duration = Duration::from_secs(15);

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let seconds: u64 = std::env::var("AGENT_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let window = Duration::from_secs(seconds.max(5));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(window));
}

async fn run(window: Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let nvml_lib = fake_nvml(dir.path());
    let fake_nvml_us = fake_nvml_cost(&nvml_lib);
    let sink = Sink::start().await;
    let mut engines = Vec::new();
    for i in 0..ENGINES {
        engines.push(start_engine(i).await);
    }
    let text_bytes = vllm_text(0, 0).len();

    println!(
        "agent overhead: {GPUS} GPUs (fake NVML, real nvml-wrapper path), {ENGINES} vLLM engines \
         (~{} KiB of metrics each), interval {INTERVAL}, window {} s after {} s warm-up",
        text_bytes / 1024,
        window.as_secs(),
        WARMUP.as_secs()
    );
    let full = measure("8 GPUs + 8 engines", &nvml_lib, &engines, &sink, window).await;
    let idle = measure(
        "idle (no GPU, no engine)",
        &dir.path().join("absent/libnvidia-ml.so.1"),
        &[],
        &sink,
        window,
    )
    .await;

    println!();
    println!(
        "{:<28} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9}",
        "configuration", "CPU %core", "CPU ms/s", "RSS MiB", "peak MiB", "reports", "scrapes"
    );
    println!(
        "{:<28} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9}",
        "", "", "", "(end)", "(VmHWM)", "(sent)", "(engines)"
    );
    for m in [&full, &idle] {
        println!(
            "{:<28} {:>10.3} {:>12.2} {:>10.1} {:>10.1} {:>9} {:>9}",
            m.name,
            m.cpu_ms_per_s / 10.0,
            m.cpu_ms_per_s,
            m.rss_mib,
            m.peak_mib,
            m.reports,
            m.engine_scrapes
        );
    }
    println!(
        "{:<28} {:>10.3} {:>12.2}   (in-process: one 8-GPU NVML round through the fake library, {:.0} µs)",
        "  of which fake NVML",
        fake_nvml_us / 1000.0 / 10.0,
        fake_nvml_us / 1000.0,
        fake_nvml_us
    );
    println!(
        "{:<28} {:>10} {:>12} {:>10}",
        "budget", "< 1", "< 10", "< 30"
    );
    println!(
        "{:<28} {:>10} {:>12} {:>10}   (REFERENCE §5.1: gpu-monitoring-tools#133, dcgm-exporter#609, pytorch/ci-infra#1011)",
        "dcgm-exporter, reported", "15–20", "150–200", "71–512"
    );
    let within = full.cpu_ms_per_s < 10.0 && full.rss_mib < 30.0;
    println!(
        "\n{}: {:.3} % of one core, {:.1} MiB resident",
        if within {
            "within budget"
        } else {
            "OVER BUDGET"
        },
        full.cpu_ms_per_s / 10.0,
        full.rss_mib
    );
    drop(engines);
}

struct Measured {
    name: &'static str,
    cpu_ms_per_s: f64,
    rss_mib: f64,
    peak_mib: f64,
    reports: u64,
    engine_scrapes: u64,
}

async fn measure(
    name: &'static str,
    nvml_lib: &Path,
    engines: &[Engine],
    sink: &Sink,
    window: Duration,
) -> Measured {
    let metrics_port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuscale"));
    cmd.arg("agent")
        .arg("--insecure-plaintext")
        .arg("--scaler")
        .arg(format!("http://{}", sink.addr))
        .arg("--node-name")
        .arg("bench-node")
        .arg("--interval")
        .arg(INTERVAL)
        .arg("--nvml-library")
        .arg(nvml_lib)
        .arg("--pod-resources-socket")
        .arg("off")
        .arg("--kubernetes")
        .arg("off")
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for e in engines {
        cmd.arg("--engine").arg(format!(
            "default/vllm-{}=vllm=http://{}/metrics",
            e.index, e.addr
        ));
    }
    let mut child = ChildGuard(cmd.spawn().expect("start gpuscale agent"));
    let pid = child.0.id();
    let metrics_addr: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    tokio::time::sleep(WARMUP).await;
    let reports_before = sink.reports();
    let scrapes_before = engine_scrapes(engines);
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let mut next_prometheus = Instant::now();
    while started.elapsed() < window {
        if Instant::now() >= next_prometheus {
            let _ = scrape(metrics_addr).await;
            next_prometheus += PROMETHEUS_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let elapsed = started.elapsed().as_secs_f64();
    let (rss, peak) = memory_kib(pid);
    let text = scrape(metrics_addr).await.unwrap_or_default();
    let gpu_series = text
        .lines()
        .filter(|l| l.starts_with("gpuscale_agent_gpu_memory_total_bytes{"))
        .count();
    let engine_series = text
        .lines()
        .filter(|l| l.starts_with("gpuscale_agent_engine_requests_running{"))
        .count();
    let _ = child.0.kill();
    let _ = child.0.wait();
    println!("  {name}: exporter shows {gpu_series} GPU and {engine_series} engine series");
    Measured {
        name,
        cpu_ms_per_s: cpu * 1000.0 / elapsed,
        rss_mib: rss as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
        reports: sink.reports() - reports_before,
        engine_scrapes: engine_scrapes(engines) - scrapes_before,
    }
}

/// Kills the agent if the bench panics.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of the process, all threads.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / clock_ticks_per_second()
}

/// `VmRSS` and `VmHWM` in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.ok()?;
    String::from_utf8(body).ok()
}

/// Builds the fake NVML library (release) and lays it out as
/// `<dir>/libnvidia-ml.so.1` with 8 H100s in `fake-nvml.json`.
fn fake_nvml(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .expect("<target>/<profile>/deps/<bench>")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("<target>").to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "-q",
            "--release",
            "-p",
            "fake-nvml",
            "--manifest-path",
        ])
        .arg(root.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("cargo build -p fake-nvml");
    assert!(status.success(), "building the fake NVML library failed");
    let lib = target_dir.join("release/libfake_nvml.so");
    let path = dir.join("libnvidia-ml.so.1");
    std::fs::copy(&lib, &path).expect("copy the fake library");
    let devices: Vec<serde_json::Value> = (0..GPUS)
        .map(|i| {
            serde_json::json!({
                "uuid": format!("GPU-{i:08x}-1111-2222-3333-444444444444"),
                "name": "NVIDIA H100 80GB HBM3",
                "pci_bus_id": format!("00000000:{:02X}:00.0", 0x18 + i),
                "metrics": {
                    "memory": {"total": 85_520_809_984u64, "used": 80_000_000_000u64, "free": 5_520_809_984u64},
                    "utilization": {"gpu": 92, "memory": 40},
                    "power_mw": 520_000, "power_limit_mw": 700_000, "temperature_c": 61,
                    "sm_clock_mhz": 1980, "throttle_reasons": 0,
                    "ecc_uncorrected_volatile": 0, "energy_mj": 987_654_321u64
                },
                "gpm": {"sm_util": 61.5, "sm_occupancy": 33.0, "any_tensor_util": 42.0, "dram_bw_util": 55.0}
            })
        })
        .collect();
    std::fs::write(
        dir.join("fake-nvml.json"),
        serde_json::to_vec_pretty(
            &serde_json::json!({"driver_version": "580.82.07", "devices": devices}),
        )
        .expect("json"),
    )
    .expect("write fake-nvml.json");
    path
}

/// Microseconds of one 8-GPU sampling round of the NVML source through the
/// fake library (the fake's work and the wrapper's, in this process).
fn fake_nvml_cost(lib: &Path) -> f64 {
    let mut source = NvmlSource::new(NvmlConfig {
        library_path: lib.to_path_buf(),
        ..NvmlConfig::default()
    })
    .expect("NVML source");
    assert!(source.nvml_available(), "the fake library loads");
    let rounds = 2000;
    let start_ms = 1_750_000_000_000i64;
    for i in 0..50 {
        let _ = source.sample_now(Timestamp::from_millis(start_ms + i * 1000));
    }
    let started = Instant::now();
    for i in 0..rounds {
        let samples = source
            .sample_now(Timestamp::from_millis(start_ms + (50 + i) * 1000))
            .expect("samples");
        assert_eq!(samples.len(), GPUS);
    }
    started.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

struct Engine {
    index: usize,
    addr: SocketAddr,
    scrapes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn engine_scrapes(engines: &[Engine]) -> u64 {
    engines
        .iter()
        .map(|e| e.scrapes.load(Ordering::Relaxed))
        .sum()
}

/// A keep-alive HTTP/1.1 server: `/metrics` answers the engine's current
/// vLLM exposition, anything else (the agent's `/health` checks) 200 empty.
async fn start_engine(index: usize) -> Engine {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let scrapes = Arc::new(AtomicU64::new(0));
    let counter = scrapes.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                buf.extend_from_slice(&chunk[..n]);
                                continue;
                            }
                        }
                    };
                    let is_metrics = buf.starts_with(b"GET /metrics ");
                    buf.drain(..end + 4);
                    // `/health` answers 200 with an empty body, as vLLM's does.
                    let body = if is_metrics {
                        vllm_text(index, counter.fetch_add(1, Ordering::Relaxed))
                    } else {
                        String::new()
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if stream.write_all(head.as_bytes()).await.is_err()
                        || stream.write_all(body.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Engine {
        index,
        addr,
        scrapes,
        task,
    }
}

/// vLLM's exposition (0.10+ names): the process and Python families, the
/// scheduler gauges, token and request counters, and its histograms with
/// their real bucket layouts; counters move with `n`.
fn vllm_text(engine: usize, n: u64) -> String {
    use std::fmt::Write;
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let labels = format!("engine=\"0\",model_name=\"{model}\"");
    let mut out = String::with_capacity(40 * 1024);
    let t = n as f64;
    for (name, kind, help, value) in [
        (
            "python_gc_objects_collected_total",
            "counter",
            "Objects collected during gc",
            18234.0 + t,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            5.1e10,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            3.2e9,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            1.75e9,
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            1234.5 + t,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            93.0,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value:e}"
        );
    }
    let running = 20.0 + ((n + engine as u64) % 30) as f64;
    for (name, kind, help, value) in [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            running,
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            (n % 7) as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            0.3 + (n % 50) as f64 / 100.0,
        ),
        (
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            (n / 50) as f64,
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            1.2e6 + 2000.0 * t,
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            4.5e5 + 3000.0 * t,
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            1.2e6 + 2000.0 * t,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            2.0e5 + 500.0 * t,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter"
    );
    for (reason, share) in [("stop", 0.9), ("length", 0.09), ("abort", 0.01)] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {}",
            ((3000.0 + 10.0 * t) * share).round()
        );
    }
    let seconds_ttft = [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ];
    let seconds_itl = [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0,
    ];
    let seconds_e2e = [
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
        240.0, 480.0, 960.0, 1920.0, 7680.0,
    ];
    let tokens = [
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
        20000.0, 50000.0, 100000.0,
    ];
    let iteration = [
        1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    ];
    for (name, help, bounds) in [
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &seconds_ttft[..],
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &seconds_itl[..],
        ),
        (
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            &seconds_itl[..],
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &seconds_e2e[..],
        ),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &seconds_e2e[..],
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            &seconds_e2e[..],
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            &seconds_e2e[..],
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            &seconds_e2e[..],
        ),
        (
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            &tokens[..],
        ),
        (
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            &tokens[..],
        ),
        (
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            &tokens[..],
        ),
        (
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            &iteration[..],
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let count = 3000 + 10 * n;
        let mut cumulative = 0u64;
        for (i, b) in bounds.iter().enumerate() {
            cumulative = (count * (i as u64 + 1) / bounds.len() as u64).max(cumulative);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cumulative}.0");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}.0");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}.0");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", count as f64 * 0.37);
    }
    out
}

/// A scaler-like sink: acknowledges every report.
#[derive(Clone)]
struct Sink {
    addr: SocketAddr,
    reports: Arc<AtomicU64>,
}

impl Sink {
    async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sink = Sink {
            addr,
            reports: Arc::default(),
        };
        let service = AgentServiceServer::new(sink.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        sink
    }

    fn reports(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }
}

type DirectiveStream = Pin<Box<dyn Stream<Item = Result<v1::ScalerDirective, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Sink {
    type ReportStream = DirectiveStream;

    async fn report(
        &self,
        request: Request<Streaming<v1::NodeReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let reports = self.reports.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let Ok(report) = AgentReport::try_from(msg) else {
                    return;
                };
                reports.fetch_add(1, Ordering::Relaxed);
                if tx
                    .send(Ok((&Directive::Ack { seq: report.seq }).into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
