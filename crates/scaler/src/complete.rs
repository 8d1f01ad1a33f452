//! Completeness is part of freshness: which replicas a workload expects to
//! hear from, which of them reported, and what is carried for the rest.
//!
//! A [`Roster`] per workload remembers every replica it has heard from, with
//! its last engine view (its load as last reported). The replicas it
//! **expects** are, in Kubernetes mode, the target's ready pods; standalone,
//! every replica heard within the horizon. A replica **reports** when its
//! engine's newest sample is fresh (within `silent_after` of now, on the
//! scaler's clock) and its window holds a rate. One that does not is
//! missing: its last known engine is carried into the observation as it was
//! (its load is never read as zero) until it is **confirmed gone** — its pod
//! is no longer a replica of the target (Kubernetes), or its node reports
//! freshly without it (standalone) — never merely because it went silent.
//! Standalone, a replica silent for longer than the horizon is forgotten.
//!
//! With fewer expected replicas reporting than the required share
//! (`completeness.minReportingShare` in the configuration file, default 1:
//! any missing replica) the decision holds: no scale-in, scale-up allowed
//! from what is seen and carried, and the decision says
//! `incomplete: 4 of 6 replicas reported (silent: node-c)`.
//!
//! With a share below 1 and at least that share reporting (rounded up: 90%
//! of 6 is 6, of 10 is 9), the decision stands, within two limits that keep
//! it safe: the silent replicas' load is still carried (never read as
//! zero), and a scale-in never drains a silent replica (one the decider
//! named is spared and the count raised by one for it) nor removes more
//! replicas than reported. The decision still says it was incomplete.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::{NodeName, PodRef, Timestamp};
use gpuscale_observe::TargetObservation;
use gpuscale_policy::{Action, Decision, Limit, ReplicaState};

use crate::config::EngineSelector;
use crate::view::{EngineView, StateView};

/// How the line an incomplete decision carries in its limits starts.
pub(crate) const INCOMPLETE: &str = "incomplete: ";

/// What the incomplete-data line says when enough replicas reported for
/// the decision to stand (scale-in allowed, within limits).
pub const ENOUGH_REPORTED: &str = "deciding with the silent replicas' last load carried";

/// The incomplete-data line of `decision`, if it has one.
pub fn incomplete_line(decision: &Decision) -> Option<&str> {
    decision.limits.iter().find_map(|l| match l {
        Limit::Incomplete { what, .. } => Some(what.as_str()),
        _ => None,
    })
}

/// The share of expected replicas that must report for a decision to
/// scale in (the default: all of them).
pub(crate) const DEFAULT_MIN_REPORTING_SHARE: f64 = 1.0;

/// The lowest share accepted: below half, the replicas heard from could be
/// the minority side of a partition.
pub(crate) const LOWEST_MIN_REPORTING_SHARE: f64 = 0.5;

/// What a workload heard from the replicas it expects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completeness {
    pub expected: u32,
    pub reporting: u32,
    /// Nodes of the missing replicas (as last heard), for the message.
    pub silent_nodes: BTreeSet<NodeName>,
    /// Pod names of the missing replicas: never scale-in victims.
    pub silent_pods: BTreeSet<String>,
    /// Engines of the workload in the view, whether or not they report
    /// (one just started has no rate yet).
    pub heard: u32,
}

impl Completeness {
    pub fn complete(&self) -> bool {
        self.reporting >= self.expected
    }

    /// Replicas that must report at `min_share` (rounded up, at least one
    /// when any is expected).
    pub fn required(&self, min_share: f64) -> u32 {
        let share = min_share.clamp(LOWEST_MIN_REPORTING_SHARE, 1.0);
        // 1e-9: 0.9 × 10 is 9.000000000000002 in floating point.
        let required = (share * f64::from(self.expected) - 1e-9).ceil();
        (required.max(0.0) as u32).min(self.expected)
    }

    /// `incomplete: 4 of 6 replicas reported (silent: node-c)`.
    pub fn describe(&self) -> String {
        let mut nodes: Vec<String> = self
            .silent_nodes
            .iter()
            .take(5)
            .map(|n| n.to_string())
            .collect();
        if self.silent_nodes.len() > 5 {
            nodes.push(format!("and {} more", self.silent_nodes.len() - 5));
        }
        let mut line = format!(
            "{INCOMPLETE}{} of {} replicas reported",
            self.reporting, self.expected
        );
        if !nodes.is_empty() {
            line.push_str(&format!(" (silent: {})", nodes.join(", ")));
        }
        line
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// The engine as last heard with a windowed rate.
    engine: Arc<EngineView>,
}

/// The replicas one workload has heard from.
#[derive(Debug, Clone, Default)]
pub struct Roster {
    entries: BTreeMap<PodRef, Entry>,
}

/// How [`Roster::update`] judges silence.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// A replica whose newest sample is older than this (plus three of its
    /// node's sample intervals) is silent.
    pub silent_after: Duration,
    /// Standalone: a replica silent this long is forgotten.
    pub horizon: Duration,
}

impl Roster {
    /// Updates the roster from `view` at `now`; returns the engines to
    /// observe (those that report as they are, missing ones as last heard)
    /// and the completeness.
    pub fn update(
        &mut self,
        view: &StateView,
        selector: &EngineSelector,
        target: &TargetObservation,
        now: Timestamp,
        freshness: Freshness,
    ) -> (Vec<Arc<EngineView>>, Completeness) {
        let fresh_within = |node: &NodeName| -> f64 {
            let interval_ms = view
                .nodes
                .get(node)
                .map_or(0, |n| u64::from(n.sample_interval_ms));
            freshness.silent_after.as_secs_f64() + 3.0 * interval_ms as f64 / 1000.0
        };
        let reports = |e: &EngineView| {
            now.secs_since(e.seen_at) <= fresh_within(&e.node) && e.window.covered_seconds > 0.0
        };
        // The engines this workload's replicas run, by pod.
        let engines: BTreeMap<&PodRef, &Arc<EngineView>> = match &target.replicas {
            Some(_) => view.engines().map(|e| (&e.sample.pod, e)).collect(),
            None => view
                .engines()
                .filter(|e| selector.matches(&e.sample.model, &e.sample.pod.namespace))
                .map(|e| (&e.sample.pod, e))
                .collect(),
        };
        let expected: BTreeSet<PodRef> = match &target.replicas {
            Some(replicas) => {
                // Confirmed gone: no longer a replica of the target.
                let members: BTreeSet<&PodRef> = replicas.iter().map(|r| &r.pod).collect();
                self.entries.retain(|pod, _| members.contains(pod));
                replicas
                    .iter()
                    .filter(|r| r.state == ReplicaState::Ready)
                    .map(|r| r.pod.clone())
                    .collect()
            }
            None => {
                self.entries.retain(|pod, entry| {
                    if engines.contains_key(pod) {
                        return true;
                    }
                    let node = &entry.engine.node;
                    // Its node reports freshly without it: gone.
                    let node_fresh = view.nodes.get(node).is_some_and(|n| {
                        n.connected && now.secs_since(n.seen_at) <= fresh_within(node)
                    });
                    let forgotten =
                        now.secs_since(entry.engine.seen_at) > freshness.horizon.as_secs_f64();
                    if forgotten {
                        tracing::warn!(%pod, %node, "a replica silent for longer than the horizon is no longer expected");
                    }
                    !node_fresh && !forgotten
                });
                // Those heard before, and those that report now; an engine
                // not yet heard with a rate (just started) is observed but
                // not expected yet.
                engines
                    .iter()
                    .filter(|(_, e)| reports(e))
                    .map(|(p, _)| (*p).clone())
                    .chain(self.entries.keys().cloned())
                    .collect()
            }
        };
        let mut completeness = Completeness {
            expected: u32::try_from(expected.len()).unwrap_or(u32::MAX),
            heard: u32::try_from(engines.len()).unwrap_or(u32::MAX),
            ..Completeness::default()
        };
        let mut observed: Vec<Arc<EngineView>> = Vec::with_capacity(engines.len());
        let mut used: BTreeSet<&PodRef> = BTreeSet::new();
        for pod in &expected {
            match engines.get(pod) {
                Some(e) if reports(e) => {
                    completeness.reporting += 1;
                    self.entries.insert(
                        pod.clone(),
                        Entry {
                            engine: Arc::clone(e),
                        },
                    );
                    observed.push(Arc::clone(e));
                }
                current => {
                    let carried = self.entries.get(pod).map(|entry| &entry.engine);
                    let node = carried.or(current.copied()).map(|e| e.node.clone());
                    if let Some(node) = node {
                        completeness.silent_nodes.insert(node);
                    }
                    completeness.silent_pods.insert(pod.name.clone());
                    // Carried as last heard; else whatever the view has.
                    if let Some(e) = carried.or(current.copied()) {
                        observed.push(Arc::clone(e));
                    }
                }
            }
            used.insert(pod);
        }
        // Engines of the view that are not expected replicas (Kubernetes:
        // pods not ready yet) are observed as they are.
        observed.extend(
            engines
                .iter()
                .filter(|(pod, _)| !used.contains(**pod))
                .map(|(_, e)| Arc::clone(e)),
        );
        (observed, completeness)
    }
}

/// Limits `decision` for an incomplete observation and says how incomplete.
///
/// Fewer reporting than `min_share` of the expected replicas: no scale-in
/// (scale-up stands). At least that share: the decision stands, except
/// that a silent replica is never a victim (the count is raised by one for
/// each the decider named) and no more replicas are removed than reported.
pub fn hold(decision: &mut Decision, completeness: &Completeness, min_share: f64) {
    if completeness.complete() {
        return;
    }
    let required = completeness.required(min_share);
    if completeness.reporting >= required {
        let mut what = format!(
            "{}; at least {required} required: {ENOUGH_REPORTED}",
            completeness.describe()
        );
        let (current, proposed) = (decision.current_replicas, decision.desired_replicas);
        if proposed < current {
            let before = decision.victims.len();
            decision
                .victims
                .retain(|v| !completeness.silent_pods.contains(v));
            let spared = u32::try_from(before - decision.victims.len()).unwrap_or(u32::MAX);
            let floor = current.saturating_sub(completeness.reporting);
            let desired = proposed.saturating_add(spared).max(floor).min(current);
            if desired != proposed {
                what.push_str(&format!(
                    "; scale-in limited to {desired} instead of {proposed} (silent replicas are not removed)"
                ));
                decision.desired_replicas = desired;
                let removed = (current - desired) as usize;
                decision.victims.truncate(removed);
                if desired == current {
                    decision.action = Action::Hold;
                }
            }
        }
        decision.limits.push(Limit::Incomplete { what, held: None });
        return;
    }
    let mut held = None;
    if decision.desired_replicas < decision.current_replicas {
        held = Some((decision.current_replicas, decision.desired_replicas));
        decision.desired_replicas = decision.current_replicas;
        decision.action = Action::Hold;
        decision.victims.clear();
    }
    decision.limits.push(Limit::Incomplete {
        what: completeness.describe(),
        held,
    });
}

#[cfg(test)]
mod tests {
    use gpuscale_core::sample::{AgentHealth, EngineSample, EngineState, Framework};
    use gpuscale_observe::{ClusterReplica, EngineWindowStats};
    use gpuscale_policy::Source;

    use super::*;
    use crate::view::NodeView;

    fn engine(node: &str, pod: &str, seen_at: i64) -> Arc<EngineView> {
        let mut s = EngineSample::empty(
            PodRef::new("llm", pod),
            Framework::Fake,
            "m",
            Timestamp(seen_at),
        );
        s.state = EngineState::Warm;
        Arc::new(EngineView {
            node: NodeName::new(node),
            sample: Arc::new(s),
            seen_at: Timestamp(seen_at),
            window: EngineWindowStats {
                covered_seconds: 10.0,
                generation_tokens_per_second: Some(100.0),
                ..EngineWindowStats::default()
            },
        })
    }

    fn view(nodes: &[(&str, i64, Vec<Arc<EngineView>>)]) -> StateView {
        StateView {
            nodes: nodes
                .iter()
                .map(|(name, seen, engines)| {
                    (
                        NodeName::new(*name),
                        Arc::new(NodeView {
                            node: NodeName::new(*name),
                            boot_epoch: 1,
                            last_seq: 1,
                            connected: true,
                            agent_version: String::new(),
                            sample_interval_ms: 1000,
                            sampled_at: Timestamp(*seen),
                            received_at: Timestamp(*seen),
                            seen_at: Timestamp(*seen),
                            clock_offset_ms: 0,
                            clock_clamped: 0,
                            gpus: vec![],
                            pods: vec![],
                            engines: engines.clone(),
                            agent: AgentHealth::default(),
                        }),
                    )
                })
                .collect(),
            ..StateView::default()
        }
    }

    const FRESH: Freshness = Freshness {
        silent_after: Duration::from_secs(4),
        horizon: Duration::from_secs(300),
    };

    fn selector() -> EngineSelector {
        EngineSelector {
            model: Some("m".into()),
            namespace: None,
        }
    }

    #[test]
    fn a_silent_replica_is_carried_until_its_node_reports_without_it() {
        let mut roster = Roster::default();
        let standalone = TargetObservation::default();
        let v = view(&[
            ("a", 0, vec![engine("a", "a-0", 0)]),
            ("c", 0, vec![engine("c", "c-0", 0)]),
        ]);
        let (observed, c) = roster.update(&v, &selector(), &standalone, Timestamp(0), FRESH);
        assert_eq!((c.expected, c.reporting, observed.len()), (2, 2, 2));
        // Node c is gone from the view (expired after silence): carried.
        let v = view(&[("a", 60_000, vec![engine("a", "a-0", 60_000)])]);
        let (observed, c) = roster.update(&v, &selector(), &standalone, Timestamp(60_000), FRESH);
        assert_eq!((c.expected, c.reporting), (2, 1));
        assert_eq!(
            c.describe(),
            "incomplete: 1 of 2 replicas reported (silent: c)"
        );
        assert_eq!(c.silent_pods, BTreeSet::from(["c-0".to_string()]));
        let carried = observed
            .iter()
            .find(|e| e.sample.pod.name == "c-0")
            .unwrap();
        assert_eq!(carried.window.generation_tokens_per_second, Some(100.0));
        // Node c reports again, without c-0: confirmed gone.
        let v = view(&[
            ("a", 61_000, vec![engine("a", "a-0", 61_000)]),
            ("c", 61_000, vec![]),
        ]);
        let (observed, c) = roster.update(&v, &selector(), &standalone, Timestamp(61_000), FRESH);
        assert_eq!((c.expected, c.reporting, observed.len()), (1, 1, 1));
        // Past the horizon a silent replica is forgotten.
        let v = view(&[
            ("a", 62_000, vec![engine("a", "a-0", 62_000)]),
            ("d", 62_000, vec![engine("d", "d-0", 62_000)]),
        ]);
        roster.update(&v, &selector(), &standalone, Timestamp(62_000), FRESH);
        let v = view(&[("a", 400_000, vec![engine("a", "a-0", 400_000)])]);
        let (_, c) = roster.update(&v, &selector(), &standalone, Timestamp(400_000), FRESH);
        assert!(c.complete(), "{c:?}");
    }

    #[test]
    fn kubernetes_expects_the_targets_ready_pods_until_they_are_deleted() {
        let mut roster = Roster::default();
        let replica = |pod: &str| ClusterReplica {
            pod: PodRef::new("llm", pod),
            state: ReplicaState::Ready,
            protected: false,
            created_at: None,
        };
        let target = TargetObservation {
            current: Some(2),
            replicas: Some(vec![replica("a-0"), replica("c-0")]),
        };
        let v = view(&[
            ("a", 0, vec![engine("a", "a-0", 0)]),
            ("c", 0, vec![engine("c", "c-0", 0)]),
        ]);
        let (_, c) = roster.update(&v, &selector(), &target, Timestamp(0), FRESH);
        assert!(c.complete());
        // c's engine is stale but its pod still exists: missing, carried.
        let v = view(&[
            ("a", 20_000, vec![engine("a", "a-0", 20_000)]),
            ("c", 0, vec![engine("c", "c-0", 0)]),
        ]);
        let (observed, c) = roster.update(&v, &selector(), &target, Timestamp(20_000), FRESH);
        assert_eq!((c.expected, c.reporting, observed.len()), (2, 1, 2));
        // The pod is deleted: no longer expected.
        let target = TargetObservation {
            current: Some(1),
            replicas: Some(vec![replica("a-0")]),
        };
        let (_, c) = roster.update(&v, &selector(), &target, Timestamp(20_000), FRESH);
        assert!(c.complete(), "{c:?}");
    }

    fn decision(current: u32, desired: u32, action: Action) -> Decision {
        Decision {
            at: Timestamp(0),
            current_replicas: current,
            desired_replicas: desired,
            batch_limit: None,
            action,
            winner: Source::Reactive,
            recommendations: vec![],
            limits: vec![],
            victims: vec!["a-0".into()],
            model_confidence: 1.0,
            advisory: false,
            slo: Default::default(),
            inputs: gpuscale_policy::DecisionInputs::None,
            scale_to_zero: None,
        }
    }

    #[test]
    fn an_incomplete_observation_holds_scale_in_and_lets_scale_up_through() {
        let incomplete = Completeness {
            expected: 6,
            reporting: 5,
            silent_nodes: [NodeName::new("node-c")].into(),
            silent_pods: ["c-0".to_string()].into(),
            heard: 6,
        };
        let mut d = decision(6, 4, Action::ScaleDown);
        hold(&mut d, &incomplete, 1.0);
        assert_eq!((d.desired_replicas, d.action), (6, Action::Hold));
        assert!(d.victims.is_empty());
        assert!(
            d.summary()
                .contains("incomplete: 5 of 6 replicas reported (silent: node-c); no scale-in"),
            "{}",
            d.summary()
        );
        let mut d = decision(6, 8, Action::ScaleUp);
        hold(&mut d, &incomplete, 1.0);
        assert_eq!((d.desired_replicas, d.action), (8, Action::ScaleUp));
        assert!(
            d.summary().contains("incomplete: 5 of 6"),
            "{}",
            d.summary()
        );
        let mut d = decision(6, 4, Action::ScaleDown);
        hold(
            &mut d,
            &Completeness {
                expected: 6,
                reporting: 6,
                ..Completeness::default()
            },
            1.0,
        );
        assert_eq!(d.desired_replicas, 4);
    }

    #[test]
    fn the_required_count_is_the_share_rounded_up() {
        let c = |expected| Completeness {
            expected,
            ..Completeness::default()
        };
        assert_eq!(c(6).required(0.9), 6, "90% of 6 leaves no replica out");
        assert_eq!(c(10).required(0.9), 9);
        assert_eq!(c(10).required(1.0), 10);
        assert_eq!(c(3).required(0.5), 2);
        assert_eq!(c(0).required(0.9), 0);
        // Below the lowest share accepted, the lowest share.
        assert_eq!(c(10).required(0.1), 5);
    }

    fn nine_of_ten() -> Completeness {
        Completeness {
            expected: 10,
            reporting: 9,
            silent_nodes: [NodeName::new("node-c")].into(),
            silent_pods: ["c-0".to_string()].into(),
            heard: 10,
        }
    }

    #[test]
    fn at_the_share_a_scale_in_stands_but_spares_the_silent_replica() {
        let mut d = decision(10, 7, Action::ScaleDown);
        d.victims = vec!["c-0".into(), "a-1".into(), "a-2".into()];
        hold(&mut d, &nine_of_ten(), 0.9);
        assert_eq!((d.desired_replicas, d.action), (8, Action::ScaleDown));
        assert_eq!(d.victims, ["a-1", "a-2"]);
        let s = d.summary();
        assert!(
            s.contains(
                "incomplete: 9 of 10 replicas reported (silent: node-c); at least 9 required"
            ) && s.contains("scale-in limited to 8 instead of 7"),
            "{s}"
        );
        assert!(!s.contains("no scale-in"), "{s}");
        // A scale-in that names no silent replica stands as decided.
        let mut d = decision(10, 7, Action::ScaleDown);
        d.victims = vec!["a-1".into(), "a-2".into(), "a-3".into()];
        hold(&mut d, &nine_of_ten(), 0.9);
        assert_eq!((d.desired_replicas, d.victims.len()), (7, 3));
        // Never more removed than reported.
        let mut d = decision(10, 0, Action::ScaleDown);
        d.victims = vec![];
        let few = Completeness {
            expected: 4,
            reporting: 3,
            silent_nodes: BTreeSet::new(),
            silent_pods: BTreeSet::new(),
            heard: 4,
        };
        hold(&mut d, &few, 0.5);
        assert_eq!(
            d.desired_replicas, 7,
            "10 current, 3 reporting: at most 3 removed"
        );
    }

    #[test]
    fn below_the_share_scale_in_is_held() {
        let mut eight = nine_of_ten();
        eight.reporting = 8;
        let mut d = decision(10, 7, Action::ScaleDown);
        hold(&mut d, &eight, 0.9);
        assert_eq!((d.desired_replicas, d.action), (10, Action::Hold));
        assert!(d.victims.is_empty());
        assert!(
            d.summary()
                .contains("no scale-in (held at 10 instead of 7)")
        );
        // The default share holds on any missing replica.
        let mut d = decision(10, 7, Action::ScaleDown);
        hold(&mut d, &nine_of_ten(), 1.0);
        assert_eq!((d.desired_replicas, d.action), (10, Action::Hold));
        // Scale-up stands either way.
        let mut d = decision(10, 12, Action::ScaleUp);
        hold(&mut d, &eight, 0.9);
        assert_eq!((d.desired_replicas, d.action), (12, Action::ScaleUp));
    }
}
