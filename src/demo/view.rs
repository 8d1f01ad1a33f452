//! The live view on stderr: progress through the trace, load, replicas,
//! latency against the SLOs, the last decision and a per-GPU table, redrawn
//! in place with plain ANSI escapes when stderr is a terminal; a status line
//! every few seconds otherwise (or with `--plain`).
//!
//! Load, latency and the decision are what the scaler sees (its published
//! state view), not the simulator's ground truth; the pods' phases are the
//! cluster's.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use gpuscale_core::WorkloadRef;
use gpuscale_scaler::{ScalerHandle, StateView};
use tokio::sync::watch;

use super::fleet::{FleetStatus, PodPhase};
use super::{DemoConfig, fmt_duration};

/// How the view is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ViewMode {
    /// Redrawn in place (stderr is a terminal).
    Live,
    /// A line every few seconds.
    Plain,
}

const LIVE_EVERY: Duration = Duration::from_millis(250);
const PLAIN_EVERY: Duration = Duration::from_secs(3);
/// GPU rows shown at most (busy GPUs first); the rest are summed up.
const MAX_GPU_ROWS: usize = 16;

/// What the view says once, at the top.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub title: String,
    pub trace: String,
    pub duration_s: f64,
    pub speed: f64,
    pub ttft_slo_s: f64,
    pub itl_slo_s: f64,
}

impl Header {
    pub(crate) fn of(
        config: &DemoConfig,
        api: SocketAddr,
        grpc: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> Self {
        let metrics = metrics.map_or_else(String::new, |m| format!(", metrics http://{m}/metrics"));
        Self {
            title: format!(
                "gpuscale demo: {} nodes x {} GPUs ({}), fake Kubernetes API http://{api}, scaler gRPC {grpc}{metrics}",
                config.nodes, config.gpus_per_node, config.profile
            ),
            trace: format!("{} x{:.2}", config.trace_name(), config.rate_scale),
            duration_s: config.duration_s,
            speed: config.speed,
            ttft_slo_s: config.slo.ttft_s,
            itl_slo_s: config.slo.itl_s,
        }
    }
}

/// Runs until the fleet's status channel closes, then draws once more.
pub(crate) async fn run(
    mode: ViewMode,
    header: Header,
    status: watch::Receiver<FleetStatus>,
    scaler: ScalerHandle,
    workload: WorkloadRef,
) {
    let mut stderr = std::io::stderr();
    let mut drawn_lines = 0usize;
    let every = match mode {
        ViewMode::Live => LIVE_EVERY,
        ViewMode::Plain => PLAIN_EVERY,
    };
    if mode == ViewMode::Plain {
        let _ = writeln!(stderr, "{}", header.title);
    } else {
        // No line wrapping while the view redraws (a wrapped line would
        // throw the redraw off).
        let _ = write!(stderr, "\x1b[?7l");
    }
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let closed = status.has_changed().is_err();
        let s = status.borrow().clone();
        let view = scaler.current();
        match mode {
            ViewMode::Live => {
                let frame = frame(&header, &s, &view, &workload);
                let mut out = String::new();
                if drawn_lines > 0 {
                    let _ = write!(out, "\x1b[{drawn_lines}F");
                }
                for line in &frame {
                    let _ = writeln!(out, "\x1b[2K{line}");
                }
                out.push_str("\x1b[J");
                drawn_lines = frame.len();
                let _ = stderr.write_all(out.as_bytes());
                let _ = stderr.flush();
            }
            ViewMode::Plain => {
                if s.replaying || closed {
                    let _ = writeln!(stderr, "{}", line(&header, &s, &view, &workload));
                }
            }
        }
        if closed {
            break;
        }
    }
    if mode == ViewMode::Live {
        let _ = write!(stderr, "\x1b[?7h");
        let _ = stderr.flush();
    }
}

/// What the scaler shows of the workload.
struct Scaled {
    arrivals: Option<f64>,
    tokens: Option<f64>,
    ttft_p95: Option<f64>,
    itl_p95: Option<f64>,
    desired: Option<u32>,
    decision: Option<String>,
}

fn scaled(view: &StateView, workload: &WorkloadRef) -> Scaled {
    let w = view.workloads.get(workload);
    let obs = w.and_then(|w| w.observation.as_ref());
    let decision = w.and_then(|w| w.decision.as_ref());
    Scaled {
        arrivals: obs.and_then(|o| o.load.arrival_rate_rps),
        tokens: obs.and_then(|o| o.load.generation_tokens_per_second),
        ttft_p95: obs
            .and_then(|o| o.latency.ttft_seconds.as_ref())
            .and_then(|h| h.quantile(0.95)),
        itl_p95: obs
            .and_then(|o| o.latency.itl_seconds.as_ref())
            .and_then(|h| h.quantile(0.95)),
        desired: decision.map(|d| d.desired_replicas),
        decision: decision.map(|d| d.summary()),
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn verdict(v: Option<f64>, slo: f64) -> &'static str {
    match v {
        Some(v) if v <= slo => "ok",
        Some(_) => "MISSED",
        None => "",
    }
}

fn progress(h: &Header, s: &FleetStatus) -> (f64, String) {
    let frac = if h.duration_s > 0.0 {
        (s.trace_s / h.duration_s).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let state = if s.replaying {
        format!(
            "{} of {}",
            fmt_duration(s.trace_s),
            fmt_duration(h.duration_s)
        )
    } else {
        "starting the warm fleet".to_string()
    };
    (frac, state)
}

/// The live frame, one string per line.
fn frame(h: &Header, s: &FleetStatus, view: &StateView, workload: &WorkloadRef) -> Vec<String> {
    let sc = scaled(view, workload);
    let (frac, state) = progress(h, s);
    let filled = (frac * 30.0).round() as usize;
    let mut lines = vec![
        h.title.clone(),
        format!(
            "trace     {}  [{}{}] {:3.0}%  {state}  ({:.0}x)",
            h.trace,
            "#".repeat(filled),
            "-".repeat(30 - filled),
            frac * 100.0,
            h.speed
        ),
        format!(
            "load      arrivals {} req/s   generated {} tok/s   arrived {}   served {}   dropped {}",
            num(sc.arrivals, 1),
            num(sc.tokens, 0),
            s.arrived,
            s.completed,
            s.dropped
        ),
        format!(
            "replicas  desired {}   ready {}   loading {}   pending {}   draining {}   (/scale {})   batch limit {}",
            sc.desired.map_or_else(|| "-".into(), |d| d.to_string()),
            s.ready,
            s.loading,
            s.pending,
            s.draining,
            s.spec_replicas,
            s.batch_limit.map_or_else(|| "-".into(), |b| b.to_string())
        ),
        format!(
            "SLO p95   TTFT {} s (SLO {} s) {}   ITL {} ms (SLO {} ms) {}",
            num(sc.ttft_p95, 2),
            h.ttft_slo_s,
            verdict(sc.ttft_p95, h.ttft_slo_s),
            num(sc.itl_p95.map(|v| v * 1000.0), 0),
            h.itl_slo_s * 1000.0,
            verdict(sc.itl_p95, h.itl_slo_s)
        ),
        format!(
            "decision  {}",
            sc.decision.unwrap_or_else(|| "(none yet)".into())
        ),
        format!(
            "{:<12} {:>3} {:>5} {:>6} {:>12}  pod",
            "node", "gpu", "util", "power", "memory"
        ),
    ];
    lines.extend(gpu_rows(s, view));
    lines
}

/// One row per GPU holding a pod (at most [`MAX_GPU_ROWS`]), then the rest summed up.
fn gpu_rows(s: &FleetStatus, view: &StateView) -> Vec<String> {
    let mut busy = Vec::new();
    let mut idle = 0usize;
    for (node, n) in &view.nodes {
        for g in &n.gpus {
            let pod = n
                .pods
                .iter()
                .find(|p| p.gpu_uuids().contains(&g.info.uuid))
                .map(|p| p.pod.name.clone());
            let Some(pod) = pod else {
                idle += 1;
                continue;
            };
            let m = &g.metrics;
            let gib = |b: Option<u64>| b.map_or(0.0, |b| b as f64 / (1u64 << 30) as f64);
            let phase = s.pods.get(&pod).map_or("gone", |p| PodPhase::as_str(*p));
            busy.push(format!(
                "{:<12} {:>3} {:>4.0}% {:>5.0}W {:>5.0}/{:<4.0}G  {pod} {phase}",
                node.as_str(),
                g.info.index,
                m.utilization_gpu_ratio.unwrap_or(0.0) * 100.0,
                m.power_watts.unwrap_or(0.0),
                gib(m.memory_used_bytes),
                g.info.memory_total_bytes as f64 / (1u64 << 30) as f64,
            ));
        }
    }
    let shown = busy.len().min(MAX_GPU_ROWS);
    let hidden = busy.len() - shown;
    let mut rows: Vec<String> = busy.into_iter().take(shown).collect();
    let nodes = view.nodes.len();
    let mut tail = format!("{idle} GPUs idle");
    if hidden > 0 {
        let _ = write!(tail, ", {hidden} more busy GPUs not shown");
    }
    let _ = write!(tail, " ({nodes} nodes reporting)");
    rows.push(tail);
    rows
}

/// The plain status line.
fn line(h: &Header, s: &FleetStatus, view: &StateView, workload: &WorkloadRef) -> String {
    let sc = scaled(view, workload);
    let (frac, state) = progress(h, s);
    format!(
        "[{:3.0}% {state}] arrivals {} req/s, {} tok/s | replicas desired {} ready {} loading {} pending {} draining {} | p95 TTFT {} s, ITL {} ms | served {} dropped {} | {}",
        frac * 100.0,
        num(sc.arrivals, 1),
        num(sc.tokens, 0),
        sc.desired.map_or_else(|| "-".into(), |d| d.to_string()),
        s.ready,
        s.loading,
        s.pending,
        s.draining,
        num(sc.ttft_p95, 2),
        num(sc.itl_p95.map(|v| v * 1000.0), 0),
        s.completed,
        s.dropped,
        sc.decision.unwrap_or_else(|| "no decision yet".into())
    )
}
