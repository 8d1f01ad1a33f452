//! A comparison: several policies replayed on one workload with the same
//! fleet, SLOs and starting point, in parallel threads when asked.
//!
//! Every policy starts with the same warm fleet: enough replicas for the
//! busiest minute of the first `max(300 s, one cold start)` at the
//! per-replica capacity of B11 (`ceil(peak / capacity)`), so no policy is
//! judged on a cold start at time zero it could not have prevented.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use gpuscale_policy::{PerfModel, WorkloadSpec};

use crate::autoscaler::Autoscaler;
use crate::baselines::{self, BaselineContext};
use crate::bound::{self, BoundSchedule, CurveDetail, Curves};
use crate::ceiling::{self, Ceiling};
use crate::error::SimError;
use crate::gpuscale::{GpuscaleAutoscaler, GpuscaleOptions};
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
    /// The lower bound's schedule for a target: a share (0..=1) of the
    /// attainment its curves can reach.
    LowerBound { target: f64 },
    /// A baseline at a target (`None`: the anchor's default).
    Baseline { name: String, target: Option<f64> },
}

impl PolicyChoice {
    pub fn label(&self) -> String {
        match self {
            PolicyChoice::Gpuscale { .. } => "gpuscale".into(),
            PolicyChoice::LowerBound { target } => format!("lower-bound[{target}]"),
            PolicyChoice::Baseline { name, target } => match target {
                Some(t) => format!("{name}[{t}]"),
                None => name.clone(),
            },
        }
    }

    fn target(&self) -> Option<f64> {
        match self {
            PolicyChoice::Baseline { target, .. } => *target,
            PolicyChoice::LowerBound { target } => Some(*target),
            PolicyChoice::Gpuscale { .. } => None,
        }
    }
}

/// How many times [`Comparison::lower_bound`] rebuilds the curves along a
/// schedule that fell short of its promise.
pub const BOUND_REFINEMENTS: usize = 2;

/// The lower bound's frontier targets: shares of the attainment its curves
/// can reach (the top one meets all they can).
pub(crate) const LOWER_BOUND_TARGETS: &[f64] =
    &[0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 1.0];

/// Everything the runs of a comparison share.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub workload: Workload,
    pub run: RunConfig,
    pub baselines: BaselineContext,
    /// The lower bound's curves, computed once (by the first run that needs them).
    curves: Arc<OnceLock<Arc<Curves>>>,
    ceiling: Arc<OnceLock<Ceiling>>,
}

impl Comparison {
    pub fn new(workload: Workload, run: RunConfig, baselines: BaselineContext) -> Self {
        Self {
            workload,
            run,
            baselines,
            curves: Arc::new(OnceLock::new()),
            ceiling: Arc::new(OnceLock::new()),
        }
    }

    /// The share of the workload's requests any fleet could serve within the SLO.
    pub fn ceiling(&self) -> Ceiling {
        *self
            .ceiling
            .get_or_init(|| ceiling::ceiling(&self.workload, &self.run.fleet.perf, self.run.slo))
    }

    /// The lower bound's curves (see [`crate::bound`]).
    pub fn curves(&self) -> Arc<Curves> {
        self.curves
            .get_or_init(|| {
                let mut fleet = self.run.fleet.clone();
                fleet.horizon_s = self.workload.duration_s();
                Arc::new(bound::curves(
                    &self.workload,
                    &fleet,
                    self.run.slo,
                    self.baselines.min_replicas,
                    self.baselines.max_replicas,
                    self.run.initial_replicas,
                    CurveDetail::Full,
                ))
            })
            .clone()
    }

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
            PolicyChoice::LowerBound { target } => Box::new(self.lower_bound(*target)),
            PolicyChoice::Baseline { name, target } => {
                baselines::baseline(name, *target, &self.baselines)?
            }
        })
    }

    /// The lower bound's schedule for `target` (a share of what its curves
    /// can meet). The schedule solved on the reference curves is replayed;
    /// when it falls more than half a point short of what the curves
    /// promised (an under-provisioned stretch left a backlog they do not
    /// see), the curves are built again along its own trajectory and the
    /// schedule solved again, up to [`BOUND_REFINEMENTS`] times. Of the
    /// schedules tried, the cheapest whose replay reaches the promise, else
    /// the one that came closest.
    pub fn lower_bound(&self, target: f64) -> BoundSchedule {
        let curves = self.curves();
        let want = target * curves.max_attainment();
        let bounds = (
            curves.min_replicas,
            curves.max_replicas,
            curves.initial_replicas,
        );
        let mut fleet = self.run.fleet.clone();
        fleet.horizon_s = self.workload.duration_s();
        let schedule = |plan: bound::Plan, c: &Curves| {
            BoundSchedule::new(plan, c.window_s, self.lead_s(), target).with_curve_cost(c)
        };
        let mut plan = bound::optimize(&curves, want);
        let mut tried: Vec<(BoundSchedule, f64, f64)> = Vec::new();
        for round in 0..=BOUND_REFINEMENTS {
            let mut s = schedule(plan.clone(), &curves);
            let out = run_policy(&self.workload, &mut s, &self.run, None);
            let realized = out.stats.attainment();
            tried.push((s, realized, out.gpu_hours));
            if realized >= want - 0.005 || round == BOUND_REFINEMENTS {
                break;
            }
            let along =
                bound::curves_along(&self.workload, &fleet, self.run.slo, bounds, &plan.ready);
            plan = bound::optimize(&along, want);
        }
        let reaching = tried
            .iter()
            .filter(|t| t.1 >= want - 0.005)
            .min_by(|a, b| a.2.total_cmp(&b.2));
        let best = reaching
            .or_else(|| tried.iter().max_by(|a, b| a.1.total_cmp(&b.1)))
            .map(|t| t.0.clone());
        best.unwrap_or_else(|| schedule(bound::optimize(&curves, want), &curves))
    }

    /// Run one policy.
    pub(crate) fn run_one(
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
    pub(crate) fn run_all(
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
        let ceiling = self.ceiling().share();
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
                    ceiling,
                )
            })
            .collect();
        crate::report::relate_to_lower_bound(&mut reports);
        reports
    }
}
