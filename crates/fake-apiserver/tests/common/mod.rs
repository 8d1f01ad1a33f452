//! Shared helpers for the fake API server tests.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use gpuscale_fake_apiserver::{FakeApiServer, FakeApiServerConfig, FakeApiServerHandle};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use serde_json::json;

/// A server whose pods start after `delay`, and a client for it.
pub async fn server(delay: Duration) -> (FakeApiServerHandle, Client) {
    let config = FakeApiServerConfig {
        pod_start_delay: delay,
        nodes: vec!["node-a".to_string(), "node-b".to_string()],
        ..FakeApiServerConfig::default()
    };
    let server = FakeApiServer::start(config).await.unwrap();
    let client = server.client().unwrap();
    (server, client)
}

/// Polls `check` every 10 ms until it returns true (panics after 10 s).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A Deployment `name` with `replicas` pods labelled `app=<name>`, optionally with a readiness gate.
pub fn deployment(name: &str, replicas: i32, gate: Option<&str>) -> Deployment {
    let mut pod_spec =
        json!({"containers": [{"name": "engine", "image": "vllm/vllm-openai:v0.9"}]});
    if let Some(g) = gate {
        pod_spec["readinessGates"] = json!([{"conditionType": g}]);
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        }
    }))
    .unwrap()
}

/// A bare pod with labels.
pub fn pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap()
}

pub fn is_ready(p: &Pod) -> bool {
    condition(p, "Ready") == Some("True")
}

pub fn condition<'a>(p: &'a Pod, type_: &str) -> Option<&'a str> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

/// The `kube::Error::Api` status code and reason of an error.
pub fn api_error(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}
