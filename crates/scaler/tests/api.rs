//! The public APIs over real loopback gRPC: `ScalerService`
//! (WatchRecommendations, Explain, ListWorkloads) and KEDA's
//! `ExternalScaler`, served from a view the test publishes, plus live
//! scalers for reflection and health, and for a subscriber that never reads
//! while workloads come and go.

// KEDA's deprecated integer fields are part of the wire contract checked here.
#![allow(deprecated)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::slo::SloObjectives;
use gpuscale_core::{Histogram, Timestamp, WorkloadRef};
use gpuscale_policy::config::LatencyObjective;
use gpuscale_policy::hpa::{external_average_value_proposal, within_tolerance};
use gpuscale_policy::{
    Action, Decision, DecisionInputs, LatencyObservation, Limit, LoadObservation, Observation,
    ProportionalInputs, Recommendation, ReplicaCounts, Source,
};
use gpuscale_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use gpuscale_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use gpuscale_proto::v1;
use gpuscale_proto::v1::scaler_service_client::ScalerServiceClient;
use gpuscale_scaler::api::keda::workload_metadata;
use gpuscale_scaler::api::{
    ApiConfig, ApiContext, KEDA_METRIC_NAME, KedaScaler, RecommendationService,
};
use gpuscale_scaler::view::WorkloadView;
use gpuscale_scaler::{ScalerConfig, ScalerMetrics, StateView};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Long enough for anything on a loaded machine; only a guard against hangs.
const GUARD: Duration = Duration::from_secs(20);

fn workload(name: &str) -> WorkloadRef {
    WorkloadRef::new("llm", name)
}

fn decision(current: u32, desired: u32, reason: &str) -> Decision {
    Decision {
        at: Timestamp::from_millis(1_700_000_000_000),
        current_replicas: current,
        desired_replicas: desired,
        batch_limit: Some(64),
        action: match desired.cmp(&current) {
            std::cmp::Ordering::Greater => Action::ScaleUp,
            std::cmp::Ordering::Less => Action::ScaleDown,
            std::cmp::Ordering::Equal => Action::Hold,
        },
        winner: Source::Reactive,
        recommendations: vec![Recommendation {
            source: Source::Reactive,
            replicas: Some(desired),
            reason: reason.into(),
        }],
        limits: vec![Limit::Bounds {
            wanted: desired,
            min: 1,
            max: 32,
        }],
        victims: Vec::new(),
        model_confidence: 0.7,
        advisory: false,
        // As the policy judges the observation `wv` gives the decision.
        slo: objectives().assess(&observation(2, 1, Some(3.0), 0.2).latency.slo_window(None)),
        inputs: DecisionInputs::Proportional(ProportionalInputs {
            generation_tokens_per_second: None,
            arrival_rate_rps: Some(12.5),
            mean_output_tokens: None,
            demand_tokens_per_second: None,
            capacity_tokens_per_second: 1000.0,
            target_utilization: 0.8,
            ready: 2,
            telemetry_age_s: Some(1.0),
        }),
        scale_to_zero: None,
    }
}

fn observation(ready: u32, loading: u32, arrival: Option<f64>, ttft_s: f64) -> Observation {
    let mut ttft = Histogram::ttft();
    ttft.observe_n(ttft_s, 100);
    Observation {
        telemetry_at: Some(Timestamp::from_millis(1_700_000_000_000)),
        replicas: ReplicaCounts {
            current: ready + loading,
            ready,
            loading,
            ..ReplicaCounts::default()
        },
        replica_samples: Vec::new(),
        load: LoadObservation {
            arrival_rate_rps: arrival,
            ..LoadObservation::default()
        },
        latency: LatencyObservation {
            ttft_seconds: Some(ttft),
            itl_seconds: None,
            tpot_seconds: None,
        },
    }
}

fn view_of(workloads: Vec<WorkloadView>, generation: u64) -> Arc<StateView> {
    Arc::new(StateView {
        generation,
        published_at: Timestamp::from_millis(1_700_000_000_000 + generation as i64),
        workloads: workloads
            .into_iter()
            .map(|w| (w.workload.clone(), Arc::new(w)))
            .collect(),
        ..StateView::default()
    })
}

fn wv(name: &str, labels: &[(&str, &str)], decided: Option<(u32, u32, &str)>) -> WorkloadView {
    WorkloadView {
        workload: workload(name),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        observation: decided.map(|_| observation(2, 1, Some(3.0), 0.2)),
        decision: decided.map(|(c, d, r)| decision(c, d, r)),
        last_actuation: None,
        warming_up: None,
    }
}

/// A TTFT objective of 0.5 s at p90.
fn objectives() -> SloObjectives {
    SloObjectives {
        ttft: LatencyObjective {
            threshold_s: 0.5,
            quantile: 0.9,
        },
        ttft_per_input_token_s: 0.0,
        tpot: LatencyObjective {
            threshold_s: 0.05,
            quantile: 0.9,
        },
    }
}

/// The APIs served over loopback from a view the test publishes.
struct Served {
    addr: SocketAddr,
    view: watch::Sender<Arc<StateView>>,
    metrics: Arc<ScalerMetrics>,
    shutdown: watch::Sender<bool>,
}

impl Served {
    async fn start(initial: Arc<StateView>, config: ApiConfig) -> Self {
        let (view_tx, view_rx) = watch::channel(initial);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let metrics = Arc::new(ScalerMetrics::new());
        let context = ApiContext::new(view_rx, config, shutdown_rx, metrics.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RecommendationService::new(context.clone()).into_server())
                .add_service(KedaScaler::new(context).into_server())
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self {
            addr,
            view: view_tx,
            metrics,
            shutdown: shutdown_tx,
        }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("url")
            .connect()
            .await
            .expect("connects")
    }

    async fn scaler(&self) -> ScalerServiceClient<Channel> {
        ScalerServiceClient::new(self.channel().await)
    }

    async fn keda(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::new(self.channel().await)
    }

    fn metric(&self, line_start: &str) -> Option<f64> {
        self.metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

fn name_of(r: &v1::Recommendation) -> String {
    r.workload
        .as_ref()
        .map(|w| w.name.clone())
        .unwrap_or_default()
}

async fn next(stream: &mut tonic::Streaming<v1::Recommendation>) -> v1::Recommendation {
    tokio::time::timeout(GUARD, stream.message())
        .await
        .expect("a message in time")
        .expect("no error")
        .expect("stream open")
}

#[tokio::test]
async fn watch_sends_the_current_state_then_each_change_then_removals() {
    let served = Served::start(
        view_of(
            vec![
                wv(
                    "chat",
                    &[("app", "chat"), ("tier", "prod")],
                    Some((2, 4, "load")),
                ),
                wv(
                    "batch",
                    &[("app", "batch"), ("tier", "dev")],
                    Some((1, 1, "idle")),
                ),
                wv("new", &[("tier", "prod")], None),
            ],
            1,
        ),
        ApiConfig::default(),
    )
    .await;
    let mut client = served.scaler().await;
    let mut stream = client
        .watch_recommendations(v1::WatchRecommendationsRequest {
            selector: "tier in (prod)".into(),
            namespace: String::new(),
        })
        .await
        .expect("watch opens")
        .into_inner();
    let mut first = [next(&mut stream).await, next(&mut stream).await];
    first.sort_by_key(name_of);
    assert_eq!(
        first.iter().map(name_of).collect::<Vec<_>>(),
        ["chat", "new"]
    );
    let chat = &first[0];
    assert_eq!(
        (
            chat.desired_replicas,
            chat.current_replicas,
            chat.ready_replicas,
            chat.in_flight_replicas
        ),
        (4, 2, 2, 1)
    );
    assert_eq!(chat.batch_limit, Some(64));
    assert_eq!(chat.action, "scale_up");
    assert_eq!(chat.winner, "reactive");
    assert!(
        chat.reason.contains("2 -> 4") && chat.reason.contains("load"),
        "{}",
        chat.reason
    );
    assert_eq!(chat.slo_status, v1::SloStatus::Met as i32);
    assert_eq!(first[1].decided_at_unix_ms, 0, "no decision yet");
    assert_eq!(first[1].reason, "no decision yet");

    // The same decision made again later is not a change; a new outcome is.
    let mut again = wv(
        "chat",
        &[("app", "chat"), ("tier", "prod")],
        Some((2, 4, "load")),
    );
    if let Some(d) = again.decision.as_mut() {
        d.at = d.at.plus_secs(2.0);
    }
    served.view.send_replace(view_of(
        vec![
            again,
            wv(
                "batch",
                &[("app", "batch"), ("tier", "dev")],
                Some((1, 3, "burst")),
            ),
            wv("new", &[("tier", "prod")], Some((0, 1, "first"))),
        ],
        2,
    ));
    let update = next(&mut stream).await;
    assert_eq!(
        name_of(&update),
        "new",
        "batch is not selected, chat did not change"
    );
    assert_eq!(update.desired_replicas, 1);

    // A workload whose labels stop matching, and one unregistered, are removed.
    served.view.send_replace(view_of(
        vec![wv(
            "chat",
            &[("app", "chat"), ("tier", "staging")],
            Some((2, 4, "load")),
        )],
        3,
    ));
    let mut removed = [next(&mut stream).await, next(&mut stream).await];
    removed.sort_by_key(name_of);
    assert!(removed.iter().all(|r| r.removed), "{removed:?}");
    assert_eq!(
        removed.iter().map(name_of).collect::<Vec<_>>(),
        ["chat", "new"]
    );
}

#[tokio::test]
async fn malformed_selectors_and_unknown_workloads_get_clear_statuses() {
    let served = Served::start(
        view_of(
            vec![
                wv("chat", &[("app", "chat")], Some((2, 4, "load"))),
                wv("fresh", &[], None),
            ],
            1,
        ),
        ApiConfig::default(),
    )
    .await;
    let mut client = served.scaler().await;
    let e = client
        .watch_recommendations(v1::WatchRecommendationsRequest {
            selector: "app in (chat".into(),
            namespace: String::new(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("missing `)`"), "{}", e.message());
    let e = client
        .list_workloads(v1::ListWorkloadsRequest {
            namespace: String::new(),
            selector: "app=>chat".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(e.code(), Code::InvalidArgument);

    let explain = |ns: &str, name: &str| v1::ExplainRequest {
        workload: Some(v1::WorkloadRef {
            namespace: ns.into(),
            name: name.into(),
        }),
    };
    let e = client
        .explain(explain("llm", "missing"))
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("llm/missing") && e.message().contains("llm/chat"),
        "names the workload and what exists: {}",
        e.message()
    );
    let e = client
        .explain(explain("llm", "fresh"))
        .await
        .expect_err("undecided");
    assert_eq!(e.code(), Code::Unavailable);
    let e = client
        .explain(explain("llm", "Bad_Name"))
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("workload.name"), "{}", e.message());
    let e = client
        .explain(v1::ExplainRequest { workload: None })
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Code::InvalidArgument);

    let record = client
        .explain(explain("llm", "chat"))
        .await
        .expect("explains")
        .into_inner();
    assert_eq!((record.current_replicas, record.desired_replicas), (2, 4));
    assert_eq!(record.winner, "reactive");
    assert_eq!(record.recommendations[0].reason, "load");
    assert_eq!(record.limits_applied, ["bounds: 4 clamped to 1..=32"]);
    assert_eq!(record.model_confidence, 0.7);
    let detail: serde_json::Value = serde_json::from_str(&record.detail_json).expect("json");
    assert_eq!(detail["inputs"]["arrival_rate_rps"], 12.5);
    let obs: serde_json::Value = serde_json::from_str(&record.observation_json).expect("json");
    assert_eq!(obs["replicas"]["ready"], 2);

    let all = client
        .list_workloads(v1::ListWorkloadsRequest::default())
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(all.workloads.len(), 2);
    let chat = all
        .workloads
        .iter()
        .find(|w| w.labels.get("app").map(String::as_str) == Some("chat"))
        .expect("chat listed with its labels");
    assert_eq!(
        chat.recommendation.as_ref().map(|r| r.desired_replicas),
        Some(4)
    );
    let none = client
        .list_workloads(v1::ListWorkloadsRequest {
            namespace: "other".into(),
            selector: String::new(),
        })
        .await
        .expect("lists")
        .into_inner();
    assert!(none.workloads.is_empty());
}

#[tokio::test]
async fn watchers_beyond_the_limit_are_refused_until_one_closes() {
    let served = Served::start(
        view_of(vec![wv("chat", &[], Some((1, 1, "idle")))], 1),
        ApiConfig {
            max_watchers: 2,
            watch_buffer: 8,
            ..ApiConfig::default()
        },
    )
    .await;
    let mut client = served.scaler().await;
    let watch = || v1::WatchRecommendationsRequest::default();
    let mut a = client
        .watch_recommendations(watch())
        .await
        .expect("1st")
        .into_inner();
    let _b = client
        .watch_recommendations(watch())
        .await
        .expect("2nd")
        .into_inner();
    next(&mut a).await;
    let e = client
        .watch_recommendations(watch())
        .await
        .expect_err("3rd");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("limit is 2"), "{}", e.message());
    // KEDA's StreamIsActive has a pool of its own: full watchers never
    // lock KEDA out.
    let mut keda = served.keda().await;
    let _push = keda
        .stream_is_active(ScaledObjectRef {
            name: "chat".into(),
            namespace: "llm".into(),
            scaler_metadata: Default::default(),
        })
        .await
        .expect("KEDA's stream is served while the watchers are full");
    assert_eq!(
        served.metric("gpuscale_scaler_api_streams_refused_total{api=\"watch_recommendations\"}"),
        Some(1.0)
    );
    drop(a);
    // The slot frees once the server notices the client is gone.
    let reopened = tokio::time::timeout(GUARD, async {
        loop {
            match client.watch_recommendations(watch()).await {
                Ok(s) => return s,
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await
    .expect("a slot frees up");
    let mut reopened = reopened.into_inner();
    assert_eq!(next(&mut reopened).await.desired_replicas, 1);
}

#[tokio::test]
async fn a_subscriber_that_never_reads_is_dropped_and_the_others_keep_up() {
    let served = Served::start(
        view_of(vec![wv("chat", &[], Some((1, 1, "start")))], 1),
        ApiConfig {
            max_watchers: 8,
            watch_buffer: 4,
            ..ApiConfig::default()
        },
    )
    .await;
    // A client whose HTTP/2 window lets ~1 KiB through before it reads.
    let stuck_channel = Endpoint::from_shared(format!("http://{}", served.addr))
        .expect("url")
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .expect("connects");
    let mut stuck = ScalerServiceClient::new(stuck_channel)
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .expect("opens")
        .into_inner();
    let mut reader = served
        .scaler()
        .await
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .expect("opens")
        .into_inner();
    assert!(next(&mut reader).await.reason.contains("start"));
    let dropped = "gpuscale_scaler_api_streams_dropped_total{api=\"watch_recommendations\"}";
    let mut published = 0u32;
    while served.metric(dropped).unwrap_or(0.0) < 1.0 {
        published += 1;
        assert!(published < 5_000, "the stuck subscriber was never dropped");
        // Publishing never waits for any subscriber.
        served.view.send_replace(view_of(
            vec![wv(
                "chat",
                &[],
                Some((1, 1 + published % 7, &format!("change {published}"))),
            )],
            u64::from(published) + 1,
        ));
        // The reading subscriber sees every change.
        let got = next(&mut reader).await;
        assert!(
            got.reason.contains(&format!("change {published}")),
            "{}",
            got.reason
        );
    }
    // The stuck client gets what was buffered, then RESOURCE_EXHAUSTED.
    let end = tokio::time::timeout(GUARD, async {
        loop {
            match stuck.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("ends");
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("fell behind"), "{}", end.message());
    // The reader is still served.
    served.view.send_replace(view_of(
        vec![wv("chat", &[], Some((1, 9, "after the drop")))],
        u64::from(published) + 10,
    ));
    assert!(next(&mut reader).await.reason.contains("after the drop"));
    assert_eq!(
        served.metric("gpuscale_scaler_api_streams{api=\"watch_recommendations\"}"),
        Some(1.0),
        "only the reader is still open"
    );
}

#[tokio::test]
async fn streams_end_with_unavailable_when_the_scaler_shuts_down() {
    let served = Served::start(
        view_of(vec![wv("chat", &[], Some((1, 1, "idle")))], 1),
        ApiConfig::default(),
    )
    .await;
    let mut stream = served
        .scaler()
        .await
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .expect("opens")
        .into_inner();
    next(&mut stream).await;
    served.shutdown.send_replace(true);
    let end = tokio::time::timeout(GUARD, stream.message())
        .await
        .expect("ends")
        .expect_err("a status");
    assert_eq!(end.code(), Code::Unavailable);
}

fn scaled_object(w: &WorkloadRef) -> ScaledObjectRef {
    let mut metadata = workload_metadata(w);
    metadata.insert("scalerAddress".into(), "gpuscale-scaler:7070".into());
    ScaledObjectRef {
        name: format!("{}-so", w.name),
        namespace: w.namespace.clone(),
        scaler_metadata: metadata,
    }
}

/// The HPA's External AverageValue path (REFERENCE §1.2) as KEDA drives it:
/// the HPA proposal, clamped to the HPA's bounds (min at least 1), and
/// KEDA's activation: an inactive ScaledObject goes to 0 (after its cooldown).
fn keda_hpa_replicas(
    active: bool,
    total: f64,
    target: f64,
    status_replicas: u32,
    tolerance: f64,
    (min, max): (u32, u32),
) -> u32 {
    if !active {
        return 0;
    }
    let proposal =
        external_average_value_proposal(total, target, status_replicas, tolerance, tolerance);
    proposal.clamp(min.max(1), max)
}

#[tokio::test]
async fn keda_calling_pattern_lands_a_stock_hpa_on_the_recommendation() {
    let chat = workload("chat");
    let served = Served::start(
        view_of(vec![wv("chat", &[], Some((1, 1, "idle")))], 1),
        ApiConfig::default(),
    )
    .await;
    let mut keda = served.keda().await;
    // KEDA asks for the spec once, when it builds the HPA.
    let spec = keda
        .get_metric_spec(scaled_object(&chat))
        .await
        .expect("spec")
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let spec = &spec.metric_specs[0];
    assert_eq!(spec.metric_name, KEDA_METRIC_NAME);
    let target = spec.target_size_float;
    assert_eq!((target, spec.target_size), (1.0, 1));

    let bounds = (1, 64);
    let mut generation = 1;
    for desired in 0..=24u32 {
        for status_replicas in 1..=24u32 {
            generation += 1;
            let mut w = wv("chat", &[], Some((status_replicas, desired, "sized")));
            // No load at all when gpuscale wants zero replicas.
            if desired == 0
                && let Some(o) = w.observation.as_mut()
            {
                o.load.arrival_rate_rps = Some(0.0);
            }
            served.view.send_replace(view_of(vec![w], generation));
            // Every poll: GetMetrics, then IsActive.
            let metrics = keda
                .get_metrics(GetMetricsRequest {
                    scaled_object_ref: Some(scaled_object(&chat)),
                    metric_name: format!("s0-{KEDA_METRIC_NAME}"),
                })
                .await
                .expect("metrics")
                .into_inner();
            let value = &metrics.metric_values[0];
            assert_eq!(value.metric_value, i64::from(desired));
            // KEDA uses metricValueFloat when > 0, else metricValue.
            let total = if value.metric_value_float > 0.0 {
                value.metric_value_float
            } else {
                value.metric_value as f64
            };
            let active = keda
                .is_active(scaled_object(&chat))
                .await
                .expect("is active")
                .into_inner()
                .result;
            assert_eq!(active, desired > 0, "desired {desired}");
            // With `tolerance: 0` in the ScaledObject's HPA behaviour the
            // HPA lands exactly on gpuscale's count.
            assert_eq!(
                keda_hpa_replicas(active, total, target, status_replicas, 0.0, bounds),
                desired,
                "desired {desired}, status.replicas {status_replicas}, tolerance 0"
            );
            // With the default 10% band it lands there too, unless the move
            // is inside the band: then it keeps status.replicas.
            let within = desired > 0
                && within_tolerance(f64::from(desired) / f64::from(status_replicas), 0.1, 0.1);
            let expected = if within { status_replicas } else { desired };
            assert_eq!(
                keda_hpa_replicas(active, total, target, status_replicas, 0.1, bounds),
                expected,
                "desired {desired}, status.replicas {status_replicas}, tolerance 0.1"
            );
        }
    }
}

async fn next_active(
    stream: &mut tonic::Streaming<gpuscale_proto::externalscaler::IsActiveResponse>,
) -> bool {
    tokio::time::timeout(GUARD, stream.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("no error")
        .result
}

#[tokio::test]
async fn keda_is_active_while_there_is_load_and_streams_changes() {
    let chat = workload("chat");
    let mut idle = wv("chat", &[], Some((1, 0, "no load")));
    if let Some(o) = idle.observation.as_mut() {
        o.load.arrival_rate_rps = Some(0.0);
    }
    let mut queued = idle.clone();
    if let Some(o) = queued.observation.as_mut() {
        o.load.requests_waiting = Some(3.0);
    }
    let served = Served::start(view_of(vec![idle.clone()], 1), ApiConfig::default()).await;
    let mut keda = served.keda().await;
    assert!(
        !keda
            .is_active(scaled_object(&chat))
            .await
            .expect("ok")
            .into_inner()
            .result
    );
    let mut stream = keda
        .stream_is_active(scaled_object(&chat))
        .await
        .expect("streams")
        .into_inner();
    assert!(
        !next_active(&mut stream).await,
        "the current activity first"
    );
    served.view.send_replace(view_of(vec![queued], 2));
    assert!(
        next_active(&mut stream).await,
        "waiting requests make it active at desired 0"
    );
    assert!(
        keda.is_active(scaled_object(&chat))
            .await
            .expect("ok")
            .into_inner()
            .result
    );
    served.view.send_replace(view_of(vec![idle], 3));
    assert!(!next_active(&mut stream).await);
}

#[tokio::test]
async fn keda_bad_input_gets_clear_statuses() {
    let served = Served::start(
        view_of(
            vec![wv("chat", &[], Some((1, 2, "x"))), wv("fresh", &[], None)],
            1,
        ),
        ApiConfig::default(),
    )
    .await;
    let mut keda = served.keda().await;
    let e = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(&workload("missing"))),
            metric_name: KEDA_METRIC_NAME.into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("llm/missing"), "{}", e.message());
    let e = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(&workload("fresh"))),
            metric_name: KEDA_METRIC_NAME.into(),
        })
        .await
        .expect_err("no decision");
    assert_eq!(e.code(), Code::Unavailable);
    let e = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(&workload("chat"))),
            metric_name: "s0-queue-length".into(),
        })
        .await
        .expect_err("not our metric");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains(KEDA_METRIC_NAME), "{}", e.message());
    let e = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: KEDA_METRIC_NAME.into(),
        })
        .await
        .expect_err("no ref");
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut bad = scaled_object(&workload("chat"));
    bad.scaler_metadata.insert("workload".into(), "llm/".into());
    let e = keda.is_active(bad).await.expect_err("bad metadata");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("scalerMetadata.workload"),
        "{}",
        e.message()
    );
    let e = keda
        .stream_metric_spec(scaled_object(&workload("chat")))
        .await
        .expect_err("pull only");
    assert_eq!(e.code(), Code::Unimplemented);
}

#[tokio::test]
async fn a_live_scaler_serves_the_apis_with_reflection_and_health() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let running =
        gpuscale_scaler::Scaler::new(ScalerConfig::new("127.0.0.1:0".parse().expect("addr")))
            .start()
            .await
            .expect("starts");
    let channel = Endpoint::from_shared(format!("http://{}", running.grpc_addr()))
        .expect("url")
        .connect()
        .await
        .expect("connects");
    for service in ["gpuscale.v1.ScalerService", "externalscaler.ExternalScaler"] {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service} is SERVING");
    }
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect("reflection answers")
        .into_inner();
    let mut listed = match responses
        .message()
        .await
        .expect("ok")
        .expect("one")
        .message_response
    {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    // Exactly what this port serves: not the agent's ServingService nor
    // the kubelet's API, whose descriptors share the set.
    listed.sort();
    assert_eq!(
        listed,
        [
            "externalscaler.ExternalScaler",
            "gpuscale.v1.ActivatorService",
            "gpuscale.v1.AgentService",
            "gpuscale.v1.ScalerService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    );
    let listed = ScalerServiceClient::new(channel)
        .list_workloads(v1::ListWorkloadsRequest::default())
        .await
        .expect("lists")
        .into_inner();
    assert!(listed.workloads.is_empty());
    running.shutdown().await.expect("stops");
}

/// Workloads for a live scaler: the proportional rule, one per name.
fn live_workloads(names: &[String]) -> Vec<gpuscale_scaler::config::WorkloadDef> {
    let file: gpuscale_scaler::ScalerFile = serde_json::from_value(serde_json::json!({
        "workloads": names.iter().map(|name| serde_json::json!({
            "name": name,
            "namespace": "llm",
            "labels": {"app": name},
            "engines": {"model": "llama-3-8b"},
            "proportional": {"capacityTokensPerSecond": 2000, "maxReplicas": 4},
        })).collect::<Vec<_>>(),
    }))
    .expect("workloads parse");
    file.workloads(std::path::Path::new("."))
        .expect("valid workloads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_never_holds_up_a_live_scaler() {
    let mut config = ScalerConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.tick = Duration::from_millis(50);
    config.api = ApiConfig {
        max_watchers: 4,
        watch_buffer: 2,
        ..ApiConfig::default()
    };
    let running = gpuscale_scaler::Scaler::new(config)
        .start()
        .await
        .expect("starts");
    let url = format!("http://{}", running.grpc_addr());
    let stuck_channel = Endpoint::from_shared(url.clone())
        .expect("url")
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .expect("connects");
    let mut stuck = ScalerServiceClient::new(stuck_channel)
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .expect("opens")
        .into_inner();
    let channel = Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connects");
    let mut client = ScalerServiceClient::new(channel);
    let mut reader = client
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .expect("opens")
        .into_inner();
    let dropped = "gpuscale_scaler_api_streams_dropped_total{api=\"watch_recommendations\"}";
    let dropped_count = || {
        running
            .handle()
            .metrics()
            .encode()
            .lines()
            .find(|l| l.starts_with(dropped))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Workloads come and go while the stuck subscriber reads nothing: the
    // scaler keeps deciding and publishing, and the reader sees each one.
    let mut registered = 0usize;
    while dropped_count() < 1.0 {
        assert!(registered < 2_000, "the stuck subscriber was never dropped");
        let name = format!("w-{registered}");
        let def = live_workloads(std::slice::from_ref(&name)).remove(0);
        running.handle().register_workload(def);
        if registered > 0 {
            running
                .handle()
                .unregister_workload(&workload(&format!("w-{}", registered - 1)));
        }
        registered += 1;
        loop {
            let r = next(&mut reader).await;
            if name_of(&r) == name && !r.removed {
                break;
            }
        }
    }
    let end = tokio::time::timeout(GUARD, async {
        loop {
            match stuck.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("ends");
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    // The decide loop carries on: the last workload gets its decision.
    let last = workload(&format!("w-{}", registered - 1));
    let record = tokio::time::timeout(GUARD, async {
        loop {
            match client
                .explain(v1::ExplainRequest {
                    workload: Some(v1::WorkloadRef {
                        namespace: last.namespace.clone(),
                        name: last.name.clone(),
                    }),
                })
                .await
            {
                Ok(r) => return r.into_inner(),
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await
    .expect("a decision after the drop");
    assert!(record.decided_at_unix_ms > 0);
    running.shutdown().await.expect("stops");
}
