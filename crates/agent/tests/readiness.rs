//! The readiness-gate writer against the fake Kubernetes API server (the
//! real kube-rs client over HTTP), a fake engine over HTTP and a scaler
//! streaming directives over gRPC.

mod support;

use std::time::Duration;

use gpuscale_agent::{AgentConfig, NodeConfig, start_node};
use gpuscale_core::PodRef;
use gpuscale_core::sample::EngineState;
use gpuscale_fake_apiserver::{
    FakeApiServer, FakeApiServerConfig, FakeApiServerHandle, Fault, FaultKind, Verb,
};
use gpuscale_proto::Directive;
use gpuscale_telemetry::EngineTarget;
use gpuscale_telemetry::fake::{FakeGpuGroup, FakeNodeConfig};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::engine::{FakeEngine, MetricsReply};
use support::eventually;
use support::scaler::TestScaler;

const GATE: &str = "gpuscale.dev/engine-warm";

async fn api_server() -> FakeApiServerHandle {
    FakeApiServer::start(FakeApiServerConfig {
        nodes: vec!["node-a".into()],
        pod_start_delay: Duration::from_millis(50),
        ..FakeApiServerConfig::default()
    })
    .await
    .expect("fake API server")
}

async fn create_pod(client: &kube::Client, name: &str, annotations: Value) {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "containers": [{"name": "engine", "image": "vllm/vllm-openai:v0.10",
                "ports": [{"containerPort": 8000}],
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
            "readinessGates": [{"conditionType": GATE}]
        }
    }))
    .expect("pod");
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .expect("created");
}

fn pod(server: &FakeApiServerHandle, name: &str) -> Value {
    server
        .object("", "pods", "default", name)
        .expect("the pod exists")
}

fn condition(pod: &Value, type_: &str) -> Option<Value> {
    pod["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn gate(server: &FakeApiServerHandle, name: &str) -> (Option<String>, Option<String>) {
    let c = condition(&pod(server, name), GATE);
    (
        c.as_ref()
            .and_then(|c| c["status"].as_str())
            .map(str::to_string),
        c.as_ref()
            .and_then(|c| c["reason"].as_str())
            .map(str::to_string),
    )
}

fn is_ready(server: &FakeApiServerHandle, name: &str) -> bool {
    condition(&pod(server, name), "Ready").is_some_and(|c| c["status"] == "True")
}

fn one_gpu() -> FakeNodeConfig {
    FakeNodeConfig {
        gpus: vec![FakeGpuGroup {
            model: "NVIDIA H100 80GB HBM3".into(),
            count: 1,
            memory_gib: 80.0,
            power_limit_watts: 700.0,
            gpm_supported: true,
        }],
        ..FakeNodeConfig::default()
    }
}

fn agent_config(scaler: &TestScaler) -> AgentConfig {
    let mut c = AgentConfig::new(scaler.url.clone(), "node-a");
    c.sample_interval = Duration::from_millis(50);
    c
}

fn fast_retries(node: &mut NodeConfig) {
    node.readiness.retry.base = Duration::from_millis(20);
    node.readiness.retry.cap = Duration::from_millis(200);
    node.readiness.resync_after = Duration::from_millis(500);
    node.readiness.warmup.timeout = Duration::from_secs(5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_turns_true_only_after_the_warmup_and_false_on_drain_and_on_failure() {
    let server = api_server().await;
    let client = server.client().expect("client");
    create_pod(&client, "llama-0", json!({})).await;
    eventually("the pod runs", || {
        pod(&server, "llama-0")["status"]["phase"] == "Running"
    })
    .await;
    assert!(
        !is_ready(&server, "llama-0"),
        "a missing gate condition counts as False"
    );

    let engine = FakeEngine::start("llama").await;
    engine.set(|b| b.completions_fail = true);
    let scaler = TestScaler::start().await;
    // The first writes meet a conflict, an internal error and throttling:
    // the writer retries the first two with backoff; kube-rs' client
    // retries 429 (and 503, 504) itself.
    for status in [409, 500, 429] {
        server.inject_fault(
            Fault::new(FaultKind::Status(status))
                .verb(Verb::Patch)
                .resource("pods")
                .subresource("status"),
        );
    }
    let mut node = NodeConfig::fake(one_gpu());
    node.engines = vec![
        EngineTarget::parse_flag(&format!("default/llama-0=vllm={}", engine.metrics_url()))
            .expect("target"),
    ];
    fast_retries(&mut node);
    let running = start_node(agent_config(&scaler), node, Some(client.clone()))
        .await
        .expect("started");
    let handle = running.handle().clone();
    let llama = PodRef::new("default", "llama-0");

    // Healthy, but the warm-up fails: the pod stays not Ready, and says why.
    eventually("failed warm-ups are retried", || {
        engine.behaviour().completions >= 3
    })
    .await;
    eventually("the gate says the warm-up fails", || {
        gate(&server, "llama-0") == (Some("False".into()), Some("WarmupFailed".into()))
    })
    .await;
    assert!(!is_ready(&server, "llama-0"));
    let engine_state = |h: &gpuscale_agent::AgentHandle| {
        h.latest_snapshot()
            .and_then(|s| s.engines.into_iter().find(|e| e.pod == llama))
            .map(|e| e.state)
    };
    assert_eq!(
        engine_state(&handle),
        Some(EngineState::Warm),
        "healthy is not warm enough"
    );

    // The warm-up succeeds: True, and the kubelet makes the pod Ready.
    engine.set(|b| b.completions_fail = false);
    eventually("the gate turns True", || {
        gate(&server, "llama-0") == (Some("True".into()), Some("EngineWarm".into()))
    })
    .await;
    eventually("the pod is Ready", || is_ready(&server, "llama-0")).await;

    // The scaler drains the pod: False, not Ready, the engine reports Draining.
    scaler.direct(vec![Directive::DrainPod {
        pod: llama.clone(),
        reason: "scale-in".into(),
    }]);
    eventually("the gate turns False on drain", || {
        gate(&server, "llama-0") == (Some("False".into()), Some("Draining".into()))
    })
    .await;
    assert!(!is_ready(&server, "llama-0"));
    eventually("the engine reports Draining", || {
        engine_state(&handle) == Some(EngineState::Draining)
    })
    .await;
    assert!(
        running.limits().limits(&llama).draining,
        "pushed to WatchLimits subscribers too"
    );

    // Undrained: warm already, True again without another warm-up.
    let completions = engine.behaviour().completions;
    scaler.direct(vec![Directive::UndrainPod { pod: llama.clone() }]);
    eventually("the gate turns True again", || {
        gate(&server, "llama-0") == (Some("True".into()), Some("EngineWarm".into()))
    })
    .await;
    assert_eq!(
        engine.behaviour().completions,
        completions,
        "no new warm-up"
    );
    let c = condition(&pod(&server, "llama-0"), GATE).expect("gate");
    assert!(c["lastTransitionTime"].is_string(), "{c}");

    // The engine fails: False, not Ready.
    engine.set(|b| {
        b.health = 503;
        b.metrics = MetricsReply::Status(500);
    });
    eventually("the gate turns False on failure", || {
        gate(&server, "llama-0") == (Some("False".into()), Some("EngineFailed".into()))
    })
    .await;
    eventually("the pod is not Ready", || !is_ready(&server, "llama-0")).await;

    // Every write was a strategic-merge patch of pods/status, and the two
    // injected failures were counted and retried.
    let writes: Vec<_> = server
        .request_log()
        .into_iter()
        .filter(|r| r.verb == Verb::Patch)
        .collect();
    assert!(writes.len() >= 5, "{writes:?}");
    for w in &writes {
        assert_eq!(w.rbac_resource(), "pods/status");
        assert_eq!(
            w.patch_type.as_deref(),
            Some("application/strategic-merge-patch+json")
        );
    }
    let stats = running.stats();
    assert_eq!(stats.error_total("readiness_gate", "conflict"), 1);
    assert_eq!(stats.error_total("readiness_gate", "server_error"), 1);
    assert_eq!(stats.error_total("readiness_gate", "throttled"), 0);
    let statuses: Vec<u16> = writes.iter().map(|w| w.status).collect();
    assert_eq!(&statuses[..4], &[409, 500, 429, 200], "{statuses:?}");
    assert!(stats.error_total("warmup", "http_status") >= 2);
    running.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_are_discovered_from_pod_annotations_and_the_gate_follows_them() {
    let server = api_server().await;
    let client = server.client().expect("client");
    let engine = FakeEngine::start("qwen").await;
    create_pod(
        &client,
        "qwen-0",
        json!({
            "gpuscale.dev/metrics-port": engine.addr.port().to_string(),
            "gpuscale.dev/framework": "vllm",
        }),
    )
    .await;
    // A pod with a typo in its annotations: logged, counted, not scraped.
    create_pod(
        &client,
        "typo-0",
        json!({"gpuscale.dev/metrics-port": "80a", "gpuscale.dev/framework": "vllm"}),
    )
    .await;
    eventually("the pods run", || {
        pod(&server, "qwen-0")["status"]["phase"] == "Running"
            && pod(&server, "typo-0")["status"]["phase"] == "Running"
    })
    .await;
    // The fake kubelet gives pods made-up IPs; point this one at the engine.
    Api::<Pod>::namespaced(client.clone(), "default")
        .patch_status(
            "qwen-0",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}),
            ),
        )
        .await
        .expect("patched");

    let scaler = TestScaler::start().await;
    let mut node = NodeConfig::fake(one_gpu());
    node.readiness.warmup.mode = gpuscale_agent::WarmupMode::Health;
    fast_retries(&mut node);
    let running = start_node(agent_config(&scaler), node, Some(client.clone()))
        .await
        .expect("started");
    let handle = running.handle().clone();
    let qwen = PodRef::new("default", "qwen-0");
    eventually("the annotated engine is scraped", || {
        handle.latest_snapshot().is_some_and(|s| {
            s.engines.iter().any(|e| {
                e.pod == qwen
                    && e.state == EngineState::Warm
                    && e.container == "engine"
                    && e.requests_running == Some(3.0)
            })
        })
    })
    .await;
    eventually("its gate turns True", || {
        gate(&server, "qwen-0") == (Some("True".into()), Some("EngineWarm".into()))
    })
    .await;
    eventually("the mistyped pod's gate says why it is not ready", || {
        gate(&server, "typo-0") == (Some("False".into()), Some("EngineUnknown".into()))
    })
    .await;
    assert_eq!(
        running.stats().error_total("discovery", "bad_annotation"),
        1
    );
    assert!(!is_ready(&server, "typo-0"));

    // The pod goes away: so does its engine.
    Api::<Pod>::namespaced(client.clone(), "default")
        .delete("qwen-0", &Default::default())
        .await
        .expect("deleted");
    eventually("the engine is gone", || {
        handle
            .latest_snapshot()
            .is_some_and(|s| s.engines.iter().all(|e| e.pod != qwen))
    })
    .await;
    running.shutdown().await.expect("clean shutdown");
}
