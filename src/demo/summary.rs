//! The end of the demo: a short summary on stdout and the optional chart.
//!
//! The summary's lines are `label` then values, one fact per line, so a
//! reader (or a test) finds each by its label.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use gpuscale_core::{GpuUuid, NodeName};
use gpuscale_scaler::StateView;
use gpuscale_sim::chart::{ChartSeries, render as render_chart};

use super::error::DemoError;
use super::fleet::FleetOutcome;
use super::{DemoConfig, fmt_duration};

/// What the scaler's view showed of the cluster over the run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    /// Nodes reporting at least one GPU, at most at once.
    pub nodes: usize,
    /// GPUs reported, at most at once.
    pub gpus: usize,
    nodes_ever: BTreeSet<NodeName>,
    gpus_ever: BTreeSet<GpuUuid>,
}

impl Seen {
    pub(crate) fn observe(&mut self, view: &StateView) {
        let nodes = view.nodes.values().filter(|n| !n.gpus.is_empty()).count();
        let gpus = view.gpus().count();
        self.nodes = self.nodes.max(nodes);
        self.gpus = self.gpus.max(gpus);
        if self.gpus_ever.len() < gpus {
            for (node, g) in view.gpus() {
                self.nodes_ever.insert(node.clone());
                self.gpus_ever.insert(g.info.uuid.clone());
            }
        }
    }
}

/// Everything the summary reports.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub fleet: FleetOutcome,
    pub seen: Seen,
    /// Stopped by Ctrl-C before the end of the trace.
    pub interrupted: bool,
    /// Trace seconds replayed.
    pub replayed_s: f64,
    pub wall_s: f64,
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        100.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

/// The summary, one fact per line.
pub(crate) fn render(config: &DemoConfig, o: &Outcome) -> String {
    let mut out = String::new();
    let f = &o.fleet;
    let _ = writeln!(
        out,
        "gpuscale demo: summary{}",
        if o.interrupted {
            " (interrupted: the part replayed so far)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "  trace            {} at rate x{:.2}: {} of {} replayed in {:.0} s of wall time ({:.0}x)",
        config.trace_name(),
        config.rate_scale,
        fmt_duration(o.replayed_s),
        fmt_duration(config.duration_s),
        o.wall_s,
        config.speed
    );
    let _ = writeln!(
        out,
        "  cluster          {} nodes x {} GPUs, {} replicas (1..={}, {:.1} req/s each at the SLOs), scaler in Kubernetes mode on a fake API server",
        config.nodes,
        config.gpus_per_node,
        config.profile,
        config.max_replicas,
        config.capacity_rps
    );
    match &f.stats {
        Some(s) => {
            let _ = writeln!(
                out,
                "  requests         arrived {}, served {}, dropped {} ({} on scale-in)",
                s.arrivals, s.completed, s.dropped, f.dropped_on_scale_in
            );
            let p95 = |q: Option<f64>| q.map_or_else(|| "-".to_string(), |v| format!("{v:.3} s"));
            let _ = writeln!(
                out,
                "  SLO attainment   TTFT <= {} s {:.1}%, TPOT <= {} ms {:.1}%, both {:.1}% (p95 TTFT {}, p95 TPOT {})",
                config.slo.ttft_s,
                pct(s.met_ttft, s.arrivals),
                config.slo.itl_s * 1000.0,
                pct(s.met_tpot, s.arrivals),
                pct(s.met_both, s.arrivals),
                p95(s.ttft.quantile(0.95)),
                p95(s.tpot.quantile(0.95)),
            );
        }
        None => {
            let _ = writeln!(out, "  requests         none recorded");
        }
    }
    let gpu_hours = f.gpu_seconds / 3600.0;
    let static_hours = f64::from(config.static_peak_replicas)
        * f64::from(config.perf.gpus_per_replica.max(1))
        * o.replayed_s
        / 3600.0;
    let versus = if static_hours > 0.0 {
        let change = 100.0 * (gpu_hours / static_hours - 1.0);
        if change <= 0.0 {
            format!("{:.0}% fewer", -change)
        } else {
            format!("{change:.0}% more")
        }
    } else {
        "no comparison".to_string()
    };
    let _ = writeln!(
        out,
        "  GPU-hours        {gpu_hours:.2} vs {static_hours:.2} for a static fleet of {} replicas, the busiest minute at full capacity ({versus})",
        config.static_peak_replicas
    );
    let _ = writeln!(
        out,
        "  scale events     {} ({} up, {} down), peak replicas {} ready, {} in /scale",
        f.scale_changes.up + f.scale_changes.down,
        f.scale_changes.up,
        f.scale_changes.down,
        f.peak_ready,
        f.peak_spec
    );
    let _ = writeln!(
        out,
        "  scaler saw       {} GPUs on {} nodes (of {} on {})",
        o.seen.gpus,
        o.seen.nodes,
        config.nodes * config.gpus_per_node,
        config.nodes
    );
    out
}

/// The SVG chart of the run.
pub(crate) fn write_chart(path: &Path, config: &DemoConfig, o: &Outcome) -> Result<(), DemoError> {
    let Some(stats) = &o.fleet.stats else {
        return Ok(());
    };
    let title = format!(
        "gpuscale demo: {} at rate x{:.2}, {} nodes x {} GPUs, {}",
        config.trace_name(),
        config.rate_scale,
        config.nodes,
        config.gpus_per_node,
        config.profile
    );
    let svg = render_chart(
        &title,
        o.replayed_s.max(1.0),
        &[ChartSeries {
            label: "gpuscale (Kubernetes mode, simulated fleet)".into(),
            series: &stats.series,
        }],
    );
    std::fs::write(path, svg).map_err(|source| DemoError::Chart {
        path: path.display().to_string(),
        source,
    })
}
