//! The attainable ceiling (REFERENCE.md §3.3): the share of a workload's
//! requests that any fleet could serve within the SLO.
//!
//! A request cannot meet its SLO, whatever the fleet, when
//!
//! * its prompt and output do not fit one replica's KV cache (it is
//!   rejected),
//! * its prefill alone on an idle replica takes longer than its TTFT
//!   threshold (`p(T) > ttft(T)`: an idle replica emits the first token at
//!   the end of the prefill), or
//! * its decode alone is slower than the TPOT objective (batch 1, its own
//!   context growing from `T + 1` to `T + O − 1`: the mean step
//!   `t(1, T + 1 + (O − 2)/2)`).
//!
//! Everything else can: on an idle replica of its own it meets both.
//! Policies are judged against this share, not against 100%.

use gpuscale_policy::PerfModel;
use serde::Serialize;

use crate::profile::Coefficients;
use crate::stats::Slo;
use crate::trace::{Request, Workload};

/// Prompts of at least this many tokens are "long" in per-class reports
/// (vLLM's default prefill budget per iteration).
pub const LONG_PROMPT_TOKENS: u32 = 8192;

/// Why a request cannot meet its SLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Infeasible {
    /// Prompt and output exceed one replica's KV cache.
    TooLarge,
    /// Prefill alone exceeds the TTFT threshold.
    Prefill,
    /// Decode alone exceeds the TPOT objective.
    Decode,
}

/// What no fleet can serve within the SLO, for one workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ceiling {
    pub requests: u64,
    pub feasible: u64,
    pub too_large: u64,
    pub prefill_too_slow: u64,
    pub decode_too_slow: u64,
}

impl Ceiling {
    /// The attainable share of requests (1 for an empty workload).
    pub fn share(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            self.feasible as f64 / self.requests as f64
        }
    }
}

/// Judges requests against a replica's speed and an SLO.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Feasibility {
    k: Coefficients,
    kv_capacity_tokens: f64,
    slo: Slo,
}

impl Feasibility {
    pub fn new(perf: &PerfModel, slo: Slo) -> Self {
        Self {
            k: Coefficients::of(perf),
            kv_capacity_tokens: perf.kv_capacity_tokens,
            slo,
        }
    }

    /// TTFT of the request on an idle replica.
    pub(crate) fn idle_ttft_s(&self, input_tokens: u32) -> f64 {
        let t = f64::from(input_tokens);
        self.k.pe + self.k.pf * t + self.k.pg * t * t
    }

    /// Mean time per output token of the request decoding alone (`None`
    /// for a single output token).
    pub(crate) fn solo_tpot_s(&self, input_tokens: u32, output_tokens: u32) -> Option<f64> {
        (output_tokens > 1).then(|| {
            let mean_ctx = f64::from(input_tokens) + 1.0 + (f64::from(output_tokens) - 2.0) / 2.0;
            self.k.step(1.0, mean_ctx)
        })
    }

    /// Why the request cannot meet its SLO on any fleet, if it cannot.
    pub(crate) fn infeasible(&self, r: &Request) -> Option<Infeasible> {
        if f64::from(r.input_tokens) + f64::from(r.output_tokens) > self.kv_capacity_tokens {
            return Some(Infeasible::TooLarge);
        }
        let outcome = self.slo.outcome(
            self.idle_ttft_s(r.input_tokens),
            self.solo_tpot_s(r.input_tokens, r.output_tokens),
            r.input_tokens,
        );
        if !outcome.ttft_met {
            Some(Infeasible::Prefill)
        } else if !outcome.tpot_met {
            Some(Infeasible::Decode)
        } else {
            None
        }
    }
}

/// The ceiling of `workload` on replicas of `perf` under `slo`.
pub fn ceiling(workload: &Workload, perf: &PerfModel, slo: Slo) -> Ceiling {
    let f = Feasibility::new(perf, slo);
    let mut c = Ceiling {
        requests: 0,
        feasible: 0,
        too_large: 0,
        prefill_too_slow: 0,
        decode_too_slow: 0,
    };
    for r in workload.stream() {
        c.requests += 1;
        match f.infeasible(&r) {
            None => c.feasible += 1,
            Some(Infeasible::TooLarge) => c.too_large += 1,
            Some(Infeasible::Prefill) => c.prefill_too_slow += 1,
            Some(Infeasible::Decode) => c.decode_too_slow += 1,
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo(ttft_s: f64, itl_s: f64) -> Slo {
        Slo {
            ttft_s,
            itl_s,
            percentile: 95.0,
            ttft_per_input_token_s: 0.0,
        }
    }

    fn req(input: u32, output: u32) -> Request {
        Request {
            arrival_s: 0.0,
            input_tokens: input,
            output_tokens: output,
        }
    }

    #[test]
    fn prompts_whose_prefill_alone_misses_the_ttft_are_infeasible_and_a_length_aware_ttft_admits_them()
     {
        let perf = gpuscale_policy::perf::preset("h200-llama3-8b-bf16").expect("preset");
        let f = Feasibility::new(&perf, slo(1.0, 0.05));
        // Find the prompt length whose idle prefill takes one second.
        let long = (1_000..500_000)
            .step_by(1_000)
            .find(|t| f.idle_ttft_s(*t) > 1.0)
            .expect("some prompt is slower than a second");
        assert_eq!(f.infeasible(&req(500, 100)), None);
        if f64::from(long) + 1.0 <= perf.kv_capacity_tokens {
            assert_eq!(f.infeasible(&req(long, 2)), Some(Infeasible::Prefill));
            let aware = Feasibility::new(
                &perf,
                Slo {
                    ttft_per_input_token_s: 1e-3,
                    ..slo(1.0, 0.05)
                },
            );
            assert_eq!(aware.infeasible(&req(long, 2)), None);
        }
        let huge = perf.kv_capacity_tokens as u32 + 1;
        assert_eq!(f.infeasible(&req(huge, 1)), Some(Infeasible::TooLarge));
        // A TPOT objective below one decode step: nothing with two or more
        // output tokens can meet it; one output token has no TPOT.
        let strict = Feasibility::new(&perf, slo(10.0, 1e-6));
        assert_eq!(strict.infeasible(&req(100, 10)), Some(Infeasible::Decode));
        assert_eq!(strict.infeasible(&req(100, 1)), None);
    }
}
