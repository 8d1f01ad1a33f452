//! Simulator speed: simulated requests per second on one core.
//!
//! `cargo bench --bench sim` replays the Azure conversation trace scaled to
//! about 20 replicas of the H200 Llama-3-8B profile (≈ 0.9 M requests)
//! with a static fleet (the simulator alone), with gpuscale's policy, with
//! an HPA baseline and with Knative's KPA (1 s telemetry), and two days of
//! the ServeGen series on the Llama2-70B profile; each run on one thread.
//! Target: at least 1 million simulated requests per second per core.

use std::path::Path;
use std::time::Instant;

use gpuscale_sim::baselines::{self, BaselineContext};
use gpuscale_sim::fleet::{ColdStart, FleetConfig, VictimOrder};
use gpuscale_sim::gpuscale::{GpuscaleAutoscaler, GpuscaleOptions, default_spec};
use gpuscale_sim::trace::{SizePool, Trace, Workload, WorkloadOptions, read_trace};
use gpuscale_sim::{Autoscaler, FixedReplicas, RunConfig, Slo, run_policy};

fn data(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
}

struct Case {
    label: String,
    workload: Workload,
    cfg: RunConfig,
    ctx: BaselineContext,
    preset: &'static str,
}

fn case(label: &str, workload: Workload, preset: &'static str, itl_s: f64, cold: f64) -> Case {
    let perf = gpuscale_sim::profile::resolve_profile(preset).expect("preset");
    let slo = Slo {
        ttft_s: 2.0,
        itl_s,
        percentile: 95.0,
        ttft_per_input_token_s: 0.0,
    };
    let (mi, mo) = workload.mean_sizes();
    let mut ctx = BaselineContext {
        perf: perf.clone(),
        slo,
        min_replicas: 1,
        max_replicas: 1,
        peak_rps: workload.peak_rate(60.0),
        mean_input: mi,
        mean_output: mo,
    };
    ctx.max_replicas = 4 * ctx.static_peak_replicas();
    let cfg = RunConfig {
        slo,
        fleet: FleetConfig {
            perf,
            prefill_token_budget: 8192,
            pending_s: 0.0,
            cold_start: ColdStart::Fixed(cold),
            drain_grace_s: Some(30.0),
            victim_order: VictimOrder::Kubernetes,
            horizon_s: workload.duration_s(),
            seed: 1,
        },
        initial_replicas: ctx.static_peak_replicas(),
        chart_bucket_s: (workload.duration_s() / 400.0).max(10.0),
    };
    Case {
        label: label.to_string(),
        workload,
        cfg,
        ctx,
        preset,
    }
}

fn measure(c: &Case, name: &str, policy: &mut dyn Autoscaler) -> f64 {
    // One warm-up run, then the best of three.
    let _ = run_policy(&c.workload, policy, &c.cfg, None);
    let mut best = 0.0f64;
    let mut requests = 0;
    for _ in 0..3 {
        let started = Instant::now();
        let out = run_policy(&c.workload, policy, &c.cfg, None);
        let wall = started.elapsed().as_secs_f64();
        requests = out.stats.arrivals;
        best = best.max(out.stats.arrivals as f64 / wall);
    }
    println!(
        "{:<34} {:<22} {:>10} requests  {:>6.2} M requests/s",
        c.label,
        name,
        requests,
        best / 1e6
    );
    best
}

fn main() {
    let conv = read_trace(&data("traces/AzureLLMInferenceTrace_conv.csv"), None).expect("conv");
    let w = Workload::new(
        &conv,
        None,
        &WorkloadOptions {
            rate_scale: 46.0,
            ..Default::default()
        },
    )
    .expect("workload");
    let azure = case(
        "azure-conv x46 (h200 8B)",
        w,
        "h200-llama3-8b-bf16",
        0.05,
        90.0,
    );

    let Trace::Requests { requests, .. } = &conv else {
        panic!("conv lists requests")
    };
    let servegen =
        read_trace(&data("traces/servegen_m-large_rate_10min.csv"), None).expect("servegen");
    let w = Workload::new(
        &servegen,
        Some(SizePool::from_requests(requests)),
        &WorkloadOptions {
            rate_scale: 100.0 / 583.0,
            horizon_s: Some(2.0 * 86_400.0),
            ..Default::default()
        },
    )
    .expect("workload");
    let days = case(
        "servegen 2 days (h100 70B TP4)",
        w,
        "h100-llama2-70b-tp4",
        0.06,
        240.0,
    );

    let mut worst = f64::INFINITY;
    for c in [&azure, &days] {
        let n = c.ctx.static_peak_replicas();
        let mut fixed = FixedReplicas {
            label: "static".into(),
            replicas: n,
            batch_limit: None,
        };
        worst = worst.min(measure(c, "static (simulator only)", &mut fixed));
        let spec = default_spec(
            c.preset,
            &c.cfg.slo,
            1,
            c.ctx.max_replicas,
            c.cfg.fleet.cold_start.max_s(),
            c.cfg.fleet.perf.gpus_per_replica,
        );
        let mut ours =
            GpuscaleAutoscaler::new(spec, c.cfg.fleet.perf.clone(), GpuscaleOptions::default())
                .expect("spec");
        worst = worst.min(measure(c, "gpuscale", &mut ours));
        for (name, target) in [("keda-waiting", 5.0), ("knative-kpa", 128.0)] {
            let mut b = baselines::baseline(name, Some(target), &c.ctx).expect("baseline");
            worst = worst.min(measure(c, name, b.as_mut()));
        }
    }
    println!(
        "slowest case: {:.2} M simulated requests/s per core (target >= 1.0)",
        worst / 1e6
    );
}
