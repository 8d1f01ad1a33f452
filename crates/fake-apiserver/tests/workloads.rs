//! The workload simulation through the real kube-rs client: `/scale`,
//! the ReplicaSet victim order, readiness gates, the kubelet's start delay
//! and StatefulSets.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{api_error, condition, deployment, eventually, is_ready, server};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const GATE: &str = "gpuscale.dev/engine-warm";

async fn pods_of(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
}

async fn wait_running(pods: &Api<Pod>, app: &str, n: usize) {
    eventually(&format!("{n} running pods of {app}"), || async {
        let list = pods_of(pods, app).await;
        list.len() == n
            && list
                .iter()
                .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
}

#[tokio::test]
async fn scale_subresource_changes_the_number_of_pods() {
    let (_server, client) = server(Duration::from_millis(10)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    deploys
        .create(&PostParams::default(), &deployment("llm", 2, None))
        .await
        .unwrap();
    assert_eq!(pods_of(&pods, "llm").await.len(), 2);

    let scale = deploys.get_scale("llm").await.unwrap();
    assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(scale.status.as_ref().unwrap().replicas, 2);
    let selector = scale.status.as_ref().unwrap().selector.clone().unwrap();
    assert_eq!(selector, "app=llm");

    deploys
        .patch_scale(
            "llm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    let created = pods_of(&pods, "llm").await;
    assert_eq!(created.len(), 5);
    let p = &created[0];
    assert!(p.name_any().starts_with("llm-"));
    let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "ReplicaSet");
    assert!(p.labels().contains_key("pod-template-hash"));
    wait_running(&pods, "llm", 5).await;
    eventually("deployment reports 5 ready", || async {
        deploys
            .get("llm")
            .await
            .unwrap()
            .status
            .unwrap()
            .ready_replicas
            == Some(5)
    })
    .await;

    deploys
        .patch_scale(
            "llm",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(pods_of(&pods, "llm").await.len(), 1);

    // replace_scale with a stale resourceVersion conflicts; with the current one it works.
    let current = deploys.get_scale("llm").await.unwrap();
    let mut stale = scale.clone();
    stale.spec.as_mut().unwrap().replicas = Some(3);
    assert_eq!(
        api_error(
            deploys
                .replace_scale("llm", &PostParams::default(), &stale)
                .await
                .unwrap_err()
        )
        .0,
        409
    );
    let mut fresh = current.clone();
    fresh.spec.as_mut().unwrap().replicas = Some(3);
    deploys
        .replace_scale("llm", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(pods_of(&pods, "llm").await.len(), 3);

    let (code, reason) = api_error(
        deploys
            .patch_scale(
                "llm",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": -1}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
}

#[tokio::test]
async fn scale_in_removes_not_ready_pods_first_then_the_lowest_deletion_cost() {
    let (server, client) = server(Duration::from_millis(10)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    deploys
        .create(&PostParams::default(), &deployment("vic", 5, None))
        .await
        .unwrap();
    wait_running(&pods, "vic", 5).await;
    eventually("all ready", || async {
        pods_of(&pods, "vic").await.iter().all(is_ready)
    })
    .await;
    let names: Vec<String> = pods_of(&pods, "vic")
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let cost = |c: &str| {
        Patch::Merge(
            json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": c}}}),
        )
    };
    // names[0]: not ready (high cost does not save it); names[1]: cheapest ready pod.
    pods.patch(&names[0], &PatchParams::default(), &cost("1000"))
        .await
        .unwrap();
    server
        .set_pod_containers_ready("default", &names[0], false)
        .unwrap();
    pods.patch(&names[1], &PatchParams::default(), &cost("-50"))
        .await
        .unwrap();
    pods.patch(&names[2], &PatchParams::default(), &cost("10"))
        .await
        .unwrap();
    pods.patch(&names[3], &PatchParams::default(), &cost("20"))
        .await
        .unwrap();
    pods.patch(&names[4], &PatchParams::default(), &cost("30"))
        .await
        .unwrap();
    assert!(!is_ready(&pods.get(&names[0]).await.unwrap()));

    deploys
        .patch_scale(
            "vic",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    let left: Vec<String> = pods_of(&pods, "vic")
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert!(
        !left.contains(&names[0]),
        "the not-ready pod goes first: {left:?}"
    );

    deploys
        .patch_scale(
            "vic",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    let mut left: Vec<String> = pods_of(&pods, "vic")
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    left.sort();
    let mut expected = vec![names[3].clone(), names[4].clone()];
    expected.sort();
    assert_eq!(left, expected, "then the lowest deletion costs");
}

#[tokio::test]
async fn a_pod_is_ready_only_while_its_readiness_gate_condition_is_true() {
    let (_server, client) = server(Duration::from_millis(10)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    deploys
        .create(&PostParams::default(), &deployment("gated", 2, Some(GATE)))
        .await
        .unwrap();
    wait_running(&pods, "gated", 2).await;
    let list = pods_of(&pods, "gated").await;
    for p in &list {
        assert_eq!(condition(p, "ContainersReady"), Some("True"));
        assert_eq!(
            condition(p, "Ready"),
            Some("False"),
            "a missing gate condition counts as False"
        );
    }
    assert_eq!(
        deploys
            .get("gated")
            .await
            .unwrap()
            .status
            .unwrap()
            .ready_replicas,
        None
    );

    let name = list[0].name_any();
    let set_gate = |status: &str| {
        Patch::Strategic(json!({"status": {"conditions": [{
            "type": GATE, "status": status, "reason": "EngineWarm", "lastTransitionTime": "2025-01-01T00:00:00Z"
        }]}}))
    };
    let patched = pods
        .patch_status(&name, &PatchParams::default(), &set_gate("True"))
        .await
        .unwrap();
    assert_eq!(condition(&patched, GATE), Some("True"));
    assert_eq!(condition(&patched, "Ready"), Some("True"));
    for kubelet_condition in ["PodScheduled", "Initialized", "ContainersReady"] {
        assert_eq!(
            condition(&patched, kubelet_condition),
            Some("True"),
            "{kubelet_condition} is kept"
        );
    }
    assert_eq!(
        deploys
            .get("gated")
            .await
            .unwrap()
            .status
            .unwrap()
            .ready_replicas,
        Some(1)
    );
    assert_eq!(
        condition(&pods.get(&list[1].name_any()).await.unwrap(), "Ready"),
        Some("False")
    );

    // Draining: the gate goes False, the pod leaves Ready but keeps running.
    let drained = pods
        .patch_status(&name, &PatchParams::default(), &set_gate("False"))
        .await
        .unwrap();
    assert_eq!(condition(&drained, "Ready"), Some("False"));
    assert_eq!(drained.status.unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(
        deploys
            .get("gated")
            .await
            .unwrap()
            .status
            .unwrap()
            .ready_replicas,
        None
    );

    // The main resource cannot change status.
    let main = pods
        .patch(&name, &PatchParams::default(), &set_gate("True"))
        .await
        .unwrap();
    assert_eq!(condition(&main, GATE), Some("False"));
}

#[tokio::test(start_paused = true)]
async fn pods_start_after_the_configured_delay_in_tokio_time() {
    let (server, client) = server(Duration::from_secs(120)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    deploys
        .create(&PostParams::default(), &deployment("slow", 2, None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(121)).await;
    let list = pods_of(&pods, "slow").await;
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(is_ready));
    assert_eq!(
        deploys
            .get("slow")
            .await
            .unwrap()
            .status
            .unwrap()
            .available_replicas,
        Some(2)
    );

    // With no nodes, new pods stay unscheduled and Pending.
    server.set_nodes(Vec::new());
    deploys
        .patch_scale(
            "slow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
    let pending: Vec<Pod> = pods_of(&pods, "slow")
        .await
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"))
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(condition(&pending[0], "PodScheduled"), Some("False"));
}

#[tokio::test]
async fn statefulsets_create_ordinal_pods_and_remove_the_highest_first() {
    let (_server, client) = server(Duration::from_millis(5)).await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let sts: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 3, "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                         "spec": {"containers": [{"name": "engine", "image": "sglang:0.5"}]}}
        }
    }))
    .unwrap();
    sets.create(&PostParams::default(), &sts).await.unwrap();
    eventually("three ordered pods", || async {
        let mut names: Vec<String> = pods_of(&pods, "db")
            .await
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        names.sort();
        names == ["db-0", "db-1", "db-2"]
    })
    .await;
    sets.patch_scale(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .unwrap();
    let names: Vec<String> = pods_of(&pods, "db")
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(names, ["db-0"]);
    eventually("status follows", || async {
        sets.get("db").await.unwrap().status.unwrap().ready_replicas == Some(1)
    })
    .await;
}
