// `Policy::decide` for 1, 100 and 10,000 workloads: time per decision
// (criterion, one iteration = one decision for every workload) and heap
// allocations per decision (a counting global allocator, printed before the
// timings).
//
// Each workload has its own policy (H200 Llama-3-8B preset, predictive on,
// one schedule rule on every tenth), warmed with five minutes of decisions,
// and an observation with fresh telemetry, latency histograms and four
// per-replica samples; arrival rates differ per workload and drift each
// tick, so every decision does the full work (sizing searches, forecaster
// buckets, model refinement, behaviour normalisation).
//
// Run: `cargo bench --bench decide` (from the workspace root) or
// `cargo bench -p gpuscale-policy --bench decide` (the policy crate alone).
//
// This file is also the body of the workspace's `benches/decide.rs`
// (`include!`d there), so it has no inner attributes.

use std::alloc::System;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gpuscale_core::{Histogram, Timestamp};
use gpuscale_policy::spec::ScheduleSpec;
use gpuscale_policy::{Observation, Policy, ReplicaObservation, ReplicaState, WorkloadSpec};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const TICK_S: f64 = 2.0;
const START_MS: i64 = 1_750_000_000_000;

struct Fleet {
    policies: Vec<Policy>,
    observations: Vec<Observation>,
    now: Timestamp,
}

fn spec(i: usize) -> WorkloadSpec {
    let mut s = WorkloadSpec::new(&format!("model-{i}"), 64, "h200-llama3-8b-bf16");
    if i.is_multiple_of(10) {
        s.schedules.push(ScheduleSpec {
            name: "office".into(),
            start: "0 8 * * MON-FRI".into(),
            end: "0 18 * * MON-FRI".into(),
            time_zone: "Europe/Berlin".into(),
            min_replicas: Some(4),
            max_replicas: None,
            desired_replicas: None,
        });
    }
    s
}

fn observation(i: usize, now: Timestamp, tick: u64) -> Observation {
    let (rate, replicas) = observation_values(i, tick);
    let mut o = Observation::empty();
    o.telemetry_at = Some(now.plus_secs(-0.5));
    o.replicas.current = replicas;
    o.replicas.ready = replicas;
    o.load.arrival_rate_rps = Some(rate);
    o.load.mean_input_tokens = Some(1000.0 + (i % 7) as f64 * 100.0);
    o.load.mean_output_tokens = Some(200.0);
    o.load.requests_waiting = Some(0.0);
    o.load.requests_running = Some(rate * 3.0);
    o.load.kv_cache_usage_ratio = Some(0.3);
    o.load.prompt_tokens_per_second = Some(rate * 1000.0);
    o.load.generation_tokens_per_second = Some(rate * 200.0);
    let mut ttft = Histogram::ttft();
    ttft.observe_n(0.2, 50);
    let mut itl = Histogram::itl();
    itl.observe_n(0.02, 500);
    o.latency.ttft_seconds = Some(ttft);
    o.latency.itl_seconds = Some(itl);
    o.replica_samples = (0..4)
        .map(|k| ReplicaObservation {
            id: format!("model-{i}-{k}"),
            state: ReplicaState::Ready,
            protected: k == 0,
            created_at: Some(Timestamp::from_millis(START_MS)),
            requests_running: Some(10.0 + k as f64),
            requests_waiting: Some(0.0),
            kv_cache_usage_ratio: Some(0.3),
            mean_context_tokens: Some(1100.0),
            itl_mean_seconds: Some(0.012),
            generation_tokens_per_second: Some(800.0),
            batch_limit: Some(256),
            gpu_fault: None,
        })
        .collect();
    o
}

impl Fleet {
    fn new(n: usize) -> Self {
        let policies = (0..n)
            .map(|i| {
                let config = spec(i)
                    .validate()
                    .expect("invariant: bench specs are valid");
                let model = config
                    .perf_model(None)
                    .expect("invariant: the preset resolves");
                Policy::new(config, model)
            })
            .collect();
        let now = Timestamp::from_millis(START_MS);
        let observations = (0..n).map(|i| observation(i, now, 0)).collect();
        let mut f = Self {
            policies,
            observations,
            now,
        };
        for _ in 0..150 {
            f.tick();
        }
        f
    }

    /// One decision for every workload, two seconds after the last.
    fn tick(&mut self) -> u32 {
        self.now = self.now.plus_secs(TICK_S);
        let tick = ((self.now.as_millis() - START_MS) / 2000) as u64;
        let mut sum = 0;
        for (i, (p, o)) in self
            .policies
            .iter_mut()
            .zip(self.observations.iter_mut())
            .enumerate()
        {
            // Refresh the values that change each tick without reallocating.
            let fresh = observation_values(i, tick);
            o.telemetry_at = Some(self.now.plus_secs(-0.5));
            o.load.arrival_rate_rps = Some(fresh.0);
            o.replicas.current = fresh.1;
            o.replicas.ready = fresh.1;
            sum += p.decide(self.now, o).desired_replicas;
        }
        sum
    }
}

/// Arrival rate and replica count of workload `i` at `tick`.
fn observation_values(i: usize, tick: u64) -> (f64, u32) {
    let base = 5.0 + (i % 97) as f64;
    let rate = base * (1.0 + 0.2 * ((tick as f64 + i as f64) * 0.05).sin());
    (rate, 1 + (rate / 20.0) as u32)
}

fn report_allocations(n: usize) {
    let mut fleet = Fleet::new(n);
    let ticks = if n >= 10_000 { 3 } else { 50 };
    let region = Region::new(GLOBAL);
    for _ in 0..ticks {
        black_box(fleet.tick());
    }
    let stats = region.change();
    let decisions = (ticks * n) as f64;
    println!(
        "decide, {n} workloads: {:.1} allocations and {:.0} bytes allocated per decision",
        stats.allocations as f64 / decisions,
        stats.bytes_allocated as f64 / decisions
    );
}

fn bench_decide(c: &mut Criterion) {
    for n in [1usize, 100, 10_000] {
        report_allocations(n);
    }
    let mut group = c.benchmark_group("decide");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for n in [1usize, 100, 10_000] {
        let mut fleet = Fleet::new(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(fleet.tick()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
