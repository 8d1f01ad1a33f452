//! The regression suite: one YAML file per case under `tests/scenarios/`,
//! each a timeline of observations and the decisions expected.
//!
//! A scenario has a workload `spec` (the custom resource's spec), an optional
//! `start` instant (RFC 3339, default the Unix epoch), an optional `fleet`
//! (the harness then plays the scale target: a scale-up adds replicas that
//! become ready after `coldStartSeconds`, a scale-down removes the victims or
//! the newest), optional synthetic `history` for the forecaster, and `steps`.
//! A step holds at `at` seconds (repeated `every` seconds `until` a time, if
//! given); its `observe` fields are sticky (a step states only what
//! changes); its `expect` is checked on every decision the step makes.
//! Every decision is also made twice at the same instant and must not change.

use std::path::Path;

use chrono::DateTime;
use gpuscale_core::{Histogram, Timestamp};
use gpuscale_policy::{
    Action, Decision, Observation, Policy, RateSample, ReplicaObservation, ReplicaState, Source,
    WorkloadSpec,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Scenario {
    description: String,
    spec: WorkloadSpec,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    fleet: Option<Fleet>,
    #[serde(default)]
    history: Option<History>,
    steps: Vec<Step>,
    /// At most this many direction reversals (up then down or down then up).
    #[serde(default)]
    max_reversals: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Fleet {
    initial: u32,
    cold_start_seconds: f64,
}

/// A synthetic daily cycle fed to the forecaster before the first step:
/// `base + (peak − base)·(1 + cos(2π(h − peakHourUtc)/24))/2` req/s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct History {
    days: u32,
    base_rps: f64,
    peak_rps: f64,
    peak_hour_utc: f64,
}

impl History {
    fn rate(&self, t: Timestamp) -> f64 {
        let h = (t.as_secs_f64() / 3600.0).rem_euclid(24.0);
        let phase = 2.0 * std::f64::consts::PI * (h - self.peak_hour_utc) / 24.0;
        self.base_rps + (self.peak_rps - self.base_rps) * (1.0 + phase.cos()) / 2.0
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Step {
    at: f64,
    #[serde(default)]
    every: Option<f64>,
    #[serde(default)]
    until: Option<f64>,
    #[serde(default)]
    observe: Observe,
    #[serde(default)]
    expect: Option<Expect>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Observe {
    telemetry_age_seconds: Option<f64>,
    no_telemetry: Option<bool>,
    current: Option<u32>,
    ready: Option<u32>,
    pending: Option<u32>,
    loading: Option<u32>,
    arrival_rps: Option<f64>,
    /// Follow the `history` cycle for the arrival rate.
    arrival_from_history: Option<bool>,
    arrival_missing: Option<bool>,
    input_tokens: Option<f64>,
    output_tokens: Option<f64>,
    waiting: Option<f64>,
    running: Option<f64>,
    kv_usage: Option<f64>,
    ttft_seconds: Option<f64>,
    itl_seconds: Option<f64>,
    replicas: Option<Vec<ReplicaDetail>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReplicaDetail {
    id: String,
    #[serde(default = "ready_state")]
    state: String,
    #[serde(default)]
    protected: bool,
    #[serde(default)]
    running: Option<f64>,
    #[serde(default)]
    waiting: Option<f64>,
}

fn ready_state() -> String {
    "ready".into()
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Expect {
    desired: Option<u32>,
    desired_at_least: Option<u32>,
    desired_at_most: Option<u32>,
    action: Option<String>,
    winner: Option<String>,
    victims: Option<Vec<String>>,
    not_victims: Option<Vec<String>>,
    limit_contains: Option<String>,
    recommendation_from: Option<String>,
    no_recommendation_from: Option<String>,
}

struct FleetState {
    cold_start_s: f64,
    /// Ready-at time of each replica, oldest first.
    ready_at: Vec<Timestamp>,
}

impl FleetState {
    fn counts(&self, now: Timestamp) -> (u32, u32) {
        let ready = self.ready_at.iter().filter(|t| **t <= now).count() as u32;
        (self.ready_at.len() as u32, ready)
    }

    fn apply(&mut self, now: Timestamp, d: &Decision) {
        let current = self.ready_at.len() as u32;
        if d.desired_replicas > current {
            for _ in current..d.desired_replicas {
                self.ready_at.push(now.plus_secs(self.cold_start_s));
            }
        } else {
            // Loading replicas go first, then the newest.
            self.ready_at.sort();
            self.ready_at.truncate(d.desired_replicas as usize);
        }
    }
}

fn histogram_at(value: f64, itl: bool) -> Histogram {
    let mut h = if itl {
        Histogram::itl()
    } else {
        Histogram::ttft()
    };
    h.observe_n(value, 100);
    h
}

fn state_of(s: &str) -> ReplicaState {
    match s {
        "pending" => ReplicaState::Pending,
        "loading" => ReplicaState::Loading,
        "draining" => ReplicaState::Draining,
        _ => ReplicaState::Ready,
    }
}

fn source_name(s: Source) -> &'static str {
    s.as_str()
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Hold => "hold",
        Action::ScaleUp => "scale_up",
        Action::ScaleDown => "scale_down",
    }
}

fn check(file: &str, t: f64, e: &Expect, d: &Decision) -> Result<(), String> {
    let ctx = || format!("{file} at t={t}s: {}", d.summary());
    if let Some(x) = e.desired
        && d.desired_replicas != x
    {
        return Err(format!("expected desired {x}; {}", ctx()));
    }
    if let Some(x) = e.desired_at_least
        && d.desired_replicas < x
    {
        return Err(format!("expected desired >= {x}; {}", ctx()));
    }
    if let Some(x) = e.desired_at_most
        && d.desired_replicas > x
    {
        return Err(format!("expected desired <= {x}; {}", ctx()));
    }
    if let Some(a) = &e.action
        && action_name(d.action) != a
    {
        return Err(format!("expected action {a}; {}", ctx()));
    }
    if let Some(w) = &e.winner
        && source_name(d.winner) != w
    {
        return Err(format!("expected winner {w}; {}", ctx()));
    }
    if let Some(v) = &e.victims
        && &d.victims != v
    {
        return Err(format!(
            "expected victims {v:?}, got {:?}; {}",
            d.victims,
            ctx()
        ));
    }
    if let Some(v) = &e.not_victims
        && let Some(bad) = d.victims.iter().find(|x| v.contains(x))
    {
        return Err(format!("{bad} must never be a victim; {}", ctx()));
    }
    if let Some(s) = &e.limit_contains
        && !d.limits_applied().iter().any(|l| l.contains(s.as_str()))
    {
        return Err(format!("expected a limit containing {s:?}; {}", ctx()));
    }
    if let Some(s) = &e.recommendation_from
        && !d.recommendations.iter().any(|r| source_name(r.source) == s)
    {
        return Err(format!("expected a {s} recommendation; {}", ctx()));
    }
    if let Some(s) = &e.no_recommendation_from
        && d.recommendations.iter().any(|r| source_name(r.source) == s)
    {
        return Err(format!("expected no {s} recommendation; {}", ctx()));
    }
    Ok(())
}

fn run_scenario(path: &Path) -> Result<usize, String> {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
    let sc: Scenario = serde_yaml::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    assert!(!sc.description.is_empty());
    let config = sc.spec.validate().map_err(|e| format!("{file}: {e}"))?;
    let model = config
        .perf_model(None)
        .map_err(|e| format!("{file}: {e}"))?;
    let mut policy = Policy::new(config, model);
    let start = match &sc.start {
        Some(s) => Timestamp::from_millis(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("{file}: start: {e}"))?
                .timestamp_millis(),
        ),
        None => Timestamp::EPOCH,
    };
    if let Some(h) = &sc.history {
        let bucket = 600.0;
        let n = (f64::from(h.days) * 86_400.0 / bucket) as i64;
        let samples: Vec<RateSample> = (0..n)
            .map(|k| {
                let s = start.plus_secs((k - n) as f64 * bucket);
                RateSample {
                    start: s,
                    seconds: bucket,
                    rate_rps: h.rate(s.plus_secs(bucket / 2.0)),
                }
            })
            .collect();
        policy.observe_history(&samples);
    }
    let mut fleet = sc.fleet.as_ref().map(|f| FleetState {
        cold_start_s: f.cold_start_seconds,
        ready_at: vec![start; f.initial as usize],
    });
    let mut sticky = Observe::default();
    let mut decisions = 0usize;
    let mut last_direction: Option<Action> = None;
    let mut reversals = 0usize;
    for step in &sc.steps {
        merge(&mut sticky, &step.observe);
        let mut t = step.at;
        let until = step.until.unwrap_or(step.at);
        loop {
            let now = start.plus_secs(t);
            let obs = observation(&sticky, now, fleet.as_ref(), sc.history.as_ref());
            let d = policy.decide(now, &obs);
            let again = policy.decide(now, &obs);
            if d != again {
                return Err(format!(
                    "{file} at t={t}s: a repeated decision differs:\n{:?}\n{:?}",
                    d, again
                ));
            }
            decisions += 1;
            if std::env::var_os("SCENARIO_TRACE")
                .is_some_and(|v| file.contains(&*v.to_string_lossy()))
            {
                println!("t={t}: {}", d.summary());
                for r in &d.recommendations {
                    println!("    {:?} {:?}", r.source, r.replicas);
                }
            }
            if let Some(e) = &step.expect {
                check(&file, t, e, &d)?;
            }
            if d.action != Action::Hold {
                if let Some(prev) = last_direction
                    && prev != d.action
                {
                    reversals += 1;
                }
                last_direction = Some(d.action);
            }
            if let Some(f) = &mut fleet {
                f.apply(now, &d);
            }
            match step.every {
                Some(dt) if t + dt <= until + 1e-9 => t += dt,
                _ => break,
            }
        }
    }
    if let Some(max) = sc.max_reversals
        && reversals > max
    {
        return Err(format!(
            "{file}: {reversals} direction reversals, at most {max} allowed"
        ));
    }
    Ok(decisions)
}

fn merge(into: &mut Observe, from: &Observe) {
    macro_rules! take {
        ($($f:ident),*) => { $( if from.$f.is_some() { into.$f = from.$f.clone(); } )* };
    }
    take!(
        telemetry_age_seconds,
        no_telemetry,
        current,
        ready,
        pending,
        loading,
        arrival_rps,
        arrival_from_history,
        arrival_missing,
        input_tokens,
        output_tokens,
        waiting,
        running,
        kv_usage,
        ttft_seconds,
        itl_seconds,
        replicas
    );
}

fn observation(
    o: &Observe,
    now: Timestamp,
    fleet: Option<&FleetState>,
    history: Option<&History>,
) -> Observation {
    let mut obs = Observation::empty();
    if !o.no_telemetry.unwrap_or(false) {
        obs.telemetry_at = Some(now.plus_secs(-o.telemetry_age_seconds.unwrap_or(0.0)));
    }
    if let Some(f) = fleet {
        let (current, ready) = f.counts(now);
        obs.replicas.current = current;
        obs.replicas.ready = ready;
        obs.replicas.loading = current - ready;
    } else {
        obs.replicas.current = o.current.unwrap_or(1);
        obs.replicas.ready = o.ready.unwrap_or(obs.replicas.current);
        obs.replicas.pending = o.pending.unwrap_or(0);
        obs.replicas.loading = o.loading.unwrap_or(0);
    }
    if !o.arrival_missing.unwrap_or(false) {
        obs.load.arrival_rate_rps = if o.arrival_from_history.unwrap_or(false) {
            history.map(|h| h.rate(now))
        } else {
            o.arrival_rps
        };
    }
    obs.load.mean_input_tokens = Some(o.input_tokens.unwrap_or(1000.0));
    obs.load.mean_output_tokens = Some(o.output_tokens.unwrap_or(200.0));
    obs.load.requests_waiting = Some(o.waiting.unwrap_or(0.0));
    obs.load.requests_running = o.running;
    obs.load.kv_cache_usage_ratio = o.kv_usage;
    obs.latency.ttft_seconds = o.ttft_seconds.map(|v| histogram_at(v, false));
    obs.latency.itl_seconds = o.itl_seconds.map(|v| histogram_at(v, true));
    if let Some(reps) = &o.replicas {
        obs.replica_samples = reps
            .iter()
            .map(|r| ReplicaObservation {
                protected: r.protected,
                created_at: Some(Timestamp::EPOCH),
                requests_running: r.running,
                requests_waiting: r.waiting,
                ..ReplicaObservation::new(r.id.clone(), state_of(&r.state))
            })
            .collect();
    }
    obs
}

#[test]
fn every_scenario_file_holds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected at least 8 scenarios, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        match run_scenario(f) {
            Ok(n) => println!("{}: {n} decisions ok", f.display()),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
