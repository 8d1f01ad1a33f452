//! The shipped RBAC grants exactly what the scaler uses: a tour through
//! every code path that talks to the API server (leader election, the
//! controller's watches, status, Events, /scale of a Deployment and a
//! StatefulSet, a scale-in with drain, agents' tokens reviewed, an API
//! client's read authorised, the finalizer added and, on a deletion,
//! removed), then every request in the fake API server's log is allowed by
//! deploy/base/rbac.yaml, and every rule there was used.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use support::rbac::{Grant, assert_allowed, scaler_grants, used};
use support::*;

#[tokio::test(start_paused = true)]
async fn the_shipped_rbac_grants_exactly_what_the_scaler_uses() {
    let cluster = Cluster::start(&["node-a", "node-b"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    cluster.create_statefulset("qwen", 1).await;
    cluster
        .create_ias("llama", spec("llama", 1, 4, json!({})))
        .await;
    cluster
        .create_ias(
            "qwen",
            spec(
                "qwen",
                1,
                2,
                json!({"target": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "qwen"}}),
            ),
        )
        .await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a", "node-b"],
        vec![format!("http://{}", scaler.scaler().grpc_addr())],
        // Shared by both workloads' warm pods.
        240.0,
        Duration::from_secs(5),
    );
    eventually("both scaled up", Duration::from_secs(120), || {
        cluster.spec_replicas("llama") > 1
            && cluster
                .server
                .object("apps", "statefulsets", NS, "qwen")
                .and_then(|s| {
                    s.pointer("/spec/replicas")
                        .and_then(serde_json::Value::as_i64)
                })
                == Some(2)
    })
    .await;
    eventually("all warm", Duration::from_secs(60), || {
        cluster.warm_pods("llama").len() as i64 == cluster.spec_replicas("llama")
    })
    .await;
    // An API client: its token is reviewed and each workload it would see
    // authorised.
    let token = cluster.server.issue_user_token("dashboard", &[]);
    let mut request = tonic::Request::new(gpuscale_proto::v1::ListWorkloadsRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let listed = gpuscale_proto::v1::scaler_service_client::ScalerServiceClient::connect(format!(
        "http://{}",
        scaler.scaler().grpc_addr()
    ))
    .await
    .unwrap()
    .list_workloads(request)
    .await
    .unwrap()
    .into_inner();
    assert!(
        listed.workloads.is_empty(),
        "the dashboard may read nothing"
    );
    fleet.set_rps(1.0);
    eventually("a drained scale-in", Duration::from_secs(180), || {
        !cluster.events("llama", "DrainStarted").is_empty() && cluster.spec_replicas("llama") == 1
    })
    .await;
    // A deletion: the finalizer holds it until the scaler has cancelled its
    // drains and removed the finalizer.
    cluster.delete_ias("qwen").await;
    eventually("qwen's autoscaler deleted", Duration::from_secs(30), || {
        cluster.ias("qwen").is_null()
    })
    .await;
    // Everything but the test's own DELETE (it carries no field manager).
    let log: Vec<_> = cluster
        .server
        .request_log()
        .into_iter()
        .filter(|r| r.verb != gpuscale_fake_apiserver::Verb::Delete)
        .collect();
    assert_allowed(&log);
    let used = used(&log);
    let granted = scaler_grants();
    let unused: BTreeSet<&Grant> = granted.difference(&used).collect();
    assert!(unused.is_empty(), "granted but never used: {unused:#?}");
    scaler.shutdown().await.unwrap();
}
