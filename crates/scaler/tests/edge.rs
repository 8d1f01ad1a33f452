//! The scaler's gRPC edge over real sockets: TLS with a certificate rotated
//! under open streams, standalone authentication (the static token file,
//! client certificates), and each hardening item: bounded error messages,
//! oversized requests, KEDA's metric name, health `Watch` of an unknown
//! service, connections that never start HTTP/2 or stay idle, per-peer
//! limits, and KEDA's stream pool apart from the watchers'.

#![allow(clippy::unwrap_used)]

mod pki;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::sample::{AgentHealth, NodeDelta, NodeSnapshot};
use gpuscale_core::{NodeName, Timestamp};
use gpuscale_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use gpuscale_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_client::AgentServiceClient;
use gpuscale_proto::v1::scaler_service_client::ScalerServiceClient;
use gpuscale_proto::{AgentReport, ReportBody};
use gpuscale_scaler::edge::{AuthConfig, AuthMode, TlsConfig, Transport};
use gpuscale_scaler::{RunningScaler, Scaler, ScalerConfig, ScalerFile};
use pki::Pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Long enough for anything on a loaded machine; only a guard against hangs.
const GUARD: Duration = Duration::from_secs(30);
const AGENT_TOKEN: &str = "agent-token-node-a-0123456789";
const CLIENT_TOKEN: &str = "client-token-router-0123456789";

fn workloads() -> Vec<gpuscale_scaler::WorkloadDef> {
    let file: ScalerFile = serde_yaml::from_str(
        "workloads:
  - {name: chat, namespace: llm, engines: {model: m}, proportional: {capacityTokensPerSecond: 100, maxReplicas: 4}}
  - {name: chat, namespace: other, engines: {model: m}, proportional: {capacityTokensPerSecond: 100, maxReplicas: 4}}
",
    )
    .unwrap();
    file.workloads(Path::new(".")).unwrap()
}

fn config() -> ScalerConfig {
    let mut c = ScalerConfig::new("127.0.0.1:0".parse().unwrap());
    c.tick = Duration::from_millis(100);
    c.workloads = workloads();
    c
}

/// A static auth file: an agent for node-a, a client `router` reading `llm`.
fn auth_file(dir: &Path) -> AuthConfig {
    let path = dir.join("auth.yaml");
    std::fs::write(
        &path,
        format!(
            "agents: [{{node: node-a, token: {AGENT_TOKEN}}}]\nclients: [{{name: router, token: {CLIENT_TOKEN}, namespaces: [llm]}}]\n"
        ),
    )
    .unwrap();
    AuthConfig::with_mode(AuthMode::File(path))
}

fn tls(pki: &Pki) -> TlsConfig {
    let (cert, key) = pki.server();
    let mut t = TlsConfig::new(cert, key);
    t.reload_interval = Duration::from_millis(100);
    t.client_ca = Some(pki.ca_file());
    t
}

async fn start(config: ScalerConfig) -> RunningScaler {
    Scaler::new(config).start().await.unwrap()
}

async fn tls_channel(addr: SocketAddr, pki: &Pki, identity: Option<(&Path, &Path)>) -> Channel {
    let mut t = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        t = t.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(t)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn plain_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
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

fn report(node: &str, seq: u64, snapshot: bool) -> v1::NodeReport {
    let body = if snapshot {
        ReportBody::Snapshot(NodeSnapshot {
            node: NodeName::new(node),
            agent_version: "test".into(),
            sampled_at: Timestamp::from_millis(1),
            sample_interval_ms: 1000,
            gpus: vec![],
            pods: vec![],
            engines: vec![],
            agent: AgentHealth::default(),
        })
    } else {
        ReportBody::Delta(NodeDelta {
            sampled_at: Timestamp::from_millis(i64::try_from(seq).unwrap()),
            ..NodeDelta::default()
        })
    };
    (&AgentReport {
        boot_epoch: 1,
        seq,
        sent_at: Timestamp::from_millis(1),
        body,
    })
        .into()
}

/// An agent stream: the sender of reports and the scaler's answer.
struct Stream {
    tx: mpsc::Sender<v1::NodeReport>,
    inbound: Result<tonic::Streaming<v1::ScalerDirective>, tonic::Status>,
}

async fn open(channel: Channel, token: Option<&str>, first: v1::NodeReport) -> Stream {
    let (tx, rx) = mpsc::channel(256);
    tx.send(first).await.unwrap();
    let inbound = AgentServiceClient::new(channel)
        .report(with_token(ReceiverStream::new(rx), token))
        .await
        .map(tonic::Response::into_inner);
    Stream { tx, inbound }
}

impl Stream {
    /// The status that ends the stream (after any directives).
    async fn status(self) -> tonic::Status {
        let _keep = self.tx;
        let mut inbound = match self.inbound {
            Err(s) => return s,
            Ok(i) => i,
        };
        loop {
            match tokio::time::timeout(GUARD, inbound.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return tonic::Status::ok("ended"),
                Ok(Err(s)) => return s,
                Err(_) => panic!("the stream neither ended nor failed"),
            }
        }
    }
}

async fn wait(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within the guard: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(scaler: &RunningScaler, line_start: &str) -> f64 {
    scaler
        .handle()
        .metrics()
        .encode()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The DER of the certificate the server presents to a new connection.
async fn served_certificate(addr: SocketAddr, pki: &Pki) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_rotated_certificate_keeps_open_streams_and_new_connections_get_it() {
    let pki = Pki::new();
    let mut c = config();
    let t = tls(&pki);
    let (cert, key) = (t.cert.clone(), t.key.clone());
    c.transport = Transport::Tls(t);
    c.auth = auth_file(pki.dir.path());
    let scaler = start(c).await;
    let addr = scaler.grpc_addr();
    let before = served_certificate(addr, &pki).await;

    let stream = open(
        tls_channel(addr, &pki, None).await,
        Some(AGENT_TOKEN),
        report("node-a", 1, true),
    )
    .await;
    let mut view = scaler.view();
    wait("node-a streams", || {
        view.borrow_and_update()
            .nodes
            .get(&NodeName::new("node-a"))
            .is_some_and(|n| n.connected)
    })
    .await;

    let rotated = pki.write_leaf(
        &cert,
        &key,
        &["localhost", "127.0.0.1", "rotated.localhost"],
        true,
    );
    assert_ne!(before, rotated);
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        if served_certificate(addr, &pki).await == rotated {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections never got the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metric(
            &scaler,
            "gpuscale_scaler_certificate_reloads_total{result=\"ok\"}"
        ) >= 1.0
    );

    // The stream opened under the old certificate goes on.
    for seq in 2..=5 {
        stream.tx.send(report("node-a", seq, false)).await.unwrap();
    }
    wait("the old stream's deltas applied", || {
        view.borrow_and_update()
            .nodes
            .get(&NodeName::new("node-a"))
            .is_some_and(|n| n.last_seq == 5 && n.connected)
    })
    .await;
    let mut inbound = stream.inbound.unwrap();
    match tokio::time::timeout(Duration::from_millis(300), inbound.message()).await {
        Err(_) | Ok(Ok(Some(_))) => {}
        Ok(other) => panic!("the stream ended after the rotation: {other:?}"),
    }
    // A new connection (with the new certificate) is served: refused for
    // want of a token, which only a working TLS session can say.
    let status = open(
        tls_channel(addr, &pki, None).await,
        None,
        report("node-a", 1, true),
    )
    .await
    .status()
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn standalone_tokens_and_certificates_authenticate_and_bind_agents_to_their_node() {
    let pki = Pki::new();
    let mut c = config();
    c.transport = Transport::Tls(tls(&pki));
    c.auth = auth_file(pki.dir.path());
    let scaler = start(c).await;
    let addr = scaler.grpc_addr();
    let channel = tls_channel(addr, &pki, None).await;

    let s = open(channel.clone(), None, report("node-a", 1, true))
        .await
        .status()
        .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = open(
        channel.clone(),
        Some("not-a-token-of-the-file"),
        report("node-a", 1, true),
    )
    .await
    .status()
    .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = open(
        channel.clone(),
        Some(CLIENT_TOKEN),
        report("node-a", 1, true),
    )
    .await
    .status()
    .await;
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "a client is not an agent: {s:?}"
    );
    let s = open(
        channel.clone(),
        Some(AGENT_TOKEN),
        report("node-b", 1, true),
    )
    .await
    .status()
    .await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("node-a"), "{s:?}");
    for (reason, n) in [
        ("no_token", 1.0),
        ("invalid_token", 1.0),
        ("wrong_service_account", 1.0),
        ("node_mismatch", 1.0),
    ] {
        assert_eq!(
            metric(
                &scaler,
                &format!("gpuscale_scaler_auth_refused_total{{api=\"agent\",reason=\"{reason}\"}}")
            ),
            n,
            "{reason}"
        );
    }

    // A client certificate names the node it may report.
    let (cert, key) = pki.client("node-c");
    let cert_channel = tls_channel(addr, &pki, Some((&cert, &key))).await;
    let s = open(cert_channel.clone(), None, report("node-d", 1, true))
        .await
        .status()
        .await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let _ok = open(cert_channel, None, report("node-c", 1, true)).await;
    let mut view = scaler.view();
    wait("node-c streams", || {
        view.borrow_and_update()
            .nodes
            .contains_key(&NodeName::new("node-c"))
    })
    .await;

    // API clients: the file's grants decide what they read.
    let mut api = ScalerServiceClient::new(channel.clone());
    let s = api
        .list_workloads(v1::ListWorkloadsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(s.code(), Code::Unauthenticated);
    let listed = api
        .list_workloads(with_token(
            v1::ListWorkloadsRequest::default(),
            Some(CLIENT_TOKEN),
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = listed
        .workloads
        .iter()
        .map(|w| w.workload.as_ref().unwrap().namespace.clone())
        .collect();
    assert_eq!(names, ["llm"]);
    let explain = |ns: &str| {
        with_token(
            v1::ExplainRequest {
                workload: Some(v1::WorkloadRef {
                    namespace: ns.into(),
                    name: "chat".into(),
                }),
            },
            Some(CLIENT_TOKEN),
        )
    };
    let s = api.explain(explain("other")).await.expect_err("forbidden");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = api
        .explain(explain("nowhere"))
        .await
        .expect_err("forbidden too");
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "nothing is said about unreadable names: {s:?}"
    );
    match api.explain(explain("llm")).await {
        Ok(_) => {}
        Err(s) => assert_eq!(s.code(), Code::Unavailable, "readable: {s:?}"),
    }
    scaler.shutdown().await.unwrap();
}

/// A plaintext scaler without authentication for the hardening checks.
fn open_config() -> ScalerConfig {
    config()
}

#[tokio::test]
async fn error_messages_quote_a_bounded_prefix_of_the_input() {
    let scaler = start(open_config()).await;
    let channel = plain_channel(scaler.grpc_addr()).await;
    let mut api = ScalerServiceClient::new(channel.clone());
    let long = "x".repeat(200_000);
    let s = api
        .explain(v1::ExplainRequest {
            workload: Some(v1::WorkloadRef {
                namespace: "llm".into(),
                name: long.clone(),
            }),
        })
        .await
        .expect_err("not a DNS label");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().len() < 512 && s.message().contains("200000 bytes"),
        "{}",
        s.message().len()
    );
    let s = api
        .list_workloads(v1::ListWorkloadsRequest {
            selector: format!("app in ({long}"),
            ..v1::ListWorkloadsRequest::default()
        })
        .await
        .expect_err("too long a selector");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().len() < 512, "{}", s.message().len());
    let mut keda = ExternalScalerClient::new(channel);
    let s = keda
        .is_active(ScaledObjectRef {
            name: "so".into(),
            namespace: "llm".into(),
            scaler_metadata: [("workload".to_string(), format!("/{long}"))].into(),
        })
        .await
        .expect_err("malformed workload");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().len() < 512, "{}", s.message().len());
    let s = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: long,
        })
        .await
        .expect_err("foreign metric");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().len() < 512, "{}", s.message().len());
    scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_requests_are_resource_exhausted() {
    let scaler = start(open_config()).await;
    let channel = plain_channel(scaler.grpc_addr()).await;
    let huge = "x".repeat(2 << 20);
    let s = ScalerServiceClient::new(channel.clone())
        .explain(v1::ExplainRequest {
            workload: Some(v1::WorkloadRef {
                namespace: "llm".into(),
                name: huge.clone(),
            }),
        })
        .await
        .expect_err("2 MiB");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("limit"), "{s:?}");
    let mut big = report("node-a", 1, true);
    if let Some(v1::node_report::Body::Snapshot(snap)) = big.body.as_mut() {
        snap.agent_version = huge;
    }
    let s = open(channel, None, big).await.status().await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn get_metrics_rejects_an_empty_or_foreign_metric_name() {
    let scaler = start(open_config()).await;
    let mut keda = ExternalScalerClient::new(plain_channel(scaler.grpc_addr()).await);
    let so = ScaledObjectRef {
        name: "chat".into(),
        namespace: "llm".into(),
        scaler_metadata: Default::default(),
    };
    for (name, ok) in [
        ("", false),
        ("x-gpuscale-desired-replicas", false),
        ("s-gpuscale-desired-replicas", false),
        ("s1x-gpuscale-desired-replicas", false),
        ("s0-queue-length", false),
        ("s0-gpuscale-desired-replicas", true),
        ("gpuscale-desired-replicas", true),
    ] {
        let r = keda
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(so.clone()),
                metric_name: name.into(),
            })
            .await;
        match r {
            Err(s) if s.code() == Code::InvalidArgument => assert!(!ok, "{name:?}: {s:?}"),
            // Ours: answered, or not decided yet.
            Ok(_) => assert!(ok, "{name:?}"),
            Err(s) => assert!(ok && s.code() == Code::Unavailable, "{name:?}: {s:?}"),
        }
    }
    scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_watch_of_an_unknown_service_streams_service_unknown() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let scaler = start(open_config()).await;
    let mut health = HealthClient::new(plain_channel(scaler.grpc_addr()).await);
    let mut stream = health
        .watch(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(GUARD, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);
    // And it stays open (no error follows at once).
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.message())
            .await
            .is_err()
    );
    let mut known = health
        .watch(HealthCheckRequest {
            service: "gpuscale.v1.ScalerService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(GUARD, known.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    scaler.shutdown().await.unwrap();
}

/// Reads until the peer closes (EOF or error); false if it is still open
/// after the guard.
async fn closed_by_peer(conn: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn connections_that_never_start_http2_or_stay_idle_are_closed() {
    let pki = Pki::new();
    let mut c = open_config();
    c.conn.preface_timeout = Duration::from_millis(200);
    c.conn.idle_timeout = Duration::from_millis(300);
    let scaler = start(c).await;
    let addr = scaler.grpc_addr();
    // Connects and says nothing.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_peer(&mut silent).await);
    // Speaks HTTP/1.
    let mut http1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_by_peer(&mut http1).await);
    // Starts HTTP/2 (preface and an empty SETTINGS frame), then idles.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    idle.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    assert!(closed_by_peer(&mut idle).await);
    for reason in ["no_http2_preface", "not_http2", "idle"] {
        assert!(
            metric(
                &scaler,
                &format!("gpuscale_scaler_connections_closed_total{{reason=\"{reason}\"}}")
            ) >= 1.0,
            "{reason}"
        );
    }
    // A connection with a call open is not idle.
    let channel = plain_channel(addr).await;
    let mut watch = ScalerServiceClient::new(channel)
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), watch.message())
            .await
            .map_or(true, |m| m.is_ok()),
        "the watch was closed"
    );
    scaler.shutdown().await.unwrap();

    // With TLS: a handshake, then nothing.
    let mut c = open_config();
    c.conn.preface_timeout = Duration::from_millis(200);
    c.transport = Transport::Tls(tls(&pki));
    let scaler = start(c).await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(scaler.grpc_addr())
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert!(closed_by_peer(&mut tls).await);
    // A TCP connection that never finishes the handshake.
    let mut c = open_config();
    let mut t = tls_config_fast(&pki);
    t.handshake_timeout = Duration::from_millis(200);
    c.transport = Transport::Tls(t);
    let scaler2 = start(c).await;
    let mut half = tokio::net::TcpStream::connect(scaler2.grpc_addr())
        .await
        .unwrap();
    assert!(closed_by_peer(&mut half).await);
    assert!(
        metric(
            &scaler2,
            "gpuscale_scaler_connections_closed_total{reason=\"tls_handshake_timeout\"}"
        ) >= 1.0
    );
    scaler.shutdown().await.unwrap();
    scaler2.shutdown().await.unwrap();
}

fn tls_config_fast(pki: &Pki) -> TlsConfig {
    let mut t = tls(pki);
    t.client_ca = None;
    t
}

#[tokio::test]
async fn one_peer_is_limited_in_streams_requests_and_report_rate() {
    let mut c = open_config();
    c.peers.max_streams = 2;
    c.peers.requests_per_second = 5.0;
    c.peers.burst = 5.0;
    c.peers.agent_reports_per_second = Some(1.0);
    let scaler = start(c).await;
    let channel = plain_channel(scaler.grpc_addr()).await;
    let mut api = ScalerServiceClient::new(channel.clone());
    let mut open_watches = Vec::new();
    for _ in 0..2 {
        open_watches.push(
            api.watch_recommendations(v1::WatchRecommendationsRequest::default())
                .await
                .unwrap(),
        );
    }
    let s = api
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .expect_err("a third stream");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("--max-streams-per-peer"), "{s:?}");
    drop(open_watches);

    let mut refused = 0;
    for _ in 0..20 {
        match api
            .list_workloads(v1::ListWorkloadsRequest::default())
            .await
        {
            Ok(_) => {}
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 10,
        "20 calls at once against 5 per second: {refused} refused"
    );

    // An agent that sends 20 reports at once: two (the bucket) are read at
    // once, the rest one per second; the stream is slowed, not ended.
    tokio::time::sleep(Duration::from_millis(2500)).await; // streams slots freed
    let stream = open(channel, None, report("node-a", 1, true)).await;
    for seq in 2..=20 {
        stream.tx.send(report("node-a", seq, false)).await.unwrap();
    }
    let mut view = scaler.view();
    wait("the snapshot applied", || {
        view.borrow_and_update()
            .nodes
            .contains_key(&NodeName::new("node-a"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seq = view.borrow_and_update().nodes[&NodeName::new("node-a")].last_seq;
    assert!(seq < 20, "all 20 reports were read at once: {seq}");
    let mut inbound = stream.inbound.unwrap();
    match tokio::time::timeout(Duration::from_millis(200), inbound.message()).await {
        Err(_) | Ok(Ok(Some(_))) => {}
        Ok(other) => panic!("a fast agent is slowed, not refused: {other:?}"),
    }
    scaler.shutdown().await.unwrap();
}

#[tokio::test]
async fn keda_streams_have_a_pool_the_watchers_cannot_exhaust() {
    let mut c = open_config();
    c.api.max_watchers = 1;
    c.api.max_keda_streams = 1;
    let scaler = start(c).await;
    let channel = plain_channel(scaler.grpc_addr()).await;
    let mut api = ScalerServiceClient::new(channel.clone());
    let _watch = api
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .unwrap();
    let s = api
        .watch_recommendations(v1::WatchRecommendationsRequest::default())
        .await
        .expect_err("watchers are full");
    assert_eq!(s.code(), Code::ResourceExhausted);
    let mut keda = ExternalScalerClient::new(channel);
    let so = ScaledObjectRef {
        name: "chat".into(),
        namespace: "llm".into(),
        scaler_metadata: Default::default(),
    };
    let _push = keda
        .stream_is_active(so.clone())
        .await
        .expect("KEDA's stream is served while the watchers are full");
    let s = keda
        .stream_is_active(so)
        .await
        .expect_err("KEDA's pool is full");
    assert!(s.message().contains("--max-keda-streams"), "{s:?}");
    scaler.shutdown().await.unwrap();
}
