//! Re-implementations of the autoscalers users would otherwise pick,
//! specified in REFERENCE.md §3 (baselines B1–B14). Those that sit on a
//! HorizontalPodAutoscaler (B1, B3, B5, B9, B12) run gpuscale's one HPA
//! implementation, [`gpuscale_policy::hpa::Hpa`] (E-HPA of §3.1); KEDA's
//! polling loop (E-KEDA) is [`keda_prometheus::Keda`].
//!
//! Every baseline runs with its anchor's defaults except its main target,
//! which [`sweep`] varies (defaults included) so comparisons are frontier
//! against frontier. Bounds are the comparison's (`min` 1, `max` the pool
//! maximum) where the anchor's own bounds (e.g. AIBrix's 8) would cap the
//! fleet below the load.
//!
//! | name | baseline | swept target |
//! |---|---|---|
//! | `static` | B11 static peak | replicas, as a multiple of the B11 count (the suite also bisects the count that reaches gpuscale's attainment) |
//! | `hpa-gpu-util` | B12 HPA on NVML utilization | utilization % (80) |
//! | `keda-waiting` | B1 production-stack KEDA | waiting per pod (5) |
//! | `kserve-running` | B3 KServe KEDA | running per pod (2) |
//! | `knative-kpa` | B13 Knative KPA | per-pod concurrency (batch limit) |
//! | `aibrix-kpa-mean`, `aibrix-kpa-total`, `aibrix-apa` | B4 AIBrix | KV use (0.5) |
//! | `wva` | B5 llm-d WVA saturation V1 | threshold factor (1) |
//! | `llmd-slo` | B9 llm-d SLO-aware law | threshold factor (1) |
//! | `dynamo-sla-c`, `dynamo-sla-nc` | B7 Dynamo Gen-1 SLA planner | ITL target factor (1) |
//! | `dynamo-load` | B8 Dynamo Gen-2 load scaling (SLA mode, sensitivity 0.8) | the planner's TTFT and ITL targets, as a factor of the SLO (1) |
//! | `dynamo-easy-throughput`, `dynamo-easy-latency` | B8 easy modes | none |
//! | `aws` | B14 AWS predictive + target tracking | requests/s per replica |

pub mod aibrix;
pub mod aws;
pub mod dynamo;
pub mod hpa_gpu_util;
pub mod keda_prometheus;
pub mod knative_kpa;
pub mod llmd_slo;
pub mod wva;

use gpuscale_policy::PerfModel;

use crate::autoscaler::{Autoscaler, FixedReplicas};
use crate::error::SimError;
use crate::profile::slo_capacity_rps;
use crate::stats::Slo;

/// What every baseline may be sized from.
#[derive(Debug, Clone)]
pub struct BaselineContext {
    pub perf: PerfModel,
    pub slo: Slo,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Peak arrival rate over any minute of the trace, requests/s.
    pub peak_rps: f64,
    /// Mean prompt and output tokens of the trace.
    pub mean_input: f64,
    pub mean_output: f64,
}

impl BaselineContext {
    /// Requests/s one replica sustains at the ITL SLO for the mean request
    /// ([`slo_capacity_rps`]: prefill interference included).
    pub fn capacity_rps(&self) -> f64 {
        slo_capacity_rps(
            &self.perf,
            self.mean_input,
            self.mean_output,
            self.slo.itl_s,
        )
    }

    /// B11: `ceil(peak 1-min rate / capacity at the SLO)`.
    pub fn static_peak_replicas(&self) -> u32 {
        ((self.peak_rps / self.capacity_rps()).ceil() as u32).max(1)
    }

    /// Requests in one replica (running) at its capacity at the SLO, by
    /// Little's law: what profiling the fleet's model says a pod holds
    /// before its time per output token reaches the SLO.
    pub(crate) fn concurrency_at_capacity(&self) -> f64 {
        let per_request = self.perf.prefill_s(self.mean_input) + self.mean_output * self.slo.itl_s;
        (self.capacity_rps() * per_request).max(1.0)
    }

    /// The KV-cache fraction one replica uses at its capacity at the SLO
    /// (running requests at their mean context halfway through decoding).
    pub fn kv_use_at_capacity(&self) -> f64 {
        let ctx = self.mean_input + 0.5 * self.mean_output;
        (self.concurrency_at_capacity() * ctx / self.perf.kv_capacity_tokens.max(1.0))
            .clamp(1e-3, 1.0)
    }
}

/// Every baseline name [`baseline`] accepts.
pub(crate) const BASELINE_NAMES: &[&str] = &[
    "static",
    "hpa-gpu-util",
    "keda-waiting",
    "kserve-running",
    "knative-kpa",
    "aibrix-kpa-mean",
    "aibrix-kpa-total",
    "aibrix-apa",
    "wva",
    "llmd-slo",
    "dynamo-sla-c",
    "dynamo-sla-nc",
    "dynamo-load",
    "dynamo-easy-throughput",
    "dynamo-easy-latency",
    "aws",
];

/// The anchor's default target of a baseline.
pub(crate) fn default_target(name: &str, ctx: &BaselineContext) -> Option<f64> {
    Some(match name {
        "static" => 1.0,
        "hpa-gpu-util" => 80.0,
        "keda-waiting" => 5.0,
        "kserve-running" => 2.0,
        "knative-kpa" => f64::from(ctx.perf.max_batch),
        "aibrix-kpa-mean" | "aibrix-kpa-total" | "aibrix-apa" => 0.5,
        "wva" | "llmd-slo" | "dynamo-sla-c" | "dynamo-sla-nc" | "dynamo-load" => 1.0,
        "dynamo-easy-throughput" | "dynamo-easy-latency" => 0.0,
        "aws" => 0.7 * ctx.capacity_rps(),
        _ => return None,
    })
}

/// The targets [`sweep`] runs for a baseline (its default among them).
pub(crate) fn sweep_targets(name: &str, ctx: &BaselineContext) -> Vec<f64> {
    let cap = ctx.capacity_rps();
    match name {
        "static" => vec![0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0],
        "hpa-gpu-util" => vec![40.0, 60.0, 80.0, 90.0],
        "keda-waiting" => vec![1.0, 2.0, 5.0, 10.0, 20.0],
        "kserve-running" => vec![2.0, 16.0, 32.0, 64.0, 128.0],
        // Per-pod concurrency: the shipped ones and multiples of what a pod
        // holds at the SLO (profiling the fleet's model).
        "knative-kpa" => {
            let c = ctx.concurrency_at_capacity();
            let mut v = vec![32.0, 64.0, 128.0, 256.0, f64::from(ctx.perf.max_batch)];
            v.extend([0.75, 1.0, 1.5].map(|f| (f * c / 0.7).round().max(1.0)));
            sorted(v)
        }
        // KV use: the anchor's 0.5 and multiples of the KV use at the SLO.
        "aibrix-kpa-mean" | "aibrix-kpa-total" | "aibrix-apa" => {
            let kv = ctx.kv_use_at_capacity();
            let mut v = vec![0.5];
            v.extend([0.25, 0.5, 0.75, 1.0, 1.25].map(|f| round3(f * kv)));
            sorted(v)
        }
        "wva" => vec![0.5, 0.75, 1.0, 1.5],
        "llmd-slo" => vec![0.35, 0.5, 0.75, 1.0],
        "dynamo-sla-c" | "dynamo-sla-nc" => vec![0.5, 0.75, 1.0],
        // The planner's targets: the load loop compares its estimate of the
        // next step's gap (a mean) with its ITL target, so a user who must
        // hold a percentile of per-request time per output token sets the
        // planner's targets below the SLO.
        "dynamo-load" => vec![0.5, 0.65, 0.8, 1.0],
        "dynamo-easy-throughput" | "dynamo-easy-latency" => vec![0.0],
        "aws" => vec![0.5 * cap, 0.6 * cap, 0.7 * cap, 0.8 * cap, 0.9 * cap],
        _ => Vec::new(),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round().max(1.0) / 1000.0
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// One baseline at one target (`None`: the anchor's default).
pub fn baseline(
    name: &str,
    target: Option<f64>,
    ctx: &BaselineContext,
) -> Result<Box<dyn Autoscaler>, SimError> {
    let unknown = || {
        SimError::config(
            "--policy",
            name,
            format!(
                "gpuscale, oracle, all, or a baseline: {}",
                BASELINE_NAMES.join(", ")
            ),
        )
    };
    let t = match target {
        Some(t) => t,
        None => default_target(name, ctx).ok_or_else(unknown)?,
    };
    if !t.is_finite() || t < 0.0 {
        return Err(SimError::config(
            "baseline target",
            t,
            "a finite number >= 0",
        ));
    }
    let (min, max) = (ctx.min_replicas.max(1), ctx.max_replicas.max(1));
    let b: Box<dyn Autoscaler> = match name {
        "static" => {
            let n = ((f64::from(ctx.static_peak_replicas()) * t).round() as u32).max(1);
            Box::new(FixedReplicas {
                label: "b11-static-peak".into(),
                replicas: n,
                batch_limit: None,
            })
        }
        "hpa-gpu-util" => Box::new(hpa_gpu_util::HpaGpuUtil::new(t, min, max)),
        "keda-waiting" => Box::new(keda_prometheus::KedaQueueTrigger::production_stack_waiting(
            t, min, max,
        )),
        "kserve-running" => Box::new(keda_prometheus::KedaQueueTrigger::kserve_running(
            t, min, max,
        )),
        "knative-kpa" => Box::new(knative_kpa::KnativeKpa::new(t, min, max)),
        "aibrix-kpa-mean" => Box::new(aibrix::Aibrix::new(
            aibrix::AibrixVariant::KpaMean,
            t,
            min,
            max,
        )),
        "aibrix-kpa-total" => Box::new(aibrix::Aibrix::new(
            aibrix::AibrixVariant::KpaTotal,
            t,
            min,
            max,
        )),
        "aibrix-apa" => Box::new(aibrix::Aibrix::new(aibrix::AibrixVariant::Apa, t, min, max)),
        "wva" => Box::new(wva::WvaSaturation::new(
            t,
            ctx.kv_use_at_capacity(),
            min,
            max,
        )),
        "llmd-slo" => Box::new(llmd_slo::LlmdSloAware::new(ctx.slo, t, min, max)),
        "dynamo-sla-c" => Box::new(dynamo::DynamoSlaPlanner::new(
            &ctx.perf, ctx.slo, true, t, max,
        )),
        "dynamo-sla-nc" => Box::new(dynamo::DynamoSlaPlanner::new(
            &ctx.perf, ctx.slo, false, t, max,
        )),
        "dynamo-load" => Box::new(dynamo::DynamoLoadPlanner::new(
            &ctx.perf,
            Slo {
                ttft_s: ctx.slo.ttft_s * t,
                itl_s: ctx.slo.itl_s * t,
                ..ctx.slo
            },
            dynamo::LoadMode::Sla,
            dynamo::DEFAULT_SENSITIVITY,
            max,
        )),
        "dynamo-easy-throughput" => Box::new(dynamo::DynamoLoadPlanner::new(
            &ctx.perf,
            ctx.slo,
            dynamo::LoadMode::EasyThroughput,
            dynamo::DEFAULT_SENSITIVITY,
            max,
        )),
        "dynamo-easy-latency" => Box::new(dynamo::DynamoLoadPlanner::new(
            &ctx.perf,
            ctx.slo,
            dynamo::LoadMode::EasyLatency,
            dynamo::DEFAULT_SENSITIVITY,
            max,
        )),
        "aws" => Box::new(aws::AwsPredictiveTargetTracking::new(t, min, max)),
        _ => return Err(unknown()),
    };
    Ok(b)
}

/// A baseline at one point of its sweep.
pub(crate) type SweepPoint = (f64, Box<dyn Autoscaler>);

/// A baseline at each of its sweep targets: `(target, autoscaler)`.
pub fn sweep(name: &str, ctx: &BaselineContext) -> Result<Vec<SweepPoint>, SimError> {
    sweep_targets(name, ctx)
        .into_iter()
        .map(|t| baseline(name, Some(t), ctx).map(|b| (t, b)))
        .collect()
}
