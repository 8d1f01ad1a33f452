//! The API surface through the real kube-rs client: discovery, CRUD,
//! conflicts, patches, selectors, watches, CRDs, apply, the request log and
//! injected faults.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{api_error, deployment, eventually, pod, server};
use futures::{StreamExt, TryStreamExt};
use gpuscale_fake_apiserver::{Fault, FaultKind, Verb};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::discovery::Discovery;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

const SLOW: Duration = Duration::from_secs(3600);

fn lease(name: &str, holder: &str) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}
    }))
    .unwrap()
}

#[tokio::test]
async fn discovery_lists_builtin_resources_with_their_subresources() {
    let (_server, client) = server(SLOW).await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let apps = discovery.get("apps").expect("apps group is served");
    let (_, caps) = apps
        .recommended_resources()
        .into_iter()
        .find(|(ar, _)| ar.plural == "deployments")
        .expect("deployments are served");
    let subs: Vec<String> = caps
        .subresources
        .iter()
        .map(|(ar, _)| ar.plural.clone())
        .collect();
    assert!(subs.contains(&"scale".to_string()), "{subs:?}");
    assert!(subs.contains(&"status".to_string()), "{subs:?}");
    assert!(discovery.get("coordination.k8s.io").is_some());
    assert!(discovery.get("events.k8s.io").is_some());
    let core = discovery.get("").expect("core group is served");
    assert!(
        core.recommended_resources()
            .iter()
            .any(|(ar, _)| ar.plural == "pods")
    );
}

#[tokio::test]
async fn crud_round_trip_with_conflicts_on_stale_resource_versions() {
    let (_server, client) = server(SLOW).await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let created = leases
        .create(&PostParams::default(), &lease("leader", "a"))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    let rv1 = created.resource_version().unwrap();

    let (code, reason) = api_error(
        leases
            .create(&PostParams::default(), &lease("leader", "b"))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let mut next = created.clone();
    next.spec.as_mut().unwrap().holder_identity = Some("b".to_string());
    let updated = leases
        .replace("leader", &PostParams::default(), &next)
        .await
        .unwrap();
    assert_ne!(updated.resource_version().unwrap(), rv1);
    assert_eq!(updated.spec.unwrap().holder_identity.as_deref(), Some("b"));

    // A second contender still holding the old resourceVersion loses.
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".to_string());
    let (code, reason) = api_error(
        leases
            .replace("leader", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    leases
        .delete("leader", &DeleteParams::default())
        .await
        .unwrap();
    let (code, reason) = api_error(leases.get("leader").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn generate_name_gives_distinct_names_and_invalid_objects_are_rejected() {
    let (_server, client) = server(SLOW).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let mut p = pod("", json!({"app": "x"}));
    p.metadata.name = None;
    p.metadata.generate_name = Some("worker-".to_string());
    let a = pods.create(&PostParams::default(), &p).await.unwrap();
    let b = pods.create(&PostParams::default(), &p).await.unwrap();
    assert!(a.name_any().starts_with("worker-"));
    assert_ne!(a.name_any(), b.name_any());

    let mut bad = pod("bad-cost", json!({}));
    bad.metadata.annotations = Some(
        [(
            "controller.kubernetes.io/pod-deletion-cost".to_string(),
            "cheap".to_string(),
        )]
        .into(),
    );
    let (code, reason) = api_error(pods.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
}

#[tokio::test]
async fn merge_json_and_strategic_patches_apply_their_own_semantics() {
    let (_server, client) = server(SLOW).await;
    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    let mut d = deployment("web", 0, None);
    d.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers
        .push(serde_json::from_value(json!({"name": "sidecar", "image": "envoy:1"})).unwrap());
    deploys.create(&PostParams::default(), &d).await.unwrap();

    let merged = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "ml"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.labels().get("team").map(String::as_str), Some("ml"));

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"owner": "gpuscale"}}
    ]))
    .unwrap();
    let jsonp = deploys
        .patch("web", &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .unwrap();
    assert_eq!(
        jsonp.annotations().get("owner").map(String::as_str),
        Some("gpuscale")
    );

    // Strategic merge: the container list merges by name, the sidecar survives.
    let smp = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "engine", "image": "vllm/vllm-openai:v1.0"}
            ]}}}})),
        )
        .await
        .unwrap();
    let containers = smp.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(containers.len(), 2);
    assert_eq!(
        containers[0].image.as_deref(),
        Some("vllm/vllm-openai:v1.0")
    );
    assert_eq!(containers[1].name, "sidecar");

    // A JSON merge patch replaces the whole list.
    let mp = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "engine", "image": "vllm/vllm-openai:v1.1"}
            ]}}}})),
        )
        .await
        .unwrap();
    assert_eq!(mp.spec.unwrap().template.spec.unwrap().containers.len(), 1);

    // $patch: delete removes one keyed item.
    let del = deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"team": null}}})),
        )
        .await
        .unwrap();
    assert!(!del.labels().contains_key("team"));

    // A patch carrying a stale resourceVersion conflicts.
    let (code, _) = api_error(
        deploys
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"x": "y"}}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409);
}

#[tokio::test]
async fn generation_follows_spec_and_main_writes_never_touch_status() {
    let (_server, client) = server(SLOW).await;
    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    deploys
        .create(&PostParams::default(), &deployment("gen", 0, None))
        .await
        .unwrap();
    let d = deploys.get("gen").await.unwrap();
    assert_eq!(d.metadata.generation, Some(1));

    let d = deploys
        .patch(
            "gen",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        d.metadata.generation,
        Some(1),
        "metadata changes keep the generation"
    );

    let d = deploys
        .patch(
            "gen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minReadySeconds": 5}, "status": {"readyReplicas": 99}})),
        )
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(2));
    assert_ne!(d.status.as_ref().and_then(|s| s.ready_replicas), Some(99));

    let d = deploys
        .patch_status(
            "gen",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"minReadySeconds": 50}, "status": {"collisionCount": 3}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(d.status.unwrap().collision_count, Some(3));
    assert_eq!(
        d.spec.unwrap().min_ready_seconds,
        Some(5),
        "status writes never change spec"
    );
    assert_eq!(d.metadata.generation, Some(2));
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let (_server, client) = server(SLOW).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, labels) in [
        ("a", json!({"app": "llm", "tier": "gpu"})),
        ("b", json!({"app": "llm", "tier": "cpu"})),
        ("c", json!({"app": "web"})),
        ("d", json!({"app": "llm", "canary": "yes"})),
    ] {
        pods.create(&PostParams::default(), &pod(name, labels))
            .await
            .unwrap();
    }
    let names = |list: kube::api::ObjectList<Pod>| -> Vec<String> {
        list.items.iter().map(ResourceExt::name_any).collect()
    };
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(
        names(pods.list(&q("app=llm")).await.unwrap()),
        ["a", "b", "d"]
    );
    assert_eq!(names(pods.list(&q("app!=llm")).await.unwrap()), ["c"]);
    assert_eq!(
        names(pods.list(&q("tier in (gpu,tpu)")).await.unwrap()),
        ["a"]
    );
    assert_eq!(
        names(pods.list(&q("app=llm,tier notin (gpu)")).await.unwrap()),
        ["b", "d"]
    );
    assert_eq!(names(pods.list(&q("canary")).await.unwrap()), ["d"]);
    assert_eq!(
        names(pods.list(&q("app=llm,!canary")).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().fields("metadata.name=c"))
                .await
                .unwrap()
        ),
        ["c"]
    );
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node_list = nodes.list(&ListParams::default()).await.unwrap();
    let node_names: Vec<String> = node_list.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(node_names, ["node-a", "node-b"]);
    let on_a = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert!(!on_a.items.is_empty());
    assert!(
        on_a.items
            .iter()
            .all(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("node-a"))
    );
    let (code, _) = api_error(pods.list(&q("app in gpu")).await.unwrap_err());
    assert_eq!(code, 400);
    // Paginated lists return every item once.
    let page1 = pods.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(page1.items.len(), 3);
    let token = page1.metadata.continue_.clone().unwrap();
    let page2 = pods
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(page2), ["d"]);
    let all: Api<Pod> = Api::all(client);
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        4
    );
}

#[tokio::test]
async fn watch_from_a_resource_version_receives_later_events_only() {
    let (_server, client) = server(SLOW).await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    leases
        .create(&PostParams::default(), &lease("before", "a"))
        .await
        .unwrap();
    let rv = leases
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = leases
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap()
        .boxed();
    leases
        .create(&PostParams::default(), &lease("after", "a"))
        .await
        .unwrap();
    leases
        .patch(
            "after",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "b"}})),
        )
        .await
        .unwrap();
    leases
        .delete("after", &DeleteParams::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(l) => seen.push(format!("added {}", l.name_any())),
            WatchEvent::Modified(l) => seen.push(format!(
                "modified {} {}",
                l.name_any(),
                l.spec.unwrap().holder_identity.unwrap()
            )),
            WatchEvent::Deleted(l) => seen.push(format!("deleted {}", l.name_any())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("unexpected watch error {e:?}"),
        }
    }
    assert_eq!(seen, ["added after", "modified after b", "deleted after"]);
}

#[tokio::test]
async fn watch_from_a_compacted_resource_version_gets_410_expired() {
    let (server, client) = server(SLOW).await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let old = leases
        .create(&PostParams::default(), &lease("x", "a"))
        .await
        .unwrap();
    leases
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "b"}})),
        )
        .await
        .unwrap();
    server.compact_watch_history();
    let mut stream = leases
        .watch(&WatchParams::default(), &old.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410 Expired, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_runtime_watcher_relists_after_the_history_is_compacted() {
    let (server, client) = server(SLOW).await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    leases
        .create(&PostParams::default(), &lease("one", "a"))
        .await
        .unwrap();
    let mut events = watcher(leases.clone(), watcher::Config::default()).boxed();
    let mut inits = 0;
    let mut names = Vec::new();
    // First listing.
    loop {
        match events.next().await.unwrap().unwrap() {
            watcher::Event::Init => inits += 1,
            watcher::Event::InitApply(l) => names.push(l.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(names, ["one"]);
    server.compact_watch_history();
    // The open watch is told 410, the watcher relists.
    let mut relisted = Vec::new();
    let mut saw_gone = false;
    loop {
        match events.next().await.unwrap() {
            Err(e) => {
                saw_gone = true;
                assert!(format!("{e:?}").contains("410"), "{e:?}");
            }
            Ok(watcher::Event::Init) => inits += 1,
            Ok(watcher::Event::InitApply(l)) => relisted.push(l.name_any()),
            Ok(watcher::Event::InitDone) => break,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {}
        }
    }
    assert!(saw_gone);
    assert_eq!(inits, 2);
    assert_eq!(relisted, ["one"]);
    // And watches on from the new listing.
    leases
        .create(&PostParams::default(), &lease("two", "a"))
        .await
        .unwrap();
    match events.next().await.unwrap().unwrap() {
        watcher::Event::Apply(l) => assert_eq!(l.name_any(), "two"),
        other => panic!("unexpected {other:?}"),
    }
}

fn crd(plural: &str, kind: &str, scale: bool) -> CustomResourceDefinition {
    let mut subresources = json!({"status": {}});
    if scale {
        subresources["scale"] = json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"
        });
    }
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.autoscaling.gpuscale.dev")},
        "spec": {
            "group": "autoscaling.gpuscale.dev",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind, "shortNames": ["ias"]},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "subresources": subresources,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {
                        "replicas": {"type": "integer", "minimum": 0},
                        "minReplicas": {"type": "integer", "minimum": 0, "default": 1},
                        "target": {"type": "string"}
                    }},
                    "status": {"type": "object", "properties": {
                        "replicas": {"type": "integer"},
                        "selector": {"type": "string"},
                        "desiredReplicas": {"type": "integer"}
                    }}
                }}}
            }]
        }
    }))
    .unwrap()
}

fn dynamic_api(client: Client, plural: &str, kind: &str) -> (Api<DynamicObject>, ApiResource) {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("autoscaling.gpuscale.dev", "v1alpha1", kind),
        plural,
    );
    (Api::namespaced_with(client, "default", &ar), ar)
}

#[tokio::test]
async fn a_crd_serves_its_custom_resource_with_status_and_scale_subresources() {
    let (_server, client) = server(SLOW).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let (ias, ar) = dynamic_api(
        client.clone(),
        "inferenceautoscalers",
        "InferenceAutoscaler",
    );
    assert_eq!(
        api_error(ias.list(&ListParams::default()).await.unwrap_err()).0,
        404
    );

    let created = crds
        .create(
            &PostParams::default(),
            &crd("inferenceautoscalers", "InferenceAutoscaler", true),
        )
        .await
        .unwrap();
    assert_eq!(
        created.name_any(),
        "inferenceautoscalers.autoscaling.gpuscale.dev"
    );
    let established = crds.get(&created.name_any()).await.unwrap();
    assert!(
        established
            .status
            .unwrap()
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );

    let obj = DynamicObject::new("llama", &ar).data(json!({"spec": {"replicas": 2, "target": "llama", "unknown": 1}, "status": {"replicas": 7}}));
    let stored = ias.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(
        stored.data["spec"]["minReplicas"], 1,
        "schema defaults apply"
    );
    assert!(
        stored.data["spec"].get("unknown").is_none(),
        "unknown fields are pruned"
    );
    assert!(stored.data.get("status").is_none(), "create ignores status");

    let with_status = ias
        .patch_status(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"replicas": 2, "selector": "app=llama", "desiredReplicas": 3}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(with_status.data["status"]["desiredReplicas"], 3);

    let scale = ias.get_scale("llama").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(
        scale.status.as_ref().unwrap().selector.as_deref(),
        Some("app=llama")
    );
    let scaled = ias
        .patch_scale(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));
    assert_eq!(ias.get("llama").await.unwrap().data["spec"]["replicas"], 4);

    let (code, _) = api_error(
        ias.patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": -1}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 422, "schema minimum is enforced");
    let (code, reason) = api_error(
        ias.patch(
            "llama",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (415, "UnsupportedMediaType"));

    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery
        .get("autoscaling.gpuscale.dev")
        .expect("the CRD group is discoverable");
    assert!(
        group
            .recommended_resources()
            .iter()
            .any(|(r, _)| r.plural == "inferenceautoscalers")
    );

    // A custom resource without a scale subresource: /scale is 404.
    crds.create(
        &PostParams::default(),
        &crd("plainworkloads", "PlainWorkload", false),
    )
    .await
    .unwrap();
    let (plain, par) = dynamic_api(client.clone(), "plainworkloads", "PlainWorkload");
    plain
        .create(
            &PostParams::default(),
            &DynamicObject::new("p", &par).data(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let (code, _) = api_error(plain.get_scale("p").await.unwrap_err());
    assert_eq!(code, 404);

    // Deleting the CRD removes the type and its objects.
    crds.delete(
        "inferenceautoscalers.autoscaling.gpuscale.dev",
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    assert_eq!(api_error(ias.get("llama").await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn server_side_apply_creates_merges_and_reports_field_conflicts() {
    let (_server, client) = server(SLOW).await;
    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    let mut config = serde_json::to_value(deployment("applied", 1, None)).unwrap();
    config["metadata"]["labels"] = json!({"owner": "platform", "tier": "gpu"});
    let created = deploys
        .patch(
            "applied",
            &PatchParams::apply("platform"),
            &Patch::Apply(&config),
        )
        .await
        .unwrap();
    assert_eq!(created.spec.as_ref().unwrap().replicas, Some(1));
    let managers: Vec<String> = created
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["platform"]);

    let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "applied"}, "spec": {"replicas": 5}});
    let (code, _) = api_error(
        deploys
            .patch(
                "applied",
                &PatchParams::apply("gpuscale"),
                &Patch::Apply(&other),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409, "replicas belong to another applier");
    let forced = deploys
        .patch(
            "applied",
            &PatchParams::apply("gpuscale").force(),
            &Patch::Apply(&other),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.as_ref().unwrap().replicas, Some(5));

    // The first applier drops a label and replicas from its config: the label goes,
    // replicas (now owned by gpuscale) stay.
    config["metadata"]["labels"] = json!({"owner": "platform"});
    config["spec"].as_object_mut().unwrap().remove("replicas");
    let reapplied = deploys
        .patch(
            "applied",
            &PatchParams::apply("platform"),
            &Patch::Apply(&config),
        )
        .await
        .unwrap();
    assert!(!reapplied.labels().contains_key("tier"));
    assert_eq!(reapplied.spec.unwrap().replicas, Some(5));
}

#[tokio::test]
async fn request_log_records_each_call_in_rbac_terms() {
    let (server, client) = server(SLOW).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "prod");
    let events: Api<Event> = Api::namespaced(client, "prod");
    server.clear_request_log();
    deploys
        .create(&PostParams::default(), &deployment("llm", 1, None))
        .await
        .unwrap();
    deploys.get("llm").await.unwrap();
    deploys.list(&ListParams::default()).await.unwrap();
    deploys.get_scale("llm").await.unwrap();
    deploys
        .patch_scale(
            "llm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    let ev: Event = serde_json::from_value(json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"generateName": "llm-"},
        "eventTime": "2025-01-01T00:00:00.000000Z", "reportingController": "gpuscale.dev/scaler",
        "reportingInstance": "scaler-0", "action": "Scale", "reason": "ScaledUp", "type": "Normal",
        "regarding": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm", "namespace": "prod"},
        "note": "1 -> 2: queue depth above target"
    }))
    .unwrap();
    events.create(&PostParams::default(), &ev).await.unwrap();
    deploys
        .delete("llm", &DeleteParams::default())
        .await
        .unwrap();

    let log: Vec<(Verb, String, String, Option<String>)> = server
        .request_log()
        .iter()
        .filter(|r| r.is_resource_request())
        .map(|r| {
            (
                r.verb,
                r.group.clone(),
                r.rbac_resource(),
                r.namespace.clone(),
            )
        })
        .collect();
    let prod = Some("prod".to_string());
    assert_eq!(
        log,
        vec![
            (
                Verb::Create,
                "apps".to_string(),
                "deployments".to_string(),
                prod.clone()
            ),
            (
                Verb::Get,
                "apps".to_string(),
                "deployments".to_string(),
                prod.clone()
            ),
            (
                Verb::List,
                "apps".to_string(),
                "deployments".to_string(),
                prod.clone()
            ),
            (
                Verb::Get,
                "apps".to_string(),
                "deployments/scale".to_string(),
                prod.clone()
            ),
            (
                Verb::Patch,
                "apps".to_string(),
                "deployments/scale".to_string(),
                prod.clone()
            ),
            (
                Verb::Create,
                "events.k8s.io".to_string(),
                "events".to_string(),
                prod.clone()
            ),
            (
                Verb::Delete,
                "apps".to_string(),
                "deployments".to_string(),
                prod.clone()
            ),
        ]
    );
    let patch = server
        .request_log()
        .into_iter()
        .find(|r| r.verb == Verb::Patch)
        .unwrap();
    assert_eq!(
        patch.patch_type.as_deref(),
        Some("application/merge-patch+json")
    );
}

#[tokio::test]
async fn injected_faults_hit_only_the_next_matching_requests() {
    let (server, client) = server(SLOW).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("f", 1, None))
        .await
        .unwrap();

    server.inject_fault(
        Fault::new(FaultKind::Status(409))
            .verb(Verb::Patch)
            .resource("deployments/scale"),
    );
    let patch = Patch::Merge(json!({"spec": {"replicas": 3}}));
    let (code, reason) = api_error(
        deploys
            .patch_scale("f", &PatchParams::default(), &patch)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        deploys.get_scale("f").await.unwrap().spec.unwrap().replicas,
        Some(1),
        "a failed request has no effect"
    );
    deploys
        .patch_scale("f", &PatchParams::default(), &patch)
        .await
        .unwrap();

    server.inject_fault(
        Fault::new(FaultKind::Status(500))
            .verb(Verb::Get)
            .resource("deployments")
            .times(2),
    );
    assert_eq!(
        api_error(deploys.get("f").await.unwrap_err()),
        (500, "InternalError".to_string())
    );
    assert_eq!(api_error(deploys.get("f").await.unwrap_err()).0, 500);
    deploys.get("f").await.unwrap();

    // kube's client retries 503 by itself; the log shows both attempts.
    server.clear_request_log();
    server.inject_fault(Fault::new(FaultKind::StatusRetryAfter(503, 0)).verb(Verb::List));
    deploys.list(&ListParams::default()).await.unwrap();
    let statuses: Vec<u16> = server.request_log().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 200]);

    // A hung request never answers; the caller's timeout is what ends it.
    server.inject_fault(Fault::new(FaultKind::Hang).verb(Verb::Get).name("f"));
    let hung = tokio::time::timeout(Duration::from_millis(200), deploys.get("f")).await;
    assert!(hung.is_err(), "the request should hang");
    deploys.get("f").await.unwrap();
}

#[tokio::test]
async fn deleting_a_deployment_collects_its_replicaset_and_pods() {
    let (server, client) = server(Duration::from_millis(10)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deploys
        .create(&PostParams::default(), &deployment("gc", 2, None))
        .await
        .unwrap();
    assert_eq!(server.objects("", "pods", Some("default")).len(), 2);
    assert_eq!(
        server.objects("apps", "replicasets", Some("default")).len(),
        1
    );
    deploys
        .delete("gc", &DeleteParams::default())
        .await
        .unwrap();
    assert!(server.objects("", "pods", None).is_empty());
    assert!(server.objects("apps", "replicasets", None).is_empty());
    eventually("nothing comes back", || async {
        server.objects("", "pods", None).is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_json_patch_test_of_a_missing_member_against_null_passes_as_on_the_api_server() {
    let (_server, client) = server(SLOW).await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    leases
        .create(&PostParams::default(), &lease("l", "a"))
        .await
        .unwrap();
    let add_first = |value: serde_json::Value| {
        Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "test", "path": "/metadata/finalizers", "value": value},
                {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/a"]}
            ]))
            .unwrap(),
        )
    };
    let patched = leases
        .patch("l", &PatchParams::default(), &add_first(json!(null)))
        .await
        .unwrap();
    assert_eq!(patched.finalizers(), ["example.com/a"]);
    // Now there is a member: null no longer matches, and nothing changes.
    let (code, _) = api_error(
        leases
            .patch("l", &PatchParams::default(), &add_first(json!(null)))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert_eq!(
        leases.get("l").await.unwrap().finalizers(),
        ["example.com/a"]
    );
}

#[tokio::test]
async fn an_object_with_finalizers_is_deleted_only_when_its_last_finalizer_goes() {
    let (server, client) = server(Duration::from_millis(10)).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let mut d = deployment("held", 2, None);
    d.metadata.finalizers = Some(vec!["example.com/a".into(), "example.com/b".into()]);
    let created = deploys.create(&PostParams::default(), &d).await.unwrap();
    let generation = created.metadata.generation.unwrap();
    let rv = created.resource_version().unwrap();
    let mut events = deploys
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap()
        .boxed();

    // DELETE marks it: deletionTimestamp set, generation bumped, nothing removed.
    let marked = deploys
        .delete("held", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("the object, still there");
    let stamp = marked
        .metadata
        .deletion_timestamp
        .clone()
        .expect("deletionTimestamp");
    assert_eq!(marked.metadata.generation, Some(generation + 1));
    assert_eq!(server.objects("", "pods", Some("default")).len(), 2);
    // A second DELETE keeps the first one's mark.
    let again = deploys
        .delete("held", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("still there");
    assert_eq!(again.metadata.deletion_timestamp, Some(stamp.clone()));
    // No finalizer may be added now; other writes still go through and
    // keep the deletion mark.
    let (code, reason) = api_error(
        deploys
            .patch(
                "held",
                &PatchParams::default(),
                &Patch::Json::<()>(
                    serde_json::from_value(json!([
                        {"op": "add", "path": "/metadata/finalizers/-", "value": "example.com/c"}
                    ]))
                    .unwrap(),
                ),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    let labelled = deploys
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}, "deletionTimestamp": null}})),
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.deletion_timestamp, Some(stamp));
    // Removing one of two finalizers keeps it; removing the last deletes
    // it, and what it owns with it.
    let one_left = deploys
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/b"]}})),
        )
        .await
        .unwrap();
    assert_eq!(one_left.finalizers(), ["example.com/b"]);
    assert!(deploys.get_opt("held").await.unwrap().is_some());
    deploys
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/b"]},
                    {"op": "remove", "path": "/metadata/finalizers/0"}
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert!(deploys.get_opt("held").await.unwrap().is_none());
    assert!(server.objects("", "pods", None).is_empty());
    assert!(server.objects("apps", "replicasets", None).is_empty());

    let mut seen = Vec::new();
    while !seen
        .last()
        .is_some_and(|s: &String| s.starts_with("deleted"))
    {
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Modified(d) => seen.push(format!(
                "modified deleting={} finalizers={}",
                d.metadata.deletion_timestamp.is_some(),
                d.finalizers().len()
            )),
            WatchEvent::Deleted(d) => {
                seen.push(format!("deleted finalizers={}", d.finalizers().len()))
            }
            WatchEvent::Added(_) | WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("unexpected watch error {e:?}"),
        }
    }
    seen.dedup();
    assert_eq!(
        seen.first().map(String::as_str),
        Some("modified deleting=false finalizers=2"),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"modified deleting=true finalizers=2".to_string()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"modified deleting=true finalizers=1".to_string()),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("deleted finalizers=0"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn streaming_list_watcher_with_a_selector_sees_objects_enter_and_leave_it() {
    let (_server, client) = server(SLOW).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod("in", json!({"app": "llm"})))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("out", json!({"app": "web"})))
        .await
        .unwrap();
    let config = watcher::Config::default()
        .streaming_lists()
        .labels("app=llm");
    let mut events = watcher(pods.clone(), config).boxed();
    let mut initial = Vec::new();
    loop {
        match events.next().await.unwrap().unwrap() {
            watcher::Event::Init => {}
            watcher::Event::InitApply(p) => initial.push(p.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(initial, ["in"]);
    let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
    pods.patch("out", &PatchParams::default(), &relabel("llm"))
        .await
        .unwrap();
    match events.next().await.unwrap().unwrap() {
        watcher::Event::Apply(p) => assert_eq!(p.name_any(), "out"),
        other => panic!("expected the relabelled pod to enter, got {other:?}"),
    }
    pods.patch("in", &PatchParams::default(), &relabel("web"))
        .await
        .unwrap();
    match events.next().await.unwrap().unwrap() {
        watcher::Event::Delete(p) => assert_eq!(p.name_any(), "in"),
        other => panic!("expected the relabelled pod to leave, got {other:?}"),
    }
}

#[tokio::test]
async fn metadata_only_requests_get_partial_object_metadata() {
    let (_server, client) = server(SLOW).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod("m", json!({"app": "llm"})))
        .await
        .unwrap();
    let meta = pods.get_metadata("m").await.unwrap();
    assert_eq!(
        meta.metadata.labels.unwrap().get("app").map(String::as_str),
        Some("llm")
    );
    let list = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
}
