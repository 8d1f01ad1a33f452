//! B7 and B8: NVIDIA Dynamo Planner (REFERENCE.md §2.2, §3.2 B7/B8).
//!
//! **B7, Gen-1 SLA planner** (`components/planner/src/dynamo/planner/utils/
//! planner_core.py` @07619258). Every 180 s, from Prometheus averages over
//! the last 180 s of completed requests (TTFT, ITL, count, duration, ISL,
//! OSL; skipped if any is missing): forecast the next interval's count, ISL
//! and OSL; with correction (B7-c) `p_cf = TTFT / p(ISL)`, per-engine
//! concurrency `conc = count / engines × duration / 180` and
//! `d_cf = ITL / t(conc, ISL + OSL/2)`; prefill demand
//! `count·ISL/180·min(1, p_cf)` over the prefill throughput at ISL; decode
//! demand `count·OSL/180` over the best throughput whose ITL meets
//! `ITL_SLO / d_cf` (the largest batch within KV at context `ISL + OSL/2`,
//! else batch 1); floors of 1 (`min_endpoint`) and the GPU budget.
//! The planner's profile interpolators are replaced by the exact
//! performance model (an advantage to the baseline). Our fleet is
//! aggregated (prefill and decode on the same replicas), so the replica
//! count is `ceil(prefill fraction + decode fraction)` (project choice).
//! Predictor: `constant` (next = last), one of Gen-1's predictors; the
//! default ARIMA (`pmdarima.auto_arima`) is not re-implemented. Actuation
//! does not wait for readiness.
//!
//! **B8, Gen-2 load scaling** (`components/src/dynamo/planner/core/
//! load_scaling.py` @0c6da1ec, `throughput_scaling.py` @0c9050c9). Every
//! 5 s, per engine from its forward-pass metrics (here the engine's own
//! gauges, sampled each second): `TTFT_est(q) = Σ p(chunk)` over
//! `q + avg ISL` cut into 8,192-token chunks; `ITL_est(kv) = t(running + 1,
//! kv + ISL + OSL/2)`. SLA mode (sensitivity 0.80): +1 if every engine
//! overloads TTFT or every engine overloads ITL; −1 only if `N > 1` and every
//! engine passes the consolidation check (prefill: `TTFT_est(queued·N/(N−1))
//! − p(ISL) < (TTFT_SLO − p(ISL))·s`; decode: `post_kv = (sched + queued
//! KV)·N/(N−1) < max_kv` and `ITL_est(post_kv) < ITL_SLO·s`); then
//! `max(·, throughput lower bound, 1)`; one step per interval; no action
//! while the expected count differs from ready. The throughput loop (every
//! 180 s) forecasts the request count with the Kalman predictor (q_level 1,
//! q_trend 0.1, r 10, ≥ 5 points) and divides by one engine's best rate at
//! both SLOs. The online regression is replaced by the exact model; since
//! our replicas are aggregated (prefill and decode on the same engine), the
//! regression Dynamo fits on every forward pass would include the mixed
//! iterations' prefill time, so `ITL_est` is the decode step over `1 − ρ`,
//! `ρ` the share of the engine's time spent prefilling (its prompt tokens
//! per second over the last load interval × the prefill time per token at
//! the average ISL; capped at 0.9).
//! Easy modes (±1, no throughput loop): `throughput` — up if any
//! `r = queued prefill / context_length ≥ 1` or `u = (sched + queued KV +
//! queued prefill) / max_kv > 1`, down if all `r < 0.1` and `u < 0.6`;
//! `latency` — up if any `r ≥ 0.1` or `u > 0.4`, down if all `r = 0` and
//! `u < 0.1` (`context_length` 8,192; project choice).

use gpuscale_policy::PerfModel;
use serde_json::{Value, json};

use crate::autoscaler::{Autoscaler, ClusterView, FleetSample, ScaleCommand};
use crate::profile::{Coefficients, replica_capacity_rps};
use crate::prometheus::MetricStore;
use crate::stats::Slo;

/// Dynamo's load predictors (Gen-2 `core/load/predictors.py`).
#[derive(Debug, Clone)]
pub enum Predictor {
    /// Next = last.
    Constant { last: Option<f64> },
    /// Local-linear-trend Kalman filter; last value until 5 points.
    Kalman(Kalman),
}

impl Predictor {
    pub fn constant() -> Self {
        Predictor::Constant { last: None }
    }
    pub(crate) fn kalman() -> Self {
        Predictor::Kalman(Kalman::new(1.0, 0.1, 10.0))
    }

    /// Feed one observation (non-finite counts as 0; leading zeros skipped).
    pub fn observe(&mut self, y: f64) {
        let y = if y.is_finite() { y } else { 0.0 };
        match self {
            Predictor::Constant { last } => {
                if last.is_some() || y != 0.0 {
                    *last = Some(y);
                }
            }
            Predictor::Kalman(k) => {
                if k.points > 0 || y != 0.0 {
                    k.update(y);
                }
            }
        }
    }

    /// The one-step-ahead forecast.
    pub fn predict(&self) -> Option<f64> {
        match self {
            Predictor::Constant { last } => *last,
            Predictor::Kalman(k) => k.forecast(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Predictor::Constant { .. } => "constant",
            Predictor::Kalman(_) => "kalman",
        }
    }
}

/// Local linear trend: state [level, trend], `F = [[1,1],[0,1]]`, `H = [1,0]`.
#[derive(Debug, Clone)]
pub struct Kalman {
    x: [f64; 2],
    p: [[f64; 2]; 2],
    q_level: f64,
    q_trend: f64,
    r: f64,
    points: u32,
    last: f64,
}

impl Kalman {
    pub fn new(q_level: f64, q_trend: f64, r: f64) -> Self {
        Self {
            x: [0.0, 0.0],
            p: [[1000.0, 0.0], [0.0, 1000.0]],
            q_level,
            q_trend,
            r,
            points: 0,
            last: 0.0,
        }
    }

    fn update(&mut self, y: f64) {
        if self.points == 0 {
            self.x = [y, 0.0];
        } else {
            // Predict.
            let x0 = self.x[0] + self.x[1];
            let x1 = self.x[1];
            let p = self.p;
            let p00 = p[0][0] + p[0][1] + p[1][0] + p[1][1] + self.q_level;
            let p01 = p[0][1] + p[1][1];
            let p10 = p[1][0] + p[1][1];
            let p11 = p[1][1] + self.q_trend;
            // Update with H = [1, 0].
            let s = p00 + self.r;
            let k0 = p00 / s;
            let k1 = p10 / s;
            let innov = y - x0;
            self.x = [x0 + k0 * innov, x1 + k1 * innov];
            self.p = [
                [(1.0 - k0) * p00, (1.0 - k0) * p01],
                [p10 - k1 * p00, p11 - k1 * p01],
            ];
        }
        self.points += 1;
        self.last = y;
    }

    fn forecast(&self) -> Option<f64> {
        if self.points == 0 {
            None
        } else if self.points < 5 {
            Some(self.last)
        } else {
            Some((self.x[0] + self.x[1]).max(0.0))
        }
    }
}

/// Shared model helpers.
#[derive(Debug, Clone)]
struct Model {
    perf: PerfModel,
    k: Coefficients,
}

impl Model {
    fn new(perf: &PerfModel) -> Self {
        Self {
            perf: perf.clone(),
            k: Coefficients::of(perf),
        }
    }

    /// Generated tokens per second per GPU at the largest batch whose step
    /// at context `ctx` meets `itl` (batch 1 if none does).
    fn best_decode_throughput_per_gpu(&self, itl: f64, ctx: f64) -> f64 {
        let kv_limit = (self.perf.kv_capacity_tokens / ctx.max(1.0))
            .floor()
            .max(1.0) as u32;
        let max_b = self.perf.max_batch.min(kv_limit).max(1);
        let mut best = 1u32;
        for b in 1..=max_b {
            if self.perf.decode_step_s(f64::from(b), ctx) <= itl {
                best = b;
            }
        }
        let b = f64::from(best);
        b / self.perf.decode_step_s(b, ctx) / f64::from(self.perf.gpus_per_replica.max(1))
    }

    /// Prefill time of `tokens` cut into chunks of `mbt`.
    fn chunked_prefill_s(&self, tokens: f64, mbt: f64) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let k = (tokens / mbt).ceil().max(1.0);
        (k - 1.0) * self.perf.prefill_s(mbt) + self.perf.prefill_s(tokens - (k - 1.0) * mbt)
    }
}

/// B7: Dynamo Gen-1 SLA planner.
#[derive(Debug, Clone)]
pub struct DynamoSlaPlanner {
    model: Model,
    slo: Slo,
    correction: bool,
    itl_factor: f64,
    max_gpu_budget: u32,
    store: MetricStore,
    count: Predictor,
    isl: Predictor,
    osl: Predictor,
    desired: Option<u32>,
}

const INTERVAL_S: f64 = 180.0;
const MBT: f64 = 8192.0;

impl DynamoSlaPlanner {
    pub fn new(perf: &PerfModel, slo: Slo, correction: bool, itl_factor: f64, max: u32) -> Self {
        Self {
            model: Model::new(perf),
            slo,
            correction,
            itl_factor,
            max_gpu_budget: max * perf.gpus_per_replica.max(1),
            store: MetricStore::new(INTERVAL_S + 30.0),
            count: Predictor::constant(),
            isl: Predictor::constant(),
            osl: Predictor::constant(),
            desired: None,
        }
    }

    /// Feed one interval's observations to the predictors.
    pub fn observe_interval(&mut self, obs: &IntervalObservation) {
        self.count.observe(obs.count);
        self.isl.observe(obs.isl);
        self.osl.observe(obs.osl);
    }

    /// The Gen-1 sizing for one interval's observations; `None` to skip.
    pub fn size(&self, obs: &IntervalObservation, engines: u32) -> Option<u32> {
        let (n_req, isl, osl) = (
            self.count.predict()?,
            self.isl.predict()?,
            self.osl.predict()?,
        );
        let gpus = f64::from(self.model.perf.gpus_per_replica.max(1));
        let itl_slo = self.slo.itl_s * self.itl_factor;
        let (p_cf, d_cf) = if self.correction {
            let p_cf = obs.ttft / self.model.perf.prefill_s(obs.isl);
            let conc = obs.count / f64::from(engines.max(1)) * obs.duration / INTERVAL_S;
            let d_cf = obs.itl
                / self
                    .model
                    .perf
                    .decode_step_s(conc.max(1.0), obs.isl + obs.osl / 2.0);
            (p_cf, d_cf)
        } else {
            (1.0, 1.0)
        };
        let prefill_tok_s = n_req * isl / INTERVAL_S * p_cf.min(1.0);
        let prefill_thpt_per_gpu = isl / self.model.perf.prefill_s(isl) / gpus;
        let p_frac = prefill_tok_s / prefill_thpt_per_gpu / gpus;
        let itl_target = if d_cf > 0.0 && d_cf.is_finite() {
            itl_slo / d_cf
        } else {
            itl_slo
        };
        let thpt = self
            .model
            .best_decode_throughput_per_gpu(itl_target, isl + osl / 2.0);
        let d_frac = (n_req * osl / INTERVAL_S) / thpt / gpus;
        let mut n = (p_frac + d_frac).ceil().max(1.0) as u32;
        let budget_replicas = (f64::from(self.max_gpu_budget) / gpus).floor() as u32;
        n = n.min(budget_replicas.max(1));
        Some(n)
    }
}

/// Averages over one adjustment interval, from completed requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntervalObservation {
    pub ttft: f64,
    pub itl: f64,
    pub count: f64,
    pub duration: f64,
    pub isl: f64,
    pub osl: f64,
}

fn interval_observation(store: &MetricStore, now: f64) -> Option<IntervalObservation> {
    let inc = |f: fn(&crate::fleet::EngineCounters) -> f64| store.increase_sum(now, INTERVAL_S, f);
    let count = inc(|c| c.success as f64)?;
    let ttft_n = inc(|c| c.ttft_buckets.iter().sum::<u64>() as f64)?;
    let itl_n = inc(|c| c.itl_buckets.iter().sum::<u64>() as f64)?;
    if count <= 0.0 || ttft_n <= 0.0 || itl_n <= 0.0 {
        return None;
    }
    let o = IntervalObservation {
        ttft: inc(|c| c.ttft_sum)? / ttft_n,
        itl: inc(|c| c.itl_sum)? / itl_n,
        count,
        duration: inc(|c| c.e2e_sum)? / count,
        isl: inc(|c| c.completed_prompt_tokens as f64)? / count,
        osl: inc(|c| c.completed_output_tokens as f64)? / count,
    };
    let all_finite = [o.ttft, o.itl, o.duration, o.isl, o.osl]
        .iter()
        .all(|v| v.is_finite());
    all_finite.then_some(o)
}

impl Autoscaler for DynamoSlaPlanner {
    fn name(&self) -> String {
        if self.correction {
            "b7-dynamo-sla-c".into()
        } else {
            "b7-dynamo-sla-nc".into()
        }
    }
    fn parameters(&self) -> Value {
        json!({
            "interval_s": INTERVAL_S,
            "correction": self.correction,
            "predictor": self.count.label(),
            "ttft_slo_s": self.slo.ttft_s,
            "itl_target_s": self.slo.itl_s * self.itl_factor,
            "itl_factor": self.itl_factor,
            "min_endpoint": 1,
            "max_gpu_budget": self.max_gpu_budget,
            "scrape_s": 15,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        INTERVAL_S
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(15.0)
    }
    fn observe(&mut self, sample: FleetSample) {
        self.store.push(sample);
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let current = view.spec_replicas;
        let Some(obs) = interval_observation(&self.store, view.now) else {
            return ScaleCommand::replicas(self.desired.unwrap_or(current));
        };
        self.observe_interval(&obs);
        if let Some(n) = self.size(&obs, view.ready) {
            self.desired = Some(n);
        }
        ScaleCommand::replicas(self.desired.unwrap_or(current))
    }
}

/// Which decision rule B8's load loop uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// `optimization_target: sla` with the throughput lower bound.
    Sla,
    /// Easy mode, `throughput` target.
    EasyThroughput,
    /// Easy mode, `latency` target.
    EasyLatency,
}

/// The load loop's default sensitivity (`load_scaling.py`).
pub(crate) const DEFAULT_SENSITIVITY: f64 = 0.8;

/// B8: Dynamo Gen-2 load-based scaling (aggregated).
#[derive(Debug, Clone)]
pub struct DynamoLoadPlanner {
    model: Model,
    slo: Slo,
    mode: LoadMode,
    sensitivity: f64,
    max: u32,
    latest: Option<FleetSample>,
    /// The sample of the previous load interval (for prefill shares).
    previous: Option<FleetSample>,
    store: MetricStore,
    count: Predictor,
    next_throughput: f64,
    lower_bound: u32,
    next_load: f64,
    /// (avg ISL, avg OSL) of recent completions.
    sizes: (f64, f64),
    engine_rps: f64,
}

impl DynamoLoadPlanner {
    pub fn new(perf: &PerfModel, slo: Slo, mode: LoadMode, sensitivity: f64, max: u32) -> Self {
        Self {
            model: Model::new(perf),
            slo,
            mode,
            sensitivity,
            max,
            latest: None,
            previous: None,
            store: MetricStore::new(INTERVAL_S + 30.0),
            count: Predictor::kalman(),
            next_throughput: INTERVAL_S,
            lower_bound: 1,
            next_load: 0.0,
            sizes: (1000.0, 200.0),
            engine_rps: 0.0,
        }
    }

    fn ttft_est(&self, queued: f64, isl: f64) -> f64 {
        self.model.chunked_prefill_s(queued + isl, MBT)
    }

    /// The inter-token gap of an aggregated engine: the decode step,
    /// stretched by the share `prefill_share` of its time spent prefilling.
    fn itl_est(&self, running: f64, kv: f64, decode_len: f64, prefill_share: f64) -> f64 {
        self.model.k.step(running + 1.0, kv + decode_len) / (1.0 - prefill_share.clamp(0.0, 0.9))
    }

    /// Each engine's share of time spent prefilling since the previous load
    /// interval: its prompt tokens per second × seconds per prompt token.
    fn prefill_shares(&self, s: &FleetSample, isl: f64) -> Vec<f64> {
        let per_token = self.model.perf.prefill_s(isl) / isl.max(1.0);
        s.ready()
            .map(|e| {
                let Some(prev) = self.previous.as_ref().filter(|p| p.at < s.at) else {
                    return 0.0;
                };
                let Some(before) = prev.replica(e.id) else {
                    return 0.0;
                };
                let tokens =
                    e.counters
                        .prompt_tokens
                        .saturating_sub(before.counters.prompt_tokens) as f64;
                tokens / (s.at - prev.at) * per_token
            })
            .collect()
    }

    /// +1, −1 or 0 from the engines' state.
    fn load_decision(&self, s: &FleetSample, n: u32) -> i32 {
        let engines: Vec<_> = s.ready().collect();
        if engines.is_empty() {
            return 0;
        }
        let (isl, osl) = self.sizes;
        let decode_len = isl + osl / 2.0;
        let max_kv = self.model.perf.kv_capacity_tokens;
        let shares = self.prefill_shares(s, isl);
        match self.mode {
            LoadMode::Sla => {
                let ttft_over = engines
                    .iter()
                    .all(|e| self.ttft_est(e.queued_prompt_tokens as f64, isl) > self.slo.ttft_s);
                let itl_over = engines.iter().zip(&shares).all(|(e, rho)| {
                    let kv = e.kv_used_tokens + e.queued_prompt_tokens as f64;
                    self.itl_est(f64::from(e.running), kv, decode_len, *rho) > self.slo.itl_s
                });
                if ttft_over || itl_over {
                    return 1;
                }
                if n <= 1 {
                    return 0;
                }
                let scale = f64::from(n) / f64::from(n - 1);
                let sens = self.sensitivity;
                let t_own = self.ttft_est(0.0, isl);
                let budget = (self.slo.ttft_s - t_own) * sens;
                let all_ok = engines.iter().zip(&shares).all(|(e, rho)| {
                    let q = e.queued_prompt_tokens as f64;
                    let prefill_ok = budget > 0.0 && self.ttft_est(q * scale, isl) - t_own < budget;
                    let post_kv = (e.kv_used_tokens + q) * scale;
                    // The prefill share grows with the load moved over too.
                    let decode_ok = post_kv < max_kv
                        && self.itl_est(f64::from(e.running), post_kv, decode_len, rho * scale)
                            < self.slo.itl_s * sens;
                    prefill_ok && decode_ok
                });
                if all_ok { -1 } else { 0 }
            }
            LoadMode::EasyThroughput | LoadMode::EasyLatency => {
                let ctx_len = 8192.0;
                let ru: Vec<(f64, f64)> = engines
                    .iter()
                    .map(|e| {
                        let q = e.queued_prompt_tokens as f64;
                        (q / ctx_len, (e.kv_used_tokens + 2.0 * q) / max_kv)
                    })
                    .collect();
                let (up_r, up_u, down_r, down_u) = if self.mode == LoadMode::EasyThroughput {
                    (1.0, 1.0, 0.1, 0.6)
                } else {
                    (0.1, 0.4, 0.0, 0.1)
                };
                if ru.iter().any(|(r, u)| *r >= up_r || *u > up_u) {
                    1
                } else if n > 1
                    && ru.iter().all(|(r, u)| {
                        (if down_r == 0.0 {
                            *r == 0.0
                        } else {
                            *r < down_r
                        }) && *u < down_u
                    })
                {
                    -1
                } else {
                    0
                }
            }
        }
    }
}

impl Autoscaler for DynamoLoadPlanner {
    fn name(&self) -> String {
        match self.mode {
            LoadMode::Sla => "b8-dynamo-load-sla",
            LoadMode::EasyThroughput => "b8-dynamo-easy-throughput",
            LoadMode::EasyLatency => "b8-dynamo-easy-latency",
        }
        .into()
    }
    fn parameters(&self) -> Value {
        json!({
            "mode": format!("{:?}", self.mode),
            "load_interval_s": 5,
            "throughput_interval_s": if self.mode == LoadMode::Sla { Some(INTERVAL_S) } else { None },
            "sensitivity": self.sensitivity,
            "predictor": self.count.label(),
            "ttft_target_s": self.slo.ttft_s,
            "itl_target_s": self.slo.itl_s,
            "max_num_batched_tokens": MBT,
            "min_endpoint": 1,
            "max": self.max,
        })
    }
    fn decision_interval_s(&self) -> f64 {
        5.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        Some(1.0)
    }
    fn observe(&mut self, sample: FleetSample) {
        // Forward-pass metrics are live; the 180 s history feeds the throughput loop.
        if (sample.at / 15.0).floor() != ((sample.at - 1.0) / 15.0).floor() {
            self.store.push(sample.clone());
        }
        self.latest = Some(sample);
    }
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand {
        let now = view.now;
        let n = view.spec_replicas;
        if now >= self.next_throughput {
            self.next_throughput = now + INTERVAL_S;
            if let Some(obs) = interval_observation(&self.store, now) {
                self.sizes = (obs.isl, obs.osl);
                self.count.observe(obs.count);
                if self.mode == LoadMode::Sla
                    && let Some(pred) = self.count.predict()
                {
                    self.engine_rps =
                        replica_capacity_rps(&self.model.perf, obs.isl, obs.osl, self.slo.itl_s);
                    let demand = pred / INTERVAL_S;
                    self.lower_bound =
                        ((demand / self.engine_rps.max(1e-9)).ceil() as u32).clamp(1, self.max);
                }
            }
        }
        if now < self.next_load {
            return ScaleCommand::replicas(n);
        }
        self.next_load = now + 5.0;
        if n != view.ready {
            return ScaleCommand::replicas(n);
        }
        let Some(s) = self.latest.as_ref() else {
            return ScaleCommand::replicas(n);
        };
        let step = self.load_decision(s, n);
        self.previous = Some(s.clone());
        let mut desired = (i64::from(n) + i64::from(step)).max(1) as u32;
        if self.mode == LoadMode::Sla {
            desired = desired.max(self.lower_bound);
        }
        ScaleCommand::replicas(desired.clamp(1, self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kalman_tracks_a_linear_trend() {
        let mut p = Predictor::kalman();
        for i in 0..50 {
            p.observe(100.0 + 10.0 * f64::from(i));
        }
        let f = p.predict().unwrap();
        assert!((f - 600.0).abs() < 15.0, "forecast {f}");
    }

    #[test]
    fn predictors_skip_leading_zeros() {
        let mut p = Predictor::constant();
        p.observe(0.0);
        assert_eq!(p.predict(), None);
        p.observe(3.0);
        p.observe(0.0);
        assert_eq!(p.predict(), Some(0.0));
    }
}
