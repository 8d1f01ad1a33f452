//! The performance model of one model on one GPU type.
//!
//! Decode step time `t(B, L) = a + b·B + c·B·L` for a running batch of `B`
//! sequences with mean context `L` tokens, and prefill time
//! `p(T) = d + e·T + f·T²` for a prompt of `T` tokens (DESIGN.md §3; the H200
//! Llama-3-8B-shape data fits this within 3%). All times are seconds.

use serde::{Deserialize, Serialize};

/// Coefficients of the decode and prefill time models, plus the replica's
/// memory limit for KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfModel {
    /// Human-readable name, e.g. `h200-llama3-8b-bf16`.
    pub name: String,
    /// GPU type the model was measured on, e.g. `H200`.
    pub gpu: String,
    /// GPUs per replica (tensor parallelism) the profile was measured with.
    pub gpus_per_replica: u32,
    /// Decode: fixed part of one step, seconds.
    pub decode_base_s: f64,
    /// Decode: seconds per sequence in the batch.
    pub decode_per_seq_s: f64,
    /// Decode: seconds per sequence per context token.
    pub decode_per_seq_token_s: f64,
    /// Prefill: fixed part, seconds.
    pub prefill_base_s: f64,
    /// Prefill: seconds per prompt token.
    pub prefill_per_token_s: f64,
    /// Prefill: seconds per squared prompt token.
    pub prefill_per_token_sq_s: f64,
    /// KV-cache capacity of one replica, tokens.
    pub kv_capacity_tokens: f64,
    /// Largest batch the engine may run (its own `max_num_seqs` ceiling).
    pub max_batch: u32,
}

impl PerfModel {
    /// Decode step time for `batch` sequences of mean context `context_tokens`.
    pub fn decode_step_s(&self, batch: f64, context_tokens: f64) -> f64 {
        let b = batch.max(0.0);
        self.decode_base_s
            + self.decode_per_seq_s * b
            + self.decode_per_seq_token_s * b * context_tokens.max(0.0)
    }

    /// Prefill time for one prompt of `prompt_tokens` tokens.
    pub fn prefill_s(&self, prompt_tokens: f64) -> f64 {
        let t = prompt_tokens.max(0.0);
        self.prefill_base_s + self.prefill_per_token_s * t + self.prefill_per_token_sq_s * t * t
    }

    /// Decode throughput (generated tokens per second) at `batch` and context.
    pub fn decode_tokens_per_s(&self, batch: f64, context_tokens: f64) -> f64 {
        let step = self.decode_step_s(batch, context_tokens);
        if step > 0.0 {
            batch.max(0.0) / step
        } else {
            0.0
        }
    }
}
