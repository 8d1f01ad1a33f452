//! Deterministic fake sources: a simulated node for the demo and the tests.
//!
//! One [`FakeNode`] holds a node's GPUs and its engines; it hands out a
//! [`FakeGpuSource`], a [`FakePodGpuSource`] and a [`FakeEngineSource`] that
//! all read the same state, plus a [`FakeNodeHandle`] through which code
//! outside the agent (the demo's simulated fleet, a test) pushes per-pod
//! engine state, removes pods, or injects source failures.
//!
//! Engines come in two kinds:
//!
//! * **simulated** (from the [`FakeNodeConfig`]): a fluid queueing model of a
//!   continuously batching engine driven by the node's load curve, with
//!   realistic cumulative counters (prompt and generated tokens, requests
//!   arrived and finished, preemptions) and TTFT/ITL histograms in the
//!   [`Histogram::ttft`]/[`Histogram::itl`] layouts;
//! * **driven** (through [`FakeNodeHandle::upsert_engine`]): the sample is
//!   whatever the caller last pushed, stamped with the sampling time.
//!
//! GPU metrics follow the engines assigned to each GPU: framebuffer memory is
//! pre-allocated (flat), "utilization" is high as soon as anything runs (as
//! NVML's is), power and tensor activity grow with the running batch.
//!
//! Everything is deterministic for a seed, the node's name and the sequence of
//! `now` values the sources are called with: no clock, no global randomness.
//!
//! The configuration is plain serde (`deny_unknown_fields`); callers parse it
//! from YAML or JSON. Example:
//!
//! ```yaml
//! seed: 7
//! gpus:
//!   - { model: "NVIDIA H100 80GB HBM3", count: 8, memory_gib: 80, power_limit_watts: 700 }
//! engines:
//!   - { pod: llama-0, model: llama-3-8b, gpus: 1 }
//!   - { pod: llama-1, model: llama-3-8b, gpus: 1, warmup_seconds: 30 }
//! load:
//!   points: [ { at_seconds: 0, requests_per_second: 2 }, { at_seconds: 120, requests_per_second: 20 } ]
//!   noise: 0.1
//!   repeat: true
//! ```

use std::collections::BTreeMap;
use std::future::{Future, ready};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use gpuscale_core::sample::{
    ContainerGpus, EngineSample, EngineState, Framework, GpmMetrics, GpuHealth, GpuInfo,
    GpuMetrics, GpuSample, PodGpus,
};
use gpuscale_core::{GpuUuid, Histogram, PodRef, Timestamp};
use serde::{Deserialize, Serialize};

use crate::source::{EngineSource, GpuSource, PodGpuSource, SourceError};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// The resource name the device plugin registers GPUs under.
pub(crate) const GPU_RESOURCE_NAME: &str = "nvidia.com/gpu";
/// The container name of simulated engines.
pub(crate) const ENGINE_CONTAINER: &str = "engine";

/// A simulated node: its GPUs, its engines and the load they serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeNodeConfig {
    /// Seed of every random draw (mixed with the node's name).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// GPU groups, in index order.
    #[serde(default = "default_gpus")]
    pub gpus: Vec<FakeGpuGroup>,
    /// Simulated engines, each given the next free GPUs in index order.
    #[serde(default)]
    pub engines: Vec<FakeEngineConfig>,
    /// Requests per second offered to the node, split over its warm engines.
    #[serde(default)]
    pub load: FakeLoadCurve,
}

impl Default for FakeNodeConfig {
    fn default() -> Self {
        Self {
            seed: default_seed(),
            gpus: default_gpus(),
            engines: Vec::new(),
            load: FakeLoadCurve::default(),
        }
    }
}

/// `count` identical GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGpuGroup {
    /// NVML model name, e.g. `NVIDIA H100 80GB HBM3`.
    #[serde(default = "default_model")]
    pub model: String,
    pub count: u32,
    /// Framebuffer size, GiB.
    #[serde(default = "default_memory_gib")]
    pub memory_gib: f64,
    #[serde(default = "default_power_limit")]
    pub power_limit_watts: f64,
    /// Whether the GPU reports GPM metrics (Hopper and newer).
    #[serde(default = "default_true")]
    pub gpm_supported: bool,
}

/// One simulated inference engine (one pod).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeEngineConfig {
    /// Pod name.
    pub pod: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Served model name.
    pub model: String,
    /// GPUs the pod holds.
    #[serde(default = "default_one")]
    pub gpus: u32,
    /// Generated tokens per second at a full batch.
    #[serde(default = "default_capacity")]
    pub capacity_tokens_per_second: f64,
    /// Maximum running sequences.
    #[serde(default = "default_batch_limit")]
    pub batch_limit: u32,
    #[serde(default = "default_input_tokens")]
    pub mean_input_tokens: f64,
    #[serde(default = "default_output_tokens")]
    pub mean_output_tokens: f64,
    #[serde(default = "default_kv_capacity")]
    pub kv_capacity_tokens: f64,
    /// Seconds spent `Loading` after the first sample before turning `Warm`.
    #[serde(default)]
    pub warmup_seconds: f64,
}

/// A piecewise-linear load curve over time since the node's first sample,
/// with multiplicative noise.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeLoadCurve {
    /// Points in increasing time; before the first and after the last, the
    /// nearest point's rate holds (unless `repeat`). Empty: no load.
    #[serde(default)]
    pub points: Vec<FakeLoadPoint>,
    /// Standard deviation of the multiplicative noise, 0..=1.
    #[serde(default)]
    pub noise: f64,
    /// Start over after the last point.
    #[serde(default)]
    pub repeat: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeLoadPoint {
    pub at_seconds: f64,
    pub requests_per_second: f64,
}

fn default_seed() -> u64 {
    1
}
fn default_gpus() -> Vec<FakeGpuGroup> {
    vec![FakeGpuGroup {
        model: default_model(),
        count: 8,
        memory_gib: default_memory_gib(),
        power_limit_watts: default_power_limit(),
        gpm_supported: true,
    }]
}
fn default_model() -> String {
    "NVIDIA H100 80GB HBM3".into()
}
fn default_memory_gib() -> f64 {
    80.0
}
fn default_power_limit() -> f64 {
    700.0
}
fn default_true() -> bool {
    true
}
fn default_namespace() -> String {
    "default".into()
}
fn default_one() -> u32 {
    1
}
fn default_capacity() -> f64 {
    3_000.0
}
fn default_batch_limit() -> u32 {
    256
}
fn default_input_tokens() -> f64 {
    512.0
}
fn default_output_tokens() -> f64 {
    256.0
}
fn default_kv_capacity() -> f64 {
    400_000.0
}

fn config_error(field: String, value: impl std::fmt::Display, allowed: &str) -> SourceError {
    SourceError::new(
        "fake-config",
        "config",
        format!("{field}: {value} is not allowed; {allowed}"),
    )
}

impl FakeNodeConfig {
    /// Checks every field; the error names the field, the value and what is allowed.
    pub fn validate(&self) -> Result<(), SourceError> {
        let mut total_gpus: u64 = 0;
        for (i, g) in self.gpus.iter().enumerate() {
            if g.count == 0 || g.count > 64 {
                return Err(config_error(
                    format!("gpus[{i}].count"),
                    g.count,
                    "1..=64 GPUs per group",
                ));
            }
            if !(g.memory_gib.is_finite() && g.memory_gib > 0.0 && g.memory_gib <= 4096.0) {
                return Err(config_error(
                    format!("gpus[{i}].memory_gib"),
                    g.memory_gib,
                    "more than 0 and at most 4096 GiB",
                ));
            }
            if !(g.power_limit_watts.is_finite()
                && g.power_limit_watts >= 50.0
                && g.power_limit_watts <= 5_000.0)
            {
                return Err(config_error(
                    format!("gpus[{i}].power_limit_watts"),
                    g.power_limit_watts,
                    "50..=5000 W",
                ));
            }
            if g.model.is_empty() {
                return Err(config_error(
                    format!("gpus[{i}].model"),
                    "\"\"",
                    "a non-empty model name",
                ));
            }
            total_gpus += u64::from(g.count);
        }
        if total_gpus > 256 {
            return Err(config_error(
                "gpus".into(),
                format!("{total_gpus} GPUs in all"),
                "at most 256 GPUs per node",
            ));
        }
        let mut used: u64 = 0;
        let mut names = std::collections::BTreeSet::new();
        for (i, e) in self.engines.iter().enumerate() {
            let at = |f: &str| format!("engines[{i}].{f}");
            if e.pod.is_empty() || e.pod.len() > 253 {
                return Err(config_error(
                    at("pod"),
                    format!("{:?}", e.pod),
                    "1..=253 bytes",
                ));
            }
            if e.namespace.is_empty() || e.namespace.len() > 253 {
                return Err(config_error(
                    at("namespace"),
                    format!("{:?}", e.namespace),
                    "1..=253 bytes",
                ));
            }
            if !names.insert((e.namespace.clone(), e.pod.clone())) {
                return Err(config_error(
                    at("pod"),
                    format!("{}/{}", e.namespace, e.pod),
                    "each pod once",
                ));
            }
            if e.gpus == 0 {
                return Err(config_error(at("gpus"), e.gpus, "at least 1 GPU"));
            }
            used += u64::from(e.gpus);
            if used > total_gpus {
                return Err(config_error(
                    at("gpus"),
                    e.gpus,
                    &format!(
                        "the node has {total_gpus} GPUs and earlier engines hold {}",
                        used - u64::from(e.gpus)
                    ),
                ));
            }
            for (field, value, lo, hi) in [
                (
                    "capacity_tokens_per_second",
                    e.capacity_tokens_per_second,
                    1.0,
                    1e7,
                ),
                ("mean_input_tokens", e.mean_input_tokens, 1.0, 1e7),
                ("mean_output_tokens", e.mean_output_tokens, 1.0, 1e7),
                ("kv_capacity_tokens", e.kv_capacity_tokens, 1.0, 1e10),
                ("warmup_seconds", e.warmup_seconds, 0.0, 86_400.0),
            ] {
                if !(value.is_finite() && value >= lo && value <= hi) {
                    return Err(config_error(at(field), value, &format!("{lo}..={hi}")));
                }
            }
            if e.batch_limit == 0 || e.batch_limit > 65_536 {
                return Err(config_error(at("batch_limit"), e.batch_limit, "1..=65536"));
            }
            // The decode model needs a single sequence to be slower than the
            // batch's per-sequence share of the capacity.
            if f64::from(e.batch_limit) / e.capacity_tokens_per_second <= SINGLE_STEP_SECONDS {
                return Err(config_error(
                    at("capacity_tokens_per_second"),
                    e.capacity_tokens_per_second,
                    &format!(
                        "below batch_limit / {SINGLE_STEP_SECONDS} s = {} tokens/s",
                        f64::from(e.batch_limit) / SINGLE_STEP_SECONDS
                    ),
                ));
            }
        }
        let mut prev = f64::NEG_INFINITY;
        for (i, p) in self.load.points.iter().enumerate() {
            if !(p.at_seconds.is_finite() && p.at_seconds >= 0.0 && p.at_seconds > prev) {
                return Err(config_error(
                    format!("load.points[{i}].at_seconds"),
                    p.at_seconds,
                    "finite, >= 0 and increasing",
                ));
            }
            if !(p.requests_per_second.is_finite()
                && p.requests_per_second >= 0.0
                && p.requests_per_second <= 1e6)
            {
                return Err(config_error(
                    format!("load.points[{i}].requests_per_second"),
                    p.requests_per_second,
                    "0..=1000000",
                ));
            }
            prev = p.at_seconds;
        }
        if !(self.load.noise.is_finite() && (0.0..=1.0).contains(&self.load.noise)) {
            return Err(config_error("load.noise".into(), self.load.noise, "0..=1"));
        }
        Ok(())
    }
}

impl FakeLoadCurve {
    /// Offered requests per second `t` seconds after the start (no noise).
    pub(crate) fn rate_at(&self, t: f64) -> f64 {
        let Some(first) = self.points.first() else {
            return 0.0;
        };
        let last = self.points[self.points.len() - 1];
        let mut t = t.max(0.0);
        if self.repeat && last.at_seconds > 0.0 && t > last.at_seconds {
            t %= last.at_seconds;
        }
        if t <= first.at_seconds {
            return first.requests_per_second;
        }
        for w in self.points.windows(2) {
            let (a, b) = (w[0], w[1]);
            if t <= b.at_seconds {
                let f = (t - a.at_seconds) / (b.at_seconds - a.at_seconds);
                return a.requests_per_second + f * (b.requests_per_second - a.requests_per_second);
            }
        }
        last.requests_per_second
    }
}

// ---------------------------------------------------------------------------
// Randomness: SplitMix64, so that a seed means the same numbers forever.

#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn hash_str(seed: u64, s: &str) -> u64 {
    // FNV-1a, stable across Rust versions (unlike `DefaultHasher`).
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------
// The engine model.

/// Decode step time of a single sequence, seconds (about 125 tokens/s).
const SINGLE_STEP_SECONDS: f64 = 0.008;
/// Prefill: fixed part and per prompt token, seconds.
const PREFILL_BASE_SECONDS: f64 = 0.02;
const PREFILL_PER_TOKEN_SECONDS: f64 = 0.000_05;

#[derive(Debug, Clone)]
struct SimulatedEngine {
    config: FakeEngineConfig,
    /// Seconds per step added by each running sequence.
    step_per_seq_seconds: f64,
    sample: EngineSample,
    /// Requests admitted and not finished (fluid).
    in_system: f64,
    /// Fractional finished requests not yet observed in the TTFT histogram.
    finished_carry: f64,
    generated_carry: f64,
    rng: SplitMix64,
}

impl SimulatedEngine {
    fn new(config: FakeEngineConfig, gpu_uuids: Vec<GpuUuid>, seed: u64) -> Self {
        let pod = PodRef::new(config.namespace.clone(), config.pod.clone());
        let mut sample = EngineSample::empty(
            pod.clone(),
            Framework::Fake,
            config.model.clone(),
            Timestamp::EPOCH,
        );
        sample.container = ENGINE_CONTAINER.into();
        sample.state = if config.warmup_seconds > 0.0 {
            EngineState::Loading
        } else {
            EngineState::Warm
        };
        sample.gpu_uuids = gpu_uuids;
        sample.requests_waiting = Some(0.0);
        sample.requests_running = Some(0.0);
        sample.kv_cache_usage_ratio = Some(0.0);
        sample.kv_capacity_tokens = Some(config.kv_capacity_tokens);
        sample.queued_prompt_tokens = Some(0.0);
        sample.prompt_tokens_total = Some(0.0);
        sample.generation_tokens_total = Some(0.0);
        sample.requests_arrived_total = Some(0.0);
        sample.requests_finished_total = Some(0.0);
        sample.preemptions_total = Some(0.0);
        sample.ttft_seconds = Some(Histogram::ttft());
        sample.itl_seconds = Some(Histogram::itl());
        sample.tpot_seconds = Some(Histogram::tpot());
        sample.batch_limit = Some(config.batch_limit);
        let b = f64::from(config.batch_limit);
        let step_per_seq_seconds =
            (b / config.capacity_tokens_per_second - SINGLE_STEP_SECONDS) / b;
        let rng = SplitMix64(hash_str(seed, &pod.to_string()));
        Self {
            config,
            step_per_seq_seconds,
            sample,
            in_system: 0.0,
            finished_carry: 0.0,
            generated_carry: 0.0,
            rng,
        }
    }

    /// Advance by `dt` seconds with `arrival_rate` requests per second offered.
    fn step(&mut self, dt: f64, arrival_rate: f64, since_start: f64) {
        if self.sample.state == EngineState::Loading && since_start >= self.config.warmup_seconds {
            self.sample.state = EngineState::Warm;
        }
        let limit = f64::from(
            self.sample
                .batch_limit
                .unwrap_or(self.config.batch_limit)
                .max(1),
        );
        let mean_in = self.config.mean_input_tokens;
        let mean_out = self.config.mean_output_tokens;
        let arrivals = if self.sample.state == EngineState::Warm {
            (arrival_rate * dt).max(0.0)
        } else {
            0.0
        };
        add(&mut self.sample.requests_arrived_total, arrivals);
        add(&mut self.sample.prompt_tokens_total, arrivals * mean_in);
        self.in_system += arrivals;

        let running = self.in_system.min(limit);
        let step_s = SINGLE_STEP_SECONDS + self.step_per_seq_seconds * running;
        let generated = if running > 0.0 {
            running / step_s * dt
        } else {
            0.0
        };
        let finished = self.in_system.min(generated / mean_out);
        self.in_system -= finished;
        add(&mut self.sample.generation_tokens_total, generated);
        add(&mut self.sample.requests_finished_total, finished);

        let running = self.in_system.min(limit);
        let waiting = (self.in_system - limit).max(0.0);
        let context = mean_in + mean_out / 2.0;
        let kv_demand = running * context / self.config.kv_capacity_tokens;
        if kv_demand > 1.0 {
            add(
                &mut self.sample.preemptions_total,
                ((kv_demand - 1.0) * running * dt).max(0.0),
            );
        }
        self.sample.requests_running = Some(running);
        self.sample.requests_waiting = Some(waiting);
        self.sample.queued_prompt_tokens = Some(waiting * mean_in);
        self.sample.kv_cache_usage_ratio = Some(kv_demand.min(1.0));
        self.sample.mean_context_tokens = (running > 0.0).then_some(context);

        // Latencies: TTFT = prefill + time in the queue; ITL = the step time.
        let finish_rate = if dt > 0.0 { finished / dt } else { 0.0 };
        let queue_s = if finish_rate > 0.0 {
            waiting / finish_rate
        } else {
            0.0
        };
        let prefill_s = PREFILL_BASE_SECONDS + PREFILL_PER_TOKEN_SECONDS * mean_in;
        self.finished_carry += finished;
        let whole = self.finished_carry.floor();
        self.finished_carry -= whole;
        self.generated_carry += generated;
        let tokens = self.generated_carry.floor();
        self.generated_carry -= tokens;
        let rng = &mut self.rng;
        if let Some(h) = self.sample.ttft_seconds.as_mut() {
            spread(h, whole as u64, prefill_s + queue_s, 0.25, rng);
        }
        if let Some(h) = self.sample.itl_seconds.as_mut() {
            spread(h, tokens as u64, step_s, 0.1, rng);
        }
        // A finished request's TPOT is the mean of its steps: less spread.
        if let Some(h) = self.sample.tpot_seconds.as_mut() {
            spread(h, whole as u64, step_s, 0.05, rng);
        }
    }
}

fn add(counter: &mut Option<f64>, v: f64) {
    *counter = Some(counter.unwrap_or(0.0) + v);
}

/// Record `n` observations around `center` with relative spread `rel`, in a
/// handful of weighted draws so that large `n` stays cheap.
fn spread(h: &mut Histogram, n: u64, center: f64, rel: f64, rng: &mut SplitMix64) {
    const DRAWS: u64 = 8;
    if n == 0 {
        return;
    }
    let per = n / DRAWS;
    let mut left = n;
    for i in 0..DRAWS {
        let k = if i == DRAWS - 1 { left } else { per };
        if k == 0 {
            continue;
        }
        left -= k;
        let v = center * (1.0 + rel * rng.normal()).max(0.05);
        h.observe_n(v, k);
    }
}

// ---------------------------------------------------------------------------
// The node.

#[derive(Debug, Clone)]
enum FakeEngine {
    Simulated(Box<SimulatedEngine>),
    Driven(Box<EngineSample>),
}

impl FakeEngine {
    fn sample(&self) -> &EngineSample {
        match self {
            FakeEngine::Simulated(s) => &s.sample,
            FakeEngine::Driven(s) => s,
        }
    }
    /// Fraction of the batch in use, 0..=1, and whether anything runs.
    fn activity(&self) -> f64 {
        let s = self.sample();
        let running = s.requests_running.unwrap_or(0.0);
        let limit = f64::from(s.batch_limit.unwrap_or(256).max(1));
        (running / limit).clamp(0.0, 1.0)
    }
    fn busy(&self) -> bool {
        self.sample().requests_running.unwrap_or(0.0) > 0.0
    }
}

#[derive(Debug, Clone)]
struct FakeGpu {
    info: GpuInfo,
    power_limit_watts: f64,
    energy_joules: f64,
}

#[derive(Debug)]
struct FakeNodeState {
    rng: SplitMix64,
    gpus: Vec<FakeGpu>,
    engines: BTreeMap<PodRef, FakeEngine>,
    load: FakeLoadCurve,
    started_at: Option<Timestamp>,
    last_gpu_sample: Option<Timestamp>,
    last_engine_step: Option<Timestamp>,
    failures: BTreeMap<FakeSourceKind, u32>,
}

/// Which fake source a failure is injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FakeSourceKind {
    Gpus,
    Pods,
    Engines,
}

impl FakeSourceKind {
    fn name(self) -> &'static str {
        match self {
            FakeSourceKind::Gpus => "fake-gpus",
            FakeSourceKind::Pods => "fake-pods",
            FakeSourceKind::Engines => "fake-engines",
        }
    }
}

/// A simulated node; see the module docs.
#[derive(Debug, Clone)]
pub struct FakeNode {
    state: Arc<Mutex<FakeNodeState>>,
}

fn lock(state: &Mutex<FakeNodeState>) -> MutexGuard<'_, FakeNodeState> {
    // A panic while holding the lock leaves plain data behind; keep going.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeNode {
    /// Builds the node from a validated configuration. `node_name` is mixed
    /// into the seed so that nodes sharing a configuration have distinct GPUs.
    pub fn new(config: &FakeNodeConfig, node_name: &str) -> Result<Self, SourceError> {
        config.validate()?;
        let seed = hash_str(config.seed, node_name);
        let mut rng = SplitMix64(seed);
        let mut gpus = Vec::new();
        for group in &config.gpus {
            for _ in 0..group.count {
                let index = gpus.len() as u32;
                let (a, b) = (rng.next_u64(), rng.next_u64());
                let uuid = GpuUuid::new(format!(
                    "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xffff,
                    b >> 48,
                    b & 0xffff_ffff_ffff
                ));
                gpus.push(FakeGpu {
                    info: GpuInfo {
                        uuid,
                        index,
                        model_name: group.model.clone(),
                        memory_total_bytes: (group.memory_gib * GIB) as u64,
                        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index),
                        parent_uuid: None,
                        mig_gpu_instance_id: None,
                        gpm_supported: group.gpm_supported,
                        driver_version: "570.86.15".into(),
                    },
                    power_limit_watts: group.power_limit_watts,
                    energy_joules: 0.0,
                });
            }
        }
        let mut engines = BTreeMap::new();
        let mut next = 0usize;
        for e in &config.engines {
            let n = e.gpus as usize;
            let uuids = gpus[next..next + n]
                .iter()
                .map(|g| g.info.uuid.clone())
                .collect();
            next += n;
            let engine = SimulatedEngine::new(e.clone(), uuids, seed);
            engines.insert(
                engine.sample.pod.clone(),
                FakeEngine::Simulated(Box::new(engine)),
            );
        }
        Ok(Self {
            state: Arc::new(Mutex::new(FakeNodeState {
                rng,
                gpus,
                engines,
                load: config.load.clone(),
                started_at: None,
                last_gpu_sample: None,
                last_engine_step: None,
                failures: BTreeMap::new(),
            })),
        })
    }

    pub fn gpu_source(&self) -> FakeGpuSource {
        FakeGpuSource(self.clone())
    }
    pub fn pod_source(&self) -> FakePodGpuSource {
        FakePodGpuSource(self.clone())
    }
    pub fn engine_source(&self) -> FakeEngineSource {
        FakeEngineSource(self.clone())
    }
    /// The handle for code outside the agent to drive the node.
    pub fn handle(&self) -> FakeNodeHandle {
        FakeNodeHandle(self.clone())
    }
}

/// Drives a [`FakeNode`] from outside: push engine state, remove pods, inject
/// failures. Cheap to clone; every clone drives the same node.
#[derive(Debug, Clone)]
pub struct FakeNodeHandle(FakeNode);

impl FakeNodeHandle {
    /// The node's GPU UUIDs in index order.
    pub fn gpu_uuids(&self) -> Vec<GpuUuid> {
        lock(&self.0.state)
            .gpus
            .iter()
            .map(|g| g.info.uuid.clone())
            .collect()
    }

    /// GPUs no engine holds, in index order.
    pub fn free_gpus(&self) -> Vec<GpuUuid> {
        let s = lock(&self.0.state);
        s.gpus
            .iter()
            .map(|g| &g.info.uuid)
            .filter(|u| !s.engines.values().any(|e| e.sample().gpu_uuids.contains(u)))
            .cloned()
            .collect()
    }

    /// Add or replace the engine of `sample.pod` with a driven engine: from
    /// now on its samples are `sample`, stamped with the sampling time. Its
    /// `gpu_uuids` become the pod's GPU assignment.
    pub fn upsert_engine(&self, sample: EngineSample) {
        lock(&self.0.state)
            .engines
            .insert(sample.pod.clone(), FakeEngine::Driven(Box::new(sample)));
    }

    /// Change a driven engine's sample in place. Returns false when the pod
    /// has no engine or its engine is simulated.
    pub fn update_engine(&self, pod: &PodRef, f: impl FnOnce(&mut EngineSample)) -> bool {
        match lock(&self.0.state).engines.get_mut(pod) {
            Some(FakeEngine::Driven(s)) => {
                f(s);
                true
            }
            _ => false,
        }
    }

    /// Remove the pod (its engine and its GPU assignment). Returns whether it existed.
    pub fn remove_engine(&self, pod: &PodRef) -> bool {
        lock(&self.0.state).engines.remove(pod).is_some()
    }

    /// The pods the node holds now.
    pub fn pods(&self) -> Vec<PodRef> {
        lock(&self.0.state).engines.keys().cloned().collect()
    }

    /// The engines' latest samples.
    pub fn engines(&self) -> Vec<EngineSample> {
        lock(&self.0.state)
            .engines
            .values()
            .map(|e| e.sample().clone())
            .collect()
    }

    /// Make the next `rounds` calls of one source fail with kind `injected`.
    pub fn fail_next(&self, source: FakeSourceKind, rounds: u32) {
        *lock(&self.0.state).failures.entry(source).or_insert(0) += rounds;
    }
}

impl FakeNodeState {
    fn take_failure(&mut self, kind: FakeSourceKind) -> Result<(), SourceError> {
        match self.failures.get_mut(&kind) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(SourceError::new(
                    kind.name(),
                    "injected",
                    "failure injected by the test handle",
                ))
            }
            _ => Ok(()),
        }
    }

    fn started(&mut self, now: Timestamp) -> Timestamp {
        *self.started_at.get_or_insert(now)
    }

    fn sample_gpus(&mut self, now: Timestamp) -> Result<Vec<GpuSample>, SourceError> {
        self.take_failure(FakeSourceKind::Gpus)?;
        self.started(now);
        let dt = self
            .last_gpu_sample
            .map(|t| now.secs_since(t).max(0.0))
            .unwrap_or(0.0);
        self.last_gpu_sample = Some(now);
        let mut out = Vec::with_capacity(self.gpus.len());
        for g in &mut self.gpus {
            let engine = self
                .engines
                .values()
                .find(|e| e.sample().gpu_uuids.contains(&g.info.uuid));
            let (assigned, busy, activity) = match engine {
                Some(e) => (true, e.busy(), e.activity()),
                None => (false, false, 0.0),
            };
            let noise = 0.02 * self.rng.normal();
            let limit = g.power_limit_watts;
            let idle = 0.12 * limit;
            let power = if busy {
                (idle + (0.85 * limit - idle) * (0.3 + 0.7 * activity) * (1.0 + noise))
                    .clamp(idle, limit)
            } else {
                (idle * (1.0 + noise)).max(0.0)
            };
            g.energy_joules += power * dt;
            let total = g.info.memory_total_bytes;
            let used = if assigned {
                (total as f64 * 0.92) as u64
            } else {
                512 * 1024 * 1024
            }
            .min(total);
            let util = if busy {
                (0.85 + 0.1 * activity + noise).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let tensor = if busy {
                (0.1 + 0.6 * activity + noise).clamp(0.0, 1.0)
            } else {
                0.0
            };
            out.push(GpuSample {
                info: g.info.clone(),
                metrics: GpuMetrics {
                    uuid: g.info.uuid.clone(),
                    memory_used_bytes: Some(used),
                    memory_free_bytes: Some(total - used),
                    utilization_gpu_ratio: Some(util),
                    utilization_memory_ratio: Some((util * 0.6).clamp(0.0, 1.0)),
                    power_watts: Some(power),
                    power_limit_watts: Some(limit),
                    temperature_celsius: Some(32.0 + 45.0 * power / limit),
                    sm_clock_mhz: Some(if busy { 1_980 } else { 345 }),
                    throttle_reasons: Some(0),
                    ecc_uncorrected_total: Some(0),
                    energy_joules_total: Some(g.energy_joules),
                    gpm: g.info.gpm_supported.then(|| GpmMetrics {
                        sm_util_ratio: Some(util),
                        sm_occupancy_ratio: Some(
                            (0.2 + 0.5 * activity).min(1.0) * f64::from(u8::from(busy)),
                        ),
                        tensor_active_ratio: Some(tensor),
                        dram_bw_util_ratio: Some(
                            (0.3 + 0.5 * activity).min(1.0) * f64::from(u8::from(busy)),
                        ),
                    }),
                    health: GpuHealth::Healthy,
                    xid_totals: BTreeMap::new(),
                },
            });
        }
        Ok(out)
    }

    fn list_pod_gpus(&mut self) -> Result<Vec<PodGpus>, SourceError> {
        self.take_failure(FakeSourceKind::Pods)?;
        Ok(self
            .engines
            .values()
            .map(FakeEngine::sample)
            .filter(|s| !s.gpu_uuids.is_empty())
            .map(|s| PodGpus {
                pod: s.pod.clone(),
                containers: vec![ContainerGpus {
                    container: if s.container.is_empty() {
                        ENGINE_CONTAINER.into()
                    } else {
                        s.container.clone()
                    },
                    resource_name: GPU_RESOURCE_NAME.into(),
                    gpu_uuids: s.gpu_uuids.clone(),
                }],
            })
            .collect())
    }

    fn sample_engines(&mut self, now: Timestamp) -> Result<Vec<EngineSample>, SourceError> {
        self.take_failure(FakeSourceKind::Engines)?;
        let start = self.started(now);
        let dt = self
            .last_engine_step
            .map(|t| now.secs_since(t).max(0.0))
            .unwrap_or(0.0);
        self.last_engine_step = Some(now);
        let since_start = now.secs_since(start);
        let warm = self
            .engines
            .values()
            .filter(
                |e| matches!(e, FakeEngine::Simulated(s) if s.sample.state == EngineState::Warm),
            )
            .count();
        let noise = self.load.noise * self.rng.normal();
        let total_rate = (self.load.rate_at(since_start) * (1.0 + noise)).max(0.0);
        let share = if warm > 0 {
            total_rate / warm as f64
        } else {
            0.0
        };
        let mut out = Vec::with_capacity(self.engines.len());
        for e in self.engines.values_mut() {
            match e {
                FakeEngine::Simulated(s) => {
                    if dt > 0.0 {
                        s.step(dt, share, since_start);
                    }
                    s.sample.sampled_at = now;
                    out.push(s.sample.clone());
                }
                FakeEngine::Driven(s) => {
                    s.sampled_at = now;
                    out.push((**s).clone());
                }
            }
        }
        Ok(out)
    }
}

/// The node's GPUs as a [`GpuSource`].
#[derive(Debug, Clone)]
pub struct FakeGpuSource(FakeNode);

/// The node's pod-to-GPU assignment as a [`PodGpuSource`].
#[derive(Debug, Clone)]
pub struct FakePodGpuSource(FakeNode);

/// The node's engines as an [`EngineSource`].
#[derive(Debug, Clone)]
pub struct FakeEngineSource(FakeNode);

impl GpuSource for FakeGpuSource {
    fn sample_gpus(
        &mut self,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<GpuSample>, SourceError>> + Send {
        ready(lock(&self.0.state).sample_gpus(now))
    }
}

impl PodGpuSource for FakePodGpuSource {
    fn list_pod_gpus(
        &mut self,
        _now: Timestamp,
    ) -> impl Future<Output = Result<Vec<PodGpus>, SourceError>> + Send {
        ready(lock(&self.0.state).list_pod_gpus())
    }
}

impl EngineSource for FakeEngineSource {
    fn sample_engines(
        &mut self,
        now: Timestamp,
        _pods: &[PodGpus],
    ) -> impl Future<Output = Result<Vec<EngineSample>, SourceError>> + Send {
        ready(lock(&self.0.state).sample_engines(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> FakeNodeConfig {
        FakeNodeConfig {
            seed: 7,
            gpus: vec![FakeGpuGroup {
                model: "NVIDIA H100 80GB HBM3".into(),
                count: 4,
                memory_gib: 80.0,
                power_limit_watts: 700.0,
                gpm_supported: true,
            }],
            engines: vec![
                FakeEngineConfig {
                    pod: "llama-0".into(),
                    namespace: "default".into(),
                    model: "llama-3-8b".into(),
                    gpus: 1,
                    capacity_tokens_per_second: 3_000.0,
                    batch_limit: 256,
                    mean_input_tokens: 512.0,
                    mean_output_tokens: 256.0,
                    kv_capacity_tokens: 400_000.0,
                    warmup_seconds: 0.0,
                },
                FakeEngineConfig {
                    pod: "llama-1".into(),
                    namespace: "default".into(),
                    model: "llama-3-8b".into(),
                    gpus: 2,
                    capacity_tokens_per_second: 3_000.0,
                    batch_limit: 256,
                    mean_input_tokens: 512.0,
                    mean_output_tokens: 256.0,
                    kv_capacity_tokens: 400_000.0,
                    warmup_seconds: 10.0,
                },
            ],
            load: FakeLoadCurve {
                points: vec![
                    FakeLoadPoint {
                        at_seconds: 0.0,
                        requests_per_second: 4.0,
                    },
                    FakeLoadPoint {
                        at_seconds: 60.0,
                        requests_per_second: 8.0,
                    },
                ],
                noise: 0.1,
                repeat: false,
            },
        }
    }

    fn run(node: &FakeNode, seconds: i64) -> (Vec<GpuSample>, Vec<PodGpus>, Vec<EngineSample>) {
        let mut g = node.gpu_source();
        let mut p = node.pod_source();
        let mut e = node.engine_source();
        let mut last = (vec![], vec![], vec![]);
        for s in 0..=seconds {
            let now = Timestamp::from_millis(1_000_000 + s * 1000);
            let pods = futures_ready(p.list_pod_gpus(now)).expect("pods");
            let gpus = futures_ready(g.sample_gpus(now)).expect("gpus");
            let engines = futures_ready(e.sample_engines(now, &pods)).expect("engines");
            last = (gpus, pods, engines);
        }
        last
    }

    /// The fake's futures are ready at once; poll them without a runtime.
    fn futures_ready<T>(f: impl Future<Output = T>) -> T {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("fake source futures are always ready"),
        }
    }

    #[test]
    fn same_seed_and_node_give_identical_samples() {
        let a = run(&FakeNode::new(&config(), "node-a").expect("valid"), 30);
        let b = run(&FakeNode::new(&config(), "node-a").expect("valid"), 30);
        assert_eq!(a, b);
    }

    #[test]
    fn different_nodes_get_distinct_gpu_uuids() {
        let a = FakeNode::new(&config(), "node-a")
            .expect("valid")
            .handle()
            .gpu_uuids();
        let b = FakeNode::new(&config(), "node-b")
            .expect("valid")
            .handle()
            .gpu_uuids();
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|u| !b.contains(u)));
        assert!(
            a[0].as_str().starts_with("GPU-") && a[0].as_str().len() == 40,
            "{}",
            a[0]
        );
    }

    #[test]
    fn simulated_engines_have_monotone_counters_and_consistent_histograms() {
        let node = FakeNode::new(&config(), "node-a").expect("valid");
        let (gpus, pods, engines) = run(&node, 120);
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[1].gpu_uuids().len(), 2);
        let e0 = &engines[0];
        assert_eq!(e0.state, EngineState::Warm);
        // 4 -> 8 rps over the first minute, then 8; one of two warm engines
        // after 10 s: several hundred requests in two minutes.
        let arrived = e0.requests_arrived_total.expect("exported");
        let finished = e0.requests_finished_total.expect("exported");
        assert!(arrived > 200.0 && arrived < 900.0, "arrived {arrived}");
        assert!(
            finished <= arrived && finished > arrived * 0.8,
            "finished {finished}"
        );
        let ttft = e0.ttft_seconds.as_ref().expect("ttft");
        assert!((ttft.count() as f64 - finished).abs() <= 1.0);
        let p50 = ttft.quantile(0.5).expect("observations");
        assert!(p50 > 0.01 && p50 < 1.0, "ttft p50 {p50}");
        let itl = e0.itl_seconds.as_ref().expect("itl");
        assert!((itl.count() as f64 - e0.generation_tokens_total.expect("exported")).abs() <= 1.0);
        // The GPU under a busy engine reads busy; a free GPU idles.
        assert!(gpus[0].metrics.utilization_gpu_ratio.expect("util") > 0.5);
        assert_eq!(gpus[3].metrics.utilization_gpu_ratio, Some(0.0));
        assert!(gpus[0].metrics.energy_joules_total.expect("energy") > 0.0);
    }

    #[test]
    fn engine_warms_up_after_its_warmup_time() {
        let node = FakeNode::new(&config(), "node-a").expect("valid");
        let (_, _, engines) = run(&node, 5);
        assert_eq!(engines[1].state, EngineState::Loading);
        assert_eq!(engines[1].requests_arrived_total, Some(0.0));
        let (_, _, engines) = run(&node, 15);
        assert_eq!(engines[1].state, EngineState::Warm);
    }

    #[test]
    fn driven_engine_reports_what_was_pushed_and_removal_frees_its_gpus() {
        let mut cfg = config();
        cfg.engines.clear();
        let node = FakeNode::new(&cfg, "node-a").expect("valid");
        let handle = node.handle();
        let gpu = handle.free_gpus()[0].clone();
        let pod = PodRef::new("demo", "chat-0");
        let mut sample = EngineSample::empty(pod.clone(), Framework::Fake, "chat", Timestamp(0));
        sample.gpu_uuids = vec![gpu.clone()];
        sample.state = EngineState::Warm;
        sample.requests_running = Some(128.0);
        sample.batch_limit = Some(256);
        handle.upsert_engine(sample);
        assert!(handle.update_engine(&pod, |s| s.requests_waiting = Some(3.0)));
        let (gpus, pods, engines) = run(&node, 2);
        assert_eq!(engines.len(), 1);
        assert_eq!(engines[0].requests_waiting, Some(3.0));
        assert_eq!(engines[0].sampled_at, Timestamp::from_millis(1_002_000));
        assert_eq!(pods[0].gpu_uuids(), vec![gpu.clone()]);
        assert!(gpus[0].metrics.power_watts.expect("power") > 0.3 * 700.0);
        assert!(handle.remove_engine(&pod));
        assert_eq!(handle.free_gpus().len(), 4);
        let (_, pods, engines) = run(&node, 1);
        assert!(pods.is_empty() && engines.is_empty());
    }

    #[test]
    fn injected_failures_fail_exactly_that_many_rounds() {
        let node = FakeNode::new(&config(), "node-a").expect("valid");
        node.handle().fail_next(FakeSourceKind::Gpus, 2);
        let mut g = node.gpu_source();
        let t = Timestamp(0);
        assert_eq!(
            futures_ready(g.sample_gpus(t)).expect_err("1").kind,
            "injected"
        );
        assert!(futures_ready(g.sample_gpus(t)).is_err());
        assert!(futures_ready(g.sample_gpus(t)).is_ok());
    }

    #[test]
    fn bad_config_names_the_field_and_the_limit() {
        let mut cfg = config();
        cfg.engines[1].gpus = 4;
        let e = cfg.validate().expect_err("too many GPUs");
        assert!(e.message.contains("engines[1].gpus"), "{e}");
        assert!(e.message.contains("the node has 4 GPUs"), "{e}");

        let mut cfg = config();
        cfg.load.points[1].at_seconds = 0.0;
        let e = cfg.validate().expect_err("not increasing");
        assert!(e.message.contains("load.points[1].at_seconds"), "{e}");

        let mut cfg = config();
        cfg.load.noise = 2.0;
        assert!(
            cfg.validate()
                .expect_err("noise")
                .message
                .contains("load.noise")
        );
    }

    #[test]
    fn load_curve_interpolates_and_repeats() {
        let mut curve = config().load;
        assert_eq!(curve.rate_at(30.0), 6.0);
        assert_eq!(curve.rate_at(90.0), 8.0);
        curve.repeat = true;
        assert_eq!(curve.rate_at(90.0), 6.0);
        assert_eq!(FakeLoadCurve::default().rate_at(10.0), 0.0);
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let e =
            serde_json::from_str::<FakeNodeConfig>(r#"{"gpus": [{"count": 2, "colour": "red"}]}"#)
                .expect_err("unknown field");
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
