//! The controller against the fake API server: the real kube-rs code
//! paths, the real scaler, simulated engines streaming over real gRPC.
//! Paused tokio time: minutes of cluster time run in seconds.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use gpuscale_fake_apiserver::{Fault, FaultKind, Verb};
use serde_json::{Value, json};
use support::rbac;
use support::*;

/// Offered loads and what the H200 Llama-3 8B preset sizes for them
/// (500 prompt and 200 generated tokens per request).
const LOW_RPS: f64 = 2.0; // 1 replica
const TWO_RPS: f64 = 50.0; // 2 replicas
const THREE_RPS: f64 = 80.0; // 3 replicas
const HIGH_RPS: f64 = 120.0; // more than 3

fn url(s: &gpuscale_kube::RunningKubeScaler) -> String {
    format!("http://{}", s.scaler().grpc_addr())
}

async fn ready(cluster: &Cluster, name: &str) {
    eventually(&format!("{name} Ready"), Duration::from_secs(60), || {
        cluster
            .condition(name, "Ready")
            .is_some_and(|c| c.0 == "True")
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_load_step_scales_up_and_new_pods_count_only_once_warm() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(5)).await;
    cluster.create_deployment("llama", 1).await;
    cluster
        .create_ias("llama", spec("llama", 1, 6, json!({})))
        .await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![url(&scaler)],
        LOW_RPS,
        Duration::from_secs(60),
    );
    ready(&cluster, "llama").await;
    eventually("one warm replica", Duration::from_secs(120), || {
        cluster.status_i64("llama", "readyReplicas") == Some(1)
    })
    .await;
    assert_eq!(cluster.spec_replicas("llama"), 1);
    assert!(cluster.scale_writes().is_empty());

    fleet.set_rps(HIGH_RPS);
    eventually("a scale-up", Duration::from_secs(60), || {
        cluster.spec_replicas("llama") > 1
    })
    .await;
    // The new pods start, load their model (60 s here) and only then count:
    // meanwhile they are capacity in flight, and the shortfall they meet is
    // not requested again.
    run_for(Duration::from_secs(20)).await;
    let scaled_to = cluster.spec_replicas("llama");
    assert!(scaled_to > 1);
    assert_eq!(
        cluster.pods("llama").len() as i64,
        scaled_to,
        "the new pods exist"
    );
    assert_eq!(cluster.warm_pods("llama").len(), 1);
    assert_eq!(cluster.status_i64("llama", "readyReplicas"), Some(1));
    let writes = cluster.scale_writes().len();
    run_for(Duration::from_secs(25)).await;
    assert_eq!(cluster.warm_pods("llama").len(), 1, "still loading");
    assert_eq!(cluster.spec_replicas("llama"), scaled_to, "no cascade");
    assert_eq!(cluster.scale_writes().len(), writes);

    eventually(
        "the new pods warm and counted",
        Duration::from_secs(60),
        || cluster.status_i64("llama", "readyReplicas") == Some(scaled_to),
    )
    .await;
    let events = cluster.events("llama", "ScaledUp");
    let first = events
        .iter()
        .find(|e| {
            e["note"]
                .as_str()
                .unwrap()
                .starts_with("Deployment/llama: 1 -> ")
        })
        .unwrap_or_else(|| panic!("no event for the first scale-up: {events:?}"));
    // The reason, in one line.
    let note = first["note"].as_str().unwrap();
    assert!(note.contains("reactive") && !note.contains('\n'), "{note}");
    assert_eq!(first["reportingController"], "gpuscale.dev/scaler");
    assert_eq!(first["type"], "Normal");
    assert_eq!(
        cluster.condition("llama", "AbleToScale").unwrap().1,
        "SucceededRescale"
    );
    assert_eq!(
        cluster.condition("llama", "ScalingActive").unwrap().0,
        "True"
    );
    assert!(
        cluster.ias("llama")["status"]["lastDecision"]
            .as_str()
            .is_some()
    );
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_scale_in_drains_the_chosen_pod_and_the_replicaset_removes_exactly_it() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 3).await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![url(&scaler)],
        THREE_RPS,
        Duration::from_secs(5),
    );
    eventually("three warm pods", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() == 3
    })
    .await;
    // A full window of steady load before the autoscaler looks.
    run_for(Duration::from_secs(40)).await;
    let pods: Vec<String> = cluster.pod_names("llama").into_iter().collect();
    // The least busy pod is the one to go.
    fleet.set_running(&pods[0], 10.0);
    fleet.set_running(&pods[1], 1.0);
    fleet.set_running(&pods[2], 20.0);
    cluster
        .create_ias("llama", spec("llama", 1, 3, json!({})))
        .await;
    ready(&cluster, "llama").await;
    run_for(Duration::from_secs(20)).await;
    assert_eq!(
        cluster.spec_replicas("llama"),
        3,
        "high load keeps three: {}",
        cluster.ias("llama")["status"]["lastDecision"]
    );
    cluster.server.clear_request_log();

    fleet.set_rps(TWO_RPS);
    eventually("one pod draining", Duration::from_secs(60), || {
        !cluster.events("llama", "DrainStarted").is_empty()
    })
    .await;
    let victim = pods[1].clone();
    assert_eq!(fleet.drained(), BTreeSet::from([victim.clone()]));
    // Out of routing first: the agent set its gate False; still there while busy.
    eventually("the victim's gate is down", Duration::from_secs(5), || {
        cluster
            .pods("llama")
            .get(&victim)
            .and_then(|p| gate_of(p).map(str::to_string))
            == Some("False".into())
    })
    .await;
    assert_eq!(cluster.spec_replicas("llama"), 3);
    assert!(cluster.pod_names("llama").contains(&victim));

    eventually(
        "exactly the victim removed",
        Duration::from_secs(90),
        || cluster.spec_replicas("llama") == 2,
    )
    .await;
    let left = cluster.pod_names("llama");
    assert_eq!(
        left,
        BTreeSet::from([pods[0].clone(), pods[2].clone()]),
        "the ReplicaSet removed exactly the drained pod"
    );
    // The deletion cost was set on the victim before /scale was lowered.
    let log = cluster.scaler_requests();
    let cost = log
        .iter()
        .position(|r| {
            r.resource == "pods"
                && r.name.as_deref() == Some(victim.as_str())
                && r.verb == Verb::Patch
        })
        .expect("the victim was annotated");
    let lowered = log
        .iter()
        .position(|r| r.subresource.as_deref() == Some("scale") && r.verb == Verb::Patch)
        .expect("/scale was written");
    assert!(cost < lowered);
    let note = cluster.events("llama", "ScaledDown")[0]["note"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(note.contains("3 -> 2") && note.contains(&victim), "{note}");
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_with_pods_that_still_exist_causes_no_scale_in_and_is_named() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 3).await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![url(&scaler)],
        THREE_RPS,
        Duration::from_secs(5),
    );
    eventually("three warm pods", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() == 3
    })
    .await;
    run_for(Duration::from_secs(40)).await;
    cluster
        .create_ias("llama", spec("llama", 1, 3, json!({})))
        .await;
    ready(&cluster, "llama").await;
    run_for(Duration::from_secs(20)).await;
    assert_eq!(cluster.spec_replicas("llama"), 3);
    let pods = cluster.pods("llama");
    let on = |node: &str| {
        pods.values()
            .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
            .count()
    };
    let (silent, reporting) = if on("node-b") > 0 {
        ("node-b", 3 - on("node-b"))
    } else {
        ("node-a", 3 - on("node-a"))
    };
    // The node goes silent for twice the node TTL (30 s) and more; its
    // pods still exist. Nothing is scaled in or drained, and the decision
    // names what is missing.
    fleet.set_silent(silent, true);
    let said = format!("incomplete: {reporting} of 3 replicas reported (silent: {silent})");
    let mut named = false;
    for _ in 0..75 {
        run_for(Duration::from_secs(1)).await;
        assert_eq!(
            cluster.spec_replicas("llama"),
            3,
            "scaled in on missing data: {}",
            cluster.ias("llama")["status"]["lastDecision"]
        );
        named |= cluster.ias("llama")["status"]["lastDecision"]
            .as_str()
            .is_some_and(|d| d.contains(&said));
    }
    assert!(
        named,
        "{said}: {}",
        cluster.ias("llama")["status"]["lastDecision"]
    );
    assert!(cluster.events("llama", "DrainStarted").is_empty());
    assert!(fleet.drained().is_empty());
    // The status condition says so too.
    let scaling = cluster.ias("llama")["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ScalingActive")
        .cloned()
        .unwrap();
    assert_eq!(scaling["reason"], "TelemetryIncomplete", "{scaling}");
    assert!(
        scaling["message"].as_str().unwrap().contains(&said),
        "{scaling}"
    );
    // Back: the decision is complete again.
    fleet.set_silent(silent, false);
    eventually("complete again", Duration::from_secs(30), || {
        cluster.ias("llama")["status"]["lastDecision"]
            .as_str()
            .is_some_and(|d| !d.contains("incomplete"))
    })
    .await;
    scaler.shutdown().await.unwrap();
}

/// Starts a scaler for a Deployment at 3 replicas whose load needs 1, with
/// a scale-down stabilization window of 120 s and a status that says a
/// previous scaler decided 3 replicas `age` before this one starts (`None`:
/// no status). Returns the seconds from the start to the first decision
/// below 3 (the status's `desiredReplicas`).
async fn first_scale_in_after_a_restart(age: Option<Duration>, generation: i64) -> u64 {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 3).await;
    cluster
        .create_ias(
            "llama",
            spec(
                "llama",
                1,
                3,
                json!({"behavior": {"scaleDown": {"stabilizationWindowSeconds": 120}}}),
            ),
        )
        .await;
    if let Some(age) = age {
        let at = CLOCK_START_MS - i64::try_from(age.as_millis()).expect("test setup");
        let time = k8s_openapi::jiff::Timestamp::from_millisecond(at)
            .expect("test setup")
            .to_string();
        cluster
            .set_ias_status(
                "llama",
                json!({
                    "observedGeneration": generation,
                    "desiredReplicas": 3,
                    "currentReplicas": 3,
                    "lastDecision": "hold at 3: reactive",
                    "lastDecisionTime": time,
                }),
            )
            .await;
    }
    // The pods are warm (their agents set the gates) before the scaler
    // starts, as after a restart: the agents stream to its address.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("test setup")
        .local_addr()
        .expect("test setup");
    let _fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![format!("http://{addr}")],
        LOW_RPS,
        Duration::from_secs(5),
    );
    eventually("three warm pods", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() == 3
    })
    .await;
    // As deployed: the first decision waits until every ready pod reported.
    let mut config = scaler_config();
    config.listen = addr;
    config.warmup = Duration::from_secs(30);
    let started = tokio::time::Instant::now();
    let scaler = start_scaler_with(&cluster, "a", config).await;
    eventually("a scale-in", Duration::from_secs(200), || {
        cluster
            .status_i64("llama", "desiredReplicas")
            .is_some_and(|d| d < 3)
    })
    .await;
    let after = started.elapsed().as_secs();
    // The status says when its decision was made, on the scaler's clock.
    let written = cluster.ias("llama")["status"]["lastDecisionTime"]
        .as_str()
        .expect("test setup")
        .parse::<k8s_openapi::jiff::Timestamp>()
        .expect("test setup")
        .as_millisecond();
    assert!(
        written >= CLOCK_START_MS
            && written <= CLOCK_START_MS + 1000 * i64::try_from(after + 1).expect("test setup"),
        "lastDecisionTime {written}"
    );
    scaler.shutdown().await.expect("test setup");
    after
}

#[tokio::test(start_paused = true)]
async fn a_restarted_scaler_holds_scale_in_to_the_persisted_decisions_window() {
    // The previous scaler decided 3 replicas 100 s before this one started:
    // its 120 s window (and the 15 s the written time may lag) ends 35 s
    // in. Held until then, not a whole window from the start.
    let recent = first_scale_in_after_a_restart(Some(Duration::from_secs(100)), 1).await;
    assert!(
        (35..=60).contains(&recent),
        "first scale-in {recent} s after the start"
    );
    // Without a status, or with one older than the window or of another
    // generation of the spec: a whole window from the first decision.
    for (age, generation) in [
        (None, 1),
        (Some(Duration::from_secs(200)), 1),
        (Some(Duration::from_secs(100)), 7),
    ] {
        let fresh = first_scale_in_after_a_restart(age, generation).await;
        assert!(
            (120..=150).contains(&fresh),
            "first scale-in {fresh} s after the start ({age:?}, generation {generation})"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_agent_an_hour_ahead_changes_nothing_and_is_announced() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 2).await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![url(&scaler)],
        TWO_RPS,
        Duration::from_secs(5),
    );
    // node-b's agent runs an hour ahead from its first report on.
    fleet.set_clock_skew("node-b", 3_600_000);
    eventually("two warm pods", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() == 2
    })
    .await;
    run_for(Duration::from_secs(40)).await;
    cluster
        .create_ias("llama", spec("llama", 1, 3, json!({})))
        .await;
    ready(&cluster, "llama").await;
    run_for(Duration::from_secs(30)).await;
    // Two replicas' worth of load is read as such: nothing scaled.
    assert_eq!(
        cluster.spec_replicas("llama"),
        2,
        "{}",
        cluster.ias("llama")["status"]["lastDecision"]
    );
    let events = cluster.events("llama", "AgentClockSkewed");
    assert_eq!(events.len(), 1, "{events:?}");
    let note = events[0]["note"].as_str().unwrap();
    assert!(
        note.contains("node-b") && note.contains("+3600 s"),
        "{note}"
    );
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_protected_pod_survives_scale_in() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 3).await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![url(&scaler)],
        THREE_RPS,
        Duration::from_secs(5),
    );
    eventually("three warm pods", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() == 3
    })
    .await;
    run_for(Duration::from_secs(40)).await;
    let pods: Vec<String> = cluster.pod_names("llama").into_iter().collect();
    // The idlest pod is protected: the best victim that may never be one.
    fleet.set_running(&pods[0], 0.0);
    fleet.set_running(&pods[1], 5.0);
    fleet.set_running(&pods[2], 9.0);
    cluster
        .annotate_pod(&pods[0], "gpuscale.dev/scale-in-protection", "true")
        .await;
    cluster
        .create_ias("llama", spec("llama", 1, 3, json!({})))
        .await;
    ready(&cluster, "llama").await;
    fleet.set_rps(0.5);
    eventually("scaled in to one", Duration::from_secs(180), || {
        cluster.spec_replicas("llama") == 1 && cluster.pods("llama").len() == 1
    })
    .await;
    assert_eq!(
        cluster.pod_names("llama"),
        BTreeSet::from([pods[0].clone()])
    );
    assert!(!fleet.drained().contains(&pods[0]));
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_replica_on_an_unhealthy_gpu_is_the_scale_in_victim_with_an_event() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 3).await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![url(&scaler)],
        THREE_RPS,
        Duration::from_secs(5),
    );
    eventually("three warm pods", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() == 3
    })
    .await;
    run_for(Duration::from_secs(40)).await;
    let pods: Vec<String> = cluster.pod_names("llama").into_iter().collect();
    // The busiest pod is on a GPU that fell off the bus: without its fault
    // it would be the last victim.
    fleet.set_running(&pods[0], 0.0);
    fleet.set_running(&pods[1], 5.0);
    fleet.set_running(&pods[2], 9.0);
    fleet.set_gpu_fault(&pods[2], "Xid 79: GPU has fallen off the bus");
    cluster
        .create_ias("llama", spec("llama", 1, 3, json!({})))
        .await;
    ready(&cluster, "llama").await;
    eventually("an Event says why", Duration::from_secs(30), || {
        !cluster.events("llama", "GpuUnhealthy").is_empty()
    })
    .await;
    let note = cluster.events("llama", "GpuUnhealthy")[0]["note"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        note.contains(&pods[2]) && note.contains("Xid 79") && note.contains("not counted"),
        "{note}"
    );
    fleet.set_rps(TWO_RPS);
    eventually("scaled in by one", Duration::from_secs(180), || {
        cluster.pods("llama").len() == 2
    })
    .await;
    assert!(
        !cluster.pod_names("llama").contains(&pods[2]),
        "the replica on the unhealthy GPU went first: {:?}",
        cluster.pod_names("llama")
    );
    assert!(fleet.drained().contains(&pods[2]));
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

fn finalizers(cluster: &Cluster, name: &str) -> Vec<String> {
    cluster.ias(name)["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn drains_do_not_outlive_an_autoscaler_deleted_while_no_scaler_runs() {
    use gpuscale_kube::drain::{
        DELETION_COST_ANNOTATION, DRAIN_ANNOTATION, DrainPhase, DrainRecord,
    };
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 3).await;
    cluster
        .create_ias("llama", spec("llama", 3, 3, json!({})))
        .await;
    let a = start_scaler(&cluster, "a").await;
    ready(&cluster, "llama").await;
    assert_eq!(finalizers(&cluster, "llama"), [gpuscale_kube::FINALIZER]);
    a.shutdown().await.unwrap();
    eventually("three pods", Duration::from_secs(30), || {
        cluster.pod_names("llama").len() == 3
    })
    .await;

    // What a scaler stopped mid-scale-in leaves: one pod draining, one
    // being removed (with the deletion cost it set), and a user's own
    // deletion cost on the third, which is not gpuscale's to remove.
    let pods: Vec<String> = cluster.pod_names("llama").into_iter().collect();
    let now = gpuscale_core::Timestamp::from_millis(CLOCK_START_MS);
    let draining = DrainRecord::start(now, 3600, "3 -> 2", true);
    let mut removing = DrainRecord::start(now, 3600, "3 -> 2", true);
    removing.phase = DrainPhase::Removing { scale_to: 2 };
    cluster
        .annotate_pod(&pods[0], DRAIN_ANNOTATION, &draining.render())
        .await;
    cluster
        .annotate_pod(&pods[1], DRAIN_ANNOTATION, &removing.render())
        .await;
    cluster
        .annotate_pod(&pods[1], DELETION_COST_ANNOTATION, "-2147483648")
        .await;
    cluster
        .annotate_pod(&pods[2], DELETION_COST_ANNOTATION, "100")
        .await;

    cluster.delete_ias("llama").await;
    run_for(Duration::from_secs(30)).await;
    let held = cluster.ias("llama");
    assert!(
        held["metadata"]["deletionTimestamp"].is_string(),
        "the finalizer holds the deleted autoscaler: {held}"
    );
    let annotation = |pod: &str, key: &str| -> Option<String> {
        cluster.pods("llama")[pod]["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string)
    };
    assert!(annotation(&pods[0], DRAIN_ANNOTATION).is_some());

    cluster.server.clear_request_log();
    let b = start_scaler(&cluster, "b").await;
    eventually(
        "the deleted autoscaler gone",
        Duration::from_secs(60),
        || cluster.ias("llama").is_null(),
    )
    .await;
    for pod in &pods {
        assert_eq!(annotation(pod, DRAIN_ANNOTATION), None, "{pod}");
    }
    assert_eq!(annotation(&pods[1], DELETION_COST_ANNOTATION), None);
    assert_eq!(
        annotation(&pods[2], DELETION_COST_ANNOTATION).as_deref(),
        Some("100"),
        "a user's deletion cost stays"
    );
    assert_eq!(cluster.pod_names("llama").len(), 3);
    assert_eq!(cluster.spec_replicas("llama"), 3);
    let cancelled: BTreeSet<String> = cluster
        .events("llama", "DrainCancelled")
        .iter()
        .filter_map(|e| e["related"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        cancelled,
        BTreeSet::from([pods[0].clone(), pods[1].clone()])
    );
    // The test's own DELETE aside, everything was the scaler's, and allowed.
    let log: Vec<_> = cluster
        .server
        .request_log()
        .into_iter()
        .filter(|r| r.verb != Verb::Delete)
        .collect();
    rbac::assert_allowed(&log);

    // Re-created and deleted while a scaler runs: the scaler that finished
    // the earlier deletion acts on the new object, then finishes its
    // deletion at once. This phase runs on the real clock: with tokio's
    // clock paused, the watch the scaler opened at start-up left these
    // events unread in its socket while the clock auto-advanced (the
    // reconcile follows as soon as time runs for real; the controller's
    // watch, status writer and sweep never stop), so the paused clock
    // would time out here without anything in the controller being wrong.
    tokio::time::resume();
    cluster
        .create_ias("llama", spec("llama", 3, 3, json!({})))
        .await;
    eventually("the finalizer added", Duration::from_secs(60), || {
        finalizers(&cluster, "llama") == [gpuscale_kube::FINALIZER]
    })
    .await;
    cluster.delete_ias("llama").await;
    eventually("deleted", Duration::from_secs(10), || {
        cluster.ias("llama").is_null()
    })
    .await;
    b.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_manual_edit_of_replicas_is_adopted_with_an_event() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 2).await;
    let scaler = start_scaler(&cluster, "a").await;
    let _fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![url(&scaler)],
        TWO_RPS,
        Duration::from_secs(5),
    );
    // Default scale-down stabilization (300 s): no fighting over minutes.
    cluster
        .create_ias(
            "llama",
            spec(
                "llama",
                1,
                6,
                json!({"behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}),
            ),
        )
        .await;
    ready(&cluster, "llama").await;
    run_for(Duration::from_secs(20)).await;
    let writes_before = cluster.scale_writes().len();

    cluster.user_scales("llama", 4).await;
    eventually("the edit adopted", Duration::from_secs(30), || {
        !cluster.events("llama", "ReplicasAdopted").is_empty()
    })
    .await;
    let note = cluster.events("llama", "ReplicasAdopted")[0]["note"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(note.contains("from 2 to 4"), "{note}");
    eventually("the condition says so", Duration::from_secs(10), || {
        cluster
            .condition("llama", "AbleToScale")
            .is_some_and(|c| c.1 == "ExternalChangeAdopted" && c.2.contains("from 2 to 4"))
    })
    .await;
    run_for(Duration::from_secs(60)).await;
    assert_eq!(cluster.spec_replicas("llama"), 4, "not reverted");
    assert_eq!(cluster.scale_writes().len(), writes_before);
    assert_eq!(cluster.status_i64("llama", "currentReplicas"), Some(4));
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn advisory_mode_never_patches() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    cluster
        .create_ias("llama", spec("llama", 1, 6, json!({"advisory": true})))
        .await;
    let scaler = start_scaler(&cluster, "a").await;
    let _fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![url(&scaler)],
        HIGH_RPS,
        Duration::from_secs(5),
    );
    ready(&cluster, "llama").await;
    eventually(
        "a recommendation above the current count",
        Duration::from_secs(90),
        || {
            cluster
                .status_i64("llama", "desiredReplicas")
                .is_some_and(|d| d > 1)
        },
    )
    .await;
    run_for(Duration::from_secs(30)).await;
    assert_eq!(cluster.spec_replicas("llama"), 1);
    let writes: Vec<_> = cluster
        .scaler_requests()
        .into_iter()
        .filter(|r| {
            r.subresource.as_deref() == Some("scale")
                || (r.resource == "pods" && r.verb != Verb::List && r.verb != Verb::Watch)
        })
        .filter(|r| r.verb != Verb::Get)
        .collect();
    assert!(writes.is_empty(), "advisory mode wrote: {writes:?}");
    assert_eq!(cluster.condition("llama", "Advisory").unwrap().0, "True");
    assert!(!cluster.events("llama", "AdvisoryRecommendation").is_empty());
    assert!(
        cluster.ias("llama")["status"]["lastDecision"]
            .as_str()
            .unwrap()
            .contains("[advisory]")
    );
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn each_bad_input_yields_its_condition_and_event_and_nothing_is_scaled() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    // A kind without /scale.
    let cm: k8s_openapi::api::core::v1::ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "settings", "namespace": NS}})).unwrap();
    kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(cluster.client.clone(), NS)
        .create(&post(), &cm)
        .await
        .unwrap();
    let cases = [
        (
            "missing",
            spec("absent", 1, 4, json!({})),
            "TargetNotFound",
            "does not exist",
        ),
        (
            "noscale",
            spec(
                "settings",
                1,
                4,
                json!({"target": {"apiVersion": "v1", "kind": "ConfigMap", "name": "settings"}}),
            ),
            "TargetNotScalable",
            "no /scale",
        ),
        (
            "minmax",
            spec("llama", 5, 2, json!({})),
            "InvalidSpec",
            "spec.minReplicas",
        ),
        (
            "profile",
            spec(
                "llama",
                1,
                4,
                json!({"performanceModel": {"preset": "tpu-v9-llama"}}),
            ),
            "UnknownPerformanceModel",
            "tpu-v9-llama",
        ),
        (
            "nokind",
            spec(
                "x",
                1,
                4,
                json!({"target": {"apiVersion": "example.com/v1", "kind": "Widget", "name": "x"}}),
            ),
            "TargetKindUnknown",
            "Widget",
        ),
    ];
    for (name, s, _, _) in &cases {
        cluster.create_ias(name, s.clone()).await;
    }
    let scaler = start_scaler(&cluster, "a").await;
    let _fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![url(&scaler)],
        HIGH_RPS,
        Duration::from_secs(5),
    );
    for (name, _, reason, words) in &cases {
        eventually(
            &format!("{name}: Ready=False {reason}"),
            Duration::from_secs(30),
            || {
                cluster
                    .condition(name, "Ready")
                    .is_some_and(|c| c.0 == "False" && c.1 == *reason && c.2.contains(words))
            },
        )
        .await;
        assert_eq!(cluster.condition(name, "AbleToScale").unwrap().0, "False");
        let events = cluster.events(name, reason);
        assert_eq!(events.len(), 1, "{name}: {events:?}");
        assert_eq!(events[0]["type"], "Warning");
    }
    // No crash loop: minutes later nothing repeats and nothing was scaled.
    // (A reconcile that starts from a cache older than the first status
    // write may write the same status once more; after that, nothing.)
    let status_writes = || {
        cluster
            .scaler_requests()
            .iter()
            .filter(|r| r.subresource.as_deref() == Some("status"))
            .count()
    };
    run_for(Duration::from_secs(30)).await;
    let settled = status_writes();
    assert!(
        (cases.len()..=3 * cases.len()).contains(&settled),
        "{settled} status writes for {} bad autoscalers",
        cases.len()
    );
    run_for(Duration::from_secs(120)).await;
    for (name, _, reason, _) in &cases {
        assert_eq!(cluster.events(name, reason).len(), 1, "{name}");
    }
    assert!(cluster.scale_writes().is_empty());
    assert_eq!(status_writes(), settled, "status writes repeat");

    // Fixing one makes it act.
    cluster.patch_ias("minmax", json!({"minReplicas": 1})).await;
    ready(&cluster, "minmax").await;
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn api_errors_are_retried_and_a_conflict_rereads() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    // Discovery and the first /scale reads fail: the reconcile backs off.
    cluster.server.inject_fault(
        Fault::new(FaultKind::Status(503))
            .resource("deployments/scale")
            .verb(Verb::Get)
            .times(3),
    );
    cluster
        .create_ias("llama", spec("llama", 1, 6, json!({})))
        .await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![url(&scaler)],
        LOW_RPS,
        Duration::from_secs(5),
    );
    ready(&cluster, "llama").await;
    eventually("a warm replica", Duration::from_secs(60), || {
        cluster.status_i64("llama", "readyReplicas") == Some(1)
    })
    .await;
    // The scale-up's write conflicts twice and is throttled once: re-read, retried.
    cluster.server.inject_fault(
        Fault::new(FaultKind::Status(409))
            .resource("deployments/scale")
            .verb(Verb::Patch)
            .times(2),
    );
    cluster.server.inject_fault(
        Fault::new(FaultKind::Status(429))
            .resource("deployments/scale")
            .verb(Verb::Patch)
            .times(1),
    );
    fleet.set_rps(HIGH_RPS);
    eventually(
        "scaled up despite the errors",
        Duration::from_secs(60),
        || cluster.spec_replicas("llama") > 1,
    )
    .await;
    let statuses: Vec<u16> = cluster.scale_writes().iter().map(|r| r.status).collect();
    assert!(
        statuses.contains(&409) && statuses.contains(&429),
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&200));
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_watch_relists_and_the_controller_keeps_up() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    cluster.create_deployment("mistral", 1).await;
    cluster
        .create_ias("llama", spec("llama", 1, 6, json!({})))
        .await;
    let scaler = start_scaler(&cluster, "a").await;
    let _fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![url(&scaler)],
        LOW_RPS,
        Duration::from_secs(5),
    );
    ready(&cluster, "llama").await;
    cluster.server.compact_watch_history();
    cluster
        .create_ias(
            "mistral",
            spec(
                "mistral",
                1,
                6,
                json!({"behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}),
            ),
        )
        .await;
    ready(&cluster, "mistral").await;
    // The pod watch relisted too: the new pods of a scale-up are seen.
    cluster.server.compact_watch_history();
    cluster.user_scales("mistral", 2).await;
    eventually(
        "mistral's second replica counted",
        Duration::from_secs(60),
        || cluster.status_i64("mistral", "readyReplicas") == Some(2),
    )
    .await;
    let relists = cluster
        .scaler_requests()
        .iter()
        .filter(|r| r.resource == "inferenceautoscalers" && r.verb == Verb::List)
        .count();
    assert!(relists >= 2, "the controller relisted after 410 Gone");
    rbac::assert_allowed(&cluster.server.request_log());
    scaler.shutdown().await.unwrap();
}
