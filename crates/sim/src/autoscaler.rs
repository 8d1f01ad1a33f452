//! The contract between the simulator and the autoscaler under test.
//!
//! An autoscaler is called on its own cadence. Between decisions it receives
//! the telemetry it would really see: fleet samples taken every
//! [`Autoscaler::scrape_interval_s`] (the Prometheus scrape, the agent's
//! stream interval), never the simulator's exact state. At each decision it
//! also sees what Kubernetes shows (replica counts by state, pod ages), and
//! answers with a replica count, optionally a batch limit to publish and the
//! replicas it prefers to remove.

use serde_json::Value;

use crate::fleet::{Lifecycle, ReplicaSample, VictimOrder};

/// One scrape of the fleet: every live replica past pending, plus the
/// ingress (router) counters.
#[derive(Debug, Clone)]
pub struct FleetSample {
    pub at: f64,
    /// Requests received at the ingress since the start (counts at zero replicas).
    pub ingress_total: u64,
    /// Requests held at the router for lack of a ready replica.
    pub router_queue: u32,
    pub replicas: Vec<ReplicaSample>,
}

impl FleetSample {
    /// Replicas whose engine serves metrics (ready or draining).
    pub fn serving(&self) -> impl Iterator<Item = &ReplicaSample> {
        self.replicas
            .iter()
            .filter(|r| matches!(r.state, Lifecycle::Ready | Lifecycle::Draining))
    }

    /// Ready replicas only.
    pub fn ready(&self) -> impl Iterator<Item = &ReplicaSample> {
        self.replicas.iter().filter(|r| r.state == Lifecycle::Ready)
    }

    pub fn replica(&self, id: u32) -> Option<&ReplicaSample> {
        self.replicas.iter().find(|r| r.id == id)
    }
}

/// One pod as Kubernetes shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodView {
    pub id: u32,
    pub state: Lifecycle,
    pub created_at: f64,
    pub ready_at: f64,
}

/// What the Kubernetes API shows at a decision instant (no lag).
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub now: f64,
    /// The scale target's `spec.replicas` (pending + loading + ready).
    pub spec_replicas: u32,
    pub pending: u32,
    pub loading: u32,
    pub ready: u32,
    pub draining: u32,
    pub pods: Vec<PodView>,
}

/// An autoscaler's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleCommand {
    pub replicas: u32,
    /// A batch limit to publish to every replica (`None`: leave as is).
    pub batch_limit: Option<u32>,
    /// Replicas to remove first on scale-in, best victim first.
    pub victims: Vec<u32>,
}

impl ScaleCommand {
    pub fn replicas(n: u32) -> Self {
        Self {
            replicas: n,
            batch_limit: None,
            victims: Vec::new(),
        }
    }
}

/// An autoscaling policy driven by the simulator.
pub trait Autoscaler {
    /// The policy's label in reports (e.g. `b1-keda-waiting[t=5]`).
    fn name(&self) -> String;
    /// Every parameter the run used, for the report.
    fn parameters(&self) -> Value;
    /// Seconds between decisions.
    fn decision_interval_s(&self) -> f64;
    /// Seconds between telemetry samples; `None` for no telemetry.
    fn scrape_interval_s(&self) -> Option<f64>;
    /// Seconds a draining replica may finish its work before the rest is
    /// aborted (`None`: wait for all of it). Kubernetes' default grace is 30 s.
    fn drain_grace_s(&self) -> Option<f64> {
        Some(30.0)
    }
    /// Which ready replicas go first on scale-in when the command names none.
    fn victim_order(&self) -> VictimOrder {
        VictimOrder::Kubernetes
    }
    /// Whether a request held at the router of a fleet at zero replicas
    /// makes it decide at once (after a sample that shows the held
    /// request): the activator's wake-up (gpuscale's `ActivatorService`,
    /// Knative's poke) instead of the next tick.
    fn wakes_on_held(&self) -> bool {
        false
    }
    /// A telemetry sample, in time order.
    fn observe(&mut self, sample: FleetSample);
    /// Decide at `view.now`.
    fn decide(&mut self, view: &ClusterView) -> ScaleCommand;
    /// Decision records kept during the run (one line each), if the
    /// autoscaler keeps any; taken once at the end.
    fn take_decision_log(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// A constant replica count (static provisioning; also the simplest test double).
#[derive(Debug, Clone)]
pub struct FixedReplicas {
    pub label: String,
    pub replicas: u32,
    pub batch_limit: Option<u32>,
}

impl Autoscaler for FixedReplicas {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn parameters(&self) -> Value {
        serde_json::json!({ "replicas": self.replicas, "batch_limit": self.batch_limit })
    }
    fn decision_interval_s(&self) -> f64 {
        60.0
    }
    fn scrape_interval_s(&self) -> Option<f64> {
        None
    }
    fn observe(&mut self, _sample: FleetSample) {}
    fn decide(&mut self, _view: &ClusterView) -> ScaleCommand {
        ScaleCommand {
            replicas: self.replicas,
            batch_limit: self.batch_limit,
            victims: Vec::new(),
        }
    }
}
