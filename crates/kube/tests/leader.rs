//! Leader election with two scaler replicas against the fake API server:
//! one acts, the other stands by (not ready, refusing agents); killing the
//! leader hands over once the lease expires; the request log shows no
//! write of the old leader after the new one took the lease.

mod support;

use std::time::Duration;

use gpuscale_fake_apiserver::{Fault, FaultKind, RequestRecord, Verb};
use serde_json::json;
use support::*;
use tokio::time::Instant;

fn url(s: &gpuscale_kube::RunningKubeScaler) -> String {
    format!("http://{}", s.scaler().grpc_addr())
}

fn is_write(r: &RequestRecord) -> bool {
    matches!(
        r.verb,
        Verb::Create | Verb::Update | Verb::Patch | Verb::Delete
    )
}

/// Index in `log` of the first successful lease write by `manager` after `from`.
fn acquired_at(log: &[RequestRecord], manager: &str, from: usize) -> Option<usize> {
    log.iter().enumerate().skip(from).find_map(|(i, r)| {
        (r.resource == "leases"
            && matches!(r.verb, Verb::Create | Verb::Update)
            && r.field_manager.as_deref() == Some(manager)
            && r.status < 300)
            .then_some(i)
    })
}

#[tokio::test(start_paused = true)]
async fn killing_the_leader_hands_over_within_the_lease_and_never_two_act() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    cluster
        .create_ias("llama", spec("llama", 1, 8, json!({})))
        .await;
    let a = start_scaler(&cluster, "a").await;
    eventually("a leads", Duration::from_secs(10), || a.is_leading()).await;
    let b = start_scaler(&cluster, "b").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![url(&b), url(&a)],
        2.0,
        Duration::from_secs(5),
    );
    eventually("a acts on llama", Duration::from_secs(60), || {
        cluster.status_i64("llama", "readyReplicas") == Some(1)
    })
    .await;
    assert!(!b.is_leading());
    assert_eq!(readyz(&a).await, 200);
    assert_eq!(readyz(&b).await, 503, "a standby is not ready");

    // a scales up under load.
    fleet.set_rps(60.0);
    eventually("a scales up", Duration::from_secs(60), || {
        cluster.spec_replicas("llama") > 1
    })
    .await;
    let lease = cluster
        .server
        .object("coordination.k8s.io", "leases", LEASE_NS, "gpuscale-scaler")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);

    let killed_at_log = cluster.server.request_log().len();
    let killed = Instant::now();
    a.kill().await;
    eventually("b takes over", Duration::from_secs(30), || b.is_leading()).await;
    let handover = killed.elapsed();
    // b saw a's last renewal at most one retry period late and waits the
    // lease duration from then; it tries again every retry period.
    assert!(
        handover <= Duration::from_secs(15 + 2 + 2),
        "handover took {handover:?}"
    );
    assert!(
        handover >= Duration::from_secs(15 - 2),
        "too early: {handover:?}"
    );
    assert_eq!(readyz(&b).await, 200);
    let lease = cluster
        .server
        .object("coordination.k8s.io", "leases", LEASE_NS, "gpuscale-scaler")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // b acts: the agents reconnected to it and a load drop scales in.
    fleet.set_rps(2.0);
    let before = cluster.spec_replicas("llama");
    eventually("b scales in", Duration::from_secs(120), || {
        cluster.spec_replicas("llama") < before
    })
    .await;
    let log = cluster.server.request_log();
    let b_acquired = acquired_at(&log, "gpuscale-scaler-b", killed_at_log).unwrap();
    let late: Vec<&RequestRecord> = log[b_acquired..]
        .iter()
        .filter(|r| is_write(r) && r.field_manager.as_deref() == Some("gpuscale-scaler-a"))
        .collect();
    assert!(late.is_empty(), "a wrote after b took the lease: {late:?}");
    let b_scaled = log.iter().any(|r| {
        r.subresource.as_deref() == Some("scale")
            && r.field_manager.as_deref() == Some("gpuscale-scaler-b")
    });
    assert!(b_scaled);
    support::rbac::assert_allowed(&log);
    b.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_acting_before_its_lease_can_be_taken() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    cluster
        .create_ias("llama", spec("llama", 1, 8, json!({})))
        .await;
    let a = start_scaler(&cluster, "a").await;
    eventually("a leads", Duration::from_secs(10), || a.is_leading()).await;
    let b = start_scaler(&cluster, "b").await;
    let _fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![url(&a), url(&b)],
        2.0,
        Duration::from_secs(5),
    );
    eventually("a acts", Duration::from_secs(60), || {
        cluster.status_i64("llama", "readyReplicas") == Some(1)
    })
    .await;
    // From now on lease requests hang (a partition between the replicas
    // and the API server's lease): a cannot renew.
    let cut = Instant::now();
    cluster.server.inject_fault(
        Fault::new(FaultKind::Hang)
            .resource("leases")
            .verb(Verb::Get)
            .times(1000),
    );
    eventually("a stops acting", Duration::from_secs(12), || {
        !a.is_leading()
    })
    .await;
    let stopped = cut.elapsed();
    // Its last renewal was sent at most one retry period before the cut.
    assert!(
        stopped <= Duration::from_secs(10),
        "a acted {stopped:?} without renewing"
    );
    assert!(
        stopped >= Duration::from_secs(10 - 2),
        "a stopped early: {stopped:?}"
    );
    let stopped_at_log = cluster.server.request_log().len();
    let stopped_at = Instant::now();
    // a stays partitioned (killed); the partition heals for b.
    a.kill().await;
    cluster.server.clear_faults();
    eventually("b takes over", Duration::from_secs(30), || b.is_leading()).await;
    let gap = stopped_at.elapsed();
    // b waited for the lease to expire, which is after a had stopped.
    assert!(
        gap >= Duration::from_secs(4),
        "b took over {gap:?} after a stopped"
    );
    let log = cluster.server.request_log();
    let late: Vec<&RequestRecord> = log[stopped_at_log..]
        .iter()
        .filter(|r| is_write(r) && r.field_manager.as_deref() == Some("gpuscale-scaler-a"))
        .collect();
    assert!(late.is_empty(), "a wrote after it stopped acting: {late:?}");
    assert!(acquired_at(&log, "gpuscale-scaler-b", stopped_at_log).is_some());
    support::rbac::assert_allowed(&log);
    b.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_drain_in_progress_is_finished_by_the_next_leader() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 3).await;
    let a = start_scaler(&cluster, "a").await;
    eventually("a leads", Duration::from_secs(10), || a.is_leading()).await;
    let b = start_scaler(&cluster, "b").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![url(&a), url(&b)],
        80.0,
        Duration::from_secs(5),
    );
    // The victim's engine keeps requests running for 40 s after its drain.
    fleet.set_drain_work(3.0, Duration::from_secs(40));
    eventually("three warm pods", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() == 3
    })
    .await;
    run_for(Duration::from_secs(40)).await;
    let pods: Vec<String> = cluster.pod_names("llama").into_iter().collect();
    fleet.set_running(&pods[0], 10.0);
    fleet.set_running(&pods[1], 1.0);
    fleet.set_running(&pods[2], 20.0);
    cluster
        .create_ias(
            "llama",
            spec("llama", 1, 3, json!({"drainTimeoutSeconds": 300})),
        )
        .await;
    eventually("a acts", Duration::from_secs(60), || {
        cluster
            .condition("llama", "Ready")
            .is_some_and(|c| c.0 == "True")
    })
    .await;
    fleet.set_rps(50.0);
    eventually("a starts draining", Duration::from_secs(60), || {
        !cluster.events("llama", "DrainStarted").is_empty()
    })
    .await;
    let victim = pods[1].clone();
    let record = cluster.pods("llama")[&victim]["metadata"]["annotations"]["gpuscale.dev/drain"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(record.contains(r#""phase":"Draining""#), "{record}");
    a.kill().await;

    eventually("b takes over", Duration::from_secs(30), || b.is_leading()).await;
    // Still busy: b keeps the drain, neither removes the pod nor starts another.
    run_for(Duration::from_secs(5)).await;
    assert_eq!(cluster.spec_replicas("llama"), 3);
    assert!(cluster.pod_names("llama").contains(&victim));
    eventually(
        "b removes exactly the drained pod",
        Duration::from_secs(60),
        || cluster.spec_replicas("llama") == 2 && cluster.pods("llama").len() == 2,
    )
    .await;
    let notes = |reason: &str| {
        cluster
            .events("llama", reason)
            .iter()
            .map(|e| format!("{}: {}", e["reportingInstance"], e["note"]))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cluster.pod_names("llama"),
        [pods[0].clone(), pods[2].clone()].into_iter().collect(),
        "victim {victim}: {:?} {:?} {:?} {:?}",
        notes("DrainStarted"),
        notes("DrainCancelled"),
        notes("ScaledDown"),
        notes("ReplicasAdopted"),
    );
    let drains = cluster.events("llama", "DrainStarted");
    assert_eq!(
        drains.len(),
        1,
        "one drain, not two: {:?} {:?}",
        drains
            .iter()
            .map(|e| (&e["note"], &e["reportingInstance"]))
            .collect::<Vec<_>>(),
        cluster
            .events("llama", "DrainCancelled")
            .iter()
            .map(|e| &e["note"])
            .collect::<Vec<_>>()
    );
    let lowered_by_b = cluster.scaler_requests().iter().any(|r| {
        r.subresource.as_deref() == Some("scale")
            && r.verb == Verb::Patch
            && r.field_manager.as_deref() == Some("gpuscale-scaler-b")
    });
    assert!(lowered_by_b);
    support::rbac::assert_allowed(&cluster.server.request_log());
    b.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_releases_the_lease_at_once() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    let a = start_scaler(&cluster, "a").await;
    eventually("a leads", Duration::from_secs(10), || a.is_leading()).await;
    let b = start_scaler(&cluster, "b").await;
    run_for(Duration::from_secs(3)).await;
    assert!(!b.is_leading());
    let t = Instant::now();
    a.shutdown().await.unwrap();
    eventually("b takes over", Duration::from_secs(10), || b.is_leading()).await;
    assert!(
        t.elapsed() <= Duration::from_secs(4),
        "no lease expiry wait: {:?}",
        t.elapsed()
    );
    b.shutdown().await.unwrap();
}
