//! Sizing against the SLOs: the batch limit, what one replica sustains, and
//! how many replicas an arrival rate needs, from a queueing model of a
//! continuously batching engine.
//!
//! **Batch limit.** `B*` is the largest batch whose decode step at the
//! observed mean context meets the ITL objective with the margin, within the
//! KV capacity and the engine's ceiling ([`batch_limit`]).
//!
//! **One replica at arrival rate `x`** (requests/s), prompts of `I` tokens,
//! outputs of `O` tokens, decode context `L`. Prefill of a new request
//! interrupts decoding (or shares its steps, with chunked prefill — the
//! time is the same), so a fraction `ρ_p = x·p(I)` of the replica's time is
//! prefill. A request generating its tokens sees the mean gap
//! `g = t(B, L) / (1 − ρ_p)` between tokens, and by Little's law the running
//! batch is `B = x·O·g`; the two are solved together by bisection.
//! A request's own mean ITL also counts the prefills of the requests that
//! arrive while it decodes (`K ≈ B` of them): `ITL ≈ t(B, L) + K·p(I)/O`, so
//! short outputs make prefill interference dominate. Quantiles: `B` and `K`
//! are taken at their Poisson upper quantile (`m + z·√m`).
//!
//! **Per-request TPOT.** The objective is judged per request: its time per
//! output token over its own `k = o − 1` gaps. A request's gaps are decode
//! steps plus the prefill work the replica does while it decodes: the
//! prompts that arrived while it waited for and ran its own prefill (queued
//! behind it, so prefilled during its decode) and those that arrive during
//! its decode, `N ~ Poisson(x·(W + p̄ + k·g))` prompts of roughly
//! exponential prefill time (mean `p̄`), `W` the M/G/1 prefill wait. It
//! misses when that work exceeds `k·(T − t(B))`. Outputs are taken as
//! geometric with the observed mean (the same roughly-exponential
//! assumption as prompts), so short outputs, one stall over one or two
//! gaps, carry the tail: the share of requests over `T` must stay within
//! `1 − q`. This is what the mean-ITL term above cannot see.
//!
//! **TTFT** = one decode step (the residual of the running one) + waiting for
//! earlier prefills (M/G/1 on the prefill work, `P(wait) = ρ_p`,
//! exponential tail) + waiting for a batch slot when all `N·B*` slots of the
//! fleet are busy (Erlang C on `c = N·B*` slots with holding time `O·g`,
//! Halfin–Whitt beyond 256 slots) + the request's own prefill at its
//! quantile prompt (`I × (1 + ln(1/(1−q)))/2`, prompt lengths taken as
//! roughly exponential, halved for their bounded tails).
//!
//! **Replicas needed** = the fewest `N` whose prediction meets both
//! objectives with the margin. Every term falls as `N` grows, so a binary
//! search finds it; no `ceil(demand / capacity)` rule-of-thumb is involved.
//! When the objectives cannot be met at any `N` (an objective below one
//! prefill, say), the count is sized at 70% prefill and slot utilisation and
//! says so.

use serde::{Deserialize, Serialize};

use crate::perf::PerfModel;

/// The share of requests that no replica count serves within their TTFT
/// objective (`threshold_s + per_token_s × prompt`): those whose own
/// prefill on an idle replica, with its first decode step, already takes
/// longer. Prompts are taken as exponential with the shape's mean, as the
/// rest of the sizing takes them. The model's prefill and decode step are
/// quadratic and linear in the prompt, so the excess
/// `d(i) = prefill(i) + step(1, i) − threshold − per_token·i` is a
/// quadratic in the prompt length `i` and the share is the exponential
/// mass where it is positive, in closed form.
pub fn infeasible_share(
    model: &PerfModel,
    shape: RequestShape,
    threshold_s: f64,
    per_token_s: f64,
) -> f64 {
    let m = shape.input_tokens;
    if !(m.is_finite() && m > 0.0 && threshold_s.is_finite()) {
        return 0.0;
    }
    // d(i) = c·i² + b·i + a.
    let c = model.prefill_per_token_sq_s;
    let b = model.prefill_per_token_s + model.decode_per_seq_token_s - per_token_s;
    let a = model.prefill_base_s + model.decode_step_s(1.0, 0.0) - threshold_s;
    let above = |r: f64| (-r.max(0.0) / m).exp(); // P(i > r)
    let below = |r: f64| 1.0 - above(r); // P(i < r)
    let share = if c <= 0.0 {
        if b > 0.0 {
            above(-a / b)
        } else if b < 0.0 {
            if a > 0.0 { below(-a / b) } else { 0.0 }
        } else if a > 0.0 {
            1.0
        } else {
            0.0
        }
    } else {
        let disc = b * b - 4.0 * c * a;
        if disc <= 0.0 {
            1.0
        } else {
            let sq = disc.sqrt();
            let (r1, r2) = ((-b - sq) / (2.0 * c), (-b + sq) / (2.0 * c));
            // Positive outside [r1, r2].
            (if r1 > 0.0 { below(r1) } else { 0.0 }) + above(r2)
        }
    };
    share.clamp(0.0, 1.0)
}

/// The prompt the TTFT `quantile` is predicted at, as a multiple of the
/// mean prompt (at least 1): `(1 + ln(1/(1 − q)))/2`, halfway between the
/// mean and the `q`-quantile of exponential prompts (the quantile of a sum
/// of the prefill and the waits is not the sum of their quantiles). Twice
/// the mean at p95.
pub fn quantile_prompt_factor(quantile: f64) -> f64 {
    let q = quantile.clamp(0.0, 0.999_999);
    ((1.0 + (1.0 / (1.0 - q)).ln()) / 2.0).max(1.0)
}

/// The TTFT quantile the SLO feedback judges measured latency at, given the
/// objective's `quantile` and the `infeasible` share of requests: the
/// objective's own while the infeasible requests fit in its allowance
/// (`1 − quantile`), else the objective's quantile of the *feasible*
/// requests, `quantile × (1 − infeasible)` of all: the feedback never adds
/// replicas for requests no replica count can serve.
pub fn feasible_quantile(quantile: f64, infeasible: f64) -> f64 {
    if infeasible <= 1.0 - quantile {
        quantile
    } else {
        quantile * (1.0 - infeasible.clamp(0.0, 1.0))
    }
}

/// Largest batch meeting `itl_slo_s × (1 − margin)` at `context_tokens`
/// (decode steps only), within KV capacity and `max_batch`; at least 1.
pub fn batch_limit(model: &PerfModel, itl_slo_s: f64, context_tokens: f64, margin: f64) -> u32 {
    model.largest_batch_within(itl_slo_s * (1.0 - margin), context_tokens)
}

/// The request mix the sizing assumes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RequestShape {
    /// Mean prompt length, tokens.
    pub input_tokens: f64,
    /// Mean output length, tokens (at least 1).
    pub output_tokens: f64,
    /// Mean context of running requests, tokens.
    pub context_tokens: f64,
}

impl Default for RequestShape {
    /// 1,024 prompt and 256 output tokens (context 1,152) when nothing is known.
    fn default() -> Self {
        Self {
            input_tokens: 1024.0,
            output_tokens: 256.0,
            context_tokens: 1152.0,
        }
    }
}

/// Latency targets (objectives already reduced by any margin) and quantiles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    /// TTFT target of the typical (mean) prompt.
    pub ttft_s: f64,
    pub ttft_quantile: f64,
    pub itl_s: f64,
    pub itl_quantile: f64,
    /// A length-aware TTFT objective's allowance per prompt token (reduced
    /// by the same margin as `ttft_s`): a prompt longer than the mean by
    /// `d` tokens is allowed `ttft_per_input_token_s · d` more.
    #[serde(default)]
    pub ttft_per_input_token_s: f64,
}

/// What the model predicts for `replicas` replicas at `arrival_rps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub replicas: u32,
    pub arrival_rps: f64,
    /// Mean running batch per replica.
    pub mean_batch: f64,
    /// Fraction of a replica's time spent in prefill.
    pub prefill_utilization: f64,
    /// Busy fraction of the fleet's batch slots (`mean batch / B*`).
    pub slot_utilization: f64,
    /// Predicted ITL at its quantile, seconds (infinite when overloaded).
    pub itl_s: f64,
    /// Predicted TTFT at its quantile, seconds (infinite when overloaded).
    pub ttft_s: f64,
    /// Predicted share of requests (with two or more output tokens) whose
    /// own time per output token exceeds the TPOT objective.
    #[serde(default)]
    pub tpot_over_share: f64,
}

impl Prediction {
    /// Whether the prediction meets `targets`.
    pub fn meets(&self, targets: &Targets) -> bool {
        self.itl_s <= targets.itl_s
            && self.ttft_s <= targets.ttft_s
            && self.tpot_over_share <= 1.0 - targets.itl_quantile
    }
}

/// The objectives [`Sizer::floor_replicas`] judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floor {
    pub ttft: bool,
    pub tpot: bool,
}

impl Floor {
    pub const TTFT: Floor = Floor {
        ttft: true,
        tpot: false,
    };
    pub const BOTH: Floor = Floor {
        ttft: true,
        tpot: true,
    };
    pub const NONE: Floor = Floor {
        ttft: false,
        tpot: false,
    };
}

/// The sizing of one arrival rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sizing {
    pub replicas: u32,
    /// The objectives are attainable at some replica count.
    pub attainable: bool,
    pub prediction: Prediction,
}

/// The sizing model of one workload at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Sizer<'m> {
    model: &'m PerfModel,
    shape: RequestShape,
    batch_limit: u32,
    prefill_mean_s: f64,
    prefill_second_moment_s2: f64,
    prefill_quantile_s: f64,
    z_itl: f64,
    /// The TPOT objective the per-request share is judged against.
    tpot_objective_s: f64,
    /// How much longer than the mean the prompt whose prefill the TTFT
    /// quantile is predicted at is, tokens.
    ttft_quantile_extra_tokens: f64,
}

impl Sizer<'_> {
    /// One prefill of the typical prompt on a replica, seconds.
    pub(crate) fn prefill_mean_s(&self) -> f64 {
        self.prefill_mean_s
    }

    /// The stall a typical request's decode tolerates within `itl_s` per
    /// token: its gaps times what each leaves over an idle replica's
    /// decode step, seconds.
    pub(crate) fn decode_budget_s(&self, itl_s: f64) -> f64 {
        (self.shape.output_tokens - 1.0).max(1.0) * (itl_s - self.step(1.0)).max(0.0)
    }
}

/// Output lengths summed exactly, gap count by gap count, in the per-request
/// TPOT share; beyond it two quartile points stand for the geometric tail.
/// The shortest outputs carry the share (one stall over one or two gaps);
/// past a few gaps a stall is amortised, and the tail points check it. Eight
/// exact terms keep a prediction to a few hundred floating-point operations.
const TPOT_EXACT_GAPS: u32 = 8;

/// `P(S > s)` for `S` the sum of `N ~ Poisson(mu)` exponential times of
/// mean `mean`: exact (Poisson–Gamma) for `mu ≤ 20`, normal above (mean
/// `mu·mean`, variance `2·mu·mean²`).
fn compound_exp_poisson_tail(mu: f64, mean: f64, s: f64) -> f64 {
    if mu <= 0.0 || mean <= 0.0 {
        return if s < 0.0 { 1.0 } else { 0.0 };
    }
    if s <= 0.0 {
        return 1.0 - (-mu).exp();
    }
    if mu > 20.0 {
        let sd = (2.0 * mu).sqrt() * mean;
        return 1.0 - normal_cdf((s - mu * mean) / sd);
    }
    let y = s / mean;
    let n_max = (mu + 10.0 * mu.sqrt() + 10.0).ceil() as u32;
    let mut pois = (-mu).exp();
    let mut term = (-y).exp();
    let mut below = 0.0; // P(Gamma(n, 1) > y) = e^{-y} Σ_{j<n} y^j / j!
    let mut total = 0.0;
    for n in 1..=n_max {
        let nf = f64::from(n);
        pois *= mu / nf;
        below += term;
        term *= y / nf;
        total += pois * below;
    }
    total.clamp(0.0, 1.0)
}

/// The lowest quantile an unattainable objective is sized at
/// ([`Sizer::replicas_needed`]): the median.
pub const MIN_FALLBACK_QUANTILE: f64 = 0.5;

/// `q` lowered the share `f` of the way to [`MIN_FALLBACK_QUANTILE`].
fn lower_quantile(q: f64, f: f64) -> f64 {
    let floor = MIN_FALLBACK_QUANTILE.min(q);
    q - f * (q - floor)
}

/// Largest replica count the search considers.
pub const MAX_SEARCH_REPLICAS: u32 = 1 << 20;

impl<'m> Sizer<'m> {
    /// A sizer for `model` (already refined), the request mix, the batch
    /// limit `B*` and the objectives' quantiles.
    pub fn new(
        model: &'m PerfModel,
        shape: RequestShape,
        batch_limit: u32,
        targets: &Targets,
    ) -> Self {
        let i = shape.input_tokens.max(1.0);
        let p_mean = model.prefill_s(i);
        // Prompt lengths roughly exponential: E[p²] ≈ 2 p̄².
        let p_second = 2.0 * p_mean * p_mean;
        let q_factor = quantile_prompt_factor(targets.ttft_quantile);
        Self {
            model,
            shape: RequestShape {
                input_tokens: i,
                output_tokens: shape.output_tokens.max(1.0),
                context_tokens: shape.context_tokens.max(1.0),
            },
            batch_limit: batch_limit.max(1),
            prefill_mean_s: p_mean,
            prefill_second_moment_s2: p_second,
            prefill_quantile_s: model.prefill_s(i * q_factor.max(1.0)),
            z_itl: normal_quantile(targets.itl_quantile),
            tpot_objective_s: targets.itl_s,
            ttft_quantile_extra_tokens: i * (q_factor.max(1.0) - 1.0),
        }
    }

    /// The TTFT target the predicted TTFT quantile is judged against: that
    /// of the prompt the quantile is predicted at (a length-aware objective
    /// allows the long prompt that makes up the quantile its own prompt's
    /// share, not the mean prompt's).
    pub fn ttft_target_s(&self, targets: &Targets) -> f64 {
        targets.ttft_s + targets.ttft_per_input_token_s * self.ttft_quantile_extra_tokens
    }

    pub fn batch_limit(&self) -> u32 {
        self.batch_limit
    }

    pub fn shape(&self) -> RequestShape {
        self.shape
    }

    /// Decode step time at batch `b` for the shape's context.
    fn step(&self, b: f64) -> f64 {
        self.model.decode_step_s(b, self.shape.context_tokens)
    }

    /// Predict latencies for `replicas` replicas sharing `arrival_rps`, the
    /// TTFT at its `ttft_quantile`.
    pub fn predict(&self, replicas: u32, arrival_rps: f64, ttft_quantile: f64) -> Prediction {
        let idle_itl = self.step(1.0);
        let mut p = Prediction {
            replicas,
            arrival_rps,
            mean_batch: 0.0,
            prefill_utilization: 0.0,
            slot_utilization: 0.0,
            itl_s: idle_itl,
            ttft_s: self.prefill_quantile_s + idle_itl,
            tpot_over_share: if idle_itl > self.tpot_objective_s {
                1.0
            } else {
                0.0
            },
        };
        if arrival_rps.is_nan() || arrival_rps <= 0.0 {
            return p;
        }
        if replicas == 0 {
            p.itl_s = f64::INFINITY;
            p.ttft_s = f64::INFINITY;
            p.tpot_over_share = 1.0;
            return p;
        }
        let n = f64::from(replicas);
        let x = arrival_rps / n;
        let o = self.shape.output_tokens;
        let pbar = self.prefill_mean_s;
        let rho = x * pbar;
        p.prefill_utilization = rho;
        let overloaded = |mut p: Prediction| {
            p.itl_s = f64::INFINITY;
            p.ttft_s = f64::INFINITY;
            p.tpot_over_share = 1.0;
            p
        };
        if rho >= 0.99 {
            return overloaded(p);
        }
        // Mean gap g and batch B = x·O·g solve (1−ρ)·g = t(B), i.e.
        // φ(B) = (1−ρ)·B/(x·O) − t(B) = 0. φ is concave (t is convex), so
        // the stable operating point is its first root, below φ's maximum.
        let xo = x * o;
        let bstar = f64::from(self.batch_limit);
        let slope = (1.0 - rho) / xo;
        let l = self.shape.context_tokens;
        let phi = |b: f64| slope * b - self.model.decode_step_s(b, l);
        let dphi = |b: f64| slope - self.model.decode_step_slope_s(b, l);
        let top = if dphi(bstar) >= 0.0 {
            bstar
        } else if dphi(0.0) <= 0.0 {
            return overloaded(p);
        } else {
            bisect(0.0, bstar, |b| dphi(b) >= 0.0)
        };
        if phi(top) < 0.0 {
            return overloaded(p);
        }
        let b_mean = bisect(0.0, top, |b| phi(b) < 0.0);
        let g = b_mean / xo;
        p.mean_batch = b_mean;
        p.slot_utilization = b_mean / bstar;
        if b_mean >= bstar {
            return overloaded(p);
        }
        // ITL of a request at its quantile.
        let z = self.z_itl;
        let b_q = (b_mean + z * b_mean.sqrt()).min(bstar);
        let k_q = b_mean + z * b_mean.sqrt();
        p.itl_s = self.step(b_q.max(1.0)) + k_q * pbar / o;
        // TTFT at its quantile.
        let tail = 1.0 - ttft_quantile;
        let wait_prefill = if rho > tail {
            let cond_mean = self.prefill_second_moment_s2 / (2.0 * pbar * (1.0 - rho));
            cond_mean * (rho / tail).ln()
        } else {
            0.0
        };
        let slots = n * bstar;
        let offered = n * b_mean;
        let hold = o * g;
        let p_wait = erlang_c(slots, offered);
        let wait_slot = if p_wait > tail {
            hold / (slots - offered) * (p_wait / tail).ln()
        } else {
            0.0
        };
        p.ttft_s = self.step(b_mean.max(1.0)) + wait_prefill + wait_slot + self.prefill_quantile_s;
        let wait_mean = x * self.prefill_second_moment_s2 / (2.0 * (1.0 - rho));
        p.tpot_over_share = self.tpot_over_share(x, b_mean, g, wait_mean);
        p
    }

    /// The share of requests with two or more output tokens whose own time
    /// per output token exceeds the objective, at `x` requests/s on one
    /// replica with mean batch `b`, mean gap `g` and mean prefill wait
    /// `wait` (see the module's "Per-request TPOT").
    fn tpot_over_share(&self, x: f64, b: f64, g: f64, wait: f64) -> f64 {
        self.tpot_over_share_at(x, b, g, wait, self.tpot_objective_s)
    }

    fn tpot_over_share_at(&self, x: f64, b: f64, g: f64, wait: f64, objective_s: f64) -> f64 {
        let o = self.shape.output_tokens;
        if o <= 1.0 + 1e-9 {
            return 0.0; // one-token outputs have no gaps to judge
        }
        let budget = objective_s - self.step(b.max(1.0));
        if budget <= 0.0 {
            return 1.0;
        }
        let pbar = self.prefill_mean_s;
        // k = o − 1 given k ≥ 1, o geometric with mean O: P(k) = (1−r)·r^(k−1).
        let r = 1.0 - 1.0 / o;
        let over = |k: f64| {
            let mu = x * (wait + pbar + k * g);
            compound_exp_poisson_tail(mu, pbar, k * budget)
        };
        let mut share = 0.0;
        let mut weight = 1.0 - r;
        for k in 1..=TPOT_EXACT_GAPS {
            share += weight * over(f64::from(k));
            weight *= r;
        }
        // The rest, `r^K` of them, geometric beyond K with mean excess ≈ O
        // (memoryless): two points at that excess's quartiles, half each.
        let tail = r.powi(TPOT_EXACT_GAPS as i32);
        let k0 = f64::from(TPOT_EXACT_GAPS);
        share += 0.5 * tail * (over(k0 + o * (4.0f64 / 3.0).ln()) + over(k0 + o * 4.0f64.ln()));
        share.clamp(0.0, 1.0)
    }

    /// Whether `p` meets `targets`, the per-request TPOT share judged at
    /// `targets.itl_s` (objectives tightened by the SLO feedback tighten it
    /// too; [`Prediction::meets`] judges it at the sizer's own objective).
    pub fn meets(&self, p: &Prediction, targets: &Targets) -> bool {
        if p.itl_s > targets.itl_s || p.ttft_s > self.ttft_target_s(targets) {
            return false;
        }
        let share = if targets.itl_s == self.tpot_objective_s {
            p.tpot_over_share
        } else if p.replicas == 0 || p.arrival_rps.is_nan() || p.arrival_rps <= 0.0 {
            if self.step(1.0) > targets.itl_s && p.replicas > 0 {
                1.0
            } else {
                p.tpot_over_share
            }
        } else {
            self.share_over(p, targets.itl_s)
        };
        share <= 1.0 - targets.itl_quantile
    }

    /// The per-request TPOT share over `objective_s` of the loaded replicas
    /// `p` describes.
    fn share_over(&self, p: &Prediction, objective_s: f64) -> f64 {
        let x = p.arrival_rps / f64::from(p.replicas.max(1));
        let rho = p.prefill_utilization;
        let g = p.mean_batch / (x * self.shape.output_tokens);
        let wait = x * self.prefill_second_moment_s2 / (2.0 * (1.0 - rho));
        self.tpot_over_share_at(x, p.mean_batch, g, wait, objective_s)
    }

    /// The `q`-quantile of per-request TPOT the model predicts for `p`
    /// (seconds): where its share over a threshold falls to `1 − q`, found
    /// by bisection between an idle replica's decode step and 1,000× it.
    /// `None` for an idle or overloaded fleet (no finite prediction).
    pub(crate) fn tpot_quantile_s(&self, p: &Prediction, q: f64) -> Option<f64> {
        if p.replicas == 0
            || p.arrival_rps.is_nan()
            || p.arrival_rps <= 0.0
            || !p.itl_s.is_finite()
            || !(0.0..1.0).contains(&q)
        {
            return None;
        }
        let allowed = 1.0 - q;
        let (mut lo, mut hi) = (self.step(1.0), self.step(1.0) * 1000.0);
        if self.share_over(p, hi) > allowed {
            return None;
        }
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if self.share_over(p, mid) > allowed {
                lo = mid;
            } else {
                hi = mid;
            }
            if hi - lo <= 1e-4 * hi {
                break;
            }
        }
        Some(hi)
    }

    /// The fewest replicas meeting `targets` at `arrival_rps`.
    pub(crate) fn replicas_needed(&self, arrival_rps: f64, targets: &Targets) -> Sizing {
        let q = targets.ttft_quantile;
        if arrival_rps.is_nan() || arrival_rps <= 0.0 {
            return Sizing {
                replicas: 0,
                attainable: true,
                prediction: self.predict(0, 0.0, q),
            };
        }
        let meets = |n: u32| self.meets(&self.predict(n, arrival_rps, q), targets);
        match self.search(meets) {
            Some(n) => Sizing {
                replicas: n,
                attainable: true,
                prediction: self.predict(n, arrival_rps, q),
            },
            None => {
                // Unattainable at the stated quantiles (the slowest requests'
                // own prefill or decode is over the objective at any count):
                // size at the highest quantile some count meets, so the
                // requests that can be served are served as the objectives
                // ask and no replica is bought for those that cannot; at
                // least 70% prefill and slot utilisation. Sizing for
                // utilisation alone gave a stricter objective fewer replicas
                // than a looser one.
                let ok = |n: u32| {
                    let p = self.predict(n, arrival_rps, q);
                    p.prefill_utilization <= 0.7 && p.slot_utilization <= 0.7 && p.itl_s.is_finite()
                };
                let util_n = self.search(ok).unwrap_or(MAX_SEARCH_REPLICAS);
                let n = self
                    .attainable_quantile_replicas(arrival_rps, targets)
                    .map_or(util_n, |n| n.max(util_n));
                Sizing {
                    replicas: n,
                    attainable: false,
                    prediction: self.predict(n, arrival_rps, q),
                }
            }
        }
    }

    /// The count meeting `targets` at the highest quantiles (at most the
    /// stated ones, at least [`MIN_FALLBACK_QUANTILE`]) some count meets:
    /// both quantiles lowered together, by bisection to a thousandth.
    fn attainable_quantile_replicas(&self, arrival_rps: f64, targets: &Targets) -> Option<u32> {
        let at = |f: f64| -> Option<u32> {
            let t = Targets {
                ttft_quantile: lower_quantile(targets.ttft_quantile, f),
                itl_quantile: lower_quantile(targets.itl_quantile, f),
                ..*targets
            };
            let s = Sizer::new(self.model, self.shape, self.batch_limit, &t);
            s.search(|n| s.meets(&s.predict(n, arrival_rps, t.ttft_quantile), &t))
        };
        // `f` in [0, 1]: the share of the way from the stated quantiles
        // down to the fallback floor.
        at(1.0)?;
        let (mut lo, mut hi) = (0.0_f64, 1.0_f64); // at(hi) is attainable
        while hi - lo > 1e-3 {
            let mid = 0.5 * (lo + hi);
            if at(mid).is_some() {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        at(hi)
    }

    /// The fewest replicas past which more buy the model nothing it can
    /// resolve at `arrival_rps` on the objectives `floor` names: their
    /// predicted latency (TTFT, ITL) within `margin` of what an idle replica
    /// gives (the latency floor no replica count lowers: one request's own
    /// prefill and decode steps). Where an objective is below that floor,
    /// replicas beyond this count cannot bring its latency closer to it.
    /// An objective that is not named is not judged: a TTFT made of long
    /// prompts' own prefill is no reason to push the ITL to its floor.
    pub fn floor_replicas(
        &self,
        arrival_rps: f64,
        ttft_quantile: f64,
        margin: f64,
        floor: Floor,
    ) -> u32 {
        if arrival_rps.is_nan() || arrival_rps <= 0.0 {
            return 0;
        }
        let idle = self.predict(1, 0.0, ttft_quantile);
        let slack = 1.0 + margin.max(0.0);
        let near = |n: u32| {
            let p = self.predict(n, arrival_rps, ttft_quantile);
            (!floor.ttft || p.ttft_s <= idle.ttft_s * slack)
                && (!floor.tpot || p.itl_s <= idle.itl_s * slack)
        };
        self.search(near).unwrap_or(MAX_SEARCH_REPLICAS)
    }

    /// Smallest `n` in `1..=MAX_SEARCH_REPLICAS` with `ok(n)`, for monotone `ok`.
    fn search(&self, ok: impl Fn(u32) -> bool) -> Option<u32> {
        let mut hi = 1u32;
        while !ok(hi) {
            if hi >= MAX_SEARCH_REPLICAS {
                return None;
            }
            hi = (hi * 2).min(MAX_SEARCH_REPLICAS);
        }
        let mut lo = hi / 2; // ok(lo) is false (or lo == 0)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if ok(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// The highest arrival rate `replicas` replicas sustain within `targets`.
    pub fn capacity_rps(&self, replicas: u32, targets: &Targets) -> f64 {
        if replicas == 0 {
            return 0.0;
        }
        let q = targets.ttft_quantile;
        let meets = |r: f64| self.meets(&self.predict(replicas, r, q), targets);
        let mut hi = f64::from(replicas) / self.prefill_mean_s.max(1e-6);
        let mut lo = 0.0;
        if meets(hi) {
            return hi;
        }
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if meets(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// The boundary between where `below` holds (at `lo`) and where it does
/// not (at `hi`), to within 1e-6 of the interval (a millionth of a batch
/// slot is far below anything the sizing resolves).
fn bisect(mut lo: f64, mut hi: f64, below: impl Fn(f64) -> bool) -> f64 {
    let tol = (hi - lo).abs() * 1e-6;
    for _ in 0..64 {
        if hi - lo <= tol {
            break;
        }
        let mid = 0.5 * (lo + hi);
        if below(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Erlang C: probability that an arrival waits in an M/M/c queue with
/// `c` servers and offered load `a` (erlangs). Exact recursion up to 256
/// servers, the Halfin–Whitt approximation above. 1 when `a ≥ c`.
pub(crate) fn erlang_c(c: f64, a: f64) -> f64 {
    if a <= 0.0 {
        return 0.0;
    }
    if a >= c {
        return 1.0;
    }
    if c <= 256.0 {
        let n = c.floor() as u32;
        let mut b = 1.0; // Erlang B with 0 servers
        for k in 1..=n {
            b = a * b / (f64::from(k) + a * b);
        }
        let rho = a / c;
        (b / (1.0 - rho * (1.0 - b))).clamp(0.0, 1.0)
    } else {
        let beta = (c - a) / a.sqrt();
        let phi = (-0.5 * beta * beta).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let cdf = normal_cdf(beta);
        (1.0 / (1.0 + beta * cdf / phi)).clamp(0.0, 1.0)
    }
}

fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' `erfcc`, |error| < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The standard normal quantile (Acklam's rational approximation,
/// relative error < 1.2e-9), for 0 < p < 1.
pub(crate) fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let low = 0.02425;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf;

    fn targets() -> Targets {
        Targets {
            ttft_s: 2.0,
            ttft_quantile: 0.95,
            itl_s: 0.05,
            itl_quantile: 0.95,
            ttft_per_input_token_s: 0.0,
        }
    }

    /// The predicted TPOT quantile is where the model's share over a
    /// threshold is the quantile's allowance: the share there is `1 − q`,
    /// the quantile rises with the load, and the sizing's own objective
    /// holds exactly when the quantile is within it.
    #[test]
    fn the_tpot_quantile_inverts_the_share_over_a_threshold() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let shape = RequestShape {
            input_tokens: 1_000.0,
            output_tokens: 200.0,
            context_tokens: 1_100.0,
        };
        let t = targets();
        let s = Sizer::new(&m, shape, 512, &t);
        let mut last = 0.0;
        for rate in [20.0, 60.0, 100.0, 140.0] {
            let p = s.predict(8, rate, 0.95);
            let q = s.tpot_quantile_s(&p, 0.95).expect("a finite quantile");
            let share = s.share_over(&p, q);
            assert!(
                (share - 0.05).abs() < 2e-3,
                "share {share} at {q} s, {rate} req/s"
            );
            assert!(q > last, "{q} after {last} at {rate} req/s");
            last = q;
            assert_eq!(
                q <= t.itl_s,
                p.tpot_over_share <= 0.05,
                "{q} at {rate} req/s"
            );
        }
        assert_eq!(s.tpot_quantile_s(&s.predict(0, 10.0, 0.95), 0.95), None);
        assert_eq!(s.tpot_quantile_s(&s.predict(8, 0.0, 0.95), 0.95), None);
    }

    /// A length-aware TTFT objective judges the predicted TTFT quantile
    /// against the threshold of the prompt that quantile is predicted at
    /// (longer than the mean), not the mean prompt's: a flat objective is
    /// judged as before, and more allowance per token never needs more
    /// replicas.
    #[test]
    fn a_length_aware_ttft_quantile_is_judged_at_its_own_prompt() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let shape = RequestShape {
            input_tokens: 15_000.0,
            output_tokens: 150.0,
            context_tokens: 15_000.0,
        };
        let with = |per_token: f64| Targets {
            ttft_s: 1.0 + per_token * 15_000.0,
            ttft_quantile: 0.95,
            itl_s: 0.045,
            itl_quantile: 0.95,
            ttft_per_input_token_s: per_token,
        };
        let flat = with(0.0);
        let s = Sizer::new(&m, shape, 64, &flat);
        assert_eq!(s.ttft_target_s(&flat), flat.ttft_s);
        let aware = with(50e-6);
        let target = s.ttft_target_s(&aware);
        // The p95 prompt of exponential prompts around 15,000 tokens is
        // about twice the mean: its threshold is the mean's plus the
        // allowance for the extra ~15,000 tokens.
        assert!(target > aware.ttft_s + 50e-6 * 10_000.0, "{target}");
        assert!(target < aware.ttft_s + 50e-6 * 20_000.0, "{target}");
        // A nearly idle fleet: the quantile prompt's own prefill is over
        // the mean prompt's threshold and within its own.
        let p = s.predict(200, 4.0, 0.95);
        assert!(
            p.ttft_s > aware.ttft_s && p.ttft_s <= target,
            "{} {} {target}",
            p.ttft_s,
            aware.ttft_s
        );
        assert!(s.meets(&p, &aware));
        assert!(!s.meets(
            &p,
            &Targets {
                ttft_per_input_token_s: 0.0,
                ..aware
            }
        ));
        let mut last = u32::MAX;
        for per_token in [60e-6, 90e-6, 120e-6, 200e-6] {
            let n = s.replicas_needed(4.0, &with(per_token)).replicas;
            assert!(n <= last, "{n} after {last} at {per_token}");
            last = n;
        }
    }

    /// An objective no count meets at its stated quantile (the slowest
    /// prompts' own prefill is over it) is sized at the highest quantile
    /// some count meets, not at 70% utilisation: a stricter quantile never
    /// gets fewer replicas than a looser attainable one.
    #[test]
    fn an_unattainable_quantile_is_sized_at_the_highest_attainable_one() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let shape = RequestShape {
            input_tokens: 15_000.0,
            output_tokens: 150.0,
            context_tokens: 15_000.0,
        };
        let rate = 4.0;
        let at = |q: f64, ttft_s: f64| {
            let t = Targets {
                ttft_s,
                ttft_quantile: q,
                itl_s: 0.045,
                itl_quantile: q,
                ttft_per_input_token_s: 0.0,
            };
            let s = Sizer::new(&m, shape, 64, &t);
            (s.replicas_needed(rate, &t), s.predict(1, 0.0, q).ttft_s)
        };
        // A TTFT objective just over the p95 prompt's own prefill.
        let (_, idle95) = at(0.95, 60.0);
        let objective = idle95 * 1.2;
        let p95 = at(0.95, objective).0;
        assert!(p95.attainable);
        let (p99, idle99) = at(0.99, objective);
        assert!(idle99 > objective, "the p99 prompt's prefill is over it");
        assert!(!p99.attainable);
        assert!(
            p99.replicas >= p95.replicas,
            "p99 {} < p95 {}",
            p99.replicas,
            p95.replicas
        );
        // 70% utilisation alone (the old fallback) is fewer here.
        let t = Targets {
            ttft_s: objective,
            ttft_quantile: 0.99,
            itl_s: 0.045,
            itl_quantile: 0.99,
            ttft_per_input_token_s: 0.0,
        };
        let s = Sizer::new(&m, shape, 64, &t);
        let util = s
            .search(|k| s.predict(k, rate, 0.99).prefill_utilization <= 0.7)
            .unwrap();
        assert!(util < p99.replicas, "{util} >= {}", p99.replicas);
        // Nothing attainable even at the median: utilisation decides.
        let none = at(0.99, 1e-3).0;
        assert!(!none.attainable);
        assert!(s.predict(none.replicas, rate, 0.99).prefill_utilization <= 0.7);
    }

    /// The infeasible share against a direct count over many exponential
    /// prompts, for a flat objective and a length-aware one, and the
    /// quantile the sizing then judges.
    #[test]
    fn the_infeasible_share_is_the_exponential_mass_whose_own_prefill_exceeds_its_objective() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let shape = RequestShape {
            input_tokens: 8_000.0,
            output_tokens: 100.0,
            context_tokens: 8_000.0,
        };
        let counted = |threshold: f64, per_token: f64| -> f64 {
            let n = 200_000;
            let over = (0..n)
                .filter(|k| {
                    let u = (f64::from(*k) + 0.5) / f64::from(n);
                    let i = -shape.input_tokens * (1.0 - u).ln();
                    m.prefill_s(i) + m.decode_step_s(1.0, i) > threshold + per_token * i
                })
                .count();
            over as f64 / f64::from(n)
        };
        for (threshold, per_token) in [
            (0.5, 0.0),
            (1.0, 0.0),
            (0.2, 0.0),
            (0.3, 20e-6),
            (0.05, 30e-6),
        ] {
            let share = infeasible_share(&m, shape, threshold, per_token);
            let direct = counted(threshold, per_token);
            assert!(
                (share - direct).abs() < 2e-3,
                "threshold {threshold} per token {per_token}: {share} vs {direct}"
            );
        }
        // Every prefill under the objective: none; the objective under an
        // empty prompt's own time: all.
        assert!(infeasible_share(&m, shape, 1e4, 0.0) < 1e-12);
        assert_eq!(infeasible_share(&m, shape, 0.0, 0.0), 1.0);
        // Within the allowance the objective's quantile; past it, the
        // objective's quantile of the others.
        assert_eq!(feasible_quantile(0.95, 0.04), 0.95);
        assert!((feasible_quantile(0.95, 0.10) - 0.855).abs() < 1e-12);
    }

    #[test]
    fn batch_limit_brackets_the_measured_h200_steps() {
        // data/profiles/h200_llama3-8b-shape_bf16_decode.csv at context 2048:
        // 32 → 8.33 ms, 64 → 10.44 ms, 128 → 14.82 ms, 256 → 24.48 ms.
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let b10 = batch_limit(&m, 0.010, 2048.0, 0.0);
        let b15 = batch_limit(&m, 0.015, 2048.0, 0.0);
        let b25 = batch_limit(&m, 0.025, 2048.0, 0.0);
        println!("B* at 10/15/25 ms: {b10} / {b15} / {b25}");
        assert!((32..=64).contains(&b10), "{b10}");
        assert!((128..=256).contains(&b15), "{b15}");
        let kv_bound = (m.kv_capacity_tokens / 2048.0).floor() as u32;
        assert!(b25 >= 256 || b25 == kv_bound, "{b25}");
    }

    #[test]
    fn kv_capacity_binds_the_batch_limit() {
        let mut m = perf::preset("h200-llama3-8b-bf16").unwrap();
        m.kv_capacity_tokens = 100_000.0;
        assert_eq!(batch_limit(&m, 1.0, 2048.0, 0.0), 48);
    }

    #[test]
    fn erlang_c_matches_known_values() {
        // M/M/2 at a = 1: C = 1/3.
        assert!((erlang_c(2.0, 1.0) - 1.0 / 3.0).abs() < 1e-12);
        // M/M/1: C = ρ.
        assert!((erlang_c(1.0, 0.7) - 0.7).abs() < 1e-12);
        // Halfin–Whitt agrees with the recursion near 256 servers.
        let exact = erlang_c(256.0, 240.0);
        let hw = erlang_c(257.0, 240.0 * 257.0 / 256.0);
        assert!((exact - hw).abs() < 0.05, "{exact} vs {hw}");
        assert!((normal_quantile(0.95) - 1.644_853_6).abs() < 1e-6);
    }

    #[test]
    fn replicas_needed_is_monotone_in_load_and_meets_targets() {
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let shape = RequestShape {
            input_tokens: 1000.0,
            output_tokens: 200.0,
            context_tokens: 1100.0,
        };
        let t = targets();
        let b = batch_limit(&m, t.itl_s, shape.context_tokens, 0.1);
        let s = Sizer::new(&m, shape, b, &t);
        let mut prev = 0;
        for k in 0..60 {
            let rate = f64::from(k) * 5.0;
            let z = s.replicas_needed(rate, &t);
            assert!(z.replicas >= prev, "not monotone at {rate}");
            assert!(z.attainable);
            if rate > 0.0 {
                assert!(z.prediction.meets(&t));
                assert!(!s.predict(z.replicas - 1, rate, 0.95).meets(&t));
            }
            prev = z.replicas;
        }
        let cap = s.capacity_rps(1, &t);
        println!("one H200 replica sustains {cap:.1} req/s at 1000/200 tokens, B* {b}");
        assert!(cap > 5.0 && cap < 200.0);
    }

    #[test]
    fn the_compound_poisson_tail_is_exact_at_its_edges_and_monotone() {
        // s = 0: any prefill at all exceeds it.
        let mu: f64 = 0.7;
        assert!((compound_exp_poisson_tail(mu, 0.1, 0.0) - (1.0 - (-mu).exp())).abs() < 1e-12);
        // One prefill on average is exponential: P(S > s) ≈ P(N=1)·e^{-s/p̄} +
        // P(N≥2)·…, bounded below by the first term.
        let s1 = compound_exp_poisson_tail(mu, 0.1, 0.2);
        assert!(s1 >= mu * (-mu).exp() * (-2.0f64).exp() - 1e-12, "{s1}");
        let mut prev = 1.0;
        for k in 0..50 {
            let v = compound_exp_poisson_tail(5.0, 0.1, 0.05 * f64::from(k));
            assert!(v <= prev + 1e-12, "not monotone at {k}");
            prev = v;
        }
        // The exact sum and the normal approximation meet near μ = 20.
        let exact = compound_exp_poisson_tail(20.0, 0.1, 2.5);
        let normal = compound_exp_poisson_tail(20.000_1, 0.1, 2.5);
        assert!((exact - normal).abs() < 0.05, "{exact} vs {normal}");
    }

    #[test]
    fn short_outputs_behind_long_prompts_miss_tpot_where_the_mean_gap_does_not() {
        // Code-assistant traffic: 2,000-token prompts, 20-token outputs. At
        // 8 req/s a replica's mean ITL is well inside 50 ms, but a request of
        // a few tokens stalled by one other prompt's prefill is not.
        let m = perf::preset("h200-llama3-8b-bf16").unwrap();
        let t = targets();
        let code = RequestShape {
            input_tokens: 2000.0,
            output_tokens: 20.0,
            context_tokens: 2010.0,
        };
        let b = batch_limit(&m, t.itl_s, code.context_tokens, 0.1);
        let s = Sizer::new(&m, code, b, &t);
        let p = s.predict(1, 12.0, 0.95);
        assert!(p.itl_s <= t.itl_s, "mean-gap ITL {}", p.itl_s);
        assert!(p.tpot_over_share > 0.05, "share {}", p.tpot_over_share);
        assert!(!s.meets(&p, &t));
        // The share falls as replicas are added, and sizing follows it.
        let two = s.predict(2, 12.0, 0.95);
        assert!(two.tpot_over_share < p.tpot_over_share);
        let z = s.replicas_needed(12.0, &t);
        assert!(
            z.replicas >= 2 && z.prediction.tpot_over_share <= 0.05,
            "{z:?}"
        );
        // Long outputs at the same prompt load amortise the stalls.
        let chat = RequestShape {
            output_tokens: 400.0,
            context_tokens: 2200.0,
            ..code
        };
        let c = Sizer::new(&m, chat, b, &t);
        assert!(c.predict(1, 1.0, 0.95).tpot_over_share < p.tpot_over_share);
        // Tightened objectives tighten the share too.
        let tight = Targets { itl_s: 0.02, ..t };
        assert!(!s.meets(&z.prediction, &tight) || z.prediction.tpot_over_share == 0.0);
    }

    #[test]
    fn unattainable_objectives_still_size_the_fleet() {
        let m = perf::preset("h100-llama2-70b-tp4").unwrap();
        let shape = RequestShape::default();
        let t = Targets {
            itl_s: 0.001,
            ..targets()
        };
        let s = Sizer::new(&m, shape, 1, &t);
        let z = s.replicas_needed(10.0, &t);
        assert!(!z.attainable);
        assert!(z.replicas >= 1);
    }
}
