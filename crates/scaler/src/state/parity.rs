//! The simulator's observation is the scaler's: one sequence of agent
//! samples, fed once through the scaler's path (wire encoding, validation at
//! the edge, the state task's windows, the published view, the decide
//! loop's assembly) and once through the simulator's, gives equal
//! observations at every decision.

use std::time::Duration;

use gpuscale_core::sample::{AgentHealth, NodeDelta, NodeSnapshot};
use gpuscale_proto::v1;
use gpuscale_sim::agent::{engine_sample, engine_state, replica_pod, sim_time, target_observation};
use gpuscale_sim::autoscaler::Autoscaler;
use gpuscale_sim::fleet::{ColdStart, Fleet, FleetConfig, VictimOrder};
use gpuscale_sim::gpuscale::{GpuscaleAutoscaler, GpuscaleOptions, SIMULATED_MODEL, default_spec};
use gpuscale_sim::rng::SimRng;
use gpuscale_sim::run::{cluster_view, sample_fleet};
use gpuscale_sim::stats::{Recorder, RunStats, Slo};
use gpuscale_sim::trace::Request;

use super::*;
use crate::config::EngineSelector;

const PROFILE: &str = "h200-llama3-8b-bf16";

fn slo() -> Slo {
    Slo {
        ttft_s: 2.0,
        itl_s: 0.05,
        percentile: 95.0,
        ttft_per_input_token_s: 0.0,
    }
}

/// What the agent of the simulated node sends for the fleet's `sample`:
/// every engine it sees, through the wire encoding and back (the scaler's
/// ingest validates every report with these conversions).
fn engines_of(sample: &gpuscale_sim::FleetSample, kv: f64) -> Vec<EngineSample> {
    let at = sim_time(sample.at);
    sample
        .replicas
        .iter()
        .filter_map(|r| {
            let state = engine_state(r.state)?;
            let e = engine_sample(
                replica_pod(r.id),
                SIMULATED_MODEL,
                state,
                Some(r),
                &r.counters,
                kv,
                at,
            );
            let wire = v1::EngineSample::from(&e);
            Some(EngineSample::try_from(wire).expect("a valid engine sample"))
        })
        .collect()
}

fn wire_round_trip(report: AgentReport) -> AgentReport {
    AgentReport::try_from(v1::NodeReport::from(&report)).expect("a valid report")
}

#[tokio::test(start_paused = true)]
async fn the_simulator_and_the_scaler_build_equal_observations_from_one_sample_sequence() {
    let perf = gpuscale_sim::profile::resolve_profile(PROFILE).expect("preset");
    let kv = perf.kv_capacity_tokens;
    let cfg = FleetConfig {
        perf: perf.clone(),
        prefill_token_budget: 8192,
        pending_s: 5.0,
        cold_start: ColdStart::Fixed(20.0),
        drain_grace_s: None,
        victim_order: VictimOrder::LeastWork,
        horizon_s: 300.0,
        seed: 3,
    };
    let stats = RunStats::new(slo(), 300.0, 10.0);
    let mut fleet = Fleet::new(cfg, 2, Recorder::Full(Box::new(stats)));
    let spec = default_spec(PROFILE, &slo(), 1, 10, 20.0, 1);
    let mut sim = GpuscaleAutoscaler::new(spec, perf, GpuscaleOptions::default()).expect("spec");

    let mut state = State::new(
        StateConfig {
            window: Duration::from_millis(gpuscale_observe::DEFAULT_WINDOW_MS as u64),
            node_ttl: Duration::from_secs(3600),
        },
        Arc::new(ScalerMetrics::new()),
        [],
    );
    let (out, _rx) = mpsc::channel(1 << 16);
    let selector = EngineSelector {
        model: Some(SIMULATED_MODEL.into()),
        namespace: None,
    };

    // Poisson arrivals at a rate that steps up, then down.
    let mut rng = SimRng::new(11, 0);
    let mut t = 0.0;
    let mut arrivals = Vec::new();
    while t < 300.0 {
        let rate = if (60.0..180.0).contains(&t) {
            60.0
        } else {
            15.0
        };
        t += rng.exponential(1.0 / rate);
        arrivals.push(Request {
            arrival_s: t,
            input_tokens: 100 + rng.below(2_000) as u32,
            output_tokens: 10 + rng.below(400) as u32,
        });
    }
    let mut next = arrivals.iter().peekable();
    let mut seq = 0u64;
    let mut compared = 0;
    let mut with_load = 0;
    let mut previous: Option<Vec<PodRef>> = None;
    // Samples at k + 0.5 s (as the simulator takes them), decisions every 2 s.
    for tick in 1..600u32 {
        let now = f64::from(tick) * 0.5;
        while let Some(r) = next.next_if(|r| r.arrival_s <= now) {
            fleet.advance_to(r.arrival_s);
            fleet.arrive(r);
        }
        fleet.advance_to(now);
        if tick % 2 == 1 {
            let sample = sample_fleet(&fleet, now);
            let engines = engines_of(&sample, kv);
            let pods: Vec<PodRef> = engines.iter().map(|e| e.pod.clone()).collect();
            seq += 1;
            let body = match previous.take() {
                None => ReportBody::Snapshot(NodeSnapshot {
                    node: NodeName::new("sim-node"),
                    agent_version: "test".into(),
                    sampled_at: sim_time(now),
                    sample_interval_ms: 1000,
                    gpus: Vec::new(),
                    pods: Vec::new(),
                    engines,
                    agent: AgentHealth::default(),
                }),
                Some(before) => ReportBody::Delta(NodeDelta {
                    sampled_at: sim_time(now),
                    engines_removed: before.into_iter().filter(|p| !pods.contains(p)).collect(),
                    engines_upserted: engines,
                    ..NodeDelta::default()
                }),
            };
            previous = Some(pods);
            let report = wire_round_trip(AgentReport {
                boot_epoch: 7,
                seq,
                sent_at: sim_time(now),
                body,
            });
            let snapshot = matches!(report.body, ReportBody::Snapshot(_));
            state.apply(
                Command::Report {
                    stream: 1,
                    report: Box::new(report),
                    out: snapshot.then(|| out.clone()),
                },
                Instant::now(),
                sim_time(now),
            );
            sim.observe(sample);
        }
        if tick % 4 == 0 {
            let view = cluster_view(&fleet, now);
            let published = state.publish(sim_time(now));
            let target = target_observation(&view);
            let scaler = crate::observe::assemble_target(&published, &selector, &target);
            let simulated = sim.observation(&view);
            assert_eq!(scaler, simulated, "at {now} s");
            compared += 1;
            if scaler.load.arrival_rate_rps.is_some_and(|r| r > 0.0)
                && scaler.latency.tpot_seconds.is_some()
            {
                with_load += 1;
            }
            // Scale with the load so that replicas start, load and drain.
            let desired = if (60.0..180.0).contains(&now) { 5 } else { 2 };
            fleet.scale_to(desired, &[], now);
        }
    }
    assert!(compared > 100, "{compared} decisions compared");
    assert!(
        with_load > 100,
        "{with_load} observations carried load and latencies"
    );
}
