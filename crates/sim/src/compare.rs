//! A comparison: several policies replayed on one workload with the same
//! fleet, SLOs and starting point, in parallel threads when asked.
//!
//! Every policy starts with the same warm fleet: enough replicas for the
//! busiest minute of the first `max(300 s, one cold start)` at the
//! per-replica capacity of B11 (`ceil(peak / capacity)`), so no policy is
//! judged on a cold start at time zero it could not have prevented.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use gpuscale_policy::{PerfModel, WorkloadSpec};

use crate::autoscaler::Autoscaler;
use crate::baselines::{self, BaselineContext};
use crate::error::SimError;
use crate::gpuscale::{GpuscaleAutoscaler, GpuscaleOptions};
use crate::oracle::{self, OracleSchedule};
use crate::report::PolicyReport;
use crate::run::{RunConfig, RunOutcome, run_policy};
use crate::trace::Workload;

/// One policy to run.
#[derive(Debug, Clone)]
pub enum PolicyChoice {
    /// gpuscale's policy with its spec and the model it sizes with.
    Gpuscale {
        spec: Box<WorkloadSpec>,
        model: Box<PerfModel>,
        options: GpuscaleOptions,
    },
    /// The oracle at an attainment target per window.
    Oracle { target: f64 },
    /// A baseline at a target (`None`: the anchor's default).
    Baseline { name: String, target: Option<f64> },
}

impl PolicyChoice {
    pub fn label(&self) -> String {
        match self {
            PolicyChoice::Gpuscale { .. } => "gpuscale".into(),
            PolicyChoice::Oracle { .. } => "oracle".into(),
            PolicyChoice::Baseline { name, target } => match target {
                Some(t) => format!("{name}[{t}]"),
                None => name.clone(),
            },
        }
    }

    fn target(&self) -> Option<f64> {
        match self {
            PolicyChoice::Baseline { target, .. } => *target,
            _ => None,
        }
    }
}

/// Everything the runs of a comparison share.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub workload: Workload,
    pub run: RunConfig,
    pub baselines: BaselineContext,
}

impl Comparison {
    /// Seconds from creating a replica until it is ready.
    pub fn lead_s(&self) -> f64 {
        self.run.fleet.pending_s + self.run.fleet.cold_start.max_s()
    }

    /// The starting fleet every policy gets (see the module docs).
    pub fn initial_replicas(workload: &Workload, ctx: &BaselineContext, lead_s: f64) -> u32 {
        let until = lead_s.max(300.0);
        let peak = workload.peak_rate_until(60.0, until);
        ((peak / ctx.capacity_rps()).ceil() as u32)
            .clamp(ctx.min_replicas.max(1), ctx.max_replicas.max(1))
    }

    fn build(&self, choice: &PolicyChoice) -> Result<Box<dyn Autoscaler>, SimError> {
        Ok(match choice {
            PolicyChoice::Gpuscale {
                spec,
                model,
                options,
            } => Box::new(GpuscaleAutoscaler::new(
                (**spec).clone(),
                (**model).clone(),
                options.clone(),
            )?),
            PolicyChoice::Oracle { target } => {
                let plan = oracle::plan(
                    &self.workload,
                    &self.run.fleet,
                    self.run.slo,
                    *target,
                    self.baselines.min_replicas,
                    self.baselines.max_replicas,
                );
                Box::new(OracleSchedule::new(plan, self.lead_s()))
            }
            PolicyChoice::Baseline { name, target } => {
                baselines::baseline(name, *target, &self.baselines)?
            }
        })
    }

    /// Run one policy.
    pub fn run_one(
        &self,
        choice: &PolicyChoice,
        progress: Option<&mut dyn FnMut(f64)>,
    ) -> Result<RunOutcome, SimError> {
        let mut policy = self.build(choice)?;
        Ok(run_policy(
            &self.workload,
            policy.as_mut(),
            &self.run,
            progress,
        ))
    }

    /// Run every choice on up to `jobs` threads; results in the order given.
    /// `on_done(done, total, label)` is called after each run.
    pub fn run_all(
        &self,
        choices: &[PolicyChoice],
        jobs: usize,
        on_done: &(dyn Fn(usize, usize, &str) + Sync),
    ) -> Result<Vec<RunOutcome>, SimError> {
        // Validate every choice before spending time on any.
        for c in choices {
            if let PolicyChoice::Baseline { name, target } = c {
                baselines::baseline(name, *target, &self.baselines)?;
            }
        }
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<RunOutcome, SimError>>>> =
            Mutex::new((0..choices.len()).map(|_| None).collect());
        let total = choices.len();
        std::thread::scope(|scope| {
            for _ in 0..jobs.clamp(1, total.max(1)) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(choice) = choices.get(i) else { break };
                        let r = self.run_one(choice, None);
                        if let Ok(mut g) = results.lock() {
                            g[i] = Some(r);
                        }
                        let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                        on_done(d, total, &choice.label());
                    }
                });
            }
        });
        let results = results
            .into_inner()
            .map_err(|_| SimError::Report("a run thread panicked".into()))?;
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(SimError::Report("a run did not finish".into()))))
            .collect()
    }

    /// Reports for runs of `choices` on a trace named `trace`.
    pub fn reports(
        &self,
        trace: &str,
        choices: &[PolicyChoice],
        outcomes: &[RunOutcome],
    ) -> Vec<PolicyReport> {
        let mut reports: Vec<PolicyReport> = choices
            .iter()
            .zip(outcomes)
            .map(|(c, o)| {
                PolicyReport::from_outcome(
                    o,
                    trace,
                    c.target(),
                    self.workload.duration_s(),
                    self.run.fleet.perf.gpus_per_replica,
                    self.run.initial_replicas,
                )
            })
            .collect();
        crate::report::relate_to_oracle(&mut reports);
        reports
    }
}
