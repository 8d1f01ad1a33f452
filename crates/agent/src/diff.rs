//! What changed between two samples of a node: the delta the uplink sends.
//!
//! Pure. [`diff`] takes the last state sent on the stream and the newest one
//! and returns the [`NodeDelta`] that turns the first into the second;
//! [`apply`] is its inverse on the receiving side, and the tests check
//! `apply(old, diff(old, new)) == new` for arbitrary states.
//!
//! Engines whose sample changed only in `sampled_at` are left out: a delta
//! means "everything not mentioned is unchanged as of the delta's
//! `sampled_at`". Per-GPU metrics and the agent's health go out whenever they
//! differ.

use std::collections::{BTreeMap, BTreeSet};

use gpuscale_core::sample::{EngineSample, GpuSample, NodeDelta, NodeSnapshot, PodGpus};
use gpuscale_core::{GpuUuid, PodRef};

/// The changes that turn `old` into `new`.
pub fn diff(old: &NodeSnapshot, new: &NodeSnapshot) -> NodeDelta {
    let old_gpus: BTreeMap<&GpuUuid, &GpuSample> =
        old.gpus.iter().map(|g| (&g.info.uuid, g)).collect();
    let new_uuids: BTreeSet<&GpuUuid> = new.gpus.iter().map(|g| &g.info.uuid).collect();
    let mut delta = NodeDelta {
        sampled_at: new.sampled_at,
        ..NodeDelta::default()
    };
    for g in &new.gpus {
        match old_gpus.get(&g.info.uuid) {
            None => {
                delta.gpus_upserted.push(g.info.clone());
                delta.gpu_metrics.push(g.metrics.clone());
            }
            Some(o) => {
                if o.info != g.info {
                    delta.gpus_upserted.push(g.info.clone());
                }
                if o.metrics != g.metrics {
                    delta.gpu_metrics.push(g.metrics.clone());
                }
            }
        }
    }
    delta.gpus_removed = old
        .gpus
        .iter()
        .map(|g| &g.info.uuid)
        .filter(|u| !new_uuids.contains(u))
        .cloned()
        .collect();

    let old_pods: BTreeMap<&PodRef, &PodGpus> = old.pods.iter().map(|p| (&p.pod, p)).collect();
    let new_pods: BTreeSet<&PodRef> = new.pods.iter().map(|p| &p.pod).collect();
    delta.pods_upserted = new
        .pods
        .iter()
        .filter(|p| old_pods.get(&p.pod) != Some(p))
        .cloned()
        .collect();
    delta.pods_removed = old
        .pods
        .iter()
        .map(|p| &p.pod)
        .filter(|p| !new_pods.contains(p))
        .cloned()
        .collect();

    let old_engines: BTreeMap<&PodRef, &EngineSample> =
        old.engines.iter().map(|e| (&e.pod, e)).collect();
    let new_engines: BTreeSet<&PodRef> = new.engines.iter().map(|e| &e.pod).collect();
    delta.engines_upserted = new
        .engines
        .iter()
        .filter(|e| match old_engines.get(&e.pod) {
            None => true,
            Some(o) => !same_except_time(o, e),
        })
        .cloned()
        .collect();
    delta.engines_removed = old
        .engines
        .iter()
        .map(|e| &e.pod)
        .filter(|p| !new_engines.contains(p))
        .cloned()
        .collect();

    if old.agent != new.agent {
        delta.agent = Some(new.agent.clone());
    }
    delta
}

fn same_except_time(a: &EngineSample, b: &EngineSample) -> bool {
    if a.sampled_at == b.sampled_at {
        return a == b;
    }
    let mut a = a.clone();
    a.sampled_at = b.sampled_at;
    &a == b
}

/// `old` with `delta` applied: the receiver's view of the node afterwards.
/// Items keep the order of `old`; new ones are appended in delta order.
/// Unchanged engines are re-stamped with the delta's `sampled_at`.
pub fn apply(old: &NodeSnapshot, delta: &NodeDelta) -> NodeSnapshot {
    let mut out = old.clone();
    out.sampled_at = delta.sampled_at;

    out.gpus
        .retain(|g| !delta.gpus_removed.contains(&g.info.uuid));
    for info in &delta.gpus_upserted {
        match out.gpus.iter_mut().find(|g| g.info.uuid == info.uuid) {
            Some(g) => g.info = info.clone(),
            None => out.gpus.push(GpuSample {
                info: info.clone(),
                metrics: gpuscale_core::sample::GpuMetrics {
                    uuid: info.uuid.clone(),
                    ..Default::default()
                },
            }),
        }
    }
    for m in &delta.gpu_metrics {
        if let Some(g) = out.gpus.iter_mut().find(|g| g.info.uuid == m.uuid) {
            g.metrics = m.clone();
        }
    }

    out.pods.retain(|p| !delta.pods_removed.contains(&p.pod));
    for p in &delta.pods_upserted {
        match out.pods.iter_mut().find(|o| o.pod == p.pod) {
            Some(o) => *o = p.clone(),
            None => out.pods.push(p.clone()),
        }
    }

    out.engines
        .retain(|e| !delta.engines_removed.contains(&e.pod));
    for e in &mut out.engines {
        e.sampled_at = delta.sampled_at;
    }
    for e in &delta.engines_upserted {
        match out.engines.iter_mut().find(|o| o.pod == e.pod) {
            Some(o) => *o = e.clone(),
            None => out.engines.push(e.clone()),
        }
    }
    if let Some(a) = &delta.agent {
        out.agent = a.clone();
    }
    out
}

#[cfg(test)]
mod tests {
    use gpuscale_core::sample::{
        AgentHealth, ContainerGpus, EngineState, Framework, GpuHealth, GpuInfo, GpuMetrics,
    };
    use gpuscale_core::{NodeName, Timestamp};
    use proptest::prelude::*;

    use super::*;

    fn gpu(i: u8, util: Option<f64>, model: &str) -> GpuSample {
        let uuid = GpuUuid::new(format!("GPU-{i}"));
        GpuSample {
            info: GpuInfo {
                uuid: uuid.clone(),
                index: u32::from(i),
                model_name: model.into(),
                memory_total_bytes: 80 << 30,
                pci_bus_id: String::new(),
                parent_uuid: None,
                mig_gpu_instance_id: None,
                gpm_supported: false,
                driver_version: String::new(),
            },
            metrics: GpuMetrics {
                uuid,
                utilization_gpu_ratio: util,
                health: GpuHealth::Healthy,
                ..GpuMetrics::default()
            },
        }
    }

    fn engine(i: u8, waiting: f64, at: i64) -> EngineSample {
        let mut e = EngineSample::empty(
            PodRef::new("default", format!("pod-{i}")),
            Framework::Fake,
            "m",
            Timestamp(at),
        );
        e.state = EngineState::Warm;
        e.requests_waiting = Some(waiting);
        e.gpu_uuids = vec![GpuUuid::new(format!("GPU-{i}"))];
        e
    }

    fn pod(i: u8, gpus: &[u8]) -> PodGpus {
        PodGpus {
            pod: PodRef::new("default", format!("pod-{i}")),
            containers: vec![ContainerGpus {
                container: "engine".into(),
                resource_name: "nvidia.com/gpu".into(),
                gpu_uuids: gpus
                    .iter()
                    .map(|g| GpuUuid::new(format!("GPU-{g}")))
                    .collect(),
            }],
        }
    }

    fn snapshot(
        at: i64,
        gpus: Vec<GpuSample>,
        pods: Vec<PodGpus>,
        engines: Vec<EngineSample>,
        samples: u64,
    ) -> NodeSnapshot {
        NodeSnapshot {
            node: NodeName::new("n"),
            agent_version: "v".into(),
            sampled_at: Timestamp(at),
            sample_interval_ms: 1000,
            gpus,
            pods,
            engines,
            agent: AgentHealth {
                samples_total: samples,
                ..AgentHealth::default()
            },
        }
    }

    #[test]
    fn unchanged_node_gives_a_delta_with_only_the_time() {
        let a = snapshot(
            1,
            vec![gpu(0, Some(0.5), "H100")],
            vec![pod(0, &[0])],
            vec![engine(0, 1.0, 1)],
            1,
        );
        let mut b = a.clone();
        b.sampled_at = Timestamp(2);
        b.engines[0].sampled_at = Timestamp(2);
        let d = diff(&a, &b);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.sampled_at, Timestamp(2));
    }

    #[test]
    fn changes_removals_and_additions_are_all_reported() {
        let a = snapshot(
            1,
            vec![gpu(0, Some(0.5), "H100"), gpu(1, Some(0.1), "H100")],
            vec![pod(0, &[0]), pod(1, &[1])],
            vec![engine(0, 1.0, 1), engine(1, 0.0, 1)],
            1,
        );
        let b = snapshot(
            2,
            vec![gpu(0, Some(0.7), "H100"), gpu(2, None, "H200")],
            vec![pod(0, &[0]), pod(2, &[2])],
            vec![engine(0, 4.0, 2), engine(2, 0.0, 2)],
            2,
        );
        let d = diff(&a, &b);
        assert_eq!(
            d.gpus_upserted
                .iter()
                .map(|g| g.uuid.as_str())
                .collect::<Vec<_>>(),
            ["GPU-2"]
        );
        assert_eq!(d.gpus_removed, vec![GpuUuid::new("GPU-1")]);
        assert_eq!(d.gpu_metrics.len(), 2);
        assert_eq!(d.pods_upserted, vec![pod(2, &[2])]);
        assert_eq!(d.pods_removed, vec![PodRef::new("default", "pod-1")]);
        assert_eq!(d.engines_upserted.len(), 2);
        assert_eq!(d.engines_removed, vec![PodRef::new("default", "pod-1")]);
        assert_eq!(d.agent.as_ref().map(|a| a.samples_total), Some(2));
        assert_eq!(apply(&a, &d), b);
    }

    fn state() -> impl Strategy<Value = NodeSnapshot> {
        (
            proptest::collection::btree_map(
                0u8..8,
                (
                    proptest::option::of(0.0f64..1.0),
                    prop_oneof![Just("H100"), Just("H200")],
                ),
                0..6,
            ),
            proptest::collection::btree_map(0u8..8, (0u8..8, 0.0f64..10.0), 0..6),
            0i64..1000,
            0u64..3,
        )
            .prop_map(|(gpus, engines, at, samples)| {
                snapshot(
                    at,
                    gpus.into_iter().map(|(i, (u, m))| gpu(i, u, m)).collect(),
                    engines.iter().map(|(i, (g, _))| pod(*i, &[*g])).collect(),
                    engines
                        .iter()
                        .map(|(i, (_, w))| engine(*i, *w, at))
                        .collect(),
                    samples,
                )
            })
    }

    proptest! {
        #[test]
        fn applying_the_diff_reconstructs_the_new_state(old in state(), new in state()) {
            let d = diff(&old, &new);
            let rebuilt = apply(&old, &d);
            // Same items, same content; order may differ where items were added.
            let sort = |mut s: NodeSnapshot| {
                s.gpus.sort_by(|a, b| a.info.uuid.cmp(&b.info.uuid));
                s.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
                s.engines.sort_by(|a, b| a.pod.cmp(&b.pod));
                s
            };
            prop_assert_eq!(sort(rebuilt), sort(new));
        }

        #[test]
        fn diff_of_a_state_with_itself_is_empty(s in state()) {
            prop_assert!(diff(&s, &s).is_empty());
        }
    }
}
