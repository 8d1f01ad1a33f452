//! `gpuscale demo`: the whole system on one machine, with no cluster and no
//! GPU.
//!
//! ```text
//!  trace ──► simulated fleet (gpuscale-sim) ◄── pods of the fake ReplicaSet
//!               │ per-pod engine state               ▲ /scale, drain records
//!               ▼                                    │
//!  fake nodes (GPUs, engines) ──► real agents ──gRPC──► real scaler + Kubernetes
//!                                  │ readiness gates      controller (gpuscale-kube)
//!                                  ▼                            │
//!                       embedded fake Kubernetes API server ◄───┘
//! ```
//!
//! An embedded fake Kubernetes API server holds the nodes, a vLLM-like
//! Deployment whose pods declare the readiness gate, and an
//! InferenceAutoscaler for it. The real scaler runs in Kubernetes mode: its
//! controller acts on the Deployment's `/scale` with readiness gating and
//! drain-before-delete. One real agent per node streams to it over loopback
//! gRPC; each node's GPUs and engines are a fake node that the demo's fleet
//! ([`fleet`]) drives from the simulator: every pod the ReplicaSet creates
//! is a simulated replica, and the trace's requests are routed among the
//! warm ones. Every part runs on one virtual clock, `--speed` times faster
//! than the wall clock. A live view ([`view`]) shows it on the terminal; a
//! summary and an optional SVG chart ([`summary`]) end it.
//!
//! Not for: benchmarking the policy (`gpuscale sim` replays without
//! wall-clock time and compares policies).

mod cluster;
mod error;
mod fleet;
mod summary;
mod view;
mod zero;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpuscale_agent::{AgentConfig, ReadinessConfig};
use gpuscale_core::{Timestamp, WorkloadRef};
use gpuscale_fake_apiserver::{FakeApiServer, FakeApiServerConfig};
use gpuscale_kube::{KubeConfig, KubeScaler};
use gpuscale_policy::PerfModel;
use gpuscale_scaler::ScalerConfig;
use gpuscale_sim::baselines::BaselineContext;
use gpuscale_sim::stats::{Recorder, RunStats, Slo};
use gpuscale_sim::trace::{SizePool, Trace, WorkloadOptions, parse_trace, read_trace};
use gpuscale_sim::{ColdStart, Fleet, FleetConfig, VictimOrder, Workload};
use gpuscale_telemetry::fake::{FakeGpuGroup, FakeNode, FakeNodeConfig};
use tokio::sync::watch;

pub use error::DemoError;

use fleet::{FleetDriver, FleetParts};
use view::ViewMode;

/// The namespace of the demo's workload.
pub(crate) const NAMESPACE: &str = "llm";
/// The Deployment (and InferenceAutoscaler) name.
pub(crate) const DEPLOYMENT: &str = "llama-8b";
/// The readiness gate the agent sets.
pub(crate) const GATE: &str = "gpuscale.dev/engine-warm";
pub(crate) const TTFT_SLO_S: f64 = 2.0;
pub(crate) const ITL_SLO_S: f64 = 0.05;
/// Virtual seconds a pod is Pending (scheduling, image pull).
const POD_PENDING_S: f64 = 5.0;
/// Engine cold start of a new replica, drawn per replica (virtual seconds).
const COLD_START_S: (f64, f64) = (60.0, 90.0);
/// Scale-in stabilization of the demo's InferenceAutoscaler.
const SCALE_DOWN_WINDOW_S: u32 = 120;
/// Wall seconds the default replay aims at.
const TARGET_WALL_S: f64 = 90.0;
/// Fastest supported speed (the agents sample at least every 10 ms).
const MAX_SPEED: f64 = 200.0;
/// Replicas the default rate scale gives the trace's busiest minute.
const TARGET_PEAK_REPLICAS: f64 = 16.0;
/// Longest wall time the warm starting fleet may take to come up.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// `gpuscale demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Request trace: Azure LLM inference CSV, JSONL (Mooncake layout) or a
    /// rate series. Default: the Azure 2023 conversation trace from
    /// data/traces, compiled into the binary.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Virtual seconds per wall second (above 0, at most 200). Default: the
    /// replay takes about 90 s.
    #[arg(long, value_name = "X")]
    pub speed: Option<f64>,
    /// Replay only the first part of the trace (e.g. 20m). Default: all of it.
    #[arg(long, value_name = "DURATION", value_parser = gpuscale_scaler::config::parse_duration)]
    pub duration: Option<Duration>,
    /// Multiply the trace's arrival rate (above 0, at most 1000). Default:
    /// the busiest minute needs about 16 replicas.
    #[arg(long, value_name = "R")]
    pub rate_scale: Option<f64>,
    /// Simulated GPU nodes (1..=64).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub nodes: u32,
    /// GPUs per node (1..=16).
    #[arg(long, value_name = "G", default_value_t = 8)]
    pub gpus_per_node: u32,
    /// Performance-model preset of the replicas.
    #[arg(long, value_name = "PRESET", default_value = "h200-llama3-8b-bf16")]
    pub profile: String,
    /// Seed of the rate scaling, cold starts and fake GPUs.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,
    /// No live view: a status line every few seconds (also when stderr is
    /// not a terminal).
    #[arg(long)]
    pub plain: bool,
    /// Write an SVG chart (arrivals, desired and ready replicas, SLO
    /// attainment over time) at the end.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// `trace`: the trace replayed against the simulated cluster;
    /// `scale-to-zero`: three models behind the activator go to zero and
    /// come back (about 30 s; the other flags do not apply).
    #[arg(long, value_name = "NAME", default_value = "trace")]
    pub scenario: String,
}

/// The demo's validated configuration.
#[derive(Debug)]
pub(crate) struct DemoConfig {
    pub trace_path: PathBuf,
    pub workload: Workload,
    pub duration_s: f64,
    pub speed: f64,
    pub rate_scale: f64,
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub perf: PerfModel,
    pub profile: String,
    pub seed: u64,
    pub view: ViewMode,
    pub chart: Option<PathBuf>,
    pub max_replicas: u32,
    pub initial_replicas: u32,
    pub capacity_rps: f64,
    pub static_peak_replicas: u32,
    pub slo: Slo,
}

/// The name the shipped default trace goes by (it is compiled into the
/// binary, so an installed `gpuscale` needs no source tree).
const DEFAULT_TRACE_NAME: &str = "AzureLLMInferenceTrace_conv.csv";
/// The Azure 2023 conversation trace (CC-BY-4.0, see data/traces).
const DEFAULT_TRACE: &str = include_str!("../../data/traces/AzureLLMInferenceTrace_conv.csv");

fn default_trace() -> Result<Trace, DemoError> {
    Ok(parse_trace(
        Path::new(DEFAULT_TRACE_NAME),
        DEFAULT_TRACE,
        None,
    )?)
}

/// The GPU the fake nodes report for a profile's GPU type.
fn gpu_group(gpu: &str, count: u32) -> FakeGpuGroup {
    let (model, memory_gib) = match gpu {
        "H100" => ("NVIDIA H100 80GB HBM3", 80.0),
        "A100" => ("NVIDIA A100-SXM4-80GB", 80.0),
        _ => ("NVIDIA H200", 141.0),
    };
    FakeGpuGroup {
        model: model.into(),
        count,
        memory_gib,
        power_limit_watts: 700.0,
        gpm_supported: true,
    }
}

impl DemoConfig {
    /// Checks every flag and prepares the trace; errors name the flag, the
    /// value and what is allowed.
    pub(crate) fn from_args(args: &DemoArgs) -> Result<Self, DemoError> {
        let perf = gpuscale_policy::perf::preset(&args.profile).ok_or_else(|| {
            DemoError::config(
                "--profile",
                &args.profile,
                format!(
                    "a performance-model preset: {}",
                    gpuscale_policy::perf::PRESET_NAMES.join(", ")
                ),
            )
        })?;
        if !(1..=64).contains(&args.nodes) {
            return Err(DemoError::config("--nodes", args.nodes, "1..=64"));
        }
        if !(1..=16).contains(&args.gpus_per_node) {
            return Err(DemoError::config(
                "--gpus-per-node",
                args.gpus_per_node,
                "1..=16",
            ));
        }
        let gpr = perf.gpus_per_replica.max(1);
        if args.gpus_per_node < gpr {
            return Err(DemoError::config(
                "--gpus-per-node",
                args.gpus_per_node,
                format!(
                    "at least {gpr}: a replica of {} needs {gpr} GPUs",
                    args.profile
                ),
            ));
        }
        if let Some(s) = args.speed
            && !(s.is_finite() && s > 0.0 && s <= MAX_SPEED)
        {
            return Err(DemoError::config(
                "--speed",
                s,
                format!("a number above 0 and at most {MAX_SPEED}"),
            ));
        }
        if let Some(r) = args.rate_scale
            && !(r.is_finite() && r > 0.0 && r <= 1000.0)
        {
            return Err(DemoError::config(
                "--rate-scale",
                r,
                "a number above 0 and at most 1000",
            ));
        }
        let horizon_s = match args.duration {
            Some(d) if d.is_zero() => {
                return Err(DemoError::config(
                    "--duration",
                    format!("{d:?}"),
                    "a duration above 0, e.g. 20m",
                ));
            }
            Some(d) => Some(d.as_secs_f64()),
            None => None,
        };
        let (trace_path, trace) = match &args.trace {
            Some(path) => (path.clone(), read_trace(path, None)?),
            None => (PathBuf::from(DEFAULT_TRACE_NAME), default_trace()?),
        };
        // A rate series gets its request sizes from the shipped trace.
        let sizes = match &trace {
            Trace::Rate { .. } => match default_trace()? {
                Trace::Requests { requests, .. } => Some(SizePool::from_requests(&requests)),
                Trace::Rate { .. } => None,
            },
            Trace::Requests { .. } => None,
        };
        let options = |rate_scale: f64| WorkloadOptions {
            rate_scale,
            horizon_s,
            seed: args.seed,
            ..WorkloadOptions::default()
        };
        let unscaled = Workload::new(&trace, sizes.clone(), &options(1.0))?;
        let (mean_input, mean_output) = unscaled.mean_sizes();
        let slo = Slo {
            ttft_s: TTFT_SLO_S,
            itl_s: ITL_SLO_S,
            percentile: 95.0,
            ttft_per_input_token_s: 0.0,
        };
        let max_replicas = args.nodes * (args.gpus_per_node / gpr);
        let mut ctx = BaselineContext {
            perf: perf.clone(),
            slo,
            min_replicas: 1,
            max_replicas,
            peak_rps: 0.0,
            mean_input,
            mean_output,
        };
        let capacity_rps = ctx.capacity_rps();
        let target_peak = TARGET_PEAK_REPLICAS
            .min(0.75 * f64::from(max_replicas))
            .max(1.0);
        let rate_scale = match args.rate_scale {
            Some(r) => r,
            None => {
                let peak = unscaled.peak_rate(60.0);
                if peak > 0.0 {
                    target_peak * capacity_rps / peak
                } else {
                    1.0
                }
            }
        };
        let workload = Workload::new(&trace, sizes, &options(rate_scale))?;
        let duration_s = workload.duration_s();
        ctx.peak_rps = workload.peak_rate(60.0);
        let static_peak_replicas = ctx.static_peak_replicas();
        let early_peak = workload.peak_rate_until(60.0, 300.0);
        let initial_replicas = ((early_peak / capacity_rps).ceil() as u32).clamp(1, max_replicas);
        let speed = match args.speed {
            Some(s) => s,
            None => {
                let s = (duration_s / TARGET_WALL_S).max(1.0);
                if s > MAX_SPEED {
                    return Err(DemoError::config(
                        "--duration",
                        format!("{} (the whole trace)", fmt_duration(duration_s)),
                        format!(
                            "at most {} to replay in about {TARGET_WALL_S:.0} s at the top speed {MAX_SPEED}; pass --duration or --speed",
                            fmt_duration(MAX_SPEED * TARGET_WALL_S)
                        ),
                    ));
                }
                s
            }
        };
        let view = if args.plain || !std::io::stderr().is_terminal() {
            ViewMode::Plain
        } else {
            ViewMode::Live
        };
        Ok(Self {
            trace_path,
            workload,
            duration_s,
            speed,
            rate_scale,
            nodes: args.nodes,
            gpus_per_node: args.gpus_per_node,
            perf,
            profile: args.profile.clone(),
            seed: args.seed,
            view,
            chart: args.chart.clone(),
            max_replicas,
            initial_replicas,
            capacity_rps,
            static_peak_replicas,
            slo,
        })
    }

    /// `virtual_s` of virtual time as wall time, at least `floor`.
    fn wall(&self, virtual_s: f64, floor: Duration) -> Duration {
        Duration::from_secs_f64(virtual_s / self.speed).max(floor)
    }

    pub(crate) fn trace_name(&self) -> String {
        self.trace_path
            .file_stem()
            .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned())
    }
}

/// `1h 02m 03s`, `12m 05s`, `42s`.
pub(crate) fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    let (h, m, sec) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else if m > 0 {
        format!("{m}m {sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// Virtual time: seconds since the demo started, `speed` times the wall clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VirtualClock {
    started: tokio::time::Instant,
    speed: f64,
}

impl VirtualClock {
    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * self.speed
    }
}

/// Runs the demo until the trace is replayed (or `shutdown` completes),
/// then prints the summary on stdout.
pub async fn run(
    args: &DemoArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DemoError> {
    match args.scenario.as_str() {
        "trace" => {}
        "scale-to-zero" => return zero::run(shutdown).await,
        other => {
            return Err(DemoError::config(
                "--scenario",
                other,
                "trace or scale-to-zero",
            ));
        }
    }
    let config = DemoConfig::from_args(args)?;
    let outcome = run_config(&config, shutdown).await?;
    let mut text = summary::render(&config, &outcome);
    if let Some(path) = &config.chart {
        summary::write_chart(path, &config, &outcome)?;
        text.push_str(&format!("  chart            {}\n", path.display()));
    }
    crate::write_stdout(&text).map_err(|e| DemoError::part("writing the summary to stdout", e))
}

async fn run_config(
    config: &DemoConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<summary::Outcome, DemoError> {
    let wall_started = std::time::Instant::now();
    let speed = config.speed;
    let gpr = config.perf.gpus_per_replica.max(1);
    let epoch = Timestamp::from_millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0),
    );
    // One timeline: every clock starts now and runs at the demo's speed.
    let vclock = VirtualClock {
        started: tokio::time::Instant::now(),
        speed,
    };
    let scaler_clock = gpuscale_scaler::Clock::starting_at(epoch).with_speed(speed);
    let agent_clock = gpuscale_agent::Clock::starting_at(epoch).with_speed(speed);

    let node_names: Vec<String> = (1..=config.nodes)
        .map(|i| format!("gpu-node-{i}"))
        .collect();
    let server = FakeApiServer::start(FakeApiServerConfig {
        nodes: node_names.clone(),
        pod_start_delay: config.wall(POD_PENDING_S, Duration::from_millis(1)),
        history_limit: 20_000,
        seed: config.seed,
        ..FakeApiServerConfig::default()
    })
    .await
    .map_err(|e| DemoError::part("starting the fake Kubernetes API server", e))?;
    let server = Arc::new(server);
    let client = || {
        server
            .client()
            .map_err(|e| DemoError::part("connecting to the fake Kubernetes API server", e))
    };
    cluster::install(&client()?).await?;

    let mut scaler_config = ScalerConfig::new(loopback());
    scaler_config.metrics_addr = Some(loopback());
    scaler_config.tick = config.wall(2.0, Duration::from_millis(10));
    let mut kube_config = KubeConfig::new();
    kube_config.sync_period = config.wall(1.0, Duration::from_millis(20));
    let scaler = KubeScaler::new(client()?, kube_config, scaler_config)
        .with_clock(scaler_clock)
        .start()
        .await
        .map_err(|e| DemoError::part("starting the scaler", e))?;
    let scaler_url = format!("http://{}", scaler.scaler().grpc_addr());

    let mut nodes = BTreeMap::new();
    let mut agents = Vec::new();
    for name in &node_names {
        let fake = FakeNode::new(
            &FakeNodeConfig {
                seed: config.seed,
                gpus: vec![gpu_group(&config.perf.gpu, config.gpus_per_node)],
                ..FakeNodeConfig::default()
            },
            name,
        )
        .map_err(|e| DemoError::part("building a simulated node", e))?;
        let mut agent_config = AgentConfig::new(scaler_url.clone(), name.clone());
        agent_config.sample_interval = config.wall(1.0, Duration::from_millis(20));
        let agent = gpuscale_agent::start_simulated_node(
            agent_config,
            &fake,
            ReadinessConfig::default(),
            agent_clock,
            Some(client()?),
        )
        .await
        .map_err(|e| DemoError::part("starting an agent", e))?;
        nodes.insert(name.clone(), fake.handle());
        agents.push(agent);
    }
    let directives = agents.iter().map(|a| a.handle().directives()).collect();

    cluster::create_deployment(
        &client()?,
        config.initial_replicas,
        gpr,
        "meta-llama/Llama-3.1-8B-Instruct",
    )
    .await?;

    let perf = &config.perf;
    let fleet_config = FleetConfig {
        perf: perf.clone(),
        prefill_token_budget: 8192,
        pending_s: 0.0,
        cold_start: ColdStart::Uniform(COLD_START_S.0, COLD_START_S.1),
        drain_grace_s: None,
        victim_order: VictimOrder::LeastWork,
        horizon_s: config.duration_s,
        seed: config.seed,
    };
    let chart_bucket_s = (config.duration_s / 240.0).max(5.0);
    let stats = RunStats::new(config.slo, config.duration_s, chart_bucket_s);
    let requests: Vec<_> = config.workload.stream().collect();
    let mut driver = FleetDriver::new(FleetParts {
        fleet: Fleet::new(fleet_config, 0, Recorder::Full(Box::new(stats))),
        requests,
        duration_s: config.duration_s,
        deployment: DEPLOYMENT.into(),
        model: "meta-llama/Llama-3.1-8B-Instruct".into(),
        gpus_per_replica: gpr,
        kv_capacity_tokens: perf.kv_capacity_tokens,
        server: server.clone(),
        nodes,
        directives,
        chart_bucket_s,
    });

    let workload = WorkloadRef::new(NAMESPACE, DEPLOYMENT);
    let (status_tx, status_rx) = watch::channel(fleet::FleetStatus::default());
    let view = tokio::spawn(view::run(
        config.view,
        view::Header::of(
            config,
            server.addr(),
            scaler.scaler().grpc_addr(),
            scaler.scaler().http_addr(),
        ),
        status_rx,
        scaler.handle().clone(),
        workload.clone(),
    ));

    let step = config
        .wall(0.5, Duration::from_millis(5))
        .min(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(step);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut interrupted = false;
    let setup_started = tokio::time::Instant::now();
    let mut seen = summary::Seen::default();
    let mut failure = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => { interrupted = true; break; }
        }
        let now = vclock.secs();
        let view_now = scaler.handle().current();
        seen.observe(&view_now);
        let desired = view_now
            .workloads
            .get(&workload)
            .and_then(|w| w.decision.as_ref())
            .map(|d| d.desired_replicas);
        let status = driver.step(now, desired);
        let replaying = status.replaying;
        let ready = status.ready;
        status_tx.send_replace(status);
        if !replaying {
            if ready >= config.initial_replicas {
                if let Err(e) = cluster::create_autoscaler(
                    &client()?,
                    &cluster::AutoscalerSpec {
                        profile: config.profile.clone(),
                        gpus_per_replica: gpr,
                        max_replicas: config.max_replicas,
                        cold_start_s: POD_PENDING_S + COLD_START_S.1,
                        scale_down_window_s: SCALE_DOWN_WINDOW_S,
                    },
                )
                .await
                {
                    failure = Some(e);
                    break;
                }
                driver.start_replay(vclock.secs());
            } else if setup_started.elapsed() > STARTUP_LIMIT {
                failure = Some(DemoError::part(
                    "starting the fleet",
                    format!(
                        "{ready} of {} replicas became ready within {STARTUP_LIMIT:?}",
                        config.initial_replicas
                    ),
                ));
                break;
            }
        } else if driver.replayed(now) {
            break;
        }
    }
    let replayed_s = driver.trace_s();
    let fleet = driver.finish();
    // The view draws once more and ends when the status channel closes.
    drop(status_tx);
    let _ = view.await;
    // Stop the agents, then the scaler, then the API server; none may hold
    // the summary up for long.
    let stop = async {
        for agent in agents {
            let _ = agent.shutdown().await;
        }
        let _ = scaler.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), stop).await;
    drop(server);
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(summary::Outcome {
        fleet,
        seen,
        interrupted,
        replayed_s,
        wall_s: wall_started.elapsed().as_secs_f64(),
    })
}

fn loopback() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}
