//! Trust on the wire, end to end on Kubernetes: the scaler in Kubernetes
//! mode serving TLS, reviewing tokens and access with the real kube-rs
//! client against the fake API server (TokenReview, SubjectAccessReview,
//! tokens it issues per pod and node).
//!
//! * agents: no token, a token for another audience, an expired token, a
//!   token of another ServiceAccount and a valid agent token claiming
//!   another node are each refused with the right code and counted; a
//!   token without the node claim is bound through its pod; a repeat
//!   offender gets an Event; the real agent streams over TLS with its token
//!   file; tokens are reviewed once (cached) and never for a refusal the
//!   token's own claims decide;
//! * API clients: a user without `get` on a workload gets
//!   `PERMISSION_DENIED` for it and still sees the ones it may read (list,
//!   explain, watch);
//! * KEDA's calling pattern over TLS with a client certificate, from a
//!   client generated from `proto/externalscaler/externalscaler.proto`
//!   (KEDA's protocol, wire-compatible copy).

#![allow(clippy::unwrap_used)]

#[path = "../crates/scaler/tests/pki/mod.rs"]
mod pki;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gpuscale_agent::{Agent, UplinkSecurity};
use gpuscale_core::sample::{AgentHealth, NodeSnapshot};
use gpuscale_core::{NodeName, Timestamp};
use gpuscale_fake_apiserver::{
    FakeApiServer, FakeApiServerConfig, FakeApiServerHandle, Subject, TokenRequest, Verb,
};
use gpuscale_kube::{KubeConfig, KubeScaler, RunningKubeScaler};
use gpuscale_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use gpuscale_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_client::AgentServiceClient;
use gpuscale_proto::v1::scaler_service_client::ScalerServiceClient;
use gpuscale_proto::{AgentReport, ReportBody};
use gpuscale_scaler::edge::{AuthConfig, AuthMode, TlsConfig, Transport};
use gpuscale_scaler::{ScalerConfig, ScalerFile};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::PostParams;
use pki::Pki;
use support::{fake_node, fast_agent_config, wait_for_view};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const GUARD: Duration = Duration::from_secs(30);
const SYSTEM: &str = "gpuscale-system";
const KEDA: &str = "keda-operator.keda.svc";

struct Setup {
    server: Arc<FakeApiServerHandle>,
    scaler: RunningKubeScaler,
    pki: Pki,
}

async fn create_pod(client: &kube::Client, name: &str, node: &str, account: &str) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": SYSTEM},
        "spec": {"nodeName": node, "serviceAccountName": account,
                 "containers": [{"name": "agent", "image": "gpuscale"}]},
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), SYSTEM)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

async fn setup() -> Setup {
    let server = Arc::new(
        FakeApiServer::start(FakeApiServerConfig {
            nodes: vec!["node-a".into(), "node-b".into()],
            ..FakeApiServerConfig::default()
        })
        .await
        .unwrap(),
    );
    let client = server.client().unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &gpuscale_kube::crd::crd())
        .await
        .unwrap();
    create_pod(&client, "agent-a", "node-a", "gpuscale-agent").await;
    create_pod(&client, "agent-b", "node-b", "gpuscale-agent").await;
    create_pod(&client, "intruder", "node-a", "default").await;
    let pki = Pki::new();
    let (cert, key) = pki.server();
    let mut tls = TlsConfig::new(cert, key);
    tls.client_ca = Some(pki.ca_file());
    let mut config = ScalerConfig::new("127.0.0.1:0".parse().unwrap());
    config.tick = Duration::from_millis(200);
    config.transport = Transport::Tls(tls);
    config.auth = AuthConfig::with_mode(AuthMode::Kubernetes);
    let file: ScalerFile = serde_yaml::from_str(
        "workloads:
  - {name: chat, namespace: team-a, engines: {model: m}, proportional: {capacityTokensPerSecond: 100, maxReplicas: 4}}
  - {name: chat, namespace: team-b, engines: {model: m}, proportional: {capacityTokensPerSecond: 100, maxReplicas: 4}}
",
    )
    .unwrap();
    config.workloads = file.workloads(Path::new(".")).unwrap();
    let scaler = KubeScaler::new(client, KubeConfig::new(), config)
        .start()
        .await
        .unwrap();
    server.clear_request_log();
    Setup {
        server,
        scaler,
        pki,
    }
}

impl Setup {
    async fn channel(&self, identity: Option<(&Path, &Path)>) -> Channel {
        let mut t = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.pki.ca_pem()))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            t = t.identity(Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ));
        }
        Endpoint::from_shared(format!("https://{}", self.scaler.scaler().grpc_addr()))
            .unwrap()
            .tls_config(t)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn refused(&self, api: &str, reason: &str) -> f64 {
        let line =
            format!("gpuscale_scaler_auth_refused_total{{api=\"{api}\",reason=\"{reason}\"}} ");
        self.scaler
            .handle()
            .metrics()
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&line).and_then(|v| v.parse().ok()))
            .unwrap_or(0.0)
    }

    fn reviews(&self, resource: &str) -> usize {
        self.server
            .request_log()
            .iter()
            .filter(|r| r.resource == resource && r.verb == Verb::Create)
            .count()
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {t}")).unwrap(),
        );
    }
    r
}

fn snapshot(node: &str) -> v1::NodeReport {
    (&AgentReport {
        boot_epoch: 1,
        seq: 1,
        sent_at: Timestamp::from_millis(1),
        body: ReportBody::Snapshot(NodeSnapshot {
            node: NodeName::new(node),
            agent_version: "test".into(),
            sampled_at: Timestamp::from_millis(1),
            sample_interval_ms: 1000,
            gpus: vec![],
            pods: vec![],
            engines: vec![],
            agent: AgentHealth::default(),
        }),
    })
        .into()
}

/// Opens an agent stream with `token` reporting `node`: `Ok` once the
/// scaler answered with a directive (it accepted the snapshot), else the
/// status that ended it.
async fn stream(channel: Channel, token: Option<&str>, node: &str) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(snapshot(node)).await.unwrap();
    let mut inbound = AgentServiceClient::new(channel)
        .report(with_token(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    match tokio::time::timeout(GUARD, inbound.message()).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(tonic::Status::unknown("ended without a status")),
        Ok(Err(s)) => Err(s),
        Err(_) => panic!("no answer from the scaler"),
    }
}

#[tokio::test]
async fn agents_prove_who_they_are_and_report_only_their_node() {
    let s = setup().await;
    let server = &s.server;
    let token = |pod: &str, audience: &str, lifetime: i64| {
        server
            .issue_pod_token(SYSTEM, pod, audience, lifetime)
            .unwrap()
    };
    let channel = s.channel(None).await;
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|e| e.code(), |()| Code::Ok);

    assert_eq!(
        code(stream(channel.clone(), None, "node-a").await),
        Code::Unauthenticated
    );
    let other_audience = token("agent-a", "vault", 3600);
    assert_eq!(
        code(stream(channel.clone(), Some(&other_audience), "node-a").await),
        Code::Unauthenticated
    );
    let expired = token("agent-a", "gpuscale", -60);
    assert_eq!(
        code(stream(channel.clone(), Some(&expired), "node-a").await),
        Code::Unauthenticated
    );
    let agent_a = token("agent-a", "gpuscale", 3600);
    let claiming = stream(channel.clone(), Some(&agent_a), "node-b")
        .await
        .unwrap_err();
    assert_eq!(claiming.code(), Code::PermissionDenied, "{claiming:?}");
    assert!(claiming.message().contains("node-a"), "{claiming:?}");
    let intruder = token("intruder", "gpuscale", 3600);
    assert_eq!(
        code(stream(channel.clone(), Some(&intruder), "node-a").await),
        Code::PermissionDenied
    );
    for reason in [
        "no_token",
        "wrong_audience",
        "expired",
        "node_mismatch",
        "wrong_service_account",
    ] {
        assert_eq!(s.refused("agent", reason), 1.0, "{reason}");
    }
    // The audience and expiry are read from the token itself: only the
    // node-mismatched and the intruder's tokens were reviewed.
    assert_eq!(s.reviews("tokenreviews"), 2);

    // Five refusals from one address: an Event about the offender.
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let events = server.objects("events.k8s.io", "events", Some(SYSTEM));
        if let Some(e) = events.iter().find(|e| e["reason"] == "CallerRefused") {
            assert_eq!(e["type"], "Warning");
            assert!(e["note"].as_str().unwrap().contains("5 times"), "{e}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Event about the repeat offender"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A token without the node claim (clusters before 1.30) is bound
    // through its pod's spec.nodeName.
    let unclaimed = server.issue_token(&TokenRequest {
        namespace: SYSTEM.into(),
        service_account: "gpuscale-agent".into(),
        pod: Some("agent-b".into()),
        node: None,
        audiences: vec!["gpuscale".into()],
        lifetime_seconds: 3600,
    });
    assert_eq!(
        code(stream(channel.clone(), Some(&unclaimed), "node-a").await),
        Code::PermissionDenied
    );
    stream(channel.clone(), Some(&unclaimed), "node-b")
        .await
        .unwrap();
    assert!(
        server.request_log().iter().any(|r| r.resource == "pods"
            && r.verb == Verb::List
            && r.namespace.as_deref() == Some(SYSTEM)),
        "the pod was looked up"
    );

    // The real agent, over TLS, with its projected token in a file.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &agent_a).unwrap();
    let mut config = fast_agent_config(
        &format!("https://localhost:{}", s.scaler.scaler().grpc_addr().port()),
        "node-a",
    );
    config.uplink_security = UplinkSecurity {
        ca_file: Some(s.pki.ca_file()),
        server_name: None,
        token_file: Some(token_file),
        client_cert: None,
    };
    let node = fake_node("node-a", 2, &[]);
    let agent = Agent::new(
        config,
        node.gpu_source(),
        node.pod_source(),
        node.engine_source(),
    )
    .unwrap()
    .start()
    .await
    .unwrap();
    let mut view = s.scaler.scaler().view();
    let name = NodeName::new("node-a");
    wait_for_view(&mut view, "the agent's stream", |v| {
        v.nodes
            .get(&name)
            .is_some_and(|n| n.connected && n.last_seq >= 3)
    })
    .await;
    // agent-a's token was reviewed once (the node mismatch) and cached.
    assert_eq!(
        s.reviews("tokenreviews"),
        3,
        "agent-a's token reviewed again"
    );
    agent.shutdown().await.unwrap();
    s.scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn api_clients_read_only_the_workloads_they_may_get() {
    let s = setup().await;
    s.server.grant(
        Subject::Group("team-a-devs".into()),
        "get",
        "autoscaling.gpuscale.dev",
        "inferenceautoscalers",
        Some("team-a"),
    );
    let alice = s.server.issue_user_token("alice", &["team-a-devs"]);
    let bob = s.server.issue_user_token("bob", &[]);
    let mut api = ScalerServiceClient::new(s.channel(None).await);

    let e = api
        .list_workloads(v1::ListWorkloadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let listed = |r: v1::ListWorkloadsResponse| -> Vec<String> {
        r.workloads
            .iter()
            .map(|w| w.workload.as_ref().unwrap().namespace.clone())
            .collect()
    };
    let a = api
        .list_workloads(with_token(
            v1::ListWorkloadsRequest::default(),
            Some(&alice),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed(a), ["team-a"]);
    let b = api
        .list_workloads(with_token(v1::ListWorkloadsRequest::default(), Some(&bob)))
        .await
        .unwrap()
        .into_inner();
    assert!(listed(b).is_empty());

    let explain = |ns: &str, token: &str| {
        with_token(
            v1::ExplainRequest {
                workload: Some(v1::WorkloadRef {
                    namespace: ns.into(),
                    name: "chat".into(),
                }),
            },
            Some(token),
        )
    };
    let e = api.explain(explain("team-b", &alice)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("inferenceautoscalers"), "{e:?}");
    if let Err(e) = api.explain(explain("team-a", &alice)).await {
        assert_eq!(
            e.code(),
            Code::Unavailable,
            "readable, maybe not decided yet: {e:?}"
        );
    }
    assert_eq!(s.refused("api", "forbidden_workload"), 1.0);

    let mut watch = api
        .watch_recommendations(with_token(
            v1::WatchRecommendationsRequest::default(),
            Some(&alice),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(GUARD, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.workload.unwrap().namespace, "team-a");
    // Nothing of team-b follows while the workloads are decided.
    let until = tokio::time::Instant::now() + Duration::from_millis(800);
    while let Ok(Ok(Some(r))) = tokio::time::timeout_at(until, watch.message()).await {
        assert_eq!(r.workload.unwrap().namespace, "team-a");
    }
    // Each (user, workload) was reviewed once: the rest came from the cache.
    assert_eq!(s.reviews("subjectaccessreviews"), 4);
    s.scaler.shutdown().await.unwrap();
}

/// An advisory InferenceAutoscaler `team-a/llama` over a Deployment, so the
/// controller registers it and it gets decided.
async fn llama(s: &Setup) {
    let client = s.server.client().unwrap();
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "llama", "namespace": "team-a"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "llama"}},
                     "template": {"metadata": {"labels": {"app": "llama"}},
                                  "spec": {"containers": [{"name": "vllm", "image": "vllm"}]}}},
        }))
        .unwrap();
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), "team-a")
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let ias: gpuscale_kube::InferenceAutoscaler = serde_json::from_value(serde_json::json!({
        "apiVersion": "autoscaling.gpuscale.dev/v1alpha1", "kind": "InferenceAutoscaler",
        "metadata": {"name": "llama", "namespace": "team-a"},
        "spec": {"target": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llama"},
                 "minReplicas": 1, "maxReplicas": 4, "advisory": true,
                 "performanceModel": {"preset": "h200-llama3-8b-bf16"}},
    }))
    .unwrap();
    Api::<gpuscale_kube::InferenceAutoscaler>::namespaced(client, "team-a")
        .create(&PostParams::default(), &ias)
        .await
        .unwrap();
}

#[tokio::test]
async fn keda_calls_over_tls_with_a_client_certificate() {
    let s = setup().await;
    llama(&s).await;
    s.server.grant(
        Subject::User(KEDA.into()),
        "get",
        "autoscaling.gpuscale.dev",
        "inferenceautoscalers",
        Some("team-a"),
    );
    let (cert, key) = s.pki.client(KEDA);
    let mut keda = ExternalScalerClient::new(s.channel(Some((&cert, &key))).await);
    let so = |workload: &str| ScaledObjectRef {
        name: "llama".into(),
        namespace: "team-a".into(),
        scaler_metadata: [
            (
                "scalerAddress".to_string(),
                "gpuscale-scaler.gpuscale-system.svc:7070".to_string(),
            ),
            ("workload".to_string(), workload.to_string()),
        ]
        .into(),
    };
    // KEDA's pattern: the spec once, then metrics and activity each poll.
    let deadline = tokio::time::Instant::now() + GUARD;
    let spec = loop {
        // The controller registers the workload shortly after the scaler starts.
        match keda.get_metric_spec(so("team-a/llama")).await {
            Ok(r) => break r.into_inner(),
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound, "{e:?}");
                assert!(tokio::time::Instant::now() < deadline, "never registered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(
        spec.metric_specs[0].metric_name,
        "gpuscale-desired-replicas"
    );
    let deadline = tokio::time::Instant::now() + GUARD;
    let value = loop {
        match keda
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(so("team-a/llama")),
                metric_name: "s0-gpuscale-desired-replicas".into(),
            })
            .await
        {
            Ok(r) => break r.into_inner().metric_values[0].metric_value_float,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(tokio::time::Instant::now() < deadline, "never decided");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(value >= 1.0, "at least minReplicas: {value}");
    keda.is_active(so("team-a/llama")).await.unwrap();
    let mut push = keda
        .stream_is_active(so("team-a/llama"))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(GUARD, push.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let e = keda.is_active(so("team-b/chat")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Without a certificate (or token) KEDA is not let in.
    let mut anonymous = ExternalScalerClient::new(s.channel(None).await);
    let e = anonymous.is_active(so("team-a/llama")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    s.scaler.shutdown().await.unwrap();
}
