//! Performance profiles: which [`PerfModel`] a run uses, and the replica
//! facts that come with it (cold start).

use std::path::Path;

use gpuscale_policy::{PerfModel, ProfileFormat};

use crate::error::SimError;

/// The decode and prefill coefficients the fleet's hot path uses, recovered
/// from the model's own functions so any model form with
/// `t(B, L) = a + b·B + d·B² + c·B·L` and `p(T) = e + f·T + g·T²` is honoured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
    pub pe: f64,
    pub pf: f64,
    pub pg: f64,
}

impl Coefficients {
    pub fn of(perf: &PerfModel) -> Self {
        let a = perf.decode_step_s(0.0, 0.0);
        let f1 = perf.decode_step_s(1.0, 0.0);
        let f2 = perf.decode_step_s(2.0, 0.0);
        let d = (f2 - 2.0 * f1 + a) / 2.0;
        let b = f1 - a - d;
        let c = (perf.decode_step_s(1.0, 1000.0) - f1) / 1000.0;
        let pe = perf.prefill_s(0.0);
        let p1 = perf.prefill_s(1000.0);
        let p2 = perf.prefill_s(2000.0);
        let pg = (p2 - 2.0 * p1 + pe) / 2.0 / 1e6;
        let pf = (p1 - pe) / 1000.0 - pg * 1000.0;
        Self {
            a,
            b,
            c,
            d,
            pe,
            pf,
            pg,
        }
    }

    /// Decode step time at batch `bsz` with summed context `sum_ctx` tokens.
    #[inline]
    pub fn step(&self, bsz: f64, sum_ctx: f64) -> f64 {
        self.a + self.b * bsz + self.d * bsz * bsz + self.c * sum_ctx
    }
}

/// Resolve `--profile`: a preset of the policy crate
/// ([`gpuscale_policy::perf::PRESET_NAMES`]), a JSON file holding a
/// [`PerfModel`], or a profile CSV in gpuscale's own layout
/// ([`ProfileFormat::Gpuscale`]).
pub fn resolve_profile(spec: &str) -> Result<PerfModel, SimError> {
    if let Some(m) = gpuscale_policy::perf::preset(spec) {
        return Ok(m);
    }
    let path = Path::new(spec);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let m: PerfModel = if text.trim_start().starts_with('{') {
            serde_json::from_str(&text).map_err(|e| SimError::Profile {
                name: spec.to_string(),
                message: format!("expected a performance model as JSON: {e}"),
            })?
        } else {
            PerfModel::from_profile_csv(&text, &ProfileFormat::Gpuscale).map_err(|e| {
                SimError::Profile {
                    name: spec.to_string(),
                    message: e.to_string(),
                }
            })?
        };
        validate(&m, spec)?;
        return Ok(m);
    }
    Err(SimError::config(
        "--profile",
        spec,
        format!(
            "a preset ({}), a JSON performance-model file or a gpuscale profile CSV",
            gpuscale_policy::perf::PRESET_NAMES.join(", ")
        ),
    ))
}

fn validate(m: &PerfModel, name: &str) -> Result<(), SimError> {
    let bad = |what: &str| SimError::Profile {
        name: name.to_string(),
        message: what.to_string(),
    };
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(m.decode_step_s(1.0, 1.0)) || !positive(m.prefill_s(1.0)) {
        return Err(bad("decode and prefill times must be positive"));
    }
    if !(m.kv_capacity_tokens.is_finite() && m.kv_capacity_tokens >= 1.0) {
        return Err(bad("kv_capacity_tokens must be >= 1"));
    }
    if m.max_batch == 0 {
        return Err(bad("max_batch must be >= 1"));
    }
    Ok(())
}

/// Cold start used when none is given: 90 s for one-GPU replicas (an 8B
/// model with compile caches, 60–100 s, llm-d's ~100 s pod-ready), 240 s for
/// multi-GPU 70B-class replicas (4–5 min, vLLM issue #19824).
pub(crate) fn default_cold_start_s(perf: &PerfModel) -> f64 {
    if perf.gpus_per_replica >= 4 {
        240.0
    } else {
        90.0
    }
}

/// Sustainable requests per second of one replica at the ITL SLO for
/// requests of mean size (`input`, `output`): the largest batch `B*` whose
/// step at the mean context meets `itl_s`, and per request the replica's
/// time `prefill(input) + output·t(B*)/B*`.
pub fn replica_capacity_rps(perf: &PerfModel, input: f64, output: f64, itl_s: f64) -> f64 {
    let ctx = input + 0.5 * output;
    let mut best = 1u32;
    for b in 1..=perf.max_batch.max(1) {
        // The whole batch must fit in KV at this context.
        if f64::from(b) * (input + output) > perf.kv_capacity_tokens {
            break;
        }
        if perf.decode_step_s(f64::from(b), ctx) <= itl_s {
            best = b;
        } else {
            break;
        }
    }
    let step = perf.decode_step_s(f64::from(best), ctx);
    let per_request = perf.prefill_s(input) + output * step / f64::from(best);
    1.0 / per_request
}

/// Requests per second one replica sustains with the mean request's
/// inter-token latency within `itl_s`, prefill interference included (B11's
/// capacity "at the SLO"). Prefills take a fraction `ρ = λ·p(input)` of the
/// replica's time and stall the decode steps they share an iteration with,
/// so a decoding request sees the gap `g = t(B, L) / (1 − ρ)`, with the
/// running batch `B = λ·output·g` (Little's law). The capacity is the
/// largest `λ` with `g ≤ itl_s`, i.e. `t(λ·output·itl_s, L) ≤ itl_s·(1 − ρ)`,
/// within the engine's batch ceiling and KV capacity. It is below
/// [`replica_capacity_rps`] (which lets decode steps alone reach the SLO and
/// so counts the prefill time twice over as throughput) and matters most
/// for long prompts with short outputs.
pub fn slo_capacity_rps(perf: &PerfModel, input: f64, output: f64, itl_s: f64) -> f64 {
    let ctx = input + 0.5 * output;
    let p = perf.prefill_s(input).max(1e-9);
    let feasible = |lambda: f64| {
        let rho = lambda * p;
        let batch = lambda * output.max(1.0) * itl_s;
        rho < 1.0
            && batch <= f64::from(perf.max_batch.max(1))
            && batch * (input + output) <= perf.kv_capacity_tokens
            && perf.decode_step_s(batch.max(1.0), ctx) <= itl_s * (1.0 - rho)
    };
    let (mut lo, mut hi) = (0.0, 1.0 / p);
    if !feasible(1e-6) {
        // Not even a lone request meets the SLO: fall back to the throughput bound.
        return replica_capacity_rps(perf, input, output, itl_s);
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if feasible(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slo_capacity_counts_prefill_stalls_and_meets_the_slo_at_its_rate() {
        let m = resolve_profile("h200-llama3-8b-bf16").unwrap();
        for (input, output) in [(2048.0, 28.0), (1155.0, 211.0)] {
            let slo = slo_capacity_rps(&m, input, output, 0.05);
            let bound = replica_capacity_rps(&m, input, output, 0.05);
            assert!(
                slo > 0.0 && slo < bound,
                "{input}/{output}: {slo} vs {bound}"
            );
            // At the capacity, the gap t(B)/(1 − ρ) with B = λ·O·SLO is the SLO.
            let rho = slo * m.prefill_s(input);
            let gap = m.decode_step_s(slo * output * 0.05, input + 0.5 * output) / (1.0 - rho);
            assert!((gap - 0.05).abs() < 1e-3, "{input}/{output}: gap {gap}");
        }
        // Long prompts with short outputs lose the most to prefill stalls.
        let code =
            slo_capacity_rps(&m, 2048.0, 28.0, 0.05) / replica_capacity_rps(&m, 2048.0, 28.0, 0.05);
        let conv = slo_capacity_rps(&m, 1155.0, 211.0, 0.05)
            / replica_capacity_rps(&m, 1155.0, 211.0, 0.05);
        assert!(code < conv, "code {code} conv {conv}");
    }

    #[test]
    fn coefficients_reproduce_the_model_everywhere() {
        for name in gpuscale_policy::perf::PRESET_NAMES {
            let m = resolve_profile(name).unwrap();
            let k = Coefficients::of(&m);
            for (b, ctx) in [(1.0, 100.0), (64.0, 2000.0), (256.0, 8000.0)] {
                let direct = m.decode_step_s(b, ctx);
                assert!(
                    (k.step(b, b * ctx) - direct).abs() < 1e-9 * direct.max(1.0),
                    "{name}"
                );
            }
            for t in [10.0, 1500.0, 8000.0] {
                let direct = m.prefill_s(t);
                let ours = k.pe + k.pf * t + k.pg * t * t;
                assert!((ours - direct).abs() < 1e-9, "{name} prefill {t}");
            }
        }
    }

    #[test]
    fn unknown_profile_names_the_flag_and_the_presets() {
        let e = resolve_profile("no-such-gpu").unwrap_err().to_string();
        assert!(
            e.contains("--profile") && e.contains("h200-llama3-8b-bf16"),
            "{e}"
        );
    }
}
