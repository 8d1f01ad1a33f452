//! The link to the scaler's `ActivatorService`: a report of every
//! workload's held requests at once when a workload without a ready
//! replica receives a request, and every `--report-interval`; the scaler's
//! updates trigger a probe when a replica is ready and carry when the
//! first replica is expected. Retried with backoff (100 ms doubling to
//! 5 s) for as long as the activator runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gpuscale_proto::v1;
use gpuscale_proto::v1::activator_service_client::ActivatorServiceClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::Shared;
use crate::error::ProxyError;
use crate::sidecar::link::{BACKOFF_BASE, backoff, stopped};

/// A lazily connecting channel to the scaler (TLS with `--ca-file`).
pub(super) fn channel(url: &str, config: &super::ActivatorConfig) -> Result<Channel, ProxyError> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| ProxyError::config("--scaler", url, e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| ProxyError::config("--ca-file", ca.display(), e.to_string()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        if let Some(name) = &config.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| ProxyError::config("--ca-file", ca.display(), e.to_string()))?;
    }
    Ok(endpoint.connect_lazy())
}

/// `Bearer <token>` from `--token-file`, read now.
fn bearer(config: &super::ActivatorConfig) -> Result<Option<MetadataValue<Ascii>>, String> {
    let Some(path) = &config.token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map(Some)
        .map_err(|_| format!("--token-file {}: not a valid header value", path.display()))
}

impl Shared {
    fn report(&self) -> v1::ActivatorReport {
        v1::ActivatorReport {
            activator: self.config.name.clone(),
            workloads: self
                .routes
                .iter()
                .map(|r| {
                    let held = r.admission.load().queued;
                    v1::HeldDemand {
                        workload: Some(v1::WorkloadRef {
                            namespace: r.workload.namespace.clone(),
                            name: r.workload.name.clone(),
                        }),
                        held: u32::try_from(held).unwrap_or(u32::MAX),
                        arrivals_total: r.arrivals.load(Ordering::Relaxed),
                        oldest_held_seconds: r.oldest_held_s(),
                        // The flag is set before the request is counted as
                        // held: a report between the two must leave it set
                        // for the next report, not spend it on `held: 0`.
                        wake: held > 0 && r.wake.swap(false, Ordering::SeqCst),
                    }
                })
                .collect(),
        }
    }

    fn apply(&self, u: &v1::ActivatorUpdate) {
        let Some(w) = &u.workload else { return };
        let Some(r) = self
            .routes
            .iter()
            .find(|r| r.workload.namespace == w.namespace && r.workload.name == w.name)
        else {
            return;
        };
        if !u.known {
            warn!(workload = %r.workload, "the scaler does not decide for this workload: held requests wait for a replica started otherwise");
        }
        r.expected_ready_ms
            .store(u.first_ready_expected_unix_ms, Ordering::Relaxed);
        if u.ready_replicas > 0 && !r.ready.load(Ordering::SeqCst) {
            r.probe_now.notify_one();
        }
    }
}

/// Keeps the stream to the scaler open for as long as the activator runs.
pub(super) async fn run(shared: Arc<Shared>, channel: Channel, mut stop: watch::Receiver<bool>) {
    let mut client = ActivatorServiceClient::new(channel);
    let mut delay = BACKOFF_BASE;
    let mut logged_down = false;
    loop {
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.try_send(shared.report());
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        match bearer(&shared.config) {
            Ok(Some(token)) => {
                request.metadata_mut().insert("authorization", token);
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "no token for the scaler: connecting without one"),
        }
        let call = client.activate(request);
        let ended: Result<(), tonic::Status> = async {
            let mut inbound = tokio::select! {
                () = stopped(&mut stop) => return Ok(()),
                r = call => r?.into_inner(),
            };
            if !shared.scaler_connected.swap(true, Ordering::SeqCst) {
                info!("reporting held requests to the scaler");
            }
            logged_down = false;
            delay = BACKOFF_BASE;
            loop {
                tokio::select! {
                    biased;
                    () = stopped(&mut stop) => return Ok(()),
                    m = inbound.message() => match m? {
                        Some(u) => shared.apply(&u),
                        None => return Ok(()),
                    },
                    () = shared.report_now.notified() => {
                        let _ = tx.try_send(shared.report());
                    }
                    () = tokio::time::sleep(shared.config.report_interval) => {
                        let _ = tx.try_send(shared.report());
                    }
                }
            }
        }
        .await;
        shared.scaler_connected.store(false, Ordering::SeqCst);
        if *stop.borrow() {
            return;
        }
        match ended {
            Ok(()) => debug!("the scaler closed the activator stream: reopening"),
            Err(e) if !logged_down => {
                warn!(code = ?e.code(), error = %e.message(),
                    "cannot report held requests to the scaler: retrying; held requests wait until their deadline");
                logged_down = true;
            }
            Err(e) => debug!(error = %e, "Activate failed again"),
        }
        if !backoff(&mut delay, &mut stop).await {
            return;
        }
    }
}
