//! gpuscale's own policy in the simulator: the unchanged
//! [`gpuscale_policy::Policy`], fed the [`Observation`] the real scaler
//! builds, through the same code.
//!
//! **What it sees.** Every agent interval (1 s) each replica's engine is
//! sampled as a node agent publishes it ([`crate::agent::engine_sample`]:
//! cumulative counters and histograms, gauges, the engine's state; nothing
//! for pending pods, which have no engine yet), and each sample enters that
//! pod's [`EngineTracker`], the scaler's own window over an engine's
//! series. At each decision (every 2 s, the scaler's tick) the scale target
//! is observed as the Kubernetes actuator sees it
//! ([`crate::agent::target_observation`]: every pod with its state, the count
//! `spec − leaving`), and [`gpuscale_observe::assemble_replicas`] builds the
//! observation from the target and the trackers, exactly as the scaler's
//! decide loop does. Requests held at the router for lack of a ready replica
//! are invisible to agents and are not in the observation; with
//! `minReplicas: 0` they reach the scale-to-zero rule
//! ([`gpuscale_policy::zero::ZeroRule`], as the scaler wraps the policy)
//! the way the activator reports them, and a request held at zero replicas
//! wakes the decision at once. Missing values
//! stay `None`.
//!
//! Simulated time `t` seconds maps to `Timestamp` `SIM_EPOCH + t`
//! (2024-01-01T00:00:00Z, a Monday), so schedules and the forecaster see
//! real calendar time.

use std::collections::HashMap;

use gpuscale_core::{PodRef, Timestamp};
use gpuscale_observe::{DEFAULT_WINDOW_MS, EngineInput, EngineTracker, EngineWindowStats};
use gpuscale_policy::zero::{HeldDemand, ZeroRule};
use gpuscale_policy::{Action, Decision, Observation, PerfModel, Policy, Source, WorkloadSpec};
use serde_json::{Value, json};

pub use crate::agent::{SIM_EPOCH_MS, replica_name};
use crate::agent::{
    engine_sample, engine_state, replica_id, replica_pod, sim_time, target_observation,
};
use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::error::SimError;
use crate::fleet::VictimOrder;

/// The model name the simulated engines report.
pub const SIMULATED_MODEL: &str = "simulated";

/// How the simulated scaler feeds the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuscaleOptions {
    /// Seconds between decisions (the scaler's tick).
    pub decision_interval_s: f64,
    /// Agent sampling and stream interval, seconds.
    pub stream_interval_s: f64,
    /// Span of the scaler's rate and latency windows, seconds.
    pub window_s: f64,
    /// Keep a JSON line per decision that changes the replica count or the
    /// batch limit (and one per minute otherwise), for `--decision-log`.
    pub record_decisions: bool,
}

impl Default for GpuscaleOptions {
    fn default() -> Self {
        Self {
            decision_interval_s: 2.0,
            stream_interval_s: 1.0,
            window_s: DEFAULT_WINDOW_MS as f64 / 1000.0,
            record_decisions: false,
        }
    }
}

/// gpuscale's policy behind the simulator's [`Autoscaler`] contract.
#[derive(Debug)]
pub struct GpuscaleAutoscaler {
    policy: Policy,
    spec: WorkloadSpec,
    opts: GpuscaleOptions,
    /// One tracker per pod an agent reports, by replica id.
    engines: HashMap<u32, EngineTracker>,
    /// When the agents last sampled (all simulated engines share one clock).
    sampled_at: Timestamp,
    kv_capacity_tokens: f64,
    decisions: u64,
    wins: [u64; Source::ALL.len()],
    last: Option<Decision>,
    log: Vec<String>,
    last_logged_at: f64,
    /// With `minReplicas: 0`, the scale-to-zero rule the scaler wraps the
    /// policy in, fed the requests held at the router (the activator).
    zero: Option<(ZeroRule, HeldDemand)>,
}

impl GpuscaleAutoscaler {
    /// The policy for `spec`, sizing with `model`.
    pub fn new(
        spec: WorkloadSpec,
        model: PerfModel,
        opts: GpuscaleOptions,
    ) -> Result<Self, SimError> {
        let config = spec
            .validate()
            .map_err(|e| SimError::PolicySpec(e.to_string()))?;
        let zero = (config.min_replicas == 0).then(|| {
            (
                ZeroRule::new(config.scale_to_zero, config.cold_start_s),
                HeldDemand::default(),
            )
        });
        Ok(Self {
            zero,
            kv_capacity_tokens: model.kv_capacity_tokens,
            policy: Policy::new(config, model),
            spec,
            opts,
            engines: HashMap::new(),
            sampled_at: Timestamp::EPOCH,
            decisions: 0,
            wins: [0; Source::ALL.len()],
            last: None,
            log: Vec::new(),
            last_logged_at: f64::NEG_INFINITY,
        })
    }

    /// The last decision, if any.
    pub fn last_decision(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    fn window_ms(&self) -> i64 {
        (self.opts.window_s * 1000.0).round().max(1.0) as i64
    }

    /// The observation the scaler builds at `view.now`.
    pub fn observation(&self, view: &ClusterView) -> Observation {
        let target = target_observation(view);
        let stats: HashMap<u32, EngineWindowStats> = self
            .engines
            .iter()
            .map(|(id, e)| (*id, e.stats()))
            .collect();
        let seen_at = self.sampled_at;
        let engine_of = |pod: &PodRef| -> Option<EngineInput<'_>> {
            let id = replica_id(&pod.name)?;
            Some(EngineInput {
                sample: self.engines.get(&id)?.sample(),
                seen_at,
                window: stats.get(&id)?,
                // The simulated fleet's GPUs do not fail.
                gpu_fault: None,
            })
        };
        let replicas = target.replicas.as_deref().unwrap_or_default();
        gpuscale_observe::assemble_replicas(replicas, engine_of, target.current)
    }
}

/// The spec the simulator gives gpuscale when none is supplied: every
/// default, the run's SLOs and bounds, the fleet's cold start and the
/// profile as the performance-model preset.
pub fn default_spec(
    preset: &str,
    slo: &crate::stats::Slo,
    min: u32,
    max: u32,
    cold_start_s: f64,
    gpus_per_replica: u32,
) -> WorkloadSpec {
    let mut spec = WorkloadSpec::new("simulated", max, preset);
    spec.min_replicas = min;
    spec.slo.ttft.threshold_seconds = slo.ttft_s;
    spec.slo.ttft.per_input_token_seconds = slo.ttft_per_input_token_s;
    spec.slo.ttft.percentile = slo.percentile;
    spec.slo.itl.threshold_seconds = slo.itl_s;
    spec.slo.itl.percentile = slo.percentile;
    spec.cold_start_seconds = cold_start_s;
    spec.gpus_per_replica = gpus_per_replica;
    spec
}

impl Autoscaler for GpuscaleAutoscaler {
    fn name(&self) -> String {
        "gpuscale".into()
    }
    fn parameters(&self) -> Value {
        let wins: serde_json::Map<String, Value> = Source::ALL
            .iter()
            .zip(self.wins)
            .map(|(n, w)| (n.as_str().to_string(), json!(w)))
            .collect();
        json!({
            "spec": self.spec,
            "decision_interval_s": self.opts.decision_interval_s,
            "stream_interval_s": self.opts.stream_interval_s,
            "window_s": self.opts.window_s,
            "decisions": self.decisions,
            "decisions_won_by": wins,
            "last_decision": self.last.as_ref().map(Decision::summary),
        })
    }
    fn decision_interval_s(&self) -> f64 {
        self.opts.decision_interval_s
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(self.opts.stream_interval_s)
    }
    fn drain_grace_s(&self) -> Option<f64> {
        None
    }
    fn victim_order(&self) -> VictimOrder {
        VictimOrder::LeastWork
    }
    fn wakes_on_held(&self) -> bool {
        self.zero.is_some()
    }
    fn observe(&mut self, sample: FleetSample) {
        let at = sim_time(sample.at);
        if let Some((_, held)) = &mut self.zero {
            *held = HeldDemand {
                held: sample.router_queue,
                arrivals_total: sample.ingress_total,
                oldest_s: 0.0,
            };
        }
        let window_ms = self.window_ms();
        self.engines
            .retain(|id, _| sample.replicas.iter().any(|r| r.id == *id));
        for r in &sample.replicas {
            let Some(state) = engine_state(r.state) else {
                continue;
            };
            let e = engine_sample(
                replica_pod(r.id),
                SIMULATED_MODEL,
                state,
                Some(r),
                &r.counters,
                self.kv_capacity_tokens,
                at,
            );
            match self.engines.get_mut(&r.id) {
                Some(t) => t.update(e, at),
                None => {
                    self.engines
                        .insert(r.id, EngineTracker::new(e, at, window_ms));
                }
            }
        }
        self.sampled_at = at;
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let obs = self.observation(view);
        let mut d = self.policy.decide(sim_time(view.now), &obs);
        if let Some((rule, held)) = &mut self.zero {
            rule.apply(sim_time(view.now), &obs, *held, &mut d);
        }
        self.decisions += 1;
        self.wins[d.winner.index()] += 1;
        let cmd = if d.advisory {
            ScaleCommand::replicas(view.spec_replicas)
        } else {
            ScaleCommand {
                replicas: match d.action {
                    Action::Hold => view.spec_replicas,
                    Action::ScaleUp | Action::ScaleDown => d.desired_replicas,
                },
                batch_limit: d.batch_limit,
                victims: d.victims.iter().filter_map(|v| replica_id(v)).collect(),
            }
        };
        if self.opts.record_decisions {
            let changed = cmd.replicas != view.spec_replicas
                || self.last.as_ref().and_then(|l| l.batch_limit) != d.batch_limit;
            if changed || view.now - self.last_logged_at >= 60.0 {
                self.last_logged_at = view.now;
                self.log.push(
                    json!({
                        "t_s": view.now,
                        "ready": view.ready,
                        "in_flight": view.pending + view.loading,
                        "current": view.spec_replicas,
                        "desired": cmd.replicas,
                        "batch_limit": d.batch_limit,
                        "winner": d.winner.as_str(),
                        "summary": d.summary(),
                        "inputs": d.inputs,
                    })
                    .to_string(),
                );
            }
        }
        self.last = Some(d);
        cmd
    }
    fn take_decision_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }
}
