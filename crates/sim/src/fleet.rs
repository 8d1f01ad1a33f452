//! The simulated fleet: replicas with continuous batching, a router, replica
//! lifecycles, and the engine-side counters a real deployment exports.
//!
//! **Engine model** (one replica, vLLM-like): requests wait in a FIFO queue;
//! a request is admitted when the running batch is below the batch limit and
//! its whole KV footprint (prompt + output tokens) fits in the free KV
//! capacity (no preemption is modelled). An iteration that admits requests
//! is a *mixed* iteration: it prefills the admitted prompts (`p(ΣT)` with the
//! quadratic term per prompt, up to a prefill token budget) and runs one
//! decode step of the running batch; it lasts `prefill + t(B, L)` and emits
//! the first token of every admitted request. Without admissions the replica
//! runs *decode steps* `t(B, L) = a + b·B + c·ΣL`, where the summed context
//! `ΣL` grows by `B` tokens per step, so step `k` of a run lasts `α + β·k`.
//! The batch only changes at admissions and completions, so a run of steps
//! is advanced in closed form: the time of `n` steps is `n·α + β·n(n−1)/2`,
//! and the steps done by time `Δ` solve the quadratic. Nothing is done per
//! token.
//!
//! **Lifecycle**: pending (waiting for a node) → loading (cold start) →
//! ready (routable) → draining (out of routing, finishing its work, aborted
//! after an optional grace period) → gone. GPU time counts from creation to
//! deletion.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use gpuscale_core::histogram::{ITL_BOUNDS_SECONDS, TPOT_BOUNDS_SECONDS, TTFT_BOUNDS_SECONDS};
use gpuscale_policy::PerfModel;

use crate::profile::Coefficients;
use crate::rng::SimRng;
use crate::stats::Recorder;
use crate::trace::Request;

/// Number of TTFT buckets (finite bounds plus `+Inf`).
pub(crate) const TTFT_BUCKETS: usize = TTFT_BOUNDS_SECONDS.len() + 1;
/// Number of ITL buckets (finite bounds plus `+Inf`).
pub(crate) const ITL_BUCKETS: usize = ITL_BOUNDS_SECONDS.len() + 1;
/// Number of per-request TPOT buckets (finite bounds plus `+Inf`).
pub(crate) const TPOT_BUCKETS: usize = TPOT_BOUNDS_SECONDS.len() + 1;

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Pending,
    Loading,
    Ready,
    Draining,
    Gone,
}

/// How long a new replica takes from creation to ready.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColdStart {
    Fixed(f64),
    /// Uniform between the two bounds, drawn per replica from the run's seed.
    Uniform(f64, f64),
}

impl ColdStart {
    /// The longest cold start the distribution can draw.
    pub fn max_s(&self) -> f64 {
        match *self {
            ColdStart::Fixed(s) => s,
            ColdStart::Uniform(_, hi) => hi,
        }
    }
    pub(crate) fn mean_s(&self) -> f64 {
        match *self {
            ColdStart::Fixed(s) => s,
            ColdStart::Uniform(lo, hi) => 0.5 * (lo + hi),
        }
    }
}

/// Which ready replicas go first on scale-in when the autoscaler names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VictimOrder {
    /// The ReplicaSet's order (REFERENCE.md §7.3): not-ready first, then the
    /// shortest time ready (newest) first.
    Kubernetes,
    /// The least work in flight first (gpuscale, the oracle).
    LeastWork,
}

/// The fleet's fixed parameters.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub perf: PerfModel,
    /// Most prompt tokens one mixed iteration prefills (a longer single
    /// prompt is still admitted alone). vLLM's `max_num_batched_tokens`.
    pub prefill_token_budget: u32,
    /// Time from creation until a node is found (pending).
    pub pending_s: f64,
    pub cold_start: ColdStart,
    /// Draining replicas abort what is left after this long; `None` waits
    /// for every in-flight request.
    pub drain_grace_s: Option<f64>,
    pub victim_order: VictimOrder,
    /// GPU time is counted up to this instant (the end of the trace).
    pub horizon_s: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy)]
struct Req {
    /// At the router (the client's clock: its TTFT counts from here).
    arrival: f64,
    /// Sent to a replica (the engine's clock: its TTFT histogram counts
    /// from here, as an engine times a request from when it receives it;
    /// the same as `arrival` unless the request was held at the router).
    dispatched: f64,
    first_token: f64,
    join_step: u64,
    input: u32,
    output: u32,
    /// Held at the router for lack of a ready replica (a cold-start hit).
    held: bool,
}

type Slot = u32;

#[derive(Debug, Clone, Copy)]
enum Phase {
    Idle,
    /// Prefill of `prefilling` plus one decode step of the running batch.
    Mixed {
        start: f64,
    },
    /// Decode steps from `start`; step `k` lasts `alpha + beta·k`; the run
    /// ends after `target` steps (at the next completion or an interruption).
    Decode {
        start: f64,
        alpha: f64,
        beta: f64,
        target: u64,
        interrupted: bool,
    },
}

/// Cumulative engine counters of one replica, as its `/metrics` would show.
#[derive(Debug, Clone, Copy)]
pub struct EngineCounters {
    /// Requests routed to the replica.
    pub received: u64,
    pub success: u64,
    pub aborted: u64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: u64,
    /// Tokens generated (first tokens included), as of the last event.
    pub generation_tokens: u64,
    pub ttft_buckets: [u64; TTFT_BUCKETS],
    pub ttft_sum: f64,
    pub itl_buckets: [u64; ITL_BUCKETS],
    pub itl_sum: f64,
    /// Per-request time per output token of completed requests with more
    /// than one output token (vLLM's `request_time_per_output_token_seconds`).
    pub tpot_buckets: [u64; TPOT_BUCKETS],
    pub tpot_sum: f64,
    /// Sum of end-to-end latency of completed requests.
    pub e2e_sum: f64,
    /// Prompt and output tokens of completed requests.
    pub completed_prompt_tokens: u64,
    pub completed_output_tokens: u64,
    /// Seconds with an iteration in progress (the GPU duty cycle's source).
    pub busy_s: f64,
    /// Request-seconds at the replica: the integral over time of its
    /// requests queued, prefilling or decoding, each from dispatch to
    /// completion or abort (over an interval, its increase is the
    /// time-averaged concurrency a proxy in front of the engine reports,
    /// as Knative's queue-proxy does).
    pub concurrency_s: f64,
}

impl Default for EngineCounters {
    fn default() -> Self {
        Self {
            received: 0,
            success: 0,
            aborted: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            ttft_buckets: [0; TTFT_BUCKETS],
            ttft_sum: 0.0,
            itl_buckets: [0; ITL_BUCKETS],
            itl_sum: 0.0,
            tpot_buckets: [0; TPOT_BUCKETS],
            tpot_sum: 0.0,
            e2e_sum: 0.0,
            completed_prompt_tokens: 0,
            completed_output_tokens: 0,
            busy_s: 0.0,
            concurrency_s: 0.0,
        }
    }
}

impl EngineCounters {
    /// Adds `other`'s counts (an engine whose counters continue across
    /// replicas of the same pod).
    pub fn accumulate(&mut self, other: &EngineCounters) {
        self.received += other.received;
        self.success += other.success;
        self.aborted += other.aborted;
        self.prompt_tokens += other.prompt_tokens;
        self.generation_tokens += other.generation_tokens;
        for (a, b) in self.ttft_buckets.iter_mut().zip(&other.ttft_buckets) {
            *a += b;
        }
        self.ttft_sum += other.ttft_sum;
        for (a, b) in self.itl_buckets.iter_mut().zip(&other.itl_buckets) {
            *a += b;
        }
        self.itl_sum += other.itl_sum;
        for (a, b) in self.tpot_buckets.iter_mut().zip(&other.tpot_buckets) {
            *a += b;
        }
        self.tpot_sum += other.tpot_sum;
        self.e2e_sum += other.e2e_sum;
        self.completed_prompt_tokens += other.completed_prompt_tokens;
        self.completed_output_tokens += other.completed_output_tokens;
        self.busy_s += other.busy_s;
        self.concurrency_s += other.concurrency_s;
    }
}

/// One replica: its lifecycle, its engine queue and batch, its counters.
#[derive(Debug, Clone)]
pub struct Replica {
    pub id: u32,
    pub state: Lifecycle,
    pub created_at: f64,
    pub ready_at: f64,
    pub drain_at: f64,
    gone_at: f64,
    cold_start_s: f64,
    batch_limit: u32,
    waiting: VecDeque<Slot>,
    waiting_prompt_tokens: u64,
    prefilling: Vec<Slot>,
    running: BinaryHeap<Reverse<(u64, Slot)>>,
    kv_reserved: u64,
    /// `Σ (input + 1 − join_step)` over the running batch: the summed
    /// context is `ctx_base + B·steps`.
    ctx_base: i64,
    steps: u64,
    phase: Phase,
    epoch: u32,
    busy_since: f64,
    /// Σ dispatch time of the requests here (for `counters.concurrency_s`).
    dispatched_sum: f64,
    pub counters: EngineCounters,
}

impl Replica {
    /// Requests queued, prefilling or decoding here.
    pub(crate) fn outstanding(&self) -> usize {
        self.waiting.len() + self.prefilling.len() + self.running.len()
    }
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }
    pub fn waiting_prompt_tokens(&self) -> u64 {
        self.waiting_prompt_tokens
    }
    /// Requests in the running batch (prefilling ones included, as vLLM counts them).
    pub fn running_len(&self) -> usize {
        self.running.len() + self.prefilling.len()
    }
    pub fn batch_limit(&self) -> u32 {
        self.batch_limit
    }
    pub fn cold_start_s(&self) -> f64 {
        self.cold_start_s
    }
}

/// What one replica looks like at one instant (gauges exact, counters
/// advanced analytically to that instant).
#[derive(Debug, Clone)]
pub struct ReplicaSample {
    pub id: u32,
    pub state: Lifecycle,
    pub created_at: f64,
    pub ready_at: f64,
    pub waiting: u32,
    pub running: u32,
    pub queued_prompt_tokens: u64,
    /// KV tokens in use (contexts of running and prefilling requests).
    pub kv_used_tokens: f64,
    pub kv_usage_ratio: f64,
    /// KV tokens reserved by admitted requests (prompt + full output).
    pub kv_reserved_tokens: u64,
    pub mean_context_tokens: f64,
    pub batch_limit: u32,
    pub counters: EngineCounters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EvKind {
    Iteration = 0,
    Loading = 1,
    Ready = 2,
    DrainDeadline = 3,
}

type Event = Reverse<(u64, u64, u32, u32, EvKind)>;

/// A counted scale change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleEvent {
    pub at: f64,
    pub from: u32,
    pub to: u32,
}

/// The fleet: replicas, router, event queue and the run's recorder.
#[derive(Debug, Clone)]
pub struct Fleet {
    cfg: FleetConfig,
    /// Perf coefficients, copied for the hot path.
    k: Coefficients,
    kv_cap: u64,
    max_batch: u32,
    published_limit: Option<u32>,
    replicas: Vec<Replica>,
    /// Ids of routable replicas, in creation order.
    ready_ids: Vec<u32>,
    /// Ids of replicas not yet gone, in creation order.
    live_ids: Vec<u32>,
    reqs: Vec<Req>,
    free: Vec<Slot>,
    heap: BinaryHeap<Event>,
    seq: u64,
    router_queue: VecDeque<Slot>,
    now: f64,
    rng: SimRng,
    /// Requests waiting anywhere (router and engine queues).
    waiting_total: u64,
    pub max_waiting: u64,
    gpu_seconds: f64,
    pub scale_events: Vec<ScaleEvent>,
    /// The count the scale target asks for (pending + loading + ready).
    spec_replicas: u32,
    pub recorder: Recorder,
    /// Requests received at the router (the ingress counter; counts at zero replicas too).
    pub ingress_total: u64,
    /// Oracle replays reuse the slots of gone replicas (their history is not reported).
    recycle: bool,
    gone_ids: Vec<u32>,
}

impl Fleet {
    /// A fleet with `initial_ready` replicas ready at time 0.
    pub fn new(cfg: FleetConfig, initial_ready: u32, recorder: Recorder) -> Self {
        let p = &cfg.perf;
        let rng = SimRng::new(cfg.seed, 31);
        let mut f = Fleet {
            k: Coefficients::of(p),
            kv_cap: p.kv_capacity_tokens.max(1.0) as u64,
            max_batch: p.max_batch.max(1),
            published_limit: None,
            cfg,
            replicas: Vec::new(),
            ready_ids: Vec::new(),
            live_ids: Vec::new(),
            reqs: Vec::new(),
            free: Vec::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            router_queue: VecDeque::new(),
            now: 0.0,
            rng,
            waiting_total: 0,
            max_waiting: 0,
            gpu_seconds: 0.0,
            scale_events: Vec::new(),
            spec_replicas: 0,
            recorder,
            ingress_total: 0,
            recycle: false,
            gone_ids: Vec::new(),
        };
        for _ in 0..initial_ready {
            f.create_replica(0.0, true);
        }
        f.spec_replicas = initial_ready;
        f
    }

    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }
    pub fn now(&self) -> f64 {
        self.now
    }
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }
    pub(crate) fn live_ids(&self) -> &[u32] {
        &self.live_ids
    }
    pub fn ready_count(&self) -> u32 {
        self.ready_ids.len() as u32
    }
    pub fn spec_replicas(&self) -> u32 {
        self.spec_replicas
    }
    pub fn router_queue_len(&self) -> usize {
        self.router_queue.len()
    }
    pub fn waiting_total(&self) -> u64 {
        self.waiting_total
    }
    /// The batch limit the autoscaler published, if any.
    pub(crate) fn published_batch_limit(&self) -> Option<u32> {
        self.published_limit
    }

    /// Counts of live replicas by state: (pending, loading, ready, draining).
    pub(crate) fn state_counts(&self) -> (u32, u32, u32, u32) {
        let mut c = (0, 0, 0, 0);
        for &id in &self.live_ids {
            match self.replicas[id as usize].state {
                Lifecycle::Pending => c.0 += 1,
                Lifecycle::Loading => c.1 += 1,
                Lifecycle::Ready => c.2 += 1,
                Lifecycle::Draining => c.3 += 1,
                Lifecycle::Gone => {}
            }
        }
        c
    }

    fn effective_limit(&self) -> u32 {
        match self.published_limit {
            Some(l) => l.clamp(1, self.max_batch),
            None => self.max_batch,
        }
    }

    #[inline]
    fn push_event(&mut self, t: f64, kind: EvKind, replica: u32, epoch: u32) {
        self.seq += 1;
        self.heap.push(Reverse((
            t.max(0.0).to_bits(),
            self.seq,
            replica,
            epoch,
            kind,
        )));
    }

    /// A new replica: pending (then loading, then ready by events), or
    /// ready at once when `ready_now` (the initial fleet, oracle replays).
    fn create_replica(&mut self, now: f64, ready_now: bool) -> u32 {
        let id = self.replicas.len() as u32;
        let cold = match self.cfg.cold_start {
            ColdStart::Fixed(s) => s,
            ColdStart::Uniform(lo, hi) => lo + (hi - lo) * self.rng.uniform(),
        };
        let limit = self.effective_limit();
        self.replicas.push(Replica {
            id,
            state: Lifecycle::Pending,
            created_at: now,
            ready_at: f64::NAN,
            drain_at: f64::NAN,
            gone_at: f64::NAN,
            cold_start_s: cold,
            batch_limit: limit,
            waiting: VecDeque::new(),
            waiting_prompt_tokens: 0,
            prefilling: Vec::new(),
            running: BinaryHeap::new(),
            kv_reserved: 0,
            ctx_base: 0,
            steps: 0,
            phase: Phase::Idle,
            epoch: 0,
            busy_since: f64::NAN,
            dispatched_sum: 0.0,
            counters: EngineCounters::default(),
        });
        self.live_ids.push(id);
        if ready_now {
            let r = &mut self.replicas[id as usize];
            r.state = Lifecycle::Ready;
            r.ready_at = now;
            self.ready_ids.push(id);
        } else {
            self.push_event(now + self.cfg.pending_s.max(0.0), EvKind::Loading, id, 0);
        }
        id
    }

    /// Time of the next internal event, if any.
    pub fn next_event_time(&self) -> Option<f64> {
        self.heap.peek().map(|Reverse(e)| f64::from_bits(e.0))
    }

    /// Process every internal event up to and including `t`, then set the clock to `t`.
    pub fn advance_to(&mut self, t: f64) {
        while let Some(Reverse(top)) = self.heap.peek() {
            let et = f64::from_bits(top.0);
            if et > t {
                break;
            }
            let Some(Reverse((_, _, id, epoch, kind))) = self.heap.pop() else {
                break;
            };
            self.now = et;
            self.handle(kind, id, epoch);
        }
        if t > self.now {
            self.now = t;
        }
    }

    /// Process every remaining event (used after the last arrival).
    pub(crate) fn run_to_completion(&mut self) {
        while let Some(Reverse((bits, _, id, epoch, kind))) = self.heap.pop() {
            self.now = f64::from_bits(bits);
            self.handle(kind, id, epoch);
        }
    }

    fn handle(&mut self, kind: EvKind, id: u32, epoch: u32) {
        let now = self.now;
        match kind {
            EvKind::Iteration => {
                let r = &self.replicas[id as usize];
                if r.epoch != epoch || r.state == Lifecycle::Gone {
                    return;
                }
                self.end_iteration(id, now);
            }
            EvKind::Loading => {
                let r = &mut self.replicas[id as usize];
                if r.state != Lifecycle::Pending {
                    return;
                }
                r.state = Lifecycle::Loading;
                let at = now + r.cold_start_s;
                self.push_event(at, EvKind::Ready, id, 0);
            }
            EvKind::Ready => {
                let r = &mut self.replicas[id as usize];
                if r.state != Lifecycle::Loading {
                    return;
                }
                r.state = Lifecycle::Ready;
                r.ready_at = now;
                self.ready_ids.push(id);
                // Requests held at the router go to the new capacity.
                while let Some(slot) = self.router_queue.pop_front() {
                    self.waiting_total -= 1;
                    self.route_slot(slot, now);
                }
            }
            EvKind::DrainDeadline => {
                let r = &self.replicas[id as usize];
                if r.state != Lifecycle::Draining {
                    return;
                }
                self.abort_all(id, now);
                self.set_gone(id, now);
            }
        }
    }

    /// A request arrives at the router at `req.arrival_s` (the clock must be there).
    #[inline]
    pub fn arrive(&mut self, req: &Request) {
        let now = req.arrival_s.max(self.now);
        self.now = now;
        self.ingress_total += 1;
        self.recorder.on_arrival(req.arrival_s, req.input_tokens);
        let total = u64::from(req.input_tokens) + u64::from(req.output_tokens);
        if total > self.kv_cap {
            // It can never fit in one replica's KV cache: rejected.
            self.recorder.on_drop(req.arrival_s);
            return;
        }
        let slot = match self.free.pop() {
            Some(s) => {
                self.reqs[s as usize] = Req {
                    arrival: req.arrival_s,
                    dispatched: req.arrival_s,
                    first_token: f64::NAN,
                    join_step: 0,
                    input: req.input_tokens,
                    output: req.output_tokens,
                    held: false,
                };
                s
            }
            None => {
                self.reqs.push(Req {
                    arrival: req.arrival_s,
                    dispatched: req.arrival_s,
                    first_token: f64::NAN,
                    join_step: 0,
                    input: req.input_tokens,
                    output: req.output_tokens,
                    held: false,
                });
                (self.reqs.len() - 1) as Slot
            }
        };
        self.route_slot(slot, now);
    }

    fn route_slot(&mut self, slot: Slot, now: f64) {
        self.waiting_total += 1;
        if self.waiting_total > self.max_waiting {
            self.max_waiting = self.waiting_total;
        }
        // Least outstanding requests; ties go to the oldest replica.
        let mut best = u32::MAX;
        let mut best_load = usize::MAX;
        for &id in &self.ready_ids {
            let load = self.replicas[id as usize].outstanding();
            if load < best_load {
                best_load = load;
                best = id;
                if load == 0 {
                    break;
                }
            }
        }
        if best == u32::MAX {
            self.reqs[slot as usize].held = true;
            self.router_queue.push_back(slot);
            return;
        }
        let q = &mut self.reqs[slot as usize];
        q.dispatched = now;
        let input = q.input;
        let r = &mut self.replicas[best as usize];
        r.counters.received += 1;
        r.dispatched_sum += now;
        r.waiting.push_back(slot);
        r.waiting_prompt_tokens += u64::from(input);
        match r.phase {
            Phase::Idle => self.start_iteration(best, now),
            Phase::Decode { .. } => self.maybe_interrupt(best, now),
            Phase::Mixed { .. } => {}
        }
    }

    #[inline]
    fn can_admit(&self, r: &Replica, slot: Slot) -> bool {
        let q = &self.reqs[slot as usize];
        (r.running.len() + r.prefilling.len()) < r.batch_limit as usize
            && r.kv_reserved + u64::from(q.input) + u64::from(q.output) <= self.kv_cap
    }

    /// A decoding replica with an admissible request at the head of its
    /// queue ends its run at the next step boundary.
    fn maybe_interrupt(&mut self, id: u32, now: f64) {
        let r = &self.replicas[id as usize];
        let Phase::Decode {
            start,
            alpha,
            beta,
            target,
            interrupted,
        } = r.phase
        else {
            return;
        };
        if interrupted {
            return;
        }
        let Some(&head) = r.waiting.front() else {
            return;
        };
        if !self.can_admit(r, head) {
            return;
        }
        let done = steps_within(alpha, beta, now - start);
        let boundary = done + 1;
        if boundary >= target {
            // The run already ends at or before the next boundary.
            let r = &mut self.replicas[id as usize];
            if let Phase::Decode { interrupted, .. } = &mut r.phase {
                *interrupted = true;
            }
            return;
        }
        let end = start + run_time(alpha, beta, boundary);
        let r = &mut self.replicas[id as usize];
        r.epoch = r.epoch.wrapping_add(1);
        r.phase = Phase::Decode {
            start,
            alpha,
            beta,
            target: boundary,
            interrupted: true,
        };
        let epoch = r.epoch;
        self.push_event(end, EvKind::Iteration, id, epoch);
    }

    /// The replica is at an iteration boundary: admit, then start the next
    /// iteration (mixed or decode), or go idle.
    fn start_iteration(&mut self, id: u32, now: f64) {
        let budget = u64::from(self.cfg.prefill_token_budget.max(1));
        let kv_cap = self.kv_cap;
        let r = &mut self.replicas[id as usize];
        let mut admitted_tokens: u64 = 0;
        let mut sq: f64 = 0.0;
        let mut admitted = 0u64;
        while let Some(&head) = r.waiting.front() {
            let q = &self.reqs[head as usize];
            let need = u64::from(q.input) + u64::from(q.output);
            let fits = (r.running.len() + r.prefilling.len()) < r.batch_limit as usize
                && r.kv_reserved + need <= kv_cap
                && (admitted_tokens == 0 || admitted_tokens + u64::from(q.input) <= budget);
            if !fits {
                break;
            }
            r.waiting.pop_front();
            r.waiting_prompt_tokens -= u64::from(q.input);
            r.kv_reserved += need;
            admitted_tokens += u64::from(q.input);
            let t = f64::from(q.input);
            sq += t * t;
            r.prefilling.push(head);
            admitted += 1;
        }
        self.waiting_total -= admitted;
        let busy_start = r.busy_since.is_nan();
        if !r.prefilling.is_empty() {
            let bsz = r.running.len() as f64;
            let step = if bsz > 0.0 {
                let s = (r.ctx_base + r.running.len() as i64 * r.steps as i64) as f64;
                self.k.step(bsz, s)
            } else {
                0.0
            };
            let prefill = self.k.pe + self.k.pf * admitted_tokens as f64 + self.k.pg * sq;
            r.phase = Phase::Mixed { start: now };
            if busy_start {
                r.busy_since = now;
            }
            r.epoch = r.epoch.wrapping_add(1);
            let epoch = r.epoch;
            self.push_event(now + prefill + step, EvKind::Iteration, id, epoch);
        } else if let Some(Reverse((next_done, _))) = r.running.peek() {
            let bsz = r.running.len() as f64;
            let s = (r.ctx_base + r.running.len() as i64 * r.steps as i64) as f64;
            let alpha = self.k.step(bsz, s);
            let beta = self.k.c * bsz;
            let target = next_done.saturating_sub(r.steps).max(1);
            r.phase = Phase::Decode {
                start: now,
                alpha,
                beta,
                target,
                interrupted: false,
            };
            if busy_start {
                r.busy_since = now;
            }
            r.epoch = r.epoch.wrapping_add(1);
            let epoch = r.epoch;
            self.push_event(
                now + run_time(alpha, beta, target),
                EvKind::Iteration,
                id,
                epoch,
            );
        } else {
            r.phase = Phase::Idle;
            if !busy_start {
                r.counters.busy_s += now - r.busy_since;
                r.busy_since = f64::NAN;
            }
            if r.state == Lifecycle::Draining && r.waiting.is_empty() {
                self.set_gone(id, now);
            }
        }
    }

    fn end_iteration(&mut self, id: u32, now: f64) {
        let r = &mut self.replicas[id as usize];
        match r.phase {
            Phase::Idle => return,
            Phase::Mixed { start } => {
                let bsz = r.running.len() as u64;
                if bsz > 0 {
                    r.steps += 1;
                    r.counters.generation_tokens += bsz;
                    let gap = now - start;
                    observe_itl_n(&mut r.counters, gap, bsz);
                    self.recorder.on_itl(gap, bsz);
                }
                let steps = r.steps;
                // Admitted prompts emit their first token now.
                for i in 0..r.prefilling.len() {
                    let slot = r.prefilling[i];
                    let q = &mut self.reqs[slot as usize];
                    q.first_token = now;
                    q.join_step = steps;
                    let ttft = now - q.dispatched;
                    r.counters.prompt_tokens += u64::from(q.input);
                    r.counters.generation_tokens += 1;
                    r.counters.ttft_buckets[bucket(TTFT_BOUNDS_SECONDS, ttft)] += 1;
                    r.counters.ttft_sum += ttft;
                    let remaining = u64::from(q.output) - 1;
                    r.ctx_base += i64::from(q.input) + 1 - steps as i64;
                    r.running.push(Reverse((steps + remaining, slot)));
                }
                r.prefilling.clear();
            }
            Phase::Decode { start, target, .. } => {
                let bsz = r.running.len() as u64;
                r.steps += target;
                r.counters.generation_tokens += bsz * target;
                let mean_gap = (now - start) / target as f64;
                observe_itl_n(&mut r.counters, mean_gap, bsz * target);
                self.recorder.on_itl(mean_gap, bsz * target);
            }
        }
        // Completions.
        let steps = r.steps;
        while let Some(&Reverse((done, slot))) = r.running.peek() {
            if done > steps {
                break;
            }
            r.running.pop();
            let q = self.reqs[slot as usize];
            r.kv_reserved -= u64::from(q.input) + u64::from(q.output);
            r.ctx_base -= i64::from(q.input) + 1 - q.join_step as i64;
            let e2e = now - q.arrival;
            r.dispatched_sum -= q.dispatched;
            r.counters.concurrency_s += now - q.dispatched;
            r.counters.success += 1;
            r.counters.e2e_sum += e2e;
            r.counters.completed_prompt_tokens += u64::from(q.input);
            r.counters.completed_output_tokens += u64::from(q.output);
            let ttft = q.first_token - q.arrival;
            let tpot = (q.output > 1).then(|| {
                let tpot = (now - q.first_token) / f64::from(q.output - 1);
                r.counters.tpot_buckets[bucket(TPOT_BOUNDS_SECONDS, tpot)] += 1;
                r.counters.tpot_sum += tpot;
                tpot
            });
            self.recorder
                .on_complete(q.arrival, q.input, ttft, tpot, q.held);
            self.free.push(slot);
        }
        self.start_iteration(id, now);
    }

    fn abort_all(&mut self, id: u32, now: f64) {
        let r = &mut self.replicas[id as usize];
        let mut n = 0u64;
        let mut aborted_arrivals: Vec<f64> = Vec::new();
        for slot in r.waiting.drain(..) {
            aborted_arrivals.push(self.reqs[slot as usize].arrival);
            self.free.push(slot);
            n += 1;
        }
        self.waiting_total -= n;
        r.waiting_prompt_tokens = 0;
        for slot in r.prefilling.drain(..) {
            aborted_arrivals.push(self.reqs[slot as usize].arrival);
            self.free.push(slot);
        }
        for Reverse((_, slot)) in r.running.drain() {
            aborted_arrivals.push(self.reqs[slot as usize].arrival);
            self.free.push(slot);
        }
        r.counters.aborted += aborted_arrivals.len() as u64;
        let outstanding = aborted_arrivals.len() as f64;
        r.counters.concurrency_s += outstanding * now - r.dispatched_sum;
        r.dispatched_sum = 0.0;
        r.kv_reserved = 0;
        r.ctx_base = 0;
        if !r.busy_since.is_nan() {
            r.counters.busy_s += now - r.busy_since;
            r.busy_since = f64::NAN;
        }
        r.phase = Phase::Idle;
        r.epoch = r.epoch.wrapping_add(1);
        for a in aborted_arrivals {
            self.recorder.on_drop(a);
        }
    }

    fn set_gone(&mut self, id: u32, now: f64) {
        let gpus = f64::from(self.cfg.perf.gpus_per_replica.max(1));
        let horizon = self.cfg.horizon_s;
        let r = &mut self.replicas[id as usize];
        if r.state == Lifecycle::Gone {
            return;
        }
        if r.state == Lifecycle::Ready {
            self.ready_ids.retain(|&x| x != id);
        }
        r.state = Lifecycle::Gone;
        r.gone_at = now;
        r.epoch = r.epoch.wrapping_add(1);
        let paid = (now.min(horizon) - r.created_at).max(0.0);
        self.gpu_seconds += paid * gpus;
        self.live_ids.retain(|&x| x != id);
        // Release queue and batch storage of a replica that will never run again.
        r.waiting = VecDeque::new();
        r.prefilling = Vec::new();
        r.running = BinaryHeap::new();
        if self.recycle {
            self.gone_ids.push(id);
        }
    }

    /// GPU-seconds paid so far, counting live replicas up to `min(now, horizon)`.
    pub fn gpu_seconds(&self, now: f64) -> f64 {
        let gpus = f64::from(self.cfg.perf.gpus_per_replica.max(1));
        let until = now.min(self.cfg.horizon_s);
        let live: f64 = self
            .live_ids
            .iter()
            .map(|&id| (until - self.replicas[id as usize].created_at).max(0.0))
            .sum();
        self.gpu_seconds + live * gpus
    }

    /// Publish a batch limit to every replica (and the ones created later).
    pub fn set_batch_limit(&mut self, limit: Option<u32>, now: f64) {
        if self.published_limit == limit {
            return;
        }
        self.published_limit = limit;
        let eff = self.effective_limit();
        let ids = self.live_ids.clone();
        for id in ids {
            let r = &mut self.replicas[id as usize];
            let raised = eff > r.batch_limit;
            r.batch_limit = eff;
            if raised {
                match r.phase {
                    Phase::Idle if !r.waiting.is_empty() => self.start_iteration(id, now),
                    Phase::Decode { .. } => self.maybe_interrupt(id, now),
                    _ => {}
                }
            }
        }
    }

    /// Set the scale target to `desired` replicas (pending + loading + ready).
    /// On scale-in, not-ready replicas go first (newest first), then ready
    /// ones in `victims` order, then the fleet's [`VictimOrder`].
    pub fn scale_to(&mut self, desired: u32, victims: &[u32], now: f64) {
        let current = self.spec_replicas;
        if desired == current {
            return;
        }
        self.scale_events.push(ScaleEvent {
            at: now,
            from: current,
            to: desired,
        });
        self.spec_replicas = desired;
        if desired > current {
            for _ in current..desired {
                self.create_replica(now, false);
            }
            return;
        }
        let mut to_remove = current - desired;
        // Not ready first: pending, then loading, newest first.
        for state in [Lifecycle::Pending, Lifecycle::Loading] {
            let ids: Vec<u32> = self
                .live_ids
                .iter()
                .rev()
                .copied()
                .filter(|&id| self.replicas[id as usize].state == state)
                .collect();
            for id in ids {
                if to_remove == 0 {
                    return;
                }
                self.set_gone(id, now);
                to_remove -= 1;
            }
        }
        // Ready replicas: the autoscaler's choice first.
        for &v in victims {
            if to_remove == 0 {
                return;
            }
            if self
                .replicas
                .get(v as usize)
                .is_some_and(|r| r.state == Lifecycle::Ready)
            {
                self.start_drain(v, now);
                to_remove -= 1;
            }
        }
        while to_remove > 0 {
            let pick = match self.cfg.victim_order {
                VictimOrder::Kubernetes => self.ready_ids.iter().copied().max_by(|&x, &y| {
                    let (rx, ry) = (&self.replicas[x as usize], &self.replicas[y as usize]);
                    rx.ready_at.total_cmp(&ry.ready_at).then(x.cmp(&y))
                }),
                VictimOrder::LeastWork => self.ready_ids.iter().copied().min_by(|&x, &y| {
                    let (rx, ry) = (&self.replicas[x as usize], &self.replicas[y as usize]);
                    rx.outstanding().cmp(&ry.outstanding()).then(y.cmp(&x))
                }),
            };
            let Some(id) = pick else { break };
            self.start_drain(id, now);
            to_remove -= 1;
        }
    }

    /// Add one replica for a pod that a caller's cluster created (the
    /// demo's fake Kubernetes): pending for `pending_s`, then loading for a
    /// drawn cold start, then ready; or ready at once when `ready_now`.
    /// Returns its id. The per-replica calls ([`Fleet::add_replica`],
    /// [`Fleet::drain_replica`], [`Fleet::undrain_replica`],
    /// [`Fleet::remove_replica`]) leave `spec_replicas` and the scale events
    /// to the caller; they do not mix with [`Fleet::scale_to`].
    pub fn add_replica(&mut self, now: f64, ready_now: bool) -> u32 {
        let id = self.create_replica(now, ready_now);
        if ready_now {
            // Requests held at the router go to the new capacity.
            while let Some(slot) = self.router_queue.pop_front() {
                self.waiting_total -= 1;
                self.route_slot(slot, now);
            }
        }
        id
    }

    /// Take replica `id` out of routing: a ready one finishes what it holds
    /// and is then gone (at once when it holds nothing); a pending or
    /// loading one is gone at once. Returns whether anything changed.
    pub fn drain_replica(&mut self, id: u32, now: f64) -> bool {
        match self.replicas.get(id as usize).map(|r| r.state) {
            Some(Lifecycle::Ready) => {
                self.start_drain(id, now);
                true
            }
            Some(Lifecycle::Pending | Lifecycle::Loading) => {
                self.set_gone(id, now);
                true
            }
            _ => false,
        }
    }

    /// Put draining replica `id` back into routing. Returns false when it
    /// is not draining (never drained, or already gone).
    pub fn undrain_replica(&mut self, id: u32, now: f64) -> bool {
        let Some(r) = self.replicas.get_mut(id as usize) else {
            return false;
        };
        if r.state != Lifecycle::Draining {
            return false;
        }
        r.state = Lifecycle::Ready;
        r.drain_at = f64::NAN;
        self.ready_ids.push(id);
        while let Some(slot) = self.router_queue.pop_front() {
            self.waiting_total -= 1;
            self.route_slot(slot, now);
        }
        true
    }

    /// Remove replica `id` now (its pod was deleted): requests it still
    /// holds are aborted and recorded as dropped. Returns how many.
    pub fn remove_replica(&mut self, id: u32, now: f64) -> u64 {
        match self.replicas.get(id as usize).map(|r| r.state) {
            None | Some(Lifecycle::Gone) => 0,
            Some(_) => {
                let held = self.replicas[id as usize].outstanding() as u64;
                self.abort_all(id, now);
                self.set_gone(id, now);
                held
            }
        }
    }

    fn start_drain(&mut self, id: u32, now: f64) {
        self.ready_ids.retain(|&x| x != id);
        let r = &mut self.replicas[id as usize];
        r.state = Lifecycle::Draining;
        r.drain_at = now;
        if r.outstanding() == 0 {
            self.set_gone(id, now);
            return;
        }
        if let Some(grace) = self.cfg.drain_grace_s {
            self.push_event(now + grace, EvKind::DrainDeadline, id, 0);
        }
    }

    /// Steps a replica has completed by `now` (analytic inside a decode run).
    fn steps_now(&self, r: &Replica, now: f64) -> u64 {
        match r.phase {
            Phase::Decode {
                start,
                alpha,
                beta,
                target,
                ..
            } => r.steps + steps_within(alpha, beta, now - start).min(target),
            _ => r.steps,
        }
    }

    /// Sample one live replica at `now` (the clock must be at `now`).
    pub fn sample_replica(&self, id: u32, now: f64) -> ReplicaSample {
        let r = &self.replicas[id as usize];
        let steps = self.steps_now(r, now);
        let extra_steps = steps - r.steps;
        let bsz = r.running.len() as i64;
        let running_ctx = (r.ctx_base + bsz * steps as i64).max(0) as f64;
        let prefill_ctx: f64 = r
            .prefilling
            .iter()
            .map(|&s| f64::from(self.reqs[s as usize].input))
            .sum();
        let used = running_ctx + prefill_ctx;
        let n_running = r.running.len() + r.prefilling.len();
        let mut counters = r.counters;
        counters.generation_tokens += extra_steps * bsz as u64;
        if !r.busy_since.is_nan() {
            counters.busy_s += now - r.busy_since;
        }
        counters.concurrency_s += r.outstanding() as f64 * now - r.dispatched_sum;
        ReplicaSample {
            id,
            state: r.state,
            created_at: r.created_at,
            ready_at: r.ready_at,
            waiting: r.waiting.len() as u32,
            running: n_running as u32,
            queued_prompt_tokens: r.waiting_prompt_tokens,
            kv_used_tokens: used,
            kv_usage_ratio: used / self.kv_cap as f64,
            kv_reserved_tokens: r.kv_reserved,
            mean_context_tokens: if n_running > 0 {
                used / n_running as f64
            } else {
                0.0
            },
            batch_limit: r.batch_limit,
            counters,
        }
    }

    /// Finish the run: abort nothing, count what never got served as
    /// dropped, and close the GPU-time account at the horizon.
    pub fn finish(&mut self) {
        self.run_to_completion();
        while let Some(slot) = self.router_queue.pop_front() {
            self.waiting_total -= 1;
            let a = self.reqs[slot as usize].arrival;
            self.recorder.on_drop(a);
        }
    }

    /// Switch the fleet to oracle-planning mode: slots of gone replicas are
    /// reused, so a long plan does not accumulate replica history.
    pub(crate) fn enable_recycling(&mut self) {
        self.recycle = true;
    }

    /// Rescale the fleet at once for an oracle replay: keep exactly `n`
    /// ready replicas routable. Missing ones come from draining replicas
    /// (the most loaded first, they are back in routing at once) and then
    /// new replicas ready now; extra ones drain, least work first.
    pub(crate) fn force_ready(&mut self, n: u32, now: f64) {
        let have = self.ready_ids.len() as u32;
        if n > have {
            let mut need = n - have;
            let mut draining: Vec<u32> = self
                .live_ids
                .iter()
                .copied()
                .filter(|&id| self.replicas[id as usize].state == Lifecycle::Draining)
                .collect();
            draining.sort_by_key(|&id| std::cmp::Reverse(self.replicas[id as usize].outstanding()));
            for id in draining {
                if need == 0 {
                    break;
                }
                let r = &mut self.replicas[id as usize];
                r.state = Lifecycle::Ready;
                r.drain_at = f64::NAN;
                self.ready_ids.push(id);
                need -= 1;
            }
            for _ in 0..need {
                match self.gone_ids.pop() {
                    Some(id) => {
                        let epoch = self.replicas[id as usize].epoch.wrapping_add(1);
                        let limit = self.effective_limit();
                        let r = &mut self.replicas[id as usize];
                        *r = Replica {
                            id,
                            state: Lifecycle::Ready,
                            created_at: now,
                            ready_at: now,
                            drain_at: f64::NAN,
                            gone_at: f64::NAN,
                            cold_start_s: 0.0,
                            batch_limit: limit,
                            waiting: VecDeque::new(),
                            waiting_prompt_tokens: 0,
                            prefilling: Vec::new(),
                            running: BinaryHeap::new(),
                            kv_reserved: 0,
                            ctx_base: 0,
                            steps: 0,
                            phase: Phase::Idle,
                            epoch,
                            busy_since: f64::NAN,
                            dispatched_sum: 0.0,
                            counters: EngineCounters::default(),
                        };
                        self.live_ids.push(id);
                        self.ready_ids.push(id);
                    }
                    None => {
                        self.create_replica(now, true);
                    }
                }
            }
            while let Some(slot) = self.router_queue.pop_front() {
                self.waiting_total -= 1;
                self.route_slot(slot, now);
            }
        } else if n < have {
            for _ in n..have {
                let pick = self.ready_ids.iter().copied().min_by(|&x, &y| {
                    let (rx, ry) = (&self.replicas[x as usize], &self.replicas[y as usize]);
                    rx.outstanding().cmp(&ry.outstanding()).then(y.cmp(&x))
                });
                let Some(id) = pick else { break };
                self.start_drain(id, now);
            }
        }
        self.spec_replicas = n;
    }

    /// Requests in flight anywhere (router, queues, batches).
    pub fn in_flight(&self) -> usize {
        self.router_queue.len()
            + self
                .live_ids
                .iter()
                .map(|&id| self.replicas[id as usize].outstanding())
                .sum::<usize>()
    }
}

/// Time of `n` decode steps whose `k`-th lasts `alpha + beta·k`.
#[inline]
fn run_time(alpha: f64, beta: f64, n: u64) -> f64 {
    let n = n as f64;
    n * alpha + beta * n * (n - 1.0) * 0.5
}

/// Whole steps completed within `dt` seconds of a run's start.
#[inline]
fn steps_within(alpha: f64, beta: f64, dt: f64) -> u64 {
    if dt <= 0.0 {
        return 0;
    }
    let est = if beta <= 0.0 {
        dt / alpha
    } else {
        let h = alpha - 0.5 * beta;
        (-h + (h * h + 2.0 * beta * dt).sqrt()) / beta
    };
    let mut n = est.max(0.0).floor() as u64;
    // Correct floating-point error at the boundary.
    while n > 0 && run_time(alpha, beta, n) > dt {
        n -= 1;
    }
    while run_time(alpha, beta, n + 1) <= dt {
        n += 1;
    }
    n
}

#[inline]
fn bucket(bounds: &[f64], v: f64) -> usize {
    bounds.partition_point(|b| *b < v)
}

#[inline]
fn observe_itl_n(c: &mut EngineCounters, gap: f64, n: u64) {
    c.itl_buckets[bucket(ITL_BOUNDS_SECONDS, gap)] += n;
    c.itl_sum += gap * n as f64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        let perf = gpuscale_policy::perf::preset("h200-llama3-8b-bf16").expect("preset");
        let cfg = FleetConfig {
            perf,
            prefill_token_budget: 8192,
            pending_s: 0.0,
            cold_start: ColdStart::Fixed(60.0),
            drain_grace_s: None,
            victim_order: VictimOrder::LeastWork,
            horizon_s: 1000.0,
            seed: 3,
        };
        let stats = crate::stats::RunStats::new(
            crate::stats::Slo {
                ttft_s: 2.0,
                itl_s: 0.05,
                percentile: 95.0,
                ttft_per_input_token_s: 0.0,
            },
            1000.0,
            10.0,
        );
        Fleet::new(cfg, 0, Recorder::Full(Box::new(stats)))
    }

    fn request(at: f64) -> Request {
        Request {
            arrival_s: at,
            input_tokens: 500,
            output_tokens: 200,
        }
    }

    #[test]
    fn a_replica_added_for_a_pod_serves_after_its_cold_start_and_drains_without_drops() {
        let mut f = fleet();
        let a = f.add_replica(0.0, true);
        let b = f.add_replica(0.0, false);
        f.advance_to(1.0);
        assert_eq!(f.replicas()[b as usize].state, Lifecycle::Loading);
        f.advance_to(61.0);
        assert_eq!(f.ready_count(), 2);
        for i in 0..20 {
            f.arrive(&request(61.0 + 0.01 * f64::from(i)));
        }
        assert!(f.replicas()[a as usize].outstanding() > 0);
        assert!(f.drain_replica(a, 61.5));
        assert_eq!(f.replicas()[a as usize].state, Lifecycle::Draining);
        f.arrive(&request(61.6));
        assert_eq!(f.replicas()[b as usize].counters.received, 11);
        f.advance_to(200.0);
        assert_eq!(f.replicas()[a as usize].state, Lifecycle::Gone);
        assert!(!f.undrain_replica(a, 200.0), "a gone replica stays gone");
        let stats = f.recorder.stats().expect("full recorder");
        assert_eq!(
            (stats.arrivals, stats.completed, stats.dropped),
            (21, 21, 0)
        );
    }

    #[test]
    fn removing_a_busy_replica_drops_what_it_holds_and_undrain_restores_routing() {
        let mut f = fleet();
        let a = f.add_replica(0.0, true);
        let b = f.add_replica(0.0, true);
        for i in 0..6 {
            f.arrive(&request(0.01 * f64::from(i)));
        }
        assert!(f.drain_replica(b, 0.1));
        assert!(f.undrain_replica(b, 0.1));
        assert_eq!(f.ready_count(), 2);
        let held = f.replicas()[a as usize].outstanding() as u64;
        assert_eq!(f.remove_replica(a, 0.2), held);
        assert_eq!(f.remove_replica(a, 0.3), 0, "already gone");
        f.run_to_completion();
        let stats = f.recorder.stats().expect("full recorder");
        assert_eq!(stats.dropped, held);
        assert_eq!(stats.completed + stats.dropped, 6);
    }

    /// Request-seconds: each request from dispatch to completion, counted
    /// while it is outstanding too (the queue-proxy's averaged concurrency).
    #[test]
    fn request_seconds_integrate_the_requests_at_the_replica() {
        let mut f = fleet();
        let a = f.add_replica(0.0, true);
        for _ in 0..3 {
            f.arrive(&request(1.0));
        }
        f.advance_to(1.25);
        let mid = f.sample_replica(a, 1.25);
        assert!(mid.running + mid.waiting == 3, "{mid:?}");
        assert!((mid.counters.concurrency_s - 0.75).abs() < 1e-9, "{mid:?}");
        f.advance_to(100.0);
        let done = f.sample_replica(a, 100.0);
        assert_eq!(
            (done.running, done.waiting, done.counters.success),
            (0, 0, 3)
        );
        // Dispatched on arrival, so each request's time at the replica is
        // its end-to-end latency; nothing accrues once it is gone.
        assert!(done.counters.concurrency_s > 0.75);
        assert!(
            (done.counters.concurrency_s - done.counters.e2e_sum).abs() < 1e-9,
            "{done:?}"
        );
        f.advance_to(200.0);
        let later = f.sample_replica(a, 200.0);
        assert_eq!(later.counters.concurrency_s, done.counters.concurrency_s);
    }

    #[test]
    fn steps_within_inverts_run_time() {
        for &(alpha, beta) in &[(0.01, 0.0), (0.006, 1e-5), (0.03, 3e-4)] {
            for n in [0u64, 1, 2, 7, 100, 1000] {
                let t = run_time(alpha, beta, n);
                assert_eq!(steps_within(alpha, beta, t + 1e-12), n);
                if n > 0 {
                    assert_eq!(steps_within(alpha, beta, t - 1e-9), n - 1);
                }
            }
        }
    }
}
