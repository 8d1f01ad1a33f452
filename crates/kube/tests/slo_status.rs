//! One SLO status everywhere: for the same engines' latencies, the policy's
//! decision, the scaler's API (ListWorkloads, Explain), the custom
//! resource's `status.sloStatus` and the `gpuscale_scaler_slo_status`
//! metric say the same — met, breached, then unknown once the engines stop
//! reporting latencies.

mod support;

use std::time::Duration;

use gpuscale_proto::v1;
use gpuscale_proto::v1::scaler_service_client::ScalerServiceClient;
use serde_json::{Value, json};
use support::*;

/// What each surface says, as the API's words.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Surfaces {
    decision: Option<String>,
    api: Option<String>,
    explain: Option<String>,
    custom_resource: Option<String>,
    metric: Option<String>,
}

fn api_word(s: i32) -> Option<String> {
    Some(
        match v1::SloStatus::try_from(s).ok()? {
            v1::SloStatus::Met => "met",
            v1::SloStatus::AtRisk => "at_risk",
            v1::SloStatus::Breached => "breached",
            v1::SloStatus::NoData => "unknown",
            v1::SloStatus::Unspecified => return None,
        }
        .to_string(),
    )
}

fn cr_word(s: &str) -> String {
    match s {
        "AtRisk" => "at_risk".to_string(),
        other => other.to_lowercase(),
    }
}

async fn metric_status(scaler: &gpuscale_kube::RunningKubeScaler) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = scaler.scaler().http_addr()?;
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.ok()?;
    reply
        .lines()
        .filter(|l| l.starts_with("gpuscale_scaler_slo_status{") && l.ends_with(" 1"))
        .find(|l| l.contains("workload=\"llama\""))
        .and_then(|l| l.split("status=\"").nth(1))
        .and_then(|s| s.split('"').next())
        .map(str::to_string)
}

async fn surfaces(cluster: &Cluster, scaler: &gpuscale_kube::RunningKubeScaler) -> Surfaces {
    let mut client =
        ScalerServiceClient::connect(format!("http://{}", scaler.scaler().grpc_addr()))
            .await
            .expect("the scaler's gRPC port");
    let listed = client
        .list_workloads(as_reader(cluster, v1::ListWorkloadsRequest::default()))
        .await
        .expect("ListWorkloads")
        .into_inner();
    let api = listed
        .workloads
        .iter()
        .find(|w| w.workload.as_ref().is_some_and(|r| r.name == "llama"))
        .and_then(|w| w.recommendation.as_ref())
        .and_then(|r| api_word(r.slo_status));
    let explained = client
        .explain(as_reader(
            cluster,
            v1::ExplainRequest {
                workload: Some(v1::WorkloadRef {
                    namespace: NS.into(),
                    name: "llama".into(),
                }),
            },
        ))
        .await
        .ok()
        .map(|r| r.into_inner());
    let explain = explained.as_ref().and_then(|d| api_word(d.slo_status));
    let decision = explained
        .and_then(|d| serde_json::from_str::<Value>(&d.detail_json).ok())
        .and_then(|d| {
            d.pointer("/slo/status")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let custom_resource = cluster
        .ias("llama")
        .pointer("/status/sloStatus")
        .and_then(Value::as_str)
        .map(cr_word);
    Surfaces {
        decision,
        api,
        explain,
        custom_resource,
        metric: metric_status(scaler).await,
    }
}

/// Waits until every surface says `want`.
async fn agree(cluster: &Cluster, scaler: &gpuscale_kube::RunningKubeScaler, want: &str) {
    let mut last = None;
    for _ in 0..120 {
        let s = surfaces(cluster, scaler).await;
        let all = [
            &s.decision,
            &s.api,
            &s.explain,
            &s.custom_resource,
            &s.metric,
        ];
        if all.iter().all(|v| v.as_deref() == Some(want)) {
            return;
        }
        last = Some(s);
        run_for(Duration::from_secs(1)).await;
    }
    panic!("the surfaces never all said {want}: {last:?}");
}

#[tokio::test(start_paused = true)]
async fn the_policy_the_api_the_custom_resource_and_the_metrics_agree_on_the_slo_status() {
    let cluster = Cluster::start(&["node-a"], Duration::from_secs(2)).await;
    cluster.create_deployment("llama", 1).await;
    cluster
        .create_ias(
            "llama",
            spec(
                "llama",
                1,
                4,
                json!({"slo": {
                    "ttft": {"thresholdSeconds": 0.5, "percentile": 90},
                    "itl": {"thresholdSeconds": 0.05, "percentile": 90}}}),
            ),
        )
        .await;
    let scaler = start_scaler(&cluster, "a").await;
    let fleet = Fleet::start(
        &cluster,
        &["node-a"],
        vec![format!("http://{}", scaler.scaler().grpc_addr())],
        5.0,
        Duration::from_secs(5),
    );
    fleet.set_latency(0.2, 0.02);
    agree(&cluster, &scaler, "met").await;
    // Per-request TPOT over its objective: breached everywhere at once.
    fleet.set_latency(0.2, 0.2);
    agree(&cluster, &scaler, "breached").await;
    // TTFT close to its threshold: at risk.
    fleet.set_latency(0.45, 0.02);
    agree(&cluster, &scaler, "at_risk").await;
    // No traffic: no observations in the window, so no evidence.
    fleet.set_rps(0.0);
    agree(&cluster, &scaler, "unknown").await;
}
