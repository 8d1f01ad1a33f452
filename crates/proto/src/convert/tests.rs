use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn pod(ns: &str, name: &str) -> PodRef {
    PodRef::new(ns, name)
}

fn gpu(i: u32) -> GpuSample {
    let uuid = GpuUuid::new(format!("GPU-{i:08x}-0000-0000-0000-000000000000"));
    GpuSample {
        info: GpuInfo {
            uuid: uuid.clone(),
            index: i,
            model_name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            pci_bus_id: format!("00000000:{i:02x}:00.0"),
            parent_uuid: None,
            mig_gpu_instance_id: None,
            gpm_supported: true,
            driver_version: "570.86.15".into(),
        },
        metrics: GpuMetrics {
            uuid,
            memory_used_bytes: Some(70 << 30),
            memory_free_bytes: Some(10 << 30),
            utilization_gpu_ratio: Some(0.9),
            power_watts: Some(550.0),
            power_limit_watts: Some(700.0),
            temperature_celsius: Some(61.0),
            health: GpuHealth::Healthy,
            ..GpuMetrics::default()
        },
    }
}

fn snapshot_with(gpus: Vec<GpuSample>) -> NodeSnapshot {
    NodeSnapshot {
        node: NodeName::new("node-a"),
        agent_version: "0.1.0".into(),
        sampled_at: Timestamp::from_millis(1_700_000_000_000),
        sample_interval_ms: 1000,
        gpus,
        pods: vec![],
        engines: vec![],
        agent: AgentHealth::default(),
    }
}

fn report(body: ReportBody) -> v1::NodeReport {
    (&AgentReport {
        boot_epoch: 7,
        seq: 1,
        sent_at: Timestamp::from_millis(1),
        body,
    })
        .into()
}

fn snapshot_of(r: &mut v1::NodeReport) -> &mut v1::NodeSnapshot {
    match r.body.as_mut() {
        Some(v1::node_report::Body::Snapshot(s)) => s,
        _ => panic!("not a snapshot"),
    }
}

fn reject(r: v1::NodeReport) -> ConvertError {
    AgentReport::try_from(r).expect_err("must be rejected")
}

#[test]
fn ratio_above_one_is_rejected_with_its_field_path() {
    let mut r = report(ReportBody::Snapshot(snapshot_with(vec![
        gpu(0),
        gpu(1),
        gpu(2),
        gpu(3),
    ])));
    snapshot_of(&mut r).gpus[3]
        .metrics
        .as_mut()
        .expect("metrics")
        .utilization_gpu_ratio = Some(1.7);
    let e = reject(r);
    assert_eq!(e.field(), "snapshot.gpus[3].metrics.utilization_gpu_ratio");
    assert_eq!(
        e.to_string(),
        "snapshot.gpus[3].metrics.utilization_gpu_ratio: 1.7 is outside 0..=1"
    );
}

#[test]
fn nan_negative_and_absurd_power_are_rejected() {
    for (value, expect) in [
        (f64::NAN, "NaN is not a finite number"),
        (f64::INFINITY, "inf is not a finite number"),
        (-3.0, "-3 is outside 0..=5000 W"),
        (9_000.0, "9000 is outside 0..=5000 W"),
    ] {
        let mut r = report(ReportBody::Snapshot(snapshot_with(vec![gpu(0)])));
        snapshot_of(&mut r).gpus[0]
            .metrics
            .as_mut()
            .expect("metrics")
            .power_watts = Some(value);
        let e = reject(r);
        assert_eq!(e.field(), "snapshot.gpus[0].metrics.power_watts");
        assert!(e.to_string().contains(expect), "{e}");
    }
}

#[test]
fn memory_used_above_total_is_rejected() {
    let mut r = report(ReportBody::Snapshot(snapshot_with(vec![gpu(0)])));
    snapshot_of(&mut r).gpus[0]
        .metrics
        .as_mut()
        .expect("metrics")
        .memory_used_bytes = Some(81 << 30);
    let e = reject(r);
    assert_eq!(e.field(), "snapshot.gpus[0].metrics.memory_used_bytes");
    assert!(
        e.to_string()
            .contains("more than the GPU's memory_total_bytes"),
        "{e}"
    );
}

#[test]
fn memory_used_above_total_is_rejected_in_a_delta_that_upserts_the_gpu() {
    let g = gpu(0);
    let mut metrics = g.metrics.clone();
    metrics.memory_used_bytes = Some(u64::MAX / 2);
    let d = NodeDelta {
        gpus_upserted: vec![g.info],
        gpu_metrics: vec![metrics],
        ..NodeDelta::default()
    };
    let e = reject(report(ReportBody::Delta(d)));
    assert_eq!(e.field(), "delta.gpu_metrics[0].memory_used_bytes");
}

#[test]
fn non_cumulative_histogram_is_rejected() {
    let mut e = EngineSample::empty(pod("default", "vllm-0"), Framework::Vllm, "m", Timestamp(1));
    e.ttft_seconds = Some(Histogram::ttft());
    let mut snap = snapshot_with(vec![]);
    snap.engines.push(e);
    let mut r = report(ReportBody::Snapshot(snap));
    let h = snapshot_of(&mut r).engines[0]
        .ttft_seconds
        .as_mut()
        .expect("histogram");
    h.cumulative_counts[3] = 5;
    let e = reject(r);
    assert_eq!(e.field(), "snapshot.engines[0].ttft_seconds");
    assert!(e.to_string().contains("must not decrease"), "{e}");
}

#[test]
fn negative_counter_and_queue_are_rejected() {
    let mut e = EngineSample::empty(pod("default", "vllm-0"), Framework::Vllm, "m", Timestamp(1));
    e.generation_tokens_total = Some(-1.0);
    let mut snap = snapshot_with(vec![]);
    snap.engines.push(e);
    let err = reject(report(ReportBody::Snapshot(snap)));
    assert_eq!(err.field(), "snapshot.engines[0].generation_tokens_total");

    let mut e = EngineSample::empty(pod("default", "vllm-0"), Framework::Vllm, "m", Timestamp(1));
    e.requests_waiting = Some(-2.0);
    let d = NodeDelta {
        engines_upserted: vec![e],
        ..NodeDelta::default()
    };
    let err = reject(report(ReportBody::Delta(d)));
    assert_eq!(err.field(), "delta.engines_upserted[0].requests_waiting");
}

#[test]
fn a_bad_engine_entry_is_left_out_and_the_rest_of_the_node_kept() {
    let engine = |name: &str| {
        let mut e = EngineSample::empty(pod("llm", name), Framework::Vllm, "m", Timestamp(1));
        e.requests_running = Some(3.0);
        e
    };
    let mut snap = snapshot_with(vec![gpu(0), gpu(1)]);
    snap.engines = vec![
        engine("good-0"),
        engine("huge-0"),
        engine("nan-0"),
        engine("good-1"),
    ];
    let mut r = report(ReportBody::Snapshot(snap));
    {
        let s = snapshot_of(&mut r);
        s.engines[1].model = "m".repeat(1 << 20);
        s.engines[2].kv_cache_usage_ratio = Some(f64::NAN);
        // A pod listed twice: the second entry goes.
        let again = s.engines[0].clone();
        s.engines.push(again);
    }
    // The strict conversion rejects the whole report at the first bad entry.
    assert_eq!(reject(r.clone()).field(), "snapshot.engines[1].model");

    let (report, rejected) = AgentReport::from_wire(r).expect("the node is kept");
    let ReportBody::Snapshot(s) = report.body else {
        panic!("a snapshot")
    };
    assert_eq!(s.gpus.len(), 2, "the node's GPUs stay");
    let kept: Vec<&str> = s.engines.iter().map(|e| e.pod.name.as_str()).collect();
    assert_eq!(kept, ["good-0", "good-1"]);
    let fields: Vec<&str> = rejected.iter().map(|r| r.error.field()).collect();
    assert_eq!(
        fields,
        [
            "snapshot.engines[1].model",
            "snapshot.engines[2].kv_cache_usage_ratio",
            "snapshot.engines[4].pod"
        ]
    );
    assert_eq!(rejected[0].pod, Some(pod("llm", "huge-0")));
    assert!(
        rejected[0].error.to_string().contains("longer than"),
        "{:?}",
        rejected[0]
    );

    // In a delta too.
    let mut bad = engine("neg-0");
    bad.requests_waiting = Some(-2.0);
    let d = NodeDelta {
        engines_upserted: vec![engine("ok-0"), bad],
        ..NodeDelta::default()
    };
    let (report, rejected) =
        AgentReport::from_wire(self::report(ReportBody::Delta(d))).expect("kept");
    let ReportBody::Delta(d) = report.body else {
        panic!("a delta")
    };
    assert_eq!(d.engines_upserted.len(), 1);
    assert_eq!(
        rejected[0].error.field(),
        "delta.engines_upserted[1].requests_waiting"
    );
    // Whatever is wrong outside the engines still rejects the report.
    let mut r = self::report(ReportBody::Snapshot(snapshot_with(vec![gpu(0)])));
    snapshot_of(&mut r).gpus[0]
        .metrics
        .as_mut()
        .expect("metrics")
        .power_watts = Some(f64::NAN);
    assert!(AgentReport::from_wire(r).is_err());
}

#[test]
fn report_without_body_or_epoch_is_rejected() {
    let e = reject(v1::NodeReport {
        boot_epoch: 1,
        seq: 1,
        sent_at_unix_ms: 0,
        body: None,
    });
    assert_eq!(e.field(), "report.body");
    let mut r = report(ReportBody::Delta(NodeDelta::default()));
    r.boot_epoch = 0;
    assert_eq!(reject(r).field(), "report.boot_epoch");
    let mut r = report(ReportBody::Delta(NodeDelta::default()));
    r.seq = 0;
    assert_eq!(reject(r).field(), "report.seq");
}

#[test]
fn duplicate_gpu_and_too_many_gpus_are_rejected() {
    let e = reject(report(ReportBody::Snapshot(snapshot_with(vec![
        gpu(1),
        gpu(1),
    ]))));
    assert_eq!(e.field(), "snapshot.gpus[1].info.uuid");
    let many: Vec<GpuSample> = (0..(MAX_GPUS_PER_NODE as u32 + 1)).map(gpu).collect();
    let e = reject(report(ReportBody::Snapshot(snapshot_with(many))));
    assert_eq!(e.field(), "snapshot.gpus");
}

#[test]
fn empty_node_name_and_unspecified_framework_are_rejected() {
    let mut s = snapshot_with(vec![]);
    s.node = NodeName::new("");
    assert_eq!(
        reject(report(ReportBody::Snapshot(s))).field(),
        "snapshot.node_name"
    );

    let mut snap = snapshot_with(vec![]);
    snap.engines.push(EngineSample::empty(
        pod("ns", "p"),
        Framework::Vllm,
        "m",
        Timestamp(1),
    ));
    let mut r = report(ReportBody::Snapshot(snap));
    snapshot_of(&mut r).engines[0].framework = 0;
    assert_eq!(reject(r).field(), "snapshot.engines[0].framework");
}

#[test]
fn directives_round_trip_and_bad_interval_is_rejected() {
    for d in [
        Directive::Ack { seq: 9 },
        Directive::SetSampleInterval {
            interval: Duration::from_millis(500),
        },
        Directive::DrainPod {
            pod: pod("ns", "p"),
            reason: "scale-in".into(),
        },
        Directive::UndrainPod {
            pod: pod("ns", "p"),
        },
        Directive::SetBatchLimit {
            pod: pod("ns", "p"),
            batch_limit: 64,
        },
    ] {
        let wire: v1::ScalerDirective = (&d).into();
        assert_eq!(Directive::try_from(wire).expect("valid"), d);
    }
    let wire: v1::ScalerDirective = (&Directive::SetSampleInterval {
        interval: Duration::from_millis(5),
    })
        .into();
    let e = Directive::try_from(wire).expect_err("too short");
    assert_eq!(e.field(), "directive.set_sample_interval.interval_ms");
}

// ---------------------------------------------------------------------------
// Round trip: domain → wire → domain is the identity for valid values.

fn small_f64() -> impl Strategy<Value = f64> {
    0.0f64..1e6
}

fn opt<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}

fn histogram_strategy() -> impl Strategy<Value = Histogram> {
    proptest::collection::vec(0.0f64..100.0, 0..40).prop_map(|values| {
        let mut h = Histogram::ttft();
        for v in values {
            h.observe(v);
        }
        h
    })
}

fn gpu_strategy(i: u32) -> impl Strategy<Value = GpuSample> {
    (
        1u64..(200u64 << 30),
        opt(0.0f64..=1.0),
        opt(0.0f64..=1.0),
        opt(0.0f64..=MAX_POWER_WATTS),
        opt(-50.0f64..=200.0),
        opt(0u32..=MAX_SM_CLOCK_MHZ),
        opt(any::<u64>()),
        prop_oneof![
            Just(GpuHealth::Unknown),
            Just(GpuHealth::Healthy),
            "[a-z ]{1,20}".prop_map(|reason| GpuHealth::Unhealthy { reason }),
        ],
        proptest::collection::btree_map(any::<u64>(), (any::<u64>(), 0i64..i64::MAX), 0..4),
        opt((
            opt(0.0f64..=1.0),
            opt(0.0f64..=1.0),
            opt(0.0f64..=1.0),
            opt(0.0f64..=1.0),
        )),
        any::<bool>(),
    )
        .prop_map(
            move |(total, util, mem_util, power, temp, clock, throttle, health, xids, gpm, mig)| {
                let uuid = GpuUuid::new(format!("{}-{i:04}", if mig { "MIG" } else { "GPU" }));
                GpuSample {
                    info: GpuInfo {
                        uuid: uuid.clone(),
                        index: i,
                        model_name: "NVIDIA H200".into(),
                        memory_total_bytes: total,
                        pci_bus_id: String::new(),
                        parent_uuid: mig.then(|| GpuUuid::new("GPU-parent")),
                        mig_gpu_instance_id: mig.then_some(3),
                        gpm_supported: gpm.is_some(),
                        driver_version: "570".into(),
                    },
                    metrics: GpuMetrics {
                        uuid,
                        memory_used_bytes: Some(total / 2),
                        memory_free_bytes: Some(total / 3),
                        utilization_gpu_ratio: util,
                        utilization_memory_ratio: mem_util,
                        power_watts: power,
                        power_limit_watts: power.map(|p| p.clamp(700.0, MAX_POWER_WATTS)),
                        temperature_celsius: temp,
                        sm_clock_mhz: clock,
                        throttle_reasons: throttle,
                        ecc_uncorrected_total: throttle.map(|t| t % 7),
                        energy_joules_total: power.map(|p| p * 1000.0),
                        gpm: gpm.map(|(a, b, c, d)| GpmMetrics {
                            sm_util_ratio: a,
                            sm_occupancy_ratio: b,
                            tensor_active_ratio: c,
                            dram_bw_util_ratio: d,
                        }),
                        health,
                        xid_totals: xids
                            .into_iter()
                            .map(|(k, (total, at))| {
                                (
                                    k,
                                    XidCount {
                                        total,
                                        last_at: Timestamp(at),
                                    },
                                )
                            })
                            .collect::<BTreeMap<_, _>>(),
                    },
                }
            },
        )
}

fn engine_strategy(i: usize) -> impl Strategy<Value = EngineSample> {
    (
        (
            prop_oneof![
                Just(Framework::Vllm),
                Just(Framework::Sglang),
                Just(Framework::Tgi),
                Just(Framework::TritonTrtllm),
                Just(Framework::TrtllmServe),
                Just(Framework::LlamaCpp),
                Just(Framework::Push),
                Just(Framework::Fake),
            ],
            prop_oneof![
                Just(EngineState::Unknown),
                Just(EngineState::Loading),
                Just(EngineState::Warm),
                Just(EngineState::Draining),
                Just(EngineState::Failed),
            ],
            opt(0.0f64..1e4),
            opt(0.0f64..1e4),
            opt(0.0f64..=1.0),
            opt(small_f64()),
        ),
        (
            opt(small_f64()),
            opt(small_f64()),
            opt(small_f64()),
            opt(small_f64()),
            opt(small_f64()),
            opt(histogram_strategy()),
            opt(histogram_strategy()),
            opt(1u32..1024),
            any::<u64>(),
        ),
    )
        .prop_map(move |(a, b)| {
            let (framework, state, waiting, running, kv, queued) = a;
            let (prompt, generated, arrived, finished, preempt, ttft, itl, limit, resets) = b;
            let mut e = EngineSample::empty(
                PodRef::new("default", format!("engine-{i}")),
                framework,
                "llama-3-8b",
                Timestamp(1_000 + i as i64),
            );
            e.container = "engine".into();
            e.state = state;
            e.gpu_uuids = vec![GpuUuid::new(format!("GPU-{i:04}"))];
            e.requests_waiting = waiting;
            e.requests_running = running;
            e.kv_cache_usage_ratio = kv;
            e.kv_capacity_tokens = queued.map(|q| q * 2.0);
            e.queued_prompt_tokens = queued;
            e.prompt_tokens_total = prompt;
            e.generation_tokens_total = generated;
            e.requests_arrived_total = arrived;
            e.requests_finished_total = finished;
            e.preemptions_total = preempt;
            e.ttft_seconds = ttft;
            e.itl_seconds = itl.map(|h| {
                let mut out = Histogram::itl();
                out.observe_n(0.02, h.count());
                out
            });
            e.batch_limit = limit;
            e.counter_resets_total = resets;
            e.mean_context_tokens = running;
            e
        })
}

fn snapshot_strategy() -> impl Strategy<Value = NodeSnapshot> {
    (
        1usize..6,
        0usize..4,
        any::<(u64, u64, u64, u64, bool, bool)>(),
        0i64..i64::MAX / 2,
    )
        .prop_flat_map(|(n_gpus, n_engines, health, at)| {
            let gpus: Vec<_> = (0..n_gpus as u32).map(gpu_strategy).collect();
            let engines: Vec<_> = (0..n_engines).map(engine_strategy).collect();
            (gpus, engines, Just(health), Just(at))
        })
        .prop_map(|(gpus, engines, h, at)| {
            let pods = engines
                .iter()
                .map(|e| PodGpus {
                    pod: e.pod.clone(),
                    containers: vec![ContainerGpus {
                        container: "engine".into(),
                        resource_name: "nvidia.com/gpu".into(),
                        gpu_uuids: e.gpu_uuids.clone(),
                    }],
                })
                .collect();
            NodeSnapshot {
                node: NodeName::new("node-a"),
                agent_version: "0.1.0".into(),
                sampled_at: Timestamp(at),
                sample_interval_ms: 1000,
                gpus,
                pods,
                engines,
                agent: AgentHealth {
                    samples_total: h.0,
                    sample_errors_total: h.1,
                    reconnects_total: h.2,
                    coalesced_total: h.3,
                    nvml_available: h.4,
                    pod_resources_available: h.5,
                },
            }
        })
}

proptest! {
    #[test]
    fn snapshot_survives_a_round_trip_through_the_wire(snap in snapshot_strategy(), epoch in 1u64.., seq in 1u64..) {
        let report = AgentReport { boot_epoch: epoch, seq, sent_at: Timestamp(5), body: ReportBody::Snapshot(snap) };
        let wire = v1::NodeReport::from(&report);
        let back = AgentReport::try_from(wire).expect("valid domain values convert back");
        prop_assert_eq!(back, report);
    }

    #[test]
    fn delta_survives_a_round_trip_through_the_wire(snap in snapshot_strategy(), removed in 0usize..3, with_agent in any::<bool>()) {
        let delta = NodeDelta {
            sampled_at: snap.sampled_at,
            gpus_upserted: snap.gpus.iter().map(|g| g.info.clone()).collect(),
            gpus_removed: (0..removed).map(|i| GpuUuid::new(format!("GPU-gone-{i}"))).collect(),
            gpu_metrics: snap.gpus.iter().map(|g| g.metrics.clone()).collect(),
            pods_upserted: snap.pods.clone(),
            pods_removed: (0..removed).map(|i| PodRef::new("ns", format!("gone-{i}"))).collect(),
            engines_upserted: snap.engines.clone(),
            engines_removed: (0..removed).map(|i| PodRef::new("ns", format!("gone-{i}"))).collect(),
            agent: with_agent.then(|| snap.agent.clone()),
        };
        let report = AgentReport { boot_epoch: 3, seq: 4, sent_at: Timestamp(5), body: ReportBody::Delta(delta) };
        let back = AgentReport::try_from(v1::NodeReport::from(&report)).expect("valid");
        prop_assert_eq!(back, report);
    }
}
